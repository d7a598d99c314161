"""sidecar.sampling: a checkpoint's plan to files, the CUDA OOM fallback, `sidecar render`."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import sample_request
from PIL import Image

from sidecar.app.render_cmd import checkpoint_step, render_command
from sidecar.app.rendering import open_renderer as load_renderer
from sidecar.app.rendering import render_samples
from sidecar.errors import CheckpointError, ModelError, SidecarError, TransientError
from sidecar.plan.build import build_plan
from sidecar.plan.config import load_trainer_config
from sidecar.plan.request import SampleRequest
from sidecar.publish.files import read_infotext
from sidecar.render import devices
from sidecar.render.memory import MemoryPolicy, Placement


def request(index: int, *, seed: int = 1) -> SampleRequest:
    return sample_request(
        index=index, prompt=f"prompt {index}", steps=2, guidance_scale=5.0, sampler="euler", seed=seed
    )


class FakeRenderer:
    """Yields solid images; raises CUDA OOM on the chosen calls, as a too-small card does."""

    def __init__(self, *, oom_on_calls: set[int] = frozenset(), placement: Placement | None = None) -> None:
        self.oom_on_calls = oom_on_calls
        self.placement = placement
        self.calls = 0
        self.lora = None
        self.base_model = "tiny"
        self.pipe = object()
        self.spec = type("Spec", (), {"name": "sdxl"})()

    def render(self, requests, *, batch_size=1):
        for item in requests:
            self.calls += 1
            if self.calls in self.oom_on_calls:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            yield item, Image.new("RGB", (item.width, item.height), (item.index * 40, 0, 0))


@pytest.fixture
def fake_cuda_placement(monkeypatch):
    """A placement on a pretend `cuda:0` whose mode changes are recorded, not applied."""
    applied: list[str] = []
    monkeypatch.setattr(devices, "apply_memory_mode", lambda pipe, mode, device: applied.append(mode) or mode)
    monkeypatch.setattr(devices, "free_cuda_cache", lambda device=None: None)
    placement = Placement(device=torch.device("cuda", 0), policy=MemoryPolicy("none"))
    return placement, applied


def test_every_request_lands_as_image_and_prompt_file(tmp_path):
    rendered = render_samples(FakeRenderer(), [request(0), request(1)], samples_dir=tmp_path, step=500)
    assert [sample.request.index for sample in rendered] == [0, 1]
    for index in (0, 1):
        assert (tmp_path / "step_000500" / f"sample_{index:02d}.png").is_file()
        assert (tmp_path / "step_000500" / f"sample_{index:02d}.txt").read_text() == f"prompt {index}\n"
    assert "Seed: 1" in read_infotext(tmp_path / "step_000500" / "sample_00.png")


def test_should_stop_keeps_what_is_written_and_leaves_the_rest(tmp_path):
    rendered = render_samples(
        FakeRenderer(),
        [request(0), request(1), request(2)],
        samples_dir=tmp_path,
        step=1,
        should_stop=lambda: True,
    )
    assert [sample.request.index for sample in rendered] == [0]
    assert sorted(p.name for p in (tmp_path / "step_000001").glob("*.png")) == ["sample_00.png"]


def test_cuda_oom_steps_to_a_stronger_mode_and_renders_the_rest(tmp_path, fake_cuda_placement, caplog):
    placement, applied = fake_cuda_placement
    renderer = FakeRenderer(oom_on_calls={2}, placement=placement)
    rendered = render_samples(renderer, [request(0), request(1), request(2)], samples_dir=tmp_path, step=7)
    assert [sample.request.index for sample in rendered] == [0, 1, 2]  # nothing lost, nothing twice
    assert applied == ["model"]
    assert placement.mode == "model"  # kept for later checkpoints
    assert "CUDA out of memory with offload=none; retrying with offload=model" in caplog.text


def test_cuda_oom_in_the_leanest_mode_is_a_transient_error(tmp_path, fake_cuda_placement):
    placement, applied = fake_cuda_placement
    placement.policy = MemoryPolicy("sequential")
    with pytest.raises(TransientError, match="even with offload=sequential"):
        render_samples(
            FakeRenderer(oom_on_calls={1}, placement=placement), [request(0)], samples_dir=tmp_path, step=1
        )
    assert applied == []


def test_cuda_oom_without_a_placement_is_raised_as_is(tmp_path):
    with pytest.raises(torch.cuda.OutOfMemoryError):
        render_samples(FakeRenderer(oom_on_calls={1}), [request(0)], samples_dir=tmp_path, step=1)


def test_placement_parks_and_unparks_only_on_cuda(monkeypatch):
    moves: list[str] = []
    monkeypatch.setattr(devices, "park", lambda pipe, device=None: moves.append("park"))
    monkeypatch.setattr(devices, "unpark", lambda pipe, device, mode: moves.append(f"unpark:{mode}"))
    on_cpu = Placement(device=torch.device("cpu"), policy=MemoryPolicy("none"))
    on_cpu.park(object())
    assert moves == [] and not on_cpu.parked
    on_gpu = Placement(device=torch.device("cuda", 1), policy=MemoryPolicy("model"))
    on_gpu.park(object())
    on_gpu.park(object())  # parking twice moves nothing twice
    on_gpu.unpark(object())
    on_gpu.unpark(object())
    assert moves == ["park", "unpark:model"]


# ---------------------------------------------------------------------------------
# With the tiny SDXL model: `sidecar render`, the step, located model errors
# ---------------------------------------------------------------------------------


def write_config(folder: Path, model: Path | str, *, extra: str = "") -> Path:
    path = folder / "train.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            job: extension
            config:
              name: my_lora
              process:
                - type: sd_trainer
                  training_folder: {folder / "output"}
                  trigger_word: sks
                  model:
                    name_or_path: {model}
                    arch: sdxl
            {textwrap.indent(extra, " " * 6)}
                  sample:
                    sampler: euler_a
                    width: 64
                    height: 64
                    sample_steps: 2
                    prompts:
                      - "a photo of [trigger] dog --n blurry"
                      - "[trigger] in a forest --seed 7 --m 0.5"
            """
        )
    )
    return path


