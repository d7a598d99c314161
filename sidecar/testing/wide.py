"""Wide models: real layer widths and real module names, few blocks.

LoRA files as trainers write them target real widths (Flux's 3072-wide fused qkv, SD 3.5
large's 2432-wide attention, SDXL's 1280-channel UNet stage), and some conversion code
only works at those sizes. These models have the real denoiser widths and module names
of each architecture with the depth cut to a block or two (kept where an index mapping
depends on it: SDXL's three UNet stages and two layers per block, which kohya's
`input_blocks.N` numbering follows). Text encoders are narrow inside but produce
embeddings of the real widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096); the VAE is the tiny
one. Random weights, fixed seeds, built offline like the tiny models.

Published configs these follow: `stabilityai/stable-diffusion-xl-base-1.0`,
`stabilityai/stable-diffusion-3.5-medium` and `-large`, `black-forest-labs/FLUX.1-dev`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from sidecar.testing.tiny import (
    FLUX_SCHEDULER_CONFIG,
    FLUX_VAE,
    SD3_SCHEDULER_CONFIG,
    SD3_VAE,
    SDXL_SCHEDULER_CONFIG,
    _vae,
    make_clip_tokenizer,
    make_t5_tokenizer,
    t5_options,
)

Sd3Variant = Literal["medium", "large"]

CLIP_L_WIDTH = 768  # CLIP ViT-L/14 text hidden size (SDXL, SD 3.5, Flux pooled)
CLIP_G_WIDTH = 1280  # OpenCLIP bigG text hidden size (SDXL, SD 3.5)
T5_XXL_WIDTH = 4096  # T5 v1.1 XXL d_model: Flux's and SD 3.5's joint_attention_dim
NARROW_FF = 64  # feed-forward width inside the narrow text encoders
TEXT_LAYERS = 2  # SDXL reads hidden_states[-2]: at least two layers

# Flux.1 dev transformer, as published, with 1 of 19 double and 1 of 38 single blocks.
FLUX_WIDE = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": T5_XXL_WIDTH,
    "pooled_projection_dim": CLIP_L_WIDTH,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

# SD 3.5 medium (MMDiT-X: dual attention in the first blocks) and large, two blocks each:
# the first a full joint block (dual attention on medium), the last context-pre-only.
SD3_WIDE: dict[str, dict] = {
    "medium": {
        "num_attention_heads": 24,
        "caption_projection_dim": 1536,
        "dual_attention_layers": (0,),
    },
    "large": {
        "num_attention_heads": 38,
        "caption_projection_dim": 2432,
        "dual_attention_layers": (),
    },
}
SD3_POS_EMBED_MAX_SIZE = 96  # the real 384 / 192 only crops a larger grid; this keeps the buffer small

# SDXL base UNet with one transformer layer where the real one has 1, 2 and 10.
SDXL_WIDE = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 1, 1),
    "attention_head_dim": (5, 10, 20),
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "cross_attention_dim": CLIP_L_WIDTH + CLIP_G_WIDTH,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 6 * 256 + CLIP_G_WIDTH,
}


def _clip(tokenizer, *, width: int, projection: bool):
    """A two-layer CLIP text encoder whose hidden states (and projection) have `width`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=NARROW_FF,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=width // 64,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=width,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer):
    """A two-layer T5 encoder with T5-XXL's output width and narrow attention and MLP."""
    from transformers import T5Config, T5EncoderModel

    options = t5_options(tokenizer, width=T5_XXL_WIDTH, feed_forward=NARROW_FF, layers=TEXT_LAYERS)
    return T5EncoderModel(T5Config(**options))


def build_sdxl_wide(*, seed: int = 0):
    """SDXL: the base UNet's channels, stages and module names; CLIP-L and bigG widths."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = make_clip_tokenizer()
    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        vae=_vae(latent_channels=4, scaling_factor=0.13025, shift_factor=None),
        text_encoder=_clip(tokenizer, width=CLIP_L_WIDTH, projection=False),
        text_encoder_2=_clip(tokenizer, width=CLIP_G_WIDTH, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=make_clip_tokenizer(),
        unet=UNet2DConditionModel(**SDXL_WIDE),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
    )


def build_sd3_wide(variant: Sd3Variant = "medium", *, seed: int = 0):
    """SD 3.5 medium or large widths: two MMDiT blocks, CLIP-L, CLIP-G and T5-XXL widths."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    if variant not in SD3_WIDE:
        raise ValueError(f"`variant` must be one of {sorted(SD3_WIDE)}, got {variant!r}")
    clip_tokenizer = make_clip_tokenizer()
    t5_tokenizer = make_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=64,
        joint_attention_dim=T5_XXL_WIDTH,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        pos_embed_max_size=SD3_POS_EMBED_MAX_SIZE,
        qk_norm="rms_norm",
        **SD3_WIDE[variant],
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=_vae(**SD3_VAE),
        text_encoder=_clip(clip_tokenizer, width=CLIP_L_WIDTH, projection=True),
        tokenizer=clip_tokenizer,
        text_encoder_2=_clip(clip_tokenizer, width=CLIP_G_WIDTH, projection=True),
        tokenizer_2=make_clip_tokenizer(),
        text_encoder_3=_t5(t5_tokenizer),
        tokenizer_3=t5_tokenizer,
    )


def build_flux_wide(*, seed: int = 0):
    """Flux.1 dev widths: one double and one single block, CLIP-L pooled and T5-XXL widths."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tokenizer = make_clip_tokenizer()
    t5_tokenizer = make_t5_tokenizer()
    torch.manual_seed(seed)
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**FLUX_WIDE),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=_vae(**FLUX_VAE),
        text_encoder=_clip(clip_tokenizer, width=CLIP_L_WIDTH, projection=False),
        tokenizer=clip_tokenizer,
        text_encoder_2=_t5(t5_tokenizer),
        tokenizer_2=t5_tokenizer,
    )


def build_wide(arch: str, *, seed: int = 0, sd3_variant: Sd3Variant = "medium"):
    """The wide pipeline of `arch` (SD 3.5 in `sd3_variant` widths)."""
    if arch == "sdxl":
        return build_sdxl_wide(seed=seed)
    if arch == "sd3":
        return build_sd3_wide(sd3_variant, seed=seed)
    if arch == "flux":
        return build_flux_wide(seed=seed)
    raise ValueError(f"`arch` must be one of ['flux', 'sd3', 'sdxl'], got {arch!r}")


def save_wide_model(
    arch: str, folder: str | Path, *, seed: int = 0, sd3_variant: Sd3Variant = "medium"
) -> Path:
    """Build a wide model and save it as a diffusers folder; reuse the folder if complete."""
    from sidecar.testing.tiny import save_pipeline

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    pipe = build_wide(arch, seed=seed, sd3_variant=sd3_variant)
    return save_pipeline(pipe, folder)
