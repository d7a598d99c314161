"""Qwen-Image-Edit and -Edit-2509 ("Plus"): Qwen-Image that edits reference images.

The reference is resized to the sample's width and height, as ai-toolkit does
(`qwen_image_edit.py`, `generate_single_image`); the pipeline then takes it to ~1 MP for the
VAE itself. Its text encoder (Qwen2.5-VL) reads the reference too, so a prompt's embeddings
belong to its reference images (`encode_request`); they are made from the same image the
pipeline would hand its encoder, by the pipeline's own `calculate_dimensions` and resize.

Loading needs torchvision: transformers builds Qwen2-VL's processor with a video part that
imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from PIL import Image

from sidecar.arch.specs import QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS
from sidecar.errors import ModelError
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Embeddings, Renderer
from sidecar.render.qwen_image import QwenImageRenderer
from sidecar.render.references import reference_images

EDIT_ENCODER_PIXELS = 1024 * 1024  # QwenImageEditPipeline's area for the encoder's view of the image


class QwenImageEditRenderer(QwenImageRenderer):
    """Renders Qwen-Image-Edit samples: one reference image each (`ctrl_img`)."""

    spec = QWEN_IMAGE_EDIT
    pipeline_class = QwenImageEditPipeline

    @classmethod
    def from_model(cls, model_source: str | Path, **options: Any) -> Renderer:
        try:
            import torchvision  # noqa: F401
        except ImportError as error:
            raise ModelError(
                f"{cls.spec.label} needs torchvision (transformers' Qwen2-VL processor imports it): "
                "`pip install torchvision` in the build that matches your torch",
                key="name_or_path",
            ) from error
        return super().from_model(model_source, **options)

    def encode_request(self, request: SampleRequest, lora_scale: float | None) -> Embeddings:
        view = self.encoder_view(reference_images(request, limit=self.spec.control_images))
        return {
            "prompt_embeds": self._encode_text(request.prompt, image=view),
            "negative_prompt_embeds": self._encode_text(request.negative_prompt, image=view),
        }

    def encoder_view(self, images: list[Image.Image]) -> Any:
        """What the pipeline hands its text encoder for these references (`__call__`, step 3)."""
        if not images:
            return None
        width, height, _ = pipeline_qwenimage_edit.calculate_dimensions(
            EDIT_ENCODER_PIXELS, images[0].width / images[0].height
        )
        return self.pipe.image_processor.resize(images[0], height, width)

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        arguments = super().call_arguments(batch, embeddings)
        images = reference_images(batch[0], limit=self.spec.control_images)
        if images:
            arguments["image"] = images if self.spec.control_images > 1 else images[0]
        return arguments


class QwenImageEditPlusRenderer(QwenImageEditRenderer):
    """Renders Qwen-Image-Edit-2509 samples: up to three references (`ctrl_img_1..3`)."""

    spec = QWEN_IMAGE_EDIT_PLUS
    pipeline_class = QwenImageEditPlusPipeline

    def encoder_view(self, images: list[Image.Image]) -> Any:
        """Each reference at the pipeline's `CONDITION_IMAGE_SIZE` area (`__call__`, step 3)."""
        if not images:
            return None
        views = []
        for image in images:
            width, height = pipeline_qwenimage_edit_plus.calculate_dimensions(
                pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE, image.width / image.height
            )
            views.append(self.pipe.image_processor.resize(image, height, width))
        return views
