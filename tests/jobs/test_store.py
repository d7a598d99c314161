"""The SQLite job store: exactly once across restarts, policies, retries, status."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import REPO, sample_request

from sidecar.errors import CheckpointError
from sidecar.intake.layouts import Checkpoint
from sidecar.jobs.policy import MAX_INTERRUPTIONS
from sidecar.jobs.records import request_fingerprint
from sidecar.jobs.store import JobStore
from sidecar.plan.request import SampleRequest


def request(index: int, prompt: str = "a photo of sks dog") -> SampleRequest:
    return sample_request(
        index=index,
        prompt=f"{prompt} #{index}",
        width=1024,
        height=1024,
        guidance_scale=4.0,
        sampler="flowmatch",
        seed=42 + index,
    )


PLAN = [request(0), request(1), request(2)]


def checkpoint(root: Path, step: int | None, *, final: bool = False) -> Checkpoint:
    name = "my_lora.safetensors" if final else f"my_lora_{step:09d}.safetensors"
    return Checkpoint(
        path=root / name, name="my_lora", layout="final" if final else "ai-toolkit", step=step, is_final=final
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "samples" / ".sidecar" / "jobs.sqlite3"


@pytest.fixture
def store(db: Path) -> Iterator[JobStore]:
    with JobStore(db, retry_base_seconds=30.0) as opened:
        yield opened


def add(
    store: JobStore, root: Path, step: int | None, *, now: float = 0.0, final: bool = False, **kw: object
):
    digest = kw.pop("content_hash", f"hash-{step}-{final}")
    plan = kw.pop("requests", PLAN)
    return store.add_checkpoint(
        checkpoint(root, step, final=final),
        content_hash=str(digest),
        size_bytes=1000,
        mtime_ns=1,
        requests=plan,  # type: ignore[arg-type]
        now=now,
        **kw,  # type: ignore[arg-type]
    )


def render_all(store: JobStore, now: float, **kw: object) -> int | None:
    """Claim one checkpoint and render every sample; returns its step."""
    claimed = store.claim_next_checkpoint(now, **kw)  # type: ignore[arg-type]
    if claimed is None:
        return None
    for sample in claimed.samples:
        store.mark_sample_done(sample.id, output_path=Path(f"/out/{sample.index}.png"), now=now)
    store.finish_checkpoint(claimed.checkpoint.id, now=now)
    return claimed.checkpoint.step


# --- adding ------------------------------------------------------------------------------------


def test_adding_the_same_checkpoint_twice_is_one_row(store: JobStore, tmp_path: Path) -> None:
    first = add(store, tmp_path, 100)
    again = add(store, tmp_path, 100, now=5.0)
    assert again.id == first.id
    assert len(store.checkpoints()) == 1
    assert len(store.samples(first.id)) == 3


def test_same_content_at_another_path_or_step_gets_its_own_row_with_a_note(
    store: JobStore, tmp_path: Path
) -> None:
    job = add(store, tmp_path, 500, content_hash="same")
    later = add(store, tmp_path, 600, content_hash="same")  # unchanged weights saved again
    final = add(store, tmp_path, 600, final=True, content_hash="same")  # final equal to the last step
    assert len({job.id, later.id, final.id}) == 3
    assert final.is_final and not later.is_final
    # the final gets a row at the step its metadata names, beside the step file
    rows = [(c.step, c.state) for c in store.checkpoints()]
    assert rows == [(500, "pending"), (600, "pending"), (600, "pending")]
    assert job.note is None
    for noted in (later, final):
        assert noted.note is not None and "same bytes as step 500" in noted.note
        assert "hard links" in noted.note
    assert [c.id for c in store.status().notes] == [later.id, final.id]


def test_identical_done_samples_are_found_by_content_and_settings(store: JobStore, tmp_path: Path) -> None:
    first = add(store, tmp_path, 100, content_hash="same")
    assert render_all(store, 1.0) == 100
    changed_plan = [PLAN[0], request(1, prompt="another prompt"), PLAN[2]]
    again = add(store, tmp_path, 200, content_hash="same", requests=changed_plan)
    other = add(store, tmp_path, 300, content_hash="different")
    assert store.identical_done_samples(again.id) == {0: Path("/out/0.png"), 2: Path("/out/2.png")}
    assert store.identical_done_samples(other.id) == {}
    assert store.identical_done_samples(first.id) == {}  # the later one has nothing done
    assert store.content_needed("same") and store.content_needed("different")
    render_all(store, 2.0)
    render_all(store, 2.0)
    assert not store.content_needed("same")


def test_release_claim_costs_no_attempt_and_keeps_done_samples(store: JobStore, tmp_path: Path) -> None:
    job = add(store, tmp_path, 100)
    claimed = store.claim_next_checkpoint(1.0)
    assert claimed is not None and store.checkpoint(job.id).attempts == 1
    store.mark_sample_done(claimed.samples[0].id, output_path=Path("/out/0.png"), now=1.0)

    released = store.release_claim(job.id, now=2.0, retry_at=60.0, reason="disk full")

    assert (released.state, released.attempts, released.retry_at, released.error) == (
        "pending",
        0,
        60.0,
        "disk full",
    )
    assert [s.state for s in store.samples(job.id)] == ["done", "pending", "pending"]
    assert store.claim_next_checkpoint(59.0) is None  # waits for `retry_at`
    again = store.claim_next_checkpoint(60.0)
    assert again is not None and [s.index for s in again.samples] == [1, 2]


def test_rewritten_in_place_keeps_done_samples_and_notes_it(store: JobStore, tmp_path: Path) -> None:
    job = add(store, tmp_path, 100, content_hash="old")
    assert render_all(store, 1.0) == 100
    rewritten = add(store, tmp_path, 100, content_hash="new", now=2.0)
    assert rewritten.id == job.id
    assert rewritten.content_hash == "new"
    assert rewritten.state == "done"
    assert rewritten.note is not None and "--force" in rewritten.note
    assert all(s.state == "done" for s in store.samples(job.id))
    assert store.claim_next_checkpoint(3.0) is None


def test_rewritten_after_a_failure_is_retried(store: JobStore, tmp_path: Path) -> None:
    job = add(store, tmp_path, 100, content_hash="old")
    claimed = store.claim_next_checkpoint(1.0)
    assert claimed is not None
    store.mark_checkpoint_failed(job.id, "not a whole safetensors file", transient=False, now=1.0)
    again = add(store, tmp_path, 100, content_hash="new", now=2.0)
    assert (again.state, again.error, again.attempts) == ("pending", None, 0)
    claimed = store.claim_next_checkpoint(3.0)
    assert claimed is not None
    assert len(claimed.samples) == 3


def test_changed_sample_plan_applies_to_later_checkpoints_only(store: JobStore, tmp_path: Path) -> None:
    add(store, tmp_path, 100, requests=[request(0, "old prompt")])
    add(store, tmp_path, 200, requests=[request(0, "new prompt"), request(1, "new prompt")])
    first = store.claim_next_checkpoint(1.0)
    assert first is not None
    assert [s.request.prompt for s in first.samples] == ["old prompt #0"]
    store.mark_sample_done(first.samples[0].id, output_path=Path("/out/0.png"), now=1.0)
    store.finish_checkpoint(first.checkpoint.id, now=1.0)
    second = store.claim_next_checkpoint(1.0)
    assert second is not None
    assert [s.request.prompt for s in second.samples] == ["new prompt #0", "new prompt #1"]
    assert second.samples[0].request == request(0, "new prompt")  # round-trips exactly


def test_the_plans_output_options_are_stored_with_the_checkpoint(store: JobStore, tmp_path: Path) -> None:
    """Publishing uses the format and batch size planned when the checkpoint was added."""
    options = {"image_format": "jpg", "batch_size": 2}
    job = add(store, tmp_path, 100, output=options)
    legacy = add(store, tmp_path, 200)
    assert job.output == options and legacy.output is None
    claimed = store.claim_next_checkpoint(1.0)
    assert claimed is not None
    assert claimed.checkpoint.output == options
    assert store.checkpoint(job.id).output == options


def test_a_vanished_checkpoint_that_comes_back_takes_the_current_output_options(
    store: JobStore, tmp_path: Path
) -> None:
    gone = store.record_vanished(checkpoint(tmp_path, 100), now=1.0)
    assert gone.output is None
    back = add(store, tmp_path, 100, now=2.0, output={"image_format": "webp", "batch_size": 1})
    assert back.id == gone.id
    assert back.output == {"image_format": "webp", "batch_size": 1}


def test_request_fingerprint_is_stable_and_sensitive() -> None:
    assert request_fingerprint(request(0)) == request_fingerprint(request(0))
    assert request_fingerprint(request(0)) != request_fingerprint(request(0, "other"))


# --- claiming and exactly once -----------------------------------------------------------------


def test_claims_oldest_step_first_and_final_last(store: JobStore, tmp_path: Path) -> None:
    add(store, tmp_path, None, final=True)
    for step in (300, 100, 200):
        add(store, tmp_path, step)
    order = [render_all(store, 1.0) for _ in range(4)]
    assert order == [100, 200, 300, None]  # None: the final, whose step is unknown
    assert store.claim_next_checkpoint(2.0) is None
    assert store.last_rendered_step() == 300


def test_a_claimed_checkpoint_is_not_claimed_again(store: JobStore, tmp_path: Path) -> None:
    add(store, tmp_path, 100)
    claimed = store.claim_next_checkpoint(1.0)
    assert claimed is not None
    assert claimed.checkpoint.state == "running"
    assert all(s.state == "running" for s in claimed.samples)
    assert store.claim_next_checkpoint(1.0) is None


def test_kill_during_render_resumes_only_what_is_missing(db: Path, tmp_path: Path) -> None:
    store = JobStore(db)
    add(store, tmp_path, 100)
    claimed = store.claim_next_checkpoint(1.0)
    assert claimed is not None
    store.mark_sample_done(claimed.samples[0].id, output_path=Path("/out/0.png"), now=1.0)
    store.close()  # the process dies: its rows stay `running`, its owner lock is freed

    reopened = JobStore(db, now=2.0)
    job = reopened.checkpoints()[0]
    assert (job.state, job.interruptions) == ("pending", 1)
    again = reopened.claim_next_checkpoint(3.0)
    assert again is not None
    assert again.checkpoint.id == claimed.checkpoint.id
    assert [s.index for s in again.samples] == [1, 2]  # sample 0 is not rendered twice
    reopened.close()


def test_open_store_does_not_steal_a_live_claim(db: Path, tmp_path: Path) -> None:
    worker = JobStore(db)
    add(worker, tmp_path, 100)
    assert worker.claim_next_checkpoint(1.0) is not None
    with JobStore(db, now=2.0) as status_reader:  # `sidecar status` while the daemon renders
        assert status_reader.checkpoints()[0].state == "running"
        assert status_reader.claim_next_checkpoint(2.0) is None
    worker.close()


def test_real_kill_9_mid_render(db: Path, tmp_path: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover
        pytest.skip("SIGKILL is POSIX")
    with JobStore(db) as store:
        add(store, tmp_path, 100)
        add(store, tmp_path, 200)
    child = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from sidecar.jobs.store import JobStore
        store = JobStore(Path({str(db)!r}))
        claimed = store.claim_next_checkpoint(1.0)
        store.mark_sample_done(claimed.samples[0].id, output_path=Path("/out/0.png"), now=1.0)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()

    with JobStore(db, now=5.0) as store:
        assert [c.state for c in store.checkpoints()] == ["pending", "pending"]
        claimed = store.claim_next_checkpoint(6.0)
        assert claimed is not None
        assert claimed.checkpoint.step == 100
        assert [s.index for s in claimed.samples] == [1, 2]
    # The dead child's lock file was cleaned up by recovery, ours on close.
    assert list((db.parent / f"{db.name}.owners").iterdir()) == []


def test_checkpoint_that_keeps_killing_the_process_is_failed(db: Path, tmp_path: Path) -> None:
    with JobStore(db) as store:
        add(store, tmp_path, 100)
    for attempt in range(MAX_INTERRUPTIONS):
        store = JobStore(db, now=float(attempt))
        claimed = store.claim_next_checkpoint(float(attempt))
        assert claimed is not None, attempt
        store.close()  # dies while rendering
    with JobStore(db, now=10.0) as store:
        job = store.checkpoints()[0]
        assert job.state == "failed"
        assert "died 3 times" in (job.error or "")
        assert store.claim_next_checkpoint(11.0) is None


def test_everything_already_rendered_is_closed_not_claimed(db: Path, tmp_path: Path) -> None:
    store = JobStore(db)
    add(store, tmp_path, 100)
    claimed = store.claim_next_checkpoint(1.0)
    assert claimed is not None
    for sample in claimed.samples:
        store.mark_sample_done(sample.id, output_path=Path("/out/x.png"), now=1.0)
    store.close()  # died before finish_checkpoint
    with JobStore(db, now=2.0) as reopened:
        assert reopened.claim_next_checkpoint(3.0) is None
        assert reopened.checkpoints()[0].state == "done"


def test_two_stores_on_one_file_never_claim_the_same_checkpoint(db: Path, tmp_path: Path) -> None:
    with JobStore(db) as setup:
        for step in range(1, 41):
            add(setup, tmp_path, step * 10)
    claimed: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def worker(slot: int) -> None:
        try:
            with JobStore(db) as store:
                while (job := store.claim_next_checkpoint(1.0)) is not None:
                    claimed[slot].append(job.checkpoint.id)
                    for sample in job.samples:
                        store.mark_sample_done(sample.id, output_path=Path("/out/x.png"), now=1.0)
                    store.finish_checkpoint(job.checkpoint.id, now=1.0)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    everything = claimed[0] + claimed[1]
    assert len(everything) == 40
    assert len(set(everything)) == 40
    with JobStore(db) as store:
        counts, samples = store.counts()
        assert counts["done"] == 40
        assert samples["done"] == 120


def test_two_stores_alternating_claims(db: Path, tmp_path: Path) -> None:
    a, b = JobStore(db), JobStore(db)
    for step in (100, 200, 300):
        add(a, tmp_path, step)
    first, second, third = (
        a.claim_next_checkpoint(1.0),
        b.claim_next_checkpoint(1.0),
        a.claim_next_checkpoint(1.0),
    )
    assert first and second and third
    assert [first.checkpoint.step, second.checkpoint.step, third.checkpoint.step] == [100, 200, 300]
    assert b.claim_next_checkpoint(1.0) is None
    a.close()
    b.close()


# --- force, sample_every, backlog ----------------------------------------------------------------


def test_force_rerenders_one_step(store: JobStore, tmp_path: Path) -> None:
    add(store, tmp_path, 100)
    add(store, tmp_path, 200)
    render_all(store, 1.0)
    render_all(store, 1.0)
    forced = store.force_render(100, now=2.0)
    assert [(j.step, j.state) for j in forced] == [(100, "pending")]
    claimed = store.claim_next_checkpoint(3.0)
    assert claimed is not None
    assert claimed.checkpoint.step == 100
    assert [s.index for s in claimed.samples] == [0, 1, 2]
    assert all(s.output_path is None for s in claimed.samples)


def test_force_with_a_new_plan_replaces_the_samples(store: JobStore, tmp_path: Path) -> None:
    add(store, tmp_path, 100)
    render_all(store, 1.0)
    store.force_render(100, now=2.0, requests=[request(0, "fresh")])
    claimed = store.claim_next_checkpoint(3.0)
    assert claimed is not None
    assert [s.request.prompt for s in claimed.samples] == ["fresh #0"]


def test_force_unknown_step_names_the_known_ones(store: JobStore, tmp_path: Path) -> None:
    add(store, tmp_path, 100)
    with pytest.raises(CheckpointError, match="recorded steps: 100"):
        store.force_render(999, now=1.0)


def test_first_checkpoint_is_the_first_that_renders_not_the_first_that_failed(
    store: JobStore, tmp_path: Path
) -> None:
    broken = add(store, tmp_path, 10, sample_every=100, requests=())
    store.mark_checkpoint_failed(broken.id, "truncated for good", transient=False, now=0.0)
    first_good = add(store, tmp_path, 50, sample_every=100)
    off = add(store, tmp_path, 150, sample_every=100)
    assert (first_good.state, off.state) == ("pending", "skipped")


def test_sample_every_records_skipped_checkpoints(store: JobStore, tmp_path: Path) -> None:
    first = add(store, tmp_path, 50, sample_every=100)
    on_schedule = add(store, tmp_path, 100, sample_every=100)
    off = add(store, tmp_path, 150, sample_every=100)
    final = add(store, tmp_path, 175, final=True, sample_every=100)
    assert [first.state, on_schedule.state, off.state, final.state] == [
        "pending",
        "pending",
        "skipped",
        "pending",
    ]
    assert off.error == "sample_every: step 150 is not a multiple of 100"
    assert {s.state for s in store.samples(off.id)} == {"skipped"}
    rendered = [render_all(store, 1.0) for _ in range(4)]
    assert rendered == [50, 100, 175, None]
    # A skipped step can still be forced.
    store.force_render(150, now=2.0)
    assert render_all(store, 3.0) == 150


def test_backlog_latest_skips_older_but_keeps_final(store: JobStore, tmp_path: Path) -> None:
    add(store, tmp_path, 100)
    add(store, tmp_path, 200)
    add(store, tmp_path, 250, final=True, content_hash="final")
    add(store, tmp_path, 300)
    assert render_all(store, 1.0, backlog="latest") == 300
    states = {j.step: (j.state, j.error) for j in store.checkpoints()}
    assert states[100] == ("skipped", "backlog: latest")
    assert states[200] == ("skipped", "backlog: latest")
    assert states[250] == ("pending", None)
    assert render_all(store, 1.0, backlog="latest") == 250
    assert render_all(store, 1.0, backlog="latest") is None


def test_backlog_policy_is_checked(store: JobStore) -> None:
    with pytest.raises(ValueError, match="`backlog` must be one of all, latest"):
        store.claim_next_checkpoint(0.0, backlog="newest")  # type: ignore[arg-type]


# --- failures -----------------------------------------------------------------------------------------


def test_transient_checkpoint_failure_retries_with_backoff_then_gives_up(
    store: JobStore, tmp_path: Path
) -> None:
    job = add(store, tmp_path, 100)
    assert store.claim_next_checkpoint(0.0) is not None
    assert store.mark_checkpoint_failed(job.id, "CUDA out of memory", transient=True, now=0.0) == "pending"
    assert store.checkpoint(job.id).retry_at == 30.0
    assert store.claim_next_checkpoint(29.0) is None  # backing off
    claimed = store.claim_next_checkpoint(30.0)
    assert claimed is not None
    assert claimed.checkpoint.attempts == 2
    assert len(claimed.samples) == 3
    assert store.mark_checkpoint_failed(job.id, "CUDA out of memory", transient=True, now=30.0) == "pending"
    assert store.checkpoint(job.id).retry_at == 90.0  # doubled
    assert store.claim_next_checkpoint(90.0) is not None
    assert store.mark_checkpoint_failed(job.id, "CUDA out of memory", transient=True, now=90.0) == "failed"
    failed = store.checkpoint(job.id)
    assert failed.error == "gave up after 3 attempts: CUDA out of memory"
    assert store.claim_next_checkpoint(10_000.0) is None


def test_permanent_failure_is_recorded_and_not_retried(store: JobStore, tmp_path: Path) -> None:
    job = add(store, tmp_path, 100)
    store.claim_next_checkpoint(0.0)
    message = "LoRA does not apply: no layer matched the Flux transformer"
    assert store.mark_checkpoint_failed(job.id, message, transient=False, now=0.0) == "failed"
    assert store.claim_next_checkpoint(1e9) is None
    assert store.checkpoint(job.id).error == message
    assert {s.state for s in store.samples(job.id)} == {"failed"}
    assert [(f.step, f.sample_index, f.error) for f in store.failures()] == [(100, None, message)]


def test_transient_sample_failure_retries_only_that_sample(store: JobStore, tmp_path: Path) -> None:
    job = add(store, tmp_path, 100)
    claimed = store.claim_next_checkpoint(0.0)
    assert claimed is not None
    s0, s1, s2 = claimed.samples
    assert store.mark_sample_failed(s0.id, "CUDA out of memory", transient=True, now=0.0) == "pending"
    store.mark_sample_done(s1.id, output_path=Path("/out/1.png"), now=0.0)
    store.mark_sample_failed(s2.id, "prompt too long for T5", transient=False, now=0.0)
    after = store.finish_checkpoint(job.id, now=0.0)
    assert after.state == "pending"
    assert after.retry_at == 30.0
    assert store.claim_next_checkpoint(10.0) is None
    again = store.claim_next_checkpoint(30.0)
    assert again is not None
    assert [s.index for s in again.samples] == [0]
    store.mark_sample_done(again.samples[0].id, output_path=Path("/out/0.png"), now=30.0)
    done = store.finish_checkpoint(job.id, now=30.0)
    assert (done.state, done.error) == ("done", "1 of 3 samples failed")
    assert [(f.sample_index, f.error) for f in store.failures()] == [(2, "prompt too long for T5")]


def test_every_sample_failing_fails_the_checkpoint(store: JobStore, tmp_path: Path) -> None:
    job = add(store, tmp_path, 100)
    claimed = store.claim_next_checkpoint(0.0)
    assert claimed is not None
    for sample in claimed.samples:
        store.mark_sample_failed(sample.id, "NaN latents", transient=False, now=0.0)
    after = store.finish_checkpoint(job.id, now=0.0)
    assert after.state == "failed"
    assert after.error == "all 3 samples failed; first: NaN latents"


def test_vanished_is_recorded_once_and_can_come_back(store: JobStore, tmp_path: Path) -> None:
    gone = checkpoint(tmp_path, 100)
    first = store.record_vanished(gone, now=1.0)
    second = store.record_vanished(gone, now=2.0)
    assert first.id == second.id
    assert (second.state, second.error, second.content_hash) == ("failed", "vanished", None)
    assert len(store.checkpoints()) == 1
    back = add(store, tmp_path, 100, now=3.0)
    assert back.id == first.id
    assert back.state == "pending"
    assert len(store.samples(back.id)) == 3


def test_pruned_after_rendering_is_not_a_failure(store: JobStore, tmp_path: Path) -> None:
    add(store, tmp_path, 100)
    render_all(store, 1.0)
    assert store.record_vanished(checkpoint(tmp_path, 100), now=2.0).state == "done"
    assert store.failures() == []


def test_vanished_while_queued_fails_it(store: JobStore, tmp_path: Path) -> None:
    add(store, tmp_path, 100)
    job = store.record_vanished(checkpoint(tmp_path, 100), now=2.0, reason="pruned before rendering")
    assert (job.state, job.error) == ("failed", "vanished: pruned before rendering")


# --- status ------------------------------------------------------------------------------------------------


def test_status_summary(store: JobStore, tmp_path: Path) -> None:
    for step in (100, 200, 300, 400):
        add(store, tmp_path, step)
    render_all(store, 1.0)
    bad = store.claim_next_checkpoint(2.0)
    assert bad is not None
    store.mark_checkpoint_failed(bad.checkpoint.id, "not a whole safetensors file", transient=False, now=2.0)
    running = store.claim_next_checkpoint(3.0)
    assert running is not None

    summary = store.status()
    assert summary.last_rendered_step == 100
    assert [(j.step, j.state) for j in summary.queue] == [(300, "running"), (400, "pending")]
    assert summary.checkpoint_counts == {"pending": 1, "running": 1, "done": 1, "failed": 1, "skipped": 0}
    assert summary.sample_counts == {"pending": 3, "running": 3, "done": 3, "failed": 3, "skipped": 0}
    assert [(f.step, f.error) for f in summary.failures] == [(200, "not a whole safetensors file")]


def test_failed_since_counts_checkpoints_that_failed_in_a_run(store: JobStore, tmp_path: Path) -> None:
    for step in (100, 200, 300):
        add(store, tmp_path, step)
    early = store.claim_next_checkpoint(1.0)
    assert early is not None
    store.mark_checkpoint_failed(early.checkpoint.id, "corrupt", transient=False, now=1.0)
    retried = store.claim_next_checkpoint(5.0)
    assert retried is not None
    store.mark_checkpoint_failed(retried.checkpoint.id, "CUDA out of memory", transient=True, now=5.0)
    store.record_vanished(checkpoint(tmp_path, 400), now=6.0)
    assert store.failed_since(0.0) == 2  # the transient failure is pending a retry, not failed
    assert store.failed_since(5.0) == 1
    assert store.failed_since(6.0) == 1
    assert store.failed_since(6.5) == 0


def test_store_options_are_checked(db: Path) -> None:
    with pytest.raises(ValueError, match="`max_attempts` must be at least 1"):
        JobStore(db, max_attempts=0)
