"""Per-step seeds and the trainers' sampling cadence: `SamplePlan.requests_for_step`, `Cadence`,
and `app.plan_source.PlanSource`, which applies both per checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from factories import FIXTURES, sample_request

from sidecar.app.plan_source import PlanSource
from sidecar.intake.layouts import Checkpoint
from sidecar.plan.request import Cadence, SamplePlan, seed_for_step


def checkpoint(step: int | None, epoch: int | None = None, *, final: bool = False) -> Checkpoint:
    return Checkpoint(Path(f"/run/x-{step}.safetensors"), "x", "kohya", step, epoch, is_final=final)


def test_per_step_seeds_are_new_each_step_and_the_same_on_a_rerender() -> None:
    fixed, drawn = sample_request(index=0, seed=5), sample_request(index=1, seed=5, seed_per_step=True)
    plan = SamplePlan(requests=(fixed, drawn))
    at_100, at_200 = plan.requests_for_step(100), plan.requests_for_step(200)
    assert at_100[0] == at_200[0] == fixed
    assert at_100[1].seed != at_200[1].seed
    assert not at_100[1].seed_per_step  # stored concrete
    assert plan.requests_for_step(100) == at_100
    assert at_100[1].seed == seed_for_step(5, 100, 1) and 0 <= at_100[1].seed < 2**31


@pytest.mark.parametrize(
    ("cadence", "step", "epoch", "since", "skipped"),
    [
        (Cadence(every=2, unit="epoch"), 100, 3, 50.0, "sample every 2 epochs: epoch 3 is not a multiple"),
        (Cadence(every=2, unit="epoch"), 100, 4, 50.0, None),
        (Cadence(every=2, unit="epoch"), 100, 3, None, None),  # the first one always renders
        (Cadence(every=2, unit="epoch"), 100, None, 50.0, None),  # epoch unknown: renders
        (Cadence(every=600, unit="second"), 100, None, 599.0, "sample every 600 s: 599 s since the last one"),
        (Cadence(every=600, unit="second"), 100, None, 600.0, None),
        (Cadence(start_step=500), 400, None, None, "sampling starts at step 500; this is step 400"),
        (Cadence(start_epoch=1), 400, 0, None, "sampling starts at epoch 1; this is epoch 0"),
    ],
)
def test_cadence_skip_reason(cadence: Cadence, step, epoch, since, skipped) -> None:
    reason = cadence.skip_reason(step=step, epoch=epoch, is_final=False, seconds_since_last=since)
    assert reason == skipped if skipped is None else reason.startswith(skipped)
    assert cadence.skip_reason(step=step, epoch=epoch, is_final=True, seconds_since_last=since) is None


def test_cadence_describe() -> None:
    assert Cadence(every=2, unit="epoch", start_epoch=1).describe() == "every 2 epochs from epoch 1"
    assert Cadence(every=600, unit="second").describe() == "every 600 s"
    assert Cadence(start_step=500).describe() == "from step 500"


def test_plan_source_applies_the_time_cadence_and_per_step_seeds() -> None:
    plans = PlanSource(FIXTURES / "onetrainer" / "configs" / "#sdxl 1.0 LoRA.json")  # every 10 minutes
    assert plans.cadence_skip(checkpoint(500), now=1000.0) is None  # the first
    assert plans.cadence_skip(checkpoint(1000), now=1300.0).startswith("sample every 600 s")
    assert plans.cadence_skip(checkpoint(1500), now=1601.0) is None  # 601 s after the last one let through
    assert plans.cadence_skip(checkpoint(2000, final=True), now=1700.0) is None
    requests = plans.requests_for(checkpoint(1500))
    assert [r.seed_per_step for r in requests] == [False, False, False]
    assert requests[2].seed != plans.requests_for(checkpoint(2000))[2].seed


def test_plan_source_reloads_when_the_config_named_prompt_file_changes(tmp_path: Path) -> None:
    for name in ("flux.toml", "flux_prompts.toml"):
        shutil.copy(FIXTURES / "kohya" / name, tmp_path / name)
    plans = PlanSource(tmp_path / "flux.toml")
    assert len(plans.plan.requests) == 2
    prompts = tmp_path / "flux_prompts.toml"
    prompts.write_text(prompts.read_text() + '\n[[prompt.subset]]\nprompt = "a third"\n')
    os.utime(prompts, ns=(1, 10**18))  # a different mtime even on a coarse clock
    assert plans.reload_if_changed()
    assert [r.prompt for r in plans.plan.requests][-1] == "a third"
