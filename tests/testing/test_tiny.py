"""`sidecar.tiny`: the tiny models are real diffusers models, deterministic, and the LoRA
writers produce files diffusers loads onto the layers they name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from sidecar.arch import ARCH_SPECS
from sidecar.testing import tiny
from sidecar.testing.loras import LORA_FORMATS, linear_shapes, sgm_unet_name, write_lora
from sidecar.testing.tiny import (
    CLIP_MAX_LENGTH,
    build_pipeline,
    make_clip_tokenizer,
    make_t5_tokenizer,
    save_tiny_model,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

ARCHS = ("sdxl", "sd3", "flux")


def load(folder) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of every model component, as `component.parameter`."""
    tensors = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for key, value in component.state_dict().items():
                tensors[f"{name}.{key}"] = value
    return tensors


def same_weights(first, second) -> bool:
    a, b = weights(first), weights(second)
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def render(pipe, *, seed: int = 0, **options) -> np.ndarray:
    image = pipe(
        prompt="a red fox",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(seed),
        **options,
    ).images[0]
    return np.asarray(image)


def lora_layers(pipe) -> dict[str, int]:
    """Layers per component that carry an adapter."""
    counts = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            count = sum(
                1
                for module in component.modules()
                if isinstance(module, BaseTunerLayer) and len(module.lora_A) > 0
            )
            if count:
                counts[name] = count
    return counts


# ---------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_loads_through_diffusers_and_renders(arch, tiny_models):
    pipe = load(tiny_models[arch])
    assert type(pipe).__name__ == ARCH_SPECS[arch].pipeline_classes[0]
    assert pipe.vae_scale_factor == 8
    image = render(pipe)
    assert image.shape == (64, 64, 3)
    assert image.std() > 1.0, "a flat image"
    np.testing.assert_array_equal(render(pipe), image)  # same seed, same image
    assert not np.array_equal(render(pipe, seed=1), image)


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_are_deterministic_per_seed(arch):
    first = build_pipeline(arch, seed=0)
    assert same_weights(first, build_pipeline(arch, seed=0))
    assert not same_weights(first, build_pipeline(arch, seed=1))


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_holds_the_built_model_in_eval_mode(arch, tiny_models):
    built = build_pipeline(arch, seed=0)
    assert same_weights(load(tiny_models[arch]), built)
    for component in built.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training


def test_save_tiny_model_reuses_a_complete_folder(tmp_path, monkeypatch):
    folder = save_tiny_model("flux", tmp_path / "flux")
    assert (folder / "model_index.json").is_file()
    assert not (tmp_path / "flux.partial").exists()

    def no_build(*arguments, **options):
        raise AssertionError("the model was built again")

    monkeypatch.setattr(tiny, "build_pipeline", no_build)
    assert save_tiny_model("flux", tmp_path / "flux") == folder


def test_build_pipeline_rejects_an_unknown_architecture():
    with pytest.raises(ValueError, match=r"`arch` must be one of .*'sd2'"):
        build_pipeline("sd2")


def block_counts(pipe, arch: str) -> dict[str, object]:
    te2 = pipe.text_encoder_2.config
    counts: dict[str, object] = {
        "text_encoder": pipe.text_encoder.config.num_hidden_layers,
        "text_encoder_2": getattr(te2, "num_hidden_layers", None) if arch != "flux" else te2.num_layers,
    }
    if arch == "sdxl":
        counts["down_blocks"] = len(pipe.unet.down_blocks)
        counts["transformer_layers"] = tuple(pipe.unet.config.transformer_layers_per_block)
    elif arch == "sd3":
        counts["blocks"] = len(pipe.transformer.transformer_blocks)
        counts["dual_attention"] = len(pipe.transformer.config.dual_attention_layers)
        counts["t5"] = pipe.text_encoder_3.config.num_layers
    else:
        counts["double"] = len(pipe.transformer.transformer_blocks)
        counts["single"] = len(pipe.transformer.single_transformer_blocks)
    return counts


