"""The fault matrix for hostile input: the trainer's folder is untrusted, and sidecar survives it.

Each test runs the real daemon (`run_watch`, the real watchdog observer) on a temp folder
whose contents someone other than sidecar planted: symlinks in the state folder and among
the checkpoints, pickled weights, bad patterns, random bytes, a full disk, a watcher that
raises, a YAML alias bomb. Every test asserts that nothing outside the samples folder
changed, byte for byte (`Outside`). Renders use the tiny SDXL model at 64x64 in 2 steps.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import sqlite3
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from faults.beside import run_beside
from safetensors.torch import load_file

from sidecar.app.watch import Daemon, WatcherDied, WatchRequest, run_watch
from sidecar.confined import UnsafeEntryError
from sidecar.errors import ConfigError, ModelError
from sidecar.jobs.store import JobStore
from sidecar.settings import SamplesFolder
from sidecar.testing.loras import write_lora
from sidecar.testing.trainer import write_trainer_config

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

NAME = "demo_lora"
PROMPTS = ("a photo of [trigger]",)
SETTLE_SECONDS = 0.2


@pytest.fixture(scope="module")
def renderer(tiny_sdxl: Path):
    from sidecar.render.registry import renderer_class

    return renderer_class("sdxl").from_model(str(tiny_sdxl))


class Outside:
    """Every file, folder and link under `root` but outside the samples folder, to compare later."""

    def __init__(self, root: Path, samples_dir: Path) -> None:
        self.root, self.samples_dir = root, samples_dir
        self.before = self.take()

    def take(self) -> dict[str, object]:
        found: dict[str, object] = {}
        for current, folders, files in os.walk(self.root):
            here = Path(current)
            folders[:] = [name for name in folders if here / name != self.samples_dir]
            for name in folders + files:
                path = here / name
                if path == self.samples_dir:
                    continue
                key = str(path.relative_to(self.root))
                if path.is_symlink():
                    found[key] = ("link", os.readlink(path))
                elif path.is_dir():
                    found[key] = ("folder",)
                else:
                    found[key] = ("file", path.read_bytes())
        return found

    def written(self, path: Path) -> Path:
        """The trainer wrote `path` during the run: it must stay as written now."""
        self.before[str(path.relative_to(self.root))] = ("file", path.read_bytes())
        return path

    def unchanged(self) -> bool:
        after = self.take()
        changed = sorted(
            key for key in set(self.before) | set(after) if self.before.get(key) != after.get(key)
        )
        assert not changed, f"changed outside the samples folder: {changed}"
        return True


class Site:
    """A trainer's output folder, its config, the samples folder, and a victim folder beside them."""

    def __init__(self, tmp_path: Path, model: Path, *, base_model: Path | None = None) -> None:
        self.root = tmp_path
        self.model = model  # what the LoRAs are written for
        self.daemon: Daemon | None = None
        self.output_dir = tmp_path / "output" / NAME
        self.output_dir.mkdir(parents=True)
        self.samples_dir = self.output_dir / "samples"
        self.config_path = write_trainer_config(
            tmp_path / "trainer.yaml",
            model_folder=base_model or model,
            training_folder=tmp_path / "output",
            prompts=PROMPTS,
            size_pixels=64,
            sample_steps=2,
            save_every=1,
        )
        self.victim = tmp_path / "victim"
        (self.victim / "nested").mkdir(parents=True)
        (self.victim / "precious.txt").write_bytes(b"someone else's file")
        (self.victim / "nested" / "deep.bin").write_bytes(bytes(range(256)))

    @property
    def folder(self) -> SamplesFolder:
        return SamplesFolder(self.samples_dir)

    def outside(self) -> Outside:
        return Outside(self.root, self.samples_dir)

    def lora(self, step: int, *, seed: int | None = None) -> Path:
        path = self.output_dir / f"{NAME}_{step:09d}.safetensors"
        write_lora(self.model, "sdxl", path, lora_format="kohya", seed=seed or step, scale=0.5)
        return path

    def request(self, *, once: bool = True, **changes) -> WatchRequest:
        settings = {"device": "cpu", "settle_seconds": SETTLE_SECONDS, "poll_interval_seconds": 0.05}
        return WatchRequest(
            output_dir=self.output_dir, config_path=self.config_path, overrides=settings | changes, once=once
        )

    def watch(self, renderer, **changes) -> int:
        return run_watch(self.request(**changes), renderer_factory=lambda: renderer)

    def beside(self, trainer: Callable[[], None], renderer, **changes) -> int:
        """The daemon in this thread, `trainer` in another; the daemon ends once the trainer has."""
        code, self.daemon = run_beside(self.request(once=False, **changes), trainer, renderer)
        return code

    def jobs(self) -> dict[int | None, object]:
        with JobStore(self.folder.jobs) as store:
            return {job.step: job for job in store.checkpoints()}

    def images(self, step: int) -> list[Path]:
        return sorted(self.folder.step(step).glob("sample_*.png"))

    def recorded(self, step: int) -> bool:
        """Whether the running daemon's store has a row at `step` (read as another process would)."""
        try:
            with sqlite3.connect(self.folder.jobs, timeout=5) as connection:
                row = connection.execute("SELECT 1 FROM checkpoints WHERE step = ?", (step,)).fetchone()
        except sqlite3.OperationalError:  # not made yet
            return False
        return row is not None


