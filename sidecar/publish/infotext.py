"""A sample's settings as AUTOMATIC1111 writes them ("infotext"): composed, stored, read back, parsed.

A1111/Forge "PNG Info", Civitai and most image viewers show them from:
- PNG: a `parameters` text chunk;
- JPEG / WebP: EXIF UserComment (tag 0x9286) as `UNICODE\\0` + UTF-16 big-endian text,
  what A1111 writes through piexif (done here with Pillow alone).

The gallery and the grids read them back (`parse_infotext`) to caption each sample.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sidecar.arch import arch_spec
from sidecar.errors import SamplerError
from sidecar.plan.request import SampleRequest
from sidecar.samplers import sampler_spec

logger = logging.getLogger("sidecar.publish")

PNG_INFO_KEY = "parameters"  # A1111's text chunk name
EXIF_IFD_POINTER = 0x8769
EXIF_USER_COMMENT = 0x9286
USER_COMMENT_UNICODE = b"UNICODE\x00"  # EXIF character code: UTF-16 follows
USER_COMMENT_ASCII = b"ASCII\x00\x00\x00"
MAX_EXIF_BYTES = 65_533  # one JPEG APP1 segment; longer EXIF cannot be stored
MODEL_FILE_SUFFIXES = {".safetensors", ".ckpt", ".sft", ".gguf", ".pt", ".pth", ".bin"}
CONTROL_IMAGE_KEY = "Control image"  # infotext key of a sample's reference image(s)
MAX_CONTROL_IMAGES = 9  # `Control image`, `Control image 2` ... `Control image 9` are read back

# A1111's infotext parameter line, as its `parse_generation_parameters` reads it.
_INFOTEXT_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_MIN_PARAMS = 3  # a last line with fewer `Key: value` pairs is part of the prompt


# ---------------------------------------------------------------------------------
# Writing
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


def _control_image_key(number: int) -> str:
    return CONTROL_IMAGE_KEY if number == 1 else f"{CONTROL_IMAGE_KEY} {number}"


def infotext(
    request: SampleRequest, *, base_model: str, lora_name: str | None, step: int | None, arch: str
) -> str:
    """The A1111 `parameters` text of one sample.

    Layout (A1111 `create_infotext`): the prompt; `Negative prompt: ...` when there is one
    that the model used; then `Key: value` pairs joined by `, `. On Flux and the other models
    with embedded guidance, `Guidance` is the distilled guidance and `CFG scale` appears only
    when true CFG ran; a negative prompt that such a model ignored (no true CFG) is left out, so
    the text describes what was rendered. An edit model's reference images are `Control image`,
    `Control image 2`... (full paths: the gallery shows them beside the samples).
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
    if spec.guidance == "embedded":
        true_cfg = spec.true_cfg and uses_true_cfg(request)
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
    for number, path in enumerate(request.control_images, start=1):
        params[_control_image_key(number)] = path
    pairs = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None)
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{request.prompt}{negative_line}\n{pairs}".strip()


def exif_with_comment(text: str) -> bytes | None:
    """EXIF bytes holding `text` as UserComment, as piexif's `UserComment.dump(encoding="unicode")`;
    None (with a warning) when it does not fit in one JPEG segment."""
    exif = Image.Exif()
    exif.endian = ">"  # big-endian TIFF header, matching the UTF-16-BE comment
    exif.get_ifd(EXIF_IFD_POINTER)[EXIF_USER_COMMENT] = USER_COMMENT_UNICODE + text.encode("utf-16-be")
    data = exif.tobytes()
    if len(data) > MAX_EXIF_BYTES:
        logger.warning("infotext of %d characters does not fit in EXIF; image saved without it", len(text))
        return None
    return data


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


def control_images(info: SampleInfo) -> list[str]:
    """The reference images a sample was rendered from, as its infotext names them."""
    keys = [_control_image_key(number) for number in range(1, MAX_CONTROL_IMAGES + 1)]
    return [info.params[key] for key in keys if info.params.get(key)]
