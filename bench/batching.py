"""Batching: images/s rendering one checkpoint's requests in one batched call, over one by one.

The same requests (equal settings, different prompts and seeds) through
`Renderer.render(..., batch_size=N)` and `batch_size=1`, alternated; embeddings are
cached by the warm-up, so both sides run the same pipeline work.
"""

from __future__ import annotations

from bench.common import Figure, Profile, Stats, Workspace, alternate, progress, sample_requests, timed
from sidecar.arch import Arch
from sidecar.render.registry import renderer_class

SIZE = "shallow"


def run(workspace: Workspace, profile: Profile) -> list[Figure]:
    figures: list[Figure] = []
    for arch in profile.archs:
        figures += measure(workspace, profile, arch)
    return figures


def measure(workspace: Workspace, profile: Profile, arch: Arch) -> list[Figure]:
    progress(f"batching {arch}/{SIZE}")
    renderer = renderer_class(arch).from_model(workspace.model(arch, SIZE))
    renderer.apply_lora(workspace.lora(arch, SIZE, seed=1))
    requests = sample_requests(arch, profile, count=profile.batch_images)

    def batched(number: int) -> float:
        return len(requests) / timed(lambda: list(renderer.render(requests, batch_size=len(requests))))

    def one_by_one(number: int) -> float:
        return len(requests) / timed(lambda: list(renderer.render(requests, batch_size=1)))

    alternate(1, batched, one_by_one)  # warm-up
    rounds = alternate(profile.repeats, batched, one_by_one)
    renderer.release()

    case = f"{arch}/{SIZE}"
    settings = {"images": len(requests), "steps": profile.steps, "size_pixels": profile.size_pixels}
    return [
        Figure(
            "batching", case, "batched img/s", "img/s", Stats.of([r[0] for r in rounds]), settings=settings
        ),
        Figure(
            "batching", case, "one-by-one img/s", "img/s", Stats.of([r[1] for r in rounds]), settings=settings
        ),
        Figure(
            "batching",
            case,
            "batched / one-by-one",
            "x",
            Stats.of([batched / single for batched, single in rounds]),
            settings=settings,
        ),
    ]
