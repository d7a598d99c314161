"""sidecar/plan/onetrainer.py: a OneTrainer config.json and its sample list, with OneTrainer's meaning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from factories import FIXTURES

from sidecar.errors import ConfigError
from sidecar.plan.build import build_plan
from sidecar.plan.config import load_trainer_config
from sidecar.plan.request import Cadence

ONETRAINER = FIXTURES / "onetrainer"
SDXL = ONETRAINER / "configs" / "#sdxl 1.0 LoRA.json"
SD3 = ONETRAINER / "configs" / "#sd 3 LoRA.json"
FLUX_COPY = ONETRAINER / "workspace" / "flux-run" / "config" / "2026-08-01_12-00-00.json"


def test_sdxl_config_with_its_sample_file(rows) -> None:
    config = load_trainer_config(SDXL)
    assert (config.trainer, config.arch, config.model.name_or_path) == (
        "OneTrainer",
        "sdxl",
        "stabilityai/stable-diffusion-xl-base-1.0",
    )
    # `training_samples/samples.json` is relative to OneTrainer's folder, above `configs/`
    assert config.prompts_file == (ONETRAINER / "training_samples" / "samples.json").resolve()
    plan = build_plan(config)
    assert rows(plan) == [
        (
            "photo of ohwx man in a leather jacket, city street at night",
            "1024x1024",
            30,
            "euler_a",
            7.5,
            1.0,
            42,
            1.0,
        ),
        ("ohwx man as an astronaut, studio lighting", "832x1216", 40, "dpmpp_2m_karras", 6.0, 1.0, 1234, 1.0),
        # width 1000 is rendered at 1024 (OneTrainer rounds to 64); random_seed: a new seed per step
        ("ohwx man reading a book in a cafe", "1024x1024", 30, "euler", 7.5, 1.0, "per step", 1.0),
    ]  # the fourth sample is `enabled: false`
    assert plan.requests[0].negative_prompt == "blurry, deformed"
    assert plan.image_format == "jpg"
    # sample_after: 10 MINUTE: wall time between samples
    assert (plan.sample_every, plan.cadence) == (None, Cadence(every=600.0, unit="second"))


def test_sd3_epoch_cadence_and_flow_sampler(rows) -> None:
    plan = build_plan(load_trainer_config(SD3))
    assert rows(plan) == [
        ("a watercolor painting of ohwx castle", "1024x1024", 28, "flowmatch", 7.0, 1.0, 42, 1.0),
        ("ohwx castle at dawn, photo", "1344x768", 28, "flowmatch", 4.5, 1.0, 5, 1.0),
    ]  # OneTrainer's SD3 sampler uses the model's flow scheduler whatever `noise_scheduler` says
    assert (plan.image_format, plan.cadence) == ("png", Cadence(every=2, unit="epoch", start_epoch=1))


def test_flux_workspace_copy_with_inline_samples(rows) -> None:
    config = load_trainer_config(FLUX_COPY)
    assert config.run_dir == (ONETRAINER / "workspace" / "flux-run").resolve()
    plan = build_plan(config)
    assert rows(plan) == [
        ("ohwx woman holding a sign that says 'OneTrainer'", "1024x1024", 30, "flowmatch", 3.5, 1.0, 42, 1.0),
        (
            "ohwx woman hiking in the alps, golden hour",
            "896x1152",
            24,
            "flowmatch",
            4.0,
            1.0,
            "per step",
            1.0,
        ),
    ]
    # OneTrainer's Flux sampler never uses the negative prompt
    assert plan.requests[0].negative_prompt == ""
    assert (plan.sample_every, plan.cadence) == (250, Cadence(start_step=500))


def test_sample_list_as_prompts_for_another_config() -> None:
    config = load_trainer_config(FIXTURES / "aitoolkit_sdxl.yaml")
    plan = build_plan(config, prompts_file=ONETRAINER / "training_samples" / "samples.json")
    assert [r.prompt for r in plan.requests] == [
        "photo of ohwx man in a leather jacket, city street at night",
        "ohwx man as an astronaut, studio lighting",
        "ohwx man reading a book in a cafe",
    ]


def test_flux_ignores_noise_scheduler_at_debug(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    data = json.loads(FLUX_COPY.read_text())
    data["samples"][0]["noise_scheduler"] = "EULER_A"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.DEBUG, logger="sidecar.plan"):
        plan = build_plan(load_trainer_config(path))
    assert plan.requests[0].sampler == "flowmatch"
    assert (
        f"{path} /samples/0/noise_scheduler: not used by sidecar: OneTrainer's flux sampler always"
        in caplog.text
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "PIXART_SIGMA"}, "/model_type: 'PIXART_SIGMA' is not a model sidecar renders"),
        ({"sample_after_unit": "WEEK"}, "/sample_after_unit: must be one of epoch, step"),
        ({"sample_definition_file_name": "nowhere.json"}, "/sample_definition_file_name: names prompt file"),
    ],
    ids=["model-type", "unit", "sample-file"],
)
def test_bad_config_values_are_located_by_json_pointer(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**json.loads(SDXL.read_text()), **change}))
    with pytest.raises(ConfigError) as caught:
        build_plan(load_trainer_config(path))
    assert str(caught.value).startswith(f"{path} {message}")


def test_bad_sample_values_are_located_by_json_pointer(tmp_path: Path) -> None:
    samples = json.loads((ONETRAINER / "training_samples" / "samples.json").read_text())
    samples[1]["diffusion_steps"] = "forty"
    (tmp_path / "s.json").write_text(json.dumps(samples))
    config = load_trainer_config(SDXL)
    with pytest.raises(ConfigError) as caught:
        build_plan(config, prompts_file=tmp_path / "s.json")
    assert (
        str(caught.value)
        == f"{tmp_path / 's.json'} /1/diffusion_steps: must be a positive integer, got 'forty'"
    )
    samples[1]["diffusion_steps"] = 40
    samples[1]["noise_scheduler"] = "HEUN"
    (tmp_path / "s.json").write_text(json.dumps(samples))
    with pytest.raises(ConfigError) as caught:
        build_plan(config, prompts_file=tmp_path / "s.json")
    assert str(caught.value).startswith(
        f"{tmp_path / 's.json'} /1/noise_scheduler: `sampler` 'HEUN' is not a onetrainer sampler name"
    )
