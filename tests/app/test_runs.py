"""The sweep file `runs.yaml` (`sidecar.app.runs`): its runs, its located errors, its re-reading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.app.runs import RunsFile, RunSpec, read_runs, runs_status
from sidecar.errors import ConfigError


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_runs_have_names_samples_folders_and_paths_from_the_files_folder(tmp_path: Path) -> None:
    runs_file = _write(
        tmp_path / "runs.yaml",
        "- output: /data/sweep/lr-1e-4\n"
        "  config: /data/sweep/lr-1e-4/config.yaml\n"
        "- output: sweep/lr-3e-4\n"
        "  config: configs/lr-3e-4.yaml\n"
        "  samples: /srv/samples/b\n"
        "  name: b\n"
        "  process: 1\n"
        "  prompts: prompts.txt\n"
        "- output: /data/sweep/lr-1e-3\n",
    )

    runs = read_runs(runs_file)

    assert runs == [
        RunSpec("lr-1e-4", Path("/data/sweep/lr-1e-4"), config=Path("/data/sweep/lr-1e-4/config.yaml")),
        RunSpec(
            "b",
            tmp_path / "sweep/lr-3e-4",
            config=tmp_path / "configs/lr-3e-4.yaml",
            samples=Path("/srv/samples/b"),
            process=1,
            prompts=tmp_path / "prompts.txt",
        ),
        RunSpec("lr-1e-3", Path("/data/sweep/lr-1e-3")),  # config: found in the run folder
    ]
    assert runs[0].samples_dir == Path("/data/sweep/lr-1e-4/samples")
    assert runs[1].samples_dir == Path("/srv/samples/b")
    assert read_runs(_write(tmp_path / "empty.yaml", "")) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("output: /a\n", "runs.yaml:1: must be a list of runs, each `{output: OUTPUT_DIR, config: "),
        ("- output: /a\n- config: /b.yaml\n", "runs.yaml:2 [1].output: is required"),
        ("- /a\n", "runs.yaml:1 [0]: must be a mapping like `{output: OUTPUT_DIR}`, got '/a'"),
        ("- output: /x/a\n- output: /y/a\n", "runs.yaml:2 [1].output: run name 'a' is also that of item 0"),
        (
            "- output: /x/a\n- output: /y/b\n  samples: /x/a/samples\n",
            "runs.yaml:2 [1]: samples folder /x/a/samples is also run 'a''s; one writer per folder",
        ),
    ],
)
def test_a_bad_runs_file_is_a_located_error(tmp_path: Path, text: str, message: str) -> None:
    runs_file = _write(tmp_path / "runs.yaml", text)

    with pytest.raises(ConfigError) as caught:
        read_runs(runs_file)

    assert str(caught.value).startswith(str(tmp_path / message))


def test_an_edit_is_read_again_and_a_bad_edit_keeps_the_runs_known(tmp_path: Path, caplog) -> None:
    runs_file = _write(tmp_path / "runs.yaml", "- output: /x/a\n")
    watched = RunsFile(runs_file)
    assert not watched.reload_if_changed()

    _write(runs_file, "- output: /x/a\n- output: /x/b\n")
    os.utime(runs_file, ns=(1, 1))  # a new signature however fast the edit
    assert watched.reload_if_changed()
    assert [run.name for run in watched.runs] == ["a", "b"]

    _write(runs_file, "- output: /x/a\n- config: /b.yaml\n")
    assert not watched.reload_if_changed()
    assert [run.name for run in watched.runs] == ["a", "b"]
    assert "is not valid; keeping the runs known" in caplog.text


def test_status_of_a_run_never_served_says_so(tmp_path: Path) -> None:
    runs_file = _write(tmp_path / "runs.yaml", f"- output: {tmp_path / 'a'}\n")

    report = runs_status(runs_file)

    assert report.splitlines() == [
        f"{runs_file}: 1 run(s)",
        f"a: {tmp_path / 'a'}",
        f"  samples folder: {tmp_path / 'a' / 'samples'}",
        "  no job store yet (the coordinator has not served this run)",
    ]
