"""The memory plan: before anything loads, what fits on the card, in which offload mode, and why.

`sidecar check CONFIG --vram 12GiB` prints it; `--offload auto` follows it. It adds up, per
phase of a render (encoding the prompts, denoising, decoding), the weights each offload
mode keeps on the card (`model_sizes.py`, from the safetensors headers) and the working
memory of that phase (`WORKLOADS`, per megapixel of the largest sample), and picks the
fastest mode whose peak fits the card's free memory with `ALLOCATOR_SLACK` to spare.

Two choices ride along:
- `encoders_on_cpu`: prompt embeddings are encoded once per prompt list and cached, so the
  text encoders (Flux's T5 alone is ~9.5 GB in bf16) need the card only for that first
  encode. When a mode fits only without them, they encode on the CPU and stay there.
- `low_vram: true` (ai-toolkit's "the GPU drives your monitors"): ai-toolkit then keeps its
  big components in CPU RAM and moves each to the GPU only while it runs
  (`toolkit/stable_diffusion_model.py`, `extensions_built_in/diffusion_models/*`), which is
  diffusers' model offload; the plan starts at `model` and never picks `none`.

No torch here: `sidecar check` stays light.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sidecar.arch import ARCH_SPECS, Workload
from sidecar.plan.request import ModelSource
from sidecar.render.model_sizes import (
    BACKBONE,
    COMPONENTS,
    LORA,
    RUN_DTYPE_BYTES,
    TEXT_ENCODER,
    VAE,
    ComponentSize,
    locate_components,
    lora_size,
    quantization_type,
    size_component,
)
from sidecar.settings import DTYPE_ALIASES
from sidecar.weights import TensorInfo

GIB = 1024**3
MODES = ("none", "model", "group", "sequential")  # fastest first; the OOM fallback's order
MEGAPIXEL = 1024 * 1024
DEFAULT_LORA_RANK = 16  # ai-toolkit's example configs; used when neither a file nor `network.linear` says
# Working memory is measured by torch as allocated bytes; the card also needs room for the
# caching allocator's fragmentation and cuBLAS workspaces (a share of the peak) ...
ALLOCATOR_SLACK = 0.10
# ... and, when planning for a card by its size (`--vram`), for the CUDA context sidecar
# creates (the free memory of a real card is read after it exists).
CUDA_CONTEXT_BYTES = GIB // 2
VAE_TILE_PIXELS = 1024 * 1024  # diffusers tiles a decode larger than the VAE's sample_size (1024 px)


# Per architecture, estimated from its widths: `sidecar.arch.ArchSpec.workload`.
WORKLOADS: dict[str, Workload] = {name: spec.workload for name, spec in ARCH_SPECS.items()}


@dataclass(frozen=True)
class ModeEstimate:
    """The peak one offload mode is estimated to reach, and in which phase."""

    mode: str
    encoders_on_cpu: bool
    peak_bytes: int
    phase: str  # "encode", "denoise" or "decode"


@dataclass(frozen=True)
class MemoryPlan:
    """What each offload mode needs for this model, and the mode `auto` takes on the card."""

    arch: str
    dtype: str
    quantize: str | None
    low_vram: bool
    components: tuple[ComponentSize, ...]
    missing: tuple[str, ...]  # components found in no file: left out of every figure
    pixels: int
    batch_size: int
    estimates: tuple[ModeEstimate, ...]  # every mode, with and without encoders on the card
    card_bytes: int | None = None  # free memory planned for (None: no card given)
    card_label: str = ""
    chosen: ModeEstimate | None = None
    reason: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def estimate(self, mode: str, *, encoders_on_cpu: bool = False) -> ModeEstimate:
        for estimate in self.estimates:
            if estimate.mode == mode and estimate.encoders_on_cpu == encoders_on_cpu:
                return estimate
        raise KeyError(mode)

    def component(self, name: str) -> ComponentSize:
        return next(c for c in self.components if c.name == name)

    @property
    def mode(self) -> str | None:
        return self.chosen.mode if self.chosen else None

    def summary(self) -> str:
        """One line for a log or an error: the peaks per mode against the card."""
        peaks = ", ".join(f"{e.mode} {gib(e.peak_bytes)}" for e in self.estimates if not e.encoders_on_cpu)
        card = f"; {gib(self.card_bytes)} free on {self.card_label}" if self.card_bytes is not None else ""
        return f"estimated peaks: {peaks}{card}"


def gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f} GiB"


def parse_size(text: str) -> int:
    """`12GiB`, `16G`, `24 GB`, `11.5gib` -> bytes (GB and G are read as GiB, as cards are sold)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"`--vram` must be a size such as 12GiB or 16G, got {text!r}")
    number, unit = float(match.group(1)), match.group(2) or "gib"
    scale = GIB if unit.startswith("g") else 1024**2
    if number <= 0:
        raise ValueError(f"`--vram` must be > 0, got {text!r}")
    return int(number * scale)


