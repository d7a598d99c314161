"""Start to first sample: `sidecar watch` beside a checkpoint already there -> its first sample on disk.

Against a bare script (`bench.bare_start`) that imports diffusers, loads the same base and
LoRA and renders the same request. Both are fresh processes, timed from their start to
the image on disk (imports are much of a start), with the same torch threads, alternated
per round. The checkpoint was written a minute before the daemon starts, as after a
restart; the daemon loads its base while it takes the checkpoint in (settle, copy, hash).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Figure, Profile, Stats, Target, Workspace, alternate, progress, ratios
from bench.harness import write_config
from sidecar.plan.build import build_plan
from sidecar.plan.config import load_trainer_config
from sidecar.publish.files import sample_paths
from sidecar.testing.trainer import DEMO_NAME, SimulatedTrainer

TARGET = Target("<=", 1.10)
STEP = 100
WRITTEN_SECONDS_BEFORE = 60.0  # the checkpoint's age when the daemon starts
POLL_SECONDS = 0.005
TIMEOUT_SECONDS = 600.0
REPO_ROOT = Path(__file__).resolve().parent.parent


def run(workspace: Workspace, profile: Profile) -> list[Figure]:
    figures: list[Figure] = []
    for case in profile.start_cases:
        arch, size = case.split("/")
        figures += measure(workspace, profile, arch, size)  # type: ignore[arg-type]
    return figures


def measure(workspace: Workspace, profile: Profile, arch: str, size: str) -> list[Figure]:
    import torch

    progress(f"start {arch}/{size}")
    model = workspace.model(arch, size)  # type: ignore[arg-type]
    lora = workspace.lora(arch, size, seed=1)  # type: ignore[arg-type]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}

    def daemon_side(number: int) -> float:
        folder = workspace.scratch(f"start-{arch}-{size}-{number}")
        config = write_config(
            folder, arch=arch, model_folder=model, profile=profile, prompts=1, steps=profile.steps
        )  # type: ignore[arg-type]
        output_dir = folder / "output" / DEMO_NAME
        checkpoint = SimulatedTrainer(model_folder=model, output_dir=output_dir, arch=arch).checkpoint_path(
            STEP
        )  # type: ignore[arg-type]
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(lora.read_bytes())
        written = time.time() - WRITTEN_SECONDS_BEFORE
        os.utime(checkpoint, (written, written))
        command = [sys.executable, "-m", "sidecar", "watch", str(output_dir), "--config", str(config)]
        command += ["--device", "cpu", "--once"]
        return _first_file(command, sample_paths(output_dir / "samples", STEP, 0).image, env)

    def bare_side(number: int) -> float:
        folder = workspace.scratch(f"start-bare-{arch}-{size}-{number}")
        config = write_config(
            folder, arch=arch, model_folder=model, profile=profile, prompts=1, steps=profile.steps
        )  # type: ignore[arg-type]
        request = build_plan(load_trainer_config(config)).requests[0]
        out = folder / "sample.png"
        command = [sys.executable, "-m", "bench.bare_start", "--model", str(model), "--lora", str(lora)]
        command += ["--out", str(out), "--prompt", request.prompt, "--negative", request.negative_prompt]
        command += ["--width", str(request.width), "--height", str(request.height)]
        command += ["--steps", str(request.steps), "--seed", str(request.seed)]
        command += ["--guidance", str(request.guidance_scale)]
        return _first_file(command, out, env)

    rounds = alternate(profile.start_repeats, daemon_side, bare_side)
    case = f"{arch}/{size}"
    settings = {
        "steps": profile.steps,
        "size_pixels": profile.size_pixels,
        "torch_threads": env["OMP_NUM_THREADS"],
    }
    daemon = [r[0] for r in rounds]
    bare = [r[1] for r in rounds]
    return [
        Figure("start", case, "watch / bare script", "x", ratios(daemon, bare), TARGET, settings=settings),
        Figure("start", case, "watch start -> first sample s", "s", Stats.of(daemon), settings=settings),
        Figure("start", case, "bare script s", "s", Stats.of(bare), settings=settings),
    ]


def _first_file(command: list[str], path: Path, env: dict[str, str]) -> float:
    """Seconds from starting `command` to `path` existing; the process is then waited for."""
    log = path.parent / "stderr.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            while not path.exists():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{command[2]} exited {process.returncode} before writing {path}:\n"
                        f"{log.read_text(errors='replace')[-3000:]}"
                    )
                if time.perf_counter() - started > TIMEOUT_SECONDS:
                    raise TimeoutError(f"{path} did not appear within {TIMEOUT_SECONDS:.0f} s")
                time.sleep(POLL_SECONDS)
            seconds = time.perf_counter() - started
            process.wait(timeout=TIMEOUT_SECONDS)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return seconds
