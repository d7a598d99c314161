"""Renderers, one file per architecture: adding one is a file and a line in `RENDERER_PATHS`.

Renderer modules import their diffusers pipeline class; the registry imports a module
only when its architecture is asked for, so one model's process never loads the others.
"""

from __future__ import annotations

import logging
from importlib import import_module

from sidecar.plan.request import ModelSource
from sidecar.render.base import Renderer
from sidecar.render.devices import resolve_device, resolve_dtype
from sidecar.render.memory import MemoryPolicy, Placement, apply_memory_mode

logger = logging.getLogger("sidecar.render")

RENDERER_PATHS: dict[str, str] = {
    "sdxl": "sidecar.render.sdxl:SDXLRenderer",
    "sd3": "sidecar.render.sd3:SD3Renderer",
    "flux": "sidecar.render.flux:FluxRenderer",
}


def renderer_class(arch: str) -> type[Renderer]:
    """The renderer of an architecture; raises naming the known ones."""
    if arch not in RENDERER_PATHS:
        raise KeyError(f"no renderer for architecture {arch!r}; known: {', '.join(sorted(RENDERER_PATHS))}")
    module_name, class_name = RENDERER_PATHS[arch].split(":")
    return getattr(import_module(module_name), class_name)


def load_renderer(
    model: ModelSource,
    *,
    device: str | None = None,
    gpu: int | None = None,
    dtype: str = "auto",
    offload: str = "none",
) -> Renderer:
    """The base model, loaded once and placed on its device in its memory mode.

    Raises `ModelError` naming the `model:` key whose file does not load; the caller
    that knows the config puts the file and line in front.
    """
    torch_device = resolve_device(device=device, gpu=gpu)
    torch_dtype = resolve_dtype(dtype, torch_device)
    renderer = renderer_class(model.arch).from_model(
        model.name_or_path,
        vae_path=model.vae_path,
        text_encoder_paths=dict(model.text_encoder_paths),
        dtype=torch_dtype,
    )
    mode = apply_memory_mode(renderer.pipe, offload, torch_device)
    renderer.placement = Placement(device=torch_device, policy=MemoryPolicy(mode))
    logger.info(
        "loaded %s base %s on %s (%s, offload=%s)",
        renderer.spec.label,
        model.name_or_path,
        torch_device,
        str(torch_dtype).removeprefix("torch."),
        mode,
    )
    return renderer
