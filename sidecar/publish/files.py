"""Sample files: `SAMPLES_DIR/step_{step:06d}/sample_{i:02d}.{png,jpg,webp}` plus `.txt`.

Every file is written atomically: to a hidden temp file in the same folder, flushed
and fsynced, then `os.replace`d over the final name. A viewer, the gallery or a
restarted daemon never sees half a file, and re-rendering a sample after a crash
replaces it instead of adding a second copy. The `.txt` is written first and the
image last, so an image on disk means the sample is complete.

The image carries its settings the way AUTOMATIC1111 writes them (`infotext.py`), so
A1111/Forge "PNG Info", Civitai and most image viewers show them.

The `.txt` holds the final prompt only, as ai-toolkit's prompt file does; the
negative prompt and the settings are in the image's infotext.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, NamedTuple

from PIL import Image, PngImagePlugin

from sidecar.confined import ConfinedFolder, UnsafeEntryError
from sidecar.errors import ConfigError, TransientError
from sidecar.plan.request import SampleRequest
from sidecar.publish.infotext import PNG_INFO_KEY, exif_with_comment, infotext
from sidecar.settings import SAMPLE_STEM_FORMAT, SamplesFolder

logger = logging.getLogger("sidecar.publish")

# `format:` value -> (Pillow format, file suffix)
IMAGE_FORMATS: dict[str, tuple[str, str]] = {
    "png": ("PNG", ".png"),
    "jpg": ("JPEG", ".jpg"),
    "webp": ("WEBP", ".webp"),
}
FORMAT_ALIASES = {"jpeg": "jpg"}
JPEG_QUALITY = 95
WEBP_QUALITY = 95
VIDEO_SUFFIX = ".mp4"  # beside an animated sample's WebP (`sidecar.publish.video`)

# Temp files: hidden, named after their target (`sidecar.confined`), so a killed process leaves
# them recognisable.
NOTE_PREFIX = "sidecar note: "  # a line of the `.txt` that is not part of the prompt
# Write errors that pass (disk full, quota, I/O error, busy file), retried after each wait (s).
TRANSIENT_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EBUSY, errno.EAGAIN})
WRITE_RETRY_SECONDS = (0.5, 1.0, 2.0, 4.0)
_TEMP_NAME = re.compile(r"^\.sample_\d+\.(?:png|jpg|webp|mp4|txt)\.[0-9a-f]+\.tmp$")


class SampleWriteError(TransientError):
    """A sample could not be written for a reason that passes (disk full, I/O error, busy file).

    Nothing half-written is left; the daemon renders the sample again once it can write.
    """


class SamplePaths(NamedTuple):
    """Where one sample's files go."""

    image: Path
    text: Path


def _image_format(image_format: str) -> str:
    key = str(image_format).strip().lower().lstrip(".")
    key = FORMAT_ALIASES.get(key, key)
    if key not in IMAGE_FORMATS:
        valid = ", ".join(sorted([*IMAGE_FORMATS, *FORMAT_ALIASES]))
        raise ConfigError(f"`format` must be one of {valid}, got {image_format!r}")
    return key


def step_dir(samples_dir: Path, step: int) -> Path:
    """The folder of one checkpoint's samples: `step_000500`."""
    return SamplesFolder(Path(samples_dir)).step(step)


