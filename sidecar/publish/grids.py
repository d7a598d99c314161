"""Contact sheets: all samples of one step (`step_XXXXXX/grid.png`), and steps x prompts to share.

Pillow only, with Pillow's own default font (scalable since Pillow 10.1), so no font file is
needed or fetched. Each image lands in its cell at its own size, or scaled down to fit a
cell size cap; it is never enlarged, so a cell shows the sample's real pixels where it can.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sidecar.errors import SidecarError
from sidecar.plan.request import SampleRequest
from sidecar.publish.catalog import STEP_GRID_NAME, find_samples, read_sample_info, step_label
from sidecar.publish.files import atomic_write, step_dir
from sidecar.publish.infotext import SampleInfo
from sidecar.publish.video import FrameChoice, frame_count, load_frame
from sidecar.settings import BASELINE_STEP

logger = logging.getLogger("sidecar.publish")

STEP_GRID_MAX_CELL_PX = 512  # a step grid of ten 1024 px samples stays around 2k x 1.5k px
PADDING_PX = 8
BACKGROUND = (24, 24, 28)
CELL_BACKGROUND = (36, 37, 43)
TEXT_COLOUR = (230, 230, 230)
MUTED_COLOUR = (150, 150, 160)
MISSING_COLOUR = (90, 60, 60)
MIN_FONT_PX = 14
FONT_FRACTION = 1 / 22  # font size relative to the cell's width: readable when the grid is shrunk
ROW_LABEL_FRACTION = 0.75  # row label width relative to a cell's width (compare grid)
ROW_LABEL_MIN_PX = 180
ELLIPSIS = "…"
_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


@dataclass(frozen=True)
class _Caption:
    """What a step grid writes under one sample."""

    index: int
    seed: str | None
    strength: str | None  # None: no LoRA (the baseline)
    prompt: str

    @classmethod
    def from_request(cls, request: SampleRequest, *, baseline: bool) -> _Caption:
        return cls(
            index=request.index,
            seed=str(request.seed),
            strength=None if baseline else f"{request.strength:g}",
            prompt=request.prompt,
        )

    @classmethod
    def from_info(cls, index: int, info: SampleInfo) -> _Caption:
        return cls(index=index, seed=info.seed, strength=info.strength, prompt=info.prompt)

    def headline(self) -> str:
        seed = f"seed {self.seed}" if self.seed is not None else "seed ?"
        strength = f"strength {self.strength}" if self.strength is not None else "no LoRA"
        return f"#{self.index:02d} · {seed} · {strength}"


def _font(size: int) -> _Font:
    """Pillow's built-in font at `size` px; the small bitmap one where FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def _font_px(cell_width: int) -> int:
    return max(MIN_FONT_PX, round(cell_width * FONT_FRACTION))


def _line_height(font: _Font) -> int:
    _left, top, _right, bottom = font.getbbox("Ag")
    return int(bottom - min(top, 0)) + 4


def _fit_text(text: str, font: _Font, width: int) -> str:
    """`text` on one line, cut with an ellipsis to fit `width` px."""
    text = " ".join(text.split())
    if font.getlength(text) <= width:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits with the ellipsis
        middle = (low + high + 1) // 2
        if font.getlength(text[:middle].rstrip() + ELLIPSIS) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + ELLIPSIS


