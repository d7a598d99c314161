"""sidecar/plan/locator.py: config values keep the line they were written on, for located errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.plan.locator import YamlLocator, join_path, read_yaml, validate, warn_unknown_keys
from sidecar.values import NonNegativeInt, PositiveInt, Section


class _Sample(Section):
    width: PositiveInt | None = None
    seed: NonNegativeInt = 42


class _Process(Section):
    name: str
    sample: _Sample


@pytest.mark.parametrize(
    ("prefix", "suffix", "joined"),
    [
        ("config.process", "[0]", "config.process[0]"),
        ("config.process[0]", "sample.width", "config.process[0].sample.width"),
        ("", "sample", "sample"),
        ("sample", "", "sample"),
    ],
)
def test_join_path(prefix: str, suffix: str, joined: str) -> None:
    assert join_path(prefix, suffix) == joined


def test_read_yaml_keeps_the_line_of_every_key_and_list_item(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("# a comment\nconfig:\n  process:\n    - name: a\n      sample:\n        width: 512\n")
    data, locator = read_yaml(path)
    assert data == {"config": {"process": [{"name": "a", "sample": {"width": 512}}]}}
    assert locator.file == str(path)
    assert locator.lines["config"] == 2
    assert locator.line("config.process[0]") == 4
    assert locator.line("config.process[0].sample.width") == 6
    # A key that is not written: the line of its nearest ancestor that is.
    assert locator.line("config.process[0].sample.height") == 5
    assert locator.line("nowhere") == 2  # the document itself
    assert locator.where("config.process[0].sample.width") == f"{path}:6 config.process[0].sample.width:"


def test_locator_errors_carry_file_line_and_path() -> None:
    locator = YamlLocator("train.yaml", {"": 1, "sample": 3, "sample.width": 4})
    error = locator.error("sample.width", "must be a positive integer, got 0")
    assert (error.file, error.line, error.yaml_path) == ("train.yaml", 4, "sample.width")
    assert str(error) == "train.yaml:4 sample.width: must be a positive integer, got 0"
    assert str(locator.error("", "is empty")) == "train.yaml:1: is empty"
    assert str(YamlLocator("train.yaml").error("sample", "bad")) == "train.yaml sample: bad"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"a: [1\n", "invalid YAML: "),
        (b"\xff\xfe not text", "is not UTF-8 text"),
    ],
)
def test_read_yaml_refuses_what_is_not_yaml(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "train.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_yaml(path)


def test_read_yaml_names_a_missing_file_or_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        read_yaml(tmp_path / "nope.yaml")
    assert str(caught.value) == f"{tmp_path / 'nope.yaml'}: no such file"
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        read_yaml(tmp_path)


def test_an_empty_file_reads_as_nothing(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("# only a comment\n")
    data, locator = read_yaml(path)
    assert data is None and locator.line("anything") is None


def test_validate_locates_the_first_bad_value_by_line(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    # pydantic reports `width` (declared first) before `seed`; the error shown is the first in the file.
    path.write_text("process:\n  sample:\n    seed: -1\n    width: wide\n  name: p\n")
    data, locator = read_yaml(path)
    with pytest.raises(ConfigError) as caught:
        validate(_Process, data["process"], locator, "process")
    assert str(caught.value) == f"{path}:3 process.sample.seed: must be a non-negative integer, got -1"
    path.write_text("process:\n  sample: {width: 64}\n")
    data, locator = read_yaml(path)
    with pytest.raises(ConfigError) as caught:
        validate(_Process, data["process"], locator, "process")
    assert str(caught.value) == f"{path}:1 process.name: is required"  # missing: located at its parent
    path.write_text("process:\n  name: p\n  sample: {width: 64}\n")
    data, locator = read_yaml(path)
    assert validate(_Process, data["process"], locator, "process").sample.width == 64


def test_unknown_keys_warn_with_the_nearest_valid_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("sample:\n  widht: 512\n  zzzzzz: 1\n  fps: 8\n  seed: 1\n")
    data, locator = read_yaml(path)
    with caplog.at_level(logging.DEBUG, logger="sidecar.plan"):
        warn_unknown_keys(data["sample"], _Sample, frozenset({"fps"}), "sample", locator)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{path}:2 sample.widht: unknown key `widht` is ignored; did you mean `width`?",
        f"{path}:3 sample.zzzzzz: unknown key `zzzzzz` is ignored; valid keys: seed, width",
    ]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug == [f"{path}:4 sample.fps: not used by sidecar"]  # a known trainer key: quiet


def test_unknown_keys_of_a_value_that_is_not_a_mapping_are_not_looked_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="sidecar.plan"):
        warn_unknown_keys(["a"], _Sample, frozenset(), "sample", YamlLocator("x.yaml"))
    assert caplog.records == []
