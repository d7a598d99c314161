"""FLUX.2 [dev] and [klein]: renders equal plain diffusers calls (embedded guidance; Klein's CFG with a
negative), LoRAs in every trainer's layout, swaps, refusals, reference images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from arch_reference import (
    check_base,
    check_lora,
    check_refused,
    check_swap,
    new_renderer,
    plain_call,
    reference_image,
    render_one,
    sample,
)

ARCHS = ("flux2", "flux2_klein")


@pytest.mark.parametrize("arch", ARCHS)
def test_base_equals_a_plain_call(arch, tiny_arch_model):
    check_base(arch, tiny_arch_model(arch))


def test_klein_with_a_negative_prompt_equals_a_plain_call(tiny_arch_model):
    check_base("flux2_klein", tiny_arch_model("flux2_klein"), negative_prompt="blurry, low quality")


def test_reference_images_equal_a_plain_call(tiny_arch_model, tmp_path):
    folder = tiny_arch_model("flux2")
    references = (  # Flux.2's image processor takes 64 px or more on each side
        str(reference_image(tmp_path / "a.png", (96, 64))),
        str(reference_image(tmp_path / "b.png", (64, 80))),
    )
    request = sample("flux2", control_images=references)
    got = render_one(new_renderer("flux2", folder), request)
    np.testing.assert_array_equal(got, plain_call(folder, "flux2", [request])[0])
    assert got.shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("arch", "lora_format"),
    [
        ("flux2", "peft"),
        ("flux2", "aitoolkit"),
        ("flux2", "kohya"),
        ("flux2_klein", "peft"),
        ("flux2_klein", "aitoolkit"),
    ],
)
def test_lora_equals_a_plain_call(arch, lora_format, tiny_arch_model, tiny_arch_lora):
    check_lora(arch, tiny_arch_model(arch), tiny_arch_lora(arch, lora_format), strength=0.8)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_next_checkpoint_swaps_in_place(arch, tiny_arch_model, tiny_arch_lora):
    check_swap(arch, tiny_arch_model(arch), tiny_arch_lora(arch, seed=0), tiny_arch_lora(arch, seed=1))


def test_an_sdxl_lora_is_refused(tiny_arch_model, tiny_lora):
    check_refused("flux2", tiny_arch_model("flux2"), tiny_lora("sdxl"), "Stable Diffusion XL")


def test_a_flux2_lora_is_refused_on_flux1_kontext(tiny_arch_model, tiny_arch_lora):
    check_refused("flux_kontext", tiny_arch_model("flux_kontext"), tiny_arch_lora("flux2"), "Flux.2")


@pytest.mark.parametrize("arch", ["flux2", "qwen_image", "chroma"])
def test_a_single_file_base_of_a_model_without_shipped_configs_is_a_model_error(arch, tmp_path):
    """Single files load offline only with sidecar's shipped configs (`render/single_file.py`); the
    newer models' have none yet, and the error says what to point at instead."""
    from safetensors.torch import save_file

    from sidecar.errors import ModelError
    from sidecar.render.registry import renderer_class

    single = tmp_path / "model.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, str(single))
    with pytest.raises(ModelError, match="point `name_or_path` at a diffusers folder instead"):
        renderer_class(arch).from_model(single)
