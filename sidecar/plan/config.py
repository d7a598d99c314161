"""The trainer config as sidecar needs it, whatever trainer wrote it.

Each trainer's reader in this package turns its format into a `TrainerConfig`; the plan
(`build.py`) turns that into sample requests. `load_trainer_config` picks the reader by
the file's content (`formats.py`):

* `aitoolkit.py`: the ai-toolkit / EriDiffusion YAML and the flat `sample:` file;
* `kohya.py`: kohya sd-scripts and musubi-tuner `--config_file` TOML;
* `onetrainer.py`: a OneTrainer `config.json`;
* `simpletuner.py`: SimpleTuner's `config.json`, `config.toml` or `config.env`.

Readers other than ai-toolkit's fill the sidecar-shaped `sample` section from the trainer's
own keys and record, in `native`, where each was written, so an error the plan finds later
is still located in the trainer's file, under the trainer's key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sidecar.arch import ARCH_SPECS, Arch, ArchSpec
from sidecar.errors import ConfigError
from sidecar.plan.files import Locator
from sidecar.plan.locator import YamlLocator, join_path
from sidecar.plan.models import ModelConfig, NetworkConfig, SampleConfig, SaveConfig
from sidecar.plan.request import Cadence, ModelSource
from sidecar.settings import Settings

# How inline flags in prompt text are read: `--l`/`--g` mean different things per trainer.
Dialect = Literal["aitoolkit", "kohya", "musubi"]

TEXT_ENCODER_KEYS = ("clip_l_path", "clip_g_path", "t5_path")


def resolve_relative(value: str, base: Path) -> str:
    """`~` expanded; a relative path that exists under `base` made absolute; else as written.

    ai-toolkit resolves paths from its working directory and a hub id (`org/name`) is no
    path at all, so only a path that exists beside the config is taken from there.
    """
    if value.startswith("~"):
        return str(Path(value).expanduser())
    path = Path(value)
    if not path.is_absolute() and (base / path).exists():
        return str((base / path).resolve())
    return value


@dataclass(frozen=True)
class TrainerConfig:
    """What sidecar needs of a trainer config, resolved; `locator` keeps where each key was written."""

    path: Path  # the config file, absolute
    name: str
    training_folder: Path | None
    trigger_word: str | None
    arch: Arch
    model: ModelConfig
    sample: SampleConfig
    sidecar: Settings
    process_index: int | None
    yaml_prefix: str  # `config.process[0]`, or "" for a flat file
    trainer_device: str | None = None  # the trainer's own `device`, a GPU to stay off
    network: NetworkConfig | None = None
    save: SaveConfig | None = None
    log_dir: Path | None = None  # the trainer's TensorBoard folder, where it names one
    locator: Locator = field(default_factory=lambda: YamlLocator(""), repr=False, compare=False)
    trainer: str = "ai-toolkit"  # which trainer's format, for `sidecar check`
    output_dir: Path | None = None  # the run folder, where a trainer names it directly
    prompts_file: Path | None = None  # a prompt file the config names (kohya, OneTrainer, SimpleTuner)
    dialect: Dialect = "aitoolkit"  # how inline flags in prompt text are read
    cadence: Cadence | None = None  # sampling by epochs or time, or from a first step
    # ai-toolkit / EriDiffusion prompts: trigger-word placeholders and wildcards are expanded.
    # Other trainers render their prompt text as written, and so does sidecar for them.
    expands_prompts: bool = True
    resolutions: tuple[tuple[int, int], ...] = ()  # every prompt at each size (SimpleTuner)
    unconditional: bool = False  # an empty-prompt sample first (SimpleTuner, unless turned off)
    # sidecar path (`sample.sampler`) -> (locator, the trainer's own key), for readers whose
    # keys are not sidecar's; a path not in it (nor an ancestor) is located by `locator`.
    native: Mapping[str, tuple[Locator, str]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def spec(self) -> ArchSpec:
        return ARCH_SPECS[self.arch]

    @property
    def config_dir(self) -> Path:
        return self.path.parent

    @property
    def lines(self) -> Mapping[str, int]:
        """Full YAML path -> 1-based line."""
        return self.locator.lines

    @property
    def run_dir(self) -> Path | None:
        """The folder the trainer writes this run's checkpoints into, where the config says:
        the trainer's own output folder, else `<training_folder>/<name>` (ai-toolkit's layout)."""
        if self.output_dir is not None:
            return self.output_dir
        if self.training_folder is not None and self.name:
            return self.training_folder / self.name
        return None

    @property
    def lora_rank(self) -> int | None:
        """The rank the trainer's network has (`network.linear`), where the config says."""
        return self.network.linear if self.network is not None else None

    def model_source(self) -> ModelSource:
        """The base model, as the renderer loads it."""
        model = self.model
        return ModelSource(
            arch=self.arch,
            name_or_path=str(model.name_or_path),
            vae_path=model.vae_path,
            text_encoder_paths={key: getattr(model, key) for key in TEXT_ENCODER_KEYS},
            quantize=model.quantize,
            low_vram=model.low_vram,
        )

    def yaml_path(self, subpath: str) -> str:
        """`sample.prompts[2]` -> `config.process[0].sample.prompts[2]`."""
        return join_path(self.yaml_prefix, subpath)

    def _located(self, subpath: str) -> tuple[Locator, str]:
        """Where `subpath` was written: the trainer's own key (`native`), else its YAML path."""
        path = subpath
        while path:
            if path in self.native:
                return self.native[path]
            path = path[: path.rindex("[")] if path.endswith("]") else path.rpartition(".")[0]
        return self.locator, self.yaml_path(subpath)

    def error(self, subpath: str, message: str) -> ConfigError:
        """A ConfigError located at `subpath` (relative to the process)."""
        locator, path = self._located(subpath)
        return locator.error(path, message)

    def where(self, subpath: str) -> str:
        """`file:line path:` for a warning about `subpath`."""
        locator, path = self._located(subpath)
        return locator.where(path)


def load_trainer_config(path: str | Path, *, process: int | str | None = None) -> TrainerConfig:
    """Read a trainer's config for sidecar; raises `ConfigError` located at the offending key."""
    from sidecar.plan.formats import read_trainer_config

    return read_trainer_config(Path(path), process=process)
