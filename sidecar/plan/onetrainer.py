"""OneTrainer: the `config.json` a run is started with, and its sample list, as a plan.

Where each field is defined (github.com/Nerogar/OneTrainer):

* `modules/util/config/TrainConfig.py`: `model_type`, `training_method`, `base_model_name`,
  `workspace_dir`, `output_model_destination`, `vae.model_name`, `sample_definition_file_name`,
  `samples` (inline, as the copy in `<workspace>/config/` holds them: `to_pack_dict`),
  `sample_after` + `sample_after_unit`, `sample_skip_first`, `sample_image_format`;
  the units are `modules/util/enum/TimeUnit.py`, applied by `modules/util/TimedActionMixin.py`
  (STEP and EPOCH count, SECOND / MINUTE / HOUR measure wall time since the last sample);
* `modules/util/config/SampleConfig.py`: each sample's `enabled`, `prompt`, `negative_prompt`,
  `height`, `width`, `seed`, `random_seed`, `diffusion_steps`, `cfg_scale`, `noise_scheduler`,
  and their defaults per model type (`_get_model_defaults`);
* `modules/modelSampler/`: sizes are rounded to the nearest multiple of 64
  (`BaseModelSampler.quantize_resolution`); `random_seed` seeds each sample anew
  (`generator.seed()`); the Flux and SD3 samplers use the model's own flow-matching
  scheduler whatever `noise_scheduler` says, and the Flux sampler passes `cfg_scale` as the
  embedded guidance and never uses the negative prompt (`FluxSampler.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sidecar.arch import Arch
from sidecar.errors import SamplerError
from sidecar.plan.config import TrainerConfig, resolve_relative
from sidecar.plan.files import Locator, pointer, read_json
from sidecar.plan.models import ModelConfig, PromptItem, SampleConfig
from sidecar.plan.native import (
    Value,
    checked,
    find_beside,
    prompt_file,
    trainer_config,
    unread,
    unused,
    validated,
)
from sidecar.plan.prompts import Origin, Source
from sidecar.plan.request import Cadence
from sidecar.samplers import trainer_sampler
from sidecar.values import as_bool, as_number, as_text, choice

logger = logging.getLogger("sidecar.plan")

ONETRAINER = "OneTrainer"
SIZE_QUANTUM = 64  # px; OneTrainer rounds sample sizes to the nearest multiple
SECONDS_PER = {"SECOND": 1, "MINUTE": 60, "HOUR": 3600}

_MODEL_TYPES: dict[str, Arch | str] = {
    "STABLE_DIFFUSION_XL_10_BASE": "sdxl",
    "STABLE_DIFFUSION_3": "sd3",
    "STABLE_DIFFUSION_35": "sd3",
    "FLUX_DEV_1": "flux",
    "STABLE_DIFFUSION_XL_10_BASE_INPAINTING": "SDXL inpainting",
    "FLUX_FILL_DEV_1": "Flux Fill (inpainting)",
}
# `_get_model_defaults`: (size, diffusion_steps, cfg_scale, noise_scheduler)
_SAMPLE_DEFAULTS: dict[Arch, tuple[int, int, float, str]] = {
    "sdxl": (1024, 30, 7.5, "EULER_A"),
    "sd3": (1024, 28, 7.0, "DDIM"),
    "flux": (1024, 30, 3.5, "DDIM"),
}
DEFAULT_SEED = 42  # SampleConfig.default_values
DEFAULT_SAMPLE_FILE = "training_samples/samples.json"  # TrainConfig.default_values, from OneTrainer's folder
_UNITS = ("EPOCH", "STEP", "SECOND", "MINUTE", "HOUR", "NEVER", "ALWAYS")
# Sample keys whose non-default values change OneTrainer's image but not sidecar's: said at -v.
_SAMPLE_UNUSED: dict[str, tuple[object, str]] = {
    "frames": (1, "video models only"),
    "length": (10.0, "video models only"),
    "text_encoder_1_layer_skip": (0, "sidecar renders with the text encoders' default layers"),
    "text_encoder_2_layer_skip": (0, "sidecar renders with the text encoders' default layers"),
    "text_encoder_3_layer_skip": (0, "sidecar renders with the text encoders' default layers"),
    "text_encoder_4_layer_skip": (0, "sidecar renders with the text encoders' default layers"),
    "text_encoder_1_sequence_length": (None, "sidecar uses the pipeline's sequence length"),
    "text_encoder_2_sequence_length": (None, "sidecar uses the pipeline's sequence length"),
    "transformer_attention_mask": (False, "sidecar uses the pipeline's attention mask"),
    "force_last_timestep": (False, "the base model's scheduler config decides"),
    "sample_inpainting": (False, "sidecar renders text-to-image"),
    "base_image_path": ("", "sidecar renders text-to-image"),
    "mask_image_path": ("", "sidecar renders text-to-image"),
}
_SAMPLE_KEYS = frozenset(
    {"__version", "enabled", "prompt", "negative_prompt", "height", "width", "seed", "random_seed"}
    | {"diffusion_steps", "cfg_scale", "noise_scheduler"}
    | set(_SAMPLE_UNUSED)
)
# Keys only a OneTrainer sample has (kohya's `.json` prompt mappings share `negative_prompt`).
ONETRAINER_SAMPLE_MARKERS = frozenset(
    {"diffusion_steps", "noise_scheduler", "random_seed", "enabled", "__version"}
)


# Config keys sidecar reads (the rest are training settings, listed at `-v` by `unread`).
_READ = frozenset(
    {"__version", "model_type", "training_method", "base_model_name", "workspace_dir", "vae"}
    | {"output_model_destination", "sample_definition_file_name", "samples", "sample_after"}
    | {"sample_after_unit", "sample_skip_first", "sample_image_format", "samples_to_tensorboard"}
    | {"lora_model_name"}
)


def is_onetrainer_config(data: object) -> bool:
    return (
        isinstance(data, dict)
        and "model_type" in data
        and ("base_model_name" in data or "sample_definition_file_name" in data)
    )


def is_onetrainer_sample_list(data: object) -> bool:
    return isinstance(data, list) and any(
        isinstance(entry, dict) and ONETRAINER_SAMPLE_MARKERS & set(entry) for entry in data
    )


def _nearest(value: int) -> int:
    return max(SIZE_QUANTUM, round(value / SIZE_QUANTUM) * SIZE_QUANTUM)


def _size(value: Value, locator: Locator) -> int:
    number = int(checked(value, as_number, locator))
    rounded = _nearest(number)
    if rounded != number:
        logger.debug(
            "%s %d is rendered at %d, as OneTrainer rounds sizes to %d px",
            locator.where(value.path),
            number,
            rounded,
            SIZE_QUANTUM,
        )
    return rounded


def sample_item(entry: dict[str, Any], arch: Arch, locator: Locator, where: str) -> PromptItem | None:
    """One sample of the list, with OneTrainer's defaults for the model type; None if disabled."""
    size, steps, cfg, scheduler = _SAMPLE_DEFAULTS[arch]
    at = {key: Value(value, f"{where}/{key}") for key, value in entry.items()}
    if "enabled" in at and not checked(at["enabled"], as_bool, locator):
        logger.debug("%s skipped: `enabled` is false, as OneTrainer skips it", locator.where(where))
        return None
    for key, (default, why) in _SAMPLE_UNUSED.items():
        if key in at and at[key].value not in (default, None):
            unused(locator, at[key].path, why)
    for key in sorted(set(at) - _SAMPLE_KEYS):
        logger.warning("%s unknown OneTrainer sample key `%s` is ignored", locator.where(at[key].path), key)
    negative = at.get("negative_prompt", Value("", where))
    if arch == "flux" and negative.value:
        unused(locator, negative.path, "OneTrainer's Flux sampler never uses the negative prompt")
        negative = Value("", negative.path)
    values = {
        "prompt": at.get("prompt", Value("", where)),
        "neg": negative,
        "width": Value(
            _size(at["width"], locator) if "width" in at else size, at.get("width", Value(0, where)).path
        ),
        "height": Value(
            _size(at["height"], locator) if "height" in at else size, at.get("height", Value(0, where)).path
        ),
        "seed": at.get("seed", Value(DEFAULT_SEED, where)),
        "random_seed": at.get("random_seed", Value(False, where)),
        "sample_steps": at.get("diffusion_steps", Value(steps, where)),
        "guidance_scale": at.get("cfg_scale", Value(cfg, where)),
        "true_cfg_scale": Value(1.0, where),
        "sampler": _sampler(at.get("noise_scheduler", Value(scheduler, where)), arch, locator),
    }
    return validated(PromptItem, values, locator)


