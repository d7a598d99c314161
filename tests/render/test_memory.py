"""Memory modes: choosing one, stepping down after an OOM, placing and parking a pipeline.

CUDA is faked except in the tests marked `cuda`.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sidecar.errors import SidecarError
from sidecar.render import memory, memory_plan, offload
from sidecar.render.devices import allocated_bytes, resolve_device, resolve_dtype
from sidecar.render.loaded_plan import module_components
from sidecar.render.memory import (
    MemoryPolicy,
    apply_memory_mode,
    next_stronger_mode,
    park,
    plan_pipeline,
    unpark,
)
from sidecar.testing.tiny import build_pipeline

GIB = 1024**3
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --- choosing and stepping memory modes -----------------------------------------


def test_next_stronger_mode_sequence():
    assert [next_stronger_mode(m) for m in ("none", "model", "group", "sequential")] == [
        "model",
        "group",
        "sequential",
        None,
    ]
    with pytest.raises(ValueError, match="auto"):
        next_stronger_mode("auto")


def test_memory_policy_steps_down_and_keeps_the_mode(caplog):
    policy = MemoryPolicy("none")
    with caplog.at_level(logging.WARNING, logger="sidecar.render"):
        assert policy.on_oom() == "model"
    assert "CUDA out of memory with offload=none; retrying with offload=model" in caplog.text
    assert policy.mode == "model"
    assert policy.on_oom() == "group"
    assert policy.on_oom() == "sequential"
    assert policy.on_oom() is None  # the placement then fails the step, with the plan's figures
    assert policy.mode == "sequential"
    assert policy.oom_count == 4


def test_memory_policy_refuses_auto():
    with pytest.raises(ValueError, match="resolve `auto`"):
        MemoryPolicy("auto")


# --- applying modes -------------------------------------------------------------


def _render(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    result = pipe(
        prompt="a photo", height=64, width=64, num_inference_steps=2, output_type="np", generator=generator
    )
    return result.images


def _devices_of(pipe) -> set[str]:
    return {t.device.type for m in module_components(pipe).values() for t in m.parameters()}


def _has_hooks(pipe) -> bool:
    modules = module_components(pipe).values()
    return any(hasattr(m, "_hf_hook") or offload.has_group_offload(m) for m in modules)


@pytest.fixture(scope="module")
def sdxl_reference() -> np.ndarray:
    return _render(build_pipeline("sdxl"))


@pytest.mark.parametrize("mode", ["none", "model", "group", "sequential", "auto"])
def test_every_mode_means_none_on_cpu(mode, sdxl_reference):
    pipe = build_pipeline("sdxl")
    assert apply_memory_mode(pipe, mode, torch.device("cpu")) == "none"
    assert not _has_hooks(pipe)
    assert not pipe.vae.use_tiling
    np.testing.assert_array_equal(_render(pipe), sdxl_reference)


def test_unknown_mode_is_refused():
    with pytest.raises(SidecarError, match="`offload` must be one of"):
        apply_memory_mode(build_pipeline("sdxl"), "disk", torch.device("cpu"))


def test_auto_follows_the_memory_plan_for_the_free_memory(monkeypatch):
    """On a (faked) CUDA card, `auto` takes the plan's choice for what mem_get_info reports."""
    pipe = build_pipeline("sdxl")
    placed: list[str] = []
    monkeypatch.setattr(memory, "_place", lambda pipe, mode, device: placed.append(mode))
    plan = plan_pipeline(pipe)
    needs = {e.mode: memory_plan.needed_bytes(e) for e in plan.estimates if not e.encoders_on_cpu}
    for free, expected in ((80 * GIB, "none"), (needs["model"] + 1, "model"), (GIB // 2, "sequential")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 * GIB))
        assert apply_memory_mode(pipe, "auto", torch.device("cuda", 0)) == expected
        assert pipe.vae.use_tiling == (expected != "none")  # offload modes tile the VAE decode
    assert placed == ["none", "model", "sequential"]


@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_park_removes_offload_hooks_and_weights_come_back(mode, sdxl_reference):
    """The offload plumbing on CPU: hooks installed by each mode are removed by `park`.

    Onload device `cpu` stands in for CUDA; sequential offload is not rendered through
    here, because accelerate cannot execute on the device `cpu:0` diffusers asks for.
    """
    pipe = build_pipeline("sdxl")
    memory._place(pipe, mode, torch.device("cpu"))
    assert _has_hooks(pipe)
    if mode == "sequential":
        assert "meta" in _devices_of(pipe)  # weights set aside by accelerate
    else:
        np.testing.assert_array_equal(_render(pipe), sdxl_reference)
    park(pipe)
    assert not _has_hooks(pipe)
    assert _devices_of(pipe) == {"cpu"}
    np.testing.assert_array_equal(_render(pipe), sdxl_reference)
    assert unpark(pipe, torch.device("cpu"), mode) == "none"


def test_switching_modes_after_group_offload():
    """A stronger mode can replace group offload (diffusers refuses to stack them)."""
    pipe = build_pipeline("sd3")
    memory._place(pipe, "group", torch.device("cpu"))
    memory.detach(pipe)
    memory._place(pipe, "model", torch.device("cpu"))
    assert any(hasattr(m, "_hf_hook") for m in module_components(pipe).values())
    park(pipe)
    assert not _has_hooks(pipe)


# --- real CUDA ------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mode", ["none", "model", "group", "sequential"])
def test_modes_render_on_cuda_and_park_frees_vram(mode):
    device = resolve_device(device=None, gpu=0)
    pipe = build_pipeline("sdxl")
    pipe.to(dtype=resolve_dtype("auto", device))
    before = allocated_bytes(device)
    assert apply_memory_mode(pipe, mode, device) == mode
    images = _render(pipe)
    assert np.isfinite(images).all()
    park(pipe, device)
    assert allocated_bytes(device) <= before
    assert _devices_of(pipe) == {"cpu"}


# --- the plan on a (faked) card: text encoders on the CPU, low_vram ---------------


@pytest.fixture
def fake_card(monkeypatch):
    """cuda:0 with `free` bytes: placements recorded, not applied (this machine has no CUDA)."""
    placed: list[str] = []
    card = {"free": 80 * GIB}
    monkeypatch.setattr(memory, "_place", lambda pipe, mode, device: placed.append(mode))
    monkeypatch.setattr(memory, "free_cuda_cache", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card["free"], 80 * GIB))
    return card, placed


def test_auto_keeps_the_text_encoders_on_the_cpu_when_only_that_fits(tiny_models, fake_card, monkeypatch):
    from diffusers_reference import render_one, sample

    from sidecar.render.registry import renderer_class

    card, placed = fake_card
    renderer = renderer_class("flux").from_model(tiny_models["flux"])
    reference = render_one(renderer_class("flux").from_model(tiny_models["flux"]), sample("flux"))
    plan = plan_pipeline(renderer.pipe, pixels=64 * 64)  # the tiny encoders matter beside 64 px activations
    with_encoders = memory_plan.needed_bytes(plan.estimate("none"))
    without = memory_plan.needed_bytes(plan.estimate("none", encoders_on_cpu=True))
    assert without < with_encoders
    card["free"] = without
    names = tuple(renderer.text_encoder_keys.values())
    renderer.placement = memory.Placement.place(
        renderer.pipe, "auto", torch.device("cuda", 0), plan=plan, encoder_names=names
    )
    assert renderer.placement.mode == "none" and renderer.placement.encoders_on_cpu
    assert renderer.pipe.text_encoder_2 is None  # no offload mode can move it to the card
    moves: list[str] = []
    monkeypatch.setattr(renderer, "_move_text_encoders", lambda device: moves.append(device.type))
    np.testing.assert_array_equal(render_one(renderer, sample("flux")), reference)  # encoded on the CPU
    assert moves == [] and renderer.encode_device.type == "cpu"
    assert placed == ["none"]


def test_low_vram_places_each_component_only_while_it_runs(tiny_models, fake_card, monkeypatch):
    """ai-toolkit's `low_vram: true`: big components wait in CPU RAM; never all on the card."""
    from sidecar.plan.request import ModelSource
    from sidecar.render import registry

    _card, placed = fake_card
    monkeypatch.setattr(registry, "resolve_device", lambda device, gpu: torch.device("cuda", 0))
    monkeypatch.setattr(registry, "resolve_dtype", lambda dtype, device: torch.float32)
    source = ModelSource(arch="sdxl", name_or_path=str(tiny_models["sdxl"]), low_vram=True)
    renderer = registry.load_renderer(source, gpu=0)
    assert renderer.placement.mode == "model" and placed == ["model"]  # 80 GiB free, still model
    assert "low_vram" in renderer.placement.plan.reason


@pytest.mark.parametrize("mode", ["group"])
def test_a_lora_applies_and_swaps_under_offload(mode, tiny_models, tiny_lora):
    """The daemon's order: placed first, then each checkpoint's LoRA (onload device `cpu`
    stands in for CUDA; the hooks and the LoRA loading through them are the real ones).
    `model` offload needs an accelerator to re-enable its hooks after a LoRA loads:
    `bench/gpu_check.sh` applies a LoRA in every mode on a card."""
    from diffusers_reference import render_one, sample

    from sidecar.render.registry import renderer_class

    first, second = tiny_lora("flux", seed=1), tiny_lora("flux", seed=2)
    expected = []
    for lora in (first, second):
        plain = renderer_class("flux").from_model(tiny_models["flux"])
        plain.apply_lora(lora)
        expected.append(render_one(plain, sample("flux")))
    renderer = renderer_class("flux").from_model(tiny_models["flux"])
    memory._place(renderer.pipe, mode, torch.device("cpu"))
    renderer.placement = memory.Placement(device=torch.device("cpu"), policy=MemoryPolicy(mode))
    for lora, image in zip((first, second), expected, strict=True):
        report = renderer.apply_lora(lora)
        assert report.injected_total > 0
        np.testing.assert_array_equal(render_one(renderer, sample("flux")), image)
    assert _has_hooks(renderer.pipe)  # still offloaded


def test_held_text_encoders_go_back_on_the_cpu_without_offload_hooks():
    """diffusers re-applies offload to every component after a LoRA load; a held encoder
    carrying a hook would be moved to the card at its next encode."""
    from accelerate import cpu_offload_with_hook

    pipe = build_pipeline("flux")
    placement = memory.Placement(
        device=torch.device("cpu"),
        policy=MemoryPolicy("none"),
        encoder_names=("text_encoder", "text_encoder_2"),
        encoders_on_cpu=True,
    )
    placement.apply(pipe)
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    with placement.encoders_attached(pipe):
        memory._place(pipe, "group", torch.device("cpu"))  # hooks on every component, encoders too
        cpu_offload_with_hook(pipe.text_encoder, "cpu")
        assert offload.has_group_offload(pipe.text_encoder_2) and hasattr(pipe.text_encoder, "_hf_hook")
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    for module in placement.held.values():
        assert not offload.has_group_offload(module)
        assert not any(hasattr(sub, "_hf_hook") for sub in module.modules())


# --- a LyCORIS network under offload -------------------------------------------------


def _group_tensors(component: torch.nn.Module) -> set[int]:
    """ids of the tensors diffusers' group offload hooks move for `component`."""
    found: set[int] = set()
    for module in component.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            found |= {id(tensor) for sub in hook.group.modules for tensor in sub.parameters()}
            found |= {id(tensor) for tensor in hook.group.parameters}
    return found


def _assert_networks_follow(renderer, mode: str) -> None:
    networks = renderer.adapter.lycoris.networks
    assert networks and _has_hooks(renderer.pipe)  # still offloaded
    for name, network in networks.items():
        if mode == "group":  # in its component's groups: onloaded with it
            assert _group_tensors(getattr(renderer.pipe, name)) >= {id(p) for p in network.parameters()}
        else:  # unhooked on the execution device, never accelerate's meta placeholders
            assert not any(hasattr(module, "_hf_hook") for module in network.modules())
            assert {p.device.type for p in network.parameters()} == {"cpu"}


@pytest.mark.parametrize("mode", ["group", "sequential"])
def test_a_lycoris_network_is_offloaded_with_its_component(mode, tiny_models, tmp_path):
    """A LyCORIS network (hung on its component as `sidecar_lycoris`) goes where its layers' weights
    go, whether it is applied under offload or the pipeline is offloaded again with it on (unpark,
    an OOM step); `park` brings it back whole, and taking it off leaves the layers as they were.
    Onload device `cpu` stands in for CUDA; under sequential offload the pipeline renders only
    after `park` (accelerate cannot execute on the `cpu:0` diffusers asks for)."""
    from diffusers_reference import render_one, sample

    from sidecar.render.registry import renderer_class
    from sidecar.testing.trainer_loras import write_trainer_lora

    folder = tiny_models["sdxl"]
    lora = write_trainer_lora(folder, "sdxl", tmp_path / "loha.safetensors", "lycoris_loha").path
    plain = renderer_class("sdxl").from_model(folder)
    base_image = render_one(plain, sample("sdxl"))
    plain.apply_lora(lora)
    expected = render_one(plain, sample("sdxl"))
    assert not np.array_equal(expected, base_image)

    renderer = renderer_class("sdxl").from_model(folder)
    memory._place(renderer.pipe, mode, torch.device("cpu"))
    renderer.placement = memory.Placement(device=torch.device("cpu"), policy=MemoryPolicy(mode))
    renderer.apply_lora(lora)
    _assert_networks_follow(renderer, mode)
    if mode == "group":
        np.testing.assert_array_equal(render_one(renderer, sample("sdxl")), expected)
    park(renderer.pipe)
    assert not _has_hooks(renderer.pipe) and _devices_of(renderer.pipe) == {"cpu"}
    np.testing.assert_array_equal(render_one(renderer, sample("sdxl")), expected)  # outlived the hooks

    memory._place(renderer.pipe, mode, torch.device("cpu"))  # offloaded again with the network on
    _assert_networks_follow(renderer, mode)
    renderer.remove_lora()
    assert _has_hooks(renderer.pipe) and not renderer.adapter.lycoris.networks
    park(renderer.pipe)
    np.testing.assert_array_equal(render_one(renderer, sample("sdxl")), base_image)