def test_render_command_writes_the_step_folder_grid_and_gallery(tmp_path, tiny_models, tiny_lora):
    lora_dir = tmp_path / "output" / "my_lora"
    lora_dir.mkdir(parents=True)
    checkpoint = lora_dir / "my_lora_000000500.safetensors"
    checkpoint.write_bytes(tiny_lora("sdxl", "kohya_sgm").read_bytes())
    config = write_config(tmp_path, tiny_models["sdxl"])

    assert render_command(checkpoint=checkpoint, config_path=config, overrides={"device": "cpu"}) == 0
    assert (
        render_command(checkpoint=None, config_path=config, baseline=True, overrides={"device": "cpu"}) == 0
    )

    samples = lora_dir / "samples"
    for step in ("step_000500", "step_000000"):
        names = sorted(p.name for p in (samples / step).iterdir())
        assert names == ["grid.png", "sample_00.png", "sample_00.txt", "sample_01.png", "sample_01.txt"]
    assert (samples / "step_000500" / "sample_00.txt").read_text() == "a photo of sks dog\n"
    assert "Lora: my_lora_000000500.safetensors" in read_infotext(samples / "step_000500" / "sample_00.png")
    with_lora = np.asarray(Image.open(samples / "step_000500" / "sample_00.png"))
    baseline = np.asarray(Image.open(samples / "step_000000" / "sample_00.png"))
    assert np.abs(with_lora.astype(int) - baseline).max() > 10  # the LoRA applied
    assert (samples / "index.html").is_file()


def test_render_command_keeps_samples_on_disk_unless_forced(tmp_path, tiny_models, tiny_lora, caplog):
    lora_dir = tmp_path / "output" / "my_lora"
    lora_dir.mkdir(parents=True)
    checkpoint = lora_dir / "my_lora_000000500.safetensors"
    checkpoint.write_bytes(tiny_lora("sdxl").read_bytes())
    config = write_config(tmp_path, tiny_models["sdxl"])
    step = lora_dir / "samples" / "step_000500"
    assert render_command(checkpoint=checkpoint, config_path=config, overrides={"device": "cpu"}) == 0
    (step / "sample_01.png").unlink()  # a render killed before its last image
    kept = (step / "sample_00.png").stat().st_mtime_ns

    assert render_command(checkpoint=checkpoint, config_path=config, overrides={"device": "cpu"}) == 0
    assert (step / "sample_01.png").is_file()
    assert (step / "sample_00.png").stat().st_mtime_ns == kept  # not rendered twice
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sidecar.render"):
        assert render_command(checkpoint=checkpoint, config_path=config, overrides={"device": "cpu"}) == 0
    assert "already has its 2 sample(s)" in caplog.text

    assert (
        render_command(checkpoint=checkpoint, config_path=config, force=True, overrides={"device": "cpu"})
        == 0
    )
    assert (step / "sample_00.png").stat().st_mtime_ns != kept


def test_render_command_needs_a_checkpoint_or_baseline(tmp_path, tiny_models):
    config = write_config(tmp_path, tiny_models["sdxl"])
    with pytest.raises(SidecarError, match="needs a CHECKPOINT"):
        render_command(checkpoint=None, config_path=config)


