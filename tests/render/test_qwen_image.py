"""Qwen-Image: renders equal plain diffusers calls (true CFG, ai-toolkit's always-present negative, padded
batches); LoRAs in every trainer's layout; swaps; refusals. The Edit variants need torchvision."""

from __future__ import annotations

import pytest
from arch_reference import (
    check_base,
    check_batch,
    check_lora,
    check_refused,
    check_swap,
    plain_call,
    reference_image,
    render_one,
    sample,
)

ARCH = "qwen_image"


def test_base_equals_a_plain_call_with_the_empty_negative(tiny_arch_model):
    check_base(ARCH, tiny_arch_model(ARCH))


def test_base_with_a_negative_prompt_equals_a_plain_call(tiny_arch_model):
    check_base(ARCH, tiny_arch_model(ARCH), negative_prompt="blurry, low quality", guidance_scale=2.5)


def test_a_batch_of_prompts_of_different_lengths_equals_a_plain_call(tiny_arch_model):
    check_batch(ARCH, tiny_arch_model(ARCH))


@pytest.mark.parametrize("lora_format", ["peft", "aitoolkit", "kohya"])
def test_lora_equals_a_plain_call(lora_format, tiny_arch_model, tiny_arch_lora):
    check_lora(ARCH, tiny_arch_model(ARCH), tiny_arch_lora(ARCH, lora_format), strength=0.8)


def test_the_next_checkpoint_swaps_in_place(tiny_arch_model, tiny_arch_lora):
    first, second = tiny_arch_lora(ARCH, "kohya", seed=0), tiny_arch_lora(ARCH, "kohya", seed=1)
    check_swap(ARCH, tiny_arch_model(ARCH), first, second)


def test_an_sdxl_lora_is_refused(tiny_arch_model, tiny_lora):
    check_refused(ARCH, tiny_arch_model(ARCH), tiny_lora("sdxl"), "Stable Diffusion XL")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_edit_with_a_reference_equals_a_plain_call(arch, tiny_arch_model, tmp_path):
    """The pipeline takes the reference to ~1 MP for its VAE whatever the sample's size: slow on CPU."""
    pytest.importorskip("torchvision", reason="transformers' Qwen2-VL processor needs torchvision")
    from arch_reference import new_renderer

    folder = tiny_arch_model(arch)
    request = sample(arch, control_images=(str(reference_image(tmp_path / "ref.png")),), width=64, height=48)
    got = render_one(new_renderer(arch, folder), request)
    assert got.shape == (48, 64, 3)
    assert (got == plain_call(folder, arch, [request])[0]).all()


def test_its_language_model_is_a_text_encoder_the_placement_moves(tiny_arch_model):
    """Qwen-Image (like Flux.2 and Z-Image) has no `model:` key for a separate text-encoder file, yet
    its Qwen2.5-VL must leave the card once prompts are cached, as CLIP and T5 do."""
    from sidecar.plan.request import ModelSource
    from sidecar.render.registry import load_renderer

    renderer = load_renderer(ModelSource(arch=ARCH, name_or_path=str(tiny_arch_model(ARCH))), device="cpu")
    assert renderer.encoder_components == ("text_encoder",)
    assert renderer.placement.encoder_names == ("text_encoder",)
