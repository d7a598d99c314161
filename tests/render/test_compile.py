"""`--compile` (`sidecar.render.compile`): compiled once, swapped without recompiling, same images.

The compiling test is slow (inductor builds C++ kernels on the CPU: ~15 s with its cache
warm, minutes cold); the fallbacks are checked with fakes, without compiling anything.
"""

from __future__ import annotations

import logging

import pytest
from diffusers_reference import max_difference, render_one, sample

from sidecar.plan.request import ModelSource
from sidecar.render import compile as compile_module
from sidecar.render.compile import graphs_compiled, repeated_blocks
from sidecar.render.registry import load_renderer

ARCH = "flux"  # the tiny Flux compiles fastest of the three: two small block classes
MAX_DIFFERENCE = 2  # of 255: compiled kernels may round differently, never more


def compiled_blocks(renderer) -> list[str]:
    return [
        type(module).__name__
        for module in renderer.backbone.modules()
        if getattr(module, "_compiled_call_impl", None) is not None
    ]


@pytest.mark.slow
def test_checkpoint_swaps_never_recompile_and_another_rank_does_with_the_right_image(
    tiny_models, tiny_lora, caplog
) -> None:
    source = ModelSource(arch=ARCH, name_or_path=str(tiny_models[ARCH]))
    plain = load_renderer(source, device="cpu")
    compiled = load_renderer(source, device="cpu", compile=True)
    assert compiled_blocks(compiled) and not compiled_blocks(plain)
    request = sample(ARCH)
    checkpoints = [tiny_lora(ARCH, seed=seed, scale=seed / 2) for seed in (1, 2, 3)]
    other_rank = tiny_lora(ARCH, rank=8, seed=4)

    images = []
    for number, lora in enumerate(checkpoints):
        compiled.apply_lora(lora)
        images.append(render_one(compiled, request))
        if number == 0:
            after_first = graphs_compiled()
    recompiles = graphs_compiled() - after_first
    with caplog.at_level(logging.INFO, logger="sidecar.render"):
        compiled.apply_lora(other_rank)
        images.append(render_one(compiled, request))

    assert recompiles == 0  # the in-place swap keeps shapes and graph
    assert graphs_compiled() > after_first  # another rank: traced again...
    assert "recompiled" in caplog.text and other_rank.name in caplog.text  # ...and the log says so
    for lora, image in zip([*checkpoints, other_rank], images, strict=True):
        plain.apply_lora(lora)
        assert max_difference(image, render_one(plain, request)) <= MAX_DIFFERENCE, lora.name
    assert len({image.tobytes() for image in images}) == len(images)  # each LoRA shows


def test_without_a_compiler_one_warning_says_so_and_the_render_runs_uncompiled(
    tiny_models, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(compile_module, "unavailable_reason", lambda device: "no C++ compiler (a fake)")
    source = ModelSource(arch=ARCH, name_or_path=str(tiny_models[ARCH]))
    with caplog.at_level(logging.WARNING, logger="sidecar.render"):
        renderer = load_renderer(source, device="cpu", compile=True)
        image = render_one(renderer, sample(ARCH))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == ["--compile: no C++ compiler (a fake); rendering uncompiled"]
    assert not compiled_blocks(renderer) and image.shape == (64, 64, 3)


def test_sequential_offload_is_not_compiled(tiny_models, caplog) -> None:
    renderer = load_renderer(ModelSource(arch=ARCH, name_or_path=str(tiny_models[ARCH])), device="cpu")
    with caplog.at_level(logging.WARNING, logger="sidecar.render"):
        assert compile_module.compile_backbone(renderer, mode="sequential") is None
    assert "offload=sequential" in caplog.text and not compiled_blocks(renderer)


def test_a_block_inductor_cannot_build_runs_uncompiled_with_one_warning(
    tiny_models, monkeypatch, caplog
) -> None:
    """The backend's own fallback: a kernel that fails to build must not fail the render."""
    import torch._inductor.compile_fx

    def broken(graph, example_inputs):
        raise RuntimeError("cc1plus: internal compiler error (a fake)")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", broken)
    renderer = load_renderer(ModelSource(arch=ARCH, name_or_path=str(tiny_models[ARCH])), device="cpu")
    backbone = compile_module.CompiledBackbone(renderer, repeated_blocks(type(renderer.backbone)))
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    compiled = torch.compile(module, backend=backbone.inductor_or_eager)
    inputs = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger="sidecar.render"):
        assert torch.equal(compiled(inputs), module(inputs))
        compiled(torch.randn(3, 4))  # a second graph: no second warning
    assert backbone.fell_back
    assert len([r for r in caplog.records if "internal compiler error" in r.getMessage()]) == 1


def test_every_wide_architecture_has_blocks_to_compile() -> None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    for backbone in (FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel):
        assert repeated_blocks(backbone), backbone.__name__
