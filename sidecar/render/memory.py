"""Memory modes: how a pipeline sits on its device, and how it moves when memory runs out.

sidecar renders beside a trainer, so it must never land on the trainer's card by
accident (`--gpu N` means cuda:N and nothing else), must fit whatever memory the
card has left (offload modes, chosen from the model's size and the card's free
memory), must step down to a stronger offload mode when CUDA runs out of memory
instead of failing the job, and on a shared card must hold no VRAM between renders
(`park` / `unpark`). Nothing here knows a specific model: a pipeline is a diffusers
pipeline whose `components` hold `torch.nn.Module`s. The hooks themselves: `offload.py`.

Memory modes, from fastest to leanest:
- `none`: the whole pipeline on the device.
- `model`: diffusers' model CPU offload, one component at a time on the device.
- `group`: diffusers' block-level group offload, one block of each component at a time.
- `sequential`: accelerate's sequential offload, one layer at a time (slowest).
The three offload modes also tile and slice the VAE decode, whose activations are
the largest single allocation of a 1024 px render. `auto` takes the mode the memory
plan (`memory_plan.py`) picks for the card's free memory, from the loaded modules' own
shapes: the same figures `sidecar check --vram` prints from the files' headers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

from sidecar.errors import SidecarError
from sidecar.render.devices import allocated_bytes, free_cuda_cache, is_cuda_oom
from sidecar.render.loaded_plan import plan_for_card, plan_pipeline
from sidecar.render.memory_plan import MODES, MemoryPlan
from sidecar.render.offload import detach, hold_modules, keep_networks_on, unhook
from sidecar.settings import OFFLOAD_MODES

logger = logging.getLogger("sidecar.render")

MemoryMode = Literal["none", "model", "group", "sequential"]
# Order of the OOM fallback: each step holds less on the device than the one before.
MODE_STRENGTH_ORDER: tuple[MemoryMode, ...] = MODES  # type: ignore[assignment]

GROUP_BLOCKS_PER_GROUP = 1  # blocks onloaded together in `group` mode
# Streams overlap transfers with compute but pin a host copy of every weight; off until
# measured on the cards we target (see bench/gpu_check.sh).
GROUP_USE_STREAM = False


T = TypeVar("T")


class OutOfMemoryError(SidecarError):
    """CUDA ran out of memory in the leanest mode: the step fails, with the plan's figures."""


def next_stronger_mode(mode: str) -> MemoryMode | None:
    """The mode that holds less on the device than `mode`, or None after `sequential`."""
    if mode not in MODE_STRENGTH_ORDER:
        raise ValueError(f"`mode` must be one of {', '.join(MODE_STRENGTH_ORDER)}, got {mode!r}")
    position = MODE_STRENGTH_ORDER.index(mode)
    return MODE_STRENGTH_ORDER[position + 1] if position + 1 < len(MODE_STRENGTH_ORDER) else None


def _check_mode(mode: str) -> None:
    if mode not in OFFLOAD_MODES:
        raise SidecarError(f"`offload` must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")


def apply_memory_mode(
    pipe: Any, mode: str, device: torch.device, *, vae_tiling: bool | None = None
) -> MemoryMode:
    """Place `pipe` on `device` in memory `mode`; returns the mode applied (`auto` resolved).

    Any earlier placement (offload hooks, weights on the GPU) is undone first, so this
    is also how the OOM fallback switches modes. On the CPU every mode means `none`.
    `vae_tiling` defaults to on for the offload modes and off for `none` (tiling
    changes pixels slightly at tile seams, so a roomy card renders untiled).
    """
    _check_mode(mode)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    detach(pipe)
    if device.type != "cuda":
        if mode not in ("none", "auto"):
            logger.info("offload=%s means nothing on %s; keeping the whole pipeline there", mode, device)
        applied: MemoryMode = "none"
    elif mode == "auto":
        plan = plan_pipeline(pipe)
        if plan is None:
            applied = "model"
        else:
            plan = plan_for_card(plan, device)
            applied = plan.mode  # type: ignore[assignment]
            logger.info("offload=auto on %s: %s", device, plan.reason)
    else:
        applied = mode  # type: ignore[assignment]
    _place(pipe, applied, device)
    _set_vae_memory_savers(pipe, on=applied != "none" if vae_tiling is None else vae_tiling)
    return applied


