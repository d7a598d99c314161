"""Helpers for the trainer-format tests of tests/plan/ (owned by test_kohya.py, test_onetrainer.py,
test_simpletuner.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sidecar.plan.request import SamplePlan

Row = tuple[str, str, int, str, float, float, object, float]


def plan_rows(plan: SamplePlan) -> list[Row]:
    """(prompt, size, steps, sampler, guidance, true cfg, seed or 'per step', strength) per request:
    what `sidecar check` prints for each sample."""
    return [
        (
            r.prompt,
            f"{r.width}x{r.height}",
            r.steps,
            r.sampler,
            r.guidance_scale,
            r.true_cfg_scale,
            "per step" if r.seed_per_step else r.seed,
            r.strength,
        )
        for r in plan.requests
    ]


@pytest.fixture
def rows() -> Callable[[SamplePlan], list[Row]]:
    return plan_rows
