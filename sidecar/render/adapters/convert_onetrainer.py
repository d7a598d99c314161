"""OneTrainer's two older LoRA layouts and ComfyUI's Flux names, which diffusers misreads or does not read.

- legacy (`convert_to_mixture` in OneTrainer's `modules/util/convert_lora_util.py`): the
  diffusers layer path flattened under `lora_transformer_` (text encoders `lora_te1_`,
  `lora_te2_`, `lora_te3_`), every trained layer. diffusers' converter for it maps only the
  attention keys and folds feed-forward, norm and MLP keys onto the block.
- OMI (OneTrainer's `modules/util/convert/lora/convert_flux_lora.py` before it moved back from
  the OMI library): Flux's original BFL names under `transformer.`, each part of a fused layer
  its own LoRA with a part number (`double_blocks.0.img_attn.qkv.0` = q), text encoders under
  `clip_l.` and `t5.`. diffusers has no converter for it.
- ComfyUI (OneTrainer's COMFY output, `_save_comfy`): the same BFL names, fused layers whole,
  under `diffusion_model.`, text encoders under `text_encoders.clip_l.transformer.` and
  `text_encoders.t5xxl.transformer.`; `lora_A` / `lora_B` with `.alpha`, which diffusers'
  kohya-based conversion does not read.
"""

from __future__ import annotations

import re

import torch

from sidecar.render.adapters.conversion import (
    Layers,
    LoraModule,
    convert_each,
    peft_pair,
    prefixed_pair,
    split_fused,
)

LEGACY_PREFIXES = {
    "lora_transformer_": "transformer",
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
}

# OMI / BFL name inside a Flux block -> diffusers layers, in row (part number) order.
OMI_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_attn.proj": ["attn.to_add_out"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "txt_mod.lin": ["norm1_context.linear"],
}
OMI_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
OMI_TOP = {
    "txt_in": ["context_embedder"],
    "img_in.proj": ["x_embedder"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],  # (shift, scale) in BFL: swapped
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
}
OMI_BLOCKS = {
    "double_blocks": ("transformer_blocks", OMI_DOUBLE),
    "single_blocks": ("single_transformer_blocks", OMI_SINGLE),
}
OMI_TEXT_PREFIXES = {"clip_l.": "text_encoder", "t5.": "text_encoder_2"}
COMFY_PREFIXES = {
    "diffusion_model.": "transformer.",
    "text_encoders.clip_l.transformer.": "clip_l.",
    "text_encoders.t5xxl.transformer.": "t5.",
}
OMI_KEY = re.compile(r"transformer\.(double_blocks|single_blocks)\.(\d+)\.(.+?)(?:\.(\d+))?")


def convert_onetrainer_legacy(state_dict: dict[str, torch.Tensor], layers: Layers) -> dict[str, torch.Tensor]:
    """`lora_transformer_<flat diffusers path>` (and `lora_te<N>_`) as diffusers PEFT keys."""
    return convert_each(
        state_dict,
        lambda module: prefixed_pair(module, LEGACY_PREFIXES, layers),
        what="OneTrainer legacy LoRA",
    )


def convert_onetrainer_omi(state_dict: dict[str, torch.Tensor], layers: Layers) -> dict[str, torch.Tensor]:
    """OneTrainer's OMI-layout Flux LoRA as diffusers PEFT keys."""

    def convert_one(module: LoraModule) -> dict[str, torch.Tensor] | None:
        if module.key.startswith(tuple(OMI_TEXT_PREFIXES)):
            return _omi_text_pair(module, layers)
        return _omi_transformer_pair(module, layers) if module.key.startswith("transformer.") else None

    return convert_each(state_dict, convert_one, what="OneTrainer OMI LoRA")


def _omi_transformer_pair(module: LoraModule, layers: Layers) -> dict[str, torch.Tensor] | None:
    match = OMI_KEY.fullmatch(module.key)
    if match:
        diffusers_blocks, table = OMI_BLOCKS[match[1]]
        parts = table.get(match[3])
        if parts is None and match[4] is not None:  # a name ending in a digit, not a part number
            parts = table.get(f"{match[3]}.{match[4]}")
        elif parts is not None and match[4] is not None:
            index = int(match[4])
            parts = parts[index : index + 1] if index < len(parts) else None
        names = [f"{diffusers_blocks}.{match[2]}.{part}" for part in parts or ["?"]]
        swap = False
    else:
        original = module.key.removeprefix("transformer.")
        names = OMI_TOP.get(original, ["?"])
        swap = original == "final_layer.adaLN_modulation.1"
    if not all(name in layers["transformer"] for name in names):
        return None
    return split_fused(module, "transformer", names, layers, swap_halves=swap)


def _omi_text_pair(module: LoraModule, layers: Layers) -> dict[str, torch.Tensor] | None:
    for prefix, component in OMI_TEXT_PREFIXES.items():
        if module.key.startswith(prefix):
            path = module.key.removeprefix(prefix)
            known = layers.get(component, {})
            layer = path if path in known else path.removeprefix("text_model.")
            return peft_pair(component, layer, *module.folded()) if layer in known else None
    return None


def convert_comfyui_flux(state_dict: dict[str, torch.Tensor], layers: Layers) -> dict[str, torch.Tensor]:
    """ComfyUI-prefixed Flux LoRA: the OMI names with ComfyUI's prefixes and fused layers whole."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix, omi in COMFY_PREFIXES.items():
            if key.startswith(prefix):
                key = omi + key.removeprefix(prefix)
                break
        renamed[key] = value
    return convert_onetrainer_omi(renamed, layers)
