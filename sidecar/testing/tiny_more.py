"""Tiny random-weight SD 1.5, Chroma, FLUX.1 Kontext, FLUX.2 (dev, Klein), Qwen-Image (and
its Edit variants) and Z-Image, built offline from configs like `sidecar.testing.tiny`.

Widths are tiny and blocks one or two; what the pipelines index into is kept: Flux.2 stacks
the hidden states of layers 10, 20 and 30 of Mistral (9, 18 and 27 of Qwen3), so those text
encoders have that many (16-wide) layers; every VAE has the real 8x downsampling, so sizes
are multiples of 16 as on the real models. Shapes follow diffusers' own pipeline tests
(`tests/pipelines/{chroma,flux2,qwenimage,z_image}/`), with tokenizers built in memory
(`tiny_tokenizers.py`) instead of downloaded.
"""

from __future__ import annotations

import torch

from sidecar.testing.tiny import (
    FLUX_SCHEDULER_CONFIG,
    FLUX_VAE,
    SDXL_SCHEDULER_CONFIG,
    TEXT_WIDTH,
    _clip_config,
    _t5_encoder,
    _vae,
    build_flux,
    flux_blocks,
    make_clip_tokenizer,
    make_t5_tokenizer,
)
from sidecar.testing.tiny_tokenizers import (
    QWEN_SPECIAL_TOKENS,
    make_mistral_tokenizer,
    make_qwen_tokenizer,
    make_qwen_vl_processor,
)

LM_WIDTH = 16  # hidden size of the tiny Mistral, Qwen3 and Qwen2.5-VL text encoders
MISTRAL_LAYERS = 30  # Flux2Pipeline reads hidden_states[10], [20], [30]
QWEN3_KLEIN_LAYERS = 27  # Flux2KleinPipeline reads hidden_states[9], [18], [27]
FLUX2_LATENT_CHANNELS = 4
QWEN_LATENT_CHANNELS = 4
SD15_SCHEDULER_CONFIG = {**SDXL_SCHEDULER_CONFIG, "skip_prk_steps": True}  # its PNDM, as published
# Qwen-Image's published scheduler_config.json: exponential dynamic shift up to 8192 tokens.
QWEN_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}
ZIMAGE_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def build_sd15(size: str = "shallow", *, seed: int = 0):
    """SD 1.5: a cross-attention UNet on one CLIP-L shaped encoder, no safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    deep = size == "deep"
    tokenizer = make_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, layers=12 if deep else 2))
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
        if deep
        else ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
        if deep
        else ("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64) if deep else (32, 64),
        layers_per_block=2,
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=TEXT_WIDTH,
    )
    vae = _vae(latent_channels=4, scaling_factor=0.18215, shift_factor=None)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_chroma(size: str = "shallow", *, seed: int = 0):
    """Chroma: Flux-shaped blocks, the distilled guidance approximator, T5 alone."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    deep = size == "deep"
    tokenizer = make_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _t5_encoder(tokenizer, layers=24 if deep else 2)
    transformer = ChromaTransformer2DModel(
        **flux_blocks(deep=deep),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    vae = _vae(**FLUX_VAE)
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_flux_kontext(size: str = "shallow", *, seed: int = 0):
    """FLUX.1 Kontext: Flux.1 dev's components in the Kontext pipeline."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**build_flux(size, seed=seed).components)


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 8x, as published
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=FLUX2_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _flux2_transformer(*, deep: bool, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * FLUX2_LATENT_CHANNELS,  # latents are patchified 2x2
        num_layers=8 if deep else 1,
        num_single_layers=48 if deep else 1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * LM_WIDTH,  # three hidden layers of the text encoder, stacked
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def build_flux2(size: str = "shallow", *, seed: int = 0):
    """FLUX.2 [dev]: the Flux.2 transformer with guidance embedding, a Mistral 3 text encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = make_mistral_tokenizer()
    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": LM_WIDTH,
            "intermediate_size": 37,
            "max_position_embeddings": 2048,
            "num_attention_heads": 4,
            "num_hidden_layers": MISTRAL_LAYERS,
            "num_key_value_heads": 2,
            "head_dim": 4,
            "sliding_window": None,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        image_seq_length=4,
        vision_feature_layer=-1,
    )
    text_encoder = Mistral3ForConditionalGeneration(config)
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=_flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_flux2_transformer(deep=size == "deep", guidance_embeds=True),
    )


