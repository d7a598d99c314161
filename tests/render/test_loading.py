"""sidecar.render.loading: base models and their separate files, offline, errors naming the key."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sidecar.errors import ModelError
from sidecar.render.registry import renderer_class


@pytest.fixture(scope="module")
def flux_renderer(tiny_models):
    return renderer_class("flux").from_model(tiny_models["flux"])


def test_separate_text_encoder_files_replace_the_bases_own(tmp_path, tiny_models, flux_renderer):
    """ComfyUI-style files: CLIP-L with transformers' names, T5 under an SD3-style prefix."""
    base = flux_renderer.pipe
    t5 = {
        f"text_encoders.t5xxl.transformer.{k}": v.clone() for k, v in base.text_encoder_2.state_dict().items()
    }
    t5 = {k: v + 1 if k.endswith("final_layer_norm.weight") else v for k, v in t5.items()}
    save_file(t5, str(tmp_path / "t5xxl.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in base.text_encoder.state_dict().items()},
        str(tmp_path / "clip_l.safetensors"),
    )

    renderer = renderer_class("flux").from_model(
        tiny_models["flux"],
        text_encoder_paths={
            "t5_path": tmp_path / "t5xxl.safetensors",
            "clip_l_path": tmp_path / "clip_l.safetensors",
        },
    )
    loaded = renderer.pipe.text_encoder_2.encoder.final_layer_norm.weight
    assert torch.equal(loaded, base.text_encoder_2.encoder.final_layer_norm.weight + 1)
    for name, tensor in base.text_encoder.state_dict().items():
        assert torch.equal(renderer.pipe.text_encoder.state_dict()[name], tensor), name


def test_a_text_encoder_file_that_does_not_fit_names_key_and_tensor(tmp_path, tiny_models, flux_renderer):
    t5 = flux_renderer.pipe.text_encoder_2.state_dict()
    save_file({k: v.clone() for k, v in t5.items() if k != "shared.weight"}, str(tmp_path / "t5.safetensors"))
    with pytest.raises(
        ModelError, match=r"`model.clip_l_path` .*t5.safetensors: does not fit the base's CLIPTextModel"
    ):
        renderer_class("flux").from_model(
            tiny_models["flux"], text_encoder_paths={"clip_l_path": tmp_path / "t5.safetensors"}
        )


def test_a_key_the_architecture_does_not_use_is_refused(tmp_path, tiny_models):
    with pytest.raises(
        ModelError, match=r"`model.clip_g_path` is not used by Flux.1; it takes `model.clip_l_path`"
    ):
        renderer_class("flux").from_model(
            tiny_models["flux"], text_encoder_paths={"clip_g_path": tmp_path / "x"}
        )


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("runs/missing-folder/inside", r"`model.name_or_path` no such file or folder"),
        (
            "some-org/not-in-the-cache",
            r"no such file or folder, nor a hub id in the local cache .* never downloads",
        ),
        ("empty", r"is a folder without model_index.json"),
        (
            "model.ckpt",
            r"`model.name_or_path` model.ckpt: `.ckpt` files are pickles, which sidecar never loads",
        ),
    ],
    ids=["missing-path", "uncached-hub-id", "folder-without-model-index", "pickle"],
)
def test_base_model_errors_name_the_key(tmp_path, monkeypatch, source, match):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match=match) as info:
        renderer_class("sdxl").from_model(source)
    assert str(info.value).startswith("`model.name_or_path` "), info.value


def test_missing_vae_file_names_its_key(tmp_path, tiny_models):
    with pytest.raises(ModelError, match=r"`model.vae_path` no such file or folder"):
        renderer_class("sdxl").from_model(tiny_models["sdxl"], vae_path=tmp_path / "vae.safetensors")


def test_a_vae_folder_replaces_the_bases_vae(tiny_models):
    renderer = renderer_class("sdxl").from_model(tiny_models["sdxl"], vae_path=tiny_models["sdxl"] / "vae")
    assert renderer.pipe.vae.config.latent_channels == 4


# --- pickled weights are never loaded ---------------------------------------------------------


def _with_pickled_unet(source, folder):
    """A copy of a tiny diffusers folder whose UNet is a pickle (`diffusion_pytorch_model.bin`) only."""
    shutil.copytree(source, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(unet)), folder / "unet" / "diffusion_pytorch_model.bin")
    unet.unlink()
    return folder


def test_a_folder_with_only_pickled_weights_is_refused_saying_why_and_how_to_convert(tmp_path, tiny_models):
    folder = _with_pickled_unet(tiny_models["sdxl"], tmp_path / "pickled-sdxl")
    with pytest.raises(ModelError) as info:
        renderer_class("sdxl").from_model(folder)
    message = str(info.value)
    assert message.startswith("`model.name_or_path` ")
    assert "unet/diffusion_pytorch_model.bin" in message
    assert "never loads (unpickling can run arbitrary code)" in message
    assert "save_pretrained" in message and f"{folder}-safetensors" in message


def test_a_vae_folder_with_only_pickled_weights_is_refused(tmp_path, tiny_models):
    vae = shutil.copytree(tiny_models["sdxl"] / "vae", tmp_path / "vae")
    weights = vae / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), vae / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelError, match=r"`model.vae_path` .*vae holds pickled weights only"):
        renderer_class("sdxl").from_model(tiny_models["sdxl"], vae_path=vae)


def test_loading_asks_diffusers_for_safetensors_only(tmp_path, tiny_models, monkeypatch):
    """Beside the refusal above: diffusers itself is told never to fall back to a pickle."""
    from diffusers import StableDiffusionXLPipeline

    seen: dict[str, object] = {}
    original = StableDiffusionXLPipeline.from_pretrained.__func__  # type: ignore[attr-defined]

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", classmethod(spy))
    renderer_class("sdxl").from_model(tiny_models["sdxl"])
    assert seen.get("use_safetensors") is True
