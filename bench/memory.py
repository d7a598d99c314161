"""Peak RSS of the daemon per architecture, each in a process of its own.

The parent starts `python -m bench.memory --side daemon|bare ...` once per architecture
and side; the child renders two checkpoints and prints its own peak RSS as JSON
(`peak_rss_bytes`). The bare side (`from_pretrained`,
`load_lora_weights`, calls, saves) gives the floor that torch, diffusers and the model
cost anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from bench.common import PROFILES, Figure, Profile, Size, Stats, Workspace, progress
from sidecar.arch import Arch

CHECKPOINTS = (100, 200)
MIB = 1024**2
REPO_ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_SECONDS = 300


def run(workspace: Workspace, profile: Profile) -> list[Figure]:
    import torch

    sizes: tuple[Size, ...] = ("shallow", "deep") if profile.memory_deep else ("shallow",)
    figures: list[Figure] = []
    for size in sizes:
        for arch in profile.archs:
            progress(f"memory {arch}/{size}")
            model = workspace.model(arch, size)
            peaks = {
                side: _child_peak(
                    side,
                    arch,
                    size,
                    model,
                    workspace.scratch(f"memory-{side}-{arch}-{size}"),
                    profile,
                    threads=torch.get_num_threads(),
                )
                for side in ("daemon", "bare")
            }
            case = f"{arch}/{size}"
            settings = {"checkpoints": len(CHECKPOINTS), "images_per_checkpoint": profile.prompts}
            figures += [
                Figure(
                    "memory",
                    case,
                    "daemon peak RSS",
                    "MiB",
                    Stats.of([peaks["daemon"] / MIB]),
                    settings=settings,
                ),
                Figure(
                    "memory", case, "bare peak RSS", "MiB", Stats.of([peaks["bare"] / MIB]), settings=settings
                ),
                Figure(
                    "memory",
                    case,
                    "daemon / bare",
                    "x",
                    Stats.of([peaks["daemon"] / peaks["bare"]]),
                    settings=settings,
                ),
            ]
    return figures


def _child_peak(
    side: str, arch: Arch, size: Size, model: Path, folder: Path, profile: Profile, *, threads: int
) -> int:
    command = [
        sys.executable, "-m", "bench.memory",
        "--side", side, "--arch", arch, "--model", str(model), "--folder", str(folder),
        "--profile", profile.name, "--threads", str(threads),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {side} child for {arch}/{size} failed:\n{done.stderr[-3000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    On Linux `VmHWM` of `/proc/self/status`, not `ru_maxrss`: a child started by a large
    parent reports the parent's RSS at fork as its `ru_maxrss` (the kernel keeps the
    high-water mark of the memory image `exec` replaced), here the whole benchmark's.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def child(side: str, arch: Arch, model: Path, folder: Path, profile: Profile) -> int:
    from bench.harness import BarePipeline, DaemonHarness
    from sidecar.testing.loras import write_lora

    if side == "daemon":
        with DaemonHarness(
            folder,
            arch=arch,
            model_folder=model,
            profile=profile,
            prompts=profile.prompts,
            steps=profile.steps,
            settle_seconds=0.1,
            poll_interval_seconds=0.05,
        ) as daemon:
            for step in CHECKPOINTS:
                daemon.save(step, daemon.checkpoint_bytes(step))
    else:
        from bench.harness import write_config
        from sidecar.plan.build import build_plan
        from sidecar.plan.config import load_trainer_config

        config = write_config(
            folder,
            arch=arch,
            model_folder=model,
            profile=profile,
            prompts=profile.prompts,
            steps=profile.steps,
        )
        requests = build_plan(load_trainer_config(config)).requests
        bare = BarePipeline(model)
        for step in CHECKPOINTS:
            lora = write_lora(model, arch, folder / f"{step}.safetensors", seed=1, scale=0.5 + step / 1000)
            bare.render_checkpoint(lora, requests, folder / f"step_{step:06d}")
    return peak_rss_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="one side of the peak-RSS benchmark (run by `python -m bench`)"
    )
    parser.add_argument("--side", choices=("daemon", "bare"), required=True)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    import torch

    from bench.common import quiet_libraries

    torch.set_num_threads(args.threads)
    quiet_libraries()
    peak = child(args.side, args.arch, args.model, args.folder, PROFILES[args.profile])
    print(json.dumps({"peak_rss_bytes": peak}))


if __name__ == "__main__":
    main()
