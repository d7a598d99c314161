"""`sidecar watch` on ai-toolkit's split Wan 2.2 A14B checkpoints, end to end on the tiny Wan 2.2.

ai-toolkit writes `{name}_{step:09d}_high_noise.safetensors` then `..._low_noise.safetensors`;
the daemon must render each step once, with both experts' LoRAs, and still render a run that
trains one expert (one file per step). The intake's pairing rule itself is
tests/intake/test_split.py and tests/app/test_intake_loop_split.py; the experts' frames against
plain diffusers are tests/render/test_wan.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from sidecar.app.watch import WatchRequest, run_watch
from sidecar.intake.split import SIBLING_GRACE_SECONDS
from sidecar.jobs.store import JobStore
from sidecar.render.wan_experts import ExpertSlot
from sidecar.settings import SamplesFolder
from sidecar.testing.loras_wan import write_wan22_loras
from sidecar.testing.tiny_wan import save_tiny_wan, tiny_wan_name
from sidecar.weights import split_sibling

pytestmark = pytest.mark.slow

NAME = "my_wan22_lora"
CONFIG = """\
job: extension
config:
  name: {name}
  process:
    - type: sd_trainer
      training_folder: {training_folder}
      network: {{type: lora, linear: 4, linear_alpha: 4}}
      model:
        name_or_path: {model}
        arch: wan22_14b
        model_kwargs: {{train_high_noise: true, train_low_noise: {low}}}
      sample:
        sampler: flowmatch
        width: 32
        height: 32
        num_frames: 5
        fps: 16
        guidance_scale: 3.5
        sample_steps: 2
        seed: 7
        samples:
          - prompt: "a red fox running in the snow"
"""


@pytest.fixture(scope="module")
def wan22(tmp_path_factory, quiet_diffusers, single_threaded_torch) -> Path:
    folder = tmp_path_factory.mktemp("tiny-wan") / tiny_wan_name("2.2")
    return save_tiny_wan(folder, "2.2")


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, dict[str, int], bytes | None]]:
    """Each LoRA the daemon's renderer put into the experts: (the path it was handed, layers per
    expert, the bytes of the split sibling beside that path then; the cache drops it once rendered)."""
    calls: list[tuple[Path, dict[str, int], bytes | None]] = []
    apply = ExpertSlot.apply

    def recording(self, path, **options):
        report = apply(self, path, **options)
        sibling = split_sibling(Path(path))
        beside = sibling.read_bytes() if sibling is not None and sibling.is_file() else None
        calls.append((Path(path), dict(report.injected), beside))
        return report

    monkeypatch.setattr(ExpertSlot, "apply", recording)
    return calls


def watch_once(root: Path, model: Path, *, low: bool) -> tuple[Path, int]:
    """The daemon's `--once` on the run folder `root/output/NAME`: (the run folder, exit code)."""
    config = root / "train.yaml"
    config.write_text(
        CONFIG.format(name=NAME, training_folder=root / "output", model=model, low=str(low).lower())
    )
    run = root / "output" / NAME
    request = WatchRequest(
        output_dir=run, config_path=config, overrides={"device": "cpu", "settle_seconds": 0.0}, once=True
    )
    return run, run_watch(request)


def frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as image:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]


def test_a_step_written_as_high_then_low_renders_once_with_both_experts(tmp_path, wan22, applied) -> None:
    pair = tmp_path / "pair"
    high, low = write_wan22_loras(wan22, pair / "output" / NAME, f"{NAME}_000000250", seed=3)
    run, code = watch_once(pair, wan22, low=True)

    assert code == 0
    with JobStore(SamplesFolder(run / "samples").jobs) as store:
        (job,) = store.checkpoints()
    assert (job.step, job.path, job.state) == (250, high, "done")
    assert sorted(path.name for path in (run / "samples").glob("step_*")) == ["step_000250"]
    (handed, injected, beside), *more = applied
    assert more == []
    assert injected == {"transformer": 20, "transformer_2": 20}  # both experts' LoRAs, in one job
    assert handed.name == high.name and beside == low.read_bytes()
    assert SamplesFolder(run / "samples").cache in handed.parents  # the copy taken before any pruning

    # The same high-noise file alone (a run training that expert only): other frames, so the
    # low-noise LoRA did change the samples above.
    alone = tmp_path / "alone"
    [same_high] = write_wan22_loras(
        wan22, alone / "output" / NAME, f"{NAME}_000000250", seed=3, experts=("high",)
    )
    assert same_high.read_bytes() == high.read_bytes()
    written = time.time() - 2 * SIBLING_GRACE_SECONDS  # saved a while before the daemon started
    os.utime(same_high, (written, written))
    alone_run, code = watch_once(alone, wan22, low=False)

    assert code == 0 and applied[1][1:] == ({"transformer": 20}, None)
    with_pair = frames(run / "samples" / "step_000250" / "sample_00.webp")
    high_only = frames(alone_run / "samples" / "step_000250" / "sample_00.webp")
    assert len(with_pair) == len(high_only) == 5
    assert not all(np.array_equal(a, b) for a, b in zip(with_pair, high_only, strict=True))


def test_a_run_training_only_the_high_noise_expert_renders_every_step(tmp_path, wan22, applied) -> None:
    """`train_low_noise: false`: one file per step, ever; each step renders once its grace is over
    (here at once: the files were written longer ago than the grace)."""
    folder = tmp_path / "output" / NAME
    written = time.time() - 2 * SIBLING_GRACE_SECONDS
    for step in (250, 500):
        [high] = write_wan22_loras(wan22, folder, f"{NAME}_{step:09d}", seed=step, experts=("high",))
        os.utime(high, (written, written))

    run, code = watch_once(tmp_path, wan22, low=False)

    assert code == 0
    with JobStore(SamplesFolder(run / "samples").jobs) as store:
        assert sorted((job.step, job.state) for job in store.checkpoints()) == [(250, "done"), (500, "done")]
    assert sorted(path.name for path in (run / "samples").glob("step_*")) == ["step_000250", "step_000500"]
    assert [injected for _, injected, _ in applied] == [{"transformer": 20}] * 2
