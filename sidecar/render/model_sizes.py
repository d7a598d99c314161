"""What each component of a base model weighs, read from safetensors headers: no torch, no weights.

The memory plan (`memory_plan.py`) needs, per component (the transformer or UNet, each text
encoder, the VAE, the LoRA), the parameter bytes in the dtype it will run in with
quantization applied, and what each offload mode keeps on the card at once: everything
(`none`, `model`), the tensors outside the repeated blocks plus the largest block (`group`,
diffusers' block-level group offload), or the largest single layer (`sequential`).
All of it comes from the names, shapes and dtypes of a safetensors header
(`sidecar.weights.parse_header`), so `sidecar check` answers in a fraction of a second
for a 24 GB model, and works on a file whose data is not even there.

Where the files are: a diffusers folder (`model_index.json`, one folder per component,
sharded or not), a hub id already in the local cache (the same folder in the snapshot),
or a single file that holds some components under the prefixes its tools write
(`SINGLE_FILE_PREFIXES`); components a single file lacks come from the cached diffusers
repo diffusers itself would read them from (`DEFAULT_REPOS`), and the separate files
a config names (`vae_path`, `clip_l_path`, `t5_path`) replace the base's own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sidecar.arch import ARCH_SPECS, BACKBONE, TEXT_ENCODER, VAE  # noqa: F401 (roles, re-exported)
from sidecar.errors import ModelError
from sidecar.weights import SAFETENSORS_SUFFIX, TensorInfo, read_header

# Bytes per element of each safetensors dtype.
HEADER_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
RUN_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# torchao int8 weight-only (`quantize.py`): one int8 per weight, plus per output row an fp32
# scale and an int8 zero point (measured on torchao 0.18's `Int8Tensor`).
INT8_BYTES_PER_WEIGHT = 1
INT8_BYTES_PER_ROW = 4 + 1

# The pipeline components of each architecture and what each is, the `model:` keys of separate
# text-encoder files, single-file prefixes and default repos: facts of `sidecar.arch`.
LORA = "lora"
COMPONENTS: dict[str, dict[str, str]] = {name: dict(spec.components) for name, spec in ARCH_SPECS.items()}
TEXT_ENCODER_KEYS: dict[str, dict[str, str]] = {
    name: dict(spec.text_encoder_keys) for name, spec in ARCH_SPECS.items()
}
SINGLE_FILE_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    name: spec.single_file_prefixes for name, spec in ARCH_SPECS.items()
}
DEFAULT_REPOS = {name: spec.default_repo for name, spec in ARCH_SPECS.items()}
INT8 = "int8"
# ai-toolkit's `quantize: true` and `qtype` names (quanto's and torchao's) that are 8 bits.
EIGHT_BIT_TYPES = frozenset({"true", "qfloat8", "qint8", "int8", "float8", "fp8", "uint8", "8bit"})
# Names of fewer bits: stored in 8 bits here.
FEWER_BIT_TYPES = frozenset({"qint4", "qint2", "int4", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7"})


def quantization_type(value: bool | str | None) -> str | None:
    """The type `model.quantize` asks for (`int8`), or None for no quantization.

    Raises `ModelError` (key `quantize`) naming the accepted values for an unknown one.
    """
    if value is None or value is False:
        return None
    name = "true" if value is True else str(value).strip().lower()
    if name in ("false", "none", ""):
        return None
    if name in EIGHT_BIT_TYPES:
        return INT8
    if name in FEWER_BIT_TYPES:
        logging.getLogger("sidecar.render").warning(
            "`model.quantize: %s`: sidecar stores the backbone in 8 bits (int8 weights), "
            "more memory than %s but never less quality",
            name,
            name,
        )
        return INT8
    known = ", ".join(sorted(EIGHT_BIT_TYPES | FEWER_BIT_TYPES))
    raise ModelError(f"must be true, false or a quantization type ({known}), got {value!r}", key="quantize")


_BLOCK_NAME = re.compile(r"^([^.]+)\.(\d+)\.")  # `transformer_blocks.7.` -> one block of a ModuleList


@dataclass(frozen=True)
class ComponentSize:
    """One component's weights as they will sit in memory."""

    name: str  # the pipeline component: `transformer`, `text_encoder_2`, `vae`, `lora`
    role: str  # BACKBONE, TEXT_ENCODER, VAE or LORA
    parameters: int  # elements of its floating-point tensors
    bytes: int  # in the dtype it runs in, quantization applied
    group_bytes: int  # on the card at once under block-level group offload
    layer_bytes: int  # on the card at once under sequential offload: its largest layer
    source: str  # the file or folder it was read from
    quantized: bool = False


def tensor_run_bytes(name: str, info: TensorInfo, *, run_bytes: int, quantized: bool) -> int:
    """Bytes of one tensor once loaded: floats in the run dtype; a quantized Linear weight in int8."""
    count = 1
    for dim in info.shape:
        count *= dim
    if info.dtype not in FLOAT_DTYPES:
        return count * HEADER_DTYPE_BYTES.get(info.dtype, 1)
    if quantized and len(info.shape) == 2 and name.endswith(".weight"):
        return count * INT8_BYTES_PER_WEIGHT + info.shape[0] * INT8_BYTES_PER_ROW
    return count * run_bytes


