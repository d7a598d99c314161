"""FLUX.2: [dev] (Mistral Small 3.1 text encoder, embedded guidance) and [klein] (Qwen3, CFG).

Both take up to three reference images (ai-toolkit's `ctrl_img` / `ctrl_img_1..3`), passed
as they are: the pipeline caps each at 1 MP and crops it to the VAE's multiple itself, and
ai-toolkit does not resize them either (`flux2_model.py`, `generate_single_image`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from diffusers import Flux2KleinPipeline, Flux2Pipeline

from sidecar.arch.specs import FLUX2, FLUX2_KLEIN
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Embeddings, Renderer
from sidecar.render.references import reference_images

MAX_SEQUENCE_LENGTH = 512  # the pipelines' default; kept so images equal a plain call's


class Flux2Renderer(Renderer):
    """Renders FLUX.2 [dev] samples: `guidance_scale` is the embedded guidance, no negative."""

    spec = FLUX2
    pipeline_class = Flux2Pipeline
    attention_kwargs = "attention_kwargs"
    text_encoder_keys: ClassVar[dict[str, str]] = {}

    def encode(self, prompt: str, negative_prompt: str, lora_scale: float | None) -> Embeddings:
        embeds, _text_ids = self.pipe.encode_prompt(
            prompt=prompt,
            device=self.encode_device,
            num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return {"prompt_embeds": embeds}

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        first = batch[0]  # a batch shares its reference images (`SampleRequest.batch_key`)
        arguments: dict[str, Any] = {
            **embeddings,
            "guidance_scale": first.guidance_scale,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }
        images = reference_images(first, limit=self.spec.control_images, resize=False)
        if images:
            arguments["image"] = images
        return arguments


class Flux2KleinRenderer(Flux2Renderer):
    """Renders FLUX.2 [klein] samples: `guidance_scale` is CFG against the negative prompt ("" when
    none, as a plain call encodes it); a step-distilled Klein ignores it, as its pipeline does."""

    spec = FLUX2_KLEIN
    pipeline_class = Flux2KleinPipeline

    def encode(self, prompt: str, negative_prompt: str, lora_scale: float | None) -> Embeddings:
        embeds = super().encode(prompt, negative_prompt, lora_scale)["prompt_embeds"]
        negative = super().encode(negative_prompt, "", lora_scale)["prompt_embeds"]
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
