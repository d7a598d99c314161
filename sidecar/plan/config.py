"""The trainer config as sidecar needs it, whatever trainer wrote it.

Each trainer's reader in this package (`aitoolkit.py` for the ai-toolkit / EriDiffusion
YAML and the flat `sample:` file) turns its format into a `TrainerConfig`; the plan
(`build.py`) turns that into sample requests. `load_trainer_config` picks the reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.arch import ARCH_SPECS, Arch, ArchSpec
from sidecar.errors import ConfigError
from sidecar.plan.locator import YamlLocator, join_path
from sidecar.plan.models import ModelConfig, NetworkConfig, SampleConfig, SaveConfig
from sidecar.plan.request import ModelSource
from sidecar.settings import Settings

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
    locator: YamlLocator = field(default_factory=lambda: YamlLocator(""), repr=False, compare=False)

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
        `<training_folder>/<name>` (ai-toolkit's layout)."""
        if self.training_folder is not None and self.name:
            return self.training_folder / self.name
        return None

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

    def error(self, subpath: str, message: str) -> ConfigError:
        """A ConfigError located at `subpath` (relative to the process)."""
        return self.locator.error(self.yaml_path(subpath), message)

    def where(self, subpath: str) -> str:
        """`file:line path:` for a warning about `subpath`."""
        return self.locator.where(self.yaml_path(subpath))


def load_trainer_config(path: str | Path, *, process: int | str | None = None) -> TrainerConfig:
    """Read a trainer's config for sidecar; raises `ConfigError` located at the offending key."""
    from sidecar.plan.aitoolkit import read_aitoolkit_config

    return read_aitoolkit_config(Path(path), process=process)