def wait_until(condition: Callable[[], object], *, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def site(tmp_path: Path, tiny_sdxl: Path) -> Site:
    return Site(tmp_path, tiny_sdxl)


def untouched(victim: Path) -> bool:
    return (victim / "precious.txt").read_bytes() == b"someone else's file" and sorted(
        p.name for p in victim.rglob("*")
    ) == ["deep.bin", "nested", "precious.txt"]


# --- symlinked state entries ----------------------------------------------------------------------


def test_survives_a_cache_folder_linked_to_another_folder_without_emptying_it(site: Site, renderer) -> None:
    """The case found: `watch --once` emptied the folder `.sidecar/cache` pointed to."""
    site.lora(100)
    site.folder.state.mkdir(parents=True)
    site.folder.cache.symlink_to(site.victim)
    outside = site.outside()

    with pytest.raises(UnsafeEntryError, match=r"cache` is a symbolic link \(to .*victim\).*remove it"):
        site.watch(renderer)

    assert untouched(site.victim) and outside.unchanged()


@pytest.mark.parametrize(
    "entry", ["daemon.lock", "daemon.json", "jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"]
)
def test_survives_state_files_linked_to_a_file_outside(site: Site, renderer, entry: str) -> None:
    site.folder.state.mkdir(parents=True)
    (site.folder.state / entry).symlink_to(site.victim / "precious.txt")
    outside = site.outside()

    with pytest.raises(UnsafeEntryError, match=rf"{entry}` is a symbolic link"):
        site.watch(renderer)

    assert untouched(site.victim) and outside.unchanged()


def test_survives_a_lock_file_hard_linked_to_a_file_outside(site: Site, renderer) -> None:
    site.folder.state.mkdir(parents=True)
    os.link(site.victim / "precious.txt", site.folder.lock)  # truncating it would truncate the victim
    outside = site.outside()

    with pytest.raises(UnsafeEntryError, match="has 2 hard links"):
        site.watch(renderer)

    assert untouched(site.victim) and outside.unchanged()


def test_survives_a_state_folder_that_is_a_link_or_a_file(site: Site, renderer) -> None:
    site.samples_dir.mkdir()
    site.folder.state.symlink_to(site.victim)
    outside = site.outside()
    with pytest.raises(UnsafeEntryError, match=r"\.sidecar` is a symbolic link"):
        site.watch(renderer)
    site.folder.state.unlink()
    site.folder.state.write_bytes(b"a file")
    with pytest.raises(UnsafeEntryError, match=r"\.sidecar` is a file, not a folder"):
        site.watch(renderer)
    assert untouched(site.victim) and outside.unchanged()


def test_survives_linked_step_and_thumbnail_folders(site: Site, renderer) -> None:
    """A step folder that is a link fails that step with why; the next step renders; the gallery's
    thumbnails never go through a link (a linked `.thumbs` stops the daemon at the start)."""
    site.lora(100)
    site.lora(200)
    site.samples_dir.mkdir()
    site.folder.step(100).symlink_to(site.victim)
    outside = site.outside()

    assert site.watch(renderer) == 1  # `--once`: a checkpoint failed

    jobs = site.jobs()
    assert jobs[100].state == "failed" and "step_000100` is a symbolic link" in jobs[100].error
    assert jobs[200].state == "done" and len(site.images(200)) == 1
    shutil.rmtree(site.samples_dir / ".thumbs")
    (site.samples_dir / ".thumbs").symlink_to(site.victim)
    with pytest.raises(UnsafeEntryError, match=r"\.thumbs` is a symbolic link"):
        site.watch(renderer)
    assert untouched(site.victim) and outside.unchanged()


# --- symlinked checkpoints ------------------------------------------------------------------------


def test_survives_a_checkpoint_linked_to_a_file_outside_the_watched_folder(site: Site, renderer) -> None:
    secret = site.root / "secret.safetensors"
    secret.write_bytes(site.lora(100).read_bytes())  # a valid LoRA even: it is still not read
    (site.output_dir / f"{NAME}_000000100.safetensors").unlink()
    (site.output_dir / f"{NAME}_000000100.safetensors").symlink_to(secret)
    site.lora(200)
    outside = site.outside()

    assert site.watch(renderer) == 1

    jobs = site.jobs()
    assert jobs[100].state == "failed" and "outside the watched folder" in jobs[100].error
    assert "--follow-symlinks" in jobs[100].error and site.images(100) == []
    assert jobs[200].state == "done"
    assert not any(p.read_bytes() == secret.read_bytes() for p in site.samples_dir.rglob("*.safetensors"))
    assert outside.unchanged()


def test_survives_linked_in_storage_with_follow_symlinks(site: Site, renderer) -> None:
    storage = site.root / "storage"
    storage.mkdir()
    real = site.lora(100)
    shutil.move(real, storage / real.name)
    real.symlink_to(storage / real.name)
    outside = site.outside()

    assert site.watch(renderer, follow_symlinks=True) == 0

    assert site.jobs()[100].state == "done" and len(site.images(100)) == 1
    assert outside.unchanged()


# --- pickled weights ------------------------------------------------------------------------------


def test_survives_a_base_model_with_only_pickled_weights_without_unpickling(
    tmp_path: Path, tiny_sdxl: Path, monkeypatch
) -> None:
    model = shutil.copytree(tiny_sdxl, tmp_path / "pickled-model")
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(unet)), model / "unet" / "diffusion_pytorch_model.bin")
    unet.unlink()
    site = Site(tmp_path / "run", tiny_sdxl, base_model=model)
    site.lora(100)
    unpickled: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: unpickled.append(args))
    outside = site.outside()

    with pytest.raises(ModelError, match=r"holds pickled weights only \(unet/diffusion_pytorch_model.bin\)"):
        run_watch(site.request())  # the daemon's own renderer factory

    assert unpickled == [] and outside.unchanged()


