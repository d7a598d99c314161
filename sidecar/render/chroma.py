"""Chroma: Flux.1 schnell's blocks de-distilled, T5 with its attention mask, real CFG."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from diffusers import ChromaPipeline

from sidecar.arch.specs import CHROMA
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Embeddings, Renderer
from sidecar.render.model_sizes import TEXT_ENCODER_KEYS

T5_MAX_SEQUENCE_LENGTH = 512  # the pipeline's default; kept so images equal a plain call's


class ChromaRenderer(Renderer):
    """Renders Chroma samples. `guidance_scale` is CFG: above 1 the negative prompt ("" when
    none) runs beside the prompt, as in a plain `ChromaPipeline` call."""

    spec = CHROMA
    pipeline_class = ChromaPipeline
    attention_kwargs = "joint_attention_kwargs"
    text_encoder_keys: ClassVar[dict[str, str]] = TEXT_ENCODER_KEYS["chroma"]

    def encode(self, prompt: str, negative_prompt: str, lora_scale: float | None) -> Embeddings:
        embeds, _ids, mask, negative_embeds, _negative_ids, negative_mask = self.pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            device=self.encode_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            max_sequence_length=T5_MAX_SEQUENCE_LENGTH,
            lora_scale=lora_scale,
        )
        return {
            "prompt_embeds": embeds,
            "prompt_attention_mask": mask,
            "negative_prompt_embeds": negative_embeds,
            "negative_prompt_attention_mask": negative_mask,
        }

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        return {
            **embeddings,
            "guidance_scale": batch[0].guidance_scale,
            "max_sequence_length": T5_MAX_SEQUENCE_LENGTH,
        }
