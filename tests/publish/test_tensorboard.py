"""TensorBoard sink: image summaries read back with TensorBoard's own reader."""

from __future__ import annotations

import importlib.util
import io
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from factories import FIXTURES, sample_request
from PIL import Image

from sidecar.errors import SidecarError
from sidecar.plan.config import load_trainer_config
from sidecar.plan.request import SampleRequest
from sidecar.publish.files import write_sample
from sidecar.publish.tensorboard import TensorBoardSink, sample_tag, tensorboard_dir, tensorboard_dir_for

# The sink's tests need the optional `tensorboard` extra (CI installs it); the rest do not.
needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="pip install 'sidecar[tensorboard]'"
)

REQUEST = sample_request(height=48)
REQUESTS = (REQUEST, replace(REQUEST, index=1, prompt="sks dog, in the SNOW! (watercolour)", seed=43))


def colour(step: int, index: int) -> tuple[int, int, int]:
    return (30 + 100 * index, step // 10 % 256, 90)


def rendered_step(root: Path, step: int, *, image_format: str = "png") -> list[tuple[SampleRequest, Path]]:
    out = []
    for request in REQUESTS:
        paths = write_sample(
            root,
            step,
            request,
            Image.new("RGB", (request.width, request.height), colour(step, request.index)),
            image_format=image_format,
            base_model="sdxl-base",
            lora_name=None if step == 0 else "lora.safetensors",
            arch="sdxl",
        )
        out.append((request, paths.image))
    return out


def read_back(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


@needs_tensorboard
def test_samples_become_images_at_the_checkpoint_step(tmp_path: Path) -> None:
    log_dir = tmp_path / "tb"
    with TensorBoardSink(log_dir) as sink:
        for step in (0, 500, 1000):
            assert sink.add_samples(step, rendered_step(tmp_path / "samples", step)) == 2
    events = read_back(log_dir)
    tags = events.Tags()["images"]
    assert sorted(tags) == ["samples/00_a_photo_of_sks_dog", "samples/01_sks_dog_in_the_snow_watercolour"]
    for tag, request in zip(sorted(tags), REQUESTS, strict=True):
        images = events.Images(tag)
        assert [image.step for image in images] == [0, 500, 1000]
        for image in images:
            assert (image.width, image.height) == (64, 48)
            decoded = Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")
            assert decoded.getpixel((10, 10)) == colour(image.step, request.index)


@needs_tensorboard
def test_jpeg_samples_and_a_size_cap(tmp_path: Path) -> None:
    with TensorBoardSink(tmp_path / "tb", max_size_px=32) as sink:
        sink.add_samples(500, rendered_step(tmp_path / "samples", 500, image_format="jpg"))
    images = read_back(tmp_path / "tb").Images("samples/00_a_photo_of_sks_dog")
    assert [(image.step, image.width, image.height) for image in images] == [(500, 32, 24)]


@needs_tensorboard
def test_an_unreadable_image_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with TensorBoardSink(tmp_path / "tb") as sink:
        written = sink.add_samples(500, [(REQUEST, broken), (REQUESTS[1], tmp_path / "gone.png")])
    assert written == 0
    assert "cannot read" in caplog.text


@needs_tensorboard
def test_a_closed_sink_refuses_samples(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "tb")
    sink.close()
    sink.close()  # twice is fine
    with pytest.raises(SidecarError, match="closed"):
        sink.add_samples(1, [])


def test_missing_package_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)
    with pytest.raises(SidecarError, match=r"pip install 'sidecar\[tensorboard\]'"):
        TensorBoardSink(tmp_path / "tb")


@pytest.mark.parametrize(
    ("prompt", "tag"),
    [
        ("a photo of sks dog", "samples/03_a_photo_of_sks_dog"),
        ("  <Sks> dog, 35mm!!  ", "samples/03_sks_dog_35mm"),
        ("???", "samples/03"),
        ("x" * 100, "samples/03_" + "x" * 40),
    ],
)
def test_sample_tag(prompt: str, tag: str) -> None:
    assert sample_tag(replace(REQUEST, index=3, prompt=prompt)) == tag


def test_log_dir_rule(tmp_path: Path) -> None:
    samples = tmp_path / "output" / "my_lora" / "samples"
    assert tensorboard_dir(log_dir=tmp_path / "logs", name="my_lora", samples_dir=samples) == (
        tmp_path / "logs" / "my_lora_samples"
    )
    assert tensorboard_dir(log_dir=None, name="my_lora", samples_dir=samples) == (
        tmp_path / "output" / "my_lora" / "tensorboard"
    )


def test_the_daemon_writes_tensorboard_only_when_asked_or_when_the_trainer_logs(tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    assert tensorboard_dir_for(option=None, log_dir=None, name="my_lora", samples_dir=samples) is None
    assert (
        tensorboard_dir_for(option=tmp_path / "tb", log_dir=None, name="my_lora", samples_dir=samples)
        == tmp_path / "tb"
    )
    logs = tmp_path / "logs"
    assert (
        tensorboard_dir_for(option=None, log_dir=logs, name="my_lora", samples_dir=samples)
        == logs / "my_lora_samples"
    )
    assert (  # `--tensorboard DIR` wins over the trainer's log_dir
        tensorboard_dir_for(option=tmp_path / "tb", log_dir=logs, name="my_lora", samples_dir=samples)
        == tmp_path / "tb"
    )
    assert tensorboard_dir(log_dir=logs, name="", samples_dir=samples) == logs / "sidecar_samples"


def test_the_log_dir_comes_from_an_ai_toolkit_config(tmp_path: Path) -> None:
    """TrainerConfig.log_dir, read once at load, is what the rule takes."""
    text = (FIXTURES / "aitoolkit_sdxl.yaml").read_text(encoding="utf-8")
    plain = tmp_path / "plain.yaml"
    plain.write_text(text, encoding="utf-8")
    config = load_trainer_config(plain)
    samples = tmp_path / "output" / config.name / "samples"
    assert config.log_dir is None
    assert tensorboard_dir(log_dir=config.log_dir, name=config.name, samples_dir=samples) == (
        tmp_path / "output" / config.name / "tensorboard"
    )
    where = {"option": None, "name": config.name, "samples_dir": samples}
    assert tensorboard_dir_for(log_dir=config.log_dir, **where) is None

    logged = tmp_path / "logged.yaml"
    logged.write_text(
        text.replace("config:\n", f"config:\n  log_dir: {tmp_path / 'logs'}\n", 1), encoding="utf-8"
    )
    config = load_trainer_config(logged)
    assert config.log_dir == tmp_path / "logs"
    expected = tmp_path / "logs" / f"{config.name}_samples"
    assert tensorboard_dir(log_dir=config.log_dir, name=config.name, samples_dir=samples) == expected
    assert tensorboard_dir_for(log_dir=config.log_dir, **where) == expected


def test_a_relative_log_dir_beside_a_flat_config(tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: my_lora\nmodel: {name_or_path: x, arch: sdxl}\nsample: {prompts: [a dog]}\n")
    logging_trainer = tmp_path / "logs.yaml"
    (tmp_path / "logs").mkdir()
    logging_trainer.write_text(plain.read_text() + "log_dir: logs\n")
    config = load_trainer_config(logging_trainer)
    expected = tmp_path / "logs" / "my_lora_samples"
    assert (
        tensorboard_dir_for(option=None, log_dir=config.log_dir, name=config.name, samples_dir=samples)
        == expected
    )


def test_without_the_extra_the_trainers_log_dir_is_a_warning_not_a_failure(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """A config naming `log_dir` must not stop the daemon when `tensorboard` is not installed."""
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)
    samples = tmp_path / "samples"
    with caplog.at_level("WARNING", logger="sidecar.publish"):
        got = tensorboard_dir_for(option=None, log_dir=tmp_path / "logs", name="run", samples_dir=samples)
    assert got is None
    assert [r.message.count("not installed") for r in caplog.records] == [1]
    assert "pip install 'sidecar[tensorboard]'" in caplog.text
    # Asked for by name, it is still needed: the sink says what to install.
    option = tmp_path / "tb"
    assert tensorboard_dir_for(option=option, log_dir=None, name="run", samples_dir=samples) == option


def test_the_daemon_runs_without_the_extra_when_the_trainer_logs(
    tmp_path: Path, monkeypatch, tiny_sdxl
) -> None:
    from sidecar.app.watch import WatchRequest, run_watch

    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)
    config = tmp_path / "train.yaml"
    config.write_text(
        "job: extension\nconfig:\n  name: run\n  log_dir: logs\n  process:\n    - type: sd_trainer\n"
        "      model:\n        name_or_path: org/not-loaded\n        arch: sdxl\n"
        "      sample:\n        prompts: ['a photo']\n        width: 64\n        height: 64\n"
    )

    class NoRenderer:
        pass

    request = WatchRequest(
        output_dir=tmp_path / "out", config_path=config, overrides={"device": "cpu"}, once=True
    )
    assert run_watch(request, renderer_factory=NoRenderer) == 0
    assert not (tmp_path / "logs").exists()
