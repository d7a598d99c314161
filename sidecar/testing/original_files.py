"""Single-file checkpoints in the original layouts, written from a saved diffusers model.

Users hold base models as the original authors published them: BFL's `flux1-dev.safetensors`,
SAI's `sd3.5_medium.safetensors`, `sd_xl_base_1.0.safetensors` in the SGM layout. These
writers invert diffusers' key mapping for the denoiser (the direction diffusers'
`single_file_utils` converts from), so a tiny or wide model can be loaded back through the same
`from_single_file` path a real file takes. The VAE and text encoders stay in the diffusers
folder: the files hold the denoiser only, as BFL's and most ComfyUI files do.

Name maps as OneTrainer writes them (`modules/model/FluxModel.py`, `StableDiffusion3Model.py`,
`StableDiffusionXLModel.py`, `diffusers_to_original`), checked by loading the files back.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from sidecar.testing.lora_layouts import FLUX_DOUBLE, FLUX_SINGLE, SD3_JOINT, block_count, sgm_unet_name
from sidecar.testing.lora_plan import save

FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
FLUX_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
FLUX_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SD3_NORMS = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
}
SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
SGM_RESNET_NORMS = {"norm1": "in_layers.0", "norm2": "out_layers.0"}
SWAPPED = ("final_layer.adaLN_modulation.1",)  # BFL and SAI store (shift, scale), diffusers (scale, shift)


def _denoiser(folder: Path, component: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted((folder / component).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def _fused(
    tensors: dict[str, torch.Tensor], table: dict[str, list[str]], prefix: str, original: str
) -> dict[str, torch.Tensor]:
    """Each `table` entry's layers under `prefix`, rows stacked, as `original.<entry>`."""
    out: dict[str, torch.Tensor] = {}
    for name, layers in table.items():
        for suffix in ("weight", "bias"):
            parts = [tensors.get(f"{prefix}.{layer}.{suffix}") for layer in layers]
            if all(part is not None for part in parts):
                out[f"{original}.{name}.{suffix}"] = torch.cat(parts)
                for layer in layers:
                    tensors.pop(f"{prefix}.{layer}.{suffix}")
    return out


def _renamed(
    tensors: dict[str, torch.Tensor], table: dict[str, str], prefix: str, original: str, leaf: str
) -> dict[str, torch.Tensor]:
    """`table`'s layers under `prefix` renamed; BFL's RMS norms call their weight `scale`."""
    out = {}
    for name, target in table.items():
        key = f"{prefix}{name}.{leaf}"
        if key in tensors:
            original_leaf = "scale" if target.endswith(("query_norm", "key_norm")) else leaf
            out[f"{original}{target}.{original_leaf}"] = tensors.pop(key)
    return out


def flux_original(folder: Path) -> dict[str, torch.Tensor]:
    """The Flux transformer in BFL names (`double_blocks.0.img_attn.qkv.weight`…)."""
    tensors = _denoiser(folder, "transformer")
    out: dict[str, torch.Tensor] = {}
    for leaf in ("weight", "bias"):
        out.update(_renamed(tensors, FLUX_TOP, "", "", leaf))
    for index in range(block_count(tensors, "transformer_blocks")):
        prefix = f"transformer_blocks.{index}"
        out.update(_fused(tensors, FLUX_DOUBLE, prefix, f"double_blocks.{index}"))
        out.update(_renamed(tensors, FLUX_NORMS, f"{prefix}.", f"double_blocks.{index}.", "weight"))
    for index in range(block_count(tensors, "single_transformer_blocks")):
        prefix = f"single_transformer_blocks.{index}"
        out.update(_fused(tensors, FLUX_SINGLE, prefix, f"single_blocks.{index}"))
        out.update(_renamed(tensors, FLUX_SINGLE_NORMS, f"{prefix}.", f"single_blocks.{index}.", "weight"))
    return _finished(out, tensors, swapped=SWAPPED)


def sd3_original(folder: Path) -> dict[str, torch.Tensor]:
    """The SD 3.5 MMDiT in SAI names under `model.diffusion_model.` (`joint_blocks.0.x_block…`)."""
    tensors = _denoiser(folder, "transformer")
    out: dict[str, torch.Tensor] = {"pos_embed": tensors.pop("pos_embed.pos_embed")}
    for leaf in ("weight", "bias"):
        out.update(_renamed(tensors, SD3_TOP, "", "", leaf))
    blocks = block_count(tensors, "transformer_blocks")
    for index in range(blocks):
        prefix = f"transformer_blocks.{index}"
        out.update(_fused(tensors, SD3_JOINT, prefix, f"joint_blocks.{index}"))
        for name, target in SD3_NORMS.items():
            if f"{prefix}.{name}.weight" in tensors:
                out[f"joint_blocks.{index}.{target}.weight"] = tensors.pop(f"{prefix}.{name}.weight")
    last = f"joint_blocks.{blocks - 1}.context_block.adaLN_modulation.1"
    out = _finished(out, tensors, swapped=(*SWAPPED, last))
    return {f"model.diffusion_model.{key}": value for key, value in out.items()}


def sdxl_original(folder: Path, *, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """The SDXL UNet in SGM names under `model.diffusion_model.` (`input_blocks.4.1.…`)."""
    tensors = _denoiser(folder, "unet")
    attention_up = {int(m[1]) for name in tensors if (m := re.match(r"up_blocks\.(\d+)\.attentions", name))}
    out: dict[str, torch.Tensor] = {}
    for key in list(tensors):
        layer, leaf = key.rsplit(".", 1)
        if layer in SGM_TOP:
            out[f"{SGM_TOP[layer]}.{leaf}"] = tensors.pop(key)
            continue
        match = re.fullmatch(r"(.*\.resnets\.\d+)\.(norm1|norm2)", layer)
        name = f"{match[1]}.conv1" if match else layer  # norms sit beside conv1 in the same resnet
        original = sgm_unet_name(name, layers_per_block=layers_per_block, attention_up_blocks=attention_up)
        if match:
            original = original.rsplit(".", 2)[0] + "." + SGM_RESNET_NORMS[match[2]]
        out[f"{original}.{leaf}"] = tensors.pop(key)
    return {f"model.diffusion_model.{key}": value for key, value in _finished(out, tensors).items()}


def _finished(
    out: dict[str, torch.Tensor], left: dict[str, torch.Tensor], *, swapped: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    if left:
        raise ValueError(f"no original name for {sorted(left)[:5]}")
    for name in swapped:
        for leaf in ("weight", "bias"):
            key = f"{name}.{leaf}"
            if key in out:
                out[key] = torch.cat(out[key].chunk(2)[::-1])
    return out


WRITERS = {"flux": flux_original, "sd3": sd3_original, "sdxl": sdxl_original}


def write_original(folder: str | Path, arch: str, path: str | Path) -> Path:
    """The denoiser of the diffusers model in `folder` as a single file in its original layout."""
    return save(WRITERS[arch](Path(folder)), path)
