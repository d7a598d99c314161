"""One coordinator, many runs (`sidecar.app.coordinator`, `scheduler`, `remote`), without Ray.

The scheduler's choices (turns, affinity, lost workers) are tested with a pool of fake
workers whose results the test hands back; the coordinator end to end with the in-process
pool (`LocalPool`, one tiny SDXL renderer), which is what `sidecar watch --runs` runs
without `--ray`. The same scheduler drives the Ray workers of tests/app/test_pool.py.
"""

from __future__ import annotations

import concurrent.futures
import configparser
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from sidecar.app.coordinator import Coordinator, CoordinatorRequest, run_coordinator
from sidecar.app.runs import read_runs, runs_status
from sidecar.app.scheduler import HOLD_FACTOR, Scheduler, choose
from sidecar.app.worker import BaseSpec, LocalPool, RenderTask, RenderWorker, TaskResult
from sidecar.cli import main
from sidecar.cli_parser import build_parser
from sidecar.jobs.store import JobStore
from sidecar.plan.request import ModelSource
from sidecar.settings import SamplesFolder
from sidecar.testing.loras import write_lora
from sidecar.testing.trainer import write_trainer_config

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

FAST = {"settle_seconds": 0.1, "poll_interval_seconds": 0.05, "device": "cpu"}
WAIT_SECONDS = 120.0  # a condition still false after this has failed (a loaded 2-core runner is slow)


