"""`--compile`: the time to compile the backbone's repeated blocks, and the speed-up per image.

Opt-in (`python -m bench --only compile`): inductor builds C++ kernels on the CPU, a minute
or more per model with a cold cache. Per architecture, on the deep and the wide models, a
child process (`python -m bench.compile_speed --child ...`) holds two renderers of one
base, one compiled (`sidecar.render.compile`) and one not, each with the same run's LoRA;
it renders the same request with each, alternated, swapping both to the next checkpoint
(in place) before every round, and reports:

- compile seconds: the compiled renderer's first image, less an uncompiled image;
- seconds per image of each, after that;
- graphs compiled by the swaps after the first image (0: a swap never recompiles).

Each case runs twice, with an empty inductor cache (`TORCHINDUCTOR_CACHE_DIR`: what a
first start pays) and then with the cache the first run filled (every later start).
`--device cuda` measures on a card (`bench/gpu_check.sh` runs it there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Figure, Profile, Stats, Workspace, progress, sample_requests

SIZES = ("deep", "wide")
ROUNDS = 3  # compiled and uncompiled images each, after the compiling one
CHILD_TIMEOUT_SECONDS = 1800
REPO_ROOT = Path(__file__).resolve().parent.parent


def run(workspace: Workspace, profile: Profile) -> list[Figure]:
    import torch

    figures: list[Figure] = []
    for size in SIZES:
        for arch in profile.archs:
            progress(f"compile {arch}/{size}")
            steps = profile.wide_steps if size == "wide" else profile.steps
            model = workspace.model(arch, size)  # type: ignore[arg-type]
            loras = [workspace.trainer_lora(arch, size, seed=1, rank=16, scale=s) for s in (0.5, 1.0)]  # type: ignore[arg-type]
            with tempfile.TemporaryDirectory(prefix="sidecar-inductor-") as cache:
                runs = {
                    temperature: _child(arch, model, loras, steps, profile, cache, torch.get_num_threads())
                    for temperature in ("cold", "warm")
                }
            figures += _figures(f"{arch}/{size}", runs, steps)
    return figures


def _figures(case: str, runs: dict[str, dict], steps: int) -> list[Figure]:
    warm = runs["warm"]
    settings = {
        "steps": steps,
        "device": warm["device"],
        "graphs_compiled_by_swaps": [runs[t]["graphs_after_first"] for t in runs],
        "max_pixel_difference": max(runs[t]["max_pixel_difference"] for t in runs),
    }
    speedups = [u / c for u, c in zip(warm["uncompiled"], warm["compiled"], strict=True)]
    return [
        Figure(
            "compile",
            case,
            "compile s (cold cache)",
            "s",
            Stats.of([runs["cold"]["compile"]]),
            settings=settings,
        ),
        Figure(
            "compile", case, "compile s (warm cache)", "s", Stats.of([warm["compile"]]), settings=settings
        ),
        Figure("compile", case, "uncompiled s/image", "s", Stats.of(warm["uncompiled"]), settings=settings),
        Figure("compile", case, "compiled s/image", "s", Stats.of(warm["compiled"]), settings=settings),
        Figure(
            "compile", case, "speed-up (uncompiled / compiled)", "x", Stats.of(speedups), settings=settings
        ),
    ]


def _child(arch, model, loras, steps, profile: Profile, cache: str, threads: int) -> dict:
    command = [
        sys.executable, "-m", "bench.compile_speed", "--child", "--arch", arch, "--model", str(model),
        "--loras", *map(str, loras), "--steps", str(steps), "--size", str(profile.size_pixels),
        "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the compile child for {arch} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(arch: str, model: Path, loras: list[Path], *, steps: int, size: int, device: str) -> dict:
    """Two renderers of one base, compiled and not: compile time, seconds per image, recompiles."""
    import dataclasses

    import numpy as np

    from bench.common import PROFILES
    from sidecar.plan.request import ModelSource
    from sidecar.render.compile import graphs_compiled
    from sidecar.render.registry import load_renderer

    profile = dataclasses.replace(PROFILES["default"], steps=steps, size_pixels=size)
    request = sample_requests(arch, profile, count=1)
    source = ModelSource(arch=arch, name_or_path=str(model))  # type: ignore[arg-type]
    plain = load_renderer(source, device=device)
    compiled = load_renderer(source, device=device, compile=True)

    def image(renderer) -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        ((_, picture),) = list(renderer.render(request))
        _synchronize(device)
        return time.perf_counter() - started, np.asarray(picture, dtype=np.int16)

    for renderer in (plain, compiled):
        renderer.apply_lora(loras[0])
    image(plain)  # warm-up: first-call costs that are not compiling
    uncompiled_first, _ = image(plain)
    compiling, _ = image(compiled)
    graphs = graphs_compiled()
    times: dict[str, list[float]] = {"uncompiled": [], "compiled": []}
    difference = 0
    for number in range(ROUNDS):
        for renderer in (plain, compiled):
            renderer.apply_lora(loras[(number + 1) % len(loras)])  # the next checkpoint, in place
        seconds_plain, reference = image(plain)
        seconds_compiled, picture = image(compiled)
        times["uncompiled"].append(seconds_plain)
        times["compiled"].append(seconds_compiled)
        difference = max(difference, int(np.abs(reference - picture).max()))
    return {
        "device": device,
        "compile": compiling - statistics.median([uncompiled_first, *times["uncompiled"]]),
        "graphs_after_first": graphs_compiled() - graphs,
        "max_pixel_difference": difference,
        **times,
    }


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="compile time and speed-up of one model, in this process (`python -m bench --only "
        "compile` runs it per model; `bench/gpu_check.sh` with --wide on a card)"
    )
    parser.add_argument("--child", action="store_true", help="(run by `python -m bench`)")
    parser.add_argument("--arch", default="flux")
    parser.add_argument("--model", type=Path, help="a diffusers folder; else --wide builds one")
    parser.add_argument("--loras", type=Path, nargs=2, help="two checkpoints of one run")
    parser.add_argument("--wide", action="store_true", help="build the wide model of --arch, rank-16 LoRAs")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if not args.wide and (args.model is None or args.loras is None):
        parser.error("`--model` and `--loras` are needed without `--wide`")
    import torch

    from bench.common import PROFILES, quiet_libraries

    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="sidecar-compile-") as root:
        model, loras = args.model, args.loras
        if args.wide:
            workspace = Workspace(Path(root), PROFILES["default"])
            model = workspace.model(args.arch, "wide")
            loras = [workspace.trainer_lora(args.arch, "wide", seed=1, rank=16, scale=s) for s in (0.5, 1.0)]
        result = child(args.arch, model, loras, steps=args.steps, size=args.size, device=args.device)
    result.update(arch=args.arch, steps=args.steps, size_pixels=args.size)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
