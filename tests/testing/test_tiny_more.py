"""The newer architectures' tiny models: built offline from configs, saved as diffusers folders that
load through the user's path and are recognised by their `model_index.json`."""

from __future__ import annotations

import json

import pytest
from diffusers import DiffusionPipeline

from sidecar.arch import ARCH_SPECS
from sidecar.plan.detect import detect_model_arch
from sidecar.testing.tiny import all_builders, tiny_models
from sidecar.testing.tiny_more import MORE_BUILDERS

BUILT_HERE = [arch for arch in MORE_BUILDERS if not arch.startswith("qwen_image_edit")]


@pytest.mark.parametrize("arch", BUILT_HERE)
def test_a_tiny_model_loads_as_a_diffusers_folder_and_is_detected(arch, tiny_arch_model):
    folder = tiny_arch_model(arch)
    class_name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    assert class_name == ARCH_SPECS[arch].pipeline_classes[0]
    assert detect_model_arch(folder) == (arch, "")
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    assert type(pipe).__name__ == class_name


@pytest.mark.parametrize("arch", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_qwen_edit_needs_torchvision_and_says_so(arch, tiny_arch_model):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs torchvision"):
            tiny_arch_model(arch)
    else:
        assert detect_model_arch(tiny_arch_model(arch)) == (arch, "")


def test_sidecar_tiny_builds_every_model_it_can_and_says_which_it_cannot(tmp_path, caplog, monkeypatch):
    built = {}

    def fake(arch, folder, *, size="shallow", seed=0):
        if arch.startswith("qwen_image_edit"):
            raise ImportError("Qwen2-VL's processor needs torchvision")
        built[arch] = folder
        return folder

    monkeypatch.setattr("sidecar.testing.tiny.save_tiny_model", fake)
    models = tiny_models(tmp_path)
    assert set(models) == set(all_builders()) - {"qwen_image_edit", "qwen_image_edit_plus"}
    assert "tiny qwen_image_edit not built: Qwen2-VL's processor needs torchvision" in caplog.text
    assert set(tiny_models(tmp_path, size="wide")) == {"sdxl", "sd3", "flux"}
