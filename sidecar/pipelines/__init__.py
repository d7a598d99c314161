"""Renderers, one file per architecture. Adding one is a file and a line in `RENDERERS`."""

from __future__ import annotations

from sidecar.pipelines.base import Renderer
from sidecar.pipelines.flux import FluxRenderer
from sidecar.pipelines.sd3 import SD3Renderer
from sidecar.pipelines.sdxl import SDXLRenderer

RENDERERS: dict[str, type[Renderer]] = {
    "sdxl": SDXLRenderer,
    "sd3": SD3Renderer,
    "flux": FluxRenderer,
}


def renderer_class(arch: str) -> type[Renderer]:
    """The renderer of an architecture; raises naming the known ones."""
    if arch not in RENDERERS:
        raise KeyError(f"no renderer for architecture {arch!r}; known: {', '.join(sorted(RENDERERS))}")
    return RENDERERS[arch]


__all__ = ["RENDERERS", "Renderer", "renderer_class"]