def _peaks(
    sizes: Mapping[str, ComponentSize], workload: Workload, *, pixels: int, batch: int, run_bytes: int
) -> list[ModeEstimate]:
    scale = run_bytes / 2
    denoise = int(workload.denoise_bytes_per_mp * pixels / MEGAPIXEL * batch * scale)
    decode_full = int(workload.decode_bytes_per_mp * pixels / MEGAPIXEL * batch * scale)
    decode_tiled = int(workload.decode_bytes_per_mp * min(pixels, VAE_TILE_PIXELS) / MEGAPIXEL * scale)
    encode = int(workload.encode_bytes * scale)
    by_role: dict[str, list[ComponentSize]] = {}
    for size in sizes.values():
        by_role.setdefault(size.role, []).append(size)

    def total(role: str, attribute: str = "bytes", *, pick=sum) -> int:
        values = [getattr(size, attribute) for size in by_role.get(role, [])]
        return pick(values) if values else 0

    estimates = []
    for on_cpu in (False, True):
        for mode in MODES:
            if mode == "none":
                resident = total(BACKBONE) + total(LORA) + total(VAE)
                phases = {"denoise": resident + denoise, "decode": resident + decode_full}
                if not on_cpu:  # encoding: the text encoders join everything else on the card
                    phases["encode"] = resident + total(TEXT_ENCODER) + encode
            elif mode == "model":  # one component at a time; offload modes tile and slice the VAE
                phases = {
                    "denoise": total(BACKBONE) + total(LORA) + denoise,
                    "decode": total(VAE) + decode_tiled,
                }
                if not on_cpu:
                    phases["encode"] = total(TEXT_ENCODER, pick=max) + encode
            else:
                attribute = "group_bytes" if mode == "group" else "layer_bytes"
                phases = {
                    "denoise": total(BACKBONE, attribute) + total(LORA, attribute) + denoise,
                    "decode": total(VAE, attribute) + decode_tiled,
                }
                if not on_cpu:
                    phases["encode"] = total(TEXT_ENCODER, attribute, pick=max) + encode
            phase = max(phases, key=phases.__getitem__)
            estimates.append(ModeEstimate(mode, on_cpu, phases[phase], phase))
    return estimates


def needed_bytes(estimate: ModeEstimate) -> int:
    """Free memory a mode needs: its peak plus the allocator's slack."""
    return int(estimate.peak_bytes * (1 + ALLOCATOR_SLACK))


def choose(plan: MemoryPlan, free_bytes: int, *, label: str) -> MemoryPlan:
    """The plan with the fastest mode that fits `free_bytes`, and why the faster ones do not."""
    floor = MODES.index("model") if plan.low_vram else 0
    chosen, tried = None, []
    for mode in MODES[floor:]:
        for on_cpu in (False, True):
            estimate = plan.estimate(mode, encoders_on_cpu=on_cpu)
            if chosen is None and needed_bytes(estimate) <= free_bytes:
                chosen = estimate
            elif chosen is None:
                tried.append(estimate)
    why = [
        f"{e.mode}{' with text encoders on the CPU' if e.encoders_on_cpu else ''} would need "
        f"{gib(needed_bytes(e))} at {e.phase}"
        for e in tried
    ]
    if plan.low_vram:
        why.insert(0, "`low_vram: true`: never none")
    if chosen is None:
        chosen = plan.estimate("sequential", encoders_on_cpu=True)
        reason = f"nothing fits in {gib(free_bytes)} free; " + "; ".join(why)
    else:
        where = ", text encoders encode on the CPU and stay there" if chosen.encoders_on_cpu else ""
        reason = f"{chosen.mode}{where}: needs {gib(needed_bytes(chosen))} of {gib(free_bytes)} free"
        reason += f" ({'; '.join(why)})" if why else ""
    return replace(plan, card_bytes=free_bytes, card_label=label, chosen=chosen, reason=reason)


def plan_memory(
    arch: str,
    name_or_path: str,
    *,
    vae_path: str | None = None,
    text_encoder_paths: Mapping[str, str | None] | None = None,
    **options: Any,
) -> MemoryPlan:
    """The plan for a base model as the config names it, from its files' headers.

    Raises `ModelError` (with the config key) when a file is not there. `options` are
    those of `plan_from_tensors`.
    """
    found = locate_components(arch, name_or_path, vae_path=vae_path, text_encoder_paths=text_encoder_paths)
    return plan_from_tensors(arch, found, **options)


