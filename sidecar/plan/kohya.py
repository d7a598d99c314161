"""kohya sd-scripts and musubi-tuner: the `--config_file` TOML and its prompt file, as a plan.

Where each field is defined (sd-scripts at github.com/kohya-ss/sd-scripts, musubi-tuner at
github.com/kohya-ss/musubi-tuner):

* the TOML: `read_config_from_file` (sd-scripts `library/train_util.py`, musubi
  `src/musubi_tuner/training/parser_common.py`) flattens every table into the command line's
  arguments, so `[sample_prompt_arguments] sample_sampler = ...` is `--sample_sampler`;
* `pretrained_model_name_or_path`, `vae`, `output_dir`, `output_name`, `sample_prompts`,
  `sample_sampler` (its choices), `sample_every_n_steps`, `sample_every_n_epochs`,
  `sample_at_first`: `add_training_arguments` in sd-scripts `library/train_util.py`;
  `network_module`: `train_network.py`; Flux's `ae`, `clip_l`, `t5xxl`:
  `library/flux_train_utils.py`; SD3's `clip_l`, `clip_g`, `t5xxl`: `library/sd3_train_utils.py`;
  musubi's `dit`, `vae`, `text_encoder1` (T5), `text_encoder2` (CLIP-L): `parser_common.py` and
  `flux_kontext_train_network.py`;
* cadence: `sample_images_common` (sd-scripts: epochs override steps) and
  `should_sample_images` (musubi: either);
* per-prompt defaults: `sample_image_inference` in `library/train_util.py` (SDXL: 512 px,
  30 steps, scale 7.5), `library/sd3_train_utils.py` (512 px, 30 steps, scale 7.5),
  `library/flux_train_utils.py` (512 px, 20 steps, embedded guidance 3.5, CFG 1.0), musubi
  `trainer_base.sample_image_inference` (256 px, 20 steps; Kontext guidance 2.5). A prompt
  without a seed is drawn anew at every sampling run (`torch.seed()`), so it gets a per-step
  seed here. Flux and SD3 sampling ignore `sample_sampler`: always flow-matching Euler.

The prompt file (`.txt` lines with flags, `.toml` `[prompt]` + `[[prompt.subset]]`, `.json`
list) is read by `kohya_sources`, as `load_prompts` and `line_to_prompt_dict` read it
(sd-scripts `library/train_util.py`, musubi `training/sampling_prompts.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sidecar.arch import ARCH_SPECS, Arch
from sidecar.errors import SamplerError
from sidecar.plan.config import TrainerConfig, resolve_relative
from sidecar.plan.detect import detect_model_arch
from sidecar.plan.files import Locator, read_toml
from sidecar.plan.models import ModelConfig, SampleConfig
from sidecar.plan.native import Value, checked, find_beside, prompt_file, trainer_config, unread, unused
from sidecar.plan.request import Cadence
from sidecar.samplers import trainer_sampler
from sidecar.values import as_bool, as_text, show

logger = logging.getLogger("sidecar.plan")

SD_SCRIPTS = "kohya sd-scripts"
MUSUBI = "musubi-tuner"
KOHYA_DEFAULT_NAME = "last"  # sd-scripts' file name when `output_name` is not set

# network_module -> architecture sidecar renders, or the name of one it does not.
_SD_SCRIPTS_MODULES: dict[str, Arch | str] = {
    "networks.lora_flux": "flux",
    "networks.oft_flux": "flux",
    "networks.lora_sd3": "sd3",
    "networks.lora_lumina": "Lumina Image 2.0",
    "networks.lora_hunyuan_image": "HunyuanImage 2.1",
    "networks.lora_anima": "Anima",
}
_MUSUBI_MODULES: dict[str, Arch | str] = {
    "networks.lora_flux": "flux_kontext",  # FLUX.1 Kontext [dev]: Flux.1 with control images
    "networks.lora": "HunyuanVideo",
    "networks.lora_wan": "Wan 2.x",
    "networks.lora_framepack": "FramePack",
    "networks.lora_flux_2": "FLUX.2",
    "networks.lora_qwen_image": "Qwen-Image",
    "networks.lora_zimage": "Z-Image",
    "networks.lora_hv_1_5": "HunyuanVideo 1.5",
    "networks.lora_kandinsky": "Kandinsky 5",
    "networks.lora_hidream_o1": "HiDream-O1",
    "networks.lora_ideogram4": "Ideogram 4",
    "networks.lora_krea2": "Krea 2",
}
# Per-architecture sampling defaults: (size, steps, scale or embedded guidance).
_SD_SCRIPTS_DEFAULTS: dict[Arch, tuple[int, int, float]] = {
    "sdxl": (512, 30, 7.5),
    "sd3": (512, 30, 7.5),
    "flux": (512, 20, 3.5),
}
_MUSUBI_DEFAULTS: dict[Arch, tuple[int, int, float]] = {"flux_kontext": (256, 20, 2.5)}
KOHYA_DEFAULT_SAMPLER = "ddim"  # `--sample_sampler` default

# Keys sidecar reads (the rest are training settings, listed at `-v` by `unread`).
_READ = frozenset(
    {"pretrained_model_name_or_path", "vae", "ae", "clip_l", "clip_g", "t5xxl", "network_module"}
    | {"dit", "text_encoder1", "text_encoder2", "output_dir", "output_name"}
    | {"sample_prompts", "sample_sampler", "sample_every_n_steps", "sample_every_n_epochs"}
)
# Keys that change how the trainer samples but that sidecar cannot follow: said at `-v`.
_UNUSED: dict[str, str] = {
    "sample_at_first": "sidecar renders checkpoints; `sidecar render --baseline` renders the base model",
    "v_parameterization": "the base model's own scheduler config decides the prediction type",
    "clip_skip": "sidecar renders with the text encoders' default layers",
    "discrete_flow_shift": "a training setting; sampling uses the base model's shift",
}


def is_kohya_toml(data: dict[str, Any]) -> bool:
    """A kohya `--config_file`: its (flattened) keys name kohya arguments."""
    flat = _flatten(data)
    return bool(
        {"pretrained_model_name_or_path", "dit", "network_module", "sample_prompts"} & set(flat)
    ) and ("model_family" not in flat)


def _flatten(data: dict[str, Any]) -> dict[str, Value]:
    """Every table's keys in one mapping, as `read_config_from_file` does, keeping each key's path."""
    flat: dict[str, Value] = {}
    for section, value in data.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                flat[key] = Value(inner, f"{section}.{key}")
        else:
            flat[section] = Value(value, section)
    return flat


def _arch(flat: dict[str, Value], musubi: bool, locator: Locator, base: Path) -> Arch:
    """From `network_module`, keys only one architecture has, else the model file itself."""
    module = flat.get("network_module")
    table = _MUSUBI_MODULES if musubi else _SD_SCRIPTS_MODULES
    trainer = MUSUBI if musubi else SD_SCRIPTS
    if module is not None:
        name = checked(module, as_text, locator).strip()
        found = table.get(name)
        if isinstance(found, str) and found not in ARCH_SPECS:
            readable = ", ".join(module for module, arch in table.items() if arch in ARCH_SPECS)
            raise locator.error(
                module.path,
                f"{name!r} trains {found} with {trainer}; sidecar reads {trainer} configs of {readable}",
            )
        if found is not None:
            return found  # type: ignore[return-value]
    if musubi:
        raise locator.error(
            module.path if module else "",
            f"cannot tell which {MUSUBI} model this trains; sidecar renders its FLUX.1 Kontext "
            'LoRAs (`network_module = "networks.lora_flux"`)',
        )
    if "clip_g" in flat:
        return "sd3"
    if "ae" in flat or "t5xxl" in flat:
        return "flux"
    model = flat.get("pretrained_model_name_or_path")
    if model is None:
        raise locator.error("", "has no `pretrained_model_name_or_path`; sidecar needs the base model")
    arch, reason = detect_model_arch(resolve_relative(checked(model, as_text, locator), base))
    if arch is None:
        raise locator.error(
            model.path,
            f"cannot tell the architecture of {model.value!r} ({reason}); sidecar reads it from a "
            "diffusers folder or a single .safetensors file it can open, or from `network_module` "
            "(networks.lora_flux, networks.lora_sd3)",
        )
    return arch


def _model(flat: dict[str, Value], musubi: bool, locator: Locator, base: Path, arch: Arch) -> ModelConfig:
    keys = (
        {"name_or_path": "dit", "vae_path": "vae", "t5_path": "text_encoder1", "clip_l_path": "text_encoder2"}
        if musubi
        else {
            "name_or_path": "pretrained_model_name_or_path",
            "vae_path": "ae" if arch == "flux" else "vae",
            "clip_l_path": "clip_l",
            "clip_g_path": "clip_g",
            "t5_path": "t5xxl",
        }
    )
    values: dict[str, Any] = {"arch": arch}
    for field, key in keys.items():
        if key in flat:
            values[field] = resolve_relative(checked(flat[key], as_text, locator), base)
    if "name_or_path" not in values:
        raise locator.error("", f"has no `{keys['name_or_path']}`; sidecar needs the base model")
    return ModelConfig.model_validate(values)


def _cadence(flat: dict[str, Value], musubi: bool, locator: Locator) -> tuple[int | None, Cadence | None]:
    """(`sample_every` in steps, epoch cadence): a value <= 0 disables it, as kohya does."""
    steps = checked(flat["sample_every_n_steps"], _interval, locator) if "sample_every_n_steps" in flat else 0
    epochs = (
        checked(flat["sample_every_n_epochs"], _interval, locator) if "sample_every_n_epochs" in flat else 0
    )
    if epochs > 0 and steps > 0:
        if musubi:  # `should_sample_images`: either one; the store can say only "both"
            logger.info(
                "%s samples at every %d steps and every %d epochs; sidecar renders every checkpoint",
                locator.where(flat["sample_every_n_epochs"].path),
                steps,
                epochs,
            )
            return None, None
        unused(
            locator, flat["sample_every_n_steps"].path, "sample_every_n_epochs overrides it, as in sd-scripts"
        )
        steps = 0
    if steps <= 0 and epochs <= 0:
        logger.debug(
            "%s sets no sample_every_n_steps / sample_every_n_epochs: %s samples nothing during training; "
            "sidecar renders every checkpoint",
            locator.where(""),
            MUSUBI if musubi else SD_SCRIPTS,
        )
    return (steps or None), (Cadence(every=epochs, unit="epoch") if epochs > 0 else None)


def _interval(value: object) -> int:
    """kohya's `sample_every_n_*`: an integer; 0 or less turns it off (`verify_training_args`)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {show(value)}")
    return max(value, 0)


