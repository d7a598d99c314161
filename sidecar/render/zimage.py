"""Z-Image (Turbo, base, De-Turbo): a single-stream transformer fed Qwen3's hidden states, CFG."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from diffusers import ZImagePipeline

from sidecar.arch.specs import ZIMAGE
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Embeddings, Renderer
from sidecar.render.model_sizes import TEXT_ENCODER_KEYS

MAX_SEQUENCE_LENGTH = 512  # the pipeline's default; kept so images equal a plain call's


class ZImageRenderer(Renderer):
    """Renders Z-Image samples. Above a `guidance_scale` of 1 the negative prompt ("" when none)
    runs beside the prompt (CFG); Turbo renders with guidance 0 or 1 and 8-9 steps."""

    spec = ZIMAGE
    pipeline_class = ZImagePipeline
    attention_kwargs = "joint_attention_kwargs"
    text_encoder_keys: ClassVar[dict[str, str]] = TEXT_ENCODER_KEYS["zimage"]

    def encode(self, prompt: str, negative_prompt: str, lora_scale: float | None) -> Embeddings:
        """Each text is one tensor of its own length (padding is dropped), as the pipeline keeps them."""
        (embeds,), (negative_embeds,) = self.pipe.encode_prompt(
            prompt=prompt,
            device=self.encode_device,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt or None,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}

    def batch_embeddings(self, embeddings: Sequence[Embeddings]) -> dict[str, Any]:
        """`ZImagePipeline` takes a list with one tensor per image, of different lengths."""
        return {name: [item[name] for item in embeddings] for name in embeddings[0]}

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        return {
            **embeddings,
            "guidance_scale": batch[0].guidance_scale,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }
