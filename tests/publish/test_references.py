"""An edit model's samples name their control images in the PNG metadata, and the gallery shows
them as the first column of their row (thumbnails made inside the samples folder only)."""

from __future__ import annotations

from pathlib import Path

from factories import sample_request
from PIL import Image

from sidecar.publish.files import write_sample
from sidecar.publish.gallery import THUMBS_DIR, build_gallery
from sidecar.publish.infotext import infotext, parse_infotext, read_infotext

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs" / "references"


def kontext_request(index: int, *references: Path):
    return sample_request(
        index=index,
        sampler="flowmatch",
        guidance_scale=2.5,
        control_images=tuple(str(path) for path in references),
    )


def test_the_png_metadata_names_each_control_image():
    person, jacket = FIXTURES / "person.png", FIXTURES / "jacket.png"
    text = infotext(
        kontext_request(0, person, jacket),
        base_model="qwen",
        lora_name=None,
        step=None,
        arch="qwen_image_edit_plus",
    )
    params = parse_infotext(text).params
    assert (params["Control image"], params["Control image 2"]) == (str(person), str(jacket))
    assert params["CFG scale"] == "2.5"  # Qwen's guidance is (true) CFG
    kontext = parse_infotext(
        infotext(kontext_request(0, person), base_model="k", lora_name=None, step=None, arch="flux_kontext")
    ).params
    assert kontext["Guidance"] == "2.5" and "CFG scale" not in kontext  # embedded, as on Flux.1


def test_the_gallery_shows_the_control_image_first_in_its_row(tmp_path):
    samples = tmp_path / "samples"
    person = FIXTURES / "person.png"
    for step in (500, 1000):
        for index, references in enumerate(((person,), ())):
            write_sample(
                samples,
                step,
                kontext_request(index, *references),
                Image.new("RGB", (64, 64), (20 * index, 90, 140)),
                image_format="png",
                base_model="black-forest-labs/FLUX.1-Kontext-dev",
                lora_name=f"edit_{step:09d}.safetensors",
                arch="flux_kontext",
            )
    assert "Control image: " in read_infotext(samples / "step_000500" / "sample_00.png")
    page = build_gallery(samples).read_text(encoding="utf-8")
    header = page[page.index("<thead>") : page.index("</thead>")]
    assert header.index(">reference<") < header.index('data-step="500"')  # the first column after the prompt
    first_row = page[page.index('<tr data-prompt="0">') : page.index('<tr data-prompt="1">')]
    cells = first_row.split("<td")
    assert person.resolve().as_uri() in cells[1]  # the reference links to the image itself
    thumbs = list((samples / THUMBS_DIR / "references").iterdir())
    assert len(thumbs) == 1 and Image.open(thumbs[0]).size[0] <= 256
    second_row = page[page.index('<tr data-prompt="1">') :]
    assert second_row.split("<td")[1].startswith("></td>")  # a prompt without one: an empty first cell
    build_gallery(samples)  # again: the thumbnail is kept, not swept as an orphan
    assert thumbs[0].is_file()


def test_a_moved_control_image_is_named_not_shown(tmp_path):
    samples = tmp_path / "samples"
    gone = tmp_path / "gone.png"
    write_sample(
        samples,
        500,
        kontext_request(0, gone),
        Image.new("RGB", (64, 64)),
        image_format="png",
        base_model="k",
        lora_name="edit.safetensors",
        arch="flux_kontext",
    )
    page = build_gallery(samples).read_text(encoding="utf-8")
    assert "gone.png (missing)" in page
