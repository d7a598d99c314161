"""`sidecar watch` end to end (`sidecar.app.watch.run_watch`): lock, signals, once, stop_after, until, demo.

Each test runs the real daemon loop with the watchdog observer on a temp folder and renders
with the tiny SDXL model; the intake's and the dispatcher's own behaviour is tested on their
`loop_once` in test_intake_loop.py and test_dispatch.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.app.state import StateFile
from sidecar.app.status import status_report
from sidecar.app.watch import (
    EXIT_FAILED,
    EXIT_OK,
    WATCHER_RESTART_WINDOW_SECONDS,
    Daemon,
    WatcherDied,
    WatchRequest,
    build_slot_gate,
    run_watch,
)
from sidecar.confined import UnsafeEntryError
from sidecar.errors import ConfigError, ModelError, SidecarError
from sidecar.intake.layouts import recognise
from sidecar.intake.watcher import FileEvent
from sidecar.jobs.locks import process_lock
from sidecar.jobs.records import CheckpointJob
from sidecar.jobs.store import JobStore
from sidecar.settings import SamplesFolder, Settings
from sidecar.testing.loras import write_lora
from sidecar.testing.trainer import write_trainer_config

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

PROMPTS = ("a photo of [trigger]", "[trigger] in the snow")
NAME = "demo_lora"
FAST = {"settle_seconds": 0.1, "poll_interval_seconds": 0.05}  # a daemon that exits soon
JOIN_SECONDS = 60.0  # a thread still blocked after this has missed its wake-up


@pytest.fixture(scope="module")
def base_renderer(tiny_sdxl: Path):
    """One tiny SDXL renderer for the module, as the daemon holds one per process."""
    from sidecar.render.registry import renderer_class

    return renderer_class("sdxl").from_model(str(tiny_sdxl))


class CountingRenderer:
    """The real renderer, counting images rendered; can act before each image is yielded."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.rendered: list[int] = []
        self.before_image: Callable[[], None] | None = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def render_resilient(self, requests, *, batch_size: int = 1) -> Iterator:
        for request, image in self.inner.render_resilient(requests, batch_size=batch_size):
            self.rendered.append(request.index)
            if self.before_image is not None:
                self.before_image()
            yield request, image


@dataclass
class Site:
    """A trainer output folder, its config and the daemon's samples folder."""

    model: Path
    output_dir: Path
    config_path: Path
    renderer: CountingRenderer

    @property
    def samples_dir(self) -> Path:
        return self.output_dir / "samples"

    @property
    def folder(self) -> SamplesFolder:
        return SamplesFolder(self.samples_dir)

    def request(self, *, once: bool = False, stop_after: int | None = None, **overrides) -> WatchRequest:
        return WatchRequest(
            output_dir=self.output_dir,
            config_path=self.config_path,
            overrides=FAST | overrides,
            once=once,
            stop_after=stop_after,
        )

    def watch(self, request: WatchRequest, **options) -> int:
        return run_watch(request, renderer_factory=lambda: self.renderer, **options)

    def lora(self, step: int) -> Path:
        path = self.output_dir / f"{NAME}_{step:09d}.safetensors"
        write_lora(self.model, "sdxl", path, lora_format="kohya", seed=step, scale=step / 100)
        return path

    def jobs(self) -> dict[int | None, CheckpointJob]:
        with JobStore(self.folder.jobs) as store:
            return {job.step: job for job in store.checkpoints()}

    def sample_states(self, step: int) -> list[str]:
        with JobStore(self.folder.jobs) as store:
            return [sample.state for sample in store.samples(self.jobs()[step].id)]

    def images(self, step: int) -> list[Path]:
        return sorted(self.folder.step(step).glob("sample_*.png"))


@pytest.fixture
def make_site(tmp_path: Path, tiny_sdxl: Path, base_renderer) -> Callable[..., Site]:
    def make(*, prompts=PROMPTS) -> Site:
        training_folder = tmp_path / "output"
        output_dir = training_folder / NAME
        output_dir.mkdir(parents=True, exist_ok=True)
        config_path = write_trainer_config(
            tmp_path / "trainer.yaml",
            model_folder=tiny_sdxl,
            training_folder=training_folder,
            prompts=prompts,
            sample_steps=2,
            save_every=1,
        )
        return Site(tiny_sdxl, output_dir, config_path, CountingRenderer(base_renderer))

    return make


