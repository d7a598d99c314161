"""Peak VRAM per offload mode against the memory plan, and 8-bit against bf16, on wide Flux.

Wide Flux: the real transformer width (3072, 24 heads of 128) and the real VAE
(`block_out_channels` 128-512, 16 latent channels) with a few blocks and narrow text
encoders, random weights, built offline (`sidecar.testing.wide`).
Each mode renders one 1024 px image (4 steps) through sidecar's own renderer, placed as
`Placement` places it; the peak torch allocates is compared with the plan the loaded
modules give (`memory.plan_pipeline`), which is what `--offload auto` and `sidecar check`
use. Then the backbone in int8 (`model.quantize`, torchao) against bf16, and diffusers'
layerwise fp8 storage as a reference point: seconds per image and peak VRAM.

    python bench/gpu_memory.py [--out bench/gpu_memory.json]

Without CUDA it says so and exits 0. Exit 1 when a mode fails or misses the plan by
more than PLAN_TOLERANCE.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PLAN_TOLERANCE = 0.15
SIZE_PX = 1024
STEPS = 4
MIB = 1024**2


def build_wide_flux():
    """A Flux pipeline with the real transformer width and the real VAE, few blocks."""
    import torch
    from diffusers import AutoencoderKL

    from sidecar.testing.wide import build_flux_wide

    pipe = build_flux_wide(seed=0)
    pipe.vae = AutoencoderKL(  # FLUX.1-dev's VAE config: the decode's working memory is real
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        sample_size=1024,
    )
    return pipe.to(torch.bfloat16)


def render_once(renderer, device) -> tuple[float, int]:
    """Seconds and peak bytes of one 1024 px image, prompts encoded inside the measurement."""
    import torch

    from sidecar.plan.request import SampleRequest
    from sidecar.render.devices import peak_vram_bytes, reset_peak

    request = SampleRequest(
        index=0, prompt="a photo of a dog", negative_prompt="", width=SIZE_PX, height=SIZE_PX,
        steps=STEPS, guidance_scale=3.5, true_cfg_scale=1.0, sampler="flowmatch", seed=1, strength=1.0,
    )  # fmt: skip
    renderer._embeddings.clear()
    reset_peak(device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    list(renderer.render_resilient([request]))
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, peak_vram_bytes(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/gpu_memory.json"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_memory: no CUDA device visible to torch here; nothing to measure")
        return 0
    from sidecar.render.devices import free_cuda_cache, resolve_device
    from sidecar.render.flux import FluxRenderer
    from sidecar.render.memory import Placement, plan_pipeline
    from sidecar.render.quantize import INT8, quantize_backbone, stored_bytes

    device = resolve_device(device=None, gpu=0)
    results: dict = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "size_px": SIZE_PX,
        "steps": STEPS,
        "modes": {},
        "eight_bit": {},
    }
    failures = 0
    names = tuple(FluxRenderer.text_encoder_keys.values())

    def placed(pipe, mode: str):
        renderer = FluxRenderer(pipe, base_model="wide-flux")
        renderer.placement = Placement.place(pipe, mode, device, encoder_names=names)
        return renderer

    warm = placed(build_wide_flux(), "none")
    render_once(warm, device)  # CUDA, cuBLAS and the kernels warmed once for fair timings
    warm.placement.park(warm.pipe)
    del warm
    free_cuda_cache(device)
    print(f"{'mode':11} {'seconds':>8} {'peak MiB':>9} {'plan MiB':>9} {'ratio':>6}")
    for mode in ("none", "model", "group", "sequential"):
        pipe = build_wide_flux()
        plan = plan_pipeline(pipe, pixels=SIZE_PX * SIZE_PX)
        estimate = plan.estimate(mode)
        try:
            renderer = placed(pipe, mode)
            seconds, peak = render_once(renderer, device)
            ratio = peak / estimate.peak_bytes
            ok = abs(ratio - 1) <= PLAN_TOLERANCE
            failures += not ok
            results["modes"][mode] = {
                "seconds": round(seconds, 3),
                "peak_bytes": peak,
                "plan_peak_bytes": estimate.peak_bytes,
                "plan_phase": estimate.phase,
                "ratio": round(ratio, 3),
                "within_tolerance": ok,
            }
            print(f"{mode:11} {seconds:8.2f} {peak / MIB:9.0f} {estimate.peak_bytes / MIB:9.0f} {ratio:6.2f}")
            renderer.placement.park(pipe)
        except Exception as error:  # report every mode, fail at the end
            failures += 1
            results["modes"][mode] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{mode:11} FAILED: {type(error).__name__}: {error}")
        del pipe
        free_cuda_cache(device)

    for label in ("bf16", "int8", "fp8_layerwise"):
        pipe = build_wide_flux()
        if label == "int8":
            quantize_backbone(pipe.transformer, INT8)
        elif label == "fp8_layerwise":  # diffusers' fp8 storage: a reference point (no LoRA support)
            pipe.transformer.enable_layerwise_casting(
                storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16
            )
        try:
            renderer = placed(pipe, "none")
            render_once(renderer, device)  # this variant's kernels warmed
            seconds, peak = render_once(renderer, device)
            results["eight_bit"][label] = {
                "seconds": round(seconds, 3),
                "peak_bytes": peak,
                "backbone_bytes": stored_bytes(pipe.transformer),
            }
            print(
                f"{label:13} {seconds:8.2f} s  peak {peak / MIB:9.0f} MiB  "
                f"backbone {results['eight_bit'][label]['backbone_bytes'] / MIB:8.0f} MiB"
            )
            renderer.placement.park(pipe)
        except Exception as error:
            failures += 1
            results["eight_bit"][label] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{label:13} FAILED: {type(error).__name__}: {error}")
        del pipe
        free_cuda_cache(device)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
