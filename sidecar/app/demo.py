"""`sidecar demo`: the whole product on a fresh machine, with no weights, no GPU and no network.

It builds a tiny model (`sidecar.testing.tiny`), writes an ai-toolkit-shaped trainer config
beside it, renders the base model alone as the reference, and runs a simulated trainer
(`sidecar.testing.trainer`) in a thread while the daemon watches its output folder.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sidecar.app.render_cmd import render_command
from sidecar.app.status import find_job_store
from sidecar.app.watch import WatchRequest, run_watch
from sidecar.arch import Arch
from sidecar.jobs.store import JobStore
from sidecar.settings import BASELINE_STEP, SamplesFolder, samples_dir
from sidecar.testing.tiny import save_tiny_model
from sidecar.testing.trainer import (
    DEMO_KEEP_CHECKPOINTS,
    DEMO_NAME,
    DEMO_SAVE_EVERY_STEPS,
    SimulatedTrainer,
    write_trainer_config,
)


@dataclass(frozen=True)
class DemoResult:
    """What the demo made, for the CLI to print."""

    exit_code: int
    samples_dir: Path
    config_path: Path
    step_dirs: tuple[Path, ...]
    images: int
    failures: tuple[str, ...]
    seconds: float

    @property
    def checkpoints(self) -> int:
        """Rendered checkpoints: every step folder but the baseline's."""
        baseline = SamplesFolder(self.samples_dir).step(BASELINE_STEP).name
        return sum(1 for folder in self.step_dirs if folder.name != baseline)

    def summary(self) -> str:
        lines = [
            f"rendered {self.images} image(s) of {self.checkpoints} checkpoint(s), and the base model "
            f"alone as the reference, in {self.seconds:.0f} s",
            f"samples: {self.samples_dir}",
            *(f"  {folder.name}/" for folder in self.step_dirs),
            f"gallery: {self.samples_dir / 'index.html'} (open it in a browser)",
            f"trainer config: {self.config_path}",
            "next: sidecar status / sidecar grid / sidecar watch with your own config (see README)",
        ]
        lines += [f"failed: {failure}" for failure in self.failures]
        return "\n".join(lines)


def run_demo(workdir: Path, *, arch: Arch = "sdxl", checkpoints: int = 3, device: str = "cpu") -> DemoResult:
    """Build a tiny model, simulate a training run beside the daemon, render every checkpoint.

    The run starts afresh each time (the previous output folder is removed), since the
    simulated trainer writes the same bytes again and the daemon would rightly render nothing.
    """
    if checkpoints < 1:
        raise ValueError(f"`checkpoints` must be a positive integer, got {checkpoints!r}")
    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    model_folder = save_tiny_model(arch, workdir / "models" / f"tiny-{arch}")
    training_folder = workdir / "output"
    output_dir = training_folder / DEMO_NAME
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    config_path = write_trainer_config(
        workdir / "trainer.yaml", model_folder=model_folder, training_folder=training_folder, arch=arch
    )
    steps = [DEMO_SAVE_EVERY_STEPS * (number + 1) for number in range(checkpoints)]
    trainer = SimulatedTrainer(
        model_folder=model_folder,
        output_dir=output_dir,
        arch=arch,
        layout="ai-toolkit",
        steps=steps,
        final_step=steps[-1] + DEMO_SAVE_EVERY_STEPS,
        keep_last=DEMO_KEEP_CHECKPOINTS,
    )
    request = WatchRequest(
        output_dir=output_dir,
        config_path=config_path,
        overrides={
            "device": device,
            "settle_seconds": 0.3,
            "abandon_seconds": 30.0,
            "poll_interval_seconds": 0.1,
        },
    )
    folder = samples_dir(None, run_dir=output_dir)
    # The reference every user wants first: the base model alone, in step_000000.
    render_command(
        checkpoint=None,
        config_path=config_path,
        baseline=True,
        overrides={"device": device, "output": folder},
    )
    thread = threading.Thread(target=trainer.run, name="simulated-trainer", daemon=True)
    thread.start()
    try:
        code = run_watch(request, until=trainer.done.is_set)
    finally:
        trainer.done.wait()
        thread.join()
    if trainer.error is not None:
        raise RuntimeError(f"the simulated trainer failed: {trainer.error}") from trainer.error
    with JobStore(find_job_store(folder), now=time.time()) as store:
        summary = store.status()
    step_dirs = tuple(SamplesFolder(folder).step_dirs().values())
    failures = tuple(f"step {f.step}: {f.error}" for f in summary.failures)
    return DemoResult(
        exit_code=code if not failures else 1,
        samples_dir=folder,
        config_path=config_path,
        step_dirs=step_dirs,
        images=summary.sample_counts.get("done", 0),
        failures=failures,
        seconds=time.perf_counter() - started,
    )