def _wrap(text: str, font: _Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px; the last line is cut with an ellipsis if text is left."""
    words = text.split()
    lines: list[str] = []
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words and lines:
        lines[-1] = _fit_text(f"{lines[-1]} {' '.join(words)}", font, width)
    return [_fit_text(line, font, width) for line in lines]


def _load_rgb(path: Path, frames: Sequence[FrameChoice | int] = ("middle",)) -> Image.Image:
    """A sample as one picture: a still image as it is, a video's chosen frames side by side."""
    if frame_count(path) == 1:
        return load_frame(path)
    chosen = [load_frame(path, frame) for frame in frames]
    strip = Image.new(
        "RGB", (sum(f.width for f in chosen) + PADDING_PX * (len(chosen) - 1), chosen[0].height)
    )
    for number, frame in enumerate(chosen):
        strip.paste(frame, (number * (frame.width + PADDING_PX), 0))
    return strip


def _fit(image: Image.Image, max_px: int | None) -> Image.Image:
    """`image` scaled down (never up) so its long side is at most `max_px`."""
    if max_px is None or max(image.size) <= max_px:
        return image
    image = image.copy()
    image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    return image


def _paste_centred(canvas: Image.Image, image: Image.Image, box: tuple[int, int, int, int]) -> None:
    left, top, width, height = box
    canvas.paste(image, (left + (width - image.width) // 2, top + (height - image.height) // 2))


def _draw_missing(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], font: _Font) -> None:
    """A clearly empty cell: outlined, crossed, and saying so."""
    left, top, width, height = box
    right, bottom = left + width - 1, top + height - 1
    draw.rectangle((left, top, right, bottom), fill=CELL_BACKGROUND, outline=MISSING_COLOUR, width=3)
    draw.line((left, top, right, bottom), fill=MISSING_COLOUR, width=2)
    draw.line((left, bottom, right, top), fill=MISSING_COLOUR, width=2)
    draw.text((left + width // 2, top + height // 2), "missing", font=font, fill=TEXT_COLOUR, anchor="mm")


def _save(image: Image.Image, output: Path, *, root: Path | None = None) -> Path:
    """Save atomically in the format the suffix names; with `root`, confined below it."""
    output = Path(output)
    pil_format = SAVE_FORMATS.get(output.suffix.lower())
    if pil_format is None:
        raise SidecarError(
            f"`output` must end in one of {', '.join(sorted(SAVE_FORMATS))}, got {output.name!r}"
        )
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **({"quality": 92} if pil_format != "PNG" else {}))
    data = buffer.getvalue()
    atomic_write(output, lambda handle: handle.write(data), root=root)
    return output


# ---------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------


def step_captions(
    samples_dir: Path, step: int, *, requests: Sequence[SampleRequest] | None = None
) -> dict[int, tuple[str, str]]:
    """`{prompt index: (headline, prompt)}` for a step grid: `#00 · seed 42 · strength 1` (`no LoRA`
    at the baseline). From `requests` where they hold the index, else from the image's infotext."""
    by_index = {request.index: request for request in requests or ()}
    captions: dict[int, tuple[str, str]] = {}
    for index, path in find_samples(samples_dir).get(step, {}).items():
        if index in by_index:
            caption = _Caption.from_request(by_index[index], baseline=step == BASELINE_STEP)
        else:
            caption = _Caption.from_info(index, read_sample_info(path))
        captions[index] = (caption.headline(), caption.prompt)
    return captions


def write_step_grid(
    samples_dir: Path,
    step: int,
    *,
    requests: Sequence[SampleRequest] | None = None,
    max_cell_px: int | None = STEP_GRID_MAX_CELL_PX,
) -> Path:
    """Write `step_XXXXXX/grid.png`: every sample of `step` (a video's middle frame), captioned
    with prompt index, seed and LoRA strength; returns its path.

    Captions come from `requests` when given (the daemon has them at hand), else from each
    image's infotext. Columns: about the square root of the sample count, so the sheet stays
    near square.
    """
    samples = find_samples(samples_dir).get(step)
    if not samples:
        raise SidecarError(f"no samples for step {step} in {step_dir(samples_dir, step)}")
    images = {index: _fit(_load_rgb(path), max_cell_px) for index, path in samples.items()}
    captions = step_captions(samples_dir, step, requests=requests)

    cell_w = max(image.width for image in images.values())
    cell_h = max(image.height for image in images.values())
    font = _font(_font_px(cell_w))
    line = _line_height(font)
    caption_h = 2 * line + PADDING_PX // 2
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    pitch_x, pitch_y = cell_w + PADDING_PX, cell_h + caption_h + PADDING_PX
    canvas = Image.new("RGB", (PADDING_PX + columns * pitch_x, PADDING_PX + rows * pitch_y), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for position, (index, image) in enumerate(images.items()):
        left = PADDING_PX + (position % columns) * pitch_x
        top = PADDING_PX + (position // columns) * pitch_y
        _paste_centred(canvas, image, (left, top, cell_w, cell_h))
        headline, prompt = captions[index]
        draw.text((left, top + cell_h + 2), _fit_text(headline, font, cell_w), font=font, fill=TEXT_COLOUR)
        draw.text(
            (left, top + cell_h + 2 + line), _fit_text(prompt, font, cell_w), font=font, fill=MUTED_COLOUR
        )
    path = _save(canvas, step_dir(samples_dir, step) / STEP_GRID_NAME, root=Path(samples_dir))
    logger.info("step %d grid: %d sample(s) in %s", step, len(images), path)
    return path


# ---------------------------------------------------------------------------------
# Steps x prompts
# ---------------------------------------------------------------------------------


def compare_grid(
    samples_dir: Path,
    *,
    steps: Sequence[int] | None,
    prompts: Sequence[int] | None,
    output: Path,
    thumb_size: int | None = None,
    frames: Sequence[FrameChoice | int] = ("middle",),
) -> Path:
    """One image of `steps` (columns) x `prompts` (rows), labelled, to share; returns `output`.

    `steps` / `prompts` None: all there are. `thumb_size`: the long side of each cell in px;
    None keeps the samples' own size. `frames`: which frames of a video sample its cell shows,
    side by side (`first`, `middle`, `last` or 0-based indexes); a still image shows itself. A
    sample missing on disk gets a marked empty cell and a warning; a step or prompt index that does
    not exist at all is an error naming those that do.
    """
    samples = find_samples(samples_dir)
    if not samples:
        raise SidecarError(f"no samples in {samples_dir} (expected step_XXXXXX/sample_XX.png folders)")
    if thumb_size is not None and thumb_size < 16:
        raise SidecarError(f"`thumb_size` must be at least 16 px, got {thumb_size}")
    available_steps = list(samples)
    available_prompts = sorted({index for images in samples.values() for index in images})
    chosen_steps = list(steps) if steps is not None else available_steps
    chosen_prompts = list(prompts) if prompts is not None else available_prompts
    unknown_steps = [step for step in chosen_steps if step not in samples]
    if unknown_steps:
        raise SidecarError(
            f"no samples for step(s) {', '.join(map(str, unknown_steps))} in {samples_dir}; "
            f"available steps: {', '.join(map(str, available_steps))}"
        )
    unknown_prompts = [index for index in chosen_prompts if index not in available_prompts]
    if unknown_prompts:
        raise SidecarError(
            f"no samples for prompt(s) {', '.join(map(str, unknown_prompts))} in {samples_dir}; "
            f"available prompts: {', '.join(map(str, available_prompts))}"
        )
    if not chosen_steps or not chosen_prompts:
        raise SidecarError("`steps` and `prompts` must each name at least one, or be left out for all")

    cells: dict[tuple[int, int], Image.Image | None] = {}
    for index in chosen_prompts:
        for step in chosen_steps:
            path = samples[step].get(index)
            if path is None:
                logger.warning("prompt %d has no sample at step %d; its cell is left empty", index, step)
                cells[index, step] = None
            else:
                try:
                    cells[index, step] = _fit(_load_rgb(path, frames), thumb_size)
                except ValueError as error:  # a frame index past a video's end
                    raise SidecarError(f"{path}: {error}") from error
    present = [image for image in cells.values() if image is not None]
    cell_w = max(image.width for image in present)
    cell_h = max(image.height for image in present)

    # Row labels: prompt index and the prompt, from the latest step that has it.
    labels: dict[int, str] = {}
    for index in chosen_prompts:
        latest = next(samples[step][index] for step in reversed(available_steps) if index in samples[step])
        labels[index] = read_sample_info(latest).prompt

    font = _font(_font_px(cell_w))
    small = _font(max(MIN_FONT_PX, round(_font_px(cell_w) * 0.85)))
    line = _line_height(font)
    label_w = max(ROW_LABEL_MIN_PX, round(cell_w * ROW_LABEL_FRACTION))
    header_h = line + PADDING_PX
    pitch_x, pitch_y = cell_w + PADDING_PX, cell_h + PADDING_PX
    canvas = Image.new(
        "RGB",
        (
            PADDING_PX + label_w + PADDING_PX + len(chosen_steps) * pitch_x,
            PADDING_PX + header_h + len(chosen_prompts) * pitch_y,
        ),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(canvas)
    grid_left = PADDING_PX + label_w + PADDING_PX
    grid_top = PADDING_PX + header_h
    for column, step in enumerate(chosen_steps):
        centre = grid_left + column * pitch_x + cell_w // 2
        draw.text((centre, PADDING_PX), step_label(step), font=font, fill=TEXT_COLOUR, anchor="ma")
    small_line = _line_height(small)
    for row, index in enumerate(chosen_prompts):
        top = grid_top + row * pitch_y
        draw.text((PADDING_PX, top), f"#{index:02d}", font=font, fill=TEXT_COLOUR)
        max_lines = max(1, (cell_h - line) // small_line)
        for number, text in enumerate(_wrap(labels[index], small, label_w, max_lines)):
            draw.text((PADDING_PX, top + line + number * small_line), text, font=small, fill=MUTED_COLOUR)
        for column, step in enumerate(chosen_steps):
            box = (grid_left + column * pitch_x, top, cell_w, cell_h)
            image = cells[index, step]
            if image is None:
                _draw_missing(draw, box, font)
            else:
                _paste_centred(canvas, image, box)
    path = _save(canvas, output)
    logger.info(
        "compare grid: %d prompt(s) x %d step(s), %dx%d px, in %s",
        len(chosen_prompts),
        len(chosen_steps),
        canvas.width,
        canvas.height,
        path,
    )
    return path
