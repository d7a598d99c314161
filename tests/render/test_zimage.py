"""Z-Image: base and LoRA renders equal plain diffusers calls in every trainer's layout; swaps; refusals."""

from __future__ import annotations

import pytest
from arch_reference import check_base, check_batch, check_lora, check_refused, check_swap

ARCH = "zimage"


def test_base_with_a_negative_prompt_equals_a_plain_call(tiny_arch_model):
    check_base(ARCH, tiny_arch_model(ARCH), negative_prompt="blurry, low quality")


def test_turbo_settings_without_cfg_equal_a_plain_call(tiny_arch_model):
    check_base(ARCH, tiny_arch_model(ARCH), guidance_scale=1.0, steps=3)


def test_a_batch_of_prompts_of_different_lengths_equals_a_plain_call(tiny_arch_model):
    check_batch(ARCH, tiny_arch_model(ARCH))


@pytest.mark.parametrize("lora_format", ["peft", "aitoolkit", "kohya"])
def test_lora_equals_a_plain_call(lora_format, tiny_arch_model, tiny_arch_lora):
    check_lora(
        ARCH,
        tiny_arch_model(ARCH),
        tiny_arch_lora(ARCH, lora_format, alpha=2.0)
        if lora_format == "kohya"
        else tiny_arch_lora(ARCH, lora_format),
        strength=0.8,
    )


def test_the_next_checkpoint_swaps_in_place(tiny_arch_model, tiny_arch_lora):
    first, second = tiny_arch_lora(ARCH, "aitoolkit", seed=0), tiny_arch_lora(ARCH, "aitoolkit", seed=1)
    check_swap(ARCH, tiny_arch_model(ARCH), first, second)


def test_an_sdxl_lora_is_refused(tiny_arch_model, tiny_lora):
    check_refused(ARCH, tiny_arch_model(ARCH), tiny_lora("sdxl"), "Stable Diffusion XL")
