"""FLUX.1 Kontext: the reference image, resized to the sample's size, and the sample's own width and
height (not the pipeline's ~1 MP); renders equal plain diffusers calls; LoRAs; refusals."""

from __future__ import annotations

import numpy as np
import pytest
from arch_reference import (
    check_base,
    check_lora,
    check_refused,
    check_swap,
    max_difference,
    new_renderer,
    plain_call,
    reference_image,
    render_one,
    sample,
)

ARCH = "flux_kontext"


def test_without_a_reference_equals_a_plain_call(tiny_arch_model):
    check_base(ARCH, tiny_arch_model(ARCH))


def test_a_reference_keeps_the_samples_size_and_equals_a_plain_call(tiny_arch_model, tmp_path):
    folder = tiny_arch_model(ARCH)
    reference = str(reference_image(tmp_path / "person.png", size=(80, 48)))
    request = sample(ARCH, control_images=(reference,), width=48, height=64)
    renderer = new_renderer(ARCH, folder)
    got = render_one(renderer, request)
    assert got.shape == (64, 48, 3)  # the sample's size, not the reference's nor ~1 MP
    np.testing.assert_array_equal(got, plain_call(folder, ARCH, [request])[0])
    other = str(reference_image(tmp_path / "other.png", color=(10, 200, 40)))
    assert max_difference(
        got, render_one(renderer, sample(ARCH, control_images=(other,), width=48, height=64))
    )


@pytest.mark.parametrize("lora_format", ["peft", "kohya"])
def test_lora_equals_a_plain_call(lora_format, tiny_arch_model, tiny_arch_lora, tmp_path):
    reference = str(reference_image(tmp_path / "person.png"))
    check_lora(ARCH, tiny_arch_model(ARCH), tiny_arch_lora(ARCH, lora_format), control_images=(reference,))


def test_a_flux1_lora_applies_and_the_next_checkpoint_swaps_in_place(tiny_arch_model, tiny_arch_lora):
    check_swap(ARCH, tiny_arch_model(ARCH), tiny_arch_lora(ARCH, seed=0), tiny_arch_lora(ARCH, seed=1))


def test_an_sdxl_lora_is_refused(tiny_arch_model, tiny_lora):
    check_refused(ARCH, tiny_arch_model(ARCH), tiny_lora("sdxl"), "Stable Diffusion XL")
