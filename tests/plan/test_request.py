"""sidecar/plan/request.py: the plan's output every later stage reads, and how the job store keeps it."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from factories import sample_request

from sidecar.plan.request import ModelSource, SamplePlan, SampleRequest


def test_sample_request_contract_is_unchanged() -> None:
    names = [f.name for f in dataclasses.fields(SampleRequest)]
    assert names == [
        "index",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "true_cfg_scale",
        "sampler",
        "seed",
        "strength",
        # added since, with defaults, so rows stored before read back (`from_dict`)
        "seed_per_step",
        "control_images",
        "init_image",
        "num_frames",
        "fps",
    ]


def test_to_dict_and_from_dict_round_trip_through_json() -> None:
    request = sample_request(index=3, prompt="a dog, --not a flag", negative_prompt="blurry", strength=0.5)
    stored = json.loads(json.dumps(request.to_dict()))
    assert stored == json.loads(json.dumps(dataclasses.asdict(request)))
    assert SampleRequest.from_dict(stored) == request


@dataclass(frozen=True)
class _LaterRequest(SampleRequest):
    """A request as a later version might define it: one more field, with a default."""

    clip_skip: int = 1
    styles: tuple[str, ...] = dataclasses.field(default_factory=tuple)


def test_a_stored_request_lacking_a_field_with_a_default_takes_the_default() -> None:
    """Rows written by an older version lack fields added since."""
    older_row = sample_request(index=1).to_dict()
    upgraded = _LaterRequest.from_dict(older_row)
    assert isinstance(upgraded, _LaterRequest)
    assert (upgraded.clip_skip, upgraded.styles) == (1, ())
    assert upgraded.to_dict() == {**older_row, "clip_skip": 1, "styles": ()}
    assert _LaterRequest.from_dict({**older_row, "clip_skip": 2}).clip_skip == 2


def test_unknown_fields_are_refused_naming_them() -> None:
    row = {**sample_request().to_dict(), "clip_skip": 2, "aesthetic": 6}
    with pytest.raises(
        ValueError, match=re.escape("stored sample request has unknown fields ['aesthetic', 'clip_skip']")
    ):
        SampleRequest.from_dict(row)


def test_missing_required_fields_are_refused_naming_them() -> None:
    row = sample_request().to_dict()
    del row["seed"], row["sampler"]
    with pytest.raises(
        ValueError, match=re.escape("stored sample request lacks required fields ['sampler', 'seed']")
    ):
        SampleRequest.from_dict(row)


def test_batch_key_groups_requests_that_render_together() -> None:
    request = sample_request()
    assert request.batch_key() == dataclasses.replace(request, index=5, prompt="other", seed=7).batch_key()
    for change in ({"width": 128}, {"steps": 30}, {"sampler": "ddim"}, {"strength": 0.5}):
        assert dataclasses.replace(request, **change).batch_key() != request.batch_key()  # type: ignore[arg-type]


def test_sample_plan_output_options() -> None:
    plan = SamplePlan(requests=(sample_request(),), image_format="webp", batch_size=4, sample_every=100)
    assert plan.output_options() == {"image_format": "webp", "batch_size": 4}
    assert SamplePlan(requests=()).output_options() == {"image_format": "png", "batch_size": 1}


def test_model_source_label() -> None:
    assert ModelSource("sdxl", "/models/sdxl-base/").label == "sdxl-base"
    assert ModelSource("flux", str(Path("/models/flux1-dev.safetensors"))).label == "flux1-dev.safetensors"
    assert ModelSource("flux", "black-forest-labs/FLUX.1-dev").label == "FLUX.1-dev"
    source = ModelSource("sd3", "m")
    assert (source.vae_path, dict(source.text_encoder_paths), source.quantize, source.low_vram) == (
        None,
        {},
        False,
        False,
    )