def _qwen3(tokenizer, *, layers: int, causal_lm: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=LM_WIDTH,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return Qwen3ForCausalLM(config) if causal_lm else Qwen3Model(config)


def build_flux2_klein(size: str = "shallow", *, seed: int = 0):
    """FLUX.2 [klein] base: the Flux.2 transformer without guidance embedding, Qwen3, CFG."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    tokenizer = make_qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _qwen3(tokenizer, layers=QWEN3_KLEIN_LAYERS, causal_lm=True)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=_flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_flux2_transformer(deep=size == "deep", guidance_embeds=False),
        is_distilled=False,
    )


def _qwen_vl(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": LM_WIDTH,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        vocab_size=len(tokenizer),
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|image_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen_components(deep: bool) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer = make_qwen_tokenizer()
    text_encoder = _qwen_vl(tokenizer)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * QWEN_LATENT_CHANNELS,
        out_channels=QWEN_LATENT_CHANNELS,
        num_layers=60 if deep else 2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=LM_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=QWEN_LATENT_CHANNELS,
        dim_mult=[1, 2, 4, 4],  # three downsamplings: 8x, as published
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * QWEN_LATENT_CHANNELS,
        latents_std=[1.0] * QWEN_LATENT_CHANNELS,
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }


def build_qwen_image(size: str = "shallow", *, seed: int = 0):
    """Qwen-Image: the MMDiT on Qwen2.5-VL's last hidden state, the Wan-style VAE."""
    from diffusers import QwenImagePipeline

    torch.manual_seed(seed)
    return QwenImagePipeline(**_qwen_components(size == "deep"))


def build_qwen_image_edit(size: str = "shallow", *, seed: int = 0):
    """Qwen-Image-Edit: Qwen-Image's components and Qwen2-VL's processor (needs torchvision)."""
    from diffusers import QwenImageEditPipeline

    torch.manual_seed(seed)
    components = _qwen_components(size == "deep")
    return QwenImageEditPipeline(**components, processor=make_qwen_vl_processor(components["tokenizer"]))


def build_qwen_image_edit_plus(size: str = "shallow", *, seed: int = 0):
    """Qwen-Image-Edit-2509: as Edit, with up to three references."""
    from diffusers import QwenImageEditPlusPipeline

    torch.manual_seed(seed)
    components = _qwen_components(size == "deep")
    return QwenImageEditPlusPipeline(**components, processor=make_qwen_vl_processor(components["tokenizer"]))


def build_zimage(size: str = "shallow", *, seed: int = 0):
    """Z-Image: the single-stream transformer with its refiners, Qwen3 (hidden_states[-2]), Flux's VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer = make_qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _qwen3(tokenizer, layers=2, causal_lm=False)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=FLUX_VAE["latent_channels"],
        dim=32,
        n_layers=30 if size == "deep" else 2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=LM_WIDTH,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 64, 64],
    )
    with torch.no_grad():  # created with torch.empty: fixed, so every build gives the same model
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    vae = _vae(**FLUX_VAE)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


MORE_BUILDERS = {
    "sd15": build_sd15,
    "chroma": build_chroma,
    "flux_kontext": build_flux_kontext,
    "flux2": build_flux2,
    "flux2_klein": build_flux2_klein,
    "qwen_image": build_qwen_image,
    "qwen_image_edit": build_qwen_image_edit,
    "qwen_image_edit_plus": build_qwen_image_edit_plus,
    "zimage": build_zimage,
}
