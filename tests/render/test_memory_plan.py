"""The memory plan, from safetensors headers alone: sizes, peaks per mode, and `auto`'s pick.

The published models are sparse files (`published_models.py`): the real header of every
component of Flux-dev, SD 3.5 large and SDXL, their data a hole. Their sizes must match the
Hub's listed file sizes within 2 %; the plan's choice for 12, 16 and 24 GB cards is the
README's "what fits where" table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from published_models import PUBLISHED_BYTES, meta_shapes, write_sparse_model, write_sparse_safetensors

from sidecar.cli import main
from sidecar.errors import ModelError
from sidecar.render.memory import plan_pipeline
from sidecar.render.memory_plan import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    GIB,
    choose,
    format_plan,
    needed_bytes,
    parse_size,
    plan_memory,
)
from sidecar.render.model_sizes import split_single_file
from sidecar.render.registry import renderer_class
from sidecar.weights import read_header

PUBLISHED_TOLERANCE = 0.02
CARDS_GIB = (12, 16, 24)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("published")
    return {arch: write_sparse_model(arch, root / arch) for arch in ("flux", "sd3", "sdxl")}


def _card(plan, size_gib: int):
    """`auto` on a card of `size_gib` GiB, as `--vram` plans it."""
    return choose(plan, size_gib * GIB - CUDA_CONTEXT_BYTES, label=f"a {size_gib} GiB card")


@pytest.mark.parametrize("arch", ["flux", "sd3", "sdxl"])
def test_sparse_files_are_whole_and_use_no_disk(published, arch):
    files = list(published[arch].rglob("*.safetensors"))
    header = read_header(max(files, key=lambda path: path.stat().st_size))  # whole: size matches the header
    assert header.data_bytes > 100 * 1024**2
    assert sum(path.stat().st_blocks * 512 for path in files) < 64 * 1024**2  # holes, not data


@pytest.mark.parametrize("arch", ["flux", "sd3", "sdxl"])
def test_component_sizes_match_the_published_files(published, arch):
    """bf16 plan bytes against the Hub's bf16 / fp16 file sizes (2 bytes a parameter either way)."""
    plan = plan_memory(arch, str(published[arch]), dtype="bf16")
    for name, expected in PUBLISHED_BYTES[arch].items():
        got = plan.component(name).bytes
        assert abs(got - expected) <= PUBLISHED_TOLERANCE * expected, f"{name}: {got} vs {expected}"


def test_flux_dev_in_numbers(published):
    plan = plan_memory("flux", str(published["flux"]), dtype="bf16")
    transformer = plan.component("transformer")
    assert (
        round(transformer.parameters / 1e9, 1) == 11.9
    )  # "a 12 billion parameter rectified flow transformer"
    assert plan.component("text_encoder_2").bytes > 9 * 1000**3  # T5-XXL, ~9.5 GB
    # One of the 57 blocks at a time under group offload; one Linear under sequential.
    assert transformer.group_bytes < transformer.bytes / 20
    assert transformer.layer_bytes < 200 * 1024**2
    quantized = plan_memory("flux", str(published["flux"]), dtype="bf16", quantize="int8")
    share = quantized.component("transformer").bytes / transformer.bytes
    assert 0.5 < share < 0.52  # int8 Linear weights; norms, biases and embedders stay bf16
    fp32 = plan_memory("flux", str(published["flux"]), dtype="fp32")
    assert fp32.component("transformer").bytes == 2 * transformer.bytes


# The README's "what fits where" table: (mode, text encoders on the CPU) on 12, 16, 24 GB cards.
WHAT_FITS_WHERE = {
    ("flux", None): [("group", False), ("group", False), ("group", False)],
    ("flux", "int8"): [("group", False), ("none", True), ("none", False)],
    ("sd3", None): [("group", False), ("group", False), ("none", True)],
    ("sd3", "int8"): [("none", True), ("none", True), ("none", False)],
    ("sdxl", None): [("none", False), ("none", False), ("none", False)],
}


@pytest.mark.parametrize(("arch", "quantize"), list(WHAT_FITS_WHERE))
def test_what_fits_where(published, arch, quantize):
    """`auto`'s pick on 12, 16 and 24 GB cards, as the README's table says."""
    plan = plan_memory(arch, str(published[arch]), dtype="bf16", quantize=quantize)
    picks = [_card(plan, size).chosen for size in CARDS_GIB]
    assert [(pick.mode, pick.encoders_on_cpu) for pick in picks] == WHAT_FITS_WHERE[arch, quantize]


def test_the_chosen_mode_fits_and_every_faster_one_does_not(published):
    plan = plan_memory("flux", str(published["flux"]), dtype="bf16")
    card = _card(plan, 16)
    free = 16 * GIB - CUDA_CONTEXT_BYTES
    assert needed_bytes(card.chosen) <= free
    assert needed_bytes(card.chosen) == int(card.chosen.peak_bytes * (1 + ALLOCATOR_SLACK))
    faster = [e for e in plan.estimates if (e.mode, e.encoders_on_cpu) < (card.chosen.mode, True)]
    assert all(needed_bytes(e) > free for e in faster if e.mode != card.chosen.mode)
    assert "none would need 35.0 GiB at encode" in card.reason
    assert card.chosen.mode in format_plan(card)


def test_low_vram_never_picks_none(published):
    plan = plan_memory("sdxl", str(published["sdxl"]), dtype="bf16", low_vram=True)
    card = _card(plan, 24)
    assert card.chosen.mode == "model"
    assert "low_vram" in card.reason and "low_vram" in format_plan(card)


def test_larger_samples_and_batches_need_more(published):
    small = plan_memory("flux", str(published["flux"]), dtype="bf16")
    large = plan_memory("flux", str(published["flux"]), dtype="bf16", pixels=2048 * 2048, batch_size=2)
    for mode in ("none", "model"):
        assert large.estimate(mode).peak_bytes > small.estimate(mode).peak_bytes


def test_a_single_file_is_split_by_its_prefixes(tmp_path, published):
    """SDXL as `sd_xl_base_1.0.safetensors` holds all four components under ldm prefixes."""
    prefixes = {
        "unet": "model.diffusion_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
        "vae": "first_stage_model.",
    }
    shapes = {}
    for component, prefix in prefixes.items():
        header = read_header(next((published["sdxl"] / component).glob("*.safetensors")))
        import torch

        for name, info in header.tensors.items():
            shapes[prefix + name] = (info.shape, torch.float16)
    single = write_sparse_safetensors(tmp_path / "sd_xl_base_1.0.safetensors", shapes)
    parts = split_single_file(read_header(single).tensors, "sdxl")
    assert set(parts) == set(prefixes)
    from_file = plan_memory("sdxl", str(single), dtype="bf16")
    from_folder = plan_memory("sdxl", str(published["sdxl"]), dtype="bf16")
    for name in prefixes:
        assert from_file.component(name).bytes == from_folder.component(name).bytes


def test_separate_files_replace_the_base_components(tmp_path, published):
    import torch

    small_vae = write_sparse_safetensors(
        tmp_path / "vae.safetensors", {"decoder.conv.weight": ((3, 3), torch.float32)}
    )
    plan = plan_memory("flux", str(published["flux"]), vae_path=str(small_vae), dtype="bf16")
    assert plan.component("vae").bytes == 9 * 2
    with pytest.raises(ModelError) as error:
        plan_memory(
            "flux", str(published["flux"]), text_encoder_paths={"t5_path": str(tmp_path / "no.safetensors")}
        )
    assert error.value.key == "t5_path"


def test_a_model_that_is_not_there_is_a_model_error(tmp_path):
    with pytest.raises(ModelError) as error:
        plan_memory("flux", str(tmp_path / "missing"))
    assert error.value.key == "name_or_path"


@pytest.mark.parametrize("text", ["12GiB", "12G", "12 gb", "12288MiB", "11.5gib"])
def test_sizes(text):
    assert abs(parse_size(text) - 12 * GIB) <= GIB // 2


def test_a_bad_size_is_refused():
    with pytest.raises(ValueError, match="`--vram` must be a size"):
        parse_size("lots")


@pytest.mark.parametrize("arch", ["sdxl", "sd3", "flux"])
def test_the_files_plan_equals_the_loaded_modules_plan(tiny_models, arch):
    """`sidecar check` (headers) and `--offload auto` (loaded modules) see the same numbers."""
    from_files = plan_memory(arch, str(tiny_models[arch]), dtype="fp32")
    loaded = renderer_class(arch).from_model(tiny_models[arch])
    from_modules = plan_pipeline(loaded.pipe)
    assert [c.bytes for c in from_files.components] == [c.bytes for c in from_modules.components]
    assert from_files.estimates == from_modules.estimates


def _config(tmp_path: Path, model: Path, *, arch: str = "flux", extra: str = "") -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(
        "job: extension\nconfig:\n  name: run\n  process:\n    - type: sd_trainer\n"
        f"      model:\n        name_or_path: {json.dumps(str(model))}\n        arch: {arch}\n{extra}"
        "      network:\n        linear: 32\n"
        "      sample:\n        prompts: ['a photo']\n        width: 1024\n        height: 1024\n"
    )
    return path


def test_sidecar_check_vram_prints_the_plan_on_a_machine_without_cuda(tmp_path, published, capsys):
    config = _config(tmp_path, published["flux"], extra="        quantize: true\n")
    assert main(["check", str(config), "--vram", "16GiB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan (bf16, backbone in int8 weights" in out
    assert "transformer" in out and "text_encoder_2" in out and "rank 32" in out
    assert "auto on a 16.0 GiB card: none, text encoders encode on the CPU and stay there" in out


def test_sidecar_check_without_a_card_prints_the_peaks(tmp_path, published, capsys):
    assert main(["check", str(_config(tmp_path, published["sdxl"], arch="sdxl"))]) == 0
    out = capsys.readouterr().out
    assert "sequential" in out and "give --gpu N or --vram SIZE" in out


def test_sidecar_check_with_a_missing_model(tmp_path, capsys):
    config = _config(tmp_path, tmp_path / "nowhere")
    assert main(["check", str(config)]) == 0
    assert "memory plan: not made" in capsys.readouterr().out
    assert main(["check", str(config), "--vram", "12G"]) == 2  # asked for a plan: located error
    with pytest.raises(SystemExit) as bad_size:  # argparse refuses it, exit code 2
        main(["check", str(config), "--vram", "twelve"])
    assert bad_size.value.code == 2


def test_meta_shapes_store_tied_weights_once():
    from published_models import _t5

    shapes = meta_shapes(_t5, __import__("torch").bfloat16)
    assert "shared.weight" in shapes and "encoder.embed_tokens.weight" not in shapes


def test_the_configs_log_format_takes_effect_from_the_first_line(tmp_path, capsys):
    """`sidecar.log_format: json` in the config: the error `check` logs is a JSON line."""
    config = _config(tmp_path, tmp_path / "nowhere")
    config.write_text(config.read_text() + "sidecar:\n  log_format: json\n")
    assert main(["check", str(config), "--vram", "12G"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert json.loads(lines[-1])["level"] == "error"
