"""SimpleTuner: `config.json`, `config.toml` or `config.env`, and `--user_prompt_library`, as a plan.

Where each field is defined (github.com/bghira/SimpleTuner):

* the files: `simpletuner/helpers/configuration/{json_file,toml_file,env_file,loader}.py`:
  a mapping of command-line arguments, with or without the leading `--` (JSON, TOML), or
  shell variables mapped by `env_to_args_map` plus `TRAINER_EXTRA_ARGS` (`.env`);
* the arguments and their defaults: `simpletuner_sdk/server/services/field_registry/sections/`
  (`model.py`: `--model_family`, `--model_flavour`, `--model_type`, `--lora_type`,
  `--pretrained_model_name_or_path`, `--pretrained_vae_model_name_or_path`, `--output_dir`,
  `--seed`; `validation.py`: `--validation_prompt`, `--validation_negative_prompt`
  ("blurry, cropped, ugly"), `--validation_guidance` (7.5), `--validation_guidance_real`,
  `--validation_num_inference_steps` (30), `--validation_resolution` ("256"),
  `--validation_seed`, `--validation_randomize`, `--validation_step_interval` (alias
  `--validation_steps`, 100), `--validation_epoch_interval`, `--validate_after_step`,
  `--validation_noise_scheduler`, `--validation_disable_unconditional`,
  `--validation_lycoris_strength`, `--validation_adapter_strength`, `--user_prompt_library`,
  `--validation_image_format`, `--num_validation_images`);
* how validation uses them: `simpletuner/helpers/training/validation.py`
  (`prepare_validation_prompt_list`: an unconditional (empty) prompt first unless
  `--validation_disable_unconditional`, then the library, then `--validation_prompt`;
  `parse_validation_resolutions`: `W`, `WxH` or a comma list, every prompt at each size,
  values under 128 are megapixels (`cmd_args.py`); `_get_generator`: `validation_seed or
  seed or 0` for every prompt unless `--validation_randomize`; `_baseline_adapter_strength`);
  the base model when no path is given: each model's `HUGGINGFACE_PATHS` and
  `DEFAULT_MODEL_FLAVOUR` (`simpletuner/helpers/models/{sdxl,sd3,flux}/model.py`);
* the prompt library: `PromptHandler.load_user_prompts` and `PromptLibraryEntry.from_payload`
  (`simpletuner_sdk/server/services/prompt_library_service.py`): a JSON object of
  shortname -> prompt string, or -> `{"prompt"|"caption"|"tags": ..., "adapter_strength": ...}`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sidecar.arch import Arch
from sidecar.errors import SamplerError
from sidecar.plan.config import TrainerConfig, resolve_relative
from sidecar.plan.files import Locator, pointer
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
from sidecar.plan.simpletuner_files import is_simpletuner_args, read_args
from sidecar.samplers import trainer_sampler
from sidecar.values import (
    as_bool,
    as_non_negative_int,
    as_non_negative_number,
    as_positive_int,
    as_text,
    show,
)

logger = logging.getLogger("sidecar.plan")

SIMPLETUNER = "SimpleTuner"
CONFIG_DIR_NAME = "config"  # SimpleTuner reads config/<env>/config.* relative to its own folder
FAMILIES: dict[str, Arch] = {"sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
HUB_PATHS: dict[Arch, tuple[str, dict[str, str]]] = {  # (default flavour, flavour -> hub id)
    "sdxl": ("base-1.0", {"base-1.0": "stabilityai/stable-diffusion-xl-base-1.0"}),
    "sd3": (
        "medium",
        {
            "medium": "stabilityai/stable-diffusion-3.5-medium",
            "large": "stabilityai/stable-diffusion-3.5-large",
        },
    ),
    "flux": (
        "krea",
        {
            "dev": "black-forest-labs/flux.1-dev",
            "krea": "black-forest-labs/flux.1-krea-dev",
            "schnell": "black-forest-labs/flux.1-schnell",
            "kontext": "black-forest-labs/flux.1-kontext-dev",
        },
    ),
}
DEFAULT_SAMPLERS: dict[Arch, str] = {"sdxl": "ddim", "sd3": "flowmatch", "flux": "flowmatch"}
DEFAULTS: dict[str, object] = {
    "validation_negative_prompt": "blurry, cropped, ugly",
    "validation_guidance": 7.5,
    "validation_num_inference_steps": 30,
    "validation_resolution": "256",
    "validation_step_interval": 100,
    "validation_image_format": "png",
    "output_dir": "simpletuner-results",
}
MEGAPIXEL_LIMIT = 128  # `validation_resolution` below this is megapixels (cmd_args.py)
# Arguments sidecar reads (the rest are training settings, listed at `-v` by `unread`).
_READ = frozenset(
    {"model_family", "model_flavour", "model_type", "lora_type", "pretrained_model_name_or_path"}
    | {"pretrained_vae_model_name_or_path", "output_dir", "seed", "user_prompt_library"}
    | {"validation_seed", "validation_prompt", "validation_negative_prompt", "validation_guidance"}
    | {"validation_guidance_real", "validation_num_inference_steps", "validation_resolution"}
    | {"validation_randomize", "validation_step_interval", "validation_epoch_interval"}
    | {"validate_after_step", "validate_after_epoch", "validation_noise_scheduler"}
    | {"validation_disable_unconditional", "validation_lycoris_strength", "validation_adapter_strength"}
    | {"validation_image_format", "validation_num_video_frames", "validation_prompt_library"}
    | {"validation_disable", "num_validation_images"}
)
_UNUSED = {
    "validation_guidance_rescale": "sidecar renders without guidance rescale",
    "validation_guidance_skip_layers": "sidecar renders without skip-layer guidance",
    "validation_torch_compile": "a render-speed option of SimpleTuner's",
    "validation_seed_source": "sidecar draws noise as the diffusers pipeline does",
    "validation_using_datasets": "sidecar renders text-to-image",
}


def _given(args: dict[str, Value], name: str) -> Value | None:
    """An argument as SimpleTuner takes it: absent, empty, null and "None" mean not given."""
    value = args.get(name)
    if (
        value is None
        or value.value is None
        or (isinstance(value.value, str) and value.value.strip() in ("", "None"))
    ):
        return None
    return value


def _arg(args: dict[str, Value], name: str, rule: Any, locator: Locator) -> Value:
    """The argument, checked by `rule`, with where it was written; else SimpleTuner's default."""
    given = _given(args, name)
    if given is None:
        return Value(DEFAULTS.get(name), "")
    return Value(checked(given, rule, locator), given.path)


