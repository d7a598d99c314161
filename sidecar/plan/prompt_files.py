"""Every trainer's separate prompt file, recognised by its content.

* kohya sd-scripts / musubi-tuner: `.txt` lines with flags, a `.toml` with `[prompt]` and
  `[[prompt.subset]]`, a `.json` list of strings or prompt mappings (`kohya_prompts.py`);
* OneTrainer: the sample list, a JSON list of sample mappings (`onetrainer.py`), or a
  `config.json` that holds its samples inline;
* SimpleTuner: the user prompt library, a JSON object of shortname -> prompt (`simpletuner.py`).

A `.json` or `.toml` file must parse; any other file is read as kohya `.txt` lines (a line
may well start with `[` or `{`, as ai-toolkit's `[trigger]` does).
"""

from __future__ import annotations

from pathlib import Path

from sidecar.errors import ConfigError
from sidecar.plan.config import TrainerConfig
from sidecar.plan.files import read_json, read_text, read_toml
from sidecar.plan.prompts import Source

RECOGNISED = (
    "a kohya .txt / .toml / .json prompt file, a OneTrainer sample list or a SimpleTuner user prompt library"
)


def read_prompt_sources(path: Path, config: TrainerConfig) -> list[Source]:
    """The prompts of `path`, each located in it, read as the trainer that wrote it reads them."""
    from sidecar.plan import kohya_prompts, onetrainer, simpletuner

    suffix = path.suffix.lower()
    if suffix == ".toml":
        data, toml_locator = read_toml(path)
        return kohya_prompts.kohya_toml_sources(path, data, toml_locator, config)
    if suffix != ".json":
        try:
            text = read_text(path, "prompt")
        except ConfigError as error:
            if error.reason == "no such file":
                raise ConfigError("no such prompt file", file=str(path)) from None
            raise
        return kohya_prompts.kohya_text_sources(path, text, config)
    data, locator = read_json(path)
    if onetrainer.is_onetrainer_config(data) and isinstance(data.get("samples"), list):
        return onetrainer.onetrainer_sources(path, data["samples"], locator, config, prefix="/samples")
    if onetrainer.is_onetrainer_sample_list(data):
        return onetrainer.onetrainer_sources(path, data, locator, config)
    if isinstance(data, list):
        return kohya_prompts.kohya_json_sources(path, data, locator, config)
    if simpletuner.is_prompt_library(data):
        return simpletuner.library_sources(path, data, locator, config)
    raise locator.error("", f"is not a prompt file sidecar knows ({RECOGNISED})")
