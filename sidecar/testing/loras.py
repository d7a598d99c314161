"""LoRA files for the tiny models, in the key layouts real trainers write.

- `peft`: diffusers / PEFT names through the pipeline's `save_lora_weights`
  (ai-toolkit, SimpleTuner, diffusers' training scripts), alpha in the header metadata;
- `kohya`: sd-scripts names (`lora_unet_…`, `lora_te1_…`, `.alpha`): on SDXL with
  diffusers-style block names, on SD 3.5 with SAI's MMDiT names (fused `attn_qkv`), on Flux
  with the original BFL block names;
- `kohya_sgm`: SDXL kohya names in the original SGM layout (`input_blocks_4_1_…`),
  what sd-scripts writes for SDXL;
- `unprefixed`: PEFT names without the `unet.` / `transformer.` prefix, which
  diffusers silently ignores (a LoRA that does not apply, for tests).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sidecar.arch import Arch
from sidecar.testing import lora_layouts as layouts
from sidecar.testing.lora_layouts import sd3_original_layout
from sidecar.testing.lora_plan import fused_shape, linear_shapes, module_shapes, random_factors

LoraFormat = Literal["peft", "kohya", "kohya_sgm", "unprefixed"]

LORA_FORMATS: dict[str, tuple[LoraFormat, ...]] = {
    "sdxl": ("peft", "kohya", "kohya_sgm", "unprefixed"),
    "sd3": ("peft", "kohya", "unprefixed"),
    "flux": ("peft", "kohya", "unprefixed"),
}


# Which linear layers a LoRA targets, per model component (regex on the module name).
LORA_TARGETS: dict[str, dict[str, str]] = {
    "sdxl": {
        "unet": r"attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
        "text_encoder": r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
        "text_encoder_2": r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
    },
    "sd3": {
        "transformer": r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)$",
    },
    "flux": {
        "transformer": r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)$",
    },
}


def lora_pairs(
    model_folder: str | Path,
    arch: Arch,
    *,
    rank: int,
    seed: int,
    scale: float,
    components: Iterable[str] | None = None,
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Random LoRA matrices `{component: {module: (down [r, in], up [out, r])}}`.

    `up` is not zero (a trained LoRA, unlike a fresh one), so the LoRA visibly changes
    the image; `scale` multiplies it, which lets the demo write LoRAs that evolve.
    """
    targets = LORA_TARGETS[arch]
    generator = torch.Generator().manual_seed(seed)
    pairs: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for component in components or targets:
        pattern = re.compile(targets[component])
        modules = {}
        for name, shape in sorted(linear_shapes(model_folder, component).items()):
            if pattern.search(name):
                modules[name] = random_factors(shape, rank=rank, generator=generator, scale=scale)
        pairs[component] = modules
    return pairs