# --- once, stop_after, until ----------------------------------------------------------------


def test_once_renders_what_is_there_and_exits(make_site) -> None:
    site = make_site()
    site.lora(100)

    code = site.watch(site.request(once=True))

    assert code == EXIT_OK
    assert len(site.images(100)) == 2
    assert site.jobs()[100].state == "done"
    assert "daemon: not running (last state: stopped" in status_report(site.samples_dir)


def test_a_checkpoint_there_before_the_start_renders_without_a_settle_wait_the_base_loading_meanwhile(
    make_site,
) -> None:
    """Start to first sample: a file the trainer wrote before sidecar started, unchanged for longer
    than the settle time by its mtime, is taken in at once, while the base loads on a thread."""
    site = make_site()
    written_before = time.time() - 3600  # an hour before: settled by any measure
    os.utime(site.lora(100), (written_before, written_before))
    loaded_on: list[str] = []

    def factory():
        loaded_on.append(threading.current_thread().name)
        return site.renderer

    request = site.request(once=True, settle_seconds=300.0, abandon_seconds=600.0)
    daemon = threading.Thread(target=lambda: run_watch(request, renderer_factory=factory), daemon=True)
    daemon.start()
    daemon.join(JOIN_SECONDS)  # a settle wait would hold the daemon for 300 s

    assert not daemon.is_alive() and len(site.images(100)) == 2
    assert loaded_on == ["sidecar-load-base"]


def test_once_exits_1_only_for_a_checkpoint_that_failed_during_this_run(make_site) -> None:
    site = make_site()
    site.lora(100)
    (site.output_dir / f"{NAME}_000000200.safetensors").write_bytes(b"")  # never whole

    code = site.watch(site.request(once=True, abandon_seconds=0.5))

    assert code == EXIT_FAILED
    jobs = site.jobs()
    assert jobs[100].state == "done"
    assert jobs[200].state == "failed" and "file is empty" in jobs[200].error
    # the next run finds the same failure recorded, and nothing failing anew
    assert site.watch(site.request(once=True, abandon_seconds=0.5)) == EXIT_OK
    assert len(site.jobs()) == 2


def test_stop_after_exits_once_that_many_checkpoints_are_rendered(make_site) -> None:
    site = make_site()
    site.lora(100)
    site.lora(200)

    code = site.watch(site.request(stop_after=1))

    assert code == EXIT_OK
    states = {step: job.state for step, job in site.jobs().items()}
    assert states == {100: "done", 200: "pending"}
    assert site.images(200) == []


def test_until_takes_a_last_look_renders_what_is_left_and_exits(make_site) -> None:
    site = make_site()
    site.lora(100)
    asked: list[bool] = []

    def trainer_done() -> bool:
        asked.append(True)
        return True

    code = site.watch(site.request(), until=trainer_done)

    assert code == EXIT_OK and asked
    assert site.jobs()[100].state == "done" and len(site.images(100)) == 2


def test_a_stop_asked_before_the_first_iteration_renders_nothing_and_records_stopped(make_site) -> None:
    site = make_site()
    site.lora(100)

    code = site.watch(site.request(), daemon_ready=Daemon.request_stop)

    assert code == EXIT_OK
    assert site.renderer.rendered == []
    assert "daemon: not running (last state: stopped" in status_report(site.samples_dir)


def test_stop_after_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stop_after"):
        WatchRequest(output_dir=tmp_path, config_path=tmp_path / "x.yaml", overrides={}, stop_after=0)


def test_a_request_takes_paths_as_strings(tmp_path: Path) -> None:
    request = WatchRequest(
        output_dir=str(tmp_path),  # type: ignore[arg-type]
        config_path=str(tmp_path / "x.yaml"),  # type: ignore[arg-type]
        overrides={},
        prompts_file=str(tmp_path / "prompts.txt"),  # type: ignore[arg-type]
    )
    assert request.output_dir == tmp_path
    assert isinstance(request.config_path, Path) and isinstance(request.prompts_file, Path)


