"""ai-toolkit / EriDiffusion YAML, and the flat `sample:` file: read into a `TrainerConfig`.

Two shapes are read:

* ai-toolkit / EriDiffusion: `job: extension`, `config.name`, `config.process[]`, each process
  holding `training_folder`, `trigger_word`, `model`, `network`, `save`, `sample`, ...
* a flat file with a top-level `sample:` (plus `model`, `trigger_word`, `name`), for trainers
  whose own config is not YAML.

Inside `sample:` and `sidecar:` an unknown key is probably a typo, so it is logged as a
warning naming the nearest valid key. Relative paths (`training_folder`, the model paths)
that exist beside the config are taken from there (`resolve_relative`); paths in the
`sidecar:` section are sidecar's own and are always relative to the config file's folder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.errors import ConfigError
from sidecar.plan.config import TrainerConfig, resolve_relative
from sidecar.plan.detect import resolve_arch
from sidecar.plan.locator import YamlLocator, join_path, read_yaml, validate, warn_unknown_keys
from sidecar.plan.models import QUIET_PROMPT_KEYS, QUIET_SAMPLE_KEYS, ProcessSection, PromptItem, SampleConfig
from sidecar.settings import Settings
from sidecar.values import as_bool, as_text, show

logger = logging.getLogger("sidecar.plan")


def _select_process(processes: object, wanted: int | str | None, locator: YamlLocator) -> tuple[int, dict]:
    """By index, by `name` then `type`, or the first process with a `sample:` section."""
    path = "config.process"
    if not isinstance(processes, list) or not processes:
        raise locator.error(path, f"must be a non-empty list of processes, got {show(processes)}")
    if isinstance(wanted, str) and wanted.strip().isdigit():
        wanted = int(wanted)
    if isinstance(wanted, int):
        if not 0 <= wanted < len(processes):
            raise locator.error(
                path,
                f"has {len(processes)} process(es); `process` must be 0..{len(processes) - 1}, got {wanted}",
            )
        index = wanted
    elif isinstance(wanted, str):
        entries = [(i, p) for i, p in enumerate(processes) if isinstance(p, dict)]
        by_name = [i for i, p in entries if p.get("name") == wanted]
        by_type = [i for i, p in entries if p.get("type") == wanted]
        if by_name:
            index = by_name[0]
        elif len(by_type) == 1:
            index = by_type[0]
        elif by_type:
            raise locator.error(path, f"processes {by_type} all have `type: {wanted}`; select one by index")
        else:
            known = ", ".join(f"{i} ({p.get('name') or p.get('type') or '?'})" for i, p in entries)
            raise locator.error(path, f"has no process named {wanted!r}; processes: {known}")
    else:
        with_sample = [i for i, p in enumerate(processes) if isinstance(p, dict) and "sample" in p]
        if not with_sample:
            raise locator.error(
                path, "has no process with a `sample:` section; add one to say what to render"
            )
        index = with_sample[0]
    entry = processes[index]
    if not isinstance(entry, dict):
        raise locator.error(f"{path}[{index}]", f"must be a mapping, got {show(entry)}")
    if "sample" not in entry:
        raise locator.error(f"{path}[{index}]", "has no `sample:` section; add one to say what to render")
    return index, entry


def _sidecar_settings(raw_sections: list[tuple[object, str]], locator: YamlLocator, base: Path) -> Settings:
    """Merge `sidecar:` sections (file top level, then the process); relative paths from the config.

    Each section is checked alone, then merged onto the ones before and checked again, so
    settings that conflict across sections (`gpu` in one, `share_gpu` in the other) are an
    error located at the later section.
    """
    settings = Settings()
    for raw, path in raw_sections:
        if raw is None:
            continue
        warn_unknown_keys(raw, Settings, frozenset(), path, locator)
        section: Settings = validate(Settings, raw, locator, path)
        updates = {name: getattr(section, name) for name in section.model_fields_set}
        for name in ("output", "tensorboard", "slot_file"):
            value = updates.get(name)
            if isinstance(value, Path) and not value.is_absolute():
                updates[name] = base / value
        settings = validate(Settings, {**settings.model_dump(exclude_unset=True), **updates}, locator, path)
    return settings


def read_aitoolkit_config(path: Path, *, process: int | str | None = None) -> TrainerConfig:
    """Read a trainer's YAML (ai-toolkit / EriDiffusion nested, or flat `sample:`) for sidecar.

    `process` picks one of several processes, by index or by `name`/`type`; by default the first
    process with a `sample:` section. Raises ConfigError located at the offending key.
    """
    data, locator = read_yaml(path)
    if data is None:
        raise ConfigError("is empty; expected a trainer config with a `sample:` section", file=str(path))
    if not isinstance(data, dict):
        raise locator.error("", f"must be a mapping (a trainer config), got {show(data)}")
    base = path.resolve().parent

    nested = isinstance(data.get("config"), dict) and "process" in data["config"]
    if nested:
        index, raw = _select_process(data["config"]["process"], process, locator)
        prefix = f"config.process[{index}]"
        name_raw, name_path = data["config"].get("name"), "config.name"
        sidecar_raw = [(data.get("sidecar"), "sidecar"), (raw.get("sidecar"), join_path(prefix, "sidecar"))]
    elif "sample" in data:
        if process is not None:
            raise ConfigError(
                f"`process` was given ({process!r}) but this is a flat file with a top-level "
                "`sample:`, not a `config.process` list",
                file=str(path),
            )
        index, raw, prefix = None, data, ""
        name_raw, name_path = data.get("name"), "name"
        sidecar_raw = [(data.get("sidecar"), "sidecar")]
    else:
        raise locator.error(
            "",
            "has no `sample:` section: sidecar reads ai-toolkit / EriDiffusion files "
            "(`job: extension` with `config.process[]`) or a flat file with a top-level `sample:`",
        )

    sample_path = join_path(prefix, "sample")
    raw_sample = raw.get("sample")
    warn_unknown_keys(raw_sample, SampleConfig, QUIET_SAMPLE_KEYS, sample_path, locator)
    if isinstance(raw_sample, dict):
        key = "samples" if raw_sample.get("samples") is not None else "prompts"
        if key == "samples" and raw_sample.get("prompts"):
            logger.warning(
                "%s both `samples` and `prompts` are set; using `samples`, as ai-toolkit does",
                locator.where(sample_path),
            )
        items = raw_sample.get(key)
        for i, item in enumerate(items if isinstance(items, list) else []):
            warn_unknown_keys(item, PromptItem, QUIET_PROMPT_KEYS, f"{sample_path}.{key}[{i}]", locator)

    section: ProcessSection = validate(ProcessSection, raw, locator, prefix)
    _report_train_flags(raw.get("train"), join_path(prefix, "train"), locator)
    try:
        name = as_text(name_raw) if name_raw is not None else path.stem
    except ValueError as exc:
        raise locator.error(name_path, str(exc)) from None
    model = section.model
    updates: dict[str, Any] = {"name_or_path": resolve_relative(model.name_or_path, base)}
    for key in ("vae_path", "clip_l_path", "clip_g_path", "t5_path"):
        value = getattr(model, key)
        if value is not None:
            updates[key] = resolve_relative(value, base)
    if section.low_vram and "low_vram" not in model.model_fields_set:
        updates["low_vram"] = True
    model = model.model_copy(update=updates)
    arch = resolve_arch(model, locator, prefix)

    training_folder = section.training_folder
    return TrainerConfig(
        path=path.resolve(),
        name=name,
        training_folder=Path(resolve_relative(training_folder, base)) if training_folder else None,
        trigger_word=section.trigger_word or None,
        arch=arch,
        model=model,
        sample=section.sample,
        sidecar=_sidecar_settings(sidecar_raw, locator, base),
        process_index=index,
        yaml_prefix=prefix,
        trainer_device=section.device,
        network=section.network,
        save=section.save,
        log_dir=_log_dir(data, raw, base),
        locator=locator,
        trainer="ai-toolkit / EriDiffusion" if nested else "flat sample file",
    )


# ai-toolkit's `train:` switches for its own sampling (toolkit/config_modules.py TrainConfig;
# used in jobs/process/BaseSDTrainProcess.py): what each means for sidecar.
_TRAIN_FLAGS = {
    "disable_sampling": "turns off ai-toolkit's own sampling; sidecar renders every checkpoint regardless",
    "skip_first_sample": "skips ai-toolkit's sample of the base model before training; sidecar renders "
    "that only with `sidecar render --baseline`",
    "force_first_sample": "ai-toolkit samples the base model when resuming; sidecar renders that only "
    "with `sidecar render --baseline`",
}


def _report_train_flags(train: object, path: str, locator: YamlLocator) -> None:
    """Say what ai-toolkit's sampling switches mean here: sidecar's job is to render, so they
    do not stop it (`disable_sampling: true` is what a user running sidecar sets)."""
    if not isinstance(train, Mapping):
        return
    for key, meaning in _TRAIN_FLAGS.items():
        if key not in train:
            continue
        try:
            on = as_bool(train[key])
        except ValueError as exc:
            raise locator.error(join_path(path, key), str(exc)) from None
        if on:
            level = logging.INFO if key == "disable_sampling" else logging.DEBUG
            logger.log(level, "%s `%s: true` %s", locator.where(join_path(path, key)), key, meaning)


def _log_dir(data: Mapping[str, Any], process: Mapping[str, Any], base: Path) -> Path | None:
    """The `log_dir` an ai-toolkit config sets: on the process, else on the job (`config.log_dir`),
    else at the top of a flat file. A relative path is taken from the config's folder when it
    exists there, else as given (ai-toolkit resolves it from its working folder)."""
    job = data.get("config")
    value = process.get("log_dir")
    if not value and isinstance(job, Mapping):
        value = job.get("log_dir")
    if not value:
        value = data.get("log_dir")
    if not value or not isinstance(value, str):
        return None
    return Path(resolve_relative(value, base))
