"""`--compile`: the backbone's repeated blocks compiled once, kept through every LoRA swap.

diffusers' regional compilation (`ModelMixin.compile_repeated_blocks`) compiles each
class of transformer block the backbone repeats (Flux's double and single blocks, the
UNet's `BasicTransformerBlock`) with `torch.compile`, not the whole model: one graph per
block class, traced once and reused by every block of that class, so compiling costs
seconds where a whole model costs minutes (the PyTorch recipe:
https://docs.pytorch.org/tutorials/recipes/regional_compilation.html).

Why swaps do not recompile: the next checkpoint of a run is copied into the loaded
adapter's parameters in place (`adapters/swap.py`), so the modules, shapes and dtypes
dynamo's guards check stay as they were, and the graph runs on the new values. A LoRA of
another rank or layout changes the modules inside the blocks: dynamo traces them again
on its first image, which is logged with its time; later checkpoints of that layout swap
in place again. The graphs compiled for each layout stay cached (up to dynamo's
`recompile_limit`, 8 per block class, after which it runs that block uncompiled).

Where compilation cannot run (Python or platform torch.compile does not support, no C++
compiler for inductor on the CPU, no Triton on CUDA, `sequential` offload, whose per-layer
hooks dynamo cannot trace through), one warning says why and the renderer runs
uncompiled. A block inductor fails to compile runs uncompiled too, with one warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sidecar.render.base import Renderer

logger = logging.getLogger("sidecar.render")

# Backbone classes diffusers 0.42 does not mark with `_repeated_blocks`: their block classes.
REPEATED_BLOCKS: dict[str, tuple[str, ...]] = {"SD3Transformer2DModel": ("JointTransformerBlock",)}
# Offload modes whose hooks wrap every layer: dynamo breaks the graph at each of them.
UNCOMPILABLE_MODES = ("sequential",)


def unavailable_reason(device: torch.device) -> str | None:
    """Why `torch.compile` with inductor cannot run for `device` here, or None when it can."""
    try:
        from torch._dynamo.eval_frame import check_if_dynamo_supported

        check_if_dynamo_supported()
    except Exception as error:  # RuntimeError naming the Python build
        return f"torch.compile does not support this Python ({error})"
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as error:  # torch._inductor.exc.InvalidCxxCompiler
            return f"inductor needs a C++ compiler on the CPU and finds none (g++, or $CXX): {error}"
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor needs Triton on CUDA, which is not installed"
    return None


def repeated_blocks(backbone_class: type[torch.nn.Module]) -> tuple[str, ...]:
    """The block classes regional compilation compiles: diffusers' marks, else `REPEATED_BLOCKS`."""
    marked = tuple(getattr(backbone_class, "_repeated_blocks", None) or ())
    return marked or REPEATED_BLOCKS.get(backbone_class.__name__, ())


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process: a render that raises it recompiled."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledBackbone:
    """The compiled blocks of one renderer's backbone, and the log of when they (re)compile.

    A forward pre-hook and hook on the (uncompiled) backbone count dynamo's graphs around
    each denoising step: a step that compiled any says so, with its time and the LoRA
    it compiled for.
    """

    def __init__(self, renderer: Renderer, blocks: Sequence[str]) -> None:
        self.renderer = renderer
        self.blocks = tuple(blocks)
        self.compiles = 0  # steps during which graphs were compiled (the first, then each layout)
        self.compile_seconds = 0.0  # their total time
        self.fell_back = False  # inductor failed on a block: it runs uncompiled
        self._before: tuple[int, float] = (0, 0.0)
        backbone = renderer.backbone
        self._hooks = (
            backbone.register_forward_pre_hook(self._step_starts),
            backbone.register_forward_hook(self._step_ends),
        )

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _step_starts(self, module: torch.nn.Module, args: Any) -> None:
        self._before = (graphs_compiled(), time.perf_counter())

    def _step_ends(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        graphs, started = self._before
        new = graphs_compiled() - graphs
        if new <= 0:
            return
        seconds = time.perf_counter() - started
        self.compiles += 1
        self.compile_seconds += seconds
        lora = self.renderer.lora
        what = f"LoRA {lora.path.name}" if lora is not None else "the base model"
        if self.compiles == 1:
            logger.info(
                "compiled %s of the %s for %s in %.1f s; the next checkpoints swap in without recompiling",
                ", ".join(self.blocks),
                type(module).__name__,
                what,
                seconds,
            )
        else:
            logger.info(
                "recompiled %s for %s (another LoRA rank or layout, or another batch or image size) "
                "in %.1f s; checkpoints of this layout swap in without recompiling from now on",
                ", ".join(self.blocks),
                what,
                seconds,
            )

    def inductor_or_eager(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        """The `torch.compile` backend: inductor, or the graph as it is when inductor fails on it."""
        from torch._inductor.compile_fx import compile_fx

        try:
            return compile_fx(graph, example_inputs)
        except Exception as error:  # a kernel that does not build: render, uncompiled, all the same
            if not self.fell_back:
                logger.warning(
                    "--compile: inductor cannot compile the %s here (%s: %s); those blocks run uncompiled",
                    type(self.renderer.backbone).__name__,
                    type(error).__name__,
                    str(error).strip().splitlines()[0] if str(error).strip() else "",
                )
            self.fell_back = True
            return graph.forward


def compile_backbone(renderer: Renderer, *, mode: str) -> CompiledBackbone | None:
    """Compile `renderer`'s backbone's repeated blocks (lazily: on the first image), placed on
    its device in memory `mode`; None, after one warning saying why, where that cannot be done."""
    backbone = renderer.backbone
    name = type(backbone).__name__
    reason = unavailable_reason(renderer.device)
    if reason is None and mode in UNCOMPILABLE_MODES:
        reason = f"offload={mode} hooks every layer, which torch.compile cannot trace through"
    blocks = repeated_blocks(type(backbone))
    if reason is None and not blocks:
        reason = f"no repeated blocks are known for {name}"
    if reason is not None:
        logger.warning("--compile: %s; rendering uncompiled", reason)
        return None
    if not getattr(backbone, "_repeated_blocks", None):
        backbone._repeated_blocks = list(blocks)  # what diffusers' method reads (none marked on SD 3.x)
    compiled = CompiledBackbone(renderer, blocks)
    try:
        backbone.compile_repeated_blocks(backend=compiled.inductor_or_eager)
    except ValueError as error:  # none of those blocks in this model
        logger.warning("--compile: %s; rendering uncompiled", error)
        compiled.remove_hooks()
        return None
    found = sum(1 for module in backbone.modules() if type(module).__name__ in blocks)
    logger.info("--compile: %s block(s) of the %s (%s) compile on the first image", found, name, blocks)
    return compiled
