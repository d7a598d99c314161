"""Swap: switching the loaded pipeline to the next checkpoint, over loading base + LoRA from scratch.

Per architecture and size (the tiny models with a rank-4 attention LoRA; the wide ones, at
real layer widths, with a rank-16 LoRA of the trainers' default layers: the size of a real
one per block), alternated in one process:

- *hot-swap*: `renderer.apply_lora(next)` while a LoRA of the same layout is loaded (the
  next checkpoint of the same run), which copies its weights into the loaded adapter in place;
- *unload + load*: `renderer.remove_lora()` then `renderer.apply_lora(next)`, diffusers'
  `load_lora_weights`: the path taken when the layout changes, what a script pays per checkpoint;
- *scratch*: `DiffusionPipeline.from_pretrained` + `load_lora_weights`, what a process that
  renders each checkpoint anew pays.
"""

from __future__ import annotations

import gc
import time

from bench.common import (
    Figure,
    Profile,
    Size,
    Stats,
    Target,
    Workspace,
    alternate,
    each_case,
    progress,
    ratios,
    timed,
)
from sidecar.arch import Arch
from sidecar.render.registry import renderer_class

TARGET = Target("<=", 0.05)
LORA_SEEDS = (1, 2)  # two checkpoints of one run: same layout, other weights


WIDE_RANK = 16


def run(workspace: Workspace, profile: Profile) -> list[Figure]:
    figures = each_case(workspace, profile, measure)
    if profile.swap_wide:
        figures += [figure for arch in profile.archs for figure in measure(workspace, profile, arch, "wide")]
    return figures


def measure(workspace: Workspace, profile: Profile, arch: Arch, size: Size) -> list[Figure]:
    from diffusers import DiffusionPipeline

    progress(f"swap {arch}/{size}")
    model = workspace.model(arch, size)
    if size == "wide":
        loras = [workspace.trainer_lora(arch, size, seed=seed, rank=WIDE_RANK) for seed in LORA_SEEDS]
        lora = f"peft, rank {WIDE_RANK}, the trainers' default layers"
    else:
        loras = [workspace.lora(arch, size, seed=seed) for seed in LORA_SEEDS]
        lora = "peft, rank 4, attention q/k/v/out"
    renderer = renderer_class(arch).from_model(model)
    renderer.apply_lora(loras[0])
    applied = [0]  # index of the loaded LoRA; each swap takes the other one
    fell_back = 0

    def next_lora() -> int:
        applied[0] = 1 - applied[0]
        return applied[0]

    def hot_swap(number: int) -> float:
        nonlocal fell_back
        path = loras[next_lora()]
        started = time.perf_counter()
        report = renderer.apply_lora(path)
        seconds = time.perf_counter() - started
        fell_back += not report.hotswapped
        return seconds

    def unload_and_load(number: int) -> float:
        path = loras[next_lora()]

        def swap() -> None:
            renderer.remove_lora()
            renderer.apply_lora(path)

        return timed(swap)

    def scratch(number: int) -> float:
        path = loras[number % len(loras)]

        def load() -> None:
            pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True)
            pipe.load_lora_weights(str(path))

        seconds = timed(load)
        gc.collect()
        return seconds

    alternate(1, hot_swap, unload_and_load, scratch)  # warm-up
    fell_back = 0
    rounds = alternate(profile.repeats, hot_swap, unload_and_load, scratch)
    renderer.release()

    case = f"{arch}/{size}"
    settings = {
        "hotswap_fell_back": fell_back,
        "lora": lora,
        "lora_mib": round(loras[0].stat().st_size / 2**20, 1),
    }
    hot = [r[0] for r in rounds]
    reload = [r[1] for r in rounds]
    fresh = [r[2] for r in rounds]
    return [
        Figure("swap", case, "hot-swap / scratch", "x", ratios(hot, fresh), TARGET, settings=settings),
        # The path a LoRA of another layout takes, and what a script pays: a baseline, no target.
        Figure("swap", case, "unload+load / scratch", "x", ratios(reload, fresh), settings=settings),
        Figure("swap", case, "hot-swap / unload+load", "x", ratios(hot, reload), settings=settings),
        Figure("swap", case, "hot-swap s", "s", Stats.of(hot), settings=settings),
        Figure("swap", case, "unload+load s", "s", Stats.of(reload), settings=settings),
        Figure("swap", case, "scratch s", "s", Stats.of(fresh), settings=settings),
    ]
