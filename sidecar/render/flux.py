"""Flux.1: guidance-distilled MMDiT with CLIP-L and T5.

`guidance_scale` is Flux's embedded (distilled) guidance, not CFG. True CFG with a
negative prompt runs only when asked (`true_cfg_scale` > 1 and a negative prompt),
and doubles the cost of each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import FluxPipeline

from sidecar.arch.specs import FLUX
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Embeddings, Renderer
from sidecar.render.model_sizes import TEXT_ENCODER_KEYS

T5_MAX_SEQUENCE_LENGTH = 512  # the pipeline's default; kept so images equal a plain call's


class FluxRenderer(Renderer):
    """Renders Flux samples."""

    spec = FLUX
    pipeline_class = FluxPipeline
    attention_kwargs = "joint_attention_kwargs"
    text_encoder_keys: ClassVar[dict[str, str]] = TEXT_ENCODER_KEYS["flux"]

    def encode(self, prompt: str, negative_prompt: str, lora_scale: float | None) -> Embeddings:
        """Flux has no negative embeddings of its own: the negative prompt is encoded like
        a prompt, and only when there is one (true CFG needs it)."""
        prompt_embeds, pooled = self._encode_text(prompt, lora_scale)
        negative_embeds, negative_pooled = (
            self._encode_text(negative_prompt, lora_scale) if negative_prompt else (None, None)
        )
        return {
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_embeds,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def _encode_text(self, text: str, lora_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 sequence embeddings and the pooled CLIP embedding of one text."""
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=text,
            prompt_2=None,
            device=self.encode_device,
            num_images_per_prompt=1,
            max_sequence_length=T5_MAX_SEQUENCE_LENGTH,
            lora_scale=lora_scale,
        )
        return embeds, pooled

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        first = batch[0]
        arguments: dict[str, Any] = {
            "prompt_embeds": embeddings["prompt_embeds"],
            "pooled_prompt_embeds": embeddings["pooled_prompt_embeds"],
            "guidance_scale": first.guidance_scale,
            "max_sequence_length": T5_MAX_SEQUENCE_LENGTH,
        }
        # Batches share settings, but a negative prompt may be missing for some requests;
        # true CFG needs one for every image of the batch.
        if first.true_cfg_scale > 1 and embeddings["negative_prompt_embeds"] is not None:
            arguments.update(
                true_cfg_scale=first.true_cfg_scale,
                negative_prompt_embeds=embeddings["negative_prompt_embeds"],
                negative_pooled_prompt_embeds=embeddings["negative_pooled_prompt_embeds"],
            )
        return arguments