# The real block counts: SDXL base, SD 3.5 medium (MMDiT-X), Flux.1 dev; CLIP-L 12, bigG 32, T5-XXL 24.
DEEP_COUNTS = {
    "sdxl": {"text_encoder": 12, "text_encoder_2": 32, "down_blocks": 3, "transformer_layers": (1, 2, 10)},
    "sd3": {"text_encoder": 12, "text_encoder_2": 32, "blocks": 24, "dual_attention": 13, "t5": 24},
    "flux": {"text_encoder": 12, "text_encoder_2": 24, "double": 19, "single": 38},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_deep_variant_has_the_real_block_counts(arch):
    pipe = build_pipeline(arch, "deep")
    assert block_counts(pipe, arch) == DEEP_COUNTS[arch]
    assert pipe.vae_scale_factor == 8


def test_tokenizers_fit_the_text_encoders():
    clip = make_clip_tokenizer()
    assert clip.model_max_length == CLIP_MAX_LENGTH
    ids = clip("a cat")["input_ids"]
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert len(ids) == len("a cat") - 1 + 2  # one token per character, the space is a word break
    t5 = make_t5_tokenizer()
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5("a cat")["input_ids"][-1] == t5.eos_token_id


# ---------------------------------------------------------------------------------
# LoRA files
# ---------------------------------------------------------------------------------

LORA_CASES = tuple((arch, fmt) for arch in ARCHS for fmt in LORA_FORMATS[arch])
# What diffusers loads from each file: adapter layers per component. Unprefixed keys, and
# kohya keys on SD 3.5, load without an error and inject nothing.
INJECTED = {
    ("sdxl", "peft"): {"unet": 96},
    ("sdxl", "kohya"): {"unet": 96},
    ("sdxl", "kohya_sgm"): {"unet": 96},
    ("sdxl", "unprefixed"): {},
    ("sd3", "peft"): {"transformer": 8},
    ("sd3", "kohya"): {},  # diffusers alone; sidecar converts them (`render/adapters/convert_kohya.py`)
    ("sd3", "unprefixed"): {},
    ("flux", "peft"): {"transformer": 7},
    ("flux", "kohya"): {"transformer": 9},  # fused qkv: three layers each
    ("flux", "unprefixed"): {},
}


@pytest.mark.parametrize(("arch", "lora_format"), LORA_CASES, ids=["-".join(case) for case in LORA_CASES])
def test_lora_file_loads_into_diffusers_onto_the_layers_it_names(arch, lora_format, tiny_models, tiny_lora):
    pipe = load(tiny_models[arch])
    pipe.load_lora_weights(str(tiny_lora(arch, lora_format)), adapter_name="test")
    assert lora_layers(pipe) == INJECTED[arch, lora_format]


def test_text_encoder_lora_targets_both_sdxl_text_encoders(tiny_models, tiny_lora):
    pipe = load(tiny_models["sdxl"])
    pipe.load_lora_weights(str(tiny_lora("sdxl", "kohya", text_encoder=True)), adapter_name="test")
    assert lora_layers(pipe) == {"unet": 96, "text_encoder": 8, "text_encoder_2": 8}


def test_same_sdxl_lora_in_every_format_renders_the_same_image(tiny_models, tiny_lora):
    """peft, kohya and kohya_sgm hold the same matrices (same seed, alpha = rank) under their
    own names, so a wrong SGM block number or prefix shows as a different image."""
    images = {}
    for lora_format in ("peft", "kohya", "kohya_sgm"):
        pipe = load(tiny_models["sdxl"])
        pipe.load_lora_weights(str(tiny_lora("sdxl", lora_format)), adapter_name="test")
        images[lora_format] = render(pipe)
    base = render(load(tiny_models["sdxl"]))
    assert not np.array_equal(images["peft"], base)
    for lora_format in ("kohya", "kohya_sgm"):
        difference = np.abs(images[lora_format].astype(np.int16) - images["peft"].astype(np.int16)).max()
        assert difference == 0, f"{lora_format} differs from peft by {difference}"


@pytest.mark.parametrize(("alpha", "expected"), [(None, 4.0), (2.0, 2.0)], ids=["default-rank", "explicit"])
def test_kohya_lora_stores_alpha_per_module(alpha, expected, tiny_lora):
    tensors = load_file(str(tiny_lora("sdxl", "kohya", alpha=alpha)))
    alphas = [value for key, value in tensors.items() if key.endswith(".alpha")]
    downs = [key for key in tensors if key.endswith(".lora_down.weight")]
    assert len(alphas) == len(downs) == 96
    assert {float(value) for value in alphas} == {expected}
    assert {tensors[key].shape for key in downs} >= {torch.Size([4, 64])}  # rank 4 rows
    assert {tensors[key].shape[0] for key in downs} == {4}


def test_write_lora_rejects_a_format_the_architecture_has_not(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="`lora_format` for flux must be one of"):
        write_lora(tiny_models["flux"], "flux", tmp_path / "x.safetensors", lora_format="kohya_sgm")


def test_linear_shapes_are_the_loaded_modules_shapes(tiny_models):
    pipe = load(tiny_models["sdxl"])
    shapes = linear_shapes(tiny_models["sdxl"], "unet")
    modules = dict(pipe.unet.named_modules())
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # cross-attention: in = text width
    assert shapes[name] == (modules[name].out_features, modules[name].in_features) == (64, 64)
    assert all(len(shape) == 2 for shape in shapes.values())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        ),
        ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
        (
            "down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_k",
            "input_blocks.7.1.transformer_blocks.9.attn2.to_k",
        ),
        (
            "mid_block.attentions.0.transformer_blocks.1.attn1.to_v",
            "middle_block.1.transformer_blocks.1.attn1.to_v",
        ),
        (
            "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0",
            "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0",
        ),
        ("up_blocks.1.attentions.0.proj_out", "output_blocks.3.1.proj_out"),
    ],
)
def test_sgm_unet_name_follows_sdxls_original_layout(name, expected):
    assert sgm_unet_name(name, {"layers_per_block": 2}) == expected


def test_sgm_unet_name_rejects_a_module_outside_the_attentions():
    with pytest.raises(ValueError, match="no SGM name"):
        sgm_unet_name("conv_in", {"layers_per_block": 2})
