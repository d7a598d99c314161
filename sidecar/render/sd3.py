"""Stable Diffusion 3.5: MMDiT, two CLIP encoders and T5, flow matching, CFG."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from diffusers import StableDiffusion3Pipeline

from sidecar.arch.specs import SD3
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Embeddings, Renderer
from sidecar.render.model_sizes import TEXT_ENCODER_KEYS

T5_MAX_SEQUENCE_LENGTH = 256  # the pipeline's default; kept so images equal a plain call's


class SD3Renderer(Renderer):
    """Renders SD 3.5 samples. An empty negative prompt encodes "" (SD3's own default)."""

    spec = SD3
    pipeline_class = StableDiffusion3Pipeline
    attention_kwargs = "joint_attention_kwargs"
    text_encoder_keys: ClassVar[dict[str, str]] = TEXT_ENCODER_KEYS["sd3"]

    def encode(self, prompt: str, negative_prompt: str, lora_scale: float | None) -> Embeddings:
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.encode_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt or None,
            max_sequence_length=T5_MAX_SEQUENCE_LENGTH,
            lora_scale=lora_scale,
        )
        return {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_embeds,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        return {
            **embeddings,
            "guidance_scale": batch[0].guidance_scale,
            "max_sequence_length": T5_MAX_SEQUENCE_LENGTH,
        }
