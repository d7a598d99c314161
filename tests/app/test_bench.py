"""Smoke test of the benchmarks (`python -m bench --quick`): every figure is there, with numbers.

No timings are asserted: a shared CI machine makes them meaningless here; `make bench` is
where the figures are read.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from factories import REPO

EXPECTED = {
    "overhead": {"daemon / bare", "(daemon - settle) / bare", "daemon s/checkpoint", "bare s/checkpoint"},
    "swap": {"hot-swap / scratch", "unload+load / scratch", "hot-swap s", "unload+load s", "scratch s"},
    "detection": {"settle 0.1 s", "settle 0.1 s, p95", "defaults"},
    "batching": {"batched img/s", "one-by-one img/s", "batched / one-by-one"},
    "embed_cache": {"with cache s/checkpoint", "without s/checkpoint", "speedup (without / with)"},
    "memory": {"daemon peak RSS", "bare peak RSS", "daemon / bare"},
}
RESULT_FIELDS = ("median", "min", "max", "p95")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str]:
    """`python -m bench --quick` in a process of its own (it sets torch's threads), results in a temp file."""
    results = tmp_path_factory.mktemp("bench") / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--results", str(results)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(results.read_text(encoding="utf-8")), done.stdout


@pytest.mark.slow
def test_every_figure_is_there_with_numbers(quick_run) -> None:
    content, _ = quick_run
    found: dict[str, set[str]] = {}
    for figure in content["figures"]:
        found.setdefault(figure["benchmark"], set()).add(figure["metric"])
        for field in RESULT_FIELDS:
            value = figure[field]
            assert isinstance(value, float | int) and math.isfinite(value), (figure["metric"], field, value)
        assert figure["n"] >= 1
        assert figure["values"] and all(isinstance(value, float | int) for value in figure["values"])
    assert found == EXPECTED


@pytest.mark.slow
def test_cases_cover_both_sizes_where_asked(quick_run) -> None:
    content, _ = quick_run
    cases = {(f["benchmark"], f["case"].split("/")[1]) for f in content["figures"]}
    for benchmark in ("overhead", "swap", "embed_cache"):
        assert {(benchmark, "shallow"), (benchmark, "deep")} <= cases


@pytest.mark.slow
def test_machine_versions_and_table(quick_run) -> None:
    content, stdout = quick_run
    assert set(content["machine"]) >= {"cpu", "cores", "torch_threads"}
    assert content["machine"]["torch_threads"] == 1
    assert set(content["versions"]) >= {"python", "torch", "diffusers", "transformers", "peft"}
    assert content["date"] and content["profile"]["name"] == "quick"
    assert "benchmark" in stdout and "overhead" in stdout


def test_only_rejects_an_unknown_benchmark(capsys) -> None:
    from bench.__main__ import parse

    with pytest.raises(SystemExit):
        parse(["--only", "nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err