def sample_paths(samples_dir: Path, step: int, index: int, image_format: str = "png") -> SamplePaths:
    """The image and prompt file of sample `index` at `step`."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"`index` must be a non-negative integer, got {index!r}")
    suffix = IMAGE_FORMATS[_image_format(image_format)][1]
    folder = step_dir(samples_dir, step)
    stem = SAMPLE_STEM_FORMAT.format(index=index)
    return SamplePaths(image=folder / f"{stem}{suffix}", text=folder / f"{stem}.txt")


# ---------------------------------------------------------------------------------
# Atomic writing
# ---------------------------------------------------------------------------------


def _parent_folder(path: Path, root: Path | None) -> ConfinedFolder:
    """The folder `path` goes in, opened; below `root` every folder is a real one, made when missing.

    `root` (the samples folder) is opened as named; nothing below it is followed. Without
    `root` the parent is opened as named (a file the user chose, e.g. `sidecar grid -o`).
    """
    if root is None:
        return ConfinedFolder.open(path.parent, create=True)
    try:
        parts = path.parent.relative_to(root).parts
    except ValueError:
        raise ValueError(f"`path` must lie inside `root` {root}, got {path}") from None
    with ConfinedFolder.open(root, create=True) as top:
        return top.folders(parts)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], *, root: Path | None = None) -> None:
    """Write `path` through a temp file in its folder, fsync, then rename it into place.

    Nothing is written or deleted through a symlink; with `root`, no folder between `root`
    and `path` may be one (`sidecar.confined`). The temp file gets the usual umask
    permissions (not `mkstemp`'s 0600), so the gallery's web server can read the result.
    """
    with _parent_folder(Path(path), root) as folder:
        folder.write_atomic(Path(path).name, write)


def _encode_image(image: Image.Image, pil_format: str, text: str) -> Callable[[IO[bytes]], None]:
    """A writer that saves `image` in `pil_format` with `text` as its metadata."""
    if pil_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_INFO_KEY, text)  # falls back to iTXt (UTF-8) for non-latin-1 prompts
        return lambda handle: image.save(handle, format="PNG", pnginfo=info)

    exif = exif_with_comment(text)
    extra = {"exif": exif} if exif else {}
    if pil_format == "JPEG":
        converted = image if image.mode in ("RGB", "L") else image.convert("RGB")
        return lambda handle: converted.save(handle, format="JPEG", quality=JPEG_QUALITY, **extra)
    has_alpha = "A" in image.getbands()
    converted = image if image.mode in ("RGB", "RGBA") else image.convert("RGBA" if has_alpha else "RGB")
    return lambda handle: converted.save(handle, format="WEBP", quality=WEBP_QUALITY, **extra)


def is_transient_write_error(error: OSError) -> bool:
    """A write error that passes: the disk fills and frees, a device hiccups, a file is busy."""
    return error.errno in TRANSIENT_WRITE_ERRNOS


def write_sample(
    samples_dir: Path,
    step: int,
    request: SampleRequest,
    image: Image.Image,
    *,
    image_format: str = "png",
    base_model: str,
    lora_name: str | None,
    arch: str,
    note: str | None = None,
    retry_seconds: Sequence[float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SamplePaths:
    """Write one sample's `.txt` then its image, each atomically; returns their paths.

    A transient error (disk full, I/O error, busy) is retried after each wait in
    `retry_seconds` (default `WRITE_RETRY_SECONDS`), then raised as `SampleWriteError`; no
    half-written file is left either way. `note` is added to the `.txt` (`NOTE_PREFIX`).
    """
    key = _image_format(image_format)
    paths = sample_paths(samples_dir, step, request.index, key)
    text = infotext(request, base_model=base_model, lora_name=lora_name, step=step, arch=arch)
    encode = _encode_image(image, IMAGE_FORMATS[key][0], text)

    def write() -> None:
        write_prompt_file(samples_dir, paths.text, request.prompt, note=note)
        atomic_write(paths.image, encode, root=samples_dir)

    write_retrying(paths.image, write, retry_seconds=retry_seconds, sleep=sleep)
    return paths


def write_retrying(
    target: Path,
    write: Callable[[], None],
    *,
    retry_seconds: Sequence[float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Run `write` (a sample's atomic writes, its main file `target` last), again after each wait in
    `retry_seconds` on a transient error; then `SampleWriteError`. Nothing half-written is left."""
    waits = list(WRITE_RETRY_SECONDS if retry_seconds is None else retry_seconds)
    tries = len(waits) + 1
    while True:
        try:
            write()
            break
        except OSError as error:
            if not is_transient_write_error(error):
                raise
            if not waits:
                raise SampleWriteError(
                    f"cannot write {target}: {error.strerror or error} (tried {tries} times); "
                    "nothing half-written is left, and the sample is rendered again later"
                ) from error
            wait = waits.pop(0)
            logger.warning("cannot write %s (%s); trying again in %.1f s", target, error.strerror, wait)
            sleep(wait)
    logger.debug("wrote %s", target)


def write_prompt_file(samples_dir: Path, path: Path, prompt: str, *, note: str | None = None) -> None:
    """A sample's `.txt`: the final prompt, then a `NOTE_PREFIX` line when there is a note."""
    text = prompt + "\n" + (f"{NOTE_PREFIX}{note}\n" if note else "")
    data = text.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data), root=samples_dir)


