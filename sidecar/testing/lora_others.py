"""PEFT / diffusers, ComfyUI-prefixed and EriDiffusion LoRA files.

- `peft`: written by diffusers' own `save_lora_weights` (what ai-toolkit, SimpleTuner's
  `lora_type: standard` and diffusers' training scripts save): `transformer.` / `unet.` names,
  `lora_A` / `lora_B`, alpha in the `lora_adapter_metadata` header.
- `comfyui`: OneTrainer's COMFY output (`modules/modelSaver/mixin/LoRASaverMixin.py`,
  `_save_comfy`): the original BFL names under `diffusion_model.`, `lora_A` / `lora_B`, `.alpha`.
- `eridiffusion`: EriDiffusion (github.com/CodeAlexx/EriDiffusion) as it writes them:
  Flux, `eridiffusion/src/trainers/pipeline_flux_lora.rs` (`setup_flux_lora`, `save_lora_weights`):
  one LoRA per module *kind* with no block index (`img_attn`, `img_mlp.lin1`, `img_attn.proj`…),
  `lora_down` / `lora_up`, no alpha; SDXL, `eridiffusion/src/trainers/pipeline_sdxl_lora.rs`
  (adapters named after the checkpoint's weight tensors, `trainers/lora/collection.rs`
  `save_weights`): `<weight name>.lora_down.weight`, i.e. `….to_q.weight.lora_down.weight`,
  rank and alpha only as header strings. Its SD 3.5 pipeline saves nothing
  (`pipeline_sd35_lora.rs`, `save_lora_weights` is a TODO).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sidecar.testing.lora_layouts import Layout, sgm_layout
from sidecar.testing.lora_plan import Factors, Target, WrittenLora, fused_shape, lora_tensors, save

PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def write_peft(
    path: Path,
    arch: str,
    layers: dict[str, list[str]],
    shapes: dict[str, dict[str, tuple[int, ...]]],
    *,
    rank: int,
    alpha: float,
    factors: Factors,
) -> WrittenLora:
    """diffusers' own writer, so the file is exactly what diffusers-based trainers save."""
    import diffusers

    kwargs: dict[str, object] = {}
    modules: dict[str, tuple[Target, ...]] = {}
    for component, names in layers.items():
        tensors = {}
        for name in names:
            down, up = factors.lora(shapes[component][name], rank)
            tensors.update(lora_tensors(name, down, up, alpha=None, style="peft"))
            modules[f"{component}.{name}"] = (Target(component, name),)
        kwargs[f"{component}_lora_layers"] = tensors
        kwargs[f"{component}_lora_adapter_metadata"] = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted(names),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    getattr(diffusers, PIPELINES[arch]).save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    return WrittenLora(path, modules)


def write_comfyui(
    path: Path,
    layout: Layout,
    shapes: dict[str, tuple[int, ...]],
    *,
    rank: int,
    alpha: float,
    factors: Factors,
) -> WrittenLora:
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, tuple[Target, ...]] = {}
    for original, layers in layout:
        key = f"diffusion_model.{original}"
        down, up = factors.lora(fused_shape(shapes, layers), rank)
        tensors.update(lora_tensors(key, down, up, alpha=alpha, style="peft"))
        modules[key] = tuple(Target("transformer", layer) for layer in layers)
    return WrittenLora(save(tensors, path), modules)


# EriDiffusion's Flux module kinds and their (in, out) widths at hidden 3072, as setup_flux_lora has them.
ERI_FLUX_KINDS = {
    "img_attn": (1, 3),
    "txt_attn": (1, 3),
    "img_mlp.lin1": (1, 4),
    "img_mlp.lin2": (4, 1),
    "img_attn.proj": (1, 1),
    "txt_attn.proj": (1, 1),
}


def write_eridiffusion(
    path: Path, arch: str, shapes: dict[str, tuple[int, ...]], *, rank: int, alpha: float, factors: Factors
) -> WrittenLora:
    """EriDiffusion's files: they name no layer of the model, so no targets are recorded."""
    tensors: dict[str, torch.Tensor] = {}
    if arch == "flux":
        hidden = shapes["transformer_blocks.0.attn.to_q"][1]
        for kind, (into, out) in ERI_FLUX_KINDS.items():
            down, up = factors.lora((out * hidden, into * hidden), rank)
            tensors.update(lora_tensors(kind, down, up, alpha=None))
    elif arch == "sdxl":
        names = sorted(
            name for name in shapes if ".attn" in name and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))
        )
        for original, (layer,) in sgm_layout(shapes, names):
            down, up = factors.lora(shapes[layer], rank)
            tensors.update(lora_tensors(f"model.diffusion_model.{original}.weight", down, up, alpha=None))
    else:
        raise ValueError(f"EriDiffusion writes no LoRA file for {arch!r} (its SD 3.5 saver is a TODO)")
    return WrittenLora(save(tensors, path, {"format": "pt", "rank": str(rank), "alpha": str(alpha)}), {})