def write_lora(
    model_folder: str | Path,
    arch: Arch,
    path: str | Path,
    *,
    lora_format: LoraFormat = "peft",
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 1,
    scale: float = 1.0,
    text_encoder: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a LoRA for the tiny model in `model_folder`, in a trainer's key format.

    `alpha` defaults to `rank` (scale 1). `text_encoder=True` adds CLIP-L layers (SDXL).
    `metadata` goes into the safetensors header, as trainers store their step there.
    """
    if lora_format not in LORA_FORMATS[arch]:
        raise ValueError(f"`lora_format` for {arch} must be one of {LORA_FORMATS[arch]}, got {lora_format!r}")
    alpha = float(rank if alpha is None else alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    components = [c for c in LORA_TARGETS[arch] if text_encoder or not c.startswith("text_encoder")]
    if arch == "flux" and lora_format == "kohya":
        tensors = _kohya_flux_tensors(model_folder, rank=rank, alpha=alpha, seed=seed, scale=scale)
        return _save(tensors, path, metadata)
    if arch == "sd3" and lora_format == "kohya":
        tensors = _kohya_sd3_tensors(model_folder, rank=rank, alpha=alpha, seed=seed, scale=scale)
        return _save(tensors, path, metadata)
    pairs = lora_pairs(model_folder, arch, rank=rank, seed=seed, scale=scale, components=components)
    if lora_format == "peft":
        return _save_peft(arch, pairs, path, rank=rank, alpha=alpha, metadata=metadata)
    if lora_format == "unprefixed":
        tensors = {}
        for modules in pairs.values():
            for name, (down, up) in modules.items():
                tensors[f"{name}.lora_A.weight"] = down
                tensors[f"{name}.lora_B.weight"] = up
        return _save(tensors, path, metadata)
    tensors = {}
    for component, modules in pairs.items():
        prefix = KOHYA_PREFIXES[component]
        for name, (down, up) in modules.items():
            if component == "unet" and lora_format == "kohya_sgm":
                name = sgm_unet_name(name, _unet_config(model_folder))
            key = f"{prefix}_{name.replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return _save(tensors, path, metadata)


KOHYA_PREFIXES = {
    "unet": "lora_unet",
    "transformer": "lora_unet",
    "text_encoder": "lora_te1",
    "text_encoder_2": "lora_te2",
}


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {})
    return path


def _save_peft(arch: Arch, pairs, path: Path, *, rank: int, alpha: float, metadata) -> Path:
    """diffusers' own writer, so the file is exactly what diffusers-based trainers save."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    pipeline_class = {
        "sdxl": StableDiffusionXLPipeline,
        "sd3": StableDiffusion3Pipeline,
        "flux": FluxPipeline,
    }[arch]
    kwargs = {}
    for component, modules in pairs.items():
        layers = {}
        for name, (down, up) in modules.items():
            layers[f"{name}.lora_A.weight"] = down.contiguous()
            layers[f"{name}.lora_B.weight"] = up.contiguous()
        kwargs[f"{component}_lora_layers"] = layers
        kwargs[f"{component}_lora_adapter_metadata"] = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted(modules),  # full names: no layer outside the file is wrapped
        }
    pipeline_class.save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    if metadata:
        _add_metadata(path, metadata)
    return path


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        existing = dict(handle.metadata() or {})
    save_file(load_file(str(path)), str(path), metadata={**existing, **metadata})


def _unet_config(model_folder: str | Path) -> dict:
    return json.loads((Path(model_folder) / "unet" / "config.json").read_text())


def sgm_unet_name(name: str, unet_config: dict) -> str:
    """A diffusers UNet attention layer in the original SGM layout that kohya writes for SDXL
    (`down_blocks.1.attentions.0.…` -> `input_blocks.4.1.…`), see `lora_layouts.sgm_unet_name`."""
    if ".attentions." not in name:
        raise ValueError(f"no SGM name for UNet module {name!r}")
    return layouts.sgm_unet_name(
        name, layers_per_block=unet_config["layers_per_block"], attention_up_blocks=set()
    )


def _kohya_sd3_tensors(model_folder, *, rank: int, alpha: float, seed: int, scale: float):
    """sd-scripts' SD 3.5 LoRA on the attention: `joint_blocks_N_x_block_attn_qkv` (fused) and `_proj`."""
    shapes = module_shapes(model_folder, "transformer")
    attention = ("x_block.attn.qkv", "x_block.attn.proj")
    fused = {
        original.replace(".", "_"): fused_shape(shapes, layers)
        for original, layers in sd3_original_layout(shapes)
        if original.endswith(attention)
    }
    return _kohya_tensors(fused, rank=rank, alpha=alpha, seed=seed, scale=scale)


def _kohya_flux_tensors(model_folder, *, rank: int, alpha: float, seed: int, scale: float):
    """sd-scripts' Flux LoRA: BFL module names, fused qkv in the double and single blocks."""
    config = json.loads((Path(model_folder) / "transformer" / "config.json").read_text())
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * hidden  # Flux's mlp_ratio
    shapes: dict[str, tuple[int, int]] = {}
    for block in range(config["num_layers"]):
        for stream in ("img", "txt"):
            shapes[f"double_blocks_{block}_{stream}_attn_qkv"] = (3 * hidden, hidden)
            shapes[f"double_blocks_{block}_{stream}_attn_proj"] = (hidden, hidden)
    for block in range(config["num_single_layers"]):
        # diffusers splits `linear1` (fused qkv + mlp) with Flux-dev's real widths hard-coded,
        # so tiny models can carry only `linear2` of the single blocks.
        shapes[f"single_blocks_{block}_linear2"] = (hidden, hidden + mlp)
    return _kohya_tensors(shapes, rank=rank, alpha=alpha, seed=seed, scale=scale)


def _kohya_tensors(shapes, *, rank: int, alpha: float, seed: int, scale: float) -> dict[str, torch.Tensor]:
    """Random `lora_unet_<name>` modules for `{flat name: (out, in)}`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        key = f"lora_unet_{name}"
        down, up = random_factors(shape, rank=rank, generator=generator, scale=scale)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors
