"""Tiny random-weight SDXL, SD 3.5 and Flux models, built offline from configs.

No hub, no downloads: every model is built from a config with fixed seeds, its
tokenizers from an in-memory vocabulary, then saved as an ordinary diffusers folder
that sidecar loads through the same code path as a user's real model. The demo,
the tests and the benchmarks stand on these.

Three sizes per architecture: `shallow` (a block or two; renders in a fraction of a
second on CPU), `deep` (the real block counts of SDXL, SD 3.5 medium and Flux
with tiny widths, so per-module costs such as LoRA injection weigh as at full size) and
`wide` (the real layer widths and module names with few blocks: `sidecar.testing.wide`).
"""

from __future__ import annotations

import logging
import string
from pathlib import Path
from typing import Any, Literal

import torch

from sidecar.arch import Arch

Size = Literal["shallow", "deep", "wide"]

CLIP_MAX_LENGTH = 77  # CLIP position embeddings; longer tokenizers break the text encoders
T5_MAX_LENGTH = 256
TEXT_WIDTH = 32  # hidden size of the tiny CLIP encoders
T5_WIDTH = 64  # d_model of the tiny T5; >= the two CLIP widths summed (SD 3.5 pads CLIP to it)
# The published VAEs' latent scaling (their `config.json`), which the tiny VAEs carry too.
SD3_VAE = {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159}  # Chroma's, Z-Image's


# ---------------------------------------------------------------------------------
# Tokenizers: byte-level CLIP BPE and a character-level T5 unigram, both in memory.
# ---------------------------------------------------------------------------------


def make_clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges: every character is a token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    for char in sorted(ByteLevel.alphabet()):
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def make_t5_tokenizer():
    """A character-level T5 unigram tokenizer (pad=0, eos=1, unk=2)."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces.append((char, -3.0))
        pieces.append(("▁" + char, -2.5))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_config(tokenizer, *, layers: int, projection_dim: int = TEXT_WIDTH):
    from transformers import CLIPTextConfig

    # The config's special ids must be the tokenizer's, or pooling picks the wrong token.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def t5_options(tokenizer, *, width: int, feed_forward: int, layers: int) -> dict[str, Any]:
    """`T5Config` / `UMT5Config` arguments of a small gated-GELU encoder: 4 heads of 8, no dropout
    (models built from configs start in train mode), the tokenizer's special ids."""
    return {
        "vocab_size": len(tokenizer),
        "d_model": width,
        "d_kv": 8,
        "d_ff": feed_forward,
        "num_layers": layers,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "dropout_rate": 0.0,
        "feed_forward_proj": "gated-gelu",
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }


def _t5_encoder(tokenizer, *, layers: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**t5_options(tokenizer, width=T5_WIDTH, feed_forward=37, layers=layers)))


def flux_blocks(*, deep: bool) -> dict[str, Any]:
    """The tiny Flux.1-shaped transformer's arguments (Chroma's too): 1 double and 1 single block
    (Flux.1's 19 and 38 when deep), 2 heads of 16, 16-channel latents packed 2x2."""
    return {
        "patch_size": 1,
        "in_channels": 4 * FLUX_VAE["latent_channels"],  # latents are packed 2x2
        "num_layers": 19 if deep else 1,
        "num_single_layers": 38 if deep else 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": T5_WIDTH,
        "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim
    }


def _vae(*, latent_channels: int, scaling_factor: float, shift_factor: float | None):
    from diffusers import AutoencoderKL

    # Four blocks give the real vae_scale_factor of 8 (three downsamplings).
    flow_vae = shift_factor is not None
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=not flow_vae,
        use_post_quant_conv=not flow_vae,
    )


# ---------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------

SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "sample_max_value": 1.0,
}
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def build_sdxl(size: Size = "shallow", *, seed: int = 0):
    """SDXL: UNet with text-time conditioning, CLIP-L + CLIP-bigG shaped encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    deep = size == "deep"
    tokenizer = make_clip_tokenizer()
    torch.manual_seed(seed)
    # SDXL reads hidden_states[-2], so each encoder needs at least two layers.
    text_encoder = CLIPTextModel(_clip_config(tokenizer, layers=12 if deep else 2))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, layers=32 if deep else 2))
    addition_time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        if deep
        else ("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
        if deep
        else ("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64) if deep else (32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10) if deep else (1, 2),
        attention_head_dim=(2, 4, 8) if deep else (2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_WIDTH,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + TEXT_WIDTH,
    )
    vae = _vae(latent_channels=4, scaling_factor=0.13025, shift_factor=None)
    # from_config keeps DDIM's keys (clip_sample...) in the config, as SDXL's real file has them.
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=make_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def build_sd3(size: Size = "shallow", *, seed: int = 0):
    """SD 3.5: MMDiT (SD 3.5 medium shape when deep), two CLIP encoders and T5."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    deep = size == "deep"
    clip_tokenizer = make_clip_tokenizer()
    t5_tokenizer = make_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(clip_tokenizer, layers=12 if deep else 2))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(clip_tokenizer, layers=32 if deep else 2))
    text_encoder_3 = _t5_encoder(t5_tokenizer, layers=24 if deep else 2)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24 if deep else 2,
        attention_head_dim=8,
        num_attention_heads=6,  # width 48: not Flux's 32, as real SD 3.5 and Flux widths differ
        joint_attention_dim=T5_WIDTH,  # CLIP states are padded to T5's width and joined
        caption_projection_dim=48,  # must equal the width
        pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=96,
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)) if deep else (0,),
    )
    vae = _vae(**SD3_VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )


def build_flux(size: Size = "shallow", *, seed: int = 0):
    """Flux.1 dev: double- and single-stream blocks, guidance embedding, CLIP-L and T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    deep = size == "deep"
    clip_tokenizer = make_clip_tokenizer()
    t5_tokenizer = make_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(clip_tokenizer, layers=12 if deep else 2))
    text_encoder_2 = _t5_encoder(t5_tokenizer, layers=24 if deep else 2)
    transformer = FluxTransformer2DModel(
        **flux_blocks(deep=deep), pooled_projection_dim=TEXT_WIDTH, guidance_embeds=True
    )
    vae = _vae(**FLUX_VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
    )


BUILDERS = {"sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux}
WIDE_ARCHS = ("sdxl", "sd3", "flux")  # `sidecar.testing.wide` builds these


def all_builders() -> dict:
    """These three and the newer architectures' (`tiny_more.py`, imported here on first use: it
    builds on this module's helpers)."""
    from sidecar.testing.tiny_more import MORE_BUILDERS

    return {**BUILDERS, **MORE_BUILDERS}


def build_pipeline(arch: Arch, size: Size = "shallow", *, seed: int = 0):
    """A tiny pipeline of `arch` in eval mode, weights from `seed`."""
    builders = all_builders()
    if arch not in builders:
        raise ValueError(f"`arch` must be one of {sorted(builders)}, got {arch!r}")
    if size == "wide":
        from sidecar.testing.wide import build_wide

        pipe = build_wide(arch, seed=seed)
    else:
        pipe = builders[arch](size, seed=seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # models built from configs start in train mode
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_model(arch: Arch, folder: str | Path, *, size: Size = "shallow", seed: int = 0) -> Path:
    """Build a tiny model and save it as a diffusers folder; reuse the folder if complete."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    return save_pipeline(build_pipeline(arch, size, seed=seed), folder)


def save_pipeline(pipe, folder: Path) -> Path:
    """Save `pipe` as a diffusers folder that appears complete or not at all."""
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial, safe_serialization=True)
    partial.rename(folder)  # a folder with model_index.json is always complete
    return folder


def tiny_models(root: str | Path, *, size: Size = "shallow") -> dict[str, Path]:
    """Every tiny model under `root` (built once, then reused); `wide`: those of `WIDE_ARCHS`.

    A model whose optional dependency is missing (Qwen-Image-Edit's processor needs
    torchvision) is left out, with a warning saying which and why.
    """
    root = Path(root)
    models: dict[str, Path] = {}
    for arch in WIDE_ARCHS if size == "wide" else all_builders():
        try:
            models[arch] = save_tiny_model(arch, root / f"tiny-{arch}-{size}", size=size)  # type: ignore[arg-type]
        except ImportError as error:
            logging.getLogger("sidecar.testing").warning("tiny %s not built: %s", arch, error)
    return models
