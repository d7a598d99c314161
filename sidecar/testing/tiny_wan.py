"""Tiny random-weight Wan 2.1 and 2.2 (text- and image-to-video), built offline from configs.

Shapes follow diffusers' own Wan pipeline tests (`tests/pipelines/wan/test_wan*.py`): a
two-block 3D DiT, the real Wan VAE layout with tiny widths (8x spatial and 4x temporal
compression, so frame counts are 1 + 4k and sizes multiples of 16, as on the real models), a
two-layer UMT5 encoder with a UMT5-style (T5 unigram) tokenizer built in memory, and for Wan
2.1 image-to-video a tiny CLIP vision encoder. Wan 2.2 A14B has two such transformers, the
high-noise `transformer` and the low-noise `transformer_2`, switched at `boundary_ratio`.
Nothing is downloaded; each model is saved as an ordinary diffusers folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from sidecar.testing.tiny import make_t5_tokenizer, save_pipeline, t5_options

Version = Literal["2.1", "2.2"]

UMT5_WIDTH = 32  # d_model of the tiny UMT5 encoder: the transformer's `text_dim`
UMT5_MAX_LENGTH = 512  # Wan's `max_sequence_length`: prompts are padded to it
CLIP_VISION_WIDTH = 4  # hidden size of the tiny image encoder: the transformer's `image_dim`
CLIP_IMAGE_PX = 32
LATENT_CHANNELS = 16  # Wan 2.1 VAE's `z_dim`
BOUNDARY_RATIO_T2V = 0.875  # Wan 2.2 A14B text-to-video: experts switch at t = 875
BOUNDARY_RATIO_I2V = 0.9  # Wan 2.2 A14B image-to-video
# Wan-AI's published diffusers repos ship flow UniPC; 3.0 is the 480p shift.
WAN_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
}


def make_umt5_tokenizer():
    """The character-level T5 unigram tokenizer, padded to Wan's 512 tokens (UMT5 uses T5's class)."""
    tokenizer = make_t5_tokenizer()
    tokenizer.model_max_length = UMT5_MAX_LENGTH
    return tokenizer


def _umt5_encoder(tokenizer):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(**t5_options(tokenizer, width=UMT5_WIDTH, feed_forward=37, layers=2)))


def _transformer(*, image_to_video: bool, with_image_encoder: bool):
    from diffusers import WanTransformer3DModel

    # Image-to-video concatenates the start frame's latents and a 4-channel mask per latent frame.
    in_channels = 2 * LATENT_CHANNELS + 4 if image_to_video else LATENT_CHANNELS
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        text_dim=UMT5_WIDTH,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=CLIP_VISION_WIDTH if with_image_encoder else None,
        added_kv_proj_dim=24 if with_image_encoder else None,  # the attention width, 2 x 12
    )


def _vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def _image_encoder():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=CLIP_VISION_WIDTH,
        projection_dim=CLIP_VISION_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=CLIP_IMAGE_PX,
        intermediate_size=16,
        patch_size=1,
    )
    processor = CLIPImageProcessor(crop_size=CLIP_IMAGE_PX, size=CLIP_IMAGE_PX)
    return CLIPVisionModelWithProjection(config), processor


def build_wan(version: Version = "2.1", *, image_to_video: bool = False, seed: int = 0):
    """A tiny Wan pipeline: 2.1 (one transformer) or 2.2 A14B (two experts), T2V or I2V.

    Wan 2.1 image-to-video has a CLIP image encoder; 2.2's does not (its transformers take the
    start frame's latents only), as in the published models.
    """
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    if version not in ("2.1", "2.2"):
        raise ValueError(f"`version` must be '2.1' or '2.2', got {version!r}")
    two_experts = version == "2.2"
    with_image_encoder = image_to_video and not two_experts
    tokenizer = make_umt5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _umt5_encoder(tokenizer)
    transformer = _transformer(image_to_video=image_to_video, with_image_encoder=with_image_encoder)
    transformer_2 = (
        _transformer(image_to_video=image_to_video, with_image_encoder=False) if two_experts else None
    )
    vae = _vae()
    scheduler = UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG)
    boundary = (BOUNDARY_RATIO_I2V if image_to_video else BOUNDARY_RATIO_T2V) if two_experts else None
    components = {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": scheduler,
        "transformer": transformer,
        "transformer_2": transformer_2,
        "boundary_ratio": boundary,
    }
    if not image_to_video:
        pipe = WanPipeline(**components)
    else:
        image_encoder, image_processor = _image_encoder() if with_image_encoder else (None, None)
        pipe = WanImageToVideoPipeline(
            **components, image_encoder=image_encoder, image_processor=image_processor
        )
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # models built from configs start in train mode
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_name(version: Version, *, image_to_video: bool = False) -> str:
    """`tiny-wan21-t2v`, `tiny-wan22-i2v`: the folder name of each tiny Wan."""
    return f"tiny-wan{version.replace('.', '')}-{'i2v' if image_to_video else 't2v'}"


def save_tiny_wan(
    folder: str | Path, version: Version = "2.1", *, image_to_video: bool = False, seed: int = 0
) -> Path:
    """Build a tiny Wan and save it as a diffusers folder; reuse the folder if complete."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    return save_pipeline(build_wan(version, image_to_video=image_to_video, seed=seed), folder)