def _sampler(flat: dict[str, Value], arch: Arch, musubi: bool, locator: Locator) -> str:
    given = flat.get("sample_sampler")
    if arch != "sdxl" or musubi:
        if given is not None:
            unused(locator, given.path, f"{SD_SCRIPTS}' {arch} sampling is always flow-matching Euler")
        return "flowmatch"
    if given is None:
        return KOHYA_DEFAULT_SAMPLER
    try:
        return trainer_sampler("kohya", checked(given, as_text, locator))
    except SamplerError as error:
        raise locator.error(given.path, str(error)) from None


def _output_dir(value: Value | None, base: Path, locator: Locator) -> Path | None:
    """`output_dir`, found beside the config or above it (kohya runs from its own folder)."""
    if value is None:
        return None
    text = checked(value, as_text, locator)
    return find_beside(text, base) or Path(text).expanduser()


def read_kohya_config(path: Path) -> TrainerConfig:
    """A kohya sd-scripts or musubi-tuner `--config_file` TOML; errors located at the TOML key."""
    data, locator = read_toml(path)
    flat = _flatten(data)
    musubi = "dit" in flat
    trainer = MUSUBI if musubi else SD_SCRIPTS
    base = path.resolve().parent
    arch = _arch(flat, musubi, locator, base)
    size, steps, guidance = (_MUSUBI_DEFAULTS if musubi else _SD_SCRIPTS_DEFAULTS)[arch]
    every_steps, cadence = _cadence(flat, musubi, locator)
    for key, why in _UNUSED.items():
        if key in flat and flat[key].value not in (None, False, 0):
            unused(locator, flat[key].path, why)
    unread(locator, flat, _READ | set(_UNUSED))
    sample = SampleConfig(
        sampler=_sampler(flat, arch, musubi, locator),
        sample_every=every_steps,
        sample_steps=steps,
        guidance_scale=guidance,
        width=size,
        height=size,
        random_seed=True,  # no `--d`: a new seed at every sampling run
    )
    prompts = flat.get("sample_prompts")
    name = checked(flat["output_name"], as_text, locator) if "output_name" in flat else KOHYA_DEFAULT_NAME
    output_dir = flat.get("output_dir")
    if "sample_at_first" in flat:
        checked(flat["sample_at_first"], as_bool, locator)
    return trainer_config(
        path,
        name=name,
        arch=arch,
        model=_model(flat, musubi, locator, base, arch),
        sample=sample,
        locator=locator,
        trainer=trainer,
        output_dir=_output_dir(output_dir, base, locator),
        prompts_file=prompt_file(prompts, base, locator) if prompts is not None else None,
        dialect="musubi" if musubi else "kohya",
        cadence=cadence,
        native={
            "sample": (locator, prompts.path if prompts is not None else ""),
            "sample.sampler": (locator, flat["sample_sampler"].path if "sample_sampler" in flat else ""),
        },
    )
