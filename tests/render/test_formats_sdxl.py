"""Every SDXL LoRA format at real layer widths, against a merged-weights reference (slow).

The wide model (`sidecar.testing.wide`) has the real widths and module names with few
blocks; each trainer's file is written in its own key names, its change computed from the
format's definition and merged into a copy of the weights (`diffusers_reference`), and
sidecar's render must match that merged render within 2/255 while both differ from the base.
One denoising step: the widths, not the step count, are under test.
"""

from __future__ import annotations

import pytest
from diffusers_reference import FormatBench, sample, short_t5

from sidecar.testing.trainer_loras import TRAINER_FORMATS

ARCH = "sdxl"
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")]
FORMATS = [lora_format for lora_format in TRAINER_FORMATS[ARCH] if lora_format != "eridiffusion"]
REQUEST = sample(ARCH, steps=1)
# diffusers' own load is checked against the reference on the tiny models for every format it
# loads; here only where its converter depends on the widths.
WIDE_DIFFUSERS_CHECKS = {("sdxl", "kohya_sgm")}


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