def size_component(
    name: str,
    role: str,
    tensors: Mapping[str, TensorInfo],
    *,
    run_bytes: int,
    quantized: bool = False,
    source: str = "",
) -> ComponentSize:
    """Sizes of one component from its tensors (names relative to the component)."""
    total = parameters = 0
    outside_blocks = 0
    blocks: dict[tuple[str, str], int] = {}
    layers: dict[str, int] = {}
    for key, info in tensors.items():
        size = tensor_run_bytes(key, info, run_bytes=run_bytes, quantized=quantized)
        total += size
        if info.dtype in FLOAT_DTYPES:
            count = 1
            for dim in info.shape:
                count *= dim
            parameters += count
        match = _BLOCK_NAME.match(key)
        if match:
            blocks[match.groups()] = blocks.get(match.groups(), 0) + size  # type: ignore[index]
        else:
            outside_blocks += size
        layer = key.rsplit(".", 1)[0]
        layers[layer] = layers.get(layer, 0) + size
    return ComponentSize(
        name=name,
        role=role,
        parameters=parameters,
        bytes=total,
        group_bytes=outside_blocks + max(blocks.values(), default=0),
        layer_bytes=max(layers.values(), default=0),
        source=source,
        quantized=quantized,
    )


# --- finding the files --------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files diffusers loads from a component folder: the shards an index
    names, else the files without a variant (`.fp16.`), else the variant files."""
    for index in sorted(folder.glob(f"*{SAFETENSORS_SUFFIX}.index.json")):
        if ".fp16." in index.name:
            continue
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted({folder / shard for shard in weight_map.values()})
    files = sorted(folder.glob(f"*{SAFETENSORS_SUFFIX}"))
    plain = [path for path in files if path.name.count(".") == 1]
    return plain or files


def read_tensors(paths: Iterable[Path]) -> dict[str, TensorInfo]:
    """Every tensor of `paths`' headers (the data need not be there: sparse files work)."""
    tensors: dict[str, TensorInfo] = {}
    for path in paths:
        tensors.update(read_header(path).tensors)
    return tensors


def cached_repo_folder(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub repo, or None; never reaches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return None
    found = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


def _model_folder(source: str) -> Path | None:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not path.exists() and source.count("/") == 1:
        return cached_repo_folder(source)
    return None


def _folder_tensors(folder: Path, arch: str) -> dict[str, tuple[dict[str, TensorInfo], str]]:
    found = {}
    for component in COMPONENTS[arch]:
        files = _weight_files(folder / component) if (folder / component).is_dir() else []
        if files:
            found[component] = (read_tensors(files), str(folder / component))
    return found


def split_single_file(tensors: Mapping[str, TensorInfo], arch: str) -> dict[str, dict[str, TensorInfo]]:
    """A single-file checkpoint's tensors per component, by the prefixes its tools write."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        for prefix, component in SINGLE_FILE_PREFIXES[arch]:
            if key.startswith(prefix):
                parts.setdefault(component, {})[key.removeprefix(prefix)] = info
                break
    return parts


def _separate_file_tensors(source: str, key: str) -> tuple[dict[str, TensorInfo], str]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = _weight_files(path)
    elif path.is_file():
        files = [path]
    else:
        raise ModelError(f"no such file or folder: {source}", key=key)
    return read_tensors(files), str(path)


def locate_components(
    arch: str,
    name_or_path: str,
    *,
    vae_path: str | None = None,
    text_encoder_paths: Mapping[str, str | None] | None = None,
) -> dict[str, tuple[dict[str, TensorInfo], str]]:
    """`{component: (tensors, where read)}` of a base model as `load_base_pipeline` loads it.

    Raises `ModelError` (with the config key) when the base model or a separate file is
    not there; a component found nowhere is left out (the plan says so).
    """
    if arch not in COMPONENTS:
        raise ValueError(f"`arch` must be one of {', '.join(COMPONENTS)}, got {arch!r}")
    path = Path(name_or_path).expanduser()
    folder = _model_folder(name_or_path)
    if folder is not None:
        found = _folder_tensors(folder, arch)
    elif path.is_file():
        tensors = read_tensors([path])
        found = {name: (part, str(path)) for name, part in split_single_file(tensors, arch).items()}
        default = cached_repo_folder(DEFAULT_REPOS[arch])
        if default is not None:
            for name, entry in _folder_tensors(default, arch).items():
                found.setdefault(name, entry)
    else:
        raise ModelError(
            f"no such file or folder, nor a hub id in the local cache: {name_or_path}", key="name_or_path"
        )
    if vae_path:
        found["vae"] = _separate_file_tensors(vae_path, "vae_path")
    for key, source in (text_encoder_paths or {}).items():
        component = TEXT_ENCODER_KEYS[arch].get(key)
        if source and component:
            tensors, where = _separate_file_tensors(source, key)
            for prefix, _name in SINGLE_FILE_PREFIXES[arch]:  # a ComfyUI file may carry a prefix
                if prefix and any(name.startswith(prefix) for name in tensors):
                    tensors = {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}
                    break
            found[component] = (tensors, where)
    return found


def lora_size(backbone: Mapping[str, TensorInfo], *, rank: int, run_bytes: int) -> int:
    """Bytes of a rank-`rank` LoRA on every Linear of the backbone (ai-toolkit's default
    targets): `rank x (in + out)` per layer, unquantized, in the run dtype."""
    total = 0
    for key, info in backbone.items():
        if key.endswith(".weight") and len(info.shape) == 2 and info.dtype in FLOAT_DTYPES:
            out_features, in_features = info.shape
            total += rank * (in_features + out_features) * run_bytes
    return total
