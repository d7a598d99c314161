"""Test data builders shared by the test modules (`from factories import sample_request`)."""

from __future__ import annotations

from sidecar.prompts import SampleRequest


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