def _sampler(value: Value, arch: Arch, locator: Locator) -> Value:
    name = checked(value, as_text, locator)
    try:
        canonical = trainer_sampler("onetrainer", name)
    except SamplerError as error:
        raise locator.error(value.path, str(error)) from None
    if arch != "sdxl":
        if name.upper() != "DDIM":
            unused(
                locator,
                value.path,
                f"OneTrainer's {arch} sampler always uses the model's flow-matching scheduler",
            )
        return Value("flowmatch", value.path)
    return Value(canonical, value.path)


def onetrainer_sources(
    path: Path, data: list[Any], locator: Locator, config: TrainerConfig, *, prefix: str = ""
) -> list[Source]:
    """A sample list (the separate file, or a config's inline `samples` under `prefix`)."""
    sources = []
    for index, entry in enumerate(data):
        where = f"{prefix}{pointer(index)}"
        if not isinstance(entry, dict):
            raise locator.error(where, "must be a mapping of sample settings")
        item = sample_item(entry, config.arch, locator, where)
        if item is not None:
            sources.append(Source(item.prompt, item, Origin(config, file=path, key=where), "plain"))
    return sources


def _cadence(data: dict[str, Any], locator: Locator) -> tuple[int | None, Cadence | None]:
    """`sample_after` in its unit, from `sample_skip_first` on: (sample_every, cadence)."""
    unit = checked(
        Value(data.get("sample_after_unit", "MINUTE"), "/sample_after_unit"),
        choice(*(u.lower() for u in _UNITS)),
        locator,
    ).upper()
    every = checked(Value(data.get("sample_after", 10), "/sample_after"), as_number, locator)
    skip = checked(Value(data.get("sample_skip_first", 0), "/sample_skip_first"), as_number, locator)
    if unit in ("NEVER", "ALWAYS") or every <= 0:
        what = "never samples" if unit == "NEVER" or every <= 0 else "samples at every step"
        logger.info(
            "%s OneTrainer %s during training; sidecar renders every checkpoint",
            locator.where("/sample_after_unit"),
            what,
        )
        return None, None
    start_step = int(skip) if unit == "STEP" else 0
    start_epoch = int(skip) if unit == "EPOCH" else 0
    if skip and unit in SECONDS_PER:
        unused(locator, "/sample_skip_first", "a time since training started, which sidecar does not know")
    if unit == "STEP":
        return int(every), Cadence(start_step=start_step) if start_step else None
    if unit == "EPOCH":
        return None, Cadence(every=int(every), unit="epoch", start_epoch=start_epoch)
    return None, Cadence(every=every * SECONDS_PER[unit], unit="second")


