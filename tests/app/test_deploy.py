"""The systemd unit, its env file and the supervisor program verify and run commands sidecar accepts."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from factories import REPO

from sidecar.app.watch import _stop_on_signals
from sidecar.cli_parser import build_parser

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "sidecar@.service"
ENV_EXAMPLE = DEPLOY / "sidecar.env.example"
SUPERVISOR = DEPLOY / "supervisor-sidecar.conf"
MIN_STOP_SECONDS = 60  # a 1024 px Flux image with offload can take a minute
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
ENV_LINE = re.compile(r"(#?)([A-Z_][A-Z0-9_]*)=(.*)")


def _ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(path)
    return parser


def _env_file(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The settings of an EnvironmentFile, and the commented-out alternatives `#KEY=value`."""
    values: dict[str, str] = {}
    alternatives: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        match = ENV_LINE.fullmatch(line)
        if match and match.group(1):
            alternatives.setdefault(match.group(2), []).append(match.group(3))
        elif line and not line.startswith("#"):
            assert match, f"not KEY=value (systemd EnvironmentFile syntax): {line!r}"
            values[match.group(2)] = match.group(3)
    return values, alternatives


def _systemd_words(command: str, env: dict[str, str]) -> list[str]:
    """ExecStart as systemd runs it: `${NAME}` is one word, a bare `$NAME` word splits at whitespace."""
    words: list[str] = []
    for word in shlex.split(command):
        bare = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if bare:
            words += env[bare.group(1)].split()
        else:
            words.append(VARIABLE.sub(lambda m: env[m.group(1) or m.group(2)], word))
    return words


def _parse_cli(words: list[str]):
    """`words` after the program, through sidecar's own parser; fails the test where argparse would exit."""
    try:
        return build_parser().parse_args(words)
    except SystemExit as exc:
        pytest.fail(f"sidecar's parser refuses {shlex.join(words)!r} (exit {exc.code})")


def _console_script() -> str:
    """The command `pip install` puts in the venv's bin (pyproject's `[project.scripts]`)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    (name,) = re.findall(r'^([\w.-]+)\s*=\s*"sidecar\.cli:main"', scripts, re.MULTILINE)
    return name


def _unit_env_variants() -> list:
    """The env example as shipped, and with each commented-out alternative of a variable the unit uses."""
    values, alternatives = _env_file(ENV_EXAMPLE)
    used = _unit_variables()
    variants = [pytest.param(values, id="as-shipped")]
    for key, options in alternatives.items():
        if key in used:
            variants += [pytest.param({**values, key: option}, id=f"{key}={option}") for option in options]
    return variants


def _unit_variables() -> set[str]:
    """The variables the unit's [Service] reads (its own `Environment=` lines define, not read)."""
    service = _ini(UNIT)["Service"]
    return {
        a or b for key, value in service.items() if key != "Environment" for a, b in VARIABLE.findall(value)
    }


