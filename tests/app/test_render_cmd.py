"""`sidecar render`: a checkpoint's samples once, the baseline, `--step N --force`, located model errors."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sidecar.app.render_cmd import checkpoint_step, render_command
from sidecar.app.rendering import open_renderer, render_samples
from sidecar.app.watch import WatchRequest, run_watch
from sidecar.errors import CheckpointError, ModelError, SidecarError
from sidecar.plan.build import build_plan
from sidecar.plan.config import load_trainer_config
from sidecar.publish.infotext import read_infotext


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
    with caplog.at_level(logging.INFO, logger="sidecar.app"):
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
        open_renderer(config, config.sidecar.merged(device="cpu"), build_plan(config))
    assert str(error.value).startswith(f"{config.path}:9 config.process[0].model.name_or_path: no such file")


def test_missing_vae_file_names_its_key_and_line(tmp_path, tiny_models):
    config = load_trainer_config(
        write_config(tmp_path, tiny_models["sdxl"], extra=f"  vae_path: {tmp_path / 'vae.safetensors'}\n")
    )
    with pytest.raises(
        ModelError, match=r"train\.yaml:\d+ config\.process\[0\]\.model\.vae_path: no such file"
    ):
        open_renderer(config, config.sidecar.merged(device="cpu"), build_plan(config))


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
    renderer = open_renderer(config, config.sidecar.merged(device="cpu"), build_plan(config))
    assert renderer.placement is not None and renderer.placement.mode == "none"
    rendered = render_samples(renderer, build_plan(config).requests, samples_dir=tmp_path / "s", step=0)
    assert len(rendered) == 2


def recorded_run(tmp_path: Path, tiny_models, tiny_lora) -> tuple[Path, Path, Path]:
    """A daemon run (`watch --once`) that recorded step 500: (config, checkpoint, samples dir)."""
    lora_dir = tmp_path / "output" / "my_lora"
    lora_dir.mkdir(parents=True)
    checkpoint = lora_dir / "my_lora_000000500.safetensors"
    checkpoint.write_bytes(tiny_lora("sdxl").read_bytes())
    config = write_config(tmp_path, tiny_models["sdxl"])
    request = WatchRequest(
        output_dir=lora_dir,
        config_path=config,
        overrides={"device": "cpu", "settle_seconds": 0.0},
        once=True,
    )
    assert run_watch(request) == 0
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
