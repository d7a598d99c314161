"""The layers each trainer's layout names, as lists of `(native name, diffusers layers)`.

Written from the original model code's module names, in the direction a trainer writes
(diffusers layer -> original name), independently of the converters in `sidecar.render`:

- Flux: Black Forest Labs' `flux/model.py` blocks (`DoubleStreamBlock`: `img_attn.qkv`,
  `img_mlp.0`, `img_mod.lin`...; `SingleStreamBlock`: `linear1` = q, k, v and the MLP in,
  `linear2`, `modulation.lin`), as OneTrainer's `modules/model/FluxModel.py`
  (`diffusers_to_original`) and diffusers' `convert_flux_transformer_checkpoint_to_diffusers` map them;
- SD 3.5: SAI's MMDiT (`joint_blocks.N.x_block` / `context_block`: `attn.qkv`, `attn.proj`,
  `mlp.fc1`, `mlp.fc2`, `adaLN_modulation.1`, `attn2.*` in MMDiT-X blocks), as kohya's
  `library/sd3_models.py` names them; the last block's context modulation stores (shift, scale)
  where diffusers has (scale, shift);
- SDXL: the SGM UNet (`input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`; resnets
  `in_layers.2`, `out_layers.3`, `emb_layers.1`, `skip_connection`; `op` and `conv` samplers),
  kohya's `library/sdxl_original_unet.py`.
"""

from __future__ import annotations

import re

Layout = list[tuple[str, list[str]]]  # (name in the trainer's layout, diffusers layers its rows cover)

FLUX_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn.proj": ["attn.to_out.0"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn.proj": ["attn.to_add_out"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "txt_mod.lin": ["norm1_context.linear"],
}
FLUX_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
SD3_JOINT = {
    "x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "x_block.attn.proj": ["attn.to_out.0"],
    "x_block.mlp.fc1": ["ff.net.0.proj"],
    "x_block.mlp.fc2": ["ff.net.2"],
    "x_block.adaLN_modulation.1": ["norm1.linear"],
    "x_block.attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"],
    "x_block.attn2.proj": ["attn2.to_out.0"],
    "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "context_block.attn.proj": ["attn.to_add_out"],
    "context_block.mlp.fc1": ["ff_context.net.0.proj"],
    "context_block.mlp.fc2": ["ff_context.net.2"],
    "context_block.adaLN_modulation.1": ["norm1_context.linear"],
}
SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
SGM_RESNET["conv_shortcut"] = "skip_connection"


def block_count(shapes: dict, prefix: str) -> int:
    """How many `prefix.N.` blocks the layer names hold."""
    numbers = {
        int(match[1]) for name in shapes if (match := re.match(rf"{re.escape(prefix)}\.(\d+)\.", name))
    }
    return max(numbers) + 1 if numbers else 0


def fused_layout(shapes: dict, blocks: dict[str, tuple[str, dict[str, list[str]]]]) -> Layout:
    """`(original name, layers)` for every block entry whose diffusers layers all exist."""
    layout: Layout = []
    for diffusers_prefix, (original_prefix, table) in blocks.items():
        for index in range(block_count(shapes, diffusers_prefix)):
            for original, layers in table.items():
                names = [f"{diffusers_prefix}.{index}.{layer}" for layer in layers]
                if all(name in shapes for name in names):
                    layout.append((f"{original_prefix}.{index}.{original}", names))
    return layout


def flux_bfl_layout(shapes: dict) -> Layout:
    """Flux's double and single blocks in BFL names, fused qkv and linear1 included."""
    return fused_layout(
        shapes,
        {
            "transformer_blocks": ("double_blocks", FLUX_DOUBLE),
            "single_transformer_blocks": ("single_blocks", FLUX_SINGLE),
        },
    )


def sd3_original_layout(shapes: dict) -> Layout:
    """SD 3.5's joint blocks in SAI names (`joint_blocks.N.x_block.attn.qkv`...)."""
    return fused_layout(shapes, {"transformer_blocks": ("joint_blocks", SD3_JOINT)})


def sd3_swapped(original: str, shapes: dict) -> bool:
    """The last (context-pre-only) block's context modulation is (shift, scale) in SAI's layout."""
    last = block_count(shapes, "transformer_blocks") - 1
    return original == f"joint_blocks.{last}.context_block.adaLN_modulation.1"


def sgm_unet_name(name: str, *, layers_per_block: int, attention_up_blocks: set[int]) -> str:
    """A diffusers SDXL UNet layer's name in the SGM layout (`input_blocks.4.1.…`).

    Each down level takes `layers_per_block` slots plus one for its downsampler; each up
    level `layers_per_block + 1` slots, its upsampler sitting after the attention (slot 2)
    where the level has attentions, else after the resnet (slot 1).
    """
    per_level = layers_per_block + 1
    match = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if match:
        level, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        slot = 0 if kind == "resnets" else 1
        return f"input_blocks.{1 + level * per_level + layer}.{slot}.{_leaf(kind, rest)}"
    match = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name)
    if match:
        return f"input_blocks.{(int(match[1]) + 1) * per_level}.0.op"
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if match:
        kind, layer, rest = match[1], int(match[2]), match[3]
        slot = 1 if kind == "attentions" else 2 * layer
        return f"middle_block.{slot}.{_leaf(kind, rest)}"
    match = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if match:
        level, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        return (
            f"output_blocks.{level * per_level + layer}.{0 if kind == 'resnets' else 1}.{_leaf(kind, rest)}"
        )
    match = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name)
    if match:
        level = int(match[1])
        slot = 2 if level in attention_up_blocks else 1
        return f"output_blocks.{level * per_level + layers_per_block}.{slot}.conv"
    raise ValueError(f"no SGM name for UNet layer {name!r}")


def _leaf(kind: str, rest: str) -> str:
    return SGM_RESNET.get(rest, rest) if kind == "resnets" else rest


def sgm_layout(shapes: dict, names: list[str], *, layers_per_block: int = 2) -> Layout:
    """`names` (diffusers UNet layers) in SGM names."""
    attention_up = {
        int(match[1]) for name in shapes if (match := re.match(r"up_blocks\.(\d+)\.attentions", name))
    }
    return [
        (sgm_unet_name(name, layers_per_block=layers_per_block, attention_up_blocks=attention_up), [name])
        for name in names
    ]
