"""`sidecar render` and `sidecar watch` on each newer architecture, end to end on its tiny model:
the LoRA checkpoint's samples, the baseline, the step grid and the gallery (a reference image where
the model takes one)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from arch_reference import reference_image

from sidecar.app.render_cmd import render_command
from sidecar.app.watch import WatchRequest, run_watch
from sidecar.publish.infotext import read_infotext

ARCHS = ("sd15", "chroma", "flux_kontext", "flux2", "flux2_klein", "qwen_image", "zimage")


def write_config(folder: Path, arch: str, model: Path, reference: Path) -> Path:
    control = f" --ctrl_img {reference}" if arch in ("flux_kontext", "flux2") else ""
    path = folder / "train.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            job: extension
            config:
              name: my_lora
              process:
                - type: sd_trainer
                  training_folder: {folder / "output"}
                  trigger_word: sks
                  model:
                    name_or_path: {model}
                    arch: {arch}
                  sample:
                    width: 64
                    height: 64
                    sample_steps: 2
                    prompts:
                      - "a photo of [trigger] dog --n blurry{control}"
                      - "[trigger] in a forest --seed 7 --m 0.5"
            """
        )
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_render_and_watch_write_every_sample(arch, tmp_path, tiny_arch_model, tiny_arch_lora):
    lora_dir = tmp_path / "output" / "my_lora"
    lora_dir.mkdir(parents=True)
    reference = reference_image(tmp_path / "person.png", size=(96, 64))
    config = write_config(tmp_path, arch, tiny_arch_model(arch), reference)
    first = lora_dir / "my_lora_000000500.safetensors"
    first.write_bytes(tiny_arch_lora(arch).read_bytes())
    overrides = {"device": "cpu"}
    assert render_command(checkpoint=first, config_path=config, overrides=overrides) == 0
    assert render_command(checkpoint=None, config_path=config, baseline=True, overrides=overrides) == 0

    second = lora_dir / "my_lora_000001000.safetensors"
    second.write_bytes(tiny_arch_lora(arch, seed=1).read_bytes())
    request = WatchRequest(
        output_dir=lora_dir, config_path=config, overrides={**overrides, "settle_seconds": 0.0}, once=True
    )
    assert run_watch(request) == 0

    samples = lora_dir / "samples"
    for step in ("step_000000", "step_000500", "step_001000"):
        names = sorted(path.name for path in (samples / step).iterdir())
        assert names == ["grid.png", "sample_00.png", "sample_00.txt", "sample_01.png", "sample_01.txt"], step
    text = read_infotext(samples / "step_001000" / "sample_00.png")
    assert "Lora: my_lora_000001000.safetensors" in text
    assert (f"Control image: {reference}" in text) == (arch in ("flux_kontext", "flux2"))
    assert (samples / "index.html").is_file()
