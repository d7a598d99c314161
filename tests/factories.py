"""Test data builders shared by the test modules (`from factories import sample_request`)."""

from __future__ import annotations

from pathlib import Path

from sidecar.plan.request import SampleRequest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FIXTURES = TESTS / "fixtures" / "configs"


def sample_request(**overrides: object) -> SampleRequest:
    """A fully resolved SDXL-style request; `overrides` change any field."""
    fields: dict[str, object] = {
        "index": 0,
        "prompt": "a photo of sks dog",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "steps": 20,
        "guidance_scale": 7.0,
        "true_cfg_scale": 1.0,
        "sampler": "euler_a",
        "seed": 42,
        "strength": 1.0,
    }
    fields.update(overrides)
    return SampleRequest(**fields)  # type: ignore[arg-type]
