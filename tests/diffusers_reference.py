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
NOT_APPLYING = (("sdxl", "unprefixed"), ("sd3", "unprefixed"), ("flux", "unprefixed"))
# kohya SD 3.5: diffusers ignores it too; sidecar converts it (`render/adapters/convert_kohya.py`).
CONVERTED_BY_SIDECAR = (("sd3", "kohya"),)
# Formats diffusers applies itself, so a plain call with the file is the reference.
APPLYING = tuple(
    (arch, fmt)
    for arch in ARCHS
    for fmt in LORA_FORMATS[arch]
    if (arch, fmt) not in NOT_APPLYING + CONVERTED_BY_SIDECAR
)
SIDECAR_APPLYING = APPLYING + CONVERTED_BY_SIDECAR  # what sidecar's renderers apply
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
        delta = up.flatten(1).float() @ down.flatten(1).float()
        return (delta * ((alpha if alpha is not None else rank) / rank)).reshape(up.shape[0], *down.shape[1:])
    if get("hada_w1_a") is not None:
        rank = get("hada_w1_b").shape[0]
        first = get("hada_w1_a").float() @ get("hada_w1_b").float()
        second = get("hada_w2_a").float() @ get("hada_w2_b").float()
        return first * second * ((alpha if alpha is not None else rank) / rank)

    def factor(index: int) -> torch.Tensor:
        full = get(f"lokr_w{index}")
        if full is not None:
            return full.float()
        return get(f"lokr_w{index}_a").float() @ get(f"lokr_w{index}_b").float()

    w1, w2 = factor(1), factor(2)
    full = get("lokr_w1") is not None and get("lokr_w2") is not None
    rank = None if full else (get("lokr_w1_a") if get("lokr_w1_a") is not None else get("lokr_w2_a")).shape[1]
    scale = 1.0 if full else (alpha if alpha is not None else rank) / rank
    return torch.kron(w1, w2.flatten(1)) * scale  # conv kernels ride along in the columns


def reference_deltas(
    written, pipe: DiffusionPipeline
) -> Iterator[tuple[tuple[str, str], torch.nn.Module, torch.Tensor]]:
    """((component, name), layer, change) of each layer a `WrittenLora` covers, fused rows
    split by the layers' widths.

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
            yield (target.component, target.module), layer, part.reshape(layer.weight.shape)


def merged_render(
    folder: Path, arch: str, request: SampleRequest, written=None, *, pipe=None, **call_arguments
) -> np.ndarray:
    """`request` rendered by a plain pipeline whose weights had `written`'s changes added (at the
    request's strength) from the format's own definition; no LoRA is loaded. `written=None`: the base.

    With `pipe` (a plain pipeline kept between renders) the changed layers get their base
    weights back from the model's files after the render.
    """
    fresh = pipe is None
    if fresh:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
    changed: list[tuple[str, str]] = []
    if written is not None:
        with torch.no_grad():
            for (component, name), layer, delta in reference_deltas(written, pipe):
                layer.weight.add_(delta * request.strength)
                changed.append((component, name))
    try:
        (image,) = plain_call(folder, arch, [request], pipe=pipe, **call_arguments)
    finally:
        if changed and not fresh:
            restore_base_weights(pipe, folder, changed)
    return image


def restore_base_weights(pipe: DiffusionPipeline, folder: Path, layers: list[tuple[str, str]]) -> None:
    """Copy the saved base weights of `layers` back into `pipe`."""
    from safetensors import safe_open

    wanted: dict[str, dict[str, torch.nn.Module]] = {}
    for component, name in layers:
        wanted.setdefault(component, {})[f"{name}.weight"] = getattr(pipe, component).get_submodule(name)
    with torch.no_grad():
        for component, tensors in wanted.items():
            for path in sorted((folder / component).glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                        if key in tensors:
                            tensors[key].weight.copy_(handle.get_tensor(key))


# ---------------------------------------------------------------------------------
# Every trainer's format against the merged reference (tests/render/test_formats_*.py)
# ---------------------------------------------------------------------------------

SHORT_T5 = 32  # T5 tokens in the format tests: a LoRA's weights do not depend on the prompt length
MAX_DIFFERENCE = 2  # of 255: sidecar's image against the merged reference
MIN_CHANGE = 0.3  # mean pixel change a LoRA must cause against the base render
# Formats diffusers loads by itself from the file: its own render must match the reference too.
DIFFUSERS_LOADS = {
    ("sdxl", "peft"),
    ("sdxl", "kohya"),
    ("sdxl", "kohya_sgm"),
    ("sdxl", "onetrainer_legacy"),
    ("sdxl", "lycoris_locon"),
    ("sd3", "peft"),
    ("flux", "peft"),
    ("flux", "kohya"),
    ("flux", "kohya_split_qkv"),
    ("flux", "onetrainer"),
}


def short_t5(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Renderers and plain calls encode SHORT_T5 tokens: the wide T5 widths stay, the cost goes."""
    monkeypatch.setattr("sidecar.render.flux.T5_MAX_SEQUENCE_LENGTH", SHORT_T5)
    monkeypatch.setattr("sidecar.render.sd3.T5_MAX_SEQUENCE_LENGTH", SHORT_T5)
    return {"max_sequence_length": SHORT_T5}


