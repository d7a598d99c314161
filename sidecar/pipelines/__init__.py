"""Renderers, one file per architecture. Adding one is a file and a line in `RENDERER_PATHS`.

The renderers import torch and diffusers, which take seconds; `sidecar check` and the
sampler tables (`sidecar.pipelines.schedulers`) must not pay for that, so the
renderer classes are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.pipelines.base import Renderer

RENDERER_PATHS: dict[str, str] = {
    "sdxl": "sidecar.pipelines.sdxl:SDXLRenderer",
    "sd3": "sidecar.pipelines.sd3:SD3Renderer",
    "flux": "sidecar.pipelines.flux:FluxRenderer",
}


def renderer_class(arch: str) -> type[Renderer]:
    """The renderer of an architecture; raises naming the known ones."""
    if arch not in RENDERER_PATHS:
        raise KeyError(f"no renderer for architecture {arch!r}; known: {', '.join(sorted(RENDERER_PATHS))}")
    module_name, class_name = RENDERER_PATHS[arch].split(":")
    return getattr(import_module(module_name), class_name)


def __getattr__(name: str) -> object:
    if name == "Renderer":  # `from sidecar.pipelines import Renderer` stays valid
        return import_module("sidecar.pipelines.base").Renderer
    raise AttributeError(name)


__all__ = ["RENDERER_PATHS", "Renderer", "renderer_class"]
