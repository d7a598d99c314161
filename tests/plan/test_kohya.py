"""sidecar/plan/kohya.py and kohya_prompts.py: sd-scripts and musubi-tuner configs and prompt files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from factories import FIXTURES

from sidecar.errors import ConfigError
from sidecar.plan.build import build_plan
from sidecar.plan.config import load_trainer_config
from sidecar.plan.request import Cadence, SamplePlan

KOHYA = FIXTURES / "kohya"
MUSUBI = FIXTURES / "musubi"


def plan(path: Path, **kwargs: object) -> SamplePlan:
    return build_plan(load_trainer_config(path), **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the fixtures give the expected plan


def test_sdxl_txt_prompts_with_kohyas_sampler_names(rows) -> None:
    config = load_trainer_config(KOHYA / "sdxl.toml")
    assert (config.trainer, config.arch, config.trigger_word) == ("kohya sd-scripts", "sdxl", None)
    assert config.model.name_or_path == str((KOHYA / "models/stable-diffusion-xl-base-1.0").resolve())
    assert config.prompts_file == (KOHYA / "sdxl_prompts.txt").resolve()
    assert config.name == "my_sdxl_lora"
    result = build_plan(config)
    negative = "low quality, worst quality, bad anatomy,bad composition, poor, low effort"
    assert rows(result) == [
        (
            "masterpiece, best quality, 1girl, in white shirts, upper body, looking at viewer, "
            "simple background",
            "768x768",
            28,
            "euler",  # `sample_sampler = "k_euler"`: kohya's plain Euler, not Karras
            7.5,
            1.0,
            1,
            1.0,
        ),
        (
            "masterpiece, best quality, 1boy, in business suit, standing at street, looking back",
            "576x832",
            40,
            "euler",
            5.5,
            1.0,
            2,
            1.0,
        ),
        # kohya's defaults for a bare line: 512 px, 30 steps, scale 7.5; no --d: a new seed per step
        ("sks dog sitting on a beach at sunset", "512x512", 30, "dpm_2_a", 7.5, 1.0, "per step", 1.0),
    ]
    assert [r.negative_prompt for r in result.requests] == [negative, negative, ""]
    # sample_every_n_epochs = 2: an epoch cadence, not steps
    assert (result.sample_every, result.cadence) == (None, Cadence(every=2, unit="epoch"))


def test_flux_toml_prompts_embedded_guidance_and_true_cfg(rows) -> None:
    config = load_trainer_config(KOHYA / "flux.toml")
    assert config.arch == "flux"
    assert (
        config.model.name_or_path,
        config.model.vae_path,
        config.model.clip_l_path,
        config.model.t5_path,
    ) == (
        "/models/flux1-dev.safetensors",
        "/models/ae.safetensors",
        "/models/clip_l.safetensors",
        "/models/t5xxl_fp16.safetensors",
    )
    result = build_plan(config)
    assert rows(result) == [
        (
            "a photo of sks woman holding a sign that says 'hello'",
            "1024x1024",
            20,
            "flowmatch",
            3.5,
            1.0,
            42,
            1.0,
        ),
        ("sks woman in a flower garden, oil painting", "832x1216", 20, "flowmatch", 3.5, 3.0, 43, 1.0),
    ]
    assert result.requests[1].negative_prompt == "blurry, lowres"
    assert (result.sample_every, result.cadence) == (250, None)


def test_sd3_json_prompts_mix_mappings_and_lines(rows) -> None:
    result = plan(KOHYA / "sd3.toml")
    assert rows(result) == [
        ("a photo of sks cat sleeping on a windowsill", "1024x1024", 28, "flowmatch", 5.0, 1.0, 7, 1.0),
        ("sks cat wearing a tiny crown", "832x1216", 30, "flowmatch", 4.5, 1.0, 11, 1.0),
    ]
    assert [r.negative_prompt for r in result.requests] == ["lowres, bad anatomy", "blurry"]
    assert result.sample_every == 200


def test_musubi_kontext_carries_control_images(rows) -> None:
    config = load_trainer_config(MUSUBI / "kontext.toml")
    assert (config.trainer, config.arch, config.dialect) == ("musubi-tuner", "flux_kontext", "musubi")
    assert (config.model.name_or_path, config.model.t5_path, config.model.clip_l_path) == (
        "/models/flux1-kontext-dev.safetensors",
        "/models/t5xxl_fp16.safetensors",
        "/models/clip_l.safetensors",
    )
    result = build_plan(config)
    assert rows(result) == [
        ("make the cat wear a red scarf", "1024x1024", 28, "flowmatch", 2.5, 1.0, 1, 1.0),
        ("turn the photo into a watercolor painting", "1024x768", 28, "flowmatch", 2.5, 1.0, "per step", 1.0),
    ]
    assert [r.control_images for r in result.requests] == [
        (str((MUSUBI / "control/cat.png").resolve()),),
        (str((MUSUBI / "control/street.png").resolve()),),
    ]
    assert result.cadence == Cadence(every=2, unit="epoch")


def test_musubi_frames_and_start_image_flags(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text(
        "a cat walks --w 640 --h 480 --f 25 --d 1 --s 20 --i start.png --g 6 --l 4\n"
    )
    (tmp_path / "c.toml").write_text(
        'dit = "/m/kontext.safetensors"\nnetwork_module = "networks.lora_flux"\nsample_prompts = "p.txt"\n'
    )
    (request,) = plan(tmp_path / "c.toml").requests
    assert (request.num_frames, request.init_image, request.guidance_scale, request.true_cfg_scale) == (
        25,
        "start.png",
        6.0,
        4.0,
    )


# ------------------------------------------------------------------ trainer meaning


def test_sample_every_n_epochs_overrides_steps_in_sd_scripts_but_not_musubi(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a\n")
    base = 'network_module = "networks.lora_flux"\nsample_prompts = "p.txt"\n'
    cadence = "sample_every_n_steps = 100\nsample_every_n_epochs = 3\n"
    (tmp_path / "sd.toml").write_text(f'pretrained_model_name_or_path = "/m/f.safetensors"\n{base}{cadence}')
    result = plan(tmp_path / "sd.toml")
    assert (result.sample_every, result.cadence) == (None, Cadence(every=3, unit="epoch"))
    (tmp_path / "mu.toml").write_text(f'dit = "/m/k.safetensors"\n{base}{cadence}')
    result = plan(tmp_path / "mu.toml")
    assert (result.sample_every, result.cadence) == (None, None)  # either one: every checkpoint renders
    (tmp_path / "off.toml").write_text(f'dit = "/m/k.safetensors"\n{base}sample_every_n_steps = 0\n')
    assert plan(tmp_path / "off.toml").sample_every is None  # 0 turns it off, as in kohya


def test_unknown_ss_flag_renders_with_ddim_as_kohya_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "p.txt").write_text("a --ss k_foo\n")
    text = (KOHYA / "sdxl.toml").read_text().replace('"sdxl_prompts.txt"', '"p.txt"')
    text = text.replace(
        "models/stable-diffusion-xl-base-1.0", str(KOHYA / "models/stable-diffusion-xl-base-1.0")
    )
    (tmp_path / "c.toml").write_text(text)
    with caplog.at_level(logging.WARNING, logger="sidecar.plan"):
        (request,) = plan(tmp_path / "c.toml").requests
    assert request.sampler == "ddim"
    assert "`--ss k_foo` is not a kohya sampler; kohya renders it with ddim" in caplog.text


def test_settings_without_meaning_are_said_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="sidecar.plan"):
        load_trainer_config(KOHYA / "flux.toml")
        load_trainer_config(MUSUBI / "kontext.toml")
    assert "flux.toml:27 discrete_flow_shift: not used by sidecar" in caplog.text
    assert (
        "flux.toml:36 sample_sampler: not used by sidecar: kohya sd-scripts' flux sampling is always"
        in caplog.text
    )
    assert "kontext.toml:26 sample_at_first: not used by sidecar" in caplog.text


def test_prompt_file_is_found_beside_the_config_then_above_it(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "p.txt").write_text("a\n")
    (tmp_path / "configs").mkdir()
    text = 'pretrained_model_name_or_path = "/m/f.safetensors"\nnetwork_module = "networks.lora_flux"\n'
    (tmp_path / "configs" / "c.toml").write_text(text + 'sample_prompts = "prompts/p.txt"\n')
    assert (
        load_trainer_config(tmp_path / "configs" / "c.toml").prompts_file
        == (tmp_path / "prompts/p.txt").resolve()
    )


# ------------------------------------------------------------------ located errors


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[s]\nsample_sampler = "k_dpmpp"\n',
            ":5 s.sample_sampler: `sampler` 'k_dpmpp' is not a kohya sampler name",
        ),
        (
            '[s]\nsample_every_n_steps = "often"\n',
            ":5 s.sample_every_n_steps: must be an integer, got 'often'",
        ),
        (
            '[s]\nsample_prompts = "missing.txt"\n',
            ":5 s.sample_prompts: names prompt file ",
        ),
    ],
    ids=["sampler", "interval", "prompt-file"],
)
def test_bad_values_are_located_at_the_toml_key(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "p.txt").write_text("a\n")
    sdxl = KOHYA / "models/stable-diffusion-xl-base-1.0"
    head = f'pretrained_model_name_or_path = "{sdxl}"\nnetwork_module = "networks.lora"\nseed = 1\n'
    path = tmp_path / "c.toml"
    path.write_text(head + toml + ("" if "sample_prompts" in toml else 'sample_prompts = "p.txt"\n'))
    with pytest.raises(ConfigError) as caught:
        plan(path)
    assert f"{path}{message}" in str(caught.value)


def test_the_command_lines_prompt_file_wins_over_a_missing_one(tmp_path: Path) -> None:
    """No `sample_prompts`, or one that is not there: `--prompts` still renders."""
    (tmp_path / "p.txt").write_text("a\n")
    text = 'pretrained_model_name_or_path = "/m/f.safetensors"\nnetwork_module = "networks.lora_flux"\n'
    (tmp_path / "c.toml").write_text(text)
    config = load_trainer_config(tmp_path / "c.toml")
    with pytest.raises(
        ConfigError, match=r"c\.toml:1: has no prompts; .* or pass a prompt file with --prompts"
    ):
        build_plan(config)
    assert len(build_plan(config, prompts_file=tmp_path / "p.txt").requests) == 1
    (tmp_path / "c.toml").write_text(text + 'sample_prompts = "gone.txt"\n')
    assert (
        len(build_plan(load_trainer_config(tmp_path / "c.toml"), prompts_file=tmp_path / "p.txt").requests)
        == 1
    )


def test_an_architecture_sidecar_does_not_render_names_it(tmp_path: Path) -> None:
    path = tmp_path / "kandinsky.toml"
    path.write_text('dit = "/m/k5.safetensors"\nnetwork_module = "networks.lora_kandinsky"\n')
    with pytest.raises(ConfigError) as caught:
        load_trainer_config(path)
    assert str(caught.value).startswith(
        f"{path}:2 network_module: 'networks.lora_kandinsky' trains Kandinsky 5 with musubi-tuner; "
        "sidecar reads musubi-tuner configs of networks.lora_flux"
    )


def test_bad_values_in_prompt_files_are_located(tmp_path: Path) -> None:
    config = load_trainer_config(KOHYA / "flux.toml")
    (tmp_path / "p.toml").write_text('[prompt]\nwidth = 1024\n[[prompt.subset]]\nprompt = "a"\nseed = -1\n')
    with pytest.raises(ConfigError) as caught:
        build_plan(config, prompts_file=tmp_path / "p.toml")
    assert (
        str(caught.value)
        == f"{tmp_path / 'p.toml'}:5 prompt.subset[0].seed: must be a non-negative integer, got -1"
    )
    (tmp_path / "p.json").write_text('[{"prompt": "a"}, {"prompt": "b", "sample_steps": "many"}]')
    with pytest.raises(ConfigError) as caught:
        build_plan(config, prompts_file=tmp_path / "p.json")
    assert (
        str(caught.value) == f"{tmp_path / 'p.json'} /1/sample_steps: must be a positive integer, got 'many'"
    )
    (tmp_path / "bad.json").write_text('[{"prompt": "a",}]')
    with pytest.raises(ConfigError) as caught:
        build_plan(config, prompts_file=tmp_path / "bad.json")
    assert str(caught.value).startswith(f"{tmp_path / 'bad.json'}:1: invalid JSON:")


def test_toml_syntax_errors_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('network_module = "networks.lora_flux"\nsample_prompts = \n')
    with pytest.raises(ConfigError) as caught:
        load_trainer_config(path)
    assert str(caught.value).startswith(f"{path}:2: invalid TOML:")
