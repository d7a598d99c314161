"""Every trainer's LoRA format at real layer widths, against a merged-weights reference (slow).

The wide models (`sidecar.testing.wide`) have the real widths and module names with few
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

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")]

# (arch, SD 3.5 variant): SD 3.5 large is checked where its 2432-wide layers matter, sidecar's
# kohya converter splitting the fused qkv by them.
MODELS = {"flux": "medium", "sd3": "medium", "sd3-large": "large", "sdxl": "medium"}
CASES = [
    (model, lora_format)
    for model in MODELS
    for lora_format in (["kohya"] if model == "sd3-large" else TRAINER_FORMATS[model])
    if lora_format != "eridiffusion"
]
# diffusers' own load is checked against the reference on the tiny models for every format it
# loads; here only where its converter depends on the widths.
WIDE_DIFFUSERS_CHECKS = {("flux", "kohya"), ("sdxl", "kohya_sgm")}


def arch_of(model: str) -> str:
    return model.split("-")[0]


@pytest.fixture(scope="module")
def short():
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield short_t5(monkeypatch)


@pytest.fixture(scope="module")
def bench(wide_model, short):
    """`bench(model)`: one wide model loaded at a time (the cases run grouped by model)."""
    loaded: dict[str, FormatBench] = {}

    def get(model: str) -> FormatBench:
        if model not in loaded:
            loaded.clear()  # a wide model and its reference take up to 5 GB
            arch = arch_of(model)
            folder = wide_model(arch, MODELS[model])
            request = sample(arch, steps=1)
            loaded[model] = FormatBench(folder, arch, request, short, diffusers_checks=WIDE_DIFFUSERS_CHECKS)
        return loaded[model]

    return get


@pytest.mark.parametrize(("model", "lora_format"), CASES, ids=["-".join(case) for case in CASES])
def test_format_matches_the_merged_weights(model, lora_format, bench, tmp_path, record_property):
    difference = bench(model).check(lora_format, tmp_path / f"{lora_format}.safetensors")
    record_property("max_pixel_difference", difference)


def swapped_equals_fresh(folder, first, second) -> None:
    """Apply `first` then `second`: swapped in place, with the LoRA weights of a fresh load."""
    renderer = renderer_class("flux").from_model(folder)
    renderer.apply_lora(first.path)
    assert renderer.apply_lora(second.path).hotswapped
    fresh = renderer_class("flux").from_model(folder)
    fresh.apply_lora(second.path)
    swapped = dict(renderer.pipe.transformer.named_parameters())
    for name, parameter in fresh.pipe.transformer.named_parameters():
        if ".lora_" in name:
            assert torch.equal(parameter, swapped[name]), name


@pytest.mark.parametrize(
    ("first", "second"),
    [("kohya", "kohya"), ("kohya_split_qkv", "kohya_split_qkv"), ("kohya", "kohya_split_qkv")],
)
def test_next_kohya_flux_checkpoint_swaps_in_place(first, second, wide_model, tmp_path):
    """diffusers converts kohya Flux only at Flux's widths, so its swaps are checked here. A split-qkv
    file comes as rank-r parts like a fused one; q, k and v must each keep their own down matrix."""
    folder = wide_model("flux")
    swapped_equals_fresh(
        folder,
        write_trainer_lora(folder, "flux", tmp_path / "first.safetensors", first, seed=11),
        write_trainer_lora(folder, "flux", tmp_path / "second.safetensors", second, seed=12),
    )


def test_eridiffusion_flux_file_is_refused_saying_why(wide_model, tmp_path):
    written = write_trainer_lora(wide_model("flux"), "flux", tmp_path / "eri.safetensors", "eridiffusion")
    with pytest.raises(LoraError, match="no block index"):
        renderer_class("flux").from_model(wide_model("flux")).apply_lora(written.path)
