"""sidecar/plan/build.py: sample sections become concrete, deterministic requests; `check` prints them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from factories import FIXTURES

from sidecar.errors import ConfigError
from sidecar.plan.build import build_plan
from sidecar.plan.config import TrainerConfig, load_trainer_config
from sidecar.plan.report import format_plan
from sidecar.plan.request import SamplePlan, SampleRequest


def plan_of(fixture: str, **kwargs: object) -> tuple[TrainerConfig, SamplePlan]:
    config = load_trainer_config(FIXTURES / fixture)
    return config, build_plan(config, **kwargs)  # type: ignore[arg-type]


def write_config(
    tmp_path: Path, sample: str, *, arch: str = "sdxl", trigger: str | None = "tr1g", extra: str = ""
) -> TrainerConfig:
    """A flat config with the given `sample:` body (indented by two spaces)."""
    trigger_line = f"trigger_word: {trigger}\n" if trigger else ""
    (tmp_path / "train.yaml").write_text(
        f"name: t\n{trigger_line}model: {{name_or_path: m, arch: {arch}}}\n{extra}sample:\n{sample}"
    )
    return load_trainer_config(tmp_path / "train.yaml")


# ------------------------------------------------------------------ fixtures give the expected plan


def test_aitoolkit_flux_plan() -> None:
    _, plan = plan_of("aitoolkit_flux_24gb.yaml")
    assert (plan.image_format, plan.batch_size, plan.sample_every) == ("png", 1, 250)
    assert len(plan.requests) == 11
    first = plan.requests[0]
    assert first == SampleRequest(
        index=0,
        prompt="p3r5on holding a sign that says 'I LOVE PROMPTS!'",
        negative_prompt="",
        width=1024,
        height=1024,
        steps=20,
        guidance_scale=4.0,
        true_cfg_scale=1.0,
        sampler="flowmatch",
        seed=42,
        strength=1.0,
    )
    assert [r.seed for r in plan.requests] == list(range(42, 53))  # walk_seed: true
    assert all(r.prompt == r.prompt.strip() and "--" not in r.prompt for r in plan.requests)


def test_aitoolkit_sdxl_inline_flags() -> None:
    _, plan = plan_of("aitoolkit_sdxl.yaml")
    assert plan.image_format == "jpg"
    plain, flagged, sampler = plan.requests
    assert plain == SampleRequest(
        index=0,
        prompt="sks dog sitting on a beach at sunset",
        negative_prompt="blurry, low quality",
        width=1024,
        height=1024,
        steps=25,
        guidance_scale=7.0,
        true_cfg_scale=1.0,
        sampler="ddpm",
        seed=42,
        strength=1.0,
    )
    assert flagged == SampleRequest(
        index=1,
        prompt="a photo of sks dog wearing a hat",
        negative_prompt="cartoon, drawing",
        width=768,
        height=1344,
        steps=30,
        guidance_scale=5.5,
        true_cfg_scale=1.0,
        sampler="ddpm",
        seed=7,
        strength=0.8,
    )
    assert sampler.sampler == "dpmpp_2m_karras"  # validated and made canonical by schedulers.py


def test_eridiffusion_plans() -> None:
    _, sdxl = plan_of("eri_sdxl_lora.yaml")
    assert [r.prompt for r in sdxl.requests] == ["a photo of my_trigger", "my_trigger in a garden"]
    assert {(r.steps, r.guidance_scale, r.sampler, r.negative_prompt) for r in sdxl.requests} == {
        (30, 7.5, "ddim", "low quality, blurry")
    }
    assert [r.seed for r in sdxl.requests] == [42, 42]  # no walk_seed: the same seed for every prompt
    _, sd35 = plan_of("eri_sd35.yaml")
    assert sd35.requests[0].prompt == "a beautiful mountain landscape, test style"
    assert (sd35.requests[0].steps, sd35.requests[0].guidance_scale) == (50, 7.0)


def test_flux_yaml_guidance_flags_follow_aitoolkit() -> None:
    _, plan = plan_of("eri_flux.yaml")
    plain, g_only, l_and_g = plan.requests
    assert (plain.guidance_scale, plain.true_cfg_scale) == (3.5, 1.0)
    assert (g_only.guidance_scale, g_only.true_cfg_scale) == (2.5, 1.0)
    assert (l_and_g.guidance_scale, l_and_g.true_cfg_scale) == (5.0, 1.0)  # --g wins over --l
    assert l_and_g.prompt == "portrait of ohwx"


def test_flux_yaml_l_alone_sets_embedded_guidance(tmp_path: Path) -> None:
    config = write_config(tmp_path, '  prompts: ["a --l 2.5", "b --cfg 3"]\n', arch="flux")
    assert [r.guidance_scale for r in build_plan(config).requests] == [2.5, 3.0]


def test_flat_plan() -> None:
    _, plan = plan_of("flat.yaml")
    assert (plan.image_format, plan.batch_size, plan.sample_every) == ("jpg", 2, 200)
    first, second, third = plan.requests
    assert (first.prompt, first.seed, first.steps, first.width, first.height) == (
        "zkcat asleep on a windowsill",
        100,
        40,
        992,
        768,
    )
    assert (
        second.prompt,
        second.negative_prompt,
        second.seed,
        second.width,
        second.guidance_scale,
        second.strength,
        second.sampler,
    ) == ("zkcat chasing a laser dot", "blurry", 8, 512, 6.0, 0.5, "flowmatch")  # euler is flow Euler on Flux
    assert (third.prompt, third.strength, third.seed, third.sampler) == (
        "a tabby cat",
        0.0,
        9,
        "flowmatch",  # canonical name of `FlowMatch_Euler `
    )


def test_defaults_come_from_the_architecture() -> None:
    config = load_trainer_config(FIXTURES / "multi_process.yaml", process="xl_pass")
    plan = build_plan(config)
    assert (plan.image_format, plan.batch_size, plan.sample_every) == ("png", 1, None)
    assert plan.requests[0] == SampleRequest(
        index=0,
        prompt="beta in the rain",
        negative_prompt="",
        width=1024,
        height=1024,
        steps=20,
        guidance_scale=7.0,
        true_cfg_scale=1.0,
        sampler="euler_a",
        seed=42,
        strength=1.0,
    )
    flux = build_plan(load_trainer_config(FIXTURES / "multi_process.yaml")).requests[0]
    assert (flux.steps, flux.guidance_scale, flux.sampler) == (4, 0.0, "flowmatch")


# ------------------------------------------------------------------ kohya prompt file


def test_kohya_prompt_file_on_flux() -> None:
    _, plan = plan_of("eri_flux.yaml", prompts_file=FIXTURES / "prompts.txt")
    first, second, third = plan.requests
    assert first == SampleRequest(
        index=0,
        prompt="a photo of ohwx",
        negative_prompt="blurry",
        width=768,
        height=512,
        steps=30,
        guidance_scale=3.5,
        true_cfg_scale=5.5,
        sampler="flowmatch",
        seed=7,
        strength=0.8,
    )  # kohya: --l is true CFG on Flux
    assert (second.prompt, second.guidance_scale, second.true_cfg_scale, second.seed) == (
        "ohwx at night",
        3.0,
        1.0,
        42,
    )
    assert third.prompt == "a plain prompt"


def test_kohya_prompt_file_on_sdxl_ignores_g(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _, plan = plan_of("eri_sdxl_lora.yaml", prompts_file=FIXTURES / "prompts.txt")
    assert (plan.requests[0].guidance_scale, plan.requests[0].true_cfg_scale) == (5.5, 1.0)
    assert plan.requests[1].guidance_scale == 7.5
    assert any(
        "prompts.txt:5: `--g` (Flux embedded guidance) is ignored on Stable Diffusion XL" in r.getMessage()
        for r in caplog.records
    )


# ------------------------------------------------------------------ seeds


def test_walk_seed_and_per_prompt_seeds(tmp_path: Path) -> None:
    prompts = '  prompts: ["a", "b --d 5", {prompt: c, seed: 9}, "d"]\n'
    config = write_config(tmp_path, f"  seed: 100\n  walk_seed: true\n{prompts}")
    assert [r.seed for r in build_plan(config).requests] == [100, 5, 9, 103]
    config = write_config(tmp_path, f"  seed: 100\n{prompts}")
    assert [r.seed for r in build_plan(config).requests] == [100, 5, 9, 100]
    config = write_config(tmp_path, '  prompts: ["a"]\n')
    assert build_plan(config).requests[0].seed == 42


# ------------------------------------------------------------------ sizes


def test_sizes_snap_down_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(
        tmp_path, '  width: 1000\n  prompts: ["a", "b --h 777", {prompt: c, width: 520}]\n', arch="flux"
    )
    with caplog.at_level(logging.WARNING, logger="sidecar.plan"):
        a, b, c = build_plan(config).requests
    assert (a.width, a.height, b.height, c.width) == (992, 1024, 768, 512)
    messages = [r.getMessage() for r in caplog.records]
    assert (
        f"{tmp_path / 'train.yaml'}:5 sample.width: "
        "`width` 1000 is not a multiple of 16 for Flux.1; using 992" in messages
    )
    assert any(
        "sample.prompts[1]: `height` 777 is not a multiple of 16 for Flux.1; using 768" in m for m in messages
    )
    assert any(
        "sample.prompts[2]: `width` 520 is not a multiple of 16 for Flux.1; using 512" in m for m in messages
    )


def test_sdxl_snaps_to_multiples_of_8(tmp_path: Path) -> None:
    config = write_config(tmp_path, '  prompts: ["a --w 1020 --h 1016"]\n')
    request = build_plan(config).requests[0]
    assert (request.width, request.height) == (1016, 1016)


def test_size_that_snaps_to_zero_is_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, '  prompts: ["a --w 8"]\n', arch="flux")
    with pytest.raises(ConfigError, match=r"sample.prompts\[0\]: `width` must be at least 16"):
        build_plan(config)
    config = write_config(tmp_path, '  prompts: ["a --h 0"]\n')
    with pytest.raises(ConfigError, match="`--h` must be a positive integer, got '0'"):
        build_plan(config)


# ------------------------------------------------------------------ other plan rules


def test_true_cfg_is_flux_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path, '  true_cfg_scale: 3.5\n  neg: ugly\n  prompts: ["a"]\n', arch="flux")
    assert build_plan(config).requests[0].true_cfg_scale == 3.5
    config = write_config(tmp_path, '  true_cfg_scale: 3.5\n  prompts: ["a"]\n', arch="sd3")
    with caplog.at_level(logging.WARNING, logger="sidecar.plan"):
        assert build_plan(config).requests[0].true_cfg_scale == 1.0
    assert "`true_cfg_scale` is for Flux only" in caplog.text


def test_no_prompts_is_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, "  sample_steps: 20\n")
    with pytest.raises(ConfigError, match=r"train.yaml:4 sample.prompts: has no prompts"):
        build_plan(config)


def test_samples_list_of_newer_aitoolkit(tmp_path: Path) -> None:
    config = write_config(tmp_path, "  samples:\n    - prompt: a --w 512\n      seed: 3\n    - prompt: b\n")
    requests = build_plan(config).requests
    assert [(r.prompt, r.width, r.seed) for r in requests] == [("a", 512, 3), ("b", 1024, 42)]


# ------------------------------------------------------------------ format_plan


def test_format_plan_flux() -> None:
    config, plan = plan_of("aitoolkit_flux_24gb.yaml")
    text = format_plan(config, plan)
    lines = text.splitlines()
    assert lines[1:7] == [
        "trainer       ai-toolkit / EriDiffusion",
        "architecture  Flux.1 (flux)",
        "base model    black-forest-labs/FLUX.1-dev",
        "trigger word  p3r5on",
        "samples dir   output/my_first_flux_lora_v1/samples",
        "images        png, batch size 1, every 250 steps",
    ]
    assert lines[0].startswith("config        ") and lines[0].endswith(
        "aitoolkit_flux_24gb.yaml (config.process[0])"
    )
    assert "11 sample(s):" in lines
    header = lines[lines.index("11 sample(s):") + 1]
    assert header == "  #   size       steps  sampler    guidance  true cfg  seed  strength  prompt"
    row = lines[lines.index("11 sample(s):") + 2]
    assert row == (
        "  00  1024x1024  20     flowmatch  4         1         42    1         "
        "p3r5on holding a sign that says 'I LOVE PROMPTS!'"
    )
    assert lines[lines.index(row) + 1].strip() == "negative: (none)"
    assert lines[lines.index(row) + 1].index("negative") == header.index("prompt")


def test_format_plan_sdxl_without_training_folder() -> None:
    config, plan = plan_of("eri_sdxl_lora.yaml")
    text = format_plan(config, plan)
    assert "architecture  Stable Diffusion XL (sdxl)" in text
    assert (
        "samples dir   samples/ in the run folder the checkpoints are in (OUTPUT_DIR for `sidecar watch`)"
        in text
    )
    assert "true cfg" not in text
    assert "  00  1024x1024  30     ddim     7.5       42    1         a photo of my_trigger" in text
    assert "negative: low quality, blurry" in text


def test_format_plan_prints_the_samples_folder_by_the_one_rule(tmp_path: Path) -> None:
    """`sidecar.output` when set, else `samples/` in the run folder (`settings.samples_dir`)."""
    config = write_config(tmp_path, '  prompts: ["a"]\n', extra="sidecar: {output: rendered}\n")
    assert f"samples dir   {tmp_path.resolve() / 'rendered'}" in format_plan(config, build_plan(config))
    config = write_config(tmp_path, '  prompts: ["a"]\n', extra=f"training_folder: {tmp_path}\n")
    assert f"samples dir   {tmp_path / 't' / 'samples'}" in format_plan(config, build_plan(config))
