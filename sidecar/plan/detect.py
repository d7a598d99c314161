"""Which architecture a base model is, read from the model itself without loading it.

A diffusers folder's `model_index.json`, the same file of a hub id already in the local
Hugging Face cache, or a single `.safetensors` file's tensor names (its header only).
Never the network, never a tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sidecar.arch import ARCH_SPECS, Arch, arch_from_pipeline_class, arch_from_tensor_names
from sidecar.errors import CheckpointError
from sidecar.plan.locator import YamlLocator, join_path
from sidecar.plan.models import ModelConfig
from sidecar.weights import read_header

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _arch_from_model_index(index: Path) -> tuple[Arch | None, str]:
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None, f"{index} is not a readable model_index.json"
    arch = arch_from_pipeline_class(str(class_name))
    return (
        arch,
        "" if arch else f"its model_index.json names {class_name!r}, not a pipeline sidecar renders",
    )


def _arch_from_safetensors(path: Path) -> tuple[Arch | None, str]:
    try:
        names = list(read_header(path).tensors)
    except (OSError, CheckpointError) as exc:
        return None, f"not a readable safetensors file: {exc}"
    arch = arch_from_tensor_names(names)
    return arch, "" if arch else "its tensor names match no checkpoint layout sidecar knows"


def _cached_model_index(repo_id: str) -> Path | None:
    """model_index.json of a hub model already in the local HF cache; never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # an id huggingface_hub rejects is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


def detect_model_arch(name_or_path: str | Path) -> tuple[Arch | None, str]:
    """The architecture of a base model, read from the model itself, and why not when None.

    A diffusers folder's `model_index.json`, a hub id's `model_index.json` when already in the
    local Hugging Face cache, or a single-file `.safetensors` checkpoint's tensor names.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return None, "a folder without model_index.json"
        return _arch_from_model_index(index)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            return None, "only .safetensors single files can be inspected"
        return _arch_from_safetensors(path)
    if _HUB_ID.match(text):
        cached = _cached_model_index(text)
        if cached is None:
            return None, "not a local path, and its model_index.json is not in the local Hugging Face cache"
        return _arch_from_model_index(cached)
    return None, "no such file or folder"


_ARCH_FLAGS: tuple[tuple[str, Arch], ...] = (
    ("is_flux", "flux"),
    ("is_v3", "sd3"),
    ("is_sdxl", "sdxl"),
    ("is_xl", "sdxl"),
)


def resolve_arch(model: ModelConfig, locator: YamlLocator, prefix: str) -> Arch:
    """`arch`, then the `is_*` flags, then the model files; raise naming the key to set."""
    model_path = join_path(prefix, "model")
    flagged = [(flag, arch) for flag, arch in _ARCH_FLAGS if getattr(model, flag)]
    for flag, arch in flagged[1:]:
        if arch != flagged[0][1]:
            raise locator.error(
                join_path(model_path, flag),
                f"conflicts with `{flagged[0][0]}: true`; set only one of "
                "is_flux, is_v3, is_sdxl (or `arch`)",
            )
    if model.arch is not None:
        if flagged and flagged[0][1] != model.arch:
            raise locator.error(
                join_path(model_path, "arch"),
                f"is {model.arch!r} but `{flagged[0][0]}: true` says {flagged[0][1]!r}; remove one of them",
            )
        return model.arch  # type: ignore[return-value]
    if flagged:
        return flagged[0][1]
    arch, reason = detect_model_arch(model.name_or_path)
    if arch is None:
        raise locator.error(
            model_path,
            f"cannot tell the architecture of {model.name_or_path!r} ({reason}); "
            f"set `model.arch` to one of {', '.join(ARCH_SPECS)}",
        )
    return arch
