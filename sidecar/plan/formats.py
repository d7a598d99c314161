"""Which trainer wrote a config file, told by its content, and the reader for it.

The suffix narrows the format (`.yaml`, `.toml`, `.json`, `.env`); the keys tell the trainer:
ai-toolkit / EriDiffusion YAML (`aitoolkit.py`), kohya sd-scripts / musubi-tuner TOML
(`kohya.py`), a OneTrainer `config.json` (`onetrainer.py`), SimpleTuner's arguments as JSON,
TOML or `config.env` (`simpletuner.py`). A prompt file given where the config belongs is
named as such, with the way to pass it.
"""

from __future__ import annotations

from pathlib import Path

from sidecar.errors import ConfigError
from sidecar.plan.config import TrainerConfig
from sidecar.plan.files import read_json, read_toml

ENV_SUFFIX = ".env"
KNOWN = (
    "ai-toolkit / EriDiffusion YAML, a kohya sd-scripts or musubi-tuner TOML, a OneTrainer config.json, "
    "or SimpleTuner's config.json / config.toml / config.env"
)


def _refuse_process(path: Path, process: int | str | None) -> None:
    if process is not None:
        raise ConfigError(
            f"`--process` ({process!r}) selects an ai-toolkit process; this is not an ai-toolkit YAML",
            file=str(path),
        )


def read_trainer_config(path: Path, *, process: int | str | None = None) -> TrainerConfig:
    """The `TrainerConfig` of any supported trainer's config file; raises a located ConfigError."""
    from sidecar.plan import aitoolkit, kohya, onetrainer, simpletuner, simpletuner_files

    suffix = path.suffix.lower()
    is_env = suffix == ENV_SUFFIX or path.name.endswith(ENV_SUFFIX)  # `config.env`, `.env`
    if not is_env and suffix not in (".toml", ".json"):  # YAML, whatever the suffix
        return aitoolkit.read_aitoolkit_config(path, process=process)
    _refuse_process(path, process)
    if is_env:
        return simpletuner.read_simpletuner_config(path)
    if suffix == ".toml":
        data, locator = read_toml(path)
        if simpletuner_files.is_simpletuner_args(data):
            return simpletuner.read_simpletuner_config(path)
        if kohya.is_kohya_toml(data):
            return kohya.read_kohya_config(path)
        if isinstance(data.get("prompt"), dict):
            raise locator.error(
                "prompt", "is a kohya prompt file; pass it with --prompts, beside the trainer's config"
            )
        raise locator.error("", f"is not a trainer config sidecar knows ({KNOWN})")
    data, json_locator = read_json(path)
    if onetrainer.is_onetrainer_config(data):
        return onetrainer.read_onetrainer_config(path)
    if simpletuner_files.is_simpletuner_args(data):
        return simpletuner.read_simpletuner_config(path)
    if isinstance(data, (list, dict)) and data:
        raise json_locator.error(
            "",
            f"is not a trainer config sidecar knows ({KNOWN}); a prompt file goes with --prompts",
        )
    raise json_locator.error("", f"is empty; expected {KNOWN}")
