"""Sample files: `SAMPLES_DIR/step_{step:06d}/sample_{i:02d}.{png,jpg,webp}` plus `.txt`.

Every file is written atomically: to a hidden temp file in the same folder, flushed
and fsynced, then `os.replace`d over the final name. A viewer, the gallery or a
restarted daemon never sees half a file, and re-rendering a sample after a crash
replaces it instead of adding a second copy. The `.txt` is written first and the
image last, so an image on disk means the sample is complete.

The image carries its settings the way AUTOMATIC1111 writes them ("infotext"), so
A1111/Forge "PNG Info", Civitai and most image viewers show them:
- PNG: a `parameters` text chunk;
- JPEG / WebP: EXIF UserComment (tag 0x9286) as `UNICODE\\0` + UTF-16 big-endian text,
  what A1111 writes through piexif (done here with Pillow alone).

The `.txt` holds the final prompt only, as ai-toolkit's prompt file does; the
negative prompt and the settings are in the image's infotext.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, NamedTuple

from PIL import Image, PngImagePlugin

from sidecar.arch import arch_spec
from sidecar.errors import ConfigError, SamplerError
from sidecar.plan.request import SampleRequest
from sidecar.samplers import sampler_spec
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
PNG_INFO_KEY = "parameters"  # A1111's text chunk name
EXIF_IFD_POINTER = 0x8769
EXIF_USER_COMMENT = 0x9286
USER_COMMENT_UNICODE = b"UNICODE\x00"  # EXIF character code: UTF-16 follows
USER_COMMENT_ASCII = b"ASCII\x00\x00\x00"
MAX_EXIF_BYTES = 65_533  # one JPEG APP1 segment; longer EXIF cannot be stored
MODEL_FILE_SUFFIXES = {".safetensors", ".ckpt", ".sft", ".gguf", ".pt", ".pth", ".bin"}

# Temp files: hidden, named after their target, so a killed process leaves them recognisable.
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.sample_\d+\.(?:png|jpg|webp|txt)\.[0-9a-f]+\.tmp$")


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
# Infotext
# ---------------------------------------------------------------------------------


def _quote(value: object) -> str:
    """A1111's rule: a value holding `,`, `:` or a newline is written as a JSON string."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    """`7.0` -> `7`, `7.5` -> `7.5`: as A1111 infotexts usually read."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _model_name(base_model: str) -> str:
    """A local path becomes its file or folder name (no directories leak into shared images);
    a hub id (`org/name`) is kept."""
    path = Path(base_model).expanduser()
    if not (path.is_absolute() or base_model.startswith((".", "~")) or path.suffix in MODEL_FILE_SUFFIXES):
        return base_model
    return path.stem if path.suffix in MODEL_FILE_SUFFIXES else path.name


def uses_true_cfg(request: SampleRequest) -> bool:
    """Flux runs true CFG (and reads the negative prompt) only above 1 and with a negative prompt."""
    return request.true_cfg_scale > 1.0 and bool(request.negative_prompt.strip())


def infotext(
    request: SampleRequest, *, base_model: str, lora_name: str | None, step: int | None, arch: str
) -> str:
    """The A1111 `parameters` text of one sample.

    Layout (A1111 `create_infotext`): the prompt; `Negative prompt: ...` when there is one
    that the model used; then `Key: value` pairs joined by `, `. On Flux, `Guidance` is the
    distilled guidance and `CFG scale` appears only when true CFG ran; a negative prompt
    that Flux ignored (no true CFG) is left out, so the text describes what was rendered.
    """
    spec = arch_spec(arch)
    try:
        sampler = sampler_spec(spec.name, request.sampler)
        sampler_label, schedule_type = sampler.label, sampler.schedule_type
    except SamplerError:  # metadata must not lose a rendered image; record the name as given
        logger.warning(
            "sampler %r is not valid for %s; writing it to the infotext as is", request.sampler, arch
        )
        sampler_label, schedule_type = request.sampler, None

    negative = request.negative_prompt.strip()
    params: dict[str, str | None] = {
        "Steps": str(request.steps),
        "Sampler": sampler_label,
        "Schedule type": schedule_type,
    }
    if spec.name == "flux":
        true_cfg = uses_true_cfg(request)
        params["CFG scale"] = _number(request.true_cfg_scale) if true_cfg else None
        params["Guidance"] = _number(request.guidance_scale)
        if not true_cfg:
            negative = ""
    else:
        params["CFG scale"] = _number(request.guidance_scale)
    params.update(
        {
            "Seed": str(request.seed),
            "Size": f"{request.width}x{request.height}",
            "Model": _model_name(base_model),
            "Lora": Path(lora_name).name if lora_name else None,
            "Lora strength": _number(request.strength) if lora_name else None,
            "Step": str(step) if step is not None else None,
        }
    )
    pairs = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None)
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{request.prompt}{negative_line}\n{pairs}".strip()


