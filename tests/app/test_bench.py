"""Smoke test of the benchmarks (`python -m bench --quick`): every figure is there, with numbers.

No timings are asserted: a shared CI machine makes them meaningless here; `make bench` is
where the figures are read.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
from factories import REPO

from bench.phases import PHASES, PhaseRecorder, Span

EXPECTED = {
    "overhead": {"daemon / bare", "daemon s/checkpoint", "bare s/checkpoint"},
    "call_overhead": {"daemon / pure __call__", "daemon s/checkpoint", "pure __call__ s/checkpoint"},
    "start": {"watch / bare script", "watch start -> first sample s", "bare script s"},
    "throughput": {
        "daemon img/s",
        "bare loop img/s",
        "pure __call__ img/s",
        "daemon / bare loop",
        "daemon / pure __call__",
    },
    "swap": {
        "hot-swap / scratch",
        "unload+load / scratch",
        "hot-swap / unload+load",
        "hot-swap s",
        "unload+load s",
        "scratch s",
    },
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
    phases = found.pop("phases")
    assert found == EXPECTED
    assert set(PHASES) <= phases  # each phase of the render path; what ran beside it, "(off path)"
    assert all(name in PHASES or name.endswith(" (off path)") for name in phases)


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
    assert "where a checkpoint's time goes" in stdout and "sdxl/deep" in stdout


def test_only_rejects_an_unknown_benchmark(capsys) -> None:
    from bench.__main__ import parse

    with pytest.raises(SystemExit):
        parse(["--only", "nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_phases_count_own_time_inside_the_window_and_the_rest_is_detection_or_other() -> None:
    recorder = PhaseRecorder(object)
    recorder.spans += [
        Span("copy", "bench-daemon", 1.0, 2.0, own=0.6),  # 0.4 s of it hashing, nested
        Span("hashing", "bench-daemon", 1.2, 1.6, own=0.4),
        Span("__call__", "bench-daemon", 3.0, 7.0, own=4.0),
        Span("sample files", "bench-daemon", 9.0, 11.0, own=2.0),  # half inside the window
        Span("grid", "sidecar-publish", 4.0, 5.0, own=1.0),  # beside the render path
        Span("gallery", "bench-daemon", 20.0, 21.0, own=1.0),  # after the window
    ]
    on_path, off_path = recorder.breakdown(0.5, 10.0)

    assert on_path["detection"] == pytest.approx(0.5)  # whole -> the copy starts
    assert on_path["copy"] == pytest.approx(0.6) and on_path["hashing"] == pytest.approx(0.4)
    assert on_path["__call__"] == pytest.approx(4.0) and on_path["sample files"] == pytest.approx(1.0)
    assert on_path["gallery"] == 0.0 and on_path["grid"] == 0.0
    assert on_path["other"] == pytest.approx(9.5 - 0.5 - 1.0 - 4.0 - 1.0)
    assert off_path == {"grid": pytest.approx(1.0)}


def test_the_recorder_times_nested_calls_as_own_time_and_puts_everything_back() -> None:
    import sidecar.intake.cache as cache
    from sidecar.jobs.store import JobStore

    class Pipeline:
        def __call__(self) -> None:
            with recorder.span("PNG encoding"):
                pass

    recorder = PhaseRecorder(Pipeline)
    with recorder:
        assert "claim_next_checkpoint" in vars(JobStore)  # inherited: shadowed while recording
        Pipeline()()
        cache.hashlib.sha256().update(b"x" * 1024)
    assert "claim_next_checkpoint" not in vars(JobStore)
    assert cache.hashlib.sha256 is hashlib.sha256 and "__call__" in vars(Pipeline)
    spans = {span.phase: span for span in recorder.spans}
    assert set(spans) == {"__call__", "PNG encoding", "hashing"}
    call, png = spans["__call__"], spans["PNG encoding"]
    assert call.own == pytest.approx((call.end - call.start) - (png.end - png.start))
