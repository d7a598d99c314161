"""Contact sheets: a step's samples with captions, and steps x prompts with labels."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
from factories import sample_request
from PIL import Image

from sidecar.confined import UnsafeEntryError
from sidecar.errors import SidecarError
from sidecar.publish.files import write_sample
from sidecar.publish.grids import (
    BACKGROUND,
    CELL_BACKGROUND,
    MISSING_COLOUR,
    PADDING_PX,
    ROW_LABEL_MIN_PX,
    compare_grid,
    step_captions,
    write_step_grid,
)

REQUEST = sample_request(negative_prompt="blurry")
PROMPTS = ("a photo of sks dog", "sks dog in the snow", "an oil painting of sks dog")


def colour(step: int, index: int) -> tuple[int, int, int]:
    """A colour per (step, prompt) that no other cell shares."""
    return (40 + 60 * index, (step // 10) % 256, 200 - 30 * index)


def make_samples(
    root: Path,
    steps: tuple[int, ...],
    *,
    size: tuple[int, int] = (64, 64),
    prompts: tuple[str, ...] = PROMPTS,
) -> None:
    for step in steps:
        for index, prompt in enumerate(prompts):
            request = replace(REQUEST, index=index, prompt=prompt, seed=42 + index, strength=0.8)
            write_sample(
                root,
                step,
                request,
                Image.new("RGB", size, colour(step, index)),
                base_model="stabilityai/stable-diffusion-xl-base-1.0",
                lora_name=None if step == 0 else f"my_lora_{step:09d}.safetensors",
                arch="sdxl",
            )


def test_step_grid_holds_every_sample_at_its_own_pixels(tmp_path: Path) -> None:
    make_samples(tmp_path, (500,))
    path = write_step_grid(tmp_path, 500)
    assert path == tmp_path / "step_000500" / "grid.png"
    grid = Image.open(path).convert("RGB")

    columns = math.ceil(math.sqrt(3))  # 2 x 2, one cell empty
    assert grid.width == PADDING_PX + columns * (64 + PADDING_PX)
    pitch_y = (grid.height - PADDING_PX) // 2
    assert pitch_y > 64 + PADDING_PX  # room for the captions
    for position in range(3):
        left = PADDING_PX + (position % columns) * (64 + PADDING_PX)
        top = PADDING_PX + (position // columns) * pitch_y
        cell = grid.crop((left, top, left + 64, top + 64))
        assert cell.getcolors() == [(64 * 64, colour(500, position))]
        caption = grid.crop((left, top + 64, left + 64, top + pitch_y - PADDING_PX))
        assert any(value != BACKGROUND for _, value in caption.getcolors(maxcolors=100_000))
    # the fourth place is empty
    left, top = PADDING_PX + (64 + PADDING_PX), PADDING_PX + pitch_y
    assert grid.crop((left, top, left + 64, top + 64)).getcolors() == [(64 * 64, BACKGROUND)]


def test_step_grid_scales_big_samples_down_to_the_cell_cap(tmp_path: Path) -> None:
    make_samples(tmp_path, (500,), size=(256, 128), prompts=PROMPTS[:1])
    grid = Image.open(write_step_grid(tmp_path, 500, max_cell_px=64))
    assert grid.width == PADDING_PX + 64 + PADDING_PX


def test_step_captions_read_the_infotext_or_the_requests(tmp_path: Path) -> None:
    make_samples(tmp_path, (0, 500))
    assert step_captions(tmp_path, 500)[1] == ("#01 · seed 43 · strength 0.8", "sks dog in the snow")
    assert step_captions(tmp_path, 0)[0] == ("#00 · seed 42 · no LoRA", "a photo of sks dog")
    requests = [replace(REQUEST, index=2, seed=7, strength=1.5, prompt="given")]
    captions = step_captions(tmp_path, 500, requests=requests)
    assert captions[2] == ("#02 · seed 7 · strength 1.5", "given")
    assert captions[0] == ("#00 · seed 42 · strength 0.8", "a photo of sks dog")


def test_step_grid_of_a_step_without_samples_is_an_error(tmp_path: Path) -> None:
    make_samples(tmp_path, (500,))
    with pytest.raises(SidecarError, match="no samples for step 1000"):
        write_step_grid(tmp_path, 1000)


def _compare_layout(grid: Image.Image, rows: int, columns: int, cell: int) -> tuple[int, int]:
    """(left, top) of the first cell, from the grid's size."""
    grid_left = PADDING_PX + ROW_LABEL_MIN_PX + PADDING_PX
    assert grid.width == grid_left + columns * (cell + PADDING_PX)
    header = grid.height - PADDING_PX - rows * (cell + PADDING_PX)
    assert header > 0
    return grid_left, PADDING_PX + header