def test_survives_a_pickled_checkpoint_among_good_ones(site: Site, renderer) -> None:
    (site.output_dir / f"{NAME}_000000100.ckpt").write_bytes(b"\x80\x04cos\nsystem\n")
    site.lora(200)
    outside = site.outside()

    assert site.watch(renderer) == 1

    jobs = site.jobs()
    assert jobs[100].state == "failed" and "pickle" in jobs[100].error
    assert jobs[200].state == "done"
    assert outside.unchanged()


# --- bad patterns ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        (r"_(\d+)\.safetensors$", "must have a named group `step`"),
        (r"(?P<step>\d+", "valid regular expression"),
    ],
    ids=["no-step-group", "does-not-compile"],
)
def test_survives_a_bad_pattern_refused_before_anything_runs(site: Site, renderer, pattern, match) -> None:
    outside = site.outside()
    with pytest.raises(ConfigError, match=match):
        site.watch(renderer, pattern=pattern)
    assert not site.samples_dir.exists() and outside.unchanged()


def test_survives_a_broad_pattern_with_polling_without_taking_its_own_cached_copy(
    site: Site, renderer
) -> None:
    """The case found: with `--polling` and a broad pattern the daemon took its cached copy for a
    checkpoint, and recorded it as vanished."""

    outside = site.outside()

    def trainer() -> None:
        outside.written(site.lora(100))
        time.sleep(1.0)  # several polls while the copy sits in `.sidecar/cache`
        outside.written(site.lora(200))

    code = site.beside(trainer, renderer, pattern=r".*?(?P<step>\d+)", polling=True)

    jobs = site.jobs()
    assert code == 0
    assert sorted(jobs) == [100, 200] and {job.state for job in jobs.values()} == {"done"}
    assert all(site.samples_dir not in job.path.parents for job in jobs.values())
    assert outside.unchanged()