def _place(pipe: Any, mode: MemoryMode, device: torch.device) -> None:
    if mode == "none":
        pipe.to(device)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
        keep_networks_on(pipe, device)
    elif mode == "group":
        pipe.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=GROUP_BLOCKS_PER_GROUP,
            use_stream=GROUP_USE_STREAM and device.type == "cuda",
        )
    else:  # pragma: no cover - guarded by _check_mode
        raise ValueError(mode)


def _set_vae_memory_savers(pipe: Any, *, on: bool) -> None:
    vae = getattr(pipe, "vae", None)
    for enable, disable in (("enable_tiling", "disable_tiling"), ("enable_slicing", "disable_slicing")):
        method = getattr(vae, enable if on else disable, None)
        if callable(method):
            method()


def park(pipe: Any, device: torch.device | None = None) -> None:
    """Hold no VRAM between renders on a shared card: weights to CPU RAM, CUDA cache emptied.

    The CUDA context itself (a few hundred MiB) stays until the process exits.
    """
    detach(pipe)
    free_cuda_cache(device)
    if device is not None:
        logger.debug(
            "pipeline parked in CPU RAM; torch holds %s bytes on %s", allocated_bytes(device), device
        )


def unpark(pipe: Any, device: torch.device, mode: str) -> MemoryMode:
    """Put a parked pipeline back on `device` in `mode`; returns the mode applied.

    Pass the mode applied before parking (`MemoryPolicy.mode`), not `auto`: on a shared
    card the free memory changes with the trainer, and the mode should not flap.
    """
    return apply_memory_mode(pipe, mode, device)


class MemoryPolicy:
    """The memory mode to render in, stepping to a stronger one after each CUDA OOM.

    The stronger mode is kept for every later checkpoint, since the same model will not
    fit better next time. Start it with an applied mode (never `auto`).
    """

    def __init__(self, mode: str) -> None:
        if mode not in MODE_STRENGTH_ORDER:
            raise ValueError(
                f"`mode` must be an applied mode ({', '.join(MODE_STRENGTH_ORDER)}), got {mode!r}; "
                "resolve `auto` with apply_memory_mode first"
            )
        self.mode: MemoryMode = mode  # type: ignore[assignment]
        self.oom_count = 0

    def on_oom(self) -> MemoryMode | None:
        """Advance to the next stronger mode and return it, or None when none is left."""
        self.oom_count += 1
        stronger = next_stronger_mode(self.mode)
        if stronger is None:
            return None
        logger.warning("CUDA out of memory with offload=%s; retrying with offload=%s", self.mode, stronger)
        self.mode = stronger
        return stronger