def _arch(data: dict[str, Any], locator: Locator) -> Arch:
    model_type = checked(Value(data.get("model_type"), "/model_type"), as_text, locator)
    found = _MODEL_TYPES.get(model_type)
    if found not in ("sdxl", "sd3", "flux"):
        what = found or model_type
        raise locator.error("/model_type", f"{what!r} is not a model sidecar renders (SDXL, SD 3.5, Flux.1)")
    return found  # type: ignore[return-value]


def read_onetrainer_config(path: Path) -> TrainerConfig:
    """A OneTrainer `config.json`; errors located by JSON pointer."""
    data, locator = read_json(path)
    base = path.resolve().parent
    arch = _arch(data, locator)
    if data.get("training_method", "LORA") != "LORA":
        logger.warning(
            "%s `training_method` is %s: sidecar renders LoRA checkpoints; whole-model saves fail to apply",
            locator.where("/training_method"),
            data.get("training_method"),
        )
    every, cadence = _cadence(data, locator)
    unread(locator, data, _READ)
    image_format = str(data.get("sample_image_format", "JPG")).lower()
    for key, why in (
        ("samples_to_tensorboard", "pass --tensorboard DIR to sidecar"),
        ("lora_model_name", "a LoRA to resume from"),
    ):
        if data.get(key):
            unused(locator, pointer(key), why)
    model: dict[str, Any] = {
        "name_or_path": resolve_relative(
            checked(Value(data.get("base_model_name"), "/base_model_name"), as_text, locator), base
        ),
        "arch": arch,
    }
    vae = data.get("vae")
    if isinstance(vae, dict) and vae.get("model_name"):
        model["vae_path"] = resolve_relative(str(vae["model_name"]), base)
    inline = data.get("samples")
    if inline is None:
        where = Value(
            data.get("sample_definition_file_name", DEFAULT_SAMPLE_FILE), "/sample_definition_file_name"
        )
        prompts = prompt_file(where, base, locator)
    elif isinstance(inline, list):
        prompts = path.resolve()  # the copy in <workspace>/config/ holds its samples inline
    else:
        raise locator.error("/samples", "must be a list of samples or null")
    workspace = data.get("workspace_dir", "workspace/run")
    config = trainer_config(
        path,
        name=Path(str(data.get("output_model_destination", "model"))).stem,
        arch=arch,
        model=ModelConfig.model_validate(model),
        sample=SampleConfig(
            sample_every=every, format="png" if image_format == "png" else "jpg", seed=DEFAULT_SEED
        ),
        locator=locator,
        trainer=ONETRAINER,
        output_dir=find_beside(str(workspace), base) or Path(str(workspace)),
        prompts_file=prompts,
        dialect="aitoolkit",
        cadence=cadence,
        native={"sample": (locator, "/samples" if inline is not None else "/sample_definition_file_name")},
    )
    return config