def plan_from_tensors(
    arch: str,
    found: Mapping[str, tuple[Mapping[str, TensorInfo], str]],
    *,
    dtype: str = "bf16",
    quantize: str | None = None,
    low_vram: bool = False,
    pixels: int = MEGAPIXEL,
    batch_size: int = 1,
    lora_bytes: int | None = None,
    lora_rank: int | None = None,
) -> MemoryPlan:
    """The plan from each component's tensors: `{component: (tensors, where they were read)}`.

    `dtype` is the dtype the weights run in (`bf16`, `fp16`, `fp32`; resolve `auto` first);
    `quantize` a quantization type (`quantize.py`) or None; `pixels` the largest sample's
    width x height. The LoRA is `lora_bytes` when a file is known, else a rank-`lora_rank`
    LoRA on every Linear of the backbone.
    """
    if dtype not in RUN_DTYPE_BYTES:
        raise ValueError(f"`dtype` must be one of {', '.join(RUN_DTYPE_BYTES)}, got {dtype!r}")
    run_bytes = RUN_DTYPE_BYTES[dtype]
    sizes: dict[str, ComponentSize] = {}
    for name, role in COMPONENTS[arch].items():
        if name in found:
            tensors, where = found[name]
            quantized = quantize is not None and role == BACKBONE
            sizes[name] = size_component(
                name, role, tensors, run_bytes=run_bytes, quantized=quantized, source=where
            )
    backbone = next(name for name, role in COMPONENTS[arch].items() if role == BACKBONE)
    if backbone in found:
        rank = lora_rank or DEFAULT_LORA_RANK
        size = lora_bytes
        if size is None:
            size = lora_size(found[backbone][0], rank=rank, run_bytes=run_bytes)
        source = (
            "the LoRA file" if lora_bytes is not None else f"rank {rank} on every Linear of the {backbone}"
        )
        # The LoRA's layers sit in the backbone's blocks: group offload holds the same share of
        # it as of the backbone; sequential one layer's pair (negligible).
        share = sizes[backbone].group_bytes / max(sizes[backbone].bytes, 1)
        sizes[LORA] = ComponentSize(LORA, LORA, size // run_bytes, size, int(size * share), 0, source)
    missing = tuple(name for name in COMPONENTS[arch] if name not in found)
    return MemoryPlan(
        arch=arch,
        dtype=dtype,
        quantize=quantize,
        low_vram=low_vram,
        components=tuple(sizes.values()),
        missing=missing,
        pixels=pixels,
        batch_size=batch_size,
        estimates=tuple(_peaks(sizes, WORKLOADS[arch], pixels=pixels, batch=batch_size, run_bytes=run_bytes)),
        notes=tuple(f"`{name}` found in no file: left out of every figure" for name in missing),
    )


def format_plan(plan: MemoryPlan) -> str:
    """The plan as `sidecar check` prints it."""
    quantized = f", backbone in {plan.quantize} weights" if plan.quantize else ""
    side = int(plan.pixels**0.5)
    lines = [
        f"memory plan ({plan.dtype}{quantized}; activations for {side}x{side} px, batch {plan.batch_size}):",
    ]
    for size in plan.components:
        lines.append(
            f"  {size.name:<15} {gib(size.bytes):>10}  {size.parameters / 1e9:6.2f} B params  ({size.source})"
        )
    lines.append("  estimated peak VRAM per offload mode (text encoders on the card / on the CPU):")
    for mode in MODES:
        on_card, on_cpu = plan.estimate(mode), plan.estimate(mode, encoders_on_cpu=True)
        lines.append(
            f"    {mode:<11} {gib(on_card.peak_bytes):>10} at {on_card.phase:<8}"
            f" / {gib(on_cpu.peak_bytes):>10} at {on_cpu.phase}"
        )
    if plan.low_vram:
        lines.append(
            "  low_vram: true: each component waits in CPU RAM until it runs (offload model or stronger)"
        )
    lines.extend(f"  note: {note}" for note in plan.notes)
    if plan.chosen is not None:
        lines.append(f"  auto on {plan.card_label}: {plan.reason}")
    else:
        lines.append("  give --gpu N or --vram SIZE to see which mode `--offload auto` picks")
    return "\n".join(lines)


def check_report(
    model: ModelSource,
    *,
    dtype: str = "auto",
    pixels: int = MEGAPIXEL,
    batch_size: int = 1,
    lora_rank: int | None = None,
    gpu: int | None = None,
    vram: str | None = None,
) -> str:
    """The memory section of `sidecar check`: the plan, and `auto`'s pick for a card.

    `vram` plans for a CUDA card of that size on any machine (`auto` dtype: bf16, as on the
    card); `gpu` reads the free memory of a real card (torch is imported only then).
    Raises `ModelError` when a file is missing.
    """
    run_dtype = DTYPE_ALIASES.get(dtype, dtype)
    label = ""
    free_bytes = None
    if gpu is not None:
        from sidecar.render.devices import card_memory

        run_dtype, free_bytes, label = card_memory(gpu, dtype)
    elif vram is not None:
        total = parse_size(vram)
        free_bytes, label = max(total - CUDA_CONTEXT_BYTES, 0), f"a {gib(total)} card"
    if run_dtype == "auto":
        run_dtype = "bf16"
    plan = plan_memory(
        model.arch,
        model.name_or_path,
        vae_path=model.vae_path,
        text_encoder_paths=model.text_encoder_paths,
        dtype=run_dtype,
        quantize=quantization_type(model.quantize),
        low_vram=model.low_vram,
        pixels=pixels,
        batch_size=batch_size,
        lora_rank=lora_rank,
    )
    if free_bytes is not None:
        plan = choose(plan, free_bytes, label=label)
    return format_plan(plan)
