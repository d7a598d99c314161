"""Plain diffusers calls as the reference every renderer test compares with.

Each reference is an ordinary `DiffusionPipeline.from_pretrained(...)` with the LoRA loaded
through `load_lora_weights(path)` and the seed in a CPU generator, so a renderer that
re-implements, forgets or reorders anything (a LoRA scale, a negative prompt, a seed, the
scheduler's config) gives different pixels. Tiny models, 64x64, two steps, on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
# LoRA formats that apply to no layer (diffusers ignores them without an error): sidecar must raise.
# (kohya SD 3.5, which diffusers ignores too, sidecar converts itself.)
NOT_APPLYING = (("sdxl", "unprefixed"), ("sd3", "unprefixed"), ("flux", "unprefixed"))
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


# ---------------------------------------------------------------------------------
# The merged-weights reference: a LoRA file's change computed from the format's own
# definition, added to a copy of the base weights, rendered with no LoRA at all.
# ---------------------------------------------------------------------------------


def module_delta(tensors: dict[str, torch.Tensor], key: str, *, default_alpha: float | None) -> torch.Tensor:
    """One module's weight change at strength 1, from its factors as the format defines them.

    - LoRA: `up @ down * alpha / rank` (conv downs keep their kernel, ups are 1x1);
    - LoKr: `kron(w1, w2) * alpha / rank`, a factor written `w_a @ w_b` where decomposed; with
      both factors full LyCORIS scales by 1 whatever the alpha;
    - LoHa: `(w1a @ w1b) * (w2a @ w2b) * alpha / rank`.
    """

    def get(name: str) -> torch.Tensor | None:
        return tensors.get(f"{key}.{name}")

    alpha_tensor = get("alpha")
    alpha = float(alpha_tensor) if alpha_tensor is not None else default_alpha
    down = get("lora_down.weight") if get("lora_down.weight") is not None else get("lora_A.weight")
    if down is not None:
        up = get("lora_up.weight") if get("lora_up.weight") is not None else get("lora_B.weight")
        rank = down.shape[0]
        delta = up.flatten(1).double() @ down.flatten(1).double()
        return (delta * ((alpha if alpha is not None else rank) / rank)).reshape(up.shape[0], *down.shape[1:])
    if get("hada_w1_a") is not None:
        rank = get("hada_w1_b").shape[0]
        first = get("hada_w1_a").double() @ get("hada_w1_b").double()
        second = get("hada_w2_a").double() @ get("hada_w2_b").double()
        return first * second * ((alpha if alpha is not None else rank) / rank)

    def factor(index: int) -> torch.Tensor:
        full = get(f"lokr_w{index}")
        if full is not None:
            return full.double()
        return get(f"lokr_w{index}_a").double() @ get(f"lokr_w{index}_b").double()

    w1, w2 = factor(1), factor(2)
    full = get("lokr_w1") is not None and get("lokr_w2") is not None
    rank = None if full else (get("lokr_w1_a") if get("lokr_w1_a") is not None else get("lokr_w2_a")).shape[1]
    scale = 1.0 if full else (alpha if alpha is not None else rank) / rank
    return torch.kron(w1, w2.flatten(1)) * scale  # conv kernels ride along in the columns


def reference_deltas(written, pipe: DiffusionPipeline) -> Iterator[tuple[torch.nn.Module, torch.Tensor]]:
    """(layer, change) of each layer a `WrittenLora` covers, fused rows split by the layers' widths.

    One layer at a time: a LoRA on every layer of a wide model changes as many weights as
    the model has.
    """
    from safetensors.torch import load_file

    from sidecar.testing.lora_plan import peft_alphas, read_metadata

    tensors = load_file(str(written.path))
    alphas = peft_alphas(read_metadata(written.path))
    for key, targets in written.modules.items():
        delta = module_delta(tensors, key, default_alpha=alphas.get(targets[0].component))
        layers = [getattr(pipe, target.component).get_submodule(target.module) for target in targets]
        rows = delta.split([layer.weight.shape[0] for layer in layers])
        for target, part, layer in zip(targets, rows, layers, strict=True):
            if target.swap_halves:
                part = torch.cat(part.chunk(2)[::-1])
            yield layer, part.reshape(layer.weight.shape).float()


def merged_render(
    folder: Path, arch: str, request: SampleRequest, written=None, **call_arguments
) -> np.ndarray:
    """`request` rendered by a plain pipeline whose weights had `written`'s changes added (at the
    request's strength) from the format's own definition; no LoRA is loaded. `written=None`: the base."""
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if written is not None:
        with torch.no_grad():
            for layer, delta in reference_deltas(written, pipe):
                layer.weight.add_(delta * request.strength)
    (image,) = plain_call(folder, arch, [request], pipe=pipe, **call_arguments)
    return image