def test_settings_that_cannot_work_are_refused_before_anything_runs(make_site) -> None:
    site = make_site()
    with pytest.raises(ConfigError, match="abandon_seconds"):
        site.watch(site.request(settle_seconds=5, abandon_seconds=1))
    assert not site.folder.state.exists()  # refused before the lock or the store


# --- signals --------------------------------------------------------------------------------


def test_sigterm_stops_after_the_current_image_and_the_old_handler_comes_back(make_site) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed on the main thread")
    site = make_site(prompts=tuple(f"[trigger] picture {n}" for n in range(3)))
    site.lora(100)
    site.renderer.before_image = lambda: os.kill(os.getpid(), signal.SIGTERM)
    previous = signal.getsignal(signal.SIGTERM)

    code = site.watch(site.request())

    assert code == EXIT_OK
    assert site.renderer.rendered == [0]
    assert site.sample_states(100) == ["done", "pending", "pending"]
    assert site.jobs()[100].state == "pending"
    assert len(site.images(100)) == 1
    assert signal.getsignal(signal.SIGTERM) is previous


# --- the lock and a base model that does not load ---------------------------------------------


def test_one_daemon_per_samples_folder(make_site) -> None:
    site = make_site()
    folder = site.folder
    with (
        process_lock(folder.lock, what=str(folder.root)),
        pytest.raises(SidecarError, match="already rendering"),
    ):
        site.watch(site.request(once=True))


def test_a_base_model_that_does_not_load_stops_the_daemon(make_site) -> None:
    site = make_site()
    site.lora(100)

    def no_model() -> None:
        raise ModelError("/nowhere: no such file or folder", key="name_or_path")

    with pytest.raises(ModelError, match="nowhere"):
        run_watch(site.request(), renderer_factory=no_model)
    assert "last state: stopped" in status_report(site.samples_dir)
    with process_lock(site.folder.lock, what="released on the way out"):
        pass


# --- a dead watcher --------------------------------------------------------------------------


class FailingWatcher:
    """A watcher whose handler keeps failing: `problem()` says so until it is restarted."""

    def __init__(self) -> None:
        self.restarts = 0
        self.failing = True

    def problem(self) -> str | None:
        return "the file-event handler failed: RuntimeError: boom" if self.failing else None

    def restart(self) -> None:
        self.restarts += 1


def test_a_dead_watcher_is_restarted_and_one_that_keeps_dying_stops_the_daemon(make_site) -> None:
    site = make_site()
    daemons: list[Daemon] = []
    assert site.watch(site.request(once=True), daemon_ready=daemons.append) == EXIT_OK
    (daemon,) = daemons
    watcher = FailingWatcher()
    daemon.watcher = watcher  # type: ignore[assignment]

    for now in (0.0, 10.0, 20.0):
        daemon.check_watcher(now)
    assert watcher.restarts == 3
    with pytest.raises(WatcherDied, match=r"failed 4 times in 600 s \(the file-event handler failed"):
        daemon.check_watcher(30.0)

    daemon.check_watcher(30.0 + WATCHER_RESTART_WINDOW_SECONDS)  # old failures age out: restarted again
    assert watcher.restarts == 4
    watcher.failing = False
    daemon.check_watcher(10_000.0)
    assert watcher.restarts == 4


# --- the samples folder's own entries -----------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "setting"), [("--follow-symlinks", "follow_symlinks"), ("--compile", "compile")]
)
def test_a_flag_on_the_command_line_reaches_the_daemons_settings(
    make_site, monkeypatch, flag: str, setting: str
) -> None:
    from sidecar.cli import main

    site = make_site()
    requests: list[WatchRequest] = []
    monkeypatch.setattr("sidecar.app.watch.run_watch", lambda request: requests.append(request) or 0)
    args = ["watch", str(site.output_dir), "--config", str(site.config_path)]
    assert main([*args, flag]) == 0 and main(args) == 0
    assert [request.overrides[setting] for request in requests] == [True, None]
    assert getattr(Settings().merged(**{setting: True}), setting) and not getattr(Settings(), setting)


