"""sidecar/plan/config.py and aitoolkit.py: real trainer files load; bad values are located at file:line."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from factories import FIXTURES

from sidecar.arch import ARCH_SPECS
from sidecar.errors import ConfigError
from sidecar.plan.config import TrainerConfig, load_trainer_config
from sidecar.plan.request import ModelSource
from sidecar.settings import samples_dir


def variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: str, old: str, new: str) -> int:
    """Write `fixture` with one value changed as ./train.yaml; return the line of the change."""
    text = (FIXTURES / fixture).read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {fixture}"
    text = text.replace(old, new, 1)
    (tmp_path / "train.yaml").write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return text[: text.index(new)].count("\n") + 1


def load_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_trainer_config("train.yaml", **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


# ------------------------------------------------------------------ every fixture loads


@pytest.mark.parametrize(
    ("fixture", "arch", "name", "prefix"),
    [
        ("aitoolkit_flux_24gb.yaml", "flux", "my_first_flux_lora_v1", "config.process[0]"),
        ("aitoolkit_sd35_large_24gb.yaml", "sd3", "my_first_sd3l_lora_v1", "config.process[0]"),
        ("aitoolkit_sdxl.yaml", "sdxl", "my_first_sdxl_lora_v1", "config.process[0]"),
        ("eri_sdxl_lora.yaml", "sdxl", "example_sdxl_lora", "config.process[0]"),
        ("eri_sd35.yaml", "sd3", "sd35_test_sampling", "config.process[0]"),
        ("eri_flux.yaml", "flux", "flux_lora_test", "config.process[0]"),
        ("flat.yaml", "sd3", "cat-lora", ""),
        ("multi_process.yaml", "flux", "multi", "config.process[1]"),
        ("wildcards.yaml", "sdxl", "wild", "config.process[0]"),
    ],
)
def test_fixture_loads(
    fixture: str, arch: str, name: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.plan"):
        config = load_trainer_config(FIXTURES / fixture)
    assert isinstance(config, TrainerConfig)
    assert (config.arch, config.name, config.yaml_prefix) == (arch, name, prefix)
    assert config.path == (FIXTURES / fixture).resolve()
    assert not caplog.records, "real trainer files must load without warnings"


def test_aitoolkit_flux_example() -> None:
    config = load_trainer_config(FIXTURES / "aitoolkit_flux_24gb.yaml")
    assert config.training_folder == Path("output")  # not beside the config: kept as written (cwd)
    assert config.trigger_word == "p3r5on"
    assert config.trainer_device == "cuda:0"
    assert config.process_index == 0
    assert config.model.name_or_path == "black-forest-labs/FLUX.1-dev"
    assert config.model.is_flux and config.model.quantize is True and not config.model.low_vram
    assert config.network is not None and (config.network.type, config.network.linear) == ("lora", 16)
    assert config.save is not None and (config.save.save_every, config.save.max_step_saves_to_keep) == (
        250,
        4,
    )
    sample = config.sample
    assert (sample.sampler, sample.sample_every, sample.sample_steps) == ("flowmatch", 250, 20)
    assert (sample.width, sample.height, sample.seed, sample.walk_seed) == (1024, 1024, 42, True)
    assert (sample.guidance_scale, sample.neg, sample.format, sample.batch_size) == (4.0, "", "png", 1)
    assert len(sample.items) == 11
    assert config.run_dir == Path("output/my_first_flux_lora_v1")
    assert samples_dir(config.sidecar.output, run_dir=config.run_dir) == Path(
        "output/my_first_flux_lora_v1/samples"
    )
    assert config.log_dir is None
    text = (FIXTURES / "aitoolkit_flux_24gb.yaml").read_text()
    line = text[: text.index("sample_steps: 20")].count("\n") + 1
    assert config.lines["config.process[0].sample.sample_steps"] == line


def test_eridiffusion_shapes() -> None:
    sd35 = load_trainer_config(FIXTURES / "eri_sd35.yaml")
    assert sd35.model.low_vram  # EriDiffusion writes low_vram beside `model:`
    assert sd35.model.vae_path == "/home/alex/SwarmUI/Models/VAE/sd3_vae.safetensors"
    flux = load_trainer_config(FIXTURES / "eri_flux.yaml")
    assert flux.model.clip_l_path.endswith("clip_l.safetensors")
    assert flux.model.t5_path.endswith("encoderonly-fp16.safetensors")
    assert flux.training_folder is None
    assert flux.run_dir is None  # the run folder comes from the watched folder or the checkpoint


def test_flat_file_with_quoted_and_flow_values() -> None:
    config = load_trainer_config(FIXTURES / "flat.yaml")
    assert config.process_index is None and config.yaml_prefix == ""
    assert config.model.name_or_path == "stabilityai/stable-diffusion-3.5-medium"
    assert config.training_folder == (FIXTURES / "runs").resolve()  # exists beside the config
    sample = config.sample
    assert (sample.sample_every, sample.sample_steps, sample.guidance_scale) == (200, 28, 4.5)
    assert (sample.sampler, sample.format, sample.batch_size, sample.walk_seed) == (
        "flowmatch_euler",
        "jpg",
        2,
        True,
    )
    assert sample.items[1].neg == "blurry" and sample.items[1].network_multiplier == 0.5
    settings = config.sidecar
    assert (settings.gpu, settings.dtype, settings.offload, settings.backlog) == (
        1,
        "bf16",
        "model",
        "latest",
    )
    assert settings.output == FIXTURES.resolve() / "rendered"
    assert settings.log_format == "json" and settings.pattern.startswith("cat-lora")
    assert settings.compiled_pattern is not None and "step" in settings.compiled_pattern.groupindex
    assert config.run_dir == (FIXTURES / "runs").resolve() / "cat-lora"
    assert samples_dir(settings.output, run_dir=config.run_dir) == settings.output
    assert samples_dir(None, run_dir=config.run_dir) == (FIXTURES / "runs").resolve() / "cat-lora" / "samples"


def test_model_may_be_a_bare_string(tmp_path: Path) -> None:
    path = tmp_path / "flat.yaml"
    path.write_text("model: black-forest-labs/FLUX.1-dev\nsample:\n  prompts: [a]\nmodel_arch: x\n")
    with pytest.raises(ConfigError, match=re.escape("set `model.arch` to one of sdxl, sd3, chroma")):
        load_trainer_config(path)
    path.write_text(
        "model: {name_or_path: black-forest-labs/FLUX.1-dev, arch: flux-dev}\nsample: {prompts: [a]}\n"
    )
    config = load_trainer_config(path)
    assert config.arch == "flux" and config.name == "flat"  # name defaults to the file's stem


def test_relative_model_path_resolves_beside_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline"})
    )
    (tmp_path / "train.yaml").write_text(
        "model: {name_or_path: models/base, vae_path: vae/x}\nsample: {prompts: [a]}\n"
    )
    monkeypatch.chdir("/")
    config = load_trainer_config(tmp_path / "train.yaml")
    assert config.model.name_or_path == str((tmp_path / "models" / "base").resolve())
    assert config.model.vae_path == "vae/x"  # does not exist there: kept as written
    assert config.arch == "flux"


# ------------------------------------------------------------------ several processes


def test_multi_process_selection() -> None:
    path = FIXTURES / "multi_process.yaml"
    assert load_trainer_config(path).process_index == 1  # first with a sample section
    by_index = load_trainer_config(path, process=2)
    assert (by_index.process_index, by_index.arch, by_index.trigger_word) == (2, "sdxl", "beta")
    assert load_trainer_config(path, process="xl_pass").process_index == 2
    assert load_trainer_config(path, process="2").process_index == 2
    assert load_trainer_config(path, process="flux_pass").yaml_prefix == "config.process[1]"


@pytest.mark.parametrize(
    ("process", "message"),
    [
        (5, "multi_process.yaml:4 config.process: has 3 process(es); `process` must be 0..2, got 5"),
        (0, "multi_process.yaml:5 config.process[0]: has no `sample:` section"),
        ("sd_trainer", "config.process: processes [1, 2] all have `type: sd_trainer`; select one by index"),
        ("nope", "has no process named 'nope'; processes: 0 (extract), 1 (flux_pass), 2 (xl_pass)"),
    ],
)
def test_multi_process_bad_selection(process: int | str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_trainer_config(FIXTURES / "multi_process.yaml", process=process)
    assert message in str(caught.value)


def test_process_on_flat_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match="flat file"):
        load_trainer_config(FIXTURES / "flat.yaml", process=0)


# ------------------------------------------------------------------ located errors


@pytest.mark.parametrize(
    ("fixture", "old", "new", "expected"),
    [
        (
            "aitoolkit_flux_24gb.yaml",
            "sample_steps: 20",
            "sample_steps: twenty",
            "config.process[0].sample.sample_steps: must be a positive integer, got 'twenty'",
        ),
        (
            "aitoolkit_flux_24gb.yaml",
            "width: 1024",
            "width: -512",
            "config.process[0].sample.width: must be a positive integer, got -512",
        ),
        (
            "aitoolkit_flux_24gb.yaml",
            "sample_every: 250",
            "format: gif",
            "config.process[0].sample.format: must be one of png, jpg, jpeg, webp, got 'gif'",
        ),
        (
            "aitoolkit_flux_24gb.yaml",
            'sampler: "flowmatch"',
            "sampler: 5",
            "config.process[0].sample.sampler: must be a sampler name such as 'euler', got 5",
        ),
        (
            "aitoolkit_flux_24gb.yaml",
            'sampler: "flowmatch"',
            "sampler: [euler, ddim]",
            "config.process[0].sample.sampler: must be a sampler name such as 'euler', got a list",
        ),
        (
            "aitoolkit_flux_24gb.yaml",
            "seed: 42",
            "seed: -1",
            "config.process[0].sample.seed: must be a non-negative integer, got -1",
        ),
        (
            "aitoolkit_flux_24gb.yaml",
            "walk_seed: true",
            "walk_seed: maybe",
            "config.process[0].sample.walk_seed: must be true or false, got 'maybe'",
        ),
        (
            "aitoolkit_flux_24gb.yaml",
            "guidance_scale: 4",
            "guidance_scale: -2",
            "config.process[0].sample.guidance_scale: must be a non-negative number, got -2",
        ),
        (
            "aitoolkit_flux_24gb.yaml",
            "is_flux: true",
            "arch: sd2",
            f"config.process[0].model.arch: must be one of {', '.join(ARCH_SPECS)}, got 'sd2'",
        ),
        (
            "aitoolkit_flux_24gb.yaml",
            "quantize: true",
            "is_v3: true",
            "config.process[0].model.is_v3: conflicts with `is_flux: true`",
        ),
        (
            "eri_sdxl_lora.yaml",
            '  - "{trigger_word} in a garden"',
            "  - 42",
            "config.process[0].sample.prompts[1]: "
            "must be a prompt string or a mapping with a `prompt` key, got 42",
        ),
        (
            "eri_sdxl_lora.yaml",
            '  - "{trigger_word} in a garden"',
            "  - {prompt: x, width: wide}",
            "config.process[0].sample.prompts[1].width: must be a positive integer, got 'wide'",
        ),
        ("flat.yaml", "gpu: 1", "gpu: first", "sidecar.gpu: must be a non-negative integer, got 'first'"),
        (
            "flat.yaml",
            "offload: model",
            "offload: disk",
            "sidecar.offload: must be one of none, model, sequential, group, auto, got 'disk'",
        ),
        (
            "flat.yaml",
            r"pattern: 'cat-lora-step(?P<step>\d+)\.safetensors'",
            "pattern: 'step(\\d+'",
            "sidecar.pattern: must be a valid regular expression",
        ),
        (
            "flat.yaml",
            r"pattern: 'cat-lora-step(?P<step>\d+)\.safetensors'",
            r"pattern: 'cat-lora-step(\d+)\.safetensors'",
            "sidecar.pattern: must have a named group `step`",
        ),
        (
            "flat.yaml",
            "batch_size: 2",
            "batch_size: 0",
            "sample.batch_size: must be a positive integer, got 0",
        ),
    ],
)
def test_bad_value_is_located(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: str, old: str, new: str, expected: str
) -> None:
    line = variant(tmp_path, monkeypatch, fixture, old, new)
    message = load_error()
    assert message.startswith(f"train.yaml:{line} {expected}"), message


def test_missing_key_is_located_at_its_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = variant(
        tmp_path,
        monkeypatch,
        "eri_sdxl_lora.yaml",
        'name_or_path: "/path/to/your/sdxl_model.safetensors"',
        "nam_or_path: x",
    )
    assert load_error() == f"train.yaml:{line - 1} config.process[0].model.name_or_path: is required"


def test_bad_steps_exact_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = variant(
        tmp_path, monkeypatch, "aitoolkit_flux_24gb.yaml", "sample_steps: 20", "sample_steps: twenty"
    )
    assert load_error() == (
        f"train.yaml:{line} config.process[0].sample.sample_steps: must be a positive integer, got 'twenty'"
    )
    with pytest.raises(ConfigError) as caught:
        load_trainer_config("train.yaml")
    error = caught.value
    assert (error.file, error.line, error.yaml_path) == (
        "train.yaml",
        line,
        "config.process[0].sample.sample_steps",
    )


def test_bad_yaml_syntax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = variant(
        tmp_path,
        monkeypatch,
        "aitoolkit_flux_24gb.yaml",
        "        sample_steps: 20",
        "        sample_steps: [20",
    )
    message = load_error()
    assert message.startswith("train.yaml:"), message
    assert "invalid YAML" in message
    assert int(message.split(":")[1].split()[0]) >= line


def test_bad_yaml_indentation_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = variant(
        tmp_path,
        monkeypatch,
        "eri_sdxl_lora.yaml",
        "        guidance_scale: 7.5",
        "        guidance_scale: 7.5\n          oops: : x",
    )
    assert load_error().startswith(f"train.yaml:{line + 1}: invalid YAML: ")


def test_missing_arch_with_nonexistent_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    variant(tmp_path, monkeypatch, "eri_sdxl_lora.yaml", "        is_sdxl: true\n", "")
    text = (tmp_path / "train.yaml").read_text()
    model_line = text[: text.index("      model:")].count("\n") + 1
    assert load_error() == (
        f"train.yaml:{model_line} config.process[0].model: cannot tell the architecture of "
        "'/path/to/your/sdxl_model.safetensors' (no such file or folder); set `model.arch` to one of "
        + ", ".join(ARCH_SPECS)
    )


def test_missing_arch_with_uncached_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    variant(tmp_path, monkeypatch, "aitoolkit_flux_24gb.yaml", "is_flux: true", "is_flux: false")
    assert "not in the local Hugging Face cache); set `model.arch` to one of sdxl, sd3," in load_error()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "train.yaml: is empty"),
        ("- a\n- b\n", "train.yaml:1: must be a mapping (a trainer config), got a list"),
        ("job: extension\nconfig:\n  name: x\n", "train.yaml:1: has no `sample:` section"),
        ("job: extension\nconfig:\n  process: {}\n", "train.yaml:3 config.process: must be a non-empty list"),
        ("sample: {prompts: [a]}\n", "train.yaml:1 model: is required"),
        (
            "model: {name_or_path: m, arch: sdxl}\nsample: yes\n",
            "train.yaml:2 sample: must be a mapping, got true",
        ),
        (
            "model: {name_or_path: m, arch: sdxl, is_flux: true}\nsample: {}\n",
            "train.yaml:1 model.arch: is 'sdxl' but `is_flux: true` says 'flux'",
        ),
        (
            "name: [1]\nmodel: {name_or_path: m, arch: sdxl}\nsample: {}\n",
            "train.yaml:1 name: must be a string, got a list",
        ),
    ],
)
def test_bad_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str) -> None:
    (tmp_path / "train.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert load_error().startswith(expected)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_trainer_config(tmp_path / "nope.yaml")
    assert str(caught.value) == f"{tmp_path / 'nope.yaml'}: no such file"
    with pytest.raises(ConfigError, match="is a folder"):
        load_trainer_config(tmp_path)


# ------------------------------------------------------------------ misspelled keys warn


def test_misspelled_sample_key_warns_with_nearest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    line = variant(tmp_path, monkeypatch, "aitoolkit_flux_24gb.yaml", "sample_steps: 20", "sample_step: 20")
    with caplog.at_level(logging.WARNING, logger="sidecar.plan"):
        config = load_trainer_config("train.yaml")
    assert config.sample.sample_steps is None  # ignored, so the architecture default will apply
    [record] = caplog.records
    assert record.name == "sidecar.plan"
    assert record.getMessage() == (
        f"train.yaml:{line} config.process[0].sample.sample_step: unknown key "
        "`sample_step` is ignored; did you mean `sample_steps`?"
    )


def test_misspelled_keys_in_sidecar_and_prompt_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "train.yaml").write_text(
        "sidecar: {ofload: model}\n"
        "model: {name_or_path: m, arch: sdxl}\n"
        "sample:\n"
        "  prompts:\n"
        "    - {prompt: a, widht: 512}\n"
        "  sample_start_step: 0\n"  # a real ai-toolkit key sidecar does not use: silent
        "  zzzzzz: 1\n"
    )
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sidecar.plan"):
        load_trainer_config("train.yaml")
    messages = [record.getMessage() for record in caplog.records]
    assert "train.yaml:1 sidecar.ofload: unknown key `ofload` is ignored; did you mean `offload`?" in messages
    assert (
        "train.yaml:5 sample.prompts[0].widht: unknown key `widht` is ignored; did you mean `width`?"
        in messages
    )
    assert any(
        m.startswith("train.yaml:7 sample.zzzzzz: unknown key `zzzzzz` is ignored; valid keys:")
        for m in messages
    )
    assert len(messages) == 3


# ------------------------------------------------------------------ what the later stages read


def test_model_source_is_what_the_renderer_loads(tmp_path: Path) -> None:
    flux = load_trainer_config(FIXTURES / "eri_flux.yaml")
    source = flux.model_source()
    assert isinstance(source, ModelSource)
    assert (source.arch, source.name_or_path, source.quantize, source.low_vram) == (
        "flux",
        flux.model.name_or_path,
        flux.model.quantize,
        flux.model.low_vram,
    )
    assert source.vae_path == flux.model.vae_path
    assert flux.model.clip_g_path is not None and flux.model.clip_g_path.endswith("GmP-ft.safetensors")
    assert dict(source.text_encoder_paths) == {
        "clip_l_path": flux.model.clip_l_path,
        "clip_g_path": flux.model.clip_g_path,
        "t5_path": flux.model.t5_path,
    }
    sd35 = load_trainer_config(FIXTURES / "eri_sd35.yaml").model_source()
    assert (sd35.arch, sd35.low_vram) == ("sd3", True)
    assert sd35.vae_path == "/home/alex/SwarmUI/Models/VAE/sd3_vae.safetensors"


def test_log_dir_is_read_once_from_the_process_then_the_job_then_a_flat_file(tmp_path: Path) -> None:
    """ai-toolkit's TensorBoard folder (`log_dir`): where sidecar puts its samples beside the loss."""
    nested = (
        "job: extension\n"
        "config:\n"
        "  name: n\n"
        "  log_dir: /job/logs\n"
        "  process:\n"
        "    - model: {name_or_path: m, arch: sdxl}\n"
        "      log_dir: /p0/logs\n"
        "      sample: {prompts: [a]}\n"
        "    - model: {name_or_path: m, arch: sdxl}\n"
        "      sample: {prompts: [b]}\n"
    )
    path = tmp_path / "nested.yaml"
    path.write_text(nested)
    assert load_trainer_config(path, process=0).log_dir == Path("/p0/logs")
    assert load_trainer_config(path, process=1).log_dir == Path("/job/logs")
    path.write_text(nested.replace("  log_dir: /job/logs\n", ""))
    assert load_trainer_config(path, process=1).log_dir is None

    flat = tmp_path / "flat.yaml"
    flat.write_text("log_dir: /flat\nmodel: {name_or_path: m, arch: sdxl}\nsample: {prompts: [a]}\n")
    assert load_trainer_config(flat).log_dir == Path("/flat")
    (tmp_path / "logs").mkdir()  # relative: from the config's folder when it is there
    flat.write_text("log_dir: logs\nmodel: {name_or_path: m, arch: sdxl}\nsample: {prompts: [a]}\n")
    assert load_trainer_config(flat).log_dir == (tmp_path / "logs").resolve()
    flat.write_text("log_dir: elsewhere\nmodel: {name_or_path: m, arch: sdxl}\nsample: {prompts: [a]}\n")
    assert load_trainer_config(flat).log_dir == Path("elsewhere")  # as given: the trainer's cwd


def test_the_plan_stage_does_not_import_torch() -> None:
    code = (
        "import sys, sidecar.plan.config, sidecar.plan.aitoolkit, sidecar.plan.build, sidecar.settings; "
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
