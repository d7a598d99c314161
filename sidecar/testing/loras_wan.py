"""Wan LoRA files as the trainers write them, with random weights, for the tiny Wan models.

- `peft`: diffusers' names (`transformer.blocks.0.attn1.to_q.lora_A.weight`): SimpleTuner and
  diffusers' scripts;
- `aitoolkit`: Wan's original names under `diffusion_model.` with `lora_A` / `lora_B`
  (ai-toolkit `toolkit/models/wan21/wan_lora_convert.py`, `convert_to_original`), also what
  ComfyUI loads;
- `musubi`: kohya names (`lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.alpha`), as
  musubi-tuner's `networks/lora_wan.py` saves them.

For Wan 2.2, `write_wan22_loras` lays them out as each trainer does (`sidecar.render.wan_experts`
says who writes which): ai-toolkit's `_high_noise` / `_low_noise` pair, its combined file with
`transformer_1.` / `transformer_2.` keys, or one file for both experts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

WanLoraFormat = Literal["peft", "aitoolkit", "musubi"]
Layout = Literal["split", "combined", "one"]
WAN_LORA_FORMATS: tuple[str, ...] = ("peft", "aitoolkit", "musubi")
# (original name, diffusers name) of each layer a trainer's Wan LoRA targets in a block.
ATTENTION = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
FFN = (("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"))
EXPERT_SEGMENTS = {"high": "transformer_1", "low": "transformer_2"}  # ai-toolkit's combined keys


def _layers(model_dir: Path) -> list[tuple[str, str, int, int]]:
    """(original name, diffusers name, in, out) of every targeted Linear, from the transformer's config."""
    config = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
    width = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = config["ffn_dim"]
    layers = []
    for block in range(config["num_layers"]):
        for kind, diffusers_kind in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            for original, name in ATTENTION:
                layers.append(
                    (
                        f"blocks.{block}.{kind}.{original}",
                        f"blocks.{block}.{diffusers_kind}.{name}",
                        width,
                        width,
                    )
                )
        layers.append((f"blocks.{block}.ffn.0", f"blocks.{block}.ffn.net.0.proj", width, ffn))
        layers.append((f"blocks.{block}.ffn.2", f"blocks.{block}.ffn.net.2", ffn, width))
    return layers


def wan_lora_tensors(
    model_dir: Path,
    *,
    lora_format: WanLoraFormat = "aitoolkit",
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    scale: float = 0.2,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """One Wan LoRA's tensors in `lora_format`; `prefix` goes after `diffusion_model.` (ai-toolkit's
    combined files put `transformer_1.` there)."""
    if lora_format not in WAN_LORA_FORMATS:
        raise ValueError(f"`lora_format` must be one of {', '.join(WAN_LORA_FORMATS)}, got {lora_format!r}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for original, name, fan_in, fan_out in _layers(model_dir):
        down = torch.randn(rank, fan_in, generator=generator) * scale
        up = torch.randn(fan_out, rank, generator=generator) * scale
        if lora_format == "peft":
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
        elif lora_format == "aitoolkit":
            tensors[f"diffusion_model.{prefix}{original}.lora_A.weight"] = down
            tensors[f"diffusion_model.{prefix}{original}.lora_B.weight"] = up
        else:
            key = "lora_unet_" + original.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    return tensors


def write_wan_lora(
    model_dir: Path, path: Path, *, lora_format: WanLoraFormat = "aitoolkit", **options
) -> Path:
    """Write one Wan LoRA file (options: those of `wan_lora_tensors`); returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(wan_lora_tensors(model_dir, lora_format=lora_format, **options), str(path))
    return path


def write_wan22_loras(
    model_dir: Path,
    folder: Path,
    stem: str,
    *,
    layout: Layout = "split",
    experts: Sequence[str] = ("high", "low"),
    seed: int = 0,
    lora_format: WanLoraFormat = "aitoolkit",
) -> list[Path]:
    """A Wan 2.2 checkpoint's LoRA file(s) named from `stem` (`my_lora_000000500`), as trainers lay
    them out: `split` (ai-toolkit's default: one file per trained expert, `_high_noise` /
    `_low_noise`), `combined` (ai-toolkit, `split_multistage_loras: false`), `one` (one file for both
    experts, musubi; `lora_format` applies). Each expert's weights come from its own seed."""
    folder = Path(folder)
    seeds = {"high": seed, "low": seed + 1}
    if layout == "split":
        return [
            write_wan_lora(model_dir, folder / f"{stem}_{expert}_noise.safetensors", seed=seeds[expert])
            for expert in experts
        ]
    if layout == "combined":
        tensors: dict[str, torch.Tensor] = {}
        for expert in experts:
            tensors.update(
                wan_lora_tensors(model_dir, seed=seeds[expert], prefix=f"{EXPERT_SEGMENTS[expert]}.")
            )
        path = folder / f"{stem}.safetensors"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
        return [path]
    return [write_wan_lora(model_dir, folder / f"{stem}.safetensors", lora_format=lora_format, seed=seed)]
