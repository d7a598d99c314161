"""Single-file base models offline (`sidecar.render.single_file`): shipped configs, tokenizers, placeholders.

The files are written in the original layouts (BFL, SAI, SGM key names) from the tiny models
(the wide one for Flux: diffusers' Flux single-file converter has Flux's widths built in) by
inverting diffusers' key mapping (`sidecar.testing.original_files`), and loaded through the
same `load_base_pipeline` path a user's file takes; they must render as the diffusers folder does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers_reference import render_one, sample, short_t5

from sidecar.errors import ModelError
from sidecar.render import single_file
from sidecar.render.loading import load_base_pipeline
from sidecar.render.registry import renderer_class
from sidecar.render.single_file import SINGLE_FILE_MODELS, SingleFileModel, tokenizer_folder
from sidecar.testing.original_files import write_original
from sidecar.testing.tiny import make_clip_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

PARTS = {"flux": single_file.FLUX_PARTS, "sd3": single_file.SD3_PARTS, "sdxl": single_file.SDXL_PARTS}
ENCODER_KEYS = {
    "flux": {"clip_l_path": "text_encoder", "t5_path": "text_encoder_2"},
    "sd3": {"clip_l_path": "text_encoder", "clip_g_path": "text_encoder_2", "t5_path": "text_encoder_3"},
    "sdxl": {"clip_l_path": "text_encoder", "clip_g_path": "text_encoder_2"},
}


def as_known_model(monkeypatch, folder: Path, arch: str) -> None:
    """The saved model's configs (and tokenizers) take the place of a published model's."""
    model = SingleFileModel(
        f"test-{arch}", arch, "none/none", lambda shapes: True, PARTS[arch], config=folder
    )
    monkeypatch.setattr(single_file, "SINGLE_FILE_MODELS", [model, *SINGLE_FILE_MODELS])


def single_file_renderer(folder: Path, arch: str, path: Path):
    return renderer_class(arch).from_model(
        path,
        vae_path=folder / "vae",
        text_encoder_paths={key: folder / component for key, component in ENCODER_KEYS[arch].items()},
    )


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
def test_original_layout_file_renders_as_the_diffusers_folder(arch, tiny_models, tmp_path, monkeypatch):
    folder = tiny_models[arch]
    path = write_original(folder, arch, tmp_path / f"{arch}.safetensors")
    as_known_model(monkeypatch, folder, arch)
    image = render_one(single_file_renderer(folder, arch, path), sample(arch))
    np.testing.assert_array_equal(image, render_one(renderer_class(arch).from_model(folder), sample(arch)))


@pytest.mark.slow
def test_bfl_flux_file_renders_as_the_diffusers_folder(wide_model, tmp_path, monkeypatch):
    folder = wide_model("flux")
    path = write_original(folder, "flux", tmp_path / "flux1.safetensors")
    as_known_model(monkeypatch, folder, "flux")
    short_t5(monkeypatch)
    request = sample("flux", steps=1)
    image = render_one(single_file_renderer(folder, "flux", path), request)
    np.testing.assert_array_equal(image, render_one(renderer_class("flux").from_model(folder), request))


def test_a_part_the_file_lacks_is_named_at_load(tiny_models, tmp_path, monkeypatch):
    """A denoiser-only file without `vae_path` / text-encoder paths gets placeholders, and the
    renderer refuses to load with them, naming each part and its key (not at the first render)."""
    folder = tiny_models["sd3"]
    path = write_original(folder, "sd3", tmp_path / "sd3.safetensors")
    as_known_model(monkeypatch, folder, "sd3")
    pipe = load_base_pipeline(renderer_class("sd3").pipeline_class, path, dtype=torch.float32)
    assert pipe.vae.sidecar_placeholder == "vae_path"
    with pytest.raises(ModelError) as error:
        renderer_class("sd3").from_model(path)
    assert error.value.key == "vae_path"  # the first part the pipeline lists; every one is named
    message = str(error.value)
    assert message.startswith("`model.vae_path` must be set: the single file sd3.safetensors holds no vae;")
    for key, component in {**ENCODER_KEYS["sd3"], "vae_path": "vae"}.items():
        assert f"`model.{key}` ({component})" in message
    with pytest.raises(ModelError, match=r"^`model.clip_l_path` must be set: .* holds no text_encoder;"):
        renderer_class("sd3").from_model(path, vae_path=folder / "vae")
    # The placeholder never runs: its hook stays the last guard for a pipeline loaded by hand.
    with pytest.raises(ModelError, match=r"holds no text_encoder; set `model.clip_l_path`"):
        pipe.text_encoder(torch.zeros(1, 4, dtype=torch.long))


# The published shapes that tell the models apart (tensor names without the SGM prefix).
PUBLISHED = {
    "flux1-dev": {
        "double_blocks.0.img_attn.qkv.weight": [9216, 3072],
        "guidance_in.in_layer.weight": [3072, 256],
    },
    "flux1-schnell": {"double_blocks.0.img_attn.qkv.weight": [9216, 3072]},
    "sd3.5-large": {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": [7296, 2432]},
    "sd3.5-medium": {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": [4608, 1536]},
    "sdxl-base-1.0": {"model.diffusion_model.label_emb.0.0.weight": [1280, 2816]},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_published_file_fits_exactly_one_shipped_config(name):
    assert [model.name for model in SINGLE_FILE_MODELS if model.fits(PUBLISHED[name])] == [name]


# The published sizes of the denoisers (weights and the stored position embedding), against the
# models the shipped configs build on the meta device.
PARAMETERS = {
    "flux1-dev": ("transformer", 12e9),
    "flux1-schnell": ("transformer", 12e9),
    "sd3.5-large": ("transformer", 8.1e9),
    "sd3.5-medium": ("transformer", 2.5e9),
    "sdxl-base-1.0": ("unet", 2.6e9),
}


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_shipped_configs_build_the_published_models(name):
    import diffusers

    component, count = PARAMETERS[name]
    folder = single_file.CONFIGS / name
    class_name = diffusers.DiffusionPipeline.load_config(folder)[component][1]
    model_class = getattr(diffusers, class_name)
    with torch.device("meta"):
        model = model_class.from_config(model_class.load_config(folder / component))
    size = sum(tensor.numel() for tensor in model.state_dict().values())
    assert size == pytest.approx(count, rel=0.02)


def test_missing_tokenizer_error_names_the_files_and_where_they_go(tmp_path, monkeypatch):
    monkeypatch.setenv(single_file.TOKENIZERS_ENV, str(tmp_path / "tokenizers"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    flux = next(model for model in SINGLE_FILE_MODELS if model.name == "flux1-dev")
    with pytest.raises(ModelError) as error:
        tokenizer_folder(flux, "tokenizer", "CLIPTokenizer")
    message = str(error.value)
    assert "`vocab.json` and `merges.txt`" in message
    assert str(tmp_path / "tokenizers" / "flux1-dev" / "tokenizer") in message
    assert "black-forest-labs/FLUX.1-dev" in message and "never downloads" in message


def test_tokenizer_files_are_found_in_sidecars_tokenizer_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(single_file.TOKENIZERS_ENV, str(tmp_path))
    make_clip_tokenizer().save_pretrained(tmp_path / "sdxl-base-1.0" / "tokenizer_2")
    sdxl = next(model for model in SINGLE_FILE_MODELS if model.name == "sdxl-base-1.0")
    assert (
        tokenizer_folder(sdxl, "tokenizer_2", "CLIPTokenizer") == tmp_path / "sdxl-base-1.0" / "tokenizer_2"
    )


def test_a_file_of_no_known_model_is_refused(tiny_models, tmp_path):
    path = write_original(tiny_models["flux"], "flux", tmp_path / "tiny.safetensors")
    with pytest.raises(ModelError, match="none of the models sidecar has configs for"):
        single_file.identify(path)
