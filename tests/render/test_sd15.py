"""SD 1.5: base and LoRA renders equal plain diffusers calls; its LoRAs swap in place; others are refused."""

from __future__ import annotations

import pytest
from arch_reference import check_base, check_lora, check_refused, check_swap

ARCH = "sd15"


def test_base_with_a_negative_prompt_equals_a_plain_call(tiny_arch_model):
    check_base(ARCH, tiny_arch_model(ARCH), negative_prompt="blurry, low quality")


@pytest.mark.parametrize(
    ("lora_format", "options"), [("peft", {}), ("kohya", {"text_encoder": True, "alpha": 2.0})]
)
def test_lora_equals_a_plain_call(lora_format, options, tiny_arch_model, tiny_arch_lora):
    check_lora(ARCH, tiny_arch_model(ARCH), tiny_arch_lora(ARCH, lora_format, **options), strength=0.8)


def test_the_next_checkpoint_swaps_in_place(tiny_arch_model, tiny_arch_lora):
    first, second = tiny_arch_lora(ARCH, "kohya", seed=0), tiny_arch_lora(ARCH, "kohya", seed=1)
    check_swap(ARCH, tiny_arch_model(ARCH), first, second)


def test_an_sdxl_lora_is_refused(tiny_arch_model, tiny_lora):
    check_refused(ARCH, tiny_arch_model(ARCH), tiny_lora("sdxl"), "Stable Diffusion XL")
