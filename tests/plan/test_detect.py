"""sidecar/plan/detect.py: a base model's architecture, read from the model itself without loading it."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sidecar.arch import ARCH_SPECS
from sidecar.errors import ConfigError
from sidecar.plan.config import load_trainer_config
from sidecar.plan.detect import detect_model_arch, resolve_arch
from sidecar.plan.locator import YamlLocator
from sidecar.plan.models import ModelConfig
from sidecar.weights import read_header


def test_arch_from_diffusers_folder(tmp_path: Path) -> None:
    folder = tmp_path / "sd35"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert detect_model_arch(folder) == ("sd3", "")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    arch, reason = detect_model_arch(folder)
    assert arch is None and "HunyuanVideoPipeline" in reason
    assert detect_model_arch(tmp_path)[1] == "a folder without model_index.json"


def test_arch_from_safetensors_written_by_numpy(tmp_path: Path) -> None:
    path = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": np.zeros(2, dtype=np.float16)}, str(path))
    assert list(read_header(path).tensors) == ["conditioner.embedders.1.model.ln_final.weight"]
    assert detect_model_arch(path) == ("sdxl", "")


def test_arch_from_hand_written_safetensors_header(tmp_path: Path) -> None:
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": {
                "dtype": "BF16",
                "shape": [2, 2],
                "data_offsets": [0, 8],
            },
        }
    ).encode()
    path = tmp_path / "flux1-dev.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    assert detect_model_arch(path) == ("flux", "")
    config_path = tmp_path / "train.yaml"
    config_path.write_text("model: {name_or_path: flux1-dev.safetensors}\nsample: {prompts: [a]}\n")
    assert load_trainer_config(config_path).arch == "flux"


def test_unreadable_safetensors_is_an_unknown_arch(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x01\x02")
    arch, reason = detect_model_arch(path)
    assert arch is None and reason.startswith("not a readable safetensors file")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle")
    assert detect_model_arch(ckpt) == (None, "only .safetensors single files can be inspected")


def test_arch_from_hub_id_in_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--acme--tiny-xl"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert detect_model_arch("acme/tiny-xl") == ("sdxl", "")
    assert detect_model_arch("acme/not-cached")[0] is None


def test_a_missing_path_that_is_no_hub_id_says_so() -> None:
    assert detect_model_arch("/no/such/model") == (None, "no such file or folder")


LOCATOR = YamlLocator(
    "train.yaml", {"": 1, "model": 2, "model.is_flux": 3, "model.is_v3": 4, "model.arch": 5}
)


@pytest.mark.parametrize(
    ("fields", "arch"),
    [
        ({"arch": "sdxl"}, "sdxl"),
        ({"arch": "flux", "is_flux": True}, "flux"),
        ({"is_v3": True}, "sd3"),
        ({"is_xl": True}, "sdxl"),
        ({"is_sdxl": True, "is_xl": True}, "sdxl"),
    ],
)
def test_resolve_arch_from_the_key_or_the_flags(fields: dict, arch: str) -> None:
    """`arch`, then the `is_*` flags; the model files are not looked at when either is set."""
    model = ModelConfig(name_or_path="/no/such/model", **fields)
    assert resolve_arch(model, LOCATOR, "") == arch


def test_resolve_arch_refuses_conflicting_keys_naming_them() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_arch(ModelConfig(name_or_path="m", is_flux=True, is_v3=True), LOCATOR, "")
    assert str(caught.value) == (
        "train.yaml:4 model.is_v3: conflicts with `is_flux: true`; "
        "set only one of is_flux, is_v3, is_sdxl (or `arch`)"
    )
    with pytest.raises(
        ConfigError, match=re.escape("train.yaml:5 model.arch: is 'sdxl' but `is_flux: true` says 'flux'")
    ):
        resolve_arch(ModelConfig(name_or_path="m", arch="sdxl", is_flux=True), LOCATOR, "")


def test_resolve_arch_reads_the_model_when_nothing_says(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert resolve_arch(ModelConfig(name_or_path=str(tmp_path)), LOCATOR, "") == "flux"
    with pytest.raises(ConfigError) as caught:
        resolve_arch(ModelConfig(name_or_path="/no/such/model"), LOCATOR, "")
    assert str(caught.value) == (
        "train.yaml:2 model: cannot tell the architecture of '/no/such/model' (no such file or folder); "
        "set `model.arch` to one of " + ", ".join(ARCH_SPECS)
    )