def wait_until(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- the scheduler, with fake workers ---------------------------------------------------------


def base(name: str) -> BaseSpec:
    return BaseSpec(ModelSource(arch="sdxl", name_or_path=f"/models/{name}"))


class Lost(Exception):
    """A fake worker died."""


class FakePool:
    """Workers whose tasks finish when the test says; `calls` lists (worker, task, future)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.calls: list[tuple[int, RenderTask, concurrent.futures.Future]] = []
        self.revived: list[int] = []

    def submit(self, index: int, task: RenderTask) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.calls.append((index, task, future))
        return future

    def lora_source(self, path: Path) -> Path:
        return path

    def worker_lost(self, error: BaseException) -> bool:
        return isinstance(error, Lost)

    def revive(self, index: int) -> concurrent.futures.Future:
        self.revived.append(index)
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(None)
        return future

    def info(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass

    def started(self, count: int) -> list[tuple[int, RenderTask, concurrent.futures.Future]]:
        wait_until(lambda: len(self.calls) >= count, f"{count} task(s) started")
        return self.calls[:count]

    def finish(self, call: int, *, load_seconds: float = 0.0) -> None:
        _, task, future = self.calls[call]
        future.set_result(TaskResult(base_key=task.base.key, load_seconds=load_seconds))


def task(spec: BaseSpec, index: int) -> RenderTask:
    from factories import sample_request

    return RenderTask(base=spec, requests=(sample_request(index=index),), lora_key="lora")


@pytest.fixture
def scheduled() -> Callable[[int], tuple[Scheduler, FakePool]]:
    made: list[Scheduler] = []

    def make(size: int) -> tuple[Scheduler, FakePool]:
        pool = FakePool(size)
        scheduler = Scheduler(pool).start()  # type: ignore[arg-type]
        made.append(scheduler)
        return scheduler, pool

    yield make
    for scheduler in made:
        scheduler.close()


def test_a_free_worker_takes_its_own_base_then_a_homeless_one_in_turn() -> None:
    heads = [("a", "flux"), ("b", "sdxl"), ("c", "sd3")]
    held = {"flux": 1, "sdxl": 1}
    queued = {"flux": 1, "sdxl": 1, "sd3": 1}

    assert choose(worker_base="sdxl", may_switch=False, heads=heads, holders=held, queued=queued) == 1
    # a base nobody holds needs a home; a worker that may not leave its own gives none
    assert choose(worker_base="x", may_switch=True, heads=heads, holders=held, queued=queued) == 2
    assert choose(worker_base="x", may_switch=False, heads=heads, holders=held, queued=queued) is None
    # an empty worker joins the first run in turn; an idle one moves only for a long queue
    assert choose(worker_base=None, may_switch=True, heads=heads[:2], holders=held, queued=queued) == 0
    assert choose(worker_base="x", may_switch=True, heads=heads[:2], holders=held, queued=queued) is None
    assert choose(worker_base="x", may_switch=True, heads=heads[:2], holders=held, queued={"sdxl": 9}) == 1


def test_runs_are_served_in_turn_one_render_at_a_time(scheduled) -> None:
    scheduler, pool = scheduled(1)
    spec = base("sdxl")
    backlog = [scheduler.submit("a", task(spec, index)) for index in range(10)]
    pool.started(1)
    newcomer = scheduler.submit("b", task(spec, 0))

    pool.finish(0)

    _, started, _ = pool.started(2)[1]
    assert started is newcomer.task  # not after the rest of a's backlog
    pool.finish(1)
    assert pool.started(3)[2][1] is backlog[1].task
    assert backlog[0].future.result().base_key == spec.key


def test_a_checkpoint_goes_where_its_base_is_loaded(scheduled) -> None:
    scheduler, pool = scheduled(2)
    sdxl, flux = base("sdxl"), base("flux")
    scheduler.submit("a", task(sdxl, 0))
    scheduler.submit("b", task(flux, 0))
    first = {call[1].base.key: call[0] for call in pool.started(2)}
    pool.finish(0, load_seconds=100.0)
    pool.finish(1, load_seconds=100.0)
    wait_until(lambda: all(slot.state == "free" for slot in scheduler.slots), "both workers free")

    scheduler.submit("b", task(flux, 1))
    scheduler.submit("a", task(sdxl, 1))

    later = {call[1].base.key: call[0] for call in pool.started(4)[2:]}
    assert later == first
    assert scheduler.holds(sdxl.key) and not scheduler.holds(base("sd3").key)


def test_one_worker_keeps_its_base_a_while_before_loading_another(scheduled) -> None:
    scheduler, pool = scheduled(1)
    clock = [0.0]
    scheduler.clock = lambda: clock[0]
    sdxl, flux = base("sdxl"), base("flux")
    scheduler.submit("a", task(sdxl, 0))
    pool.started(1)
    pool.finish(0, load_seconds=1.0)
    scheduler.submit("b", task(flux, 0))
    scheduler.submit("a", task(sdxl, 1))  # b waits its turn, but its base is not loaded: a goes on

    assert pool.started(2)[1][1].base is sdxl
    clock[0] = HOLD_FACTOR * 1.0  # held long enough: now b's base gets the worker
    pool.finish(1)
    assert pool.started(3)[2][1].base is flux


def test_a_lost_worker_hands_its_task_to_the_next_free_one(scheduled) -> None:
    scheduler, pool = scheduled(2)
    spec = base("sdxl")
    ticket = scheduler.submit("a", task(spec, 0))
    worker, _, future = pool.started(1)[0]

    future.set_exception(Lost("the actor died"))

    retry = pool.started(2)[1]
    assert retry[1] is ticket.task and not ticket.future.done()
    assert pool.revived == [0, 1, worker]  # each when the scheduler starts, then the lost one
    retry[2].set_result(TaskResult(base_key=spec.key))
    assert ticket.future.result(timeout=WAIT_SECONDS).failure is None


def test_a_checkpoint_that_keeps_killing_workers_fails_instead(scheduled) -> None:
    from sidecar.jobs.policy import MAX_INTERRUPTIONS

    scheduler, pool = scheduled(1)
    ticket = scheduler.submit("a", task(base("sdxl"), 0))
    for death in range(MAX_INTERRUPTIONS):
        pool.started(death + 1)[death][2].set_exception(Lost("killed by the OOM killer"))

    failure = ticket.future.result(timeout=WAIT_SECONDS).failure
    assert failure is not None and failure.kind == "checkpoint"
    assert f"died {MAX_INTERRUPTIONS} times" in failure.message and "OOM killer" in failure.message


# --- the coordinator end to end, in process -------------------------------------------------------


@pytest.fixture(scope="module")
def shared_renderer(tiny_sdxl: Path):
    """One tiny SDXL pipeline for the module's local workers, as one process would hold."""
    from sidecar.render.registry import renderer_class

    return renderer_class("sdxl").from_model(str(tiny_sdxl))


class Sweep:
    """Trainer run folders with their configs, a runs file, and a local pool rendering on a tiny SDXL."""

    def __init__(self, root: Path, model: Path, renderer) -> None:
        self.root, self.model = root, model
        self.runs_file = root / "runs.yaml"
        self.before_render: Callable[[], None] = lambda: None
        self.rendered: list[tuple[str, int]] = []
        sweep = self

        class Hooked:
            """The shared renderer; the test acts before each render."""

            def __getattr__(self, name: str):
                return getattr(renderer, name)

            def render_resilient(self, requests, *, batch_size: int = 1):
                sweep.before_render()
                yield from renderer.render_resilient(requests, batch_size=batch_size)

        self.pool = LocalPool(RenderWorker(renderer_factory=lambda spec, device, gpu: Hooked()))

    def run(self, name: str, *, prompts: int = 2) -> Path:
        output = self.root / "training" / name
        output.mkdir(parents=True, exist_ok=True)
        write_trainer_config(
            self.root / f"{name}.yaml",
            model_folder=self.model,
            training_folder=self.root / "training",
            name=name,
            prompts=[f"prompt {index} of [trigger]" for index in range(prompts)],
            sample_steps=2,
            save_every=1,
        )
        return output

    def write_runs(self, *names: str) -> None:
        text = "".join(f"- output: training/{name}\n  config: {name}.yaml\n" for name in names)
        self.runs_file.write_text(text)

    def checkpoint(self, name: str, step: int) -> None:
        path = self.root / "training" / name / f"{name}_{step:09d}.safetensors"
        write_lora(self.model, "sdxl", path, lora_format="kohya", seed=step, scale=step / 100)

    def samples(self, name: str) -> SamplesFolder:
        return SamplesFolder(self.root / "training" / name / "samples")

    def images(self, name: str) -> list[str]:
        root = self.samples(name).root
        return sorted(str(path.relative_to(root)) for path in root.glob("step_*/sample_*.png"))

    def sample_rows(self, name: str) -> list[tuple[int | None, int, str, int]]:
        with JobStore(self.samples(name).jobs) as store:
            return [
                (job.step, sample.index, sample.state, sample.attempts)
                for job in store.checkpoints()
                for sample in store.samples(job.id)
            ]

    def coordinate(self, *, once: bool, ready: Callable[[Coordinator], None] | None = None) -> int:
        request = CoordinatorRequest(self.runs_file, FAST, once=once)
        return run_coordinator(request, pool=self.pool, coordinator_ready=ready)


@pytest.fixture
def sweep(tmp_path: Path, tiny_sdxl: Path, shared_renderer) -> Sweep:
    made = Sweep(tmp_path, tiny_sdxl, shared_renderer)
    yield made
    made.pool.close()


@pytest.mark.slow
def test_two_runs_get_every_sample_once_in_their_own_folders(sweep: Sweep) -> None:
    for name in ("a", "b"):
        sweep.run(name)
        for step in (100, 200, 300):
            sweep.checkpoint(name, step)
    sweep.write_runs("a", "b")

    assert sweep.coordinate(once=True) == 0

    expected = [f"step_000{step}/sample_0{index}.png" for step in (100, 200, 300) for index in (0, 1)]
    for name in ("a", "b"):
        assert sweep.images(name) == expected
        assert {(state, attempts) for *_, state, attempts in sweep.sample_rows(name)} == {("done", 1)}
    assert sweep.pool.worker.loads == [sweep.pool.worker.base_key]  # one base, loaded once for both runs
    report = runs_status(sweep.runs_file)
    assert "checkpoints: 3 done" in report and "samples: 6 done" in report
    assert report.count("not running: stopped") == 2


@pytest.fixture
def running(sweep: Sweep):
    """`start()` runs the coordinator on a thread and returns it; it is stopped at the end."""
    ready: list[Coordinator] = []
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(sweep.coordinate(once=False, ready=ready.append)), daemon=True
    )

    def start() -> Coordinator:
        thread.start()
        wait_until(lambda: bool(ready), "the coordinator")
        return ready[0]

    yield start
    if ready:
        ready[0].request_stop()
    thread.join(WAIT_SECONDS)
    assert not thread.is_alive() and result == [0]