# --- systemd --------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    """systemd's own check; the binary is swapped for one that exists here, as verify checks it."""
    binary = shlex.split(_ini(UNIT)["Service"]["ExecStart"])[0]
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(binary, shutil.which("true") or "/bin/true"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys and bad values only warn


MAX_EXPOSURE = 3.0  # `systemd-analyze security`: 2.7 as shipped (deploy/README.md)


def _service_lines() -> dict[str, list[str]]:
    """Every `Key=value` of the unit's [Service], with repeated keys kept (configparser keeps the last)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_runs_confined_as_an_unprivileged_user():
    service = _service_lines()
    assert service["User"][0] not in ("", "root", "0") or service.get("DynamicUser") == ["yes"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "read-only",
        "CapabilityBoundingSet": "",
    }.items():
        assert service.get(key) == [value], f"{key}= should be {value!r}, got {service.get(key)}"
    assert "PrivateDevices" not in service  # it would hide /dev/nvidia*


def test_the_units_writable_paths_cover_the_env_examples_output_folder():
    """`ReadWritePaths=` cannot read the env file; as shipped it names the example job's folder."""
    env, _ = _env_file(ENV_EXAMPLE)
    instance = "myjob"
    writable = [Path(p.replace("%i", instance)) for p in _service_lines()["ReadWritePaths"][0].split()]
    output = Path(env["OUTPUT_DIR"])
    assert any(output == path or path in output.parents for path in writable), (writable, output)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_security_rates_the_unit_ok(tmp_path):
    binary = shlex.split(_ini(UNIT)["Service"]["ExecStart"])[0]
    unit = tmp_path / "sidecar@myjob.service"
    unit.write_text(UNIT.read_text().replace(binary, shutil.which("true") or "/bin/true"))
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    if found is None:  # systemd older than 250 has no --offline
        pytest.skip(f"systemd-analyze security cannot rate a unit file here: {result.stderr.strip()[:200]}")
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


def test_env_example_defines_every_variable_the_unit_uses():
    service = _ini(UNIT)["Service"]
    used = {
        a or b for key, value in service.items() if key != "Environment" for a, b in VARIABLE.findall(value)
    }
    assert used, "the unit reads nothing from its EnvironmentFile"
    defined, _ = _env_file(ENV_EXAMPLE)
    assert used <= set(defined), f"used by the unit but not in {ENV_EXAMPLE.name}: {used - set(defined)}"


@pytest.mark.parametrize("env", _unit_env_variants())
def test_unit_exec_start_is_a_watch_command_sidecar_accepts(env):
    words = _systemd_words(_ini(UNIT)["Service"]["ExecStart"], env)
    assert Path(words[0]).name == _console_script()
    args = _parse_cli(words[1:])
    assert args.command == "watch"
    assert args.output_dir == Path(env["OUTPUT_DIR"])
    assert args.config == Path(env["CONFIG"])
    # SIDECAR_ARGS reaches the parser as options, not as one quoted word, and names a card:
    # without --gpu or --share-gpu sidecar takes cuda:0, which may be the trainer's
    assert args.gpu is not None or args.share_gpu is not None


# --- supervisor -----------------------------------------------------------------


def _supervisor_commands() -> list[str]:
    """Every program's `command`, and the commented-out alternatives `;command=...`."""
    conf = _ini(SUPERVISOR)
    programs = [conf[s] for s in conf.sections() if s.startswith("program:")]
    assert programs, f"no [program:...] section in {SUPERVISOR.name}"
    alternatives = re.findall(r"^;command=(.*)$", SUPERVISOR.read_text(), re.MULTILINE)
    return [pytest.param(p["command"], id=p.name) for p in programs] + [
        pytest.param(command, id=f"alternative-{n}") for n, command in enumerate(alternatives, 1)
    ]


def test_supervisor_runs_the_program_as_an_unprivileged_user():
    conf = _ini(SUPERVISOR)
    for section in (s for s in conf.sections() if s.startswith("program:")):
        assert conf[section].get("user", "root") not in ("root", "0"), section


@pytest.mark.parametrize("command", _supervisor_commands())
def test_supervisor_command_is_a_watch_command_sidecar_accepts(command):
    words = shlex.split(command)
    assert Path(words[0]).name == _console_script()
    args = _parse_cli(words[1:])
    assert args.command == "watch"
    assert args.config is not None
    assert args.gpu is not None or args.share_gpu is not None  # never cuda:0 by default


# --- stopping -------------------------------------------------------------------


def _stop_settings() -> list[tuple[str, str, int]]:
    """(where, signal name, seconds granted before the kill) for the unit and each program."""
    service = _ini(UNIT)["Service"]
    found = [("systemd", service["KillSignal"], int(service["TimeoutStopSec"]))]
    conf = _ini(SUPERVISOR)
    for section in (s for s in conf.sections() if s.startswith("program:")):
        program = conf[section]
        found.append((section, "SIG" + program["stopsignal"], int(program["stopwaitsecs"])))
    return found


@pytest.mark.parametrize(("where", "name", "seconds"), _stop_settings(), ids=lambda v: str(v))
def test_stopping_lets_the_daemon_finish_its_image(where, name, seconds):
    """The stop signal is one the daemon turns into a graceful stop, with time for one image."""
    stopped: list[bool] = []
    with _stop_on_signals(lambda: stopped.append(True)):
        signal.raise_signal(signal.Signals[name])
    assert stopped == [True], f"{where}: {name} does not stop the daemon gracefully"
    assert seconds >= MIN_STOP_SECONDS, f"{where}: {seconds} s is shorter than one image may take"
