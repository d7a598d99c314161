"""Stable Diffusion 1.5: UNet, one CLIP-L text encoder, classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from diffusers import StableDiffusionPipeline

from sidecar.arch.specs import SD15
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Embeddings, Renderer
from sidecar.render.model_sizes import TEXT_ENCODER_KEYS


class SD15Renderer(Renderer):
    """Renders SD 1.5 samples. An empty negative prompt encodes "" (the pipeline's own way).

    The safety checker of the published repos is dropped after loading, as ai-toolkit and
    kohya do for their samples: it blacks out images of a LoRA in training at random.
    """

    spec = SD15
    pipeline_class = StableDiffusionPipeline
    attention_kwargs = "cross_attention_kwargs"
    text_encoder_keys: ClassVar[dict[str, str]] = TEXT_ENCODER_KEYS["sd15"]

    @classmethod
    def from_model(cls, model_source: str | Path, **options: Any) -> Renderer:
        renderer = super().from_model(model_source, **options)
        renderer.pipe.register_modules(safety_checker=None, feature_extractor=None)
        renderer.pipe.register_to_config(requires_safety_checker=False)
        return renderer

    def encode(self, prompt: str, negative_prompt: str, lora_scale: float | None) -> Embeddings:
        prompt_embeds, negative_embeds = self.pipe.encode_prompt(
            prompt,
            self.encode_device,
            1,
            True,
            negative_prompt=negative_prompt or None,
            lora_scale=lora_scale,
        )
        return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        return {**embeddings, "guidance_scale": batch[0].guidance_scale}
