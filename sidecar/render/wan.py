"""Wan 2.1 and 2.2: text-to-video and image-to-video, one renderer for both.

The base folder's `model_index.json` says which pipeline it is (`WanPipeline` or
`WanImageToVideoPipeline`); 2.2 A14B models carry a second expert, `transformer_2`, and the
`boundary_ratio` where denoising switches to it (the pipeline's own loop does the switching).
Their LoRAs go to either or both experts as each trainer writes them (`wan_experts.py`).

A sample with `num_frames` > 1 comes back as its list of frames (publishing writes the
animated WebP and the MP4); one frame is a still image, as in ai-toolkit, which samples Wan as
images when `num_frames` is 1. Image-to-video takes its start frame from the sample: musubi's
`--i`, else ai-toolkit's `ctrl_img`; the pipeline resizes it to the sample's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from diffusers import DiffusionPipeline, WanImageToVideoPipeline, WanPipeline
from PIL import Image

from sidecar.arch.specs import WAN
from sidecar.errors import SidecarError
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Embeddings, EventCallback, Renderer, _no_event
from sidecar.render.wan_experts import LOW_NOISE, ExpertSlot

MAX_SEQUENCE_LENGTH = 512  # the pipelines' `__call__` default; kept so frames equal a plain call's
# The flow shift under FlowMatch's name: Wan's published flow UniPC config calls it `flow_shift`.
SHIFT_KEY, FLOW_SHIFT_KEY = "shift", "flow_shift"


def pipeline_class_of(model_source: str | Path) -> type[DiffusionPipeline]:
    """`WanImageToVideoPipeline` when the model's `model_index.json` names it, else `WanPipeline`
    (a single file, or a folder that does not say)."""
    path = Path(model_source).expanduser()
    if path.is_file():
        return WanPipeline
    try:
        config = DiffusionPipeline.load_config(str(model_source), local_files_only=True)
    except (OSError, ValueError):
        return WanPipeline  # `load_base_pipeline` says what is wrong with the source
    return (
        WanImageToVideoPipeline
        if config.get("_class_name") == WanImageToVideoPipeline.__name__
        else WanPipeline
    )


class WanRenderer(Renderer):
    """Renders Wan text-to-video samples (and images, at one frame)."""

    spec = WAN
    pipeline_class: ClassVar[type[DiffusionPipeline]] = WanPipeline
    attention_kwargs = "attention_kwargs"
    text_encoder_keys: ClassVar[dict[str, str]] = {}

    def __init__(
        self, pipe: DiffusionPipeline, *, base_model: str, on_event: EventCallback = _no_event
    ) -> None:
        super().__init__(pipe, base_model=base_model, on_event=on_event)
        config = self.base_scheduler_config
        if SHIFT_KEY not in config and FLOW_SHIFT_KEY in config:
            config[SHIFT_KEY] = config[FLOW_SHIFT_KEY]  # `flowmatch` keeps the model's shift
        if getattr(pipe, LOW_NOISE, None) is not None:
            self.adapter = ExpertSlot(pipe, spec=self.spec)  # type: ignore[assignment]

    @classmethod
    def from_model(cls, model_source: str | Path, **options: Any) -> Renderer:
        """Load the base as the pipeline its folder names: image-to-video models get that renderer."""
        chosen = (
            WanImageToVideoRenderer if pipeline_class_of(model_source) is WanImageToVideoPipeline else cls
        )
        return Renderer.from_model.__func__(chosen, model_source, **options)  # type: ignore[attr-defined]

    @property
    def two_experts(self) -> bool:
        return getattr(self.pipe, LOW_NOISE, None) is not None

    def encode(self, prompt: str, negative_prompt: str, lora_scale: float | None) -> Embeddings:
        """UMT5 states of the prompt and the negative (the empty prompt's when there is none):
        Wan runs CFG whenever `guidance_scale` > 1."""
        embeds, negative = self.pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=True,
            num_videos_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=self.encode_device,
        )
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        first = batch[0]
        return {
            **embeddings,
            "guidance_scale": first.guidance_scale,
            "num_frames": first.num_frames,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }

    def outputs(self, batch: Sequence[SampleRequest], output: Any) -> Sequence[Any]:
        """Each video's frames; at one frame, the still image."""
        return [
            frames if request.num_frames > 1 else frames[0]
            for request, frames in zip(batch, output.frames, strict=True)
        ]


class WanImageToVideoRenderer(WanRenderer):
    """Renders Wan image-to-video samples from the start frame each sample names."""

    pipeline_class: ClassVar[type[DiffusionPipeline]] = WanImageToVideoPipeline

    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        return {**super().call_arguments(batch, embeddings), "image": start_image(batch[0])}


def start_image(request: SampleRequest) -> Image.Image:
    """The sample's start frame (musubi `--i`, else the first `ctrl_img`), as RGB."""
    path = request.init_image or (request.control_images[0] if request.control_images else None)
    if path is None:
        raise SidecarError(
            f"sample {request.index}: an image-to-video Wan model needs a start image; set `ctrl_img` "
            "on the sample (ai-toolkit) or `--i PATH` in its prompt line (musubi)"
        )
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise SidecarError(f"sample {request.index}: cannot read the start image {path}: {error}") from error