def _value(args: dict[str, Value], name: str, rule: Any, locator: Locator) -> Any:
    return _arg(args, name, rule, locator).value


def _resolutions(value: Value | None, locator: Locator) -> tuple[tuple[int, int], ...]:
    text = str(value.value if value is not None else DEFAULTS["validation_resolution"])
    sizes = []
    for part in text.split(","):
        piece = part.strip().lower()
        try:
            if "x" in piece:
                width, height = (int(side) for side in piece.split("x"))
            else:
                number = float(piece)
                if number < MEGAPIXEL_LIMIT:  # megapixels: 1 -> 1024, else x1000 to a multiple of 8
                    number = 1024 if int(number) == 1 else int(int(number) * 1e3) // 8 * 8
                width = height = int(number)
        except ValueError:
            raise locator.error(
                value.path if value else "", f"must be W, WxH or a comma list of them, got {show(text)}"
            ) from None
        sizes.append((width, height))
    return tuple(sizes)


def _cadence(args: dict[str, Value], locator: Locator) -> tuple[int | None, Cadence | None]:
    step_every = _value(args, "validation_step_interval", as_non_negative_int, locator)
    epoch_every = _value(args, "validation_epoch_interval", as_non_negative_int, locator)
    start_step = _value(args, "validate_after_step", as_non_negative_int, locator) or 0
    start_epoch = _value(args, "validate_after_epoch", as_non_negative_int, locator) or 0
    if epoch_every and _given(args, "validation_step_interval") is None:
        step_every = None  # only the epoch interval was asked for
    cadence = None
    if epoch_every or start_step or start_epoch:
        cadence = Cadence(
            every=epoch_every or None,
            unit="epoch" if epoch_every else "step",
            start_step=start_step,
            start_epoch=start_epoch,
        )
    return (step_every or None), cadence


