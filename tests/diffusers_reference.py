"""Plain diffusers calls as the reference every renderer test compares with.

Each reference is an ordinary `DiffusionPipeline.from_pretrained(...)` with the LoRA loaded
through `load_lora_weights(path)` and the seed in a CPU generator, so a renderer that
re-implements, forgets or reorders anything (a LoRA scale, a negative prompt, a seed, the
scheduler's config) gives different pixels. Tiny models, 64x64, two steps, on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EulerAncestralDiscreteScheduler

from sidecar.arch import ARCH_SPECS
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Renderer
from sidecar.render.schedulers import make_scheduler
from sidecar.testing.loras import LORA_FORMATS

ARCHS = ("sdxl", "sd3", "flux")
SIZE = 64  # pixels: an 8x8 latent
STEPS = 2
PROMPT = "a red fox in the snow"
ATTENTION_KWARGS = {
    "sdxl": "cross_attention_kwargs",
    "sd3": "joint_attention_kwargs",
    "flux": "joint_attention_kwargs",
}
# LoRA formats diffusers ignores without an error: sidecar must raise for them.
NOT_APPLYING = (("sdxl", "unprefixed"), ("sd3", "kohya"), ("sd3", "unprefixed"), ("flux", "unprefixed"))
APPLYING = tuple(
    (arch, fmt) for arch in ARCHS for fmt in LORA_FORMATS[arch] if (arch, fmt) not in NOT_APPLYING
)
TEXT_ENCODER_FORMATS = ("peft", "kohya", "kohya_sgm")  # SDXL


def params(rows, xfails: dict[tuple, str] | None = None) -> list:
    """One `pytest.param` per row, named `a-b-c`; rows in `xfails` are strict xfails with that reason."""
    xfails = xfails or {}
    return [
        pytest.param(
            *row,
            id="-".join(map(str, row)),
            marks=[pytest.mark.xfail(strict=True, reason=xfails[row])] if row in xfails else [],
        )
        for row in rows
    ]


def sample(arch: str, **changes) -> SampleRequest:
    """A request with the architecture's default sampler and guidance, small and short."""
    spec = ARCH_SPECS[arch]
    fields = {
        "index": 0,
        "prompt": PROMPT,
        "negative_prompt": "",
        "width": SIZE,
        "height": SIZE,
        "steps": STEPS,
        "guidance_scale": spec.default_guidance,
        "true_cfg_scale": 1.0,
        "sampler": spec.default_sampler,
        "seed": 7,
        "strength": 1.0,
    }
    fields.update(changes)
    return SampleRequest(**fields)


def render(renderer: Renderer, requests: Sequence[SampleRequest], *, batch_size: int = 1) -> list[np.ndarray]:
    return [np.asarray(image) for _, image in renderer.render(requests, batch_size=batch_size)]


def render_one(renderer: Renderer, request: SampleRequest) -> np.ndarray:
    (image,) = render(renderer, [request])
    return image


def max_difference(first: np.ndarray, second: np.ndarray) -> int:
    return int(np.abs(first.astype(np.int16) - second.astype(np.int16)).max())


def plain_pipeline(folder: Path, lora: Path | None = None) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="reference")  # from the file: keeps lora_alpha
    return pipe


def reference_scheduler(arch: str, sampler: str, pipe: DiffusionPipeline):
    """The scheduler of a plain call. The default sampler is built without sidecar: SDXL's
    `euler_a` is Euler ancestral on the model's own config, the flow models' `flowmatch` is
    the scheduler they ship with; other samplers go through `make_scheduler`."""
    if sampler != ARCH_SPECS[arch].default_sampler:
        return make_scheduler(arch, sampler, pipe.scheduler.config)
    if arch == "sdxl":
        return EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe.scheduler


def plain_call(
    folder: Path,
    arch: str,
    requests: Sequence[SampleRequest],
    *,
    lora: Path | None = None,
    pipe: DiffusionPipeline | None = None,
    **call_arguments,
) -> list[np.ndarray]:
    """One plain diffusers call for `requests` (equal settings): prompts as a list when several."""
    first = requests[0]
    pipe = pipe or plain_pipeline(folder, lora)
    pipe.scheduler = reference_scheduler(arch, first.sampler, pipe)
    single = len(requests) == 1
    if "prompt_embeds" not in call_arguments:
        negatives = [request.negative_prompt for request in requests]
        call_arguments["prompt"] = first.prompt if single else [request.prompt for request in requests]
        call_arguments["negative_prompt"] = (
            (negatives[0] if single else negatives) if any(negatives) else None
        )
    if lora is not None:
        call_arguments[ATTENTION_KWARGS[arch]] = {"scale": first.strength}
    if first.true_cfg_scale != 1.0:
        call_arguments["true_cfg_scale"] = first.true_cfg_scale
    images = pipe(
        height=first.height,
        width=first.width,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(request.seed) for request in requests],
        **call_arguments,
    ).images
    return [np.asarray(image) for image in images]
