"""Memory modes: how a pipeline sits on its device, and how it moves when memory runs out.

sidecar renders beside a trainer, so it must never land on the trainer's card by
accident (`--gpu N` means cuda:N and nothing else), must fit whatever memory the
card has left (offload modes, chosen from the model's size and the card's free
memory), must step down to a stronger offload mode when CUDA runs out of memory
instead of failing the job, and on a shared card must hold no VRAM between renders
(`park` / `unpark`). Nothing here knows a specific model: a pipeline is a diffusers
pipeline whose `components` hold `torch.nn.Module`s.

Memory modes, from fastest to leanest:
- `none`: the whole pipeline on the device.
- `model`: diffusers' model CPU offload, one component at a time on the device.
- `group`: diffusers' block-level group offload, one block of each component at a time.
- `sequential`: accelerate's sequential offload, one layer at a time (slowest).
The three offload modes also tile and slice the VAE decode, whose activations are
the largest single allocation of a 1024 px render.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sidecar.errors import SidecarError
from sidecar.render.devices import allocated_bytes, free_cuda_cache
from sidecar.settings import OFFLOAD_MODES

logger = logging.getLogger("sidecar.render")

MemoryMode = Literal["none", "model", "group", "sequential"]
# Order of the OOM fallback: each step holds less on the device than the one before.
MODE_STRENGTH_ORDER: tuple[MemoryMode, ...] = ("none", "model", "group", "sequential")

ACTIVATION_FACTOR = 1.3  # weights x this covers activations of a 1024 px render
HEADROOM_BYTES = 2 * 1024**3  # CUDA context, cuBLAS workspace, VAE decode, fragmentation
GROUP_MIN_FREE_BYTES = 3 * 1024**3  # below this even one block group plus activations is tight
LARGEST_COMPONENT_SHARE = 0.75  # the denoiser's share of a pipeline when not measured
GROUP_BLOCKS_PER_GROUP = 1  # blocks onloaded together in `group` mode
# Streams overlap transfers with compute but pin a host copy of every weight; off until
# measured on the cards we target (see bench/gpu_check.sh).
GROUP_USE_STREAM = False

# diffusers 0.42 has no public way to remove group offloading; these are the hook
# names `diffusers.hooks.group_offloading` registers (checked against 0.42.1).
_GROUP_OFFLOAD_HOOK_NAMES = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


def module_components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's components that are torch modules (tokenizers and schedulers are not)."""
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def component_bytes(pipe: Any) -> dict[str, int]:
    """Bytes of parameters and buffers per module component, in their current dtype.

    Counts elements, not storage, so it also works while weights sit on the meta
    device under sequential offload.
    """
    sizes: dict[str, int] = {}
    for name, module in module_components(pipe).items():
        tensors = [*module.parameters(), *module.buffers()]
        sizes[name] = sum(t.numel() * t.element_size() for t in tensors)
    return sizes


def choose_memory_mode(
    model_bytes: int, free_bytes: int, *, largest_component_bytes: int | None = None
) -> MemoryMode:
    """The fastest memory mode likely to fit `model_bytes` of weights into `free_bytes`.

    `none` needs every weight plus activations (x ACTIVATION_FACTOR) and HEADROOM_BYTES;
    `model` the same for the largest component alone (estimated as
    LARGEST_COMPONENT_SHARE of the model when not given); `group` needs
    GROUP_MIN_FREE_BYTES; anything less gets `sequential`. Estimates, not promises:
    the OOM fallback (`MemoryPolicy`) catches the cases they get wrong.
    """
    if model_bytes < 0 or free_bytes < 0:
        raise ValueError(f"sizes must be >= 0, got model_bytes={model_bytes}, free_bytes={free_bytes}")
    largest = largest_component_bytes
    if largest is None:
        largest = int(model_bytes * LARGEST_COMPONENT_SHARE)
    if model_bytes * ACTIVATION_FACTOR + HEADROOM_BYTES <= free_bytes:
        return "none"
    if largest * ACTIVATION_FACTOR + HEADROOM_BYTES <= free_bytes:
        return "model"
    if free_bytes >= GROUP_MIN_FREE_BYTES:
        return "group"
    return "sequential"


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
        free_cuda_cache(device)  # what an OOM or the detached weights left in torch's cache
        sizes = component_bytes(pipe)
        total, largest = sum(sizes.values()), max(sizes.values(), default=0)
        free_bytes, _total = torch.cuda.mem_get_info(device)
        applied = choose_memory_mode(total, free_bytes, largest_component_bytes=largest)
        logger.info(
            "offload=auto chose %s: model %.1f GiB, largest component %.1f GiB, %.1f GiB free on %s",
            applied,
            total / 1024**3,
            largest / 1024**3,
            free_bytes / 1024**3,
            device,
        )
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


def has_group_offload(module: torch.nn.Module) -> bool:
    """Whether diffusers' group offloading hooks sit anywhere in `module`."""
    return any(
        registry is not None and any(name in registry.hooks for name in _GROUP_OFFLOAD_HOOK_NAMES)
        for registry in (getattr(m, "_diffusers_hook", None) for m in module.modules())
    )


def _remove_group_offload(module: torch.nn.Module) -> None:
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in _GROUP_OFFLOAD_HOOK_NAMES:
            registry.remove_hook(name, recurse=False)


def detach(pipe: Any) -> None:
    """Remove every offload hook and bring all weights back to CPU RAM.

    `remove_all_hooks` undoes model and sequential offload (accelerate puts the weights
    kept aside under sequential offload back in place); group offload hooks are
    removed one registry at a time, as diffusers 0.42 has no public call for it.
    """
    if hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()
    for module in module_components(pipe).values():
        if has_group_offload(module):
            _remove_group_offload(module)
    pipe.to("cpu")


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

    The renderer catches an OOM (`is_cuda_oom`), calls `free_cuda_cache`, asks
    `on_oom()` for the next mode, re-applies it with `apply_memory_mode` and retries
    the image once; the stronger mode is kept for every later checkpoint, since the
    same model will not fit better next time. Start it with the mode
    `apply_memory_mode` returned (never `auto`).
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
            logger.error(
                "CUDA out of memory with offload=%s, the leanest mode; giving up on this image", self.mode
            )
            return None
        logger.warning("CUDA out of memory with offload=%s; retrying with offload=%s", self.mode, stronger)
        self.mode = stronger
        return stronger


@dataclass
class Placement:
    """Where a renderer's pipeline lives, and in which memory mode.

    The two things that move a loaded pipeline go through here: the OOM fallback
    (`step_down`, a stronger mode kept for later checkpoints) and GPU sharing
    (`park` between renders, `unpark` when a slot opens).
    """

    device: torch.device
    policy: MemoryPolicy
    parked: bool = False

    @property
    def mode(self) -> MemoryMode:
        return self.policy.mode

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

    def step_down(self, pipe: Any) -> bool:
        """After a CUDA OOM: free the cache and re-place the pipeline in the next stronger mode.

        Returns False when no stronger mode is left (the caller gives the image up).
        """
        free_cuda_cache(self.device)
        mode = self.policy.on_oom()
        if mode is None:
            return False
        apply_memory_mode(pipe, mode, self.device)
        return True