def _base_model(args: dict[str, Value], arch: Arch, root: Path, locator: Locator) -> str:
    given = _given(args, "pretrained_model_name_or_path")
    if given is not None:
        return resolve_relative(checked(given, as_text, locator), root)
    default_flavour, paths = HUB_PATHS[arch]
    flavour = _given(args, "model_flavour")
    name = str(flavour.value) if flavour is not None else default_flavour
    if name not in paths:
        raise locator.error(
            flavour.path if flavour else "",
            f"model flavour {name!r} has no hub id sidecar knows; set `--pretrained_model_name_or_path`",
        )
    return paths[name]


def _root(path: Path) -> Path:
    """SimpleTuner's own folder: above the `config/` folder holding the file, else the file's folder."""
    folder = path.resolve().parent
    for candidate in (folder, *folder.parents):
        if candidate.name == CONFIG_DIR_NAME:
            return candidate.parent
    return folder


def _strength(args: dict[str, Value], locator: Locator) -> float:
    if str((_given(args, "lora_type") or Value("standard", "")).value).lower() == "lycoris":
        return float(_value(args, "validation_lycoris_strength", as_non_negative_number, locator) or 1.0)
    return float(_value(args, "validation_adapter_strength", as_non_negative_number, locator) or 1.0)


def _notes(args: dict[str, Value], locator: Locator) -> None:
    for name, why in _UNUSED.items():
        if _given(args, name) is not None:
            unused(locator, args[name].path, why)
    images = _given(args, "num_validation_images")
    if images is not None and checked(images, as_positive_int, locator) > 1:
        logger.warning("%s sidecar renders one image per prompt and size", locator.where(images.path))
    if _given(args, "validation_prompt_library") is not None and checked(
        args["validation_prompt_library"], as_bool, locator
    ):
        logger.warning(
            "%s SimpleTuner's built-in prompt library is not part of sidecar; use --user_prompt_library",
            locator.where(args["validation_prompt_library"].path),
        )
    if _given(args, "validation_disable") is not None and checked(
        args["validation_disable"], as_bool, locator
    ):
        logger.info(
            "%s SimpleTuner renders no validation images; sidecar does",
            locator.where(args["validation_disable"].path),
        )


