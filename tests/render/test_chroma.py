"""Chroma: base and LoRA renders equal plain diffusers calls (CFG with the T5 mask); swaps; refusals."""

from __future__ import annotations

import numpy as np
import pytest
from arch_reference import (
    check_base,
    check_batch,
    check_lora,
    check_refused,
    check_swap,
    new_renderer,
    plain_call,
    render_one,
    sample,
)

ARCH = "chroma"


def test_base_with_a_negative_prompt_equals_a_plain_call(tiny_arch_model):
    check_base(ARCH, tiny_arch_model(ARCH), negative_prompt="blurry, low quality")


def test_a_batch_equals_a_plain_call_with_a_list_of_prompts(tiny_arch_model):
    check_batch(ARCH, tiny_arch_model(ARCH))


@pytest.mark.parametrize("lora_format", ["peft", "kohya"])
def test_lora_equals_a_plain_call(lora_format, tiny_arch_model, tiny_arch_lora):
    check_lora(ARCH, tiny_arch_model(ARCH), tiny_arch_lora(ARCH, lora_format), strength=0.8)


def test_the_next_checkpoint_swaps_in_place(tiny_arch_model, tiny_arch_lora):
    check_swap(ARCH, tiny_arch_model(ARCH), tiny_arch_lora(ARCH, seed=0), tiny_arch_lora(ARCH, seed=1))


def test_an_sdxl_lora_is_refused(tiny_arch_model, tiny_lora):
    check_refused(ARCH, tiny_arch_model(ARCH), tiny_lora("sdxl"), "Stable Diffusion XL")


def test_a_flux2_lora_is_refused(tiny_arch_model, tiny_arch_lora):
    check_refused(ARCH, tiny_arch_model(ARCH), tiny_arch_lora("flux2", "peft"), "Flux.2")


def test_an_aitoolkit_lora_equals_a_plain_call_with_its_kohya_twin(tiny_arch_model, tiny_arch_lora):
    """ai-toolkit saves Chroma LoRAs in BFL names under `diffusion_model.` (for ComfyUI), which
    diffusers' Flux loader leaves unconverted; sidecar converts them as on Flux.1. The reference:
    the same factors in kohya's names, which diffusers converts."""
    folder = tiny_arch_model(ARCH)
    renderer = new_renderer(ARCH, folder)
    assert renderer.apply_lora(tiny_arch_lora(ARCH, "aitoolkit")).injected_total > 0
    request = sample(ARCH, strength=0.8)
    twin = tiny_arch_lora(ARCH, "kohya")  # the same seed: the same factors, alpha = rank
    np.testing.assert_array_equal(
        render_one(renderer, request), plain_call(folder, ARCH, [request], lora=twin)[0]
    )