# ---------------------------------------------------------------------------------
# Atomic writing
# ---------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through a temp file in its folder, then `os.replace` it into place.

    The temp file is opened with `x` (not `mkstemp`) so it gets the usual umask permissions
    rather than 0600, and the gallery's web server can read the result.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    try:
        with open(temp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_dir(path.parent)


def _exif_with_comment(text: str) -> bytes | None:
    """EXIF bytes holding `text` as UserComment, as piexif's `UserComment.dump(encoding="unicode")`."""
    exif = Image.Exif()
    exif.endian = ">"  # big-endian TIFF header, matching the UTF-16-BE comment
    exif.get_ifd(EXIF_IFD_POINTER)[EXIF_USER_COMMENT] = USER_COMMENT_UNICODE + text.encode("utf-16-be")
    data = exif.tobytes()
    if len(data) > MAX_EXIF_BYTES:
        logger.warning("infotext of %d characters does not fit in EXIF; image saved without it", len(text))
        return None
    return data


def _encode_image(image: Image.Image, pil_format: str, text: str) -> Callable[[IO[bytes]], None]:
    """A writer that saves `image` in `pil_format` with `text` as its metadata."""
    if pil_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_INFO_KEY, text)  # falls back to iTXt (UTF-8) for non-latin-1 prompts
        return lambda handle: image.save(handle, format="PNG", pnginfo=info)

    exif = _exif_with_comment(text)
    extra = {"exif": exif} if exif else {}
    if pil_format == "JPEG":
        converted = image if image.mode in ("RGB", "L") else image.convert("RGB")
        return lambda handle: converted.save(handle, format="JPEG", quality=JPEG_QUALITY, **extra)
    has_alpha = "A" in image.getbands()
    converted = image if image.mode in ("RGB", "RGBA") else image.convert("RGBA" if has_alpha else "RGB")
    return lambda handle: converted.save(handle, format="WEBP", quality=WEBP_QUALITY, **extra)


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
) -> SamplePaths:
    """Write one sample's `.txt` then its image, each atomically; returns their paths."""
    key = _image_format(image_format)
    paths = sample_paths(samples_dir, step, request.index, key)
    text = infotext(request, base_model=base_model, lora_name=lora_name, step=step, arch=arch)
    prompt_bytes = (request.prompt + "\n").encode("utf-8")
    atomic_write(paths.text, lambda handle: handle.write(prompt_bytes))
    atomic_write(paths.image, _encode_image(image, IMAGE_FORMATS[key][0], text))
    logger.debug("wrote %s", paths.image)
    return paths


def remove_stale_temp_files(samples_dir: Path) -> int:
    """Delete temp files a killed process left in the sample folders; returns how many.

    Run at startup, before rendering: a temp file of a live writer would be removed too.
    """
    root = Path(samples_dir)
    if not root.is_dir():
        return 0
    removed = 0
    for folder in (root, *SamplesFolder(root).step_dirs().values()):
        for candidate in folder.iterdir():
            if _TEMP_NAME.match(candidate.name) and candidate.is_file():
                with contextlib.suppress(FileNotFoundError):
                    candidate.unlink()
                    removed += 1
    if removed:
        logger.info("removed %d unfinished temp file(s) under %s", removed, root)
    return removed


# ---------------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------------


def _decode_user_comment(raw: bytes | str, big_endian: bool) -> str | None:
    if isinstance(raw, str):
        return raw or None
    prefix, body = raw[:8], raw[8:]
    if prefix == USER_COMMENT_UNICODE:
        return body.decode("utf-16-be" if big_endian else "utf-16-le", errors="replace")
    if prefix == USER_COMMENT_ASCII:
        return body.decode("ascii", errors="replace")
    return raw.decode("utf-8", errors="ignore").strip("\x00") or None


def read_infotext(path: Path) -> str | None:
    """The A1111 infotext of a PNG / JPEG / WebP sample, or None if it has none."""
    with Image.open(path) as image:
        if image.format == "PNG":
            text = image.info.get(PNG_INFO_KEY)
            if text is None:
                text = getattr(image, "text", {}).get(PNG_INFO_KEY)
            return str(text) if text is not None else None
        exif = image.getexif()
        raw = exif.get_ifd(EXIF_IFD_POINTER).get(EXIF_USER_COMMENT)
        if not raw:
            return None
        return _decode_user_comment(raw, big_endian=exif.endian != "<")
