"""CUDA out of memory at every phase of a real render: loading, applying the LoRA, encoding,
denoising, decoding. Each is injected once into the real module the phase runs (not into a
fake renderer); the placement frees the cache, steps to the next stronger mode and goes on,
and the image is the one a render without the OOM gives.

This machine has no CUDA: the placement is on the CPU, where every mode places like `none`,
so what is checked is the step (the policy's mode, kept for later checkpoints), that the
phase is run again, and that nothing is lost or rendered twice.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers_reference import render_one, sample

from sidecar.errors import SidecarError, TransientError
from sidecar.plan.request import ModelSource
from sidecar.render import memory
from sidecar.render.memory import MemoryPolicy, OutOfMemoryError
from sidecar.render.registry import load_renderer

OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 MiB"


def _once(real, counter: list[int]):
    """`real`, except that its first call raises CUDA's out-of-memory error."""

    def wrapped(*args, **kwargs):
        counter.append(1)
        if len(counter) == 1:
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)
        return real(*args, **kwargs)

    return wrapped


def _load(tiny_models, arch: str):
    return load_renderer(ModelSource(arch=arch, name_or_path=str(tiny_models[arch])), device="cpu")


def _resilient(renderer, request) -> np.ndarray:
    (image,) = [np.asarray(image) for _, image in renderer.render_resilient([request])]
    return image


@pytest.fixture(scope="module")
def references(tiny_models, tiny_lora):
    """The base and LoRA images of the default Flux request, without any OOM."""
    renderer = _load(tiny_models, "flux")
    base = render_one(renderer, sample("flux"))
    renderer.apply_lora(tiny_lora("flux"))
    return {"base": base, "lora": render_one(renderer, sample("flux"))}


def test_oom_while_loading_steps_down_and_loads(tiny_models, monkeypatch, references):
    calls: list[int] = []
    monkeypatch.setattr(memory, "_place", _once(memory._place, calls))
    renderer = _load(tiny_models, "flux")
    assert len(calls) == 2 and renderer.placement.mode == "model"
    np.testing.assert_array_equal(_resilient(renderer, sample("flux")), references["base"])


def test_oom_while_applying_the_lora_steps_down_and_applies_it(tiny_models, tiny_lora, references):
    renderer = _load(tiny_models, "flux")
    calls: list[int] = []
    renderer.pipe.load_lora_weights = _once(renderer.pipe.load_lora_weights, calls)
    report = renderer.apply_lora(tiny_lora("flux"))
    assert len(calls) == 2 and report.injected_total > 0
    assert renderer.placement.mode == "model"
    np.testing.assert_array_equal(_resilient(renderer, sample("flux")), references["lora"])


@pytest.mark.parametrize(
    ("phase", "module_name", "method"),
    [
        ("encoding", "text_encoder_2", "forward"),
        ("denoising", "transformer", "forward"),
        ("decoding", "vae", "decode"),
    ],
)
def test_oom_while_rendering_steps_down_and_renders_the_image_once(
    tiny_models, tiny_lora, references, phase, module_name, method
):
    renderer = _load(tiny_models, "flux")
    renderer.apply_lora(tiny_lora("flux"))
    module = getattr(renderer.pipe, module_name)
    calls: list[int] = []
    monkeypatch_target = getattr(module, method)
    setattr(module, method, _once(monkeypatch_target, calls))
    images = [np.asarray(image) for _, image in renderer.render_resilient([sample("flux")])]
    assert len(images) == 1  # nothing twice
    assert len(calls) >= 2, f"the {phase} phase ran again"
    assert renderer.placement.mode == "model"
    np.testing.assert_array_equal(images[0], references["lora"])
    # The stronger mode is kept: the next checkpoint renders in it without another OOM.
    np.testing.assert_array_equal(_resilient(renderer, sample("flux")), references["lora"])
    assert renderer.placement.policy.oom_count == 1


def test_after_sequential_the_text_encoders_wait_on_the_cpu(tiny_models, tiny_lora, references):
    """The last step before giving up: encoders held out of the pipeline, encoding on the CPU."""
    renderer = _load(tiny_models, "flux")
    renderer.placement.policy = MemoryPolicy("sequential")
    calls: list[int] = []
    renderer.pipe.transformer.forward = _once(renderer.pipe.transformer.forward, calls)
    np.testing.assert_array_equal(_resilient(renderer, sample("flux")), references["base"])
    assert renderer.placement.encoders_on_cpu
    assert renderer.pipe.text_encoder_2 is None and "text_encoder_2" in renderer.placement.held
    renderer.apply_lora(tiny_lora("flux"))  # the LoRA still applies, encoders attached meanwhile
    np.testing.assert_array_equal(
        _resilient(renderer, sample("flux", prompt="a new prompt")).shape, (64, 64, 3)
    )
    np.testing.assert_array_equal(_resilient(renderer, sample("flux")), references["lora"])


def test_no_stronger_mode_left_fails_with_the_plans_figures(tiny_models):
    renderer = _load(tiny_models, "flux")
    renderer.placement.policy = MemoryPolicy("sequential")
    renderer.placement.encoders_on_cpu = True
    renderer.placement.apply(renderer.pipe)
    renderer.pipe.vae.decode = _once(renderer.pipe.vae.decode, [])
    with pytest.raises(OutOfMemoryError) as error:
        _resilient(renderer, sample("flux"))
    message = str(error.value)
    assert "even with offload=sequential, text encoders on the CPU" in message
    assert "estimated peaks: none " in message and "sequential " in message and "GiB" in message
    assert OOM_MESSAGE in message
    # The dispatcher records a `SidecarError` that is not a `TransientError` as failed, not retried.
    assert isinstance(error.value, SidecarError) and not isinstance(error.value, TransientError)


def test_an_error_that_is_not_an_oom_is_not_stepped(tiny_models):
    renderer = _load(tiny_models, "flux")
    renderer.pipe.vae.decode = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("shapes"))
    with pytest.raises(RuntimeError, match="shapes"):
        _resilient(renderer, sample("flux"))
    assert renderer.placement.mode == "none" and renderer.placement.policy.oom_count == 0
