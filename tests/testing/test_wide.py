"""`sidecar.testing.wide`: real layer widths and module names, few blocks."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from sidecar.testing import tiny, wide


def config(folder, component: str) -> dict:
    return json.loads((folder / component / "config.json").read_text())


def shapes(folder, component: str) -> dict[str, tuple[int, ...]]:
    found = {}
    for path in (folder / component).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                found[key] = tuple(handle.get_slice(key).get_shape())
    return found


def test_build_pipeline_wide_builds_the_wide_model(monkeypatch):
    built = []
    monkeypatch.setattr(
        wide, "build_wide", lambda arch, seed: built.append((arch, seed)) or tiny.build_sdxl()
    )
    tiny.build_pipeline("flux", "wide", seed=3)
    assert built == [("flux", 3)]


def test_an_unknown_sd3_variant_is_refused():
    with pytest.raises(ValueError, match="`variant` must be one of"):
        wide.build_sd3_wide("huge")


@pytest.mark.slow
def test_wide_flux_has_flux_dev_widths_and_names(wide_model):
    folder = wide_model("flux")
    found = shapes(folder, "transformer")
    assert found["transformer_blocks.0.attn.to_q.weight"] == (3072, 3072)
    assert found["single_transformer_blocks.0.proj_mlp.weight"] == (12288, 3072)
    assert found["context_embedder.weight"] == (3072, 4096)
    assert found["time_text_embed.text_embedder.linear_1.weight"] == (3072, 768)
    assert (
        config(folder, "transformer")["num_layers"],
        config(folder, "transformer")["num_single_layers"],
    ) == (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "width"), [("medium", 1536), ("large", 2432)])
def test_wide_sd35_has_the_variants_widths(variant, width, wide_model):
    folder = wide_model("sd3", variant)
    found = shapes(folder, "transformer")
    assert found["transformer_blocks.0.attn.to_q.weight"] == (width, width)
    assert found["context_embedder.weight"] == (width, 4096)
    assert ("transformer_blocks.0.attn2.to_q.weight" in found) == (variant == "medium")


@pytest.mark.slow
def test_wide_sdxl_has_the_base_unets_channels_and_stages(wide_model):
    folder = wide_model("sdxl")
    unet = config(folder, "unet")
    assert (unet["block_out_channels"], unet["layers_per_block"]) == ([320, 640, 1280], 2)
    found = shapes(folder, "unet")
    assert found["down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 2048)
    assert found["add_embedding.linear_1.weight"] == (1280, 2816)
