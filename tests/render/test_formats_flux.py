"""Every Flux LoRA format at real layer widths, against a merged-weights reference (slow).

The wide model (`sidecar.testing.wide`) has the real widths and module names with few
blocks; each trainer's file is written in its own key names, its change computed from the
format's definition and merged into a copy of the weights (`diffusers_reference`), and
sidecar's render must match that merged render within 2/255 while both differ from the base.
One denoising step and short T5 prompts: the widths, not the step count, are under test.
"""

from __future__ import annotations

import pytest
import torch
from diffusers_reference import FormatBench, sample, short_t5

from sidecar.errors import LoraError
from sidecar.render.registry import renderer_class
from sidecar.testing.trainer_loras import TRAINER_FORMATS, write_trainer_lora

ARCH = "flux"
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")]
FORMATS = [lora_format for lora_format in TRAINER_FORMATS[ARCH] if lora_format != "eridiffusion"]
REQUEST = sample(ARCH, steps=1)
# diffusers' own load is checked against the reference on the tiny models for every format it
# loads; here only where its converter depends on the widths.
WIDE_DIFFUSERS_CHECKS = {("flux", "kohya")}


@pytest.fixture(scope="module")
def short():
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield short_t5(monkeypatch)


@pytest.fixture(scope="module")
def bench(wide_model, short) -> FormatBench:
    return FormatBench(wide_model(ARCH), ARCH, REQUEST, short, diffusers_checks=WIDE_DIFFUSERS_CHECKS)


@pytest.mark.parametrize("lora_format", FORMATS)
def test_format_matches_the_merged_weights(lora_format, bench, tmp_path, record_property):
    record_property("max_pixel_difference", bench.check(lora_format, tmp_path / f"{lora_format}.safetensors"))


@pytest.mark.parametrize("lora_format", ["kohya", "kohya_split_qkv"])
def test_next_kohya_checkpoint_swaps_in_place(lora_format, wide_model, short, tmp_path, monkeypatch):
    """diffusers converts kohya Flux only at Flux's real widths: the swap is checked here, wide."""
    folder = wide_model(ARCH)
    first = write_trainer_lora(folder, ARCH, tmp_path / "first.safetensors", lora_format, seed=11)
    second = write_trainer_lora(folder, ARCH, tmp_path / "second.safetensors", lora_format, seed=12)
    renderer = renderer_class(ARCH).from_model(folder)
    renderer.apply_lora(first.path)
    monkeypatch.setattr(renderer.pipe, "load_lora_weights", lambda *a, **k: pytest.fail("loaded again"))
    report = renderer.apply_lora(second.path)
    assert report.hotswapped
    weights = dict(renderer.pipe.transformer.named_parameters())
    fresh = renderer_class(ARCH).from_model(folder)
    fresh.apply_lora(second.path)
    for name, parameter in fresh.pipe.transformer.named_parameters():
        if ".lora_" in name:
            assert torch.equal(parameter, weights[name]), name


def test_eridiffusion_flux_file_is_refused_saying_why(wide_model, tmp_path):
    written = write_trainer_lora(wide_model(ARCH), ARCH, tmp_path / "eri.safetensors", "eridiffusion")
    with pytest.raises(LoraError, match="no block index"):
        renderer_class(ARCH).from_model(wide_model(ARCH)).apply_lora(written.path)


def test_swap_from_kohya_to_its_split_qkv_variant_equals_a_fresh_load(wide_model, short, tmp_path):
    """diffusers gives a split-qkv file rank-r parts, as a fused one: the swap copies in place, and
    q, k and v must each get their own down matrix (diffusers loads a fused one as one tensor)."""
    folder = wide_model(ARCH)
    fused = write_trainer_lora(folder, ARCH, tmp_path / "fused.safetensors", "kohya", seed=11)
    split = write_trainer_lora(folder, ARCH, tmp_path / "split.safetensors", "kohya_split_qkv", seed=12)
    renderer = renderer_class(ARCH).from_model(folder)
    renderer.apply_lora(fused.path)
    assert renderer.apply_lora(split.path).hotswapped
    fresh = renderer_class(ARCH).from_model(folder)
    fresh.apply_lora(split.path)
    swapped = dict(renderer.pipe.transformer.named_parameters())
    for name, parameter in fresh.pipe.transformer.named_parameters():
        if ".lora_" in name:
            assert torch.equal(parameter, swapped[name]), name
