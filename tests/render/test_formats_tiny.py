"""Every trainer's LoRA format on the tiny models, against a merged-weights reference (fast).

The file is written in the trainer's own key names (`sidecar.testing.trainer_loras`), its
change to each layer computed from the format's definition and added to a copy of the base
weights (`diffusers_reference.merged_render`). sidecar's image must match that render within
2/255 and both must differ from the base. The wide models (`test_formats_<arch>.py`) repeat
this at real widths; here the same converters run at tiny widths, which they must not care
about (diffusers' kohya Flux converter does: those formats are tested wide only).
"""

from __future__ import annotations

import numpy as np
import pytest
from diffusers_reference import (
    FormatBench,
    merged_render,
    render_one,
    sample,
    short_t5,
)

from sidecar.errors import LoraError
from sidecar.render.registry import renderer_class
from sidecar.testing.trainer_loras import TRAINER_FORMATS, write_trainer_lora

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

WIDE_ONLY = {("flux", "kohya"), ("flux", "kohya_split_qkv"), ("flux", "kohya_te")}  # diffusers' widths
REFUSED = {("sdxl", "eridiffusion"), ("flux", "eridiffusion")}
CASES = [
    (arch, lora_format)
    for arch, formats in TRAINER_FORMATS.items()
    for lora_format in formats
    if (arch, lora_format) not in WIDE_ONLY | REFUSED
]


@pytest.fixture(scope="module")
def short(tiny_models):
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield short_t5(monkeypatch)


@pytest.fixture(scope="module")
def benches(tiny_models, short):
    made: dict[str, FormatBench] = {}

    def get(arch: str) -> FormatBench:
        if arch not in made:
            made[arch] = FormatBench(tiny_models[arch], arch, sample(arch), short)
        return made[arch]

    return get


@pytest.mark.parametrize(("arch", "lora_format"), CASES, ids=["-".join(case) for case in CASES])
def test_format_matches_the_merged_weights(arch, lora_format, benches, tmp_path, record_property):
    record_property(
        "max_pixel_difference", benches(arch).check(lora_format, tmp_path / f"{lora_format}.safetensors")
    )


SWAP_CASES = [case for case in CASES if case[1] != "lycoris_locon"] + [("sdxl", "lycoris_locon")]


@pytest.mark.parametrize(("arch", "lora_format"), SWAP_CASES, ids=["-".join(case) for case in SWAP_CASES])
def test_next_checkpoint_swaps_and_equals_a_fresh_load(arch, lora_format, tiny_models, short, tmp_path):
    """Same keys and shapes, new values: swapped without a reload where the file has no
    text-encoder weights, and always the image of a renderer that loaded only the second file."""
    folder = tiny_models[arch]
    first = write_trainer_lora(folder, arch, tmp_path / "first.safetensors", lora_format, seed=11)
    second = write_trainer_lora(folder, arch, tmp_path / "second.safetensors", lora_format, seed=12)
    renderer = renderer_class(arch).from_model(folder)
    renderer.apply_lora(first.path)
    first_image = render_one(renderer, sample(arch))
    report = renderer.apply_lora(second.path)
    if not report.lora.has_text_encoder:
        assert report.hotswapped, "the next checkpoint of a run was loaded again instead of swapped"
    swapped = render_one(renderer, sample(arch))
    fresh = renderer_class(arch).from_model(folder)
    fresh.apply_lora(second.path)
    np.testing.assert_array_equal(swapped, render_one(fresh, sample(arch)))
    assert not np.array_equal(swapped, first_image)


STRENGTH_CASES = [
    ("sdxl", "lycoris_loha"),
    ("flux", "lycoris_lokr_full"),
    ("sd3", "kohya"),
    ("flux", "kohya_te"),
]


@pytest.mark.parametrize(
    ("arch", "lora_format"), STRENGTH_CASES[:3], ids=["-".join(c) for c in STRENGTH_CASES[:3]]
)
def test_strength_scales_lycoris_and_t5_adapters_as_the_merged_weights(
    arch, lora_format, tiny_models, benches, short, tmp_path
):
    """LyCORIS networks and SD 3.5's T5 adapter take the strength outside diffusers' LoRA scale."""
    folder = tiny_models[arch]
    written = write_trainer_lora(folder, arch, tmp_path / "lora.safetensors", lora_format)
    renderer = renderer_class(arch).from_model(folder)
    renderer.apply_lora(written.path)
    half, zero = sample(arch, strength=0.5), sample(arch, index=1, strength=0.0)
    ours_half = render_one(renderer, half)
    np.testing.assert_array_equal(render_one(renderer, zero), benches(arch).base)
    merged_half = merged_render(folder, arch, half, written, **short)
    assert np.abs(ours_half.astype(int) - merged_half.astype(int)).max() <= 2
    assert not np.array_equal(ours_half, benches(arch).base)


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("flux", r"fit no valid LoRA layout: they name module kinds .*`img_attn`.* with no block index"),
        ("sdxl", r"fit no valid LoRA layout: each names a weight tensor, not a layer .*\.weight\.lora_down"),
    ],
    ids=["flux", "sdxl"],
)
def test_eridiffusion_files_are_refused_saying_why(arch, message, tiny_models, tmp_path):
    written = write_trainer_lora(tiny_models[arch], arch, tmp_path / "eri.safetensors", "eridiffusion")
    renderer = renderer_class(arch).from_model(tiny_models[arch])
    with pytest.raises(LoraError, match=message):
        renderer.apply_lora(written.path)
    assert renderer.lora is None
