"""FLUX.1 Kontext: Flux.1 that also reads a reference image, rendered at the sample's own size.

Prompts encode exactly as on Flux.1 (`FluxRenderer`). The reference is resized to the
sample's width and height, and the pipeline is told to keep them: by default
`FluxKontextPipeline` renders at about 1 MP (`max_area`) and snaps the reference to one of
its preferred resolutions (`_auto_resize`), which would give images of another size than
the trainer's. That is ai-toolkit's call (`flux_kontext.py`, `generate_single_image`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffusers import FluxKontextPipeline

from sidecar.arch.specs import FLUX_KONTEXT
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Embeddings
from sidecar.render.flux import FluxRenderer
from sidecar.render.references import reference_images


class FluxKontextRenderer(FluxRenderer):
    """Renders Kontext samples; a sample without a control image renders from the text alone."""

    spec = FLUX_KONTEXT
    pipeline_class = FluxKontextPipeline

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        first = batch[0]  # a batch shares its control image (`SampleRequest.batch_key`)
        arguments = super().call_arguments(batch, embeddings)
        arguments.update(max_area=first.width * first.height, _auto_resize=False)
        images = reference_images(first, limit=self.spec.control_images)
        if images:
            arguments["image"] = images[0]
        return arguments
