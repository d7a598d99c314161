"""The `sidecar` command line: exit codes, what it prints, and that it calls through."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from factories import FIXTURES

from sidecar.arch import ARCH_SPECS
from sidecar.cli import EXIT_BAD_INPUT, EXIT_OK, LOG_HANDLER_NAME, main

FIXTURE_CONFIGS = sorted(FIXTURES.glob("*.yaml"))
# Every trainer's own config (one folder per trainer); its prompt files are read through them.
TRAINER_CONFIGS = sorted(
    [
        *FIXTURES.glob("aitoolkit/*.yaml"),
        *(path for path in FIXTURES.glob("kohya/*.toml") if "prompts" not in path.name),
        FIXTURES / "musubi" / "kontext.toml",
        *FIXTURES.glob("onetrainer/configs/*.json"),
        *FIXTURES.glob("onetrainer/workspace/*/config/*.json"),
        *FIXTURES.glob("simpletuner/config/**/config.*"),
    ]
)


@pytest.fixture(autouse=True)
def restore_logging():
    """`main` adds its own handler to the root logger and sets levels; undo both afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("sidecar")
    root_level, our_level = root.level, ours.level
    yield
    for handler in [h for h in root.handlers if h.get_name() == LOG_HANDLER_NAME]:
        root.removeHandler(handler)
    root.setLevel(root_level)
    ours.setLevel(our_level)


@pytest.mark.parametrize("config", FIXTURE_CONFIGS, ids=[path.stem for path in FIXTURE_CONFIGS])
def test_check_prints_the_plan_of_every_fixture_config(config, capsys):
    assert main(["check", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "architecture" in out and "sample(s):" in out
    assert any(spec.label in out for spec in ARCH_SPECS.values())


@pytest.mark.parametrize(
    "config", TRAINER_CONFIGS, ids=[str(path.relative_to(FIXTURES)) for path in TRAINER_CONFIGS]
)
def test_check_prints_the_plan_of_every_trainers_config(config, capsys):
    assert main(["check", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "trainer" in out and "sample(s):" in out


def test_check_finds_the_config_in_a_run_folder(capsys):
    run = FIXTURES / "onetrainer" / "workspace" / "flux-run"
    assert main(["check", str(run)]) == EXIT_OK
    captured = capsys.readouterr()
    assert "trainer       OneTrainer" in captured.out
    assert (
        f"using {(run / 'config' / '2026-08-01_12-00-00.json').resolve()}, the OneTrainer config"
        in captured.err
    )


@pytest.mark.parametrize(
    "prompts",
    [
        "kohya/sdxl_prompts.txt",
        "kohya/flux_prompts.toml",
        "kohya/sd3_prompts.json",
        "onetrainer/training_samples/samples.json",
        "simpletuner/config/user_prompt_library.json",
    ],
)
def test_prompts_accepts_every_trainers_prompt_file(prompts, capsys):
    assert main(["check", str(FIXTURES / "eri_flux.yaml"), "--prompts", str(FIXTURES / prompts)]) == EXIT_OK
    assert "sample(s):" in capsys.readouterr().out


def test_a_prompt_file_given_as_the_config_says_so(capsys):
    assert main(["check", str(FIXTURES / "onetrainer/training_samples/samples.json")]) == EXIT_BAD_INPUT
    assert "a prompt file goes with --prompts" in capsys.readouterr().err


def test_watch_without_a_config_lists_where_it_looked(tmp_path, capsys):
    assert main(["watch", str(tmp_path), "--once"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"no trainer config found for {tmp_path}; looked at:" in err
    assert f"{tmp_path / 'config.yaml'} (ai-toolkit)" in err
    assert "--config CONFIG" in err


def test_render_without_a_config_looks_in_the_checkpoints_run_folder(tmp_path, capsys):
    checkpoint = tmp_path / "my_lora_000000300.safetensors"
    checkpoint.write_bytes(b"")
    assert main(["render", str(checkpoint)]) == EXIT_BAD_INPUT
    assert f"no trainer config found for {tmp_path}" in capsys.readouterr().err


def test_check_with_a_kohya_prompt_file(capsys):
    config = FIXTURES / "eri_flux.yaml"
    assert main(["check", str(config), "--prompts", str(FIXTURES / "prompts.txt")]) == EXIT_OK
    assert "true cfg" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("replace", "by", "located"),
    [
        (
            "sample_steps: 20",
            "sample_steps: twenty",
            "sample.sample_steps: must be a positive integer, got 'twenty'",
        ),
        ('sampler: "flowmatch"', 'sampler: "ddim"', "sample.sampler:"),
        ("width: 1024", "width: -5", "width"),
    ],
    ids=["steps", "sampler-for-the-architecture", "negative-width"],
)
def test_check_exits_2_with_a_located_error(tmp_path, capsys, replace, by, located):
    text = (FIXTURES / "aitoolkit_flux_24gb.yaml").read_text()
    assert replace in text, f"fixture changed: {replace!r} not found"
    bad = tmp_path / "train.yaml"
    bad.write_text(text.replace(replace, by, 1))
    line = next(number for number, row in enumerate(bad.read_text().splitlines(), 1) if by in row)
    assert main(["check", str(bad)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{bad}:{line} config.process[0]." in err
    assert located in err


def test_a_missing_config_is_a_clear_error(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.yaml")]) == EXIT_BAD_INPUT
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before-the-command", "after-the-command"])
def test_json_log_format_writes_one_object_per_line(tmp_path, capsys, where):
    argv = ["check", str(tmp_path / "nope.yaml")]
    argv = (
        ["--log-format", "json", *argv] if where == "before-the-command" else [*argv, "--log-format", "json"]
    )
    assert main(argv) == EXIT_BAD_INPUT
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert entries[-1]["level"] == "error" and "nope.yaml" in entries[-1]["message"]


def test_gpu_and_share_gpu_naming_different_cards_is_refused(tmp_path, capsys):
    code = main(
        ["watch", str(tmp_path), "--config", str(FIXTURES / "flat.yaml"), "--gpu", "1", "--share-gpu", "0"]
    )
    assert code == EXIT_BAD_INPUT
    assert "name different cards" in capsys.readouterr().err


def test_python_dash_m_sidecar_is_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("sidecar ")


def test_render_then_status_then_grid(tmp_path, tiny_models, tiny_lora, capsys):
    """The commands a user runs by hand, end to end on the tiny SDXL model."""
    output = tmp_path / "output"
    output.mkdir()
    checkpoint = output / "my_lora_000000300.safetensors"
    checkpoint.write_bytes(tiny_lora("sdxl").read_bytes())
    config = tmp_path / "train.yaml"
    config.write_text(
        f"name: my_lora\nmodel: {{name_or_path: {tiny_models['sdxl']}, arch: sdxl}}\n"
        "sample:\n  width: 64\n  height: 64\n  sample_steps: 2\n  prompts: [a red fox, a blue bird]\n"
    )
    samples = output / "samples"
    assert (
        main(
            ["render", str(checkpoint), "--config", str(config), "--device", "cpu", "--output", str(samples)]
        )
        == 0
    )
    assert sorted(p.name for p in (samples / "step_000300").glob("sample_*.png")) == [
        "sample_00.png",
        "sample_01.png",
    ]
    assert main(["watch", str(output), "--config", str(config), "--device", "cpu", "--once"]) == 0
    capsys.readouterr()
    assert main(["status", str(output)]) == 0
    status = capsys.readouterr().out
    assert "300" in status
    shared = tmp_path / "compare.png"
    assert main(["grid", str(samples), "--steps", "300", "-o", str(shared)]) == 0
    assert shared.is_file()
