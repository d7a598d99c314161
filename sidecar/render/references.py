"""Reference (control) images of a sample, as the edit models' pipelines take them.

ai-toolkit resizes a sample's control image to the sample's own width and height (bilinear)
before it calls FLUX.1 Kontext or Qwen-Image-Edit (`generate_single_image` in
`extensions_built_in/diffusion_models/flux_kontext/flux_kontext.py` and
`qwen_image/qwen_image_edit.py`); sidecar does the same, so its samples are the trainer's.
`sidecar check` has already said when a file is missing; one deleted since is an error here.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sidecar.errors import SidecarError
from sidecar.plan.request import SampleRequest


def open_reference(path: str | Path) -> Image.Image:
    """One reference image in RGB, read fully (the file may go away after)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise SidecarError(f"control image {path}: cannot be read ({error})") from error


def reference_images(request: SampleRequest, *, limit: int, resize: bool = True) -> list[Image.Image]:
    """The request's first `limit` control images, resized to the sample's size when `resize`."""
    images = [open_reference(path) for path in request.control_images[:limit]]
    if resize:
        size = (request.width, request.height)
        images = [image if image.size == size else image.resize(size, Image.BILINEAR) for image in images]
    return images