def link_sample(
    samples_dir: Path, step: int, request: SampleRequest, source: Path, *, note: str
) -> SamplePaths | None:
    """Sample `request.index` at `step` as a hard link of `source`, another step's image of it.

    For a checkpoint whose bytes equal an earlier one's: its image would be the same. The
    `.txt` is written (with `note`) before the image appears, as for a rendered sample. A
    filesystem without hard links gets a copy. None when `source` is gone (render it then).
    Both folders must lie in `samples_dir`; nothing is followed through a symlink.
    """
    paths = sample_paths(samples_dir, step, request.index, source.suffix)
    if paths.image == source:  # a final at the step its metadata names: the image is already there
        return paths
    root = Path(samples_dir)
    try:
        source_parts = source.parent.relative_to(root).parts
    except ValueError:
        return None
    with ConfinedFolder.open(root) as top:
        try:
            source_folder = top.folders(source_parts, create=False)
        except FileNotFoundError:
            return None
        with source_folder:
            if source_folder.kind(source.name) is None:
                return None
            write_prompt_file(samples_dir, paths.text, request.prompt, note=note)
            # A video sample's MP4 (`publish/video.py`) first: its image on disk means it is complete.
            companion = source.with_suffix(VIDEO_SUFFIX).name
            names = [companion] if source_folder.kind(companion) == "file" else []
            with top.folders(paths.image.parent.relative_to(root).parts) as folder:
                for name in [*names, source.name]:
                    target = paths.image.with_suffix(Path(name).suffix).name
                    try:
                        folder.link_atomic(source_folder, name, target)
                    except FileNotFoundError:
                        return None
                    except OSError as error:  # EPERM, EXDEV, EMLINK: no hard link here; a copy will do
                        logger.debug("cannot hard-link %s (%s); copying it", name, error)
                        data = source_folder.read_bytes(name)
                        folder.write_atomic(target, lambda handle, data=data: handle.write(data))
    return paths


def remove_stale_temp_files(samples_dir: Path) -> int:
    """Delete temp files a killed process left in the sample folders; returns how many.

    Run at startup, before rendering: a temp file of a live writer would be removed too.
    Deletes only inside the samples folder: a step folder that is a symlink is left alone.
    """
    root = Path(samples_dir)
    if not root.is_dir():
        return 0
    removed = 0
    with ConfinedFolder.open(root) as top:
        folders = [ConfinedFolder(os.dup(top.fd), root)]
        for folder in SamplesFolder(root).step_dirs().values():
            try:
                folders.append(top.folder(folder.name, create=False))
            except (UnsafeEntryError, OSError) as error:
                logger.warning("not cleaning %s: %s", folder, error)
        for folder in folders:
            with folder:
                for name in folder.entries():
                    if _TEMP_NAME.match(name) and folder.kind(name) == "file" and folder.unlink(name):
                        removed += 1
    if removed:
        logger.info("removed %d unfinished temp file(s) under %s", removed, root)
    return removed
