"""What a samples folder holds, as the gallery and the grids read it: steps, samples, settings.

`find_samples` lists the finished samples per step; `read_sample_info` reads one sample's prompt
(its `.txt`) and settings (its A1111 infotext, `infotext.py`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from sidecar.publish.files import NOTE_PREFIX, VIDEO_SUFFIX
from sidecar.publish.infotext import SampleInfo, parse_infotext, read_infotext
from sidecar.settings import BASELINE_STEP, SamplesFolder

logger = logging.getLogger("sidecar.publish")

STEP_GRID_NAME = "grid.png"  # a step's contact sheet, written by sidecar.publish.grids.write_step_grid
_SAMPLE_FILE = re.compile(r"^sample_(\d{2,})\.(png|jpg|webp)$")


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
            if index not in images or modified_time(candidate) > modified_time(images[index]):
                images[index] = candidate
        if images:
            found[step] = dict(sorted(images.items()))
    return found


def modified_time(path: Path) -> float:
    """`path`'s modification time; 0 when it is gone (a sample replaced meanwhile)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


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
