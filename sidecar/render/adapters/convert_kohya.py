"""kohya sd-scripts LoRAs that diffusers does not convert: SD 3.5, and Flux's T5 text encoder.

- SD 3.5: sd-scripts' `networks/lora_sd3.py` names the layers of SAI's MMDiT
  (`lora_unet_joint_blocks_0_x_block_attn_qkv`, fused q, k, v) and writes the text encoders as
  `lora_te1_` (CLIP-L), `lora_te2_` (CLIP-G), `lora_te3_` (T5). diffusers 0.42 has no
  converter for these and loads them as a silent no-op.
- Flux: diffusers' kohya converter drops `lora_te3_` (T5-XXL, sd-scripts' `train_t5xxl`)
  without a word; `convert_kohya_text_encoders` maps those keys, the rest stays diffusers'.

The maps below follow diffusers' own single-file conversion of SAI checkpoints
(`convert_sd3_transformer_checkpoint_to_diffusers`): the same layer names, the same row order,
and the last block's context modulation stored as (shift, scale) where diffusers has (scale, shift).
"""

from __future__ import annotations

import re

import torch

from sidecar.render.adapters.conversion import (
    Layers,
    LoraModule,
    convert_each,
    prefixed_pair,
    split_fused,
)

# Inside `joint_blocks.N.`: SAI's layer -> the diffusers layers its rows cover, in order.
SD3_JOINT_BLOCK = {
    "x_block_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "x_block_attn_proj": ["attn.to_out.0"],
    "x_block_mlp_fc1": ["ff.net.0.proj"],
    "x_block_mlp_fc2": ["ff.net.2"],
    "x_block_adaLN_modulation_1": ["norm1.linear"],
    "x_block_attn2_qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"],
    "x_block_attn2_proj": ["attn2.to_out.0"],
    "context_block_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "context_block_attn_proj": ["attn.to_add_out"],
    "context_block_mlp_fc1": ["ff_context.net.0.proj"],
    "context_block_mlp_fc2": ["ff_context.net.2"],
    "context_block_adaLN_modulation_1": ["norm1_context.linear"],
}
CONTEXT_MODULATION = "context_block_adaLN_modulation_1"  # swapped halves in the last block
# Outside the joint blocks (sd-scripts' `emb_dims`); the final modulation is swapped too.
SD3_TOP = {
    "context_embedder": "context_embedder",
    "x_embedder_proj": "pos_embed.proj",
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
SWAPPED_TOP = {"final_layer_adaLN_modulation_1"}
SD3_TEXT_PREFIXES = {
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
}
FLUX_T5_PREFIXES = {"lora_te3_": "text_encoder_2"}
JOINT_KEY = re.compile(r"lora_unet_joint_blocks_(\d+)_(\w+)")


def convert_kohya_sd3(state_dict: dict[str, torch.Tensor], layers: Layers) -> dict[str, torch.Tensor]:
    """sd-scripts' SD 3.5 LoRA as diffusers PEFT keys (alpha folded, fused qkv split)."""
    blocks = [name for name in layers["transformer"] if re.match(r"transformer_blocks\.\d+\.", name)]
    last = max((int(name.split(".")[1]) for name in blocks), default=0)

    def convert_one(module: LoraModule) -> dict[str, torch.Tensor] | None:
        if module.key.startswith(tuple(SD3_TEXT_PREFIXES)):
            return prefixed_pair(module, SD3_TEXT_PREFIXES, layers)
        return _sd3_denoiser_pair(module, layers, last)

    return convert_each(state_dict, convert_one, what="kohya SD 3.5 LoRA")


def _sd3_denoiser_pair(module: LoraModule, layers: Layers, last: int) -> dict[str, torch.Tensor] | None:
    match = JOINT_KEY.fullmatch(module.key)
    if match:
        block, name = int(match[1]), match[2]
        parts = [f"transformer_blocks.{block}.{part}" for part in SD3_JOINT_BLOCK.get(name, ["?"])]
        swap = name == CONTEXT_MODULATION and block == last
    else:
        name = module.key.removeprefix("lora_unet_")
        parts = [SD3_TOP.get(name, "?")]
        swap = name in SWAPPED_TOP
    if not all(part in layers["transformer"] for part in parts):
        return None
    return split_fused(module, "transformer", parts, layers, swap_halves=swap)


def convert_kohya_text_encoders(
    state_dict: dict[str, torch.Tensor], layers: Layers, prefixes: dict[str, str] = FLUX_T5_PREFIXES
) -> dict[str, torch.Tensor]:
    """kohya text-encoder keys (`lora_te3_encoder_block_0_layer_0_SelfAttention_q`) as PEFT keys."""
    return convert_each(
        state_dict, lambda module: prefixed_pair(module, prefixes, layers), what="kohya text-encoder LoRA"
    )
