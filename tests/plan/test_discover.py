"""sidecar/plan/discover.py: a run's config found where its trainer keeps or copies it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from factories import FIXTURES

from sidecar.errors import ConfigError
from sidecar.plan.discover import find_config


def test_ai_toolkit_copy_in_the_run_folder(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "eri_sdxl_lora.yaml", tmp_path / "config.yaml")
    assert find_config(tmp_path) == (tmp_path / "config.yaml").resolve()


def test_kohya_gui_copies_newest_wins(tmp_path: Path) -> None:
    for stamp in ("20260101-120000", "20260301-090000", "20260201-235959"):
        text = (
            (FIXTURES / "kohya" / "flux.toml")
            .read_text()
            .replace("flux_prompts.toml", str(FIXTURES / "kohya/flux_prompts.toml"))
        )
        (tmp_path / f"config_lora-{stamp}.toml").write_text(text)
    assert find_config(tmp_path) == (tmp_path / "config_lora-20260301-090000.toml").resolve()


def test_onetrainer_workspace_copy() -> None:
    run = FIXTURES / "onetrainer" / "workspace" / "flux-run"
    assert find_config(run) == (run / "config" / "2026-08-01_12-00-00.json").resolve()


def test_simpletuner_config_whose_output_dir_is_the_folder(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "simpletuner" / "config", tmp_path / "SimpleTuner" / "config")
    assert (
        find_config(tmp_path / "SimpleTuner" / "output" / "models")
        == (tmp_path / "SimpleTuner" / "config" / "config.json").resolve()
    )  # the folder need not exist yet
    assert (
        find_config(tmp_path / "SimpleTuner" / "output" / "sd3")
        == (tmp_path / "SimpleTuner" / "config" / "sd3" / "config.env").resolve()
    )


def test_none_found_lists_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        find_config(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"no trainer config found for {tmp_path}; looked at:\n")
    for place in (
        "config.yaml (ai-toolkit)",
        "config_lora-YYYYMMDD-HHMMSS.toml",
        "(OneTrainer)",
        "(SimpleTuner",
    ):
        assert place in message
    assert message.endswith("pass the config you train with: --config CONFIG")


def test_several_that_disagree_are_an_error_several_that_agree_are_not(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "eri_sdxl_lora.yaml", tmp_path / "config.yaml")
    (tmp_path / "config").mkdir()
    onetrainer = json.loads(
        (FIXTURES / "onetrainer/workspace/flux-run/config/2026-08-01_12-00-00.json").read_text()
    )
    (tmp_path / "config" / "2026-08-02_10-00-00.json").write_text(json.dumps(onetrainer))
    with pytest.raises(ConfigError) as caught:
        find_config(tmp_path)
    assert "give different sample plans" in str(caught.value)
    assert "(ai-toolkit)" in str(caught.value) and "(OneTrainer)" in str(caught.value)
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "config" / "2026-08-01_10-00-00.json").write_text(json.dumps(onetrainer))  # an older start
    assert find_config(tmp_path).name == "2026-08-02_10-00-00.json"
