"""sidecar/plan/simpletuner.py: config.json / config.toml / config.env and the user prompt library."""

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

SIMPLETUNER = FIXTURES / "simpletuner"
CONFIG = SIMPLETUNER / "config"


def test_flux_json_library_and_every_resolution(rows) -> None:
    config = load_trainer_config(CONFIG / "config.json")
    assert (config.trainer, config.arch, config.model.name_or_path) == (
        "SimpleTuner",
        "flux",
        "black-forest-labs/FLUX.1-dev",
    )
    # `--output_dir output/models` is relative to SimpleTuner's folder, the one holding `config/`
    assert config.run_dir == SIMPLETUNER.resolve() / "output" / "models"
    assert config.prompts_file == (CONFIG / "user_prompt_library.json").resolve()
    plan = build_plan(config)
    expected = []
    # the unconditional sample first, then the library, then --validation_prompt; each at every size
    for prompt, strength in (
        ("", 1.0),
        ("the cat sitting on a windowsill at night, city lights behind it", 1.0),
        ("studio portrait of the cat, soft light", 0.8),  # the entry's `adapter_strength`
        ("A photo-realistic image of a cat", 1.0),
    ):
        for size in ("1024x1024", "1280x768"):
            expected.append((prompt, size, 20, "flowmatch", 3.0, 1.0, 42, strength))
    assert rows(plan) == expected
    assert {r.negative_prompt for r in plan.requests} == {"blurry, cropped, ugly"}  # SimpleTuner's default
    assert [r.index for r in plan.requests] == list(range(8))
    assert (plan.sample_every, plan.cadence, plan.image_format) == (500, None, "png")


def test_sdxl_toml_randomized_seeds_and_start_step(rows) -> None:
    plan = build_plan(load_trainer_config(CONFIG / "sdxl" / "config.toml"))
    assert rows(plan) == [
        ("", "1024x1024", 30, "euler_a", 6.5, 1.0, "per step", 1.0),
        ("a photo of sks dog in a bucket", "1024x1024", 30, "euler_a", 6.5, 1.0, "per step", 1.0),
    ]
    assert (plan.sample_every, plan.cadence) == (250, Cadence(start_step=500))


def test_sd3_env_with_extra_args(rows) -> None:
    config = load_trainer_config(CONFIG / "sd3" / "config.env")
    assert (config.arch, config.model.name_or_path) == ("sd3", "stabilityai/stable-diffusion-3.5-medium")
    plan = build_plan(config)
    # TRAINER_EXTRA_ARGS turns the unconditional sample off and picks UniPC (flow UniPC on SD 3.5)
    assert rows(plan) == [
        ("a photograph of a red fox in the snow", "1024x1024", 28, "unipc", 5.0, 1.0, 7, 1.0)
    ]
    assert plan.requests[0].negative_prompt == "lowres, watermark"
    assert plan.sample_every == 150


def test_defaults_when_only_the_family_is_given(tmp_path: Path, rows) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_family": "sd3", "validation_prompt": "a fox"}))
    config = load_trainer_config(tmp_path / "config.json")
    assert config.model.name_or_path == "stabilityai/stable-diffusion-3.5-medium"  # DEFAULT_MODEL_FLAVOUR
    # validation_resolution "256", 30 steps, guidance 7.5, `validation_seed or seed or 0`
    assert rows(build_plan(config))[-1] == ("a fox", "256x256", 30, "flowmatch", 7.5, 1.0, 0, 1.0)


@pytest.mark.parametrize(
    ("value", "sizes"),
    [("1024", [(1024, 1024)]), ("1", [(1024, 1024)]), ("832x1216, 1024", [(832, 1216), (1024, 1024)])],
)
def test_validation_resolution_forms(tmp_path: Path, value: str, sizes: list) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"--model_family": "sdxl", "--validation_resolution": value})
    )
    assert list(load_trainer_config(tmp_path / "config.json").resolutions) == sizes


def test_true_cfg_and_lycoris_strength_on_flux(tmp_path: Path, rows) -> None:
    args = {
        "model_family": "flux",
        "lora_type": "lycoris",
        "validation_lycoris_strength": 0.7,
        "validation_guidance_real": 4.0,
        "validation_disable_unconditional": True,
        "validation_prompt": "a cat",
    }
    (tmp_path / "config.json").write_text(json.dumps(args))
    config = load_trainer_config(tmp_path / "config.json")
    assert config.model.name_or_path == "black-forest-labs/flux.1-krea-dev"  # the default flavour
    assert rows(build_plan(config)) == [("a cat", "256x256", 30, "flowmatch", 7.5, 4.0, 0, 0.7)]


def test_settings_sidecar_does_not_follow_are_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    args = {
        "model_family": "sdxl",
        "validation_prompt": "a",
        "num_validation_images": 4,
        "validation_guidance_rescale": 0.7,
        "validation_prompt_library": "true",
    }
    (tmp_path / "config.json").write_text(json.dumps(args))
    with caplog.at_level(logging.DEBUG, logger="sidecar.plan"):
        load_trainer_config(tmp_path / "config.json")
    assert "/num_validation_images: sidecar renders one image per prompt and size" in caplog.text
    assert "/validation_guidance_rescale: not used by sidecar" in caplog.text
    assert (
        "/validation_prompt_library: SimpleTuner's built-in prompt library is not part of sidecar"
        in caplog.text
    )


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "config.json",
            '{"model_family": "wan"}',
            " /model_family: model family 'wan' is not one sidecar renders",
        ),
        (
            "config.json",
            '{"model_family": "sdxl", "--validation_guidance": "high"}',
            " /--validation_guidance: must be a non-negative number, got 'high'",
        ),
        (
            "config.toml",
            'model_family = "sdxl"\nvalidation_resolution = "wide"\n',
            ":2 validation_resolution: must be W, WxH or a comma list of them, got 'wide'",
        ),
        (
            "config.env",
            'export MODEL_FAMILY="flux"\nexport VALIDATION_NUM_INFERENCE_STEPS=0\n',
            ":2 VALIDATION_NUM_INFERENCE_STEPS: must be a positive integer, got '0'",
        ),
    ],
    ids=["family", "json-number", "toml-resolution", "env-steps"],
)
def test_bad_values_are_located(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        build_plan(load_trainer_config(path))
    assert str(caught.value).startswith(f"{path}{message}")


def test_bad_library_entries_are_located(tmp_path: Path) -> None:
    config = load_trainer_config(CONFIG / "config.json")
    (tmp_path / "lib.json").write_text('{"a": "fine", "b": {"prompt": "x", "adapter_strength": "full"}}')
    with pytest.raises(ConfigError) as caught:
        build_plan(config, prompts_file=tmp_path / "lib.json")
    assert str(caught.value) == f"{tmp_path / 'lib.json'} /b/adapter_strength: must be a number, got 'full'"
    (tmp_path / "lib.json").write_text('{"a": {"text": "no prompt key"}}')
    with pytest.raises(ConfigError, match=r" /a: must have a `prompt`, `caption` or `tags` field"):
        build_plan(config, prompts_file=tmp_path / "lib.json")
