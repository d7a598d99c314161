"""Which path a LoRA file takes onto the pipeline: diffusers' loader, a sidecar converter, or LyCORIS.

diffusers converts most layouts itself (PEFT, kohya SDXL in both namings, kohya and ComfyUI
Flux) and sidecar leaves those to it, loading from the path so the header's alpha is kept.
The layouts it misreads or ignores go through sidecar's own converters
(`convert_kohya.py`, `convert_onetrainer.py`) and load from the converted state dict; LyCORIS
modules go to the `lycoris-lora` library (`lycoris.py`). Files whose keys fit no layout at all
(EriDiffusion's) are refused here with what is wrong with them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sidecar.errors import LoraError
from sidecar.render.adapters.conversion import Layers
from sidecar.render.adapters.convert_kohya import convert_kohya_sd3, convert_kohya_text_encoders
from sidecar.render.adapters.convert_onetrainer import (
    convert_comfyui_flux,
    convert_onetrainer_legacy,
    convert_onetrainer_omi,
)
from sidecar.render.adapters.lora_files import LYCORIS_MARKERS

Converter = Callable[[dict[str, torch.Tensor], Layers], dict[str, torch.Tensor]]

OMI_PREFIXES = ("transformer.double_blocks.", "transformer.single_blocks.", "clip_l.", "t5.")
OMI_TOP = ("transformer.txt_in.", "transformer.img_in.", "transformer.final_layer.", "transformer.time_in.")
# EriDiffusion's Flux module kinds: one LoRA per kind, for no block in particular.
ERI_FLUX_KINDS = ("img_attn.", "txt_attn.", "img_mlp.", "txt_mlp.", "img_attn.proj.", "txt_attn.proj.")


@dataclass(frozen=True)
class Route:
    """`diffusers` (load the path), `converted` (run `converter`, load the dict) or `lycoris`."""

    kind: str
    layout: str
    converter: Converter | None = None


# Base models whose transformer has Flux.1's module layout, so Flux.1's converters apply.
FLUX1_LAYOUT = ("flux", "flux_kontext", "chroma")


def route_for(keys: list[str], *, arch: str) -> Route:
    """The path for a file with these keys onto a base model of `arch`."""
    refuse_unusable_layout(keys)
    if any(key.endswith(LYCORIS_MARKERS) or _lycoris_suffix(key) for key in keys):
        return Route("lycoris", "lycoris")
    if any(key.startswith("lora_transformer_") for key in keys):
        return Route("converted", "onetrainer_legacy", convert_onetrainer_legacy)
    if arch in FLUX1_LAYOUT and any(key.startswith(OMI_PREFIXES + OMI_TOP) for key in keys):
        return Route("converted", "onetrainer_omi", convert_onetrainer_omi)
    if arch in FLUX1_LAYOUT and any(key.startswith("diffusion_model.") for key in keys):
        return Route("converted", "comfyui", convert_comfyui_flux)
    if arch == "sd3" and any(
        key.startswith(("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_")) for key in keys
    ):
        return Route("converted", "kohya_sd3", convert_kohya_sd3)
    if arch in FLUX1_LAYOUT and any(key.startswith("lora_te3_") for key in keys):
        return Route("converted", "kohya_flux", None)  # diffusers' converter plus sidecar's for T5
    return Route("diffusers", "diffusers")


def _lycoris_suffix(key: str) -> bool:
    """LyCORIS factor names without a leading dot: `lokr_w1`, `hada_w2_b`, `lokr_t2`…"""
    suffix = key.rsplit(".", 1)[-1]
    return suffix.startswith(("lokr_", "hada_"))


def convert_kohya_flux(
    state_dict: dict[str, torch.Tensor], layers: Layers, pipeline_class
) -> dict[str, torch.Tensor]:
    """kohya Flux: diffusers converts the transformer and CLIP-L keys, sidecar the T5 ones it drops."""
    t5 = {key: value for key, value in state_dict.items() if key.startswith("lora_te3_")}
    rest = {key: value for key, value in state_dict.items() if not key.startswith("lora_te3_")}
    converted = pipeline_class.lora_state_dict(rest)
    converted = converted[0] if isinstance(converted, tuple) else converted
    return {**converted, **convert_kohya_text_encoders(t5, layers)}


def refuse_unusable_layout(keys: list[str]) -> None:
    """EriDiffusion's files: say exactly why their keys fit no layout.

    Its Flux trainer (`pipeline_flux_lora.rs`) saves one LoRA per module kind (`img_attn`,
    `img_mlp.lin1`…) with no block index, so nothing tells which of the 19 double blocks a
    matrix belongs to. Its SDXL trainer (`pipeline_sdxl_lora.rs`) names each LoRA after a
    weight *tensor* (`….to_q.weight.lora_down.weight`), with no alpha tensor.
    """
    module_keys = [key for key in keys if key.endswith((".lora_down.weight", ".lora_up.weight"))]
    if module_keys and all(key.startswith(ERI_FLUX_KINDS) for key in module_keys):
        kinds = sorted({key.rsplit(".lora_", 1)[0] for key in module_keys})
        raise LoraError(
            "its keys fit no valid LoRA layout: they name module kinds "
            f"({', '.join(f'`{kind}`' for kind in kinds)}) with no block index, so nothing tells which "
            "block of the model each matrix belongs to (EriDiffusion's Flux layout); "
            "re-save it with per-block names "
            "(kohya `lora_unet_double_blocks_N_…` or diffusers `transformer.…`)"
        )
    weight_named = [key for key in module_keys if ".weight.lora_" in key]
    if module_keys and len(weight_named) == len(module_keys):
        raise LoraError(
            "its keys fit no valid LoRA layout: each names a weight tensor, not a layer "
            f"(`{weight_named[0]}`: `.weight` before `.lora_down`), as EriDiffusion's SDXL trainer "
            "writes them, and there is no alpha tensor; re-save it with layer names "
            "(kohya `lora_unet_…` or diffusers `unet.…`)"
        )
