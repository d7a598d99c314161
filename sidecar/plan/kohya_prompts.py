"""kohya sd-scripts and musubi-tuner prompt files: `.txt`, `.toml` and `.json`.

As `load_prompts` reads them (sd-scripts `library/train_util.py`, musubi-tuner
`src/musubi_tuner/training/sampling_prompts.py`):

* `.txt`: one prompt per line with flags (`--n`, `--w`, `--h`, `--d`, `--s`, `--l`, `--g`,
  `--ss`; musubi adds `--f` frames, `--i` start image, `--ci` control images), parsed by
  `sidecar.plan.prompts.parse_prompt_flags` as `line_to_prompt_dict` does;
* `.toml`: `[prompt]` holds defaults and each `[[prompt.subset]]` one prompt;
* `.json`: a list of prompt strings (read as `.txt` lines) or of mappings.

A mapping's keys are `line_to_prompt_dict`'s names: `prompt`, `negative_prompt`, `width`,
`height`, `seed`, `sample_steps`, `scale` (CFG; true CFG on Flux), `guidance_scale` (Flux's
embedded guidance), `sample_sampler`; musubi's `cfg_scale` (true CFG), `frame_count`,
`image_path`, `control_image_path`. kohya does not parse flags inside a mapping's prompt,
and neither does sidecar.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

from sidecar.errors import SamplerError
from sidecar.plan.config import TrainerConfig
from sidecar.plan.files import Locator, YamlLocator, pointer
from sidecar.plan.locator import join_path
from sidecar.plan.models import PromptItem
from sidecar.plan.native import Value, unused, validated
from sidecar.plan.prompts import Origin, Source, SourceDialect, prompt_lines
from sidecar.samplers import KOHYA_FALLBACK_SAMPLER, trainer_sampler

logger = logging.getLogger("sidecar.plan")

# kohya prompt key -> PromptItem field, the same on every architecture.
_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "neg",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "sample_steps": "sample_steps",
    "frame_count": "num_frames",
    "image_path": "init_image",
    "control_image_path": "control_images",
}
_GUIDANCE_KEYS = frozenset({"scale", "guidance_scale", "cfg_scale"})
_NOT_RENDERED = {
    "controlnet_image": "ControlNet conditioning",
    "end_image_path": "an end frame",
    "control_video_path": "a control video",
    "one_frame": "one-frame inference",
}
_NO_MEANING = {
    "cfg_trunc_ratio": "a Lumina sampling option",
    "renorm_cfg": "a Lumina sampling option",
    "flow_shift": "sampling uses the base model's shift",
    "discrete_flow_shift": "sampling uses the base model's shift",
    "enum": "kohya's own file numbering",
}


def text_dialect(config: TrainerConfig) -> SourceDialect:
    """Flags in a `.txt` prompt file: musubi's with a musubi config, else kohya's."""
    return "musubi" if config.dialect == "musubi" else "kohya"


def kohya_text_sources(path: Path, text: str, config: TrainerConfig) -> list[Source]:
    dialect = text_dialect(config)
    return [
        Source(line, None, Origin(config, file=path, line=number), dialect)
        for number, line in prompt_lines(text)
    ]


def _guidance(entry: dict[str, Value], config: TrainerConfig, locator: Locator) -> dict[str, Value]:
    """`scale` / `guidance_scale` / `cfg_scale` as the trainer reads them on this architecture."""
    found: dict[str, Value] = {}
    if config.dialect == "musubi":  # trainer_base.sample_image_inference
        names = {"guidance_scale": "guidance_scale", "cfg_scale": "true_cfg_scale"}
    elif config.arch == "flux":  # flux_train_utils.sample_image_inference
        names = {"guidance_scale": "guidance_scale", "scale": "true_cfg_scale"}
    else:
        names = {"scale": "guidance_scale"}
    for key in _GUIDANCE_KEYS & set(entry):
        if key in names:
            found[names[key]] = entry[key]
        else:
            logger.warning(
                "%s `%s` is not used by %s sampling on %s; ignored",
                locator.where(entry[key].path),
                key,
                config.trainer,
                config.spec.label,
            )
    return found


def _sampler(value: Value, config: TrainerConfig, locator: Locator) -> Value | None:
    if config.spec.is_flow_model:
        unused(locator, value.path, f"kohya's {config.spec.label} sampling is always flow-matching Euler")
        return None
    try:
        return Value(trainer_sampler("kohya", str(value.value)), value.path)
    except SamplerError:
        logger.warning(
            "%s `sample_sampler` %r is not a kohya sampler; kohya renders it with %s, and so does sidecar",
            locator.where(value.path),
            value.value,
            KOHYA_FALLBACK_SAMPLER,
        )
        return Value(KOHYA_FALLBACK_SAMPLER, value.path)


def kohya_item(entry: dict[str, Value], config: TrainerConfig, locator: Locator, where: str) -> PromptItem:
    """One prompt mapping as a PromptItem; a bad value is located at its kohya key."""
    values: dict[str, Value] = {"prompt": Value("", where)}  # kohya's default prompt is empty
    for key, value in entry.items():
        if key in _KEYS:
            if key == "control_image_path" and isinstance(value.value, str):
                value = Value([value.value], value.path)
            values[_KEYS[key]] = value
        elif key == "sample_sampler":
            sampler = _sampler(value, config, locator)
            if sampler is not None:
                values["sampler"] = sampler
        elif key in _NOT_RENDERED:
            logger.warning(
                "%s `%s` (%s) is not rendered by sidecar; ignored",
                locator.where(value.path),
                key,
                _NOT_RENDERED[key],
            )
        elif key in _NO_MEANING:
            unused(locator, value.path, _NO_MEANING[key])
        elif key not in _GUIDANCE_KEYS:
            nearest = difflib.get_close_matches(key, [*_KEYS, *_GUIDANCE_KEYS, "sample_sampler"], n=1)
            hint = f"; did you mean `{nearest[0]}`?" if nearest else ""
            logger.warning("%s unknown key `%s` is ignored%s", locator.where(value.path), key, hint)
    values.update(_guidance(entry, config, locator))
    return validated(PromptItem, values, locator)


def kohya_toml_sources(
    path: Path, data: dict[str, Any], locator: YamlLocator, config: TrainerConfig
) -> list[Source]:
    """`[prompt]` defaults merged into each `[[prompt.subset]]`, the subset's keys winning."""
    table = data.get("prompt")
    subsets = table.get("subset") if isinstance(table, dict) else None
    if not isinstance(subsets, list):
        raise locator.error(
            "prompt.subset" if isinstance(table, dict) else "",
            "must hold `[[prompt.subset]]` entries, one per prompt (kohya's .toml prompt file)",
        )
    defaults = {key: Value(value, f"prompt.{key}") for key, value in table.items() if key != "subset"}
    sources = []
    for index, subset in enumerate(subsets):
        where = f"prompt.subset[{index}]"
        if not isinstance(subset, dict):
            raise locator.error(where, "must be a table of prompt settings")
        entry = {**defaults, **{key: Value(value, join_path(where, key)) for key, value in subset.items()}}
        item = kohya_item(entry, config, locator, where)
        origin = Origin(config, file=path, line=locator.line(where), key=where)
        sources.append(Source(item.prompt, item, origin, "plain"))
    return sources


def kohya_json_sources(path: Path, data: list[Any], locator: Locator, config: TrainerConfig) -> list[Source]:
    """A list of strings (read as `.txt` lines, flags and all) or of prompt mappings."""
    sources = []
    for index, entry in enumerate(data):
        where = pointer(index)
        origin = Origin(config, file=path, key=where)
        if isinstance(entry, str):
            if entry.strip():
                sources.append(Source(entry.strip(), None, origin, text_dialect(config)))
            continue
        if not isinstance(entry, dict):
            raise locator.error(where, "must be a prompt string or a mapping of prompt settings")
        values = {str(key): Value(value, pointer(index, key)) for key, value in entry.items()}
        item = kohya_item(values, config, locator, where)
        sources.append(Source(item.prompt, item, origin, "plain"))
    return sources
