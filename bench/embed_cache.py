"""Prompt-embedding cache: time per checkpoint (LoRA swap + render + write) with and without it.

Without: the renderer's embedding cache is cleared before each checkpoint (there is no
public switch; `Renderer._embeddings` is the cache), so every prompt is encoded again,
as a renderer without the cache would. The two sides alternate, on the same renderer.
"""

from __future__ import annotations

from bench.common import (
    Figure,
    Profile,
    Size,
    Stats,
    Workspace,
    alternate,
    each_case,
    progress,
    ratios,
    sample_requests,
    timed,
)
from sidecar.app.rendering import render_samples
from sidecar.arch import Arch
from sidecar.render.registry import renderer_class

LORA_SEEDS = (1, 2)


def run(workspace: Workspace, profile: Profile) -> list[Figure]:
    return each_case(workspace, profile, measure)


def measure(workspace: Workspace, profile: Profile, arch: Arch, size: Size) -> list[Figure]:
    progress(f"embed_cache {arch}/{size}")
    model = workspace.model(arch, size)
    loras = [workspace.lora(arch, size, seed=seed) for seed in LORA_SEEDS]
    samples_dir = workspace.scratch(f"embed-cache-{arch}-{size}")
    requests = sample_requests(arch, profile)
    renderer = renderer_class(arch).from_model(model)
    checkpoints = [0]

    def checkpoint() -> None:
        checkpoints[0] += 1
        renderer.apply_lora(loras[checkpoints[0] % len(loras)])
        render_samples(renderer, requests, samples_dir=samples_dir, step=checkpoints[0])

    def cached(number: int) -> float:
        return timed(checkpoint)

    def uncached(number: int) -> float:
        renderer._embeddings.clear()
        return timed(checkpoint)

    alternate(1, cached, uncached)  # warm-up
    rounds = alternate(profile.repeats, cached, uncached)
    renderer.release()

    case = f"{arch}/{size}"
    settings = {
        "images_per_checkpoint": len(requests),
        "steps": profile.steps,
        "size_pixels": profile.size_pixels,
    }
    with_cache = [r[0] for r in rounds]
    without = [r[1] for r in rounds]
    return [
        Figure("embed_cache", case, "with cache s/checkpoint", "s", Stats.of(with_cache), settings=settings),
        Figure("embed_cache", case, "without s/checkpoint", "s", Stats.of(without), settings=settings),
        Figure(
            "embed_cache",
            case,
            "speedup (without / with)",
            "x",
            ratios(without, with_cache),
            settings=settings,
        ),
    ]
