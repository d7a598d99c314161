"""Find a run's trainer config from its output folder, where each trainer keeps or copies it.

* ai-toolkit: `<training_folder>/<name>/config.yaml`, written at start
  (`save_training_config` in ai-toolkit's `jobs/process/BaseTrainProcess.py`);
* kohya sd-scripts run from kohya_ss (the GUI): `<output_dir>/config_lora-YYYYMMDD-HHMMSS.toml`
  (also `config_dreambooth-`, `config_finetune-`, `config_textual_inversion-`), one per start
  (`kohya_gui/lora_gui.py`); sd-scripts alone copies nothing;
* OneTrainer: `<workspace_dir>/config/<prefix><YYYY-MM-DD_HH-MM-SS>.json`, one per start, with
  the samples inline (`__save_config_to_workspace` in `modules/trainer/GenericTrainer.py`);
* SimpleTuner copies nothing: it reads `config/config.{json,toml,env}` or
  `config/<env>/config.*` in its own folder, which is above a relative `--output_dir`; such a
  file counts when its `--output_dir` is this folder.

Of a trainer's timestamped copies, the newest (by the stamp in its name) is the run's. Several
configs of different trainers count as one when they give the same plan; else, and when there
is none, the error lists every place looked at and says how to pass `--config`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from sidecar.errors import ConfigError, SidecarError

logger = logging.getLogger("sidecar.plan")

AITOOLKIT_COPY = "config.yaml"
KOHYA_GUI_COPY = re.compile(r"^config_(lora|dreambooth|finetune|textual_inversion)-\d{8}-\d{6}\.toml$")
KOHYA_GUI_STAMP = re.compile(r"\d{8}-\d{6}")
ONETRAINER_COPY_DIR = "config"
ONETRAINER_STAMP = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}")
SIMPLETUNER_NAMES = ("config.json", "config.toml", "config.env")
SIMPLETUNER_SEARCH_LEVELS = 4  # folders above the output folder that may be SimpleTuner's own


@dataclass(frozen=True)
class Candidate:
    path: Path
    trainer: str


def _newest(paths: list[Path], stamp: re.Pattern[str]) -> Path | None:
    """The file whose name has the latest time stamp (names sort by their stamps)."""
    stamped = [(found.group(0), path) for path in paths if (found := stamp.search(path.name))]
    return max(stamped)[1] if stamped else None


def _simpletuner(output_dir: Path, looked: list[str]) -> list[Candidate]:
    from sidecar.plan.simpletuner import read_simpletuner_config

    found = []
    for root in [output_dir, *output_dir.parents][: SIMPLETUNER_SEARCH_LEVELS + 1]:
        folder = root / "config"
        looked.append(f"{folder}/[<env>/]config.{{json,toml,env}} (SimpleTuner, --output_dir this folder)")
        if not folder.is_dir():
            continue
        files = [folder / name for name in SIMPLETUNER_NAMES]
        envs = [sub for sub in sorted(folder.iterdir()) if sub.is_dir()]
        files += [env / name for env in envs for name in SIMPLETUNER_NAMES]
        for path in files:
            if not path.is_file():
                continue
            try:
                config = read_simpletuner_config(path)
            except SidecarError:
                continue
            if config.run_dir is not None and config.run_dir.resolve() == output_dir:
                found.append(Candidate(path, "SimpleTuner"))
    return found


def candidates(output_dir: Path) -> tuple[list[Candidate], list[str]]:
    """The configs found for `output_dir`, and every place looked at."""
    output_dir = Path(output_dir).expanduser().resolve()
    looked: list[str] = []
    found: list[Candidate] = []
    copy = output_dir / AITOOLKIT_COPY
    looked.append(f"{copy} (ai-toolkit)")
    if copy.is_file():
        found.append(Candidate(copy, "ai-toolkit"))
    looked.append(f"{output_dir}/config_lora-YYYYMMDD-HHMMSS.toml (kohya_ss for sd-scripts)")
    if output_dir.is_dir():
        kohya = [path for path in output_dir.iterdir() if KOHYA_GUI_COPY.match(path.name) and path.is_file()]
        newest = _newest(kohya, KOHYA_GUI_STAMP)
        if newest is not None:
            found.append(Candidate(newest, "kohya sd-scripts (kohya_ss)"))
    workspace = output_dir / ONETRAINER_COPY_DIR
    looked.append(f"{workspace}/<prefix>YYYY-MM-DD_HH-MM-SS.json (OneTrainer)")
    if workspace.is_dir():
        newest = _newest([path for path in workspace.glob("*.json") if path.is_file()], ONETRAINER_STAMP)
        if newest is not None:
            found.append(Candidate(newest, "OneTrainer"))
    found += _simpletuner(output_dir, looked)
    return found, looked


def _plan_key(path: Path) -> tuple:
    from sidecar.plan.build import build_plan
    from sidecar.plan.config import load_trainer_config

    config = load_trainer_config(path)
    return config.arch, config.model.name_or_path, build_plan(config).requests


def find_config(output_dir: Path) -> Path:
    """The trainer config of the run writing into `output_dir`, or a ConfigError saying where
    sidecar looked and how to pass `--config`."""
    found, looked = candidates(output_dir)
    where = "\n".join(f"  {place}" for place in looked)
    if not found:
        raise ConfigError(
            f"no trainer config found for {output_dir}; looked at:\n{where}\n"
            "pass the config you train with: --config CONFIG"
        )
    if len(found) > 1:
        keys = []
        for candidate in found:
            try:
                keys.append(_plan_key(candidate.path))
            except SidecarError as error:
                keys.append(("unreadable", str(error)))
        if any(key != keys[0] for key in keys[1:]):
            listed = "\n".join(f"  {c.path} ({c.trainer})" for c in found)
            raise ConfigError(
                f"several trainer configs for {output_dir} give different sample plans:\n{listed}\n"
                "pass the one you train with: --config CONFIG"
            )
    chosen = found[0]
    logger.info("using %s, the %s config of this run (--config for another)", chosen.path, chosen.trainer)
    return chosen.path
