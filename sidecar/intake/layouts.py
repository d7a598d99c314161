"""Which files are LoRA checkpoints, and at which step, by their path alone.

Trainers prune old checkpoints and write optimizer states, EMA copies and sample
images beside them. `recognise` tells those apart by name alone (pure on the path);
`sidecar.intake.readiness` decides when a recognised file is whole and settled.

Layouts recognised (step from the name unless noted):

- ai-toolkit: `{name}_{step:09d}.safetensors`; final `{name}.safetensors`. Wan 2.2 A14B by
  default: `{name}_{step:09d}_high_noise.safetensors` then `..._low_noise.safetensors` (only the
  trained expert's when one is), final `{name}_high_noise.safetensors` / `{name}_low_noise...`:
  each part is recognised with its step and `split`; `sidecar.intake.split` makes the two one
  checkpoint.
- kohya sd-scripts: `{name}-step{step:08d}.safetensors`; per epoch
  `{name}-{epoch:06d}.safetensors` (step from `ss_steps` metadata); final
  `{name}.safetensors`. Its `*-state` folders hold optimizer states, not LoRAs.
- OneTrainer: `save/{prefix}{YYYY-MM-DD_HH-MM-SS}-save-{step}-{epoch}-{epoch_step}.safetensors`.
- SimpleTuner and diffusers' scripts: `checkpoint-{step}/pytorch_lora_weights.safetensors`.
- EriDiffusion: `checkpoint-{step}/{sdxl|sd35|flux}_lora.safetensors` (ready only once
  `training_state.json`, written last, exists), `{model}_lora_step{N}.safetensors`,
  final `{model}_lora_final.safetensors`.

A final file without a step in its name gets one later, from its metadata
(`sidecar.intake.steps`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from sidecar.arch import ARCH_ALIASES, Arch
from sidecar.settings import SAMPLES_DIR_NAME
from sidecar.weights import SAFETENSORS_SUFFIX, SplitPart, is_pickle, pickle_message, split_part

logger = logging.getLogger("sidecar.intake")

Layout = Literal["ai-toolkit", "kohya", "onetrainer", "diffusers", "eridiffusion", "final", "pattern"]

# `.bin` is too common a name for other things (text encoders, optimizer states) to
# take a bare `{name}.bin` as a final LoRA; it counts only in a known layout.
PICKLE_FINAL_SUFFIXES = frozenset({".ckpt", ".pt", ".pth"})

ERIDIFFUSION_MARKER = "training_state.json"
ONETRAINER_SAVE_DIR = "save"  # OneTrainer writes intermediate saves to `<workspace>/save/`

# Folder names whose contents are never LoRAs to render (compared lower-case).
_EXCLUDED_DIRS = frozenset(
    {
        SAMPLES_DIR_NAME,
        "sample",
        "ema",
        "backup",
        "backups",
        "logs",
        "log",
        "tensorboard",
        "cache",
        "latent_cache",
        "_latent_cache",
        "optimizer",
        "__pycache__",
    }
)
# Tokens in a file name that mark a non-LoRA file (split on `_`, `-`, `.`; whole tokens only,
# so `cinema_lora` is kept). A run named with one of them needs a user `pattern`.
_EXCLUDED_TOKENS = frozenset({"optimizer", "optim", "ema", "scheduler", "scaler", "tmp", "temp", "partial"})
_TOKEN_SPLIT = re.compile(r"[_\-.]+")

_CHECKPOINT_DIR = re.compile(r"checkpoint-(?P<step>\d+)")
_DIFFUSERS_NAMES = frozenset({"pytorch_lora_weights"})
_ERIDIFFUSION_DIR_NAME = re.compile(r"(?P<model>[a-z0-9.]+)_lora")

_ONETRAINER = re.compile(
    r"(?P<name>.*?)(?P<timestamp>\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})-save-"
    r"(?P<step>\d+)-(?P<epoch>\d+)-(?P<epoch_step>\d+)"
)
_KOHYA_STEP = re.compile(r"(?P<name>.+)-step(?P<step>\d{8,})")
_KOHYA_EPOCH = re.compile(r"(?P<name>.+)-(?P<epoch>\d{6})")
_AI_TOOLKIT = re.compile(r"(?P<name>.+)_(?P<step>\d{9,})")
_ERIDIFFUSION_STEP = re.compile(r"(?P<name>.+)_lora_step(?P<step>\d+)")
_ERIDIFFUSION_FINAL = re.compile(r"(?P<name>.+)_lora_final")


@dataclass(frozen=True)
class Checkpoint:
    """One LoRA file a trainer wrote, as far as its path tells.

    `step` is None where the name has none (a final file, a kohya epoch file) until
    `resolve_step` reads the header. `marker` is a file the trainer writes after the
    LoRA; the checkpoint is ready only once it exists. `split`: one file of ai-toolkit's
    Wan 2.2 pair (`name` then lacks the suffix); its sibling belongs to the same checkpoint.
    """

    path: Path
    name: str  # run name from the file name, or the checkpoint folder name
    layout: Layout
    step: int | None
    epoch: int | None = None
    is_final: bool = False
    is_pickle: bool = False  # never loaded: pickle can run code; the renderer refuses it
    marker: Path | None = None
    arch: Arch | None = None  # where the name says it (EriDiffusion `flux_lora`)
    split: SplitPart | None = None  # `high_noise` / `low_noise`: one expert's file of a Wan 2.2 pair

    @property
    def pickle_message(self) -> str:
        """What to tell the user about a pickle checkpoint."""
        return pickle_message(self.path)


def _arch_of(model: str) -> Arch | None:
    return ARCH_ALIASES.get(model.lower())


def is_excluded_folder(name: str) -> bool:
    """Whether a folder of this name never holds LoRAs to render (samples, EMA, hidden...)."""
    lowered = name.lower()
    return (
        name.startswith(".")
        or lowered in _EXCLUDED_DIRS
        or lowered.endswith("-state")
        or lowered.endswith("_state")
    )


def _is_excluded(rel: PurePosixPath) -> str | None:
    """Why a path is not a LoRA checkpoint, or None when nothing excludes it."""
    for part in rel.parts[:-1]:
        if part.startswith("."):
            return f"hidden folder {part!r}"
        if is_excluded_folder(part):
            return f"inside {part!r}"
    name = rel.name
    if name.startswith(".") or name.endswith("~"):
        return "hidden or temporary file"
    tokens = {t.lower() for t in _TOKEN_SPLIT.split(rel.stem) if t}
    bad = tokens & _EXCLUDED_TOKENS
    if bad:
        return f"name has {sorted(bad)[0]!r}"
    return None


def _is_number(text: str | None) -> bool:
    return text is not None and text.isascii() and text.isdigit()


def _relative(path: Path, root: Path) -> PurePosixPath:
    try:
        return PurePosixPath(path.relative_to(root).as_posix())
    except ValueError:
        return PurePosixPath(path.name)


def recognise(
    path: Path,
    *,
    root: Path,
    pattern: re.Pattern[str] | None = None,
    ignore: tuple[Path, ...] = (),
) -> Checkpoint | None:
    """The checkpoint `path` is, or None when it is not a LoRA checkpoint.

    Pure on the path: reads nothing from disk. `root` is the watched output folder;
    layouts are matched on the path relative to it. Files under a folder in `ignore`
    (sidecar's own samples folder) and the exclusions (samples, hidden folders such as
    `.sidecar`, optimizer states, EMA copies) come first: a broad user `pattern` never
    turns sidecar's own cached copy into a checkpoint. The `pattern` (a regex with a named
    `step` group, optional `epoch`; checked when settings are read) is then tried on the
    relative POSIX path, before the trainers' layouts.
    """
    suffix = path.suffix.lower()
    pickled = is_pickle(path)
    if suffix != SAFETENSORS_SUFFIX and not pickled:
        return None
    if any(folder == path or folder in path.parents for folder in ignore):
        return None
    rel = _relative(path, root)
    excluded = _is_excluded(rel)
    if excluded is not None:
        logger.debug("%s is not a LoRA checkpoint: %s", path, excluded)
        return None

    if pattern is not None:
        found = pattern.search(rel.as_posix())
        groups = found.groupdict() if found is not None else {}
        step, epoch = groups.get("step"), groups.get("epoch")
        if _is_number(step):  # a `step` group that matched no number: no step
            split = split_part(path)
            return Checkpoint(
                path=path,
                name=split[0] if split else path.stem,
                layout="pattern",
                step=int(step),
                epoch=int(epoch) if _is_number(epoch) else None,
                is_pickle=pickled,
                split=split[1] if split else None,
            )

    stem = path.stem
    parent = rel.parent.name if len(rel.parts) > 1 else ""

    folder = _CHECKPOINT_DIR.fullmatch(parent)
    if folder is not None:
        return _in_checkpoint_dir(path, stem, parent, int(folder.group("step")), pickled)
    if stem in _DIFFUSERS_NAMES:  # diffusers / SimpleTuner final, at the top of output_dir
        return Checkpoint(path, parent or stem, "diffusers", None, is_final=True, is_pickle=pickled)
    return _by_name(path, stem, suffix, pickled)


def _in_checkpoint_dir(path: Path, stem: str, folder: str, step: int, pickled: bool) -> Checkpoint | None:
    """`checkpoint-{step}/…`: only the LoRA file itself counts; the rest is trainer state."""
    if stem in _DIFFUSERS_NAMES:
        return Checkpoint(path, folder, "diffusers", step, is_pickle=pickled)
    eri = _ERIDIFFUSION_DIR_NAME.fullmatch(stem)
    if eri is not None:
        return Checkpoint(
            path,
            folder,
            "eridiffusion",
            step,
            is_pickle=pickled,
            marker=path.parent / ERIDIFFUSION_MARKER,
            arch=_arch_of(eri.group("model")),
        )
    return None


def _split(path: Path, base: str, part: SplitPart) -> Checkpoint:
    """One file of ai-toolkit's Wan 2.2 pair: the step from the name without its suffix, else final."""
    found = _AI_TOOLKIT.fullmatch(base)
    if found is not None:
        return Checkpoint(path, found.group("name"), "ai-toolkit", int(found.group("step")), split=part)
    return Checkpoint(path, base, "final", None, is_final=True, split=part)