@pytest.mark.parametrize(
    "entry", [".sidecar", ".sidecar/cache", ".sidecar/daemon.lock", ".sidecar/jobs.sqlite3"]
)
def test_a_state_entry_that_is_a_symlink_stops_the_daemon_before_anything_is_written(
    make_site, tmp_path: Path, entry: str
) -> None:
    site = make_site()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_bytes(b"keep me")
    planted = site.samples_dir / entry
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.symlink_to(victim if not entry.endswith((".lock", ".sqlite3")) else victim / "precious.txt")

    with pytest.raises(UnsafeEntryError, match=rf"{planted.name}` is a symbolic link"):
        site.watch(site.request(once=True))

    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert (victim / "precious.txt").read_bytes() == b"keep me"


def test_a_default_samples_folder_that_is_a_symlink_is_refused_but_one_named_by_output_is_used(
    make_site, tmp_path: Path
) -> None:
    site = make_site()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    site.samples_dir.symlink_to(elsewhere)
    with pytest.raises(UnsafeEntryError, match="samples` is a symbolic link"):
        site.watch(site.request(once=True))
    assert list(elsewhere.iterdir()) == []
    assert site.watch(site.request(once=True, output=site.samples_dir)) == EXIT_OK
    assert (elsewhere / ".sidecar").is_dir()


def test_status_lists_every_file_not_ready_yet_with_its_reason(make_site) -> None:
    site = make_site()
    assert site.watch(site.request(once=True)) == EXIT_OK
    state = StateFile(site.samples_dir)
    state.set("idle")
    half = site.output_dir / f"{NAME}_000000100.safetensors"
    state.set_waiting([(half, "not whole yet: header says 800 bytes of data, file has 12")], now=0.0)

    report = status_report(site.samples_dir)

    assert f"not ready yet (1):\n  {half}: not whole yet: header says 800 bytes" in report


# --- the idle wait ----------------------------------------------------------------------------


def test_the_idle_wait_ends_when_the_watcher_has_news_or_a_stop_is_asked(make_site) -> None:
    """The back-off wakes on an event instead of sleeping its full length (detection latency)."""
    site = make_site()
    daemons: list[Daemon] = []
    assert site.watch(site.request(once=True), daemon_ready=daemons.append) == EXIT_OK
    (daemon,) = daemons
    lora = site.lora(100)

    waiting = threading.Thread(target=daemon.wait_for_work, args=(3600.0,), daemon=True)
    waiting.start()
    daemon.intake.events.put(FileEvent("created", lora, recognise(lora, root=site.output_dir)))
    waiting.join(JOIN_SECONDS)
    assert not waiting.is_alive()  # woke on the event, long before the back-off ran out
    assert not daemon.intake.events.empty()
    daemon.intake.events.get_nowait()

    waiting = threading.Thread(target=daemon.wait_for_work, args=(3600.0,), daemon=True)
    waiting.start()
    daemon.request_stop()  # nothing queued, but a stop request ends the wait
    waiting.join(JOIN_SECONDS)
    assert not waiting.is_alive()


# --- the slot gate ----------------------------------------------------------------------------


def test_a_card_of_its_own_gets_an_always_open_gate(tmp_path: Path) -> None:
    assert build_slot_gate(Settings()).always_open
    gate = build_slot_gate(Settings(slot_file=tmp_path / "slot"))
    assert not gate.always_open
    assert not gate.wait_state(0.0).is_open  # `exists` mode: the file is not there
    (tmp_path / "slot").touch()
    assert gate.wait_state(1.0).is_open


# --- the demo ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_demo_renders_every_checkpoint_of_a_simulated_training_run(tmp_path: Path) -> None:
    from sidecar.app.demo import run_demo

    result = run_demo(tmp_path / "demo", checkpoints=2)

    assert result.exit_code == 0 and result.failures == ()
    assert [folder.name for folder in result.step_dirs] == [
        "step_000000",
        "step_000100",
        "step_000200",
        "step_000300",
    ]
    assert len(list((result.samples_dir / "step_000000").glob("sample_*.png"))) == 3  # the baseline
    assert result.images == 9
    assert str(result.samples_dir) in result.summary()