@pytest.mark.slow
def test_a_backlog_does_not_hold_up_another_runs_new_checkpoint(sweep: Sweep, running) -> None:
    sweep.run("busy", prompts=1)
    sweep.run("new", prompts=1)
    for step in range(100, 1100, 100):
        sweep.checkpoint("busy", step)
    sweep.write_runs("busy", "new")
    renders = [0]
    next_task: list[int] = []

    def before_render() -> None:  # on the render thread, as busy's 3rd checkpoint renders
        renders[0] += 1
        if renders[0] == 3:
            next_task.append(len(scheduler.started))
            sweep.checkpoint("new", 100)
            wait_until(lambda: scheduler.queued("new") == 1, "the new checkpoint's task queued")

    sweep.before_render = before_render
    scheduler = running().scheduler

    wait_until(lambda: len(sweep.images("busy")) == 10 and len(sweep.images("new")) == 1, "all rendered")
    runs = [run for run, *_ in scheduler.started]
    assert runs[next_task[0]] == "new"  # the very next render after the one in progress
    assert [run for run, _, indices in scheduler.started if indices].count("busy") == 10


@pytest.mark.slow
def test_runs_added_to_and_removed_from_the_runs_file_while_running(sweep: Sweep, running) -> None:
    sweep.run("a")
    sweep.run("b", prompts=1)
    sweep.checkpoint("a", 100)
    sweep.checkpoint("b", 100)
    sweep.write_runs("a")
    coordinator = running()
    wait_until(lambda: len(sweep.images("a")) == 2, "run a rendered")
    assert sweep.images("b") == []

    sweep.write_runs("a", "b")  # added: watched at once
    wait_until(lambda: sweep.images("b") == ["step_000100/sample_00.png"], "run b, added, rendered")

    def remove_a() -> None:  # as a's next image renders
        sweep.before_render = lambda: None
        sweep.write_runs("b")
        wait_until(lambda: coordinator.threads["a"].stopping, "run a told to stop")

    sweep.before_render = remove_a
    sweep.checkpoint("a", 200)
    wait_until(lambda: "a" not in coordinator.threads, "run a dropped")

    assert sweep.images("a")[-1] == "step_000200/sample_00.png" and len(sweep.images("a")) == 3
    assert [row[2] for row in sweep.sample_rows("a") if row[0] == 200] == [
        "done",
        "pending",
    ]  # after its image
    sweep.checkpoint("b", 200)  # b is still served
    wait_until(lambda: len(sweep.images("b")) == 2, "run b's next checkpoint")