def test_missing_base_model_is_located_in_the_config(tmp_path):
    config = load_trainer_config(write_config(tmp_path, tmp_path / "no-such-model"))
    with pytest.raises(ModelError) as error:
        load_renderer(config, config.sidecar.merged(device="cpu"))
    assert str(error.value).startswith(f"{config.path}:9 config.process[0].model.name_or_path: no such file")


def test_missing_vae_file_names_its_key_and_line(tmp_path, tiny_models):
    config = load_trainer_config(
        write_config(tmp_path, tiny_models["sdxl"], extra=f"  vae_path: {tmp_path / 'vae.safetensors'}\n")
    )
    with pytest.raises(
        ModelError, match=r"train\.yaml:\d+ config\.process\[0\]\.model\.vae_path: no such file"
    ):
        load_renderer(config, config.sidecar.merged(device="cpu"))


def test_step_comes_from_the_file_name_or_its_metadata(tmp_path, tiny_models):
    from sidecar.testing.loras import write_lora

    named = write_lora(tiny_models["sdxl"], "sdxl", tmp_path / "run" / "my_lora_000001500.safetensors")
    assert checkpoint_step(named) == 1500
    kohya = write_lora(
        tiny_models["sdxl"],
        "sdxl",
        tmp_path / "run" / "final.safetensors",
        lora_format="kohya",
        metadata={"ss_steps": "2000"},
    )
    assert checkpoint_step(kohya) == 2000
    unknown = write_lora(tiny_models["sdxl"], "sdxl", tmp_path / "run" / "mystery.safetensors")
    with pytest.raises(CheckpointError, match="pass `--step N`"):
        checkpoint_step(unknown)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint_step(tmp_path / "gone.safetensors")


def test_the_plan_of_a_real_config_renders_through_the_renderer(tmp_path, tiny_models):
    config = load_trainer_config(write_config(tmp_path, tiny_models["sdxl"]))
    renderer = load_renderer(config, config.sidecar.merged(device="cpu"))
    assert renderer.placement is not None and renderer.placement.mode == "none"
    rendered = render_samples(renderer, build_plan(config).requests, samples_dir=tmp_path / "s", step=0)
    assert len(rendered) == 2


def recorded_run(tmp_path: Path, tiny_models, tiny_lora) -> tuple[Path, Path, Path]:
    """A daemon run (`watch --once`) that recorded step 500: (config, checkpoint, samples dir)."""
    from sidecar.daemon import DaemonSettings

    from sidecar.app.watch import run_watch as run_daemon

    lora_dir = tmp_path / "output" / "my_lora"
    lora_dir.mkdir(parents=True)
    checkpoint = lora_dir / "my_lora_000000500.safetensors"
    checkpoint.write_bytes(tiny_lora("sdxl").read_bytes())
    config = write_config(tmp_path, tiny_models["sdxl"])
    settings = DaemonSettings(
        output_dir=lora_dir, config_path=config, device="cpu", once=True, settle_seconds=0.0
    )
    assert run_daemon(settings) == 0
    return config, checkpoint, lora_dir / "samples"


def test_render_step_force_renders_the_recorded_checkpoint_again(tmp_path, tiny_models, tiny_lora):
    config, _, samples = recorded_run(tmp_path, tiny_models, tiny_lora)
    image = samples / "step_000500" / "sample_00.png"
    before = image.stat().st_mtime_ns
    assert (
        render_command(checkpoint=None, config_path=config, step=500, force=True, overrides={"device": "cpu"})
        == 0
    )
    assert image.stat().st_mtime_ns != before
    with pytest.raises(CheckpointError, match="no checkpoint at step 700 is recorded"):
        render_command(checkpoint=None, config_path=config, step=700, force=True)


def test_render_step_of_a_pruned_checkpoint_says_so(tmp_path, tiny_models, tiny_lora):
    config, checkpoint, _ = recorded_run(tmp_path, tiny_models, tiny_lora)
    checkpoint.unlink()
    with pytest.raises(CheckpointError, match="is gone"):
        render_command(checkpoint=None, config_path=config, step=500, force=True)


def test_render_step_force_hands_the_step_to_a_running_daemon(tmp_path, tiny_models, tiny_lora):
    import os

    from sidecar.app.state import write_state_file
    from sidecar.app.status import find_job_store
    from sidecar.jobs.store import JobStore

    config, _, samples = recorded_run(tmp_path, tiny_models, tiny_lora)
    write_state_file(samples, {"pid": os.getpid(), "state": "idle", "since": 0.0})  # "a daemon runs"
    with pytest.raises(SidecarError, match="`--force` queues step 500 for it"):
        render_command(checkpoint=None, config_path=config, step=500)
    assert render_command(checkpoint=None, config_path=config, step=500, force=True) == 0
    with JobStore(find_job_store(samples), now=0.0) as store:
        (job,) = store.checkpoints()
        assert {sample.state for sample in store.samples(job.id)} == {"pending"}
