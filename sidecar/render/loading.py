"""Base models as users have them, loaded without ever reaching the network.

A diffusers folder, a hub id already in the local cache, or a single-file checkpoint
(`sd_xl_base_1.0.safetensors`, `flux1-dev.safetensors`), plus the separate VAE and
text-encoder files trainer configs name (`vae_path`, `clip_l_path`, `clip_g_path`,
`t5_path`). Every failure is a `ModelError` naming the config key that points to the file.

Weights are loaded from safetensors only (`use_safetensors=True` everywhere): pickled
weights (`.bin`, `.pt`, `.ckpt`) can run code when loaded. A folder that has only
pickled weights for a component is refused, saying which and how to convert it once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from sidecar.errors import CheckpointError, ModelError
from sidecar.render.single_file import load_single_file
from sidecar.weights import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, refuse_pickle

WEIGHT_SUFFIXES = PICKLE_SUFFIXES | {SAFETENSORS_SUFFIX}
CONVERT_HINT = (
    'convert it once, in an environment you trust: `python -c "from diffusers import DiffusionPipeline; '
    "DiffusionPipeline.from_pretrained('{path}').save_pretrained('{path}-safetensors')\"` (diffusers saves "
    "safetensors), then point the config at `{path}-safetensors`"
)


def pickled_only(folder: Path) -> list[Path]:
    """The pickled weight files of `folder` and each folder below it that has no safetensors file."""
    found: list[Path] = []
    for current in [folder, *sorted(path for path in folder.rglob("*") if path.is_dir())]:
        weights = [path for path in current.iterdir() if path.suffix.lower() in WEIGHT_SUFFIXES]
        if weights and not any(path.suffix.lower() == SAFETENSORS_SUFFIX for path in weights):
            found += sorted(weights)
    return found


def refuse_pickled_folder(folder: Path, *, key: str) -> None:
    """A model folder whose weights are pickles only (for any component) is refused with why and how."""
    pickled = pickled_only(folder)
    if pickled:
        names = ", ".join(str(path.relative_to(folder)) for path in pickled[:3])
        raise ModelError(
            f"{folder} holds pickled weights only ({names}{', ...' if len(pickled) > 3 else ''}), which "
            "sidecar never loads (unpickling can run arbitrary code); " + CONVERT_HINT.format(path=folder),
            key=key,
        )


def load_base_pipeline(
    pipeline_class: type[DiffusionPipeline], source: str | Path, *, dtype: torch.dtype
) -> DiffusionPipeline:
    """Load a base model without ever reaching the network.

    `source` is a diffusers folder, a single-file checkpoint (`.safetensors`), or a
    hub id (`org/name`) that is already in the local cache.
    """
    diffusers_logging.disable_progress_bar()  # loading bars are for notebooks, not daemon logs
    transformers_logging.disable_progress_bar()
    path = Path(source).expanduser()
    looks_like_hub_id = not path.is_absolute() and not str(source).startswith((".", "~"))
    looks_like_hub_id = looks_like_hub_id and str(source).count("/") == 1
    if not path.exists() and not looks_like_hub_id:
        raise ModelError(f"no such file or folder: {source}", key="name_or_path")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise ModelError(
            f"{path} is a folder without model_index.json; "
            "point it at a diffusers model folder or a single .safetensors file",
            key="name_or_path",
        )
    try:
        if path.is_file():
            refuse_pickle(path)
            return load_single_file(pipeline_class, path, dtype=dtype)  # sidecar's shipped configs
        if path.is_dir():
            refuse_pickled_folder(path, key="name_or_path")
        return pipeline_class.from_pretrained(
            str(source), dtype=dtype, local_files_only=True, use_safetensors=True
        )
    except CheckpointError as error:
        raise ModelError(str(error), key="name_or_path") from error
    except OSError as error:
        if "safetensors" in str(error):  # a cached hub model with pickled weights only
            raise ModelError(
                f"{source}: no safetensors weights ({str(error).splitlines()[0]}); sidecar never loads "
                "pickled weights (unpickling can run arbitrary code); " + CONVERT_HINT.format(path=source),
                key="name_or_path",
            ) from error
        where = (
            "a single file whose config is not in the local cache"
            if path.is_file()
            else (
                "a diffusers folder that does not load offline"
                if path.is_dir()
                else "no such file or folder, nor a hub id in the local cache"
            )
        )
        raise ModelError(
            f"{source}: {where} ({str(error).splitlines()[0]}); sidecar never downloads: download "
            "it once (`huggingface-cli download`), or point to a local diffusers folder",
            key="name_or_path",
        ) from error


def load_vae(source: str | Path, *, dtype: torch.dtype) -> AutoencoderKL:
    """The VAE the config's `model.vae_path` names: a folder or a single file."""
    path = Path(source).expanduser()
    if path.is_dir():
        refuse_pickled_folder(path, key="vae_path")
        return AutoencoderKL.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
    if path.is_file():
        refuse_pickle(path)
        return AutoencoderKL.from_single_file(str(path), dtype=dtype, local_files_only=True)
    raise ModelError(f"no such file or folder: {source}", key="vae_path")


# Prefixes under which single-file checkpoints (ComfyUI, SAI, ldm) store a text encoder.
TEXT_ENCODER_PREFIXES = (
    "text_encoders.clip_l.transformer.",
    "text_encoders.clip_g.transformer.",
    "text_encoders.t5xxl.transformer.",
    "cond_stage_model.transformer.",
    "conditioner.embedders.0.transformer.",
)


def load_text_encoder(
    base_encoder: torch.nn.Module, source: str | Path, *, key: str, dtype: torch.dtype
) -> torch.nn.Module:
    """A text encoder from the file or folder `model.<key>` names, shaped like the base's.

    Files as ComfyUI and the trainers keep them (`clip_l.safetensors`, `t5xxl_fp16.safetensors`)
    hold transformers' own tensor names, sometimes under a checkpoint prefix; every tensor
    of the encoder must be there with its shape, or the file is refused naming the first misfit.
    """
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    encoder_class = type(base_encoder)
    if path.is_dir():
        refuse_pickled_folder(path, key=key)
        return encoder_class.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
    if not path.is_file():
        raise ModelError(f"no such file or folder: {source}", key=key)
    refuse_pickle(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error type for a corrupt file
        raise ModelError(f"{path}: not a readable safetensors file ({error})", key=key) from error
    for prefix in TEXT_ENCODER_PREFIXES:
        if any(name.startswith(prefix) for name in tensors):
            tensors = {
                name.removeprefix(prefix): value for name, value in tensors.items() if name.startswith(prefix)
            }
            break
    expected = base_encoder.state_dict()
    if not any(name in expected for name in tensors):  # transformers >= 5.6 flattened CLIPTextModel
        tensors = {name.removeprefix("text_model."): value for name, value in tensors.items()}
    missing = sorted(name for name in expected if name not in tensors and "position_ids" not in name)
    misshaped = sorted(
        name for name in expected if name in tensors and tensors[name].shape != expected[name].shape
    )
    if missing or misshaped:
        first = misshaped[0] if misshaped else missing[0]
        problem = (
            f"`{first}` has shape {tuple(tensors[first].shape)}, "
            f"the base needs {tuple(expected[first].shape)}"
            if misshaped
            else f"{len(missing)} tensors are missing, e.g. `{first}`"
        )
        raise ModelError(f"{path}: does not fit the base's {encoder_class.__name__}: {problem}", key=key)
    encoder = encoder_class(base_encoder.config)
    encoder.load_state_dict({name: tensors[name] for name in expected if name in tensors}, strict=False)
    return encoder.to(dtype).eval()
