"""A static HTML gallery across steps: `SAMPLES_DIR/index.html`, one row per prompt, one column per step.

People judge a LoRA by the same prompt across steps, so the page puts them side by side:
the baseline (step 0, the base model without LoRA) first, then every checkpoint in order.
A video sample's cell plays its animated thumbnail in place (an animated WebP: it starts by
itself, silent, looping) and links its MP4. An `<img>` rather than `<video autoplay muted
loop>`: a page of a few hundred cells would pass the number of media players a browser keeps
alive at once (Chromium's is 75), and lazy loading works for images only.
The page is one file with inline CSS and a few lines of optional inline JS; every link is
relative, so it works from `file://`, from any static web server and from a copied folder,
and it makes no network request. Thumbnails (WebP, `THUMB_SIZE_PX` on the long side) live in
`SAMPLES_DIR/.thumbs/step_XXXXXX/` and are made again only when missing or older than their image.

This module also reads the samples folder for `sidecar.publish.grids`: which steps and samples exist,
and each sample's settings from its `.txt` and A1111 infotext.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from sidecar.confined import ConfinedFolder
from sidecar.publish.files import CONTROL_IMAGE_KEY, NOTE_PREFIX, VIDEO_SUFFIX, atomic_write, read_infotext
from sidecar.publish.video import animation_fps, encode_webp, frame_count, load_frames
from sidecar.settings import BASELINE_STEP, SamplesFolder

logger = logging.getLogger("sidecar.publish")

INDEX_NAME = "index.html"
THUMBS_DIR = ".thumbs"  # hidden, so file browsers and `sidecar status` leave it alone
THUMB_SIZE_PX = 256  # long side of a thumbnail; the page shows them at 160 px by default
THUMB_QUALITY = 80  # WebP quality: thumbnails only need to show the picture
STEP_GRID_NAME = "grid.png"  # written by sidecar.publish.grids.write_step_grid
# `.thumbs/references/`: thumbnails of the samples' control images (JPEG, which the orphan sweep
# of sample thumbnails leaves alone), named by a hash of the image's path.
REFERENCES_DIR = "references"

_SAMPLE_FILE = re.compile(r"^sample_(\d{2,})\.(png|jpg|webp)$")
# A1111's infotext parameter line, as its `parse_generation_parameters` reads it.
_INFOTEXT_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_MIN_PARAMS = 3  # a last line with fewer `Key: value` pairs is part of the prompt

# Settings shown under each prompt, in this order: (infotext key, label).
_SHOWN_SETTINGS = (
    ("Size", "size"),
    ("Steps", "steps"),
    ("Sampler", "sampler"),
    ("Schedule type", "schedule"),
    ("CFG scale", "cfg"),
    ("Guidance", "guidance"),
    ("Seed", "seed"),
    ("Lora strength", "strength"),
)


# ---------------------------------------------------------------------------------
# Reading the samples folder
# ---------------------------------------------------------------------------------


def find_samples(samples_dir: Path) -> dict[int, dict[int, Path]]:
    """`{step: {prompt index: image}}` for every finished sample under `samples_dir`, steps sorted.

    Temp files are hidden (`.sample_00.png.<hex>.tmp`) and never match. Where one sample exists
    in two formats (the config's `format:` changed between runs), the newer file wins.
    """
    found: dict[int, dict[int, Path]] = {}
    for step, folder in SamplesFolder(Path(samples_dir)).step_dirs().items():
        images: dict[int, Path] = {}
        for candidate in folder.iterdir():
            sample_match = _SAMPLE_FILE.match(candidate.name)
            if sample_match is None or not candidate.is_file():
                continue
            index = int(sample_match.group(1))
            if index not in images or _mtime(candidate) > _mtime(images[index]):
                images[index] = candidate
        if images:
            found[step] = dict(sorted(images.items()))
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@dataclass(frozen=True)
class SampleInfo:
    """What one sample was rendered with, as its files record it."""

    prompt: str
    negative_prompt: str = ""
    params: Mapping[str, str] = field(default_factory=dict)  # infotext keys: "Seed", "Size", ...

    @property
    def seed(self) -> str | None:
        return self.params.get("Seed")

    @property
    def strength(self) -> str | None:
        """The LoRA strength; None for the baseline, which has no LoRA."""
        return self.params.get("Lora strength")


def parse_infotext(text: str) -> SampleInfo:
    """Prompt, negative prompt and `Key: value` settings of an A1111 infotext."""
    *lines, last = text.strip().split("\n")
    if len(_INFOTEXT_PARAM.findall(last)) < _MIN_PARAMS:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    params: dict[str, str] = {}
    for key, value in _INFOTEXT_PARAM.findall(last):
        params[key.strip()] = _unquote(value).strip()
    return SampleInfo(
        prompt="\n".join(prompt).strip(), negative_prompt="\n".join(negative).strip(), params=params
    )


def _unquote(value: str) -> str:
    """A1111 writes a value holding `,` `:` or a newline as a JSON string."""
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def read_sample_info(image: Path) -> SampleInfo:
    """A sample's settings from its infotext; the prompt from its `.txt` when there is one.

    The `.txt` is what the trainer's own prompt file would hold, so it wins over the infotext.
    An image without metadata (written by something else) still gets a row, with what is known.
    """
    image = Path(image)
    try:
        text = read_infotext(image)
    except OSError as error:
        logger.warning("cannot read the settings of %s: %s", image, error)
        text = None
    info = parse_infotext(text) if text else SampleInfo(prompt="")
    prompt_file = image.with_suffix(".txt")
    try:
        lines = prompt_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    prompt = "\n".join(line for line in lines if not line.startswith(NOTE_PREFIX)).strip()
    if prompt and image.with_suffix(VIDEO_SUFFIX).is_file():  # a video's `.txt` holds its whole infotext
        prompt = parse_infotext(prompt).prompt
    if prompt:
        info = SampleInfo(prompt=prompt, negative_prompt=info.negative_prompt, params=info.params)
    return info


def step_label(step: int) -> str:
    """Column header text: `base` for the baseline, else `step 500`."""
    return "base" if step == BASELINE_STEP else f"step {step}"


# ---------------------------------------------------------------------------------
# Thumbnails
# ---------------------------------------------------------------------------------


def thumbnail_path(samples_dir: Path, image: Path) -> Path:
    """`SAMPLES_DIR/.thumbs/step_000500/sample_00.webp` for `SAMPLES_DIR/step_000500/sample_00.png`."""
    return Path(samples_dir) / THUMBS_DIR / image.parent.name / f"{image.stem}.webp"


def ensure_thumbnail(samples_dir: Path, image: Path) -> Path:
    """The thumbnail of `image`, made (atomically) only when missing or older than the image.

    Written inside the samples folder only: `.thumbs` or its step folder being a symlink is an
    `UnsafeEntryError`, never followed.
    """
    thumb = thumbnail_path(samples_dir, image)
    try:
        found = thumb.lstat()
    except FileNotFoundError:
        found = None
    fresh = found is not None and stat.S_ISREG(found.st_mode) and found.st_size > 0
    if fresh and found.st_mtime >= _mtime(image):  # type: ignore[union-attr]
        return thumb
    if frame_count(image) > 1:  # a video sample: an animated thumbnail that plays in place
        frames = load_frames(image)
        for frame in frames:
            frame.thumbnail((THUMB_SIZE_PX, THUMB_SIZE_PX), Image.Resampling.LANCZOS)
        data = encode_webp(frames, fps=animation_fps(image), quality=THUMB_QUALITY)
    else:
        with Image.open(image) as source:
            source.draft("RGB", (THUMB_SIZE_PX, THUMB_SIZE_PX))  # JPEG: decode at reduced size
            small = source.convert("RGBA" if "A" in source.getbands() else "RGB")
        small.thumbnail((THUMB_SIZE_PX, THUMB_SIZE_PX), Image.Resampling.LANCZOS)  # never enlarges
        buffer = io.BytesIO()
        small.save(buffer, format="WEBP", quality=THUMB_QUALITY)
        data = buffer.getvalue()
    # No fsync (`durable=False`): a thumbnail is a cache (a thousand fsyncs would make the first
    # build slow), and one lost to a crash is made again.
    with ConfinedFolder.open(samples_dir) as top, top.folders((THUMBS_DIR, thumb.parent.name)) as folder:
        folder.write_atomic(thumb.name, lambda handle: handle.write(data), durable=False)
    return thumb


def control_images(info: SampleInfo) -> list[str]:
    """The reference images a sample was rendered from, as its infotext names them."""
    keys = [CONTROL_IMAGE_KEY, *(f"{CONTROL_IMAGE_KEY} {number}" for number in range(2, 10))]
    return [info.params[key] for key in keys if info.params.get(key)]


def reference_thumbnail(samples_dir: Path, source: str) -> Path | None:
    """The thumbnail of a control image, or None when it cannot be read (moved, deleted).

    The image itself lies outside the samples folder and is only read; the thumbnail is written
    inside it, like the samples' own.
    """
    name = hashlib.sha256(source.encode("utf-8")).hexdigest()[:20] + ".jpg"
    thumb = Path(samples_dir) / THUMBS_DIR / REFERENCES_DIR / name
    try:
        if thumb.is_file() and thumb.stat().st_mtime >= Path(source).stat().st_mtime:
            return thumb
        with Image.open(source) as image:
            small = image.convert("RGB")
    except OSError as error:
        logger.warning("cannot show control image %s in the gallery: %s", source, error)
        return None
    small.thumbnail((THUMB_SIZE_PX, THUMB_SIZE_PX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=THUMB_QUALITY)
    data = buffer.getvalue()
    with ConfinedFolder.open(samples_dir) as top, top.folders((THUMBS_DIR, REFERENCES_DIR)) as folder:
        folder.write_atomic(name, lambda handle: handle.write(data), durable=False)
    return thumb


def remove_orphan_thumbnails(samples_dir: Path, samples: Mapping[int, Mapping[int, Path]]) -> int:
    """Delete thumbnails whose image is gone (a step re-rendered in another format, a step removed).

    Deletes inside `.thumbs` only, through no symlink: a `.thumbs` that is one is an `UnsafeEntryError`.
    """
    wanted = {thumbnail_path(samples_dir, image) for images in samples.values() for image in images.values()}
    removed = 0
    with ConfinedFolder.open(samples_dir) as top:
        if not top.require(THUMBS_DIR, "folder"):
            return 0
        with top.folder(THUMBS_DIR, create=False) as root:
            for step_name in root.entries():
                if root.kind(step_name) != "folder":
                    continue
                with root.folder(step_name, create=False) as folder:
                    for name in folder.entries():
                        thumb = Path(samples_dir) / THUMBS_DIR / step_name / name
                        if name.endswith(".webp") and thumb not in wanted and folder.unlink(name):
                            removed += 1
                    empty = not folder.entries()
                if empty:
                    os.rmdir(step_name, dir_fd=root.fd)
    return removed


# ---------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------

_CSS = """
:root { --thumb: 160px; color-scheme: dark; }
* { box-sizing: border-box; }
body { margin: 0; background: #15161a; color: #e6e6e6; font: 13px/1.4 system-ui, sans-serif; }
header { padding: 8px 12px; display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
header h1 { font-size: 15px; margin: 0; font-weight: 600; }
header .meta { color: #9a9aa3; }
.scroll { overflow: auto; height: calc(100vh - 44px); }
table { border-collapse: separate; border-spacing: 0; }
th, td { padding: 4px; vertical-align: top; border-right: 1px solid #26272d;
  border-bottom: 1px solid #26272d; }
thead th { position: sticky; top: 0; z-index: 2; background: #1d1e23; font-weight: 600;
  white-space: nowrap; text-align: center; }
thead th a { color: inherit; }
th.prompt { position: sticky; left: 0; z-index: 1; background: #1d1e23; text-align: left;
  font-weight: normal; width: 300px; min-width: 300px; max-width: 300px; }
thead th.prompt { z-index: 3; }
th.base { background: #24262e; }
.idx { color: #9a9aa3; font-variant-numeric: tabular-nums; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 9.8em; overflow: auto; }
.neg { color: #d49a9a; white-space: pre-wrap; overflow-wrap: anywhere; max-height: 4.2em;
  overflow: auto; }
.settings { color: #9a9aa3; font-size: 12px; margin-top: 2px; }
td { min-width: calc(var(--thumb) + 8px); }
td img { display: block; width: var(--thumb); height: var(--thumb); object-fit: contain; }
td.missing { color: #55565e; text-align: center; vertical-align: middle; }
.video { position: relative; }
.video .mp4 { position: absolute; right: 2px; bottom: 2px; padding: 0 4px; font-size: 11px;
  background: rgba(0, 0, 0, 0.6); color: #e6e6e6; border-radius: 3px; text-decoration: none; }
""".strip()

# Optional: a slider for the thumbnail size. The page is complete without it.
_JS = """
const slider = document.getElementById("zoom");
slider.hidden = false;
slider.addEventListener("input", () => {
  document.documentElement.style.setProperty("--thumb", slider.value + "px");
});
""".strip()
_SCRIPT_BODY = f"\n{_JS}\n"  # exactly what stands between the tags: the policy hashes it


def _csp(script: str) -> str:
    """A policy that allows only this page's own script and images from its folder, so nothing
    in a prompt can run and the page never reaches the network."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src 'self' file:; media-src 'self' file:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


def _settings_text(info: SampleInfo) -> str:
    shown = [f"{label} {info.params[key]}" for key, label in _SHOWN_SETTINGS if info.params.get(key)]
    return " · ".join(shown)


def _href(samples_dir: Path, path: Path) -> str:
    """A relative, URL-safe link from `index.html` to `path`."""
    return html.escape(quote(path.relative_to(samples_dir).as_posix(), safe="/"))


def _reference_cell(samples_dir: Path, images: list[tuple[str, Path | None]]) -> str:
    """Each control image's thumbnail, linking to the image itself (a `file:` URL)."""
    cells = []
    for source, thumb in images:
        name = html.escape(Path(source).name)
        if thumb is None:
            cells.append(f'<span class="missing" title="{html.escape(source)}">{name} (missing)</span>')
            continue
        link = html.escape(Path(source).resolve().as_uri())
        cells.append(
            f'<a href="{link}" title="{html.escape(source)}"><img src="{_href(samples_dir, thumb)}"'
            f' loading="lazy" alt="{name}"></a>'
        )
    return "".join(cells)


def render_page(
    samples_dir: Path,
    samples: Mapping[int, Mapping[int, Path]],
    thumbs: Mapping[Path, Path],
    infos: Mapping[int, SampleInfo],
    *,
    title: str,
    references: Mapping[int, list[tuple[str, Path | None]]] | None = None,
) -> str:
    """The HTML of the gallery (pure: reads nothing from disk but `grid.png`'s and MP4s' presence).

    `references`: per prompt, its control images and their thumbnails (None: unreadable), shown
    as the row's first column; the column is there only when some prompt has one.
    """
    references = references or {}
    steps = list(samples)
    prompt_indexes = sorted({index for images in samples.values() for index in images})
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_csp(_SCRIPT_BODY)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{_CSS}\n</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1>",
        f'<span class="meta">{len(prompt_indexes)} prompt(s) × {len(steps)} step(s)</span>',
        '<label class="meta">thumbnails <input id="zoom" type="range" min="64" max="512" value="160"'
        " hidden></label></header>",
        '<div class="scroll"><table id="gallery"><thead><tr><th class="prompt">prompt</th>',
    ]
    if any(references.values()):
        out.append('<th class="ref" title="the control images the samples were rendered from">reference</th>')
    for step in steps:
        label = html.escape(step_label(step))
        css = ' class="base" title="the base model without LoRA"' if step == BASELINE_STEP else ""
        grid = SamplesFolder(samples_dir).step(step) / STEP_GRID_NAME
        if grid.is_file():
            label = f'<a href="{_href(samples_dir, grid)}" title="all samples of this step">{label}</a>'
        out.append(f'<th{css} data-step="{step}">{label}</th>')
    out.append("</tr></thead><tbody>")
    for index in prompt_indexes:
        info = infos.get(index, SampleInfo(prompt=""))
        negative = (
            f'<div class="neg">negative: {html.escape(info.negative_prompt)}</div>'
            if info.negative_prompt
            else ""
        )
        out.append(
            f'<tr data-prompt="{index}"><th class="prompt"><span class="idx">#{index:02d}</span> '
            f'<div class="text">{html.escape(info.prompt)}</div>{negative}'
            f'<div class="settings">{html.escape(_settings_text(info))}</div></th>'
        )
        if any(references.values()):
            out.append(f"<td>{_reference_cell(samples_dir, references.get(index, []))}</td>")
        for step in steps:
            image = samples[step].get(index)
            if image is None:
                out.append('<td class="missing" title="not rendered (yet)">missing</td>')
                continue
            alt = html.escape(f"#{index:02d} {step_label(step)}")
            cell = (
                f'<a href="{_href(samples_dir, image)}"><img src="{_href(samples_dir, thumbs[image])}"'
                f' loading="lazy" alt="{alt}"></a>'
            )
            video = image.with_suffix(VIDEO_SUFFIX)
            if video.is_file():  # the animated thumbnail plays in place; the MP4 for players
                mp4 = f'<a class="mp4" href="{_href(samples_dir, video)}">MP4</a>'
                cell = f'<div class="video">{cell}{mp4}</div>'
            out.append(f"<td>{cell}</td>")
        out.append("</tr>")
    out.append(f"</tbody></table></div>\n<script>{_SCRIPT_BODY}</script>\n</body></html>\n")
    return "\n".join(out)


def build_gallery(samples_dir: Path, *, title: str | None = None) -> Path:
    """Rebuild `SAMPLES_DIR/index.html` (atomically) from what is on disk; returns its path.

    Cheap enough to call after every rendered step: thumbnails are made only for new or changed
    images, and settings are read from one image per prompt (the latest step's, so a row shows
    what the newest samples were rendered with).
    """
    samples_dir = Path(samples_dir)
    samples = find_samples(samples_dir)
    thumbs: dict[Path, Path] = {}
    latest: dict[int, Path] = {}
    for images in samples.values():  # steps ascending: the last one seen is the latest
        for index, image in images.items():
            try:
                thumbs[image] = ensure_thumbnail(samples_dir, image)
            except OSError as error:  # a damaged image must not take the whole page down
                logger.warning("cannot make a thumbnail of %s: %s", image, error)
                thumbs[image] = image
            latest[index] = image
    removed = remove_orphan_thumbnails(samples_dir, samples)
    if removed:
        logger.debug("removed %d stale thumbnail(s)", removed)
    infos = {index: read_sample_info(image) for index, image in latest.items()}
    references = {
        index: [(source, reference_thumbnail(samples_dir, source)) for source in control_images(info)]
        for index, info in infos.items()
    }
    page = render_page(
        samples_dir,
        samples,
        thumbs,
        infos,
        title=title or f"{samples_dir.resolve().parent.name or 'sidecar'} samples",
        references=references,
    )
    index_path = samples_dir / INDEX_NAME
    data = page.encode("utf-8")
    atomic_write(index_path, lambda handle: handle.write(data), root=samples_dir)
    logger.info("gallery: %d prompt(s) x %d step(s) in %s", len(infos), len(samples), index_path)
    return index_path
