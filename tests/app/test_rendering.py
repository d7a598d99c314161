"""`sidecar.app.rendering`: each image written as it arrives, a stop between images, OOM step-down."""

from __future__ import annotations

import pytest
import torch
from factories import sample_request
from PIL import Image

from sidecar.app.rendering import render_samples
from sidecar.plan.request import SampleRequest
from sidecar.publish.infotext import read_infotext
from sidecar.render import memory
from sidecar.render.base import Renderer
from sidecar.render.memory import MemoryPolicy, OutOfMemoryError, Placement


def request(index: int, *, seed: int = 1) -> SampleRequest:
    return sample_request(
        index=index, prompt=f"prompt {index}", steps=2, guidance_scale=5.0, sampler="euler", seed=seed
    )


class FakeRenderer:
    """Yields solid images; raises CUDA OOM on the chosen calls, as a too-small card does.

    Its `render_resilient` is the real one, so the OOM step-down under test is sidecar's.
    """

    render_resilient = Renderer.render_resilient

    def __init__(self, *, oom_on_calls: set[int] = frozenset(), placement: Placement | None = None) -> None:
        self.oom_on_calls = oom_on_calls
        self.placement = placement
        self.calls = 0
        self.lora = None
        self.base_model = "tiny"
        self.pipe = object()
        self.spec = type("Spec", (), {"name": "sdxl"})()

    def render(self, requests, *, batch_size=1):
        for item in requests:
            self.calls += 1
            if self.calls in self.oom_on_calls:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            yield item, Image.new("RGB", (item.width, item.height), (item.index * 40, 0, 0))


@pytest.fixture
def fake_cuda_placement(monkeypatch):
    """A placement on a pretend `cuda:0` whose mode changes are recorded, not applied."""
    applied: list[str] = []
    monkeypatch.setattr(memory, "apply_memory_mode", lambda pipe, mode, device: applied.append(mode) or mode)
    monkeypatch.setattr(memory, "free_cuda_cache", lambda device=None: None)
    placement = Placement(device=torch.device("cuda", 0), policy=MemoryPolicy("none"))
    return placement, applied


def test_every_request_lands_as_image_and_prompt_file(tmp_path):
    rendered = render_samples(FakeRenderer(), [request(0), request(1)], samples_dir=tmp_path, step=500)
    assert [sample.request.index for sample in rendered] == [0, 1]
    for index in (0, 1):
        assert (tmp_path / "step_000500" / f"sample_{index:02d}.png").is_file()
        assert (tmp_path / "step_000500" / f"sample_{index:02d}.txt").read_text() == f"prompt {index}\n"
    assert "Seed: 1" in read_infotext(tmp_path / "step_000500" / "sample_00.png")


def test_should_stop_keeps_what_is_written_and_leaves_the_rest(tmp_path):
    rendered = render_samples(
        FakeRenderer(),
        [request(0), request(1), request(2)],
        samples_dir=tmp_path,
        step=1,
        should_stop=lambda: True,
    )
    assert [sample.request.index for sample in rendered] == [0]
    assert sorted(p.name for p in (tmp_path / "step_000001").glob("*.png")) == ["sample_00.png"]


def test_cuda_oom_steps_to_a_stronger_mode_and_renders_the_rest(tmp_path, fake_cuda_placement, caplog):
    placement, applied = fake_cuda_placement
    renderer = FakeRenderer(oom_on_calls={2}, placement=placement)
    rendered = render_samples(renderer, [request(0), request(1), request(2)], samples_dir=tmp_path, step=7)
    assert [sample.request.index for sample in rendered] == [0, 1, 2]  # nothing lost, nothing twice
    assert applied == ["model"]
    assert placement.mode == "model"  # kept for later checkpoints
    assert "CUDA out of memory with offload=none; retrying with offload=model" in caplog.text


def test_cuda_oom_in_the_leanest_mode_fails_the_step(tmp_path, fake_cuda_placement):
    """No stronger mode left: a lasting failure (not retried), naming the mode (memory plan: issue 13)."""
    placement, applied = fake_cuda_placement
    placement.policy = MemoryPolicy("sequential")
    with pytest.raises(OutOfMemoryError, match="even with offload=sequential"):
        render_samples(
            FakeRenderer(oom_on_calls={1}, placement=placement), [request(0)], samples_dir=tmp_path, step=1
        )
    assert applied == []


def test_cuda_oom_without_a_placement_is_raised_as_is(tmp_path):
    with pytest.raises(torch.cuda.OutOfMemoryError):
        render_samples(FakeRenderer(oom_on_calls={1}), [request(0)], samples_dir=tmp_path, step=1)
