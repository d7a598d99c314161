"""Flux-dev, SD 3.5 large and SDXL as sparse diffusers folders: the real headers, no data.

Each component is built on the meta device from its published config (the `config.json`
files of black-forest-labs/FLUX.1-dev, stabilityai/stable-diffusion-3.5-large and
stabilityai/stable-diffusion-xl-base-1.0, written out below), so its tensor names and
shapes are the real model's without a byte of weights. Each is written as a whole
safetensors file whose data is a hole (`os.truncate`): a 24 GB file that uses no disk.

`PUBLISHED_BYTES` are the sizes the Hugging Face Hub lists for those repos' safetensors
files (bf16 / fp16, decimal GB as the Hub shows them; shards added up), the figures
the memory plan is checked against.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

GB = 1000**3
MB = 1000**2

FLUX_DEV = {
    "transformer": 23.8 * GB,  # diffusion_pytorch_model-0000{1,2,3}-of-00003: 9.98 + 9.95 + 3.87 GB
    "text_encoder": 246 * MB,  # text_encoder/model.safetensors (CLIP-L)
    "text_encoder_2": 9.52 * GB,  # text_encoder_2/model-0000{1,2}-of-00002: 4.99 + 4.53 GB (T5-XXL)
    "vae": 168 * MB,  # vae/diffusion_pytorch_model.safetensors
}
SD35_LARGE = {
    "transformer": 16.3 * GB,  # diffusion_pytorch_model-0000{1,2}-of-00002: 9.99 + 6.29 GB (8.1 B params)
    "text_encoder": 247 * MB,  # CLIP-L with projection
    "text_encoder_2": 1.39 * GB,  # OpenCLIP bigG with projection
    "text_encoder_3": 9.52 * GB,  # T5-XXL, fp16
    "vae": 168 * MB,
}
SDXL_BASE = {
    "unet": 5.14 * GB,  # unet/diffusion_pytorch_model.fp16.safetensors
    "text_encoder": 246 * MB,  # text_encoder/model.fp16.safetensors
    "text_encoder_2": 1.39 * GB,  # text_encoder_2/model.fp16.safetensors
    "vae": 167 * MB,  # vae/diffusion_pytorch_model.fp16.safetensors
}
PUBLISHED_BYTES = {"flux": FLUX_DEV, "sd3": SD35_LARGE, "sdxl": SDXL_BASE}

PIPELINES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "sdxl": "StableDiffusionXLPipeline"}
HEADER_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}

CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
CLIP_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
}
VAE_16 = {
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "sample_size": 1024,
}
VAE_SDXL = {
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 1024,
}
FLUX_TRANSFORMER = {
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
SD35_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
}


def _clip(config: dict, *, projection: bool) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_class(CLIPTextConfig(**config))


def _t5() -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**T5_XXL))


def _components(arch: str) -> dict[str, tuple[object, torch.dtype]]:
    """`{component: (factory, published dtype)}`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    if arch == "flux":
        return {
            "transformer": (lambda: FluxTransformer2DModel(**FLUX_TRANSFORMER), torch.bfloat16),
            "text_encoder": (lambda: _clip(CLIP_L, projection=False), torch.bfloat16),
            "text_encoder_2": (_t5, torch.bfloat16),
            "vae": (lambda: AutoencoderKL(**VAE_16), torch.bfloat16),
        }
    if arch == "sd3":
        return {
            "transformer": (lambda: SD3Transformer2DModel(**SD35_TRANSFORMER), torch.bfloat16),
            "text_encoder": (lambda: _clip(CLIP_L, projection=True), torch.float16),
            "text_encoder_2": (lambda: _clip(CLIP_G, projection=True), torch.float16),
            "text_encoder_3": (_t5, torch.float16),
            "vae": (lambda: AutoencoderKL(**VAE_16), torch.float16),
        }
    return {
        "unet": (lambda: UNet2DConditionModel(**SDXL_UNET), torch.float16),
        "text_encoder": (lambda: _clip(CLIP_L, projection=False), torch.float16),
        "text_encoder_2": (lambda: _clip(CLIP_G, projection=True), torch.float16),
        "vae": (lambda: AutoencoderKL(**VAE_SDXL), torch.float16),
    }


def meta_shapes(factory, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """`{name: (shape, dtype)}` of a model's state dict, built on the meta device."""
    with torch.device("meta"):
        model = factory()
    shapes, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # tied weights (T5's `shared` and `embed_tokens`) are saved once
            continue
        seen.add(id(tensor))
        shapes[name] = (tuple(tensor.shape), dtype if tensor.is_floating_point() else tensor.dtype)
    return shapes


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> Path:
    """A whole safetensors file with this header whose data is a hole: no disk used."""
    header: dict[str, object] = {}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        count = 1
        for dim in shape:
            count *= dim
        end = offset + count * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": HEADER_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
    os.truncate(path, 8 + len(raw) + offset)
    return path


def write_sparse_model(arch: str, folder: Path) -> Path:
    """A diffusers folder of the published model `arch` with sparse weight files."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": PIPELINES[arch]}
    for component, (factory, dtype) in _components(arch).items():
        name = "diffusion_pytorch_model" if component in ("transformer", "unet", "vae") else "model"
        write_sparse_safetensors(folder / component / f"{name}.safetensors", meta_shapes(factory, dtype))
        index[component] = ["diffusers", "Placeholder"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