# --- corrupt files --------------------------------------------------------------------------------


def test_survives_random_bytes_with_a_huge_header_length_failing_them_once_settled(
    site: Site, renderer
) -> None:
    """The case found: 40 kB of random bytes stayed invisible for 120 s and `status` said nothing."""
    corrupt = site.output_dir / f"{NAME}_000000100.safetensors"
    corrupt.write_bytes(struct.pack("<Q", 2**62) + random.Random(0).randbytes(40_000))
    site.lora(200)
    outside = site.outside()
    started = time.monotonic()

    assert site.watch(renderer, abandon_seconds=600.0) == 1

    assert time.monotonic() - started < 60.0  # failed once settled, not after `abandon_seconds`
    jobs = site.jobs()
    assert jobs[100].state == "failed" and jobs[100].error.startswith("corrupt: header length field says")
    assert jobs[200].state == "done"
    assert outside.unchanged()


# --- a full disk ----------------------------------------------------------------------------------


def full_disk(monkeypatch, *, fails: int) -> list[int]:
    """`os.replace` of a sample image fails with ENOSPC `fails` times; returns the count left."""
    left = [fails]
    real = os.replace

    def replace(src, dst, **dirs):
        if left[0] > 0 and str(dst).endswith(".png") and str(dst).startswith("sample_"):
            left[0] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, **dirs)

    monkeypatch.setattr(os, "replace", replace)
    return left


def test_survives_enospc_while_writing_a_sample_leaving_nothing_half_written(
    site: Site, renderer, monkeypatch
) -> None:
    monkeypatch.setattr("sidecar.publish.files.WRITE_RETRY_SECONDS", (0.01, 0.01, 0.01))
    left = full_disk(monkeypatch, fails=2)  # space returns before the retries run out
    site.lora(100)
    outside = site.outside()

    assert site.watch(renderer) == 0

    assert left == [0]
    job = site.jobs()[100]
    assert job.state == "done" and job.attempts == 1 and len(site.images(100)) == 1
    assert [p for p in site.samples_dir.rglob("*") if p.name.endswith(".tmp")] == []
    assert outside.unchanged()


def test_survives_a_disk_full_for_longer_than_the_retries_resuming_when_space_returns(
    site: Site, renderer, monkeypatch
) -> None:
    monkeypatch.setattr("sidecar.publish.files.WRITE_RETRY_SECONDS", (0.01,))
    monkeypatch.setattr("sidecar.app.dispatch.write_retry_delay_seconds", lambda failures: 0.3)
    left = full_disk(monkeypatch, fails=6)  # three renders in a row cannot write
    site.lora(100)
    outside = site.outside()

    assert site.beside(lambda: wait_until(lambda: site.images(100), what="the sample"), renderer) == 0

    assert left == [0]
    job = site.jobs()[100]
    assert job.state == "done" and job.attempts == 1  # the full disk spent no attempt
    assert len(site.images(100)) == 1
    assert [p for p in site.samples_dir.rglob("*") if p.name.endswith(".tmp")] == []
    assert outside.unchanged()


