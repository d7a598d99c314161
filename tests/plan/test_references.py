"""Control images in sample prompts: ai-toolkit's `--ctrl_img` and `ctrl_img_1..3`, musubi's `--ci`,
resolved from the file that names them, checked at `sidecar check` with a located error."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.plan.build import build_plan
from sidecar.plan.config import load_trainer_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"


def write_config(folder: Path, arch: str, prompts: str) -> Path:
    path = folder / "train.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            job: extension
            config:
              name: edit_lora
              process:
                - type: sd_trainer
                  model:
                    name_or_path: /models/{arch}
                    arch: {arch}
                  sample:
                    width: 64
                    height: 64
                    prompts:
            """
        )
        + textwrap.indent(textwrap.dedent(prompts), " " * 14)
    )
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "control"
    folder.mkdir()
    for name in ("person.png", "jacket.png"):
        (folder / name).write_bytes((FIXTURES / "references" / name).read_bytes())
    return folder


def test_inline_ctrl_img_and_item_keys_resolve_from_the_config_folder(tmp_path, images):
    config = write_config(
        tmp_path,
        "qwen_image_edit_plus",
        """\
        - "make the person smile --ctrl_img control/person.png"
        - prompt: "put the jacket on the person"
          ctrl_img_1: control/person.png
          ctrl_img_2: control/jacket.png
        """,
    )
    first, second = build_plan(load_trainer_config(config)).requests
    assert first.prompt == "make the person smile"
    assert first.control_images == (str(images / "person.png"),)
    assert second.control_images == (str(images / "person.png"), str(images / "jacket.png"))


def test_a_missing_control_image_is_a_located_error_at_check_time(tmp_path, images):
    config = write_config(tmp_path, "flux_kontext", '- "smile --ctrl_img control/nobody.png"\n')
    with pytest.raises(ConfigError) as caught:
        build_plan(load_trainer_config(config))
    assert str(caught.value) == (
        f"{config}:13 config.process[0].sample.prompts[0]: control image control/nobody.png does not exist "
        "(a relative path is read from the folder of the file that names it)"
    )


def test_an_unreadable_control_image_is_a_located_error(tmp_path, images):
    (images / "notes.png").write_text("not an image")
    config = write_config(tmp_path, "qwen_image_edit", "- prompt: smile\n  ctrl_img: control/notes.png\n")
    with pytest.raises(ConfigError, match=r"sample\.prompts\[0\].*notes\.png is not a readable image"):
        build_plan(load_trainer_config(config))


def test_more_control_images_than_the_model_takes_is_an_error(tmp_path, images):
    config = write_config(
        tmp_path,
        "flux_kontext",
        "- prompt: smile\n  ctrl_img_1: control/person.png\n  ctrl_img_2: control/jacket.png\n",
    )
    with pytest.raises(ConfigError, match=r"Flux\.1 Kontext takes at most 1 control image"):
        build_plan(load_trainer_config(config))


def test_a_model_without_control_images_carries_them_with_a_warning(tmp_path, images, caplog):
    config = write_config(tmp_path, "sdxl", '- "smile --ctrl_img control/nobody.png"\n')
    (request,) = build_plan(load_trainer_config(config)).requests
    assert request.control_images == ("control/nobody.png",)  # carried as written: nothing reads it
    assert "not used by Stable Diffusion XL" in caplog.text


def test_guidance_means_what_the_model_makes_of_it(tmp_path):
    """Qwen-Image: `guidance_scale` is true CFG (ai-toolkit's call), no `true_cfg_scale`; Flux.2:
    `--g` is embedded guidance as on Flux.1; Z-Image ignores `--g`."""
    plan = build_plan(load_trainer_config(write_config(tmp_path, "qwen_image", '- "a fox --l 2.5"\n')))
    assert (plan.requests[0].guidance_scale, plan.requests[0].true_cfg_scale) == (2.5, 1.0)
    plan = build_plan(load_trainer_config(write_config(tmp_path, "flux2", '- "a fox --g 3"\n')))
    assert plan.requests[0].guidance_scale == 3.0
    plan = build_plan(load_trainer_config(write_config(tmp_path, "zimage:turbo", '- "a fox --g 3"\n')))
    assert plan.requests[0].guidance_scale == 4.0  # the default: `--g` is ignored with a warning
