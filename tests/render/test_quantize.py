"""`model.quantize`: the backbone in int8 (torchao), the LoRA unquantized on top, images close.

Measured on the CPU in bf16, as the weights run on a card. Bounds, each with its reason:
- stored bytes: int8 weights plus one fp32 scale and int8 zero point per output row, against
  bf16: at most half plus the per-row overhead (5 / (2 x in_features)) and the bf16 biases and
  norms left as they are; <= 0.51 on a 512-wide Flux block.
- the image: mean absolute difference <= 2 of 255 against the unquantized render (measured
  0.6 on the tiny Flux), and no pixel more than 32 off.
- the LoRA: its effect (mean difference it makes to the image) within 10 % of its effect
  without quantization (measured 0.3 %).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers_reference import render_one, sample
from peft.tuners.tuners_utils import BaseTunerLayer

from sidecar.errors import ModelError
from sidecar.plan.request import ModelSource
from sidecar.render.memory import plan_pipeline
from sidecar.render.quantize import (
    INT8,
    is_quantized,
    quantization_type,
    quantize_backbone,
    stored_bytes,
)
from sidecar.render.registry import load_renderer, renderer_class

MAX_MEAN_DIFFERENCE = 2.0  # of 255
MAX_PIXEL_DIFFERENCE = 32
LORA_EFFECT_TOLERANCE = 0.10
MAX_STORED_SHARE = 0.51


def _mean_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first.astype(np.int32) - second.astype(np.int32)).mean())


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, INT8), (False, None), (None, None), ("qfloat8", INT8), ("int8", INT8), ("FLOAT8", INT8)],
)
def test_quantization_types_of_ai_toolkit(value, expected):
    assert quantization_type(value) == expected


def test_fewer_bits_are_stored_in_8_bits_with_a_warning(caplog):
    assert quantization_type("qint4") == INT8
    assert "stores the backbone in 8 bits" in caplog.text


def test_an_unknown_type_names_the_known_ones():
    with pytest.raises(ModelError, match="qfloat8") as error:
        quantization_type("nf5")
    assert error.value.key == "quantize"


def test_stored_backbone_bytes_halve_on_a_wide_block():
    """Measured on the modules: the parts torchao stores, not the size the tensors report."""
    config = {
        "in_channels": 16,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 64,
        "num_attention_heads": 8,  # 512 wide
        "joint_attention_dim": 512,
        "pooled_projection_dim": 64,
        "axes_dims_rope": (8, 28, 28),
    }
    torch.manual_seed(0)
    module = FluxTransformer2DModel(**config).to(torch.bfloat16)
    before = stored_bytes(module)
    quantize_backbone(module, INT8)
    after = stored_bytes(module)
    assert is_quantized(module)
    assert after <= MAX_STORED_SHARE * before, f"{after} / {before} = {after / before:.3f}"


@pytest.fixture(scope="module")
def flux_pair(tiny_models):
    """(unquantized, quantized) tiny Flux renderers in bf16."""
    plain = renderer_class("flux").from_model(tiny_models["flux"], dtype=torch.bfloat16)
    quantized = renderer_class("flux").from_model(tiny_models["flux"], dtype=torch.bfloat16)
    quantize_backbone(quantized.backbone, INT8)
    return plain, quantized


def test_the_plan_counts_what_the_quantized_modules_store(flux_pair):
    _plain, quantized = flux_pair
    plan = plan_pipeline(quantized.pipe, quantize=INT8)
    assert plan.component("transformer").bytes == stored_bytes(quantized.backbone)
    assert plan.component("text_encoder_2").bytes == stored_bytes(quantized.pipe.text_encoder_2)


def test_the_image_stays_close_and_a_lora_changes_it_as_much(flux_pair, tiny_lora):
    plain, quantized = flux_pair
    request = sample("flux")
    base_plain, base_quantized = render_one(plain, request), render_one(quantized, request)
    assert _mean_difference(base_plain, base_quantized) <= MAX_MEAN_DIFFERENCE
    assert np.abs(base_plain.astype(np.int32) - base_quantized).max() <= MAX_PIXEL_DIFFERENCE

    lora = tiny_lora("flux", scale=0.5)
    plain.apply_lora(lora)
    report = quantized.apply_lora(lora)
    assert report.injected_total == plain.adapter.apply(lora).injected_total
    effect_plain = _mean_difference(render_one(plain, request), base_plain)
    effect_quantized = _mean_difference(render_one(quantized, request), base_quantized)
    assert effect_plain > 1.0  # the LoRA does something visible
    assert abs(effect_quantized - effect_plain) <= LORA_EFFECT_TOLERANCE * effect_plain

    lora_weights = [
        parameter
        for module in quantized.backbone.modules()
        if isinstance(module, BaseTunerLayer)
        for name, parameter in module.named_parameters()
        if "lora_" in name
    ]
    assert lora_weights and all(type(p.data) is torch.Tensor for p in lora_weights)  # not quantized
    assert {p.dtype for p in lora_weights} == {torch.bfloat16}


def test_the_next_checkpoint_swaps_in_place_on_a_quantized_backbone(flux_pair, tiny_lora):
    plain, quantized = flux_pair
    first, second = tiny_lora("flux", seed=1), tiny_lora("flux", seed=2)
    request = sample("flux")
    for renderer in (plain, quantized):
        renderer.apply_lora(first)
    report = quantized.apply_lora(second)
    assert report.hotswapped
    plain.apply_lora(second)
    fresh = renderer_class("flux").from_model(quantized.base_model, dtype=torch.bfloat16)
    quantize_backbone(fresh.backbone, INT8)
    fresh.apply_lora(second)
    np.testing.assert_array_equal(render_one(quantized, request), render_one(fresh, request))


def test_load_renderer_quantizes_the_backbone_as_the_config_asks(tiny_models):
    source = ModelSource(arch="flux", name_or_path=str(tiny_models["flux"]), quantize="qfloat8")
    renderer = load_renderer(source, device="cpu", dtype="bf16")
    assert is_quantized(renderer.backbone)
    assert not is_quantized(renderer.pipe.text_encoder_2)  # text encoders and VAE stay as they are
    assert renderer.placement.plan.quantize == INT8
    plain = load_renderer(ModelSource(arch="flux", name_or_path=str(tiny_models["flux"])), device="cpu")
    assert not is_quantized(plain.backbone)
