"""The bare script of the start benchmark: import diffusers, load the base, apply the LoRA, render, save.

What a user without sidecar runs to see one checkpoint's first sample; `bench.start` times
it from its process start to the image on disk. Only torch and diffusers are imported.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description="render one request as a plain diffusers script does")
    for name in ("--model", "--lora", "--out", "--prompt"):
        parser.add_argument(name, required=True)
    parser.add_argument("--negative", default="")
    for name in ("--width", "--height", "--steps", "--seed"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--guidance", type=float, required=True)
    args = parser.parse_args()

    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(args.lora)
    image = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative or None,
        width=args.width,
        height=args.height,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    ).images[0]
    partial = f"{args.out}.partial.png"  # renamed into place, as sidecar's files: whole when seen
    image.save(partial)
    os.replace(partial, args.out)


if __name__ == "__main__":
    main()