def mean_change(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first.astype(np.int16) - second.astype(np.int16)).mean())


class FormatBench:
    """One model's sidecar renderer and plain reference pipeline, kept for every format checked.

    Loading a wide model costs more than rendering it once, so both stay loaded: the renderer
    swaps from one format to the next (as a user switching LoRAs), the reference pipeline
    takes each file's changes into its weights for one render and gives them back.
    """

    def __init__(
        self,
        folder: Path,
        arch: str,
        request: SampleRequest,
        call_arguments: dict,
        *,
        diffusers_checks: set[tuple[str, str]] | None = None,
    ) -> None:
        from sidecar.render.registry import renderer_class

        self.folder, self.arch, self.request, self.call_arguments = folder, arch, request, call_arguments
        self.diffusers_checks = DIFFUSERS_LOADS if diffusers_checks is None else diffusers_checks
        self.reference = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        self.reference.set_progress_bar_config(disable=True)
        self.renderer = renderer_class(arch).from_model(folder)
        self.base = self.merged(None)

    def merged(self, written) -> np.ndarray:
        return merged_render(
            self.folder, self.arch, self.request, written, pipe=self.reference, **self.call_arguments
        )

    def check(self, lora_format: str, path: Path) -> int:
        """Write `lora_format`, render it with sidecar and merged into the weights; assert they match,
        that both differ from the base, and that diffusers' own load matches where it loads the
        format. Returns the largest pixel difference seen."""
        from sidecar.testing.trainer_loras import write_trainer_lora

        written = write_trainer_lora(self.folder, self.arch, path, lora_format)
        report = self.renderer.apply_lora(written.path)
        assert report.injected_total > 0
        ours = render_one(self.renderer, self.request)
        merged = self.merged(written)
        difference = max_difference(ours, merged)
        label = f"{self.arch} {lora_format}"
        assert difference <= MAX_DIFFERENCE, (
            f"{label}: sidecar differs from the merged weights by {difference}"
        )
        assert mean_change(merged, self.base) > MIN_CHANGE, f"{label}: the LoRA changes nothing"
        assert mean_change(ours, self.base) > MIN_CHANGE
        if (self.arch, lora_format) in self.diffusers_checks:
            plain = self.diffusers_render(written.path)
            assert max_difference(plain, merged) <= MAX_DIFFERENCE, f"diffusers' load of {label} differs"
            difference = max(difference, max_difference(plain, merged))
        return difference

    def diffusers_render(self, path: Path) -> np.ndarray:
        """diffusers loading the file itself onto the reference pipeline, unloaded after."""
        self.reference.load_lora_weights(str(path), adapter_name="reference")
        try:
            (image,) = plain_call(
                self.folder, self.arch, [self.request], lora=path, pipe=self.reference, **self.call_arguments
            )
        finally:
            self.reference.unload_lora_weights()
        return image
