"""Plain diffusers calls for the newer architectures, as the reference their renderer tests compare with.

Each is `DiffusionPipeline.from_pretrained(folder)` with the LoRA loaded by `load_lora_weights`
from the file, the prompt given as text, the seed in a CPU generator, and each model's own
meaning of the sample's settings written out here once (CFG, embedded guidance, Qwen-Image's
true CFG with ai-toolkit's always-present negative). Tiny models, 64 px, two steps, on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EulerAncestralDiscreteScheduler
from diffusers_reference import max_difference, plain_pipeline, render, render_one, sample
from PIL import Image

from sidecar.arch import ARCH_SPECS
from sidecar.plan.request import SampleRequest
from sidecar.render.schedulers import make_scheduler

__all__ = ["max_difference", "plain_call", "reference_image", "render", "render_one", "sample"]

ATTENTION_KWARGS = {
    "sd15": "cross_attention_kwargs",
    "chroma": "joint_attention_kwargs",
    "flux_kontext": "joint_attention_kwargs",
    "flux2": "attention_kwargs",
    "flux2_klein": "attention_kwargs",
    "qwen_image": "attention_kwargs",
    "zimage": "joint_attention_kwargs",
}


def reference_image(
    path: Path, size: tuple[int, int] = (80, 48), color: tuple[int, int, int] = (200, 40, 30)
) -> Path:
    """A control image of another size than the samples, with a gradient so resizing shows."""
    gradient = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :, None]
    pixels = np.broadcast_to(gradient, (size[1], size[0], 3)).copy()
    pixels[..., 0] = color[0]
    Image.fromarray(pixels).save(path)
    return path


def _scheduler(arch: str, sampler: str, pipe: DiffusionPipeline):
    if sampler != ARCH_SPECS[arch].default_sampler:
        return make_scheduler(arch, sampler, pipe.scheduler.config)
    if arch == "sd15":  # euler_a: Euler ancestral on the model's own config, built without sidecar
        return EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe.scheduler


def _texts(requests: Sequence[SampleRequest], field: str) -> str | list[str]:
    texts = [getattr(request, field) for request in requests]
    return texts[0] if len(texts) == 1 else texts


def plain_call(
    folder: Path, arch: str, requests: Sequence[SampleRequest], *, lora: Path | None = None
) -> list[np.ndarray]:
    """One plain diffusers call for `requests` (equal settings, a list of prompts when several)."""
    first = requests[0]
    pipe = plain_pipeline(folder, lora)
    pipe.scheduler = _scheduler(arch, first.sampler, pipe)
    arguments: dict = {"prompt": _texts(requests, "prompt")}
    negative = _texts(requests, "negative_prompt")
    has_negative = any(request.negative_prompt for request in requests)
    if arch in ("sd15", "chroma", "zimage"):  # CFG: "" when no negative, as the pipelines encode it
        arguments.update(
            guidance_scale=first.guidance_scale, negative_prompt=negative if has_negative else None
        )
    elif arch == "qwen_image":  # ai-toolkit: guidance is true CFG, always against a negative
        arguments.update(true_cfg_scale=first.guidance_scale, negative_prompt=negative)
    elif arch == "flux2_klein":  # its `__call__` takes a negative as embeddings only; "" by default
        arguments["guidance_scale"] = first.guidance_scale
        if has_negative:
            embeds, _ids = pipe.encode_prompt(prompt=negative, device=torch.device("cpu"))
            arguments["negative_prompt_embeds"] = embeds
    else:  # Flux.1 Kontext, Flux.2 [dev]: embedded guidance
        arguments["guidance_scale"] = first.guidance_scale
        if first.true_cfg_scale != 1.0:
            arguments.update(true_cfg_scale=first.true_cfg_scale, negative_prompt=negative)
    if first.control_images:
        references = [Image.open(path).convert("RGB") for path in first.control_images]
        if arch == "flux_kontext":  # resized to the sample's size, kept there (ai-toolkit's call)
            arguments.update(
                image=references[0].resize((first.width, first.height), Image.BILINEAR),
                max_area=first.width * first.height,
                _auto_resize=False,
            )
        else:
            arguments["image"] = references
    if arch == "flux_kontext":
        arguments.update(max_area=first.width * first.height, _auto_resize=False)
    if lora is not None:
        arguments[ATTENTION_KWARGS[arch]] = {"scale": first.strength}
    images = pipe(
        height=first.height,
        width=first.width,
        num_inference_steps=first.steps,
        generator=[torch.Generator("cpu").manual_seed(request.seed) for request in requests],
        **arguments,
    ).images
    return [np.asarray(image) for image in images]


# ---------------------------------------------------------------------------------
# The checks every newer architecture's test module runs (`tests/render/test_<arch>.py`).
# ---------------------------------------------------------------------------------


def new_renderer(arch: str, folder: Path):
    from sidecar.render.registry import renderer_class

    return renderer_class(arch).from_model(folder)


def check_base(arch: str, folder: Path, **changes) -> None:
    """The base model, no LoRA: pixel-equal to a plain call."""
    request = sample(arch, **changes)
    np.testing.assert_array_equal(
        render_one(new_renderer(arch, folder), request), plain_call(folder, arch, [request])[0]
    )


def check_batch(arch: str, folder: Path) -> None:
    """Two prompts of different lengths in one call, against a plain call with the list of prompts.

    Within one uint8 level, as for SDXL, SD 3.5 and Flux (`test_renderers.py`): sidecar encodes each
    prompt on its own (to cache it across checkpoints) where the plain call encodes the list at once,
    and CPU kernels are not batch-invariant; padding the sequences wrongly would move pixels far more.
    """
    requests = [sample(arch, index=0), sample(arch, index=1, prompt="a cat", seed=8)]
    images = render(new_renderer(arch, folder), requests, batch_size=2)
    references = plain_call(folder, arch, requests)
    differences = [max_difference(got, want) for got, want in zip(images, references, strict=True)]
    assert max(differences) <= 1, differences
    assert max_difference(images[0], images[1]) > 10


def check_lora(arch: str, folder: Path, lora: Path, **changes) -> None:
    """A LoRA applied by sidecar: pixel-equal to a plain call that loads the same file, and not the base."""
    renderer = new_renderer(arch, folder)
    report = renderer.apply_lora(lora)
    assert report.injected_total > 0
    request = sample(arch, **changes)
    got = render_one(renderer, request)
    np.testing.assert_array_equal(got, plain_call(folder, arch, [request], lora=lora)[0])
    assert max_difference(got, plain_call(folder, arch, [request])[0]) > 0  # the LoRA changes the image


def check_swap(arch: str, folder: Path, first: Path, second: Path) -> None:
    """The next checkpoint of a run goes into the loaded adapter in place and renders as a fresh load."""
    renderer = new_renderer(arch, folder)
    renderer.apply_lora(first)
    render_one(renderer, sample(arch))
    report = renderer.apply_lora(second)
    assert report.hotswapped
    np.testing.assert_array_equal(
        render_one(renderer, sample(arch)), plain_call(folder, arch, [sample(arch)], lora=second)[0]
    )


def check_refused(arch: str, folder: Path, foreign: Path, foreign_label: str) -> None:
    """Another architecture's LoRA is refused, naming both, and the base renders as before."""
    from sidecar.errors import LoraError

    renderer = new_renderer(arch, folder)
    with pytest.raises(LoraError) as caught:
        renderer.apply_lora(foreign)
    message = str(caught.value)
    assert ARCH_SPECS[arch].label in message and foreign_label in message, message
    assert renderer.lora is None