def _by_name(path: Path, stem: str, suffix: str, pickled: bool) -> Checkpoint | None:
    """Flat layouts, told apart by the shape of the file name (most specific first)."""
    split = split_part(path)
    if split is not None:
        return _split(path, *split)
    found = _ONETRAINER.fullmatch(stem)
    if found is not None:
        return Checkpoint(
            path,
            found.group("name").rstrip("-_") or "onetrainer",
            "onetrainer",
            int(found.group("step")),
            epoch=int(found.group("epoch")),
            is_pickle=pickled,
        )
    found = _KOHYA_STEP.fullmatch(stem)
    if found is not None:
        return Checkpoint(path, found.group("name"), "kohya", int(found.group("step")), is_pickle=pickled)
    found = _AI_TOOLKIT.fullmatch(stem)
    if found is not None:
        return Checkpoint(
            path, found.group("name"), "ai-toolkit", int(found.group("step")), is_pickle=pickled
        )
    found = _ERIDIFFUSION_STEP.fullmatch(stem)
    if found is not None:
        name = found.group("name")
        return Checkpoint(
            path, name, "eridiffusion", int(found.group("step")), is_pickle=pickled, arch=_arch_of(name)
        )
    found = _ERIDIFFUSION_FINAL.fullmatch(stem)
    if found is not None:
        name = found.group("name")
        return Checkpoint(
            path, name, "eridiffusion", None, is_final=True, is_pickle=pickled, arch=_arch_of(name)
        )
    found = _KOHYA_EPOCH.fullmatch(stem)
    if found is not None:
        return Checkpoint(
            path, found.group("name"), "kohya", None, epoch=int(found.group("epoch")), is_pickle=pickled
        )
    if pickled and suffix not in PICKLE_FINAL_SUFFIXES:
        return None
    # `{name}.safetensors`: the final save of ai-toolkit and kohya alike.
    return Checkpoint(path, stem, "final", None, is_final=True, is_pickle=pickled)


def run_dir_of(path: Path) -> Path:
    """The folder a trainer writes a run's checkpoints into, from one checkpoint's path.

    Checkpoints in a `checkpoint-{step}/` folder (diffusers, SimpleTuner, EriDiffusion) or
    in OneTrainer's `save/` belong to the folder above; every other layout is flat.
    """
    path = Path(path)
    parent = path.parent
    if _CHECKPOINT_DIR.fullmatch(parent.name) or (
        parent.name == ONETRAINER_SAVE_DIR and _ONETRAINER.fullmatch(path.stem)
    ):
        return parent.parent
    return parent