def read_simpletuner_config(path: Path) -> TrainerConfig:
    """SimpleTuner's `config.json`, `config.toml` or `config.env`; errors located at the argument."""
    args, locator = read_args(path)
    root = _root(path)
    family = _given(args, "model_family")
    name = str(family.value).strip().lower() if family is not None else ""
    if name not in FAMILIES:
        raise locator.error(
            family.path if family else "",
            f"model family {name or '(none)'!r} is not one sidecar renders (sdxl, sd3, flux)",
        )
    arch = FAMILIES[name]
    if str((_given(args, "model_type") or Value("lora", "")).value).lower() not in ("lora", "lycoris"):
        logger.warning(
            "%s sidecar renders LoRA checkpoints; full-model saves will fail to apply",
            locator.where(args["model_type"].path),
        )
    _notes(args, locator)
    unread(locator, args, _READ | set(_UNUSED))
    scheduler = _given(args, "validation_noise_scheduler")
    sampler = DEFAULT_SAMPLERS[arch]
    if scheduler is not None:
        try:
            sampler = trainer_sampler("simpletuner", checked(scheduler, as_text, locator))
        except SamplerError as error:
            raise locator.error(scheduler.path, str(error)) from None
    every, cadence = _cadence(args, locator)
    seed = _given(args, "validation_seed") or _given(args, "seed")
    true_cfg = _arg(args, "validation_guidance_real", as_non_negative_number, locator)
    sample_values = {
        "sampler": Value(sampler, scheduler.path if scheduler else ""),
        "sample_every": Value(every, ""),
        "sample_steps": _arg(args, "validation_num_inference_steps", as_positive_int, locator),
        "guidance_scale": _arg(args, "validation_guidance", as_non_negative_number, locator),
        "true_cfg_scale": Value(max(1.0, true_cfg.value or 1.0), true_cfg.path),  # <= 1 is off
        "neg": _arg(args, "validation_negative_prompt", as_text, locator),
        "seed": Value(checked(seed, as_non_negative_int, locator) if seed else 0, seed.path if seed else ""),
        "random_seed": Value(_value(args, "validation_randomize", as_bool, locator) or False, ""),
        "network_multiplier": Value(_strength(args, locator), ""),
        "format": _arg(args, "validation_image_format", as_text, locator),
        "num_frames": _arg(args, "validation_num_video_frames", as_positive_int, locator),
        "prompts": Value([], ""),
    }
    prompt = _given(args, "validation_prompt")
    if prompt is not None:
        sample_values["prompts"] = Value([checked(prompt, as_text, locator)], prompt.path)
    sample = validated(SampleConfig, sample_values, locator)
    library = _given(args, "user_prompt_library")
    vae = _given(args, "pretrained_vae_model_name_or_path")
    model = {"name_or_path": _base_model(args, arch, root, locator), "arch": arch}
    if vae is not None:
        model["vae_path"] = resolve_relative(checked(vae, as_text, locator), root)
    output = find_beside(str(_value(args, "output_dir", as_text, locator)), root)
    unconditional = not (_value(args, "validation_disable_unconditional", as_bool, locator) or False)
    native: dict[str, tuple[Locator, str]] = {
        f"sample.{key}": (locator, value.path) for key, value in sample_values.items() if value.path
    }
    native["sample"] = (locator, prompt.path if prompt else library.path if library else "")
    native["sample.unconditional"] = (
        locator,
        args.get("validation_disable_unconditional", Value(0, "")).path,
    )
    return trainer_config(
        path,
        name=Path(str(_value(args, "output_dir", as_text, locator))).name,
        arch=arch,
        model=ModelConfig.model_validate(model),
        sample=sample,
        locator=locator,
        trainer=SIMPLETUNER,
        output_dir=output or root / str(_value(args, "output_dir", as_text, locator)),
        prompts_file=prompt_file(library, root, locator) if library is not None else None,
        cadence=cadence,
        resolutions=_resolutions(_given(args, "validation_resolution"), locator),
        unconditional=unconditional,
        native=native,
    )


def library_sources(
    path: Path, data: dict[str, Any], locator: Locator, config: TrainerConfig
) -> list[Source]:
    """A user prompt library: shortname -> prompt, or -> {prompt|caption|tags, adapter_strength}."""
    sources = []
    for shortname, entry in data.items():
        where = pointer(shortname)
        if not str(shortname).strip():
            continue
        if isinstance(entry, str):
            values = {"prompt": Value(entry, where)}
        elif isinstance(entry, dict):
            key = next((k for k in ("prompt", "caption", "tags") if k in entry), None)
            if key is None:
                raise locator.error(
                    where, "must have a `prompt`, `caption` or `tags` field, as SimpleTuner requires"
                )
            values = {"prompt": Value(entry[key], pointer(shortname, key))}
            if entry.get("adapter_strength") is not None:
                values["network_multiplier"] = Value(
                    entry["adapter_strength"], pointer(shortname, "adapter_strength")
                )
        else:
            raise locator.error(
                where, f"must be a prompt string or a mapping with a prompt, got {show(entry)}"
            )
        item = validated(PromptItem, values, locator)
        sources.append(Source(item.prompt, item, Origin(config, file=path, key=where), "plain"))
    return sources


def is_prompt_library(data: object) -> bool:
    return (
        isinstance(data, dict)
        and bool(data)
        and all(isinstance(v, (str, dict)) for v in data.values())
        and not is_simpletuner_args(data)
    )
