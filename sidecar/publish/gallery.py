"""A static HTML gallery across steps: `SAMPLES_DIR/index.html`, one row per prompt, one column per step.

People judge a LoRA by the same prompt across steps, so the page puts them side by side:
the baseline (step 0, the base model without LoRA) first, then every checkpoint in order.
A video sample's thumbnail is an animated WebP (it plays in place, silent, looping).
Thumbnails (WebP, `THUMB_SIZE_PX` on the long side) live in `SAMPLES_DIR/.thumbs/step_XXXXXX/`
and are made again only when missing or older than their image. What the folder holds is read by
`catalog.py`; the page itself is `gallery_page.py`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from PIL import Image

from sidecar.confined import ConfinedFolder
from sidecar.publish.catalog import (  # noqa: F401 (STEP_GRID_NAME: publish/step.py reads it here)
    STEP_GRID_NAME,
    find_samples,
    modified_time,
    read_sample_info,
)
from sidecar.publish.files import atomic_write
from sidecar.publish.gallery_page import render_page
from sidecar.publish.infotext import control_images
from sidecar.publish.video import animation_fps, encode_webp, frame_count, load_frames

logger = logging.getLogger("sidecar.publish")

INDEX_NAME = "index.html"
THUMBS_DIR = ".thumbs"  # hidden, so file browsers and `sidecar status` leave it alone
THUMB_SIZE_PX = 256  # long side of a thumbnail; the page shows them at 160 px by default
THUMB_QUALITY = 80  # WebP quality: thumbnails only need to show the picture
# `.thumbs/references/`: thumbnails of the samples' control images (JPEG, which the orphan sweep
# of sample thumbnails leaves alone), named by a hash of the image's path.
REFERENCES_DIR = "references"

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
    if fresh and found.st_mtime >= modified_time(image):  # type: ignore[union-attr]
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
