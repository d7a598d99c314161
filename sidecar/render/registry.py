"""Renderers, one file per architecture: adding one is a file and a line in `RENDERER_PATHS`.

Renderer modules import their diffusers pipeline class; the registry imports a module
only when its architecture is asked for, so one model's process never loads the others.
"""

from __future__ import annotations

import logging
from importlib import import_module

from sidecar.plan.request import ModelSource
from sidecar.render.base import Renderer
from sidecar.render.compile import compile_backbone
from sidecar.render.devices import resolve_device, resolve_dtype
from sidecar.render.memory import Placement, plan_pipeline
from sidecar.render.memory_plan import MEGAPIXEL
from sidecar.render.quantize import quantization_type, quantize_backbone

logger = logging.getLogger("sidecar.render")

RENDERER_PATHS: dict[str, str] = {
    "sdxl": "sidecar.render.sdxl:SDXLRenderer",
    "sd3": "sidecar.render.sd3:SD3Renderer",
    "flux": "sidecar.render.flux:FluxRenderer",
    "sd15": "sidecar.render.sd15:SD15Renderer",
    "chroma": "sidecar.render.chroma:ChromaRenderer",
    "flux_kontext": "sidecar.render.flux_kontext:FluxKontextRenderer",
    "flux2": "sidecar.render.flux2:Flux2Renderer",
    "flux2_klein": "sidecar.render.flux2:Flux2KleinRenderer",
    "qwen_image": "sidecar.render.qwen_image:QwenImageRenderer",
    "qwen_image_edit": "sidecar.render.qwen_image_edit:QwenImageEditRenderer",
    "qwen_image_edit_plus": "sidecar.render.qwen_image_edit:QwenImageEditPlusRenderer",
    "zimage": "sidecar.render.zimage:ZImageRenderer",
    "wan": "sidecar.render.wan:WanRenderer",
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
    pixels: int = MEGAPIXEL,
    batch_size: int = 1,
    lora_rank: int | None = None,
    compile: bool = False,
) -> Renderer:
    """The base model, loaded once and placed on its device in its memory mode.

    `offload=auto` takes the memory plan's mode for the card (`memory_plan.py`), made for
    samples of `pixels` (width x height of the largest) in batches of `batch_size`, and a
    LoRA of `lora_rank`. `compile` compiles the backbone's repeated blocks (`compile.py`).
    Raises `ModelError` naming the `model:` key whose file does not load; the caller that
    knows the config puts the file and line in front.
    """
    torch_device = resolve_device(device=device, gpu=gpu)
    torch_dtype = resolve_dtype(dtype, torch_device)
    qtype = quantization_type(model.quantize)
    renderer = renderer_class(model.arch).from_model(
        model.name_or_path,
        vae_path=model.vae_path,
        text_encoder_paths=dict(model.text_encoder_paths),
        dtype=torch_dtype,
    )
    if qtype is not None:  # in CPU RAM, before anything reaches the card (ai-toolkit's low_vram way)
        quantize_backbone(renderer.backbone, qtype)
    plan = plan_pipeline(
        renderer.pipe,
        quantize=qtype,
        low_vram=model.low_vram,
        pixels=pixels,
        batch_size=batch_size,
        lora_rank=lora_rank,
    )
    if model.low_vram and offload == "none":
        offload = "auto"  # the plan starts at `model` offload: never the whole pipeline on the card
    renderer.placement = Placement.place(
        renderer.pipe,
        offload,
        torch_device,
        plan=plan,
        encoder_names=renderer.encoder_components,
    )
    logger.info(
        "loaded %s base %s on %s (%s%s, offload=%s%s)",
        renderer.spec.label,
        model.name_or_path,
        torch_device,
        str(torch_dtype).removeprefix("torch."),
        f", backbone in {qtype}" if qtype else "",
        renderer.placement.mode,
        ", text encoders on the CPU" if renderer.placement.encoders_on_cpu else "",
    )
    if compile:
        compile_backbone(renderer, mode=renderer.placement.mode)
    return renderer
