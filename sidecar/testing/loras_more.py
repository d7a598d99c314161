"""LoRA files for the newer architectures, in the layouts their trainers write.

- `peft`: diffusers / PEFT names (`transformer.<module>.lora_A.weight`, `unet.` on SD 1.5):
  SimpleTuner, OneTrainer's diffusers export, diffusers' training scripts;
- `aitoolkit`: ai-toolkit's files for its newer models, saved with a `diffusion_model.` prefix
  for ComfyUI (`convert_lora_weights_before_save` in `extensions_built_in/diffusion_models/*`):
  the module names of ai-toolkit's own model, which are diffusers' for Qwen-Image and
  Z-Image and BFL's original ones (`double_blocks.0.img_attn.qkv`) for Chroma and Flux.2;
- `kohya`: sd-scripts / musubi-tuner (`lora_unet_<module with underscores>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`), on the same module names as the trainer's model (musubi's
  Qwen-Image and Z-Image use diffusers' names, its Flux.2 and sd-scripts' Flux / Chroma BFL's);
  on SD 1.5, sd-scripts' own (and ai-toolkit's) layout, text encoder (`lora_te_`) included.

Each file covers the attention of every block the tiny model has (and, in BFL layouts, the
fused `qkv` and the single blocks' `linear2`), with random factors from `seed`: enough to
change every image, and to make one file of another architecture apply to nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from sidecar.testing.lora_plan import linear_shapes, random_factors

MoreLoraFormat = Literal["peft", "aitoolkit", "kohya"]
MORE_LORA_FORMATS: dict[str, tuple[str, ...]] = {
    "sd15": ("peft", "kohya"),
    "chroma": ("peft", "aitoolkit", "kohya"),
    "flux_kontext": ("peft", "kohya"),
    "flux2": ("peft", "aitoolkit", "kohya"),
    "flux2_klein": ("peft", "aitoolkit", "kohya"),
    "qwen_image": ("peft", "aitoolkit", "kohya"),
    "zimage": ("peft", "aitoolkit", "kohya"),
}
# Attention projections in diffusers' names, per architecture: what every format covers.
# (Flux.2's single blocks fuse their attention with the MLP: `to_qkv_mlp_proj`, `to_out`.)
ATTENTION = re.compile(
    r"\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|to_qkv_mlp_proj)$"
    r"|single_transformer_blocks\.\d+\.attn\.to_out$"
)
# ai-toolkit and kohya name these models' modules as BFL does (sd-scripts' Flux.1 layout for Kontext).
BFL_ARCHS = ("chroma", "flux_kontext", "flux2", "flux2_klein")
UNET_ARCHS = ("sd15",)


def _diffusers_targets(model_folder: Path, arch: str) -> dict[str, tuple[int, int]]:
    component = "unet" if arch in UNET_ARCHS else "transformer"
    shapes = linear_shapes(model_folder, component)
    return {name: shape for name, shape in shapes.items() if ATTENTION.search(name)}


def _bfl_targets(model_folder: Path, arch: str) -> dict[str, tuple[int, int]]:
    """BFL's module names with their shapes: the image attention's fused `qkv` and `proj` of each
    double block, and each single block's `linear2`."""
    shapes = linear_shapes(model_folder, "transformer")
    targets = {}
    for name, (out_features, in_features) in shapes.items():
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.(to_q|to_out\.0)", name)
        if match and match[2] == "to_q":
            targets[f"double_blocks.{match[1]}.img_attn.qkv"] = (3 * out_features, in_features)
        elif match:
            targets[f"double_blocks.{match[1]}.img_attn.proj"] = (out_features, in_features)
        single = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(proj_out|attn\.to_out)", name)
        if single:
            targets[f"single_blocks.{single[1]}.linear2"] = (out_features, in_features)
    return targets


def _text_encoder_targets(model_folder: Path) -> dict[str, tuple[int, int]]:
    """CLIP's attention, named as in transformers' `CLIPTextModel` (`text_model.encoder.…`), which
    kohya's `lora_te_text_model_…` keys follow (newer transformers save the names without it)."""
    shapes = linear_shapes(model_folder, "text_encoder")
    return {
        name if name.startswith("text_model.") else f"text_model.{name}": shape
        for name, shape in shapes.items()
        if re.search(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$", name)
    }


def write_more_lora(
    model_folder: str | Path,
    arch: str,
    path: str | Path,
    *,
    lora_format: MoreLoraFormat = "peft",
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    scale: float = 0.5,
    text_encoder: bool = False,
) -> Path:
    """Write a LoRA for the tiny model in `model_folder` in `lora_format`; returns `path`.

    `alpha` (kohya's `.alpha` tensors; None: = rank) applies to the kohya layout; `text_encoder`
    adds the CLIP text encoder's attention (SD 1.5, `kohya`).
    """
    if lora_format not in MORE_LORA_FORMATS.get(arch, ()):
        known = ", ".join(MORE_LORA_FORMATS.get(arch, ()))
        raise ValueError(f"`lora_format` for {arch} must be one of {known}, got {lora_format!r}")
    model_folder, path = Path(model_folder), Path(path)
    generator = torch.Generator().manual_seed(seed)
    bfl = arch in BFL_ARCHS and lora_format in ("aitoolkit", "kohya")
    targets = _bfl_targets(model_folder, arch) if bfl else _diffusers_targets(model_folder, arch)
    modules = {
        name: random_factors(shape, rank=rank, generator=generator, scale=scale)
        for name, shape in targets.items()
    }
    if text_encoder and (arch, lora_format) != ("sd15", "kohya"):
        raise ValueError(f"`text_encoder` is written for SD 1.5 kohya files only, got {arch} {lora_format}")
    encoder = {}
    if text_encoder:
        encoder = {
            name: random_factors(shape, rank=rank, generator=generator, scale=scale)
            for name, shape in _text_encoder_targets(model_folder).items()
        }
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt"}
    if lora_format == "kohya":
        unet_prefix = "lora_unet"
        for prefix, group in ((unet_prefix, modules), ("lora_te", encoder)):
            for name, (down, up) in group.items():
                key = f"{prefix}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    else:
        prefix = {"peft": "unet" if arch in UNET_ARCHS else "transformer", "aitoolkit": "diffusion_model"}
        for group_prefix, group in ((prefix[lora_format], modules), ("text_encoder", encoder)):
            for name, (down, up) in group.items():
                tensors[f"{group_prefix}.{name}.lora_A.weight"] = down
                tensors[f"{group_prefix}.{name}.lora_B.weight"] = up
        if lora_format == "aitoolkit":
            metadata["training_info"] = json.dumps({"step": 0})
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata)
    return path
