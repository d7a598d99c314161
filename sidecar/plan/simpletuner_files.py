"""SimpleTuner's three config file formats, read as one mapping of its arguments.

`config.json` and `config.toml` map argument names, with or without the leading `--`, to
values (`simpletuner/helpers/configuration/json_file.py`, `toml_file.py`, `cli_utils.py`);
the legacy `config.env` sets shell variables that `env_to_args_map` turns into arguments,
plus `TRAINER_EXTRA_ARGS` (`env_file.py`). Each argument keeps where it was written: a JSON
pointer, a TOML key, or the `.env` variable's line.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from sidecar.plan.files import Locator, YamlLocator, pointer, read_json, read_text, read_toml
from sidecar.plan.native import Value

# config.env variable -> argument (env_file.env_to_args_map, the entries sidecar reads)
ENV_ARGS = {
    "MODEL_NAME": "pretrained_model_name_or_path",
    "MODEL_FAMILY": "model_family",
    "MODEL_TYPE": "model_type",
    "LORA_TYPE": "lora_type",
    "OUTPUT_DIR": "output_dir",
    "TRAINING_SEED": "seed",
    "VALIDATION_SEED": "validation_seed",
    "VALIDATION_STEPS": "validation_step_interval",
    "VALIDATION_STEP_INTERVAL": "validation_step_interval",
    "VALIDATION_EPOCH_INTERVAL": "validation_epoch_interval",
    "VALIDATE_AFTER_STEP": "validate_after_step",
    "VALIDATION_RESOLUTION": "validation_resolution",
    "VALIDATION_GUIDANCE": "validation_guidance",
    "VALIDATION_GUIDANCE_REAL": "validation_guidance_real",
    "VALIDATION_NUM_INFERENCE_STEPS": "validation_num_inference_steps",
    "VALIDATION_PROMPT": "validation_prompt",
    "VALIDATION_NEGATIVE_PROMPT": "validation_negative_prompt",
}
EXTRA_ARGS = "TRAINER_EXTRA_ARGS"
ALIASES = {"validation_steps": "validation_step_interval"}  # cli_utils legacy handlers


def _arg_name(key: str) -> str:
    name = key.strip().lstrip("-").replace("-", "_")
    return ALIASES.get(name, name)


def is_simpletuner_args(data: object) -> bool:
    return isinstance(data, dict) and any(_arg_name(str(key)) == "model_family" for key in data)


def _args_from_mapping(data: dict[str, Any], path_of: Any) -> dict[str, Value]:
    return {_arg_name(str(key)): Value(value, path_of(str(key))) for key, value in data.items()}


def _env_args(path: Path) -> tuple[dict[str, Value], YamlLocator]:
    """`config.env` as `env_file.parse_env_file` reads it: `[export ]KEY=value`, `KEY+=value`."""
    text = read_text(path, "config.env")
    lines: dict[str, int] = {"": 1}
    variables: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        line = line.removeprefix("export ").strip()
        key, _, value = line.partition("=")
        append = key.endswith("+")
        key, value = key.rstrip("+").strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        variables[key] = f"{variables.get(key, '')} {value}".strip() if append else value
        lines.setdefault(key, number)
    locator = YamlLocator(str(path), lines)
    args = {ENV_ARGS[key]: Value(value, key) for key, value in variables.items() if key in ENV_ARGS}
    tokens = shlex.split(variables.get(EXTRA_ARGS, ""))
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            name, has_value, value = token.partition("=")
            if not has_value:
                value = (
                    tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else "true"
                )
            args[_arg_name(name)] = Value(value, EXTRA_ARGS)
    return args, locator


def read_args(path: Path) -> tuple[dict[str, Value], Locator]:
    """The arguments of a SimpleTuner config file, each with where it was written."""
    if path.suffix.lower() == ".env" or path.name.endswith(".env"):
        return _env_args(path)
    if path.suffix.lower() == ".toml":
        data, locator = read_toml(path)
        return _args_from_mapping(data, lambda key: key), locator
    data, locator = read_json(path)
    if not isinstance(data, dict):
        raise locator.error("", "must be a mapping of SimpleTuner arguments")
    return _args_from_mapping(data, pointer), locator
