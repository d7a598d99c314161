"""sidecar/plan/files.py: TOML keys keep their line, JSON values their pointer."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.plan.files import JsonLocator, pointer, read_json, read_toml, toml_lines


def test_toml_lines_of_tables_arrays_of_tables_and_keys() -> None:
    text = (
        "# comment\n"
        "top = 1\n"
        "[model_arguments]\n"
        'pretrained_model_name_or_path = "x"  # trailing\n'
        'note = """\n'
        "fake = 2\n"
        '"""\n'
        "arr = [\n"
        "  1,\n"
        "  2]\n"
        '"quoted key".inner = 3\n'
        "[[prompt.subset]]\n"
        'prompt = "a"\n'
        "[[prompt.subset]]\n"
        'prompt = "b"\n'
        "[prompt.subset.extra]\n"
        "x = 1\n"
    )
    lines = toml_lines(text)
    assert lines["top"] == 2
    assert lines["model_arguments.pretrained_model_name_or_path"] == 4
    assert "model_arguments.fake" not in lines  # inside a multi-line string
    assert lines["model_arguments.arr"] == 8
    assert lines["model_arguments.quoted key.inner"] == 11
    assert (lines["prompt.subset[0]"], lines["prompt.subset[1].prompt"]) == (12, 15)
    assert lines["prompt.subset[1].extra.x"] == 17


def test_read_toml_locates_keys_and_syntax_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[a]\nb = 1\n")
    data, locator = read_toml(path)
    assert data == {"a": {"b": 1}}
    assert locator.where("a.b") == f"{path}:2 a.b:"
    path.write_text("[a]\nb = = 1\n")
    with pytest.raises(ConfigError, match=r"c\.toml:2: invalid TOML"):
        read_toml(path)
    with pytest.raises(ConfigError, match="no such file"):
        read_toml(tmp_path / "missing.toml")


def test_json_pointer_and_locator(tmp_path: Path) -> None:
    assert pointer(2, "cfg_scale") == "/2/cfg_scale"
    assert pointer("a/b", "m~n") == "/a~1b/m~0n"  # RFC 6901 escapes
    assert JsonLocator("s.json").where("/0/seed") == "s.json /0/seed:"
    assert str(JsonLocator("s.json").error("", "is empty")) == "s.json: is empty"
    (tmp_path / "bad.json").write_text('{\n  "a": 1,\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json:3: invalid JSON"):
        read_json(tmp_path / "bad.json")
