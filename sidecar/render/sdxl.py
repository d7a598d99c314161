"""Stable Diffusion XL: UNet, two CLIP text encoders, classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from diffusers import StableDiffusionXLPipeline

from sidecar.arch.specs import SDXL
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Embeddings, Renderer
from sidecar.render.model_sizes import TEXT_ENCODER_KEYS


class SDXLRenderer(Renderer):
    """Renders SDXL samples. An empty negative prompt means none: SDXL then uses zero
    embeddings (`force_zeros_for_empty_prompt`), as a plain pipeline call does."""

    spec = SDXL
    pipeline_class = StableDiffusionXLPipeline
    attention_kwargs = "cross_attention_kwargs"
    text_encoder_keys: ClassVar[dict[str, str]] = TEXT_ENCODER_KEYS["sdxl"]

    def encode(self, prompt: str, negative_prompt: str, lora_scale: float | None) -> Embeddings:
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompt,
            device=self.encode_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt or None,
            lora_scale=lora_scale,
        )
        return {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_embeds,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        return {**embeddings, "guidance_scale": batch[0].guidance_scale}