# --- a watcher that raises ------------------------------------------------------------------------


def test_survives_a_watcher_thread_that_raises_by_restarting_it(site: Site, renderer, monkeypatch) -> None:
    from sidecar.intake.watcher import CheckpointEventHandler

    real = CheckpointEventHandler._put_file
    raised = []

    def once_broken(self, kind, path):
        if not raised:
            raised.append(path)
            raise RuntimeError("the handler broke")
        return real(self, kind, path)

    monkeypatch.setattr(CheckpointEventHandler, "_put_file", once_broken)
    outside = site.outside()

    def trainer() -> None:
        outside.written(site.lora(100))  # its event breaks the handler; the restart's rescan finds it
        wait_until(lambda: site.recorded(100), what="step 100 after the restart")
        outside.written(site.lora(200))  # seen by the new observer, before the daemon's last look
        wait_until(lambda: site.recorded(200), what="step 200")

    code = site.beside(trainer, renderer)

    assert code == 0 and raised
    assert site.daemon is not None and len(site.daemon.watcher_restarts) == 1
    assert {step: job.state for step, job in site.jobs().items()} == {100: "done", 200: "done"}
    assert outside.unchanged()


def test_survives_an_observer_thread_that_keeps_dying_by_ending_non_zero(
    site: Site, renderer, monkeypatch
) -> None:
    from watchdog.observers.api import BaseObserver

    def dies(self, event_queue):
        raise RuntimeError("the observer broke")

    monkeypatch.setattr(BaseObserver, "dispatch_events", dies)
    outside = site.outside()

    with pytest.raises(WatcherDied, match="the observer thread died"):
        site.beside(lambda: time.sleep(60.0), renderer)

    assert outside.unchanged()


# --- a YAML alias bomb ----------------------------------------------------------------------------


def test_survives_a_yaml_alias_bomb_with_a_located_error(site: Site, renderer) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 10)]
    lines += ["sample:", "  prompts: *a9", "model:", f"  name_or_path: {site.model}", "  arch: sdxl"]
    site.config_path.write_text("\n".join(lines) + "\n")
    outside = site.outside()
    started = time.monotonic()

    with pytest.raises(ConfigError, match=rf"^{site.config_path}:\d+: YAML aliases here expand to more than"):
        site.watch(renderer)

    assert time.monotonic() - started < 10.0
    assert not site.samples_dir.exists() and outside.unchanged()


# --- nothing merged away --------------------------------------------------------------------------


def test_survives_a_trainer_that_saves_equal_bytes_at_many_steps_rendering_every_step(
    site: Site, renderer
) -> None:
    """The case found: 200 checkpoints cycling through 4 files left most steps unrendered, unexplained."""
    distinct = {seed: site.lora(100 * seed, seed=seed).read_bytes() for seed in (1, 2)}
    steps = [100 * n for n in range(1, 7)]
    for step in steps:
        (site.output_dir / f"{NAME}_{step:09d}.safetensors").write_bytes(distinct[1 + (step // 100 + 1) % 2])
    outside = site.outside()

    assert site.watch(renderer) == 0

    jobs = site.jobs()
    assert sorted(jobs) == steps and {job.state for job in jobs.values()} == {"done"}
    for step in steps:
        assert len(site.images(step)) == 1, step
    assert [step for step in steps if jobs[step].note] == steps[2:]  # 300.. equal 100 or 200
    assert site.images(300)[0].stat().st_ino == site.images(100)[0].stat().st_ino
    assert outside.unchanged()