@dataclass
class Placement:
    """Where a renderer's pipeline lives, in which memory mode, and where its text encoders wait.

    Everything that moves a loaded pipeline goes through here: the first placement
    (`place`, `auto` resolved by the memory plan), the OOM fallback at any phase (`run`:
    free the cache, the next stronger mode, again; kept for later checkpoints), and GPU
    sharing (`park` between renders, `unpark` when a slot opens).

    With `encoders_on_cpu` the text encoders are held out of the pipeline (`held`), in CPU
    RAM with no offload hook, so no mode ever moves them to the card; they join it only
    while prompts are encoded on the CPU or a LoRA is applied (`encoders_attached`).
    """

    device: torch.device
    policy: MemoryPolicy
    plan: MemoryPlan | None = None
    encoder_names: tuple[str, ...] = ()
    encoders_on_cpu: bool = False
    parked: bool = False
    held: dict[str, torch.nn.Module] = field(default_factory=dict)
    _lifted: bool = field(default=False, repr=False)

    @classmethod
    def place(
        cls,
        pipe: Any,
        mode: str,
        device: torch.device,
        *,
        plan: MemoryPlan | None = None,
        encoder_names: tuple[str, ...] = (),
    ) -> Placement:
        """Place `pipe` in `mode` (`auto`: the plan's choice for the card), stepping to a
        stronger mode if CUDA runs out of memory while the weights move to the card."""
        _check_mode(mode)
        device = torch.device(device)
        plan = plan if plan is not None else plan_pipeline(pipe)
        encoders_on_cpu = False
        if device.type != "cuda":
            mode = "none"
        elif mode == "auto" and plan is None:
            mode = "model"
        elif mode == "auto":
            plan = plan_for_card(plan, device)
            mode, encoders_on_cpu = plan.chosen.mode, plan.chosen.encoders_on_cpu  # type: ignore[union-attr]
            logger.info("offload=auto on %s: %s", device, plan.reason)
        placement = cls(device, MemoryPolicy(mode), plan, encoder_names, encoders_on_cpu)
        placement.run(pipe, lambda: None, phase="loading", place_first=True)
        return placement

    @property
    def mode(self) -> MemoryMode:
        return self.policy.mode

    def apply(self, pipe: Any) -> None:
        """(Re)place `pipe` in the policy's mode, text encoders held on the CPU if so planned."""
        if self.encoders_on_cpu and self.encoder_names and not self.held:
            detach(pipe)
            self.held = hold_modules(pipe, self.encoder_names)
        apply_memory_mode(pipe, self.policy.mode, self.device)

    @contextlib.contextmanager
    def encoders_attached(self, pipe: Any) -> Iterator[None]:
        """The held text encoders back in the pipeline (on the CPU) for the block's duration."""
        if not self.held:
            yield
            return
        for name, module in self.held.items():
            setattr(pipe, name, module)
        try:
            yield
        finally:
            for name, module in self.held.items():
                setattr(pipe, name, None)
                unhook(module)  # diffusers re-applies offload to every component after a LoRA load

    @contextlib.contextmanager
    def lifted(self, pipe: Any) -> Iterator[None]:
        """Under `group` or `sequential` offload, the pipeline without its hooks for the block
        (weights real, in CPU RAM), then offloaded again; otherwise nothing.

        For a change the hooks would miss: a LyCORIS network wraps layers' `forward`, which
        accelerate's per-layer hooks (`sequential`) wrap too, so put on or taken off under them
        one wrapper drops the other; and group offload takes a new network's tensors into its
        groups only when it makes them. Model offload moves whole components: nothing to lift.
        """
        if self._lifted or self.parked or self.mode not in ("group", "sequential"):
            yield
            return
        self._lifted = True
        detach(pipe)
        try:
            yield
        finally:
            self._lifted = False
            _place(pipe, self.mode, self.device)

    def run(self, pipe: Any, action: Callable[[], T], *, phase: str, place_first: bool = False) -> T:
        """`action()`, stepping to a stronger memory mode and again after each CUDA OOM.

        `place_first` (re)places the pipeline before the first try; an OOM while placing
        steps down too. With no stronger mode left it raises `OutOfMemoryError` with the
        plan's figures.
        """
        place = place_first
        while True:
            try:
                if place:
                    self.apply(pipe)
                    place = False
                return action()
            except Exception as error:
                if not is_cuda_oom(error):
                    raise
                self.step_down(phase=phase, error=error)
                place = True

    def step_down(self, *, phase: str = "rendering", error: BaseException | None = None) -> None:
        """After a CUDA OOM: free the cache and take the next stronger mode (placed by `run`).

        After `sequential`, the text encoders move to the CPU for good; after that there is
        nothing left and it raises `OutOfMemoryError` naming the plan's estimates.
        """
        free_cuda_cache(self.device)
        if self.policy.on_oom() is None:
            if not self.encoder_names or self.encoders_on_cpu:
                raise OutOfMemoryError(self.failure_message(phase, error)) from error
            logger.warning("CUDA out of memory with offload=sequential; text encoders now wait on the CPU")
            self.encoders_on_cpu = True

    def failure_message(self, phase: str, error: BaseException | None) -> str:
        where = ", text encoders on the CPU" if self.encoders_on_cpu else ""
        first = str(error).splitlines()[0] if error is not None else "out of memory"
        figures = self.plan.summary() if self.plan is not None else "no memory plan"
        return (
            f"CUDA out of memory on {self.device} while {phase}, even with offload={self.mode}{where} "
            f"({first}); {figures}. Free memory on the card, render smaller samples, "
            "or set `model.quantize: true`"
        )

    def park(self, pipe: Any) -> None:
        """Weights to CPU RAM, CUDA cache emptied; no-op when already parked or on the CPU."""
        if self.parked or self.device.type != "cuda":
            return
        park(pipe, self.device)
        self.parked = True
        logger.info("released %s: pipeline parked in CPU RAM until the next slot", self.device)

    def unpark(self, pipe: Any) -> None:
        """Back on the device in the mode it had before parking."""
        if not self.parked:
            return
        unpark(pipe, self.device, self.policy.mode)
        self.parked = False
