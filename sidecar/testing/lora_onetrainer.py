"""OneTrainer's LoRA files, in each layout it has written over time (github.com/Nerogar/OneTrainer).

- `legacy`: `modules/util/convert_lora_util.py` (`convert_to_mixture`): the diffusers component
  renamed kohya-style (`transformer` -> `lora_transformer`, `unet` -> `lora_unet`, `text_encoder`
  -> `lora_te1`, `text_encoder_2` -> `lora_te2`…) and the module path flattened, q, k and v kept
  apart, every trained layer (attention, MLP, modulation); `lora_down` / `lora_up` / `.alpha`.
- `omi`: the layout of `modules/util/convert/lora/convert_flux_lora.py` (before commit 8fd97dcc
  moved it back from the OMI library): BFL names under `transformer.`, each part of a fused layer
  its own LoRA, numbered (`double_blocks.0.img_attn.qkv.0` = q, `.1` = k, `.2` = v; `linear1.3`
  = the MLP in); text encoders under `clip_l.` and `t5.`.
- `diffusers` (the newer default, `convert_to_diffusers`): diffusers names and `lora_A` /
  `lora_B`, alpha folded into `lora_B` and no `.alpha` key, so diffusers' scale of 1 is right.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sidecar.testing.lora_layouts import Layout
from sidecar.testing.lora_plan import Factors, Target, WrittenLora, fused_shape, lora_tensors, save

LEGACY_PREFIXES = {
    "unet": "lora_unet",
    "transformer": "lora_transformer",
    "text_encoder": "lora_te1",
    "text_encoder_2": "lora_te2",
    "text_encoder_3": "lora_te3",
}
OMI_PREFIXES = {"transformer": "transformer", "text_encoder": "clip_l", "text_encoder_2": "t5"}


def write_onetrainer(
    path: Path,
    layers: dict[str, list[str]],
    shapes: dict[str, dict[str, tuple[int, ...]]],
    *,
    layout: str,
    rank: int,
    alpha: float,
    factors: Factors,
    omi_layout: Layout | None = None,
) -> WrittenLora:
    """`layers` per component in diffusers names; the `omi` layout takes the BFL `omi_layout`."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, tuple[Target, ...]] = {}
    for component, names in layers.items():
        if layout == "omi" and component == "transformer":
            entries = [
                (f"{original}.{part}" if len(parts) > 1 else original, [layer])
                for original, parts in omi_layout or []
                for part, layer in enumerate(parts)
            ]
        else:
            entries = [(name, [name]) for name in names]
        for native, targets in entries:
            down, up = factors.lora(fused_shape(shapes[component], targets), rank)
            if layout == "legacy":
                key = f"{LEGACY_PREFIXES[component]}_{native.replace('.', '_')}"
                tensors.update(lora_tensors(key, down, up, alpha=alpha))
            elif layout == "omi":
                key = f"{OMI_PREFIXES[component]}.{_omi_text_name(native)}"
                tensors.update(lora_tensors(key, down, up, alpha=alpha))
            elif layout == "diffusers":
                key = f"{component}.{native}"
                tensors.update(lora_tensors(key, down, up * (alpha / rank), alpha=None, style="peft"))
            else:
                raise ValueError(f"`layout` must be one of 'legacy', 'omi', 'diffusers', got {layout!r}")
            modules[key] = tuple(Target(component, target) for target in targets)
    return WrittenLora(save(tensors, path), modules)


def _omi_text_name(name: str) -> str:
    """OMI keeps transformers' own paths; CLIP's under `text_model.` as transformers 4 had them."""
    return f"text_model.{name}" if name.startswith("encoder.layers.") else name
