"""The systemd unit, its env file and the supervisor program parse and say what we mean."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from factories import REPO

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "sidecar@.service"
ENV_EXAMPLE = DEPLOY / "sidecar.env.example"
SUPERVISOR = DEPLOY / "supervisor-sidecar.conf"
SIDECAR_BIN = "/opt/sidecar/.venv/bin/sidecar"
MIN_STOP_SECONDS = 60  # longer than one image


def _ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(path)
    return parser


def test_unit_sections_and_keys():
    unit = _ini(UNIT)
    assert unit.sections() == ["Unit", "Service", "Install"]
    assert "%i" in unit["Unit"]["Description"]
    assert int(unit["Unit"]["StartLimitIntervalSec"]) > 0
    assert int(unit["Unit"]["StartLimitBurst"]) > 0
    service = unit["Service"]
    assert service["EnvironmentFile"] == "/etc/sidecar/%i.env"
    assert service["ExecStart"] == f"{SIDECAR_BIN} watch ${{OUTPUT_DIR}} --config ${{CONFIG}} $SIDECAR_ARGS"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= MIN_STOP_SECONDS
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_has_user_and_nice_guidance():
    text = UNIT.read_text()
    assert re.search(r"^#User=", text, re.MULTILINE)
    assert re.search(r"^Nice=\d+", text, re.MULTILINE)


def _env_keys(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"not KEY=value: {line!r}"
            values[key] = value
    return values


def test_env_example_defines_what_exec_start_uses():
    defined = _env_keys(ENV_EXAMPLE)
    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", _ini(UNIT)["Service"]["ExecStart"]))
    assert used == {"OUTPUT_DIR", "CONFIG", "SIDECAR_ARGS"}
    assert used <= set(defined)
    assert defined["SIDECAR_ARGS"] == "--gpu 1"
    assert "#SIDECAR_ARGS=--share-gpu 0" in ENV_EXAMPLE.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    """systemd's own check; the binary is swapped for one that exists here, as verify checks it."""
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(SIDECAR_BIN, shutil.which("true") or "/bin/true"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys and bad values only warn


def test_supervisor_program():
    conf = _ini(SUPERVISOR)
    programs = [s for s in conf.sections() if s.startswith("program:")]
    assert programs == ["program:sidecar-myjob"]
    program = conf[programs[0]]
    command = program["command"].split()
    assert command[:2] == [SIDECAR_BIN, "watch"]
    assert "--config" in command
    assert program["stopsignal"] == "TERM"
    assert int(program["stopwaitsecs"]) >= MIN_STOP_SECONDS
    assert program["autorestart"] in ("true", "unexpected")
    assert int(program["startretries"]) > 0
