"""sidecar/plan/aitoolkit.py: ai-toolkit's newer `sample:` fields and its `train:` sampling switches."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from factories import FIXTURES

from sidecar.errors import ConfigError
from sidecar.plan.build import build_plan
from sidecar.plan.config import load_trainer_config
from sidecar.plan.request import Cadence

KONTEXT = FIXTURES / "aitoolkit" / "flux_kontext_samples.yaml"
CONTROL = (FIXTURES / "aitoolkit" / "control").resolve()


def test_samples_items_with_their_own_settings(rows) -> None:
    config = load_trainer_config(KONTEXT)
    assert (config.arch, config.trigger_word) == ("flux_kontext", "p3r5on")
    plan = build_plan(config)
    assert rows(plan) == [
        ("make p3r5on smile", "1024x1024", 20, "flowmatch", 4.0, 1.0, 42, 1.0),
        ("give p3r5on an afro", "1024x1024", 20, "flowmatch", 4.0, 1.0, 7, 0.8),
        ("turn p3r5on into a cartoon", "768x1152", 20, "flowmatch", 4.0, 1.0, 44, 1.0),  # walk_seed
        ("p3r5on waving at the camera, video", "1024x1024", 20, "flowmatch", 4.0, 1.0, 45, 1.0),
    ]
    assert [r.control_images for r in plan.requests] == [
        (str(CONTROL / "person1.jpg"),),
        (str(CONTROL / "person1.jpg"),),
        (str(CONTROL / "person2.jpg"),),  # from the inline `--ctrl_img` flag
        (),
    ]
    assert [(r.num_frames, r.fps) for r in plan.requests] == [(1, None), (1, None), (1, None), (41, 16)]
    # sample_every stays with the store; sample_start_step becomes the cadence's first step
    assert (plan.sample_every, plan.cadence) == (250, Cadence(start_step=500))


def test_train_switches_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="sidecar.plan"):
        load_trainer_config(KONTEXT)
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(
        info
    ) == 1 and "train.disable_sampling: `disable_sampling: true` turns off ai-toolkit's own" in (
        info[0].getMessage()
    )
    assert (
        "train.skip_first_sample: `skip_first_sample: true` skips ai-toolkit's sample of the base model"
        in (caplog.text)
    )


def test_video_frames_default_to_ai_toolkits_fps(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(
        "model: {name_or_path: m, arch: flux}\nsample:\n  num_frames: 9\n  prompts: ['a --frames 17', 'b']\n"
    )
    plan = build_plan(load_trainer_config(tmp_path / "t.yaml"))
    assert [(r.num_frames, r.fps) for r in plan.requests] == [(17, 16), (9, 16)]


def test_bad_train_switch_is_located(tmp_path: Path) -> None:
    text = KONTEXT.read_text().replace("disable_sampling: true", "disable_sampling: maybe")
    (tmp_path / "k.yaml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_trainer_config(tmp_path / "k.yaml")
    assert str(caught.value) == (
        f"{tmp_path / 'k.yaml'}:37 config.process[0].train.disable_sampling: "
        "must be true or false, got 'maybe'"
    )