def test_cli_refuses_options_that_cannot_apply_to_a_sweep(tmp_path: Path, capsys) -> None:
    runs_file = tmp_path / "runs.yaml"
    runs_file.write_text("- output: /x/a\n")

    assert main(["watch", "/x/a", "--runs", str(runs_file)]) == 2
    assert "`OUTPUT_DIR` and `--runs` disagree" in capsys.readouterr().err
    assert main(["watch", "--runs", str(runs_file), "--output", "/x/s"]) == 2
    assert "give each run its `samples:`" in capsys.readouterr().err
    assert main(["watch", "--runs", str(runs_file), "--share-gpu", "0"]) == 2
    assert main(["watch", "/x/a", "--workers", "2"]) == 2
    assert "need `--ray`" in capsys.readouterr().err
    assert main(["watch", "--runs", str(runs_file), "--workers", "2"]) == 2
    assert "`--workers 2` needs `--ray`" in capsys.readouterr().err
    assert main(["watch"]) == 2
    assert main(["status", "--runs", str(runs_file)]) == 0
    assert "a: /x/a" in capsys.readouterr().out


if "ray" in sys.modules:  # pragma: no cover - a guard, not a test: nothing above may import Ray
    raise AssertionError("the coordinator without --ray imported ray")


def test_without_ray_nothing_imports_ray() -> None:
    code = (
        "import sys; from sidecar.app.coordinator import build_pool; from sidecar.app.worker import"
        " PoolOptions; build_pool(PoolOptions(device='cpu')).close(); assert 'ray' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the cluster recipe (deploy/cluster) ---------------------------------------------------------

CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "cluster"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(CLUSTER / name)
    return parser


def test_the_cluster_units_run_commands_sidecar_and_ray_accept() -> None:
    coordinator = _unit("sidecar-coordinator.service")["Service"]
    program, *words = shlex.split(coordinator["ExecStart"])
    assert program == "/opt/sidecar/.venv/bin/sidecar"
    args = build_parser().parse_args(words)
    assert (args.command, args.runs, args.ray, args.polling) == (
        "watch",
        Path("/etc/sidecar/runs.yaml"),
        "auto",
        True,
    )
    head = shlex.split(_unit("ray-head.service")["Service"]["ExecStart"])
    worker = shlex.split(_unit("ray-worker.service")["Service"]["ExecStart"])
    assert head[:3] == ["/opt/sidecar/.venv/bin/ray", "start", "--head"] and "--num-gpus=0" in head
    assert "--address=${RAY_HEAD}:6379" in worker
    assert "RAY_HEAD=" in (CLUSTER / "ray-worker.env.example").read_text()
    for name in (
        "sidecar-coordinator.service",
        "ray-head.service",
        "ray-worker.service",
    ):  # one token everywhere
        assert "RAY_AUTH_MODE=token" in (CLUSTER / name).read_text()
    assert [run.name for run in read_runs(CLUSTER / "runs.yaml.example")] == [
        "lr1e-4",
        "lr3e-4",
        "kohya-flux",
    ]


def test_the_kuberay_cluster_runs_the_coordinator_beside_the_head(tmp_path: Path) -> None:
    import importlib.metadata

    runs, cluster = yaml.safe_load_all((CLUSTER / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    assert cluster["spec"]["rayVersion"] == importlib.metadata.version("ray")  # the version sidecar pins
    head = {c["name"]: c for c in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]}
    args = build_parser().parse_args(head["coordinator"]["command"][1:])
    assert (args.runs, args.ray) == (Path("/etc/sidecar/runs.yaml"), "auto")
    mounts = {m["mountPath"] for m in head["coordinator"]["volumeMounts"]}
    assert {"/tmp/ray", "/dev/shm"} <= mounts & {m["mountPath"] for m in head["ray-head"]["volumeMounts"]}
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    runs_file = tmp_path / "runs.yaml"
    runs_file.write_text(runs["data"]["runs.yaml"])
    assert len(read_runs(runs_file)) == 2
