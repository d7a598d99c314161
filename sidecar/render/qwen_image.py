"""Qwen-Image: a 20B MMDiT fed Qwen2.5-VL's last hidden state, true CFG.

As in ai-toolkit (`qwen_image.py`, `generate_single_image`), the sample's `guidance_scale`
is the pipeline's `true_cfg_scale`, and a negative pass always runs above 1: with no
negative prompt it is the empty prompt's. Qwen-Image-Edit is `qwen_image_edit.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import QwenImagePipeline

from sidecar.arch.specs import QWEN_IMAGE
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Embeddings, Renderer

MAX_SEQUENCE_LENGTH = 512  # the pipelines' `__call__` default; kept so images equal a plain call's
FIELDS = (("prompt_embeds", "prompt_embeds_mask"), ("negative_prompt_embeds", "negative_prompt_embeds_mask"))


def padded(sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of their own lengths (1, n, dim) as one batch and its mask, as the pipeline pads a
    list of prompts (`_get_qwen_prompt_embeds`): zeros after each. A mask of ones is dropped by the
    pipeline as its own is (`encode_prompt`); without one it warns at every call."""
    longest = max(sequence.shape[1] for sequence in sequences)
    batch = torch.cat(
        [torch.nn.functional.pad(sequence, (0, 0, 0, longest - sequence.shape[1])) for sequence in sequences]
    )
    mask = torch.zeros(len(sequences), longest, dtype=torch.long, device=batch.device)
    for row, sequence in enumerate(sequences):
        mask[row, : sequence.shape[1]] = 1
    return batch, mask


class QwenImageRenderer(Renderer):
    """Renders Qwen-Image samples."""

    spec = QWEN_IMAGE
    pipeline_class = QwenImagePipeline
    attention_kwargs = "attention_kwargs"
    text_encoder_keys: ClassVar[dict[str, str]] = {}

    def encode(self, prompt: str, negative_prompt: str, lora_scale: float | None) -> Embeddings:
        return {
            "prompt_embeds": self._encode_text(prompt),
            "negative_prompt_embeds": self._encode_text(negative_prompt),
        }

    def _encode_text(self, text: str, **inputs: Any) -> torch.Tensor:
        """One text's hidden states, unpadded (1, n, dim): a single prompt has no mask."""
        embeds, _mask = self.pipe.encode_prompt(
            prompt=text,
            device=self.encode_device,
            num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            **inputs,
        )
        return embeds

    def batch_embeddings(self, embeddings: Sequence[Embeddings]) -> dict[str, Any]:
        arguments: dict[str, Any] = {}
        for embeds_name, mask_name in FIELDS:
            arguments[embeds_name], arguments[mask_name] = padded([item[embeds_name] for item in embeddings])
        return arguments

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        return {
            **embeddings,
            "true_cfg_scale": batch[0].guidance_scale,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }
