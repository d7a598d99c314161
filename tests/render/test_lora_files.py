"""`sidecar.lora`: format and architecture from LoRA files as trainers write them, and apply checks.

The files come from `sidecar.tiny.write_lora`, which writes each trainer's key layout for
the tiny models; the module counts below follow from those models' shapes.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sidecar.arch import ARCH_SPECS, guess_lora_arch
from sidecar.errors import CheckpointError, LoraError
from sidecar.plan.request import SampleRequest
from sidecar.render.adapters.lora_files import (
    LoraFile,
    check_applied,
    detect_format,
    expected_modules,
    inspect_lora,
)
from sidecar.render.registry import renderer_class
from sidecar.testing.loras import LORA_FORMATS

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

WRITER_CASES = tuple((arch, fmt) for arch in ("sdxl", "sd3", "flux") for fmt in LORA_FORMATS[arch])
FORMAT_NAMES = {"peft": "peft", "kohya": "kohya", "kohya_sgm": "kohya", "unprefixed": "unprefixed"}

# LoRA modules in the files `write_lora` writes for the shallow tiny models:
# - SDXL UNet: 4 attention projections x 2 attentions (attn1, attn2) per transformer block;
#   down_blocks.1: 2 attentions x 2 blocks, mid: 1 x 2, up_blocks.0: 3 x 2 -> 12 blocks, 96;
# - SDXL text encoders: q/k/v/out of 2 layers -> 8 each;
# - SD 3.5: to_q/k/v/out of 2 transformer blocks -> 8 (kohya: fused qkv and proj -> 4);
# - Flux (PEFT): 1 double block (q/k/v/out) + 1 single block (q/k/v; it has no to_out) -> 7;
# - Flux (kohya): 1 double block (img and txt: qkv, proj) + 1 single block (linear2) -> 5.
MODULE_COUNTS = {
    ("sdxl", "peft"): 96,
    ("sdxl", "kohya"): 96,
    ("sdxl", "kohya_sgm"): 96,
    ("sdxl", "unprefixed"): 96,
    ("sd3", "peft"): 8,
    ("sd3", "kohya"): 4,
    ("sd3", "unprefixed"): 8,
    ("flux", "peft"): 7,
    ("flux", "kohya"): 5,
    ("flux", "unprefixed"): 7,
}
TEXT_ENCODER_MODULES = 16  # SDXL: 8 in each CLIP


def case_id(case: tuple) -> str:
    return "-".join(case)


def file_keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


# ---------------------------------------------------------------------------------
# inspect_lora, detect_format, guess_lora_arch on every writer's files
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "lora_format"), WRITER_CASES, ids=[case_id(case) for case in WRITER_CASES])
def test_inspect_lora_reads_format_count_and_keys_of_each_writer(arch, lora_format, tiny_lora):
    path = tiny_lora(arch, lora_format)
    keys = file_keys(path)
    lora = inspect_lora(path)
    assert isinstance(lora, LoraFile)
    assert lora.path == path
    assert lora.format == FORMAT_NAMES[lora_format]
    assert detect_format(keys) == lora.format
    assert lora.module_count == MODULE_COUNTS[arch, lora_format]
    assert lora.has_text_encoder is False
    assert lora.first_keys == tuple(sorted(keys)[:3])


# Key names that only one architecture has; the others fit several (or none) and give None.
ARCH_FROM_NAMES = {
    ("sdxl", "peft"): "sdxl",
    ("sdxl", "kohya"): "sdxl",
    ("sdxl", "kohya_sgm"): "sdxl",
    ("sdxl", "unprefixed"): None,  # `down_blocks.…` without `unet.`: SD 1.5 has those too
    ("sd3", "kohya"): "sd3",  # `joint_blocks`
    ("flux", "peft"): "flux",  # `single_transformer_blocks`
    ("flux", "kohya"): "flux",  # `double_blocks`
    ("flux", "unprefixed"): "flux",
}


@pytest.mark.parametrize(("arch", "lora_format"), WRITER_CASES, ids=[case_id(case) for case in WRITER_CASES])
def test_guess_arch_names_the_writers_architecture_or_none_never_another(arch, lora_format, tiny_lora):
    lora = inspect_lora(tiny_lora(arch, lora_format))
    assert lora.arch_guess in (arch, None)
    if (arch, lora_format) in ARCH_FROM_NAMES:
        assert lora.arch_guess == ARCH_FROM_NAMES[arch, lora_format]
    assert guess_lora_arch(file_keys(lora.path)) == lora.arch_guess


@pytest.mark.parametrize("lora_format", ["peft", "kohya", "kohya_sgm"])
def test_text_encoder_modules_are_counted_and_flagged(lora_format, tiny_lora):
    lora = inspect_lora(tiny_lora("sdxl", lora_format, text_encoder=True))
    assert lora.has_text_encoder is True
    assert lora.module_count == MODULE_COUNTS["sdxl", lora_format] + TEXT_ENCODER_MODULES
    assert lora.arch_guess == "sdxl"


@pytest.mark.parametrize(("arch", "lora_format"), WRITER_CASES, ids=[case_id(case) for case in WRITER_CASES])
def test_header_metadata_is_kept(arch, lora_format, tiny_lora):
    """Trainers store their step and settings in the header; kohya-style files keep alpha in tensors,
    diffusers' own writer in `lora_adapter_metadata`."""
    trainer_metadata = {"ss_steps": "250", "ss_network_dim": "4", "ss_network_alpha": "2.0"}
    lora = inspect_lora(tiny_lora(arch, lora_format, alpha=2.0, metadata=trainer_metadata))
    assert trainer_metadata.items() <= lora.metadata.items()
    if lora_format == "peft":
        adapter = json.loads(lora.metadata["lora_adapter_metadata"])  # `{component}.{setting}` keys
        denoiser = "unet" if arch == "sdxl" else "transformer"
        assert (adapter[f"{denoiser}.r"], adapter[f"{denoiser}.lora_alpha"]) == (4, 2.0)


# ---------------------------------------------------------------------------------
# Files that are not LoRAs
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x.ckpt", "x.pt", "x.pth", "x.bin", "x.pkl", "X.CKPT"])
def test_pickle_suffix_is_refused_before_the_file_is_opened(name, tmp_path):
    """The file does not exist: a CheckpointError (not FileNotFoundError) shows it was never opened."""
    with pytest.raises(CheckpointError, match="pickle") as error:
        inspect_lora(tmp_path / name)
    assert "safetensors" in str(error.value)


@pytest.mark.parametrize(
    ("damage", "cut"),
    [
        ("truncated", lambda data: data[: len(data) // 2]),
        ("header-only", lambda data: data[:20]),
        ("garbage", lambda data: b"\xff" * 64),
        ("empty", lambda data: b""),
    ],
    ids=["truncated", "header-only", "garbage", "empty"],
)
def test_unreadable_safetensors_raises_checkpoint_error(damage, cut, tmp_path, tiny_lora):
    path = tmp_path / f"{damage}.safetensors"
    path.write_bytes(cut(tiny_lora("sdxl").read_bytes()))
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as error:
        inspect_lora(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "tensors",
    [{}, {"conv_in.weight": torch.zeros(2, 2), "optimizer.state.0": torch.zeros(1)}],
    ids=["no-tensors", "base-model-tensors"],
)
def test_safetensors_without_lora_keys_raises_checkpoint_error(tensors, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="holds no LoRA weights"):
        inspect_lora(path)


def test_missing_file_raises_checkpoint_error(tmp_path):
    """A pruned checkpoint is a recorded failure, not a crash."""
    with pytest.raises(CheckpointError, match="no such file"):
        inspect_lora(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------
# detect_format, guess_lora_arch, expected_modules on key lists
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["unet.a.lora_A.weight", "unet.a.lora_B.weight", "text_encoder.b.lora_A.weight"], "peft"),
        (["lora_unet_a.lora_down.weight", "lora_unet_a.alpha", "lora_te1_b.lora_down.weight"], "kohya"),
        (["lora_transformer_a.lora_down.weight"], "kohya"),
        (["diffusion_model.a.lora_down.weight", "diffusion_model.a.lora_up.weight"], "comfyui"),
        (["lora_unet_a.hada_w1_a", "lora_unet_a.hada_w1_b"], "lycoris"),
        (["lora_unet_a.lokr_w1", "lora_unet_a.alpha"], "lycoris"),
        (["a.lora_A.weight", "a.lora_B.weight"], "unprefixed"),
        (["unet.a.lora_A.weight", "b.lora_A.weight"], "unprefixed"),  # mixed: not all peft
        (["conv_in.weight", "a.lora_B.weight"], None),  # up matrices alone are no LoRA module
        ([], None),
    ],
    ids=[
        "peft",
        "kohya",
        "kohya-transformer",
        "comfyui",
        "lycoris-loha",
        "lycoris-lokr",
        "unprefixed",
        "mixed",
        "no-down-keys",
        "empty",
    ],
)
def test_detect_format(keys, expected):
    assert detect_format(keys) == expected


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], "flux"),
        (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "flux"),
        (["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], "sd3"),
        (["unet.down_blocks.1.attentions.0.proj_in.lora_A.weight"], "sdxl"),
        (["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "sdxl"),
        (
            [
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                "lora_unet_input_blocks_4_1_x.lora_down.weight",
            ],
            None,
        ),
        (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], None),  # SD 3.5 or Flux
    ],
    ids=["flux-peft", "flux-kohya", "sd3-kohya", "sdxl-peft", "sdxl-te2", "two-architectures", "ambiguous"],
)
def test_guess_lora_arch(keys, expected):
    assert guess_lora_arch(keys) == expected


@pytest.mark.parametrize(
    ("arch", "lora_format", "text_encoder", "expected"),
    [
        ("sdxl", "peft", False, {"unet": 96}),
        ("sdxl", "kohya", True, {"unet": 96, "text_encoder": 8, "text_encoder_2": 8}),
        ("sdxl", "kohya_sgm", True, {"unet": 96, "text_encoder": 8, "text_encoder_2": 8}),
        ("sdxl", "peft", True, {"unet": 96, "text_encoder": 8, "text_encoder_2": 8}),
        ("sd3", "peft", False, {"transformer": 8}),
        ("flux", "peft", False, {"transformer": 7}),
        ("flux", "kohya", False, {"transformer": 9}),  # the fused qkv splits into q, k and v
    ],
    ids=[
        "sdxl-peft",
        "sdxl-kohya-te",
        "sdxl-kohya_sgm-te",
        "sdxl-peft-te",
        "sd3-peft",
        "flux-peft",
        "flux-kohya",
    ],
)
def test_expected_modules_counts_diffusers_converted_state_dict(
    arch, lora_format, text_encoder, expected, tiny_lora
):
    path = tiny_lora(arch, lora_format, text_encoder=text_encoder)
    converted = renderer_class(arch).pipeline_class.lora_state_dict(str(path))
    state_dict = converted[0] if isinstance(converted, tuple) else converted
    assert expected_modules(state_dict) == expected


def test_expected_modules_puts_keys_without_a_component_prefix_under_unmapped():
    state_dict = {"unet.a.lora_A.weight": 0, "unet.a.lora_B.weight": 0, "b.lora_down.weight": 0, "c.alpha": 0}
    assert expected_modules(state_dict) == {"unet": 1, "unmapped": 1}


# ---------------------------------------------------------------------------------
# check_applied
# ---------------------------------------------------------------------------------


def lora_file(**changes) -> LoraFile:
    fields = {
        "path": "run/step_100.safetensors",
        "format": "peft",
        "arch_guess": None,
        "module_count": 12,
        "has_text_encoder": False,
        "first_keys": ("unet.a.lora_A.weight",),
        "metadata": {},
    }
    fields.update(changes)
    return LoraFile(**fields)


@pytest.mark.parametrize(
    ("changes", "expected", "hint"),
    [
        ({"arch_guess": "flux"}, {"transformer": 12}, "key names are those of a Flux.1 LoRA"),
        ({"format": "unprefixed"}, {}, "no `unet.` / `transformer.` prefix"),
        ({"format": "kohya"}, {"unmapped": 12}, "no converter for kohya keys on Stable Diffusion XL"),
        ({}, {"unet": 12}, "matched a layer of the Stable Diffusion XL base model"),
    ],
    ids=["other-architecture", "unprefixed", "no-converter", "no-hint"],
)
def test_check_applied_raises_when_nothing_applied(changes, expected, hint):
    lora = lora_file(**changes)
    with pytest.raises(LoraError) as error:
        check_applied(lora, expected, {}, arch="sdxl")
    message = str(error.value)
    assert "did not apply: 0 of 12 LoRA modules" in message
    assert hint in message
    assert "run/step_100.safetensors" in message
    assert "`unet.a.lora_A.weight`" in message


def test_check_applied_raises_when_another_architectures_lora_half_applies():
    """SD 3.5 and Flux share layer names: a Flux LoRA can match some SD 3.5 layers by name."""
    lora = lora_file(
        arch_guess="flux", first_keys=("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",)
    )
    with pytest.raises(
        LoraError, match=r"this is a Flux\.1 LoRA .* but the base model is Stable Diffusion 3\.5; 4 layers"
    ):
        check_applied(lora, {"transformer": 7}, {"transformer": 4}, arch="sd3")


def test_check_applied_warns_naming_the_component_when_part_did_not_apply(caplog):
    with caplog.at_level(logging.WARNING, logger="sidecar.render"):
        check_applied(
            lora_file(), {"unet": 10, "text_encoder": 2}, {"unet": 7, "text_encoder": 2}, arch="sdxl"
        )
    (record,) = caplog.records
    assert "only 7 of 10 LoRA modules for unet applied" in record.getMessage()


def test_check_applied_is_silent_when_everything_applied(caplog):
    with caplog.at_level(logging.DEBUG, logger="sidecar.render"):
        check_applied(lora_file(), {"unet": 10}, {"unet": 10}, arch="sdxl")
    assert caplog.records == []


# ---------------------------------------------------------------------------------
# Alpha: kept from the file, against diffusers loading the same file
# ---------------------------------------------------------------------------------

ATTENTION_KWARGS = {
    "sdxl": "cross_attention_kwargs",
    "sd3": "joint_attention_kwargs",
    "flux": "joint_attention_kwargs",
}


def request(arch: str) -> SampleRequest:
    spec = ARCH_SPECS[arch]
    return SampleRequest(
        index=0,
        prompt="a red fox in the snow",
        negative_prompt="",
        width=64,
        height=64,
        steps=2,
        guidance_scale=spec.default_guidance,
        true_cfg_scale=1.0,
        sampler="euler" if arch == "sdxl" else "flowmatch",
        seed=7,
        strength=1.0,
    )


def our_image(folder, arch, lora) -> np.ndarray:
    renderer = renderer_class(arch).from_model(folder)
    renderer.apply_lora(lora)
    ((_, image),) = renderer.render([request(arch)])
    return np.asarray(image)


def plain_image(folder, arch, lora) -> np.ndarray:
    """diffusers with `lora` (a path or a state dict); SDXL's scheduler is already Euler."""
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora if isinstance(lora, dict) else str(lora), adapter_name="reference")
    sample = request(arch)
    image = pipe(
        prompt=sample.prompt,
        negative_prompt=None,
        height=sample.height,
        width=sample.width,
        num_inference_steps=sample.steps,
        guidance_scale=sample.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(sample.seed)],
        **{ATTENTION_KWARGS[arch]: {"scale": 1.0}},
    ).images[0]
    return np.asarray(image)


ALPHA_CASES = (("sdxl", "peft"), ("sdxl", "kohya"), ("sd3", "peft"), ("flux", "peft"), ("flux", "kohya"))


@pytest.mark.parametrize(("arch", "lora_format"), ALPHA_CASES, ids=[case_id(case) for case in ALPHA_CASES])
def test_alpha_below_rank_is_applied_as_diffusers_applies_it_from_the_file(
    arch, lora_format, tiny_models, tiny_lora
):
    folder = tiny_models[arch]
    half = tiny_lora(arch, lora_format, rank=4, alpha=2.0)
    full = tiny_lora(arch, lora_format, rank=4, alpha=4.0)  # same matrices (same seed), scale 1
    ours = our_image(folder, arch, half)
    assert not np.array_equal(ours, our_image(folder, arch, full)), "alpha changed nothing"
    np.testing.assert_array_equal(ours, plain_image(folder, arch, half))


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_loading_a_peft_lora_from_a_state_dict_loses_its_alpha(arch, tiny_models, tiny_lora):
    """Why sidecar loads LoRAs from the path: diffusers takes `lora_alpha` from the header, which a
    state dict does not carry, so alpha falls back to the rank. If this starts failing, diffusers
    changed and the reason in `Renderer.apply_lora`'s docstring is gone."""
    folder = tiny_models[arch]
    half = tiny_lora(arch, "peft", rank=4, alpha=2.0)
    full = tiny_lora(arch, "peft", rank=4, alpha=4.0)
    from_dict = plain_image(folder, arch, load_file(str(half)))
    assert not np.array_equal(from_dict, plain_image(folder, arch, half))
    np.testing.assert_array_equal(from_dict, plain_image(folder, arch, full))