def test_compare_grid_puts_steps_in_columns_and_prompts_in_rows(tmp_path: Path) -> None:
    make_samples(tmp_path, (0, 500, 1000, 1500))
    output = compare_grid(tmp_path, steps=[0, 1000, 1500], prompts=[0, 2], output=tmp_path / "share.png")
    grid = Image.open(output).convert("RGB")
    left, top = _compare_layout(grid, rows=2, columns=3, cell=64)
    for row, index in enumerate((0, 2)):
        for column, step in enumerate((0, 1000, 1500)):
            x, y = left + column * (64 + PADDING_PX), top + row * (64 + PADDING_PX)
            assert grid.crop((x, y, x + 64, y + 64)).getcolors() == [(64 * 64, colour(step, index))]
    # labels were drawn: the row label column is not blank
    labels = grid.crop((PADDING_PX, top, PADDING_PX + ROW_LABEL_MIN_PX, top + 64))
    assert any(value != BACKGROUND for _, value in labels.getcolors(maxcolors=100_000))


def test_compare_grid_defaults_to_everything_and_scales_to_thumb_size(tmp_path: Path) -> None:
    make_samples(tmp_path, (0, 500), size=(128, 128))
    grid = Image.open(
        compare_grid(tmp_path, steps=None, prompts=None, output=tmp_path / "all.webp", thumb_size=32)
    )
    assert grid.format == "WEBP"
    _compare_layout(grid, rows=3, columns=2, cell=32)


def test_compare_grid_marks_a_missing_sample_and_warns(tmp_path: Path, caplog) -> None:
    make_samples(tmp_path, (500, 1000), size=(96, 96))
    (tmp_path / "step_001000" / "sample_01.png").unlink()
    with caplog.at_level(logging.WARNING, logger="sidecar.publish"):
        output = compare_grid(tmp_path, steps=[500, 1000], prompts=[0, 1], output=tmp_path / "share.png")
    assert "prompt 1 has no sample at step 1000" in caplog.text
    grid = Image.open(output).convert("RGB")
    left, top = _compare_layout(grid, rows=2, columns=2, cell=96)
    x, y = left + 96 + PADDING_PX, top + 96 + PADDING_PX  # row 1, column 1
    assert grid.getpixel((x + 48, y + 24)) == CELL_BACKGROUND
    assert grid.getpixel((x + 1, y + 24)) == MISSING_COLOUR
    assert grid.getpixel((x - PADDING_PX - 48, y + 24)) == colour(500, 1)


def test_compare_grid_unknown_step_names_the_available_ones(tmp_path: Path) -> None:
    make_samples(tmp_path, (0, 500, 1000))
    with pytest.raises(SidecarError, match=r"step\(s\) 750 .*available steps: 0, 500, 1000"):
        compare_grid(tmp_path, steps=[500, 750], prompts=None, output=tmp_path / "x.png")
    with pytest.raises(SidecarError, match=r"prompt\(s\) 9 .*available prompts: 0, 1, 2"):
        compare_grid(tmp_path, steps=None, prompts=[9], output=tmp_path / "x.png")
    with pytest.raises(SidecarError, match="must end in one of"):
        compare_grid(tmp_path, steps=None, prompts=None, output=tmp_path / "x.gif")
    assert not (tmp_path / "x.png").exists()


def test_compare_grid_of_an_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SidecarError, match="no samples in"):
        compare_grid(tmp_path, steps=None, prompts=None, output=tmp_path / "x.png")


def test_step_grid_is_never_written_through_a_linked_step_folder(tmp_path: Path) -> None:
    """A step folder someone replaced with a link to a folder elsewhere: the grid goes nowhere."""
    samples, elsewhere = tmp_path / "samples", tmp_path / "elsewhere"
    make_samples(elsewhere, (500,))
    samples.mkdir()
    (samples / "step_000500").symlink_to(elsewhere / "step_000500")
    before = sorted(path.name for path in (elsewhere / "step_000500").iterdir())
    with pytest.raises(UnsafeEntryError, match="step_000500` is a symbolic link"):
        write_step_grid(samples, 500)
    assert sorted(path.name for path in (elsewhere / "step_000500").iterdir()) == before
