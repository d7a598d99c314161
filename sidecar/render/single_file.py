"""Single-file base models (`flux1-dev.safetensors`, `sd_xl_base_1.0.safetensors`…) loaded offline.

diffusers' `from_single_file` needs the original repo's diffusers config to build the
pipeline around the file; without it, it goes to the network. sidecar ships those configs,
written from the published values (`configs/<model>/`: SDXL base 1.0, SD 3.5 medium and
large, Flux.1 dev and schnell), and passes them with `config=`. Tokenizer files are not
shipped: they come from `$SIDECAR_TOKENIZERS/<model>/<tokenizer>/` (default
`~/.cache/sidecar/tokenizers/`) or from the published repo in the local Hugging Face cache,
and when neither has them the error names the files and where to put them.

A file that holds only the denoiser (BFL's `flux1-dev.safetensors`, kohya's and ComfyUI's
usual layout) gets placeholders for the VAE and text encoders, built from the same configs on
the meta device: the base model's `vae_path`, `clip_l_path`, `clip_g_path` and `t5_path`
replace them, and a placeholder still in place once they have is refused at load
(`require_components`), naming the component and the key to set.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from sidecar.errors import ModelError
from sidecar.weights import read_header

CONFIGS = Path(__file__).parent / "configs"
TOKENIZERS_ENV = "SIDECAR_TOKENIZERS"  # folder holding `<model>/<tokenizer subfolder>/` files
DEFAULT_TOKENIZERS = Path("~/.cache/sidecar/tokenizers")
PREFIXES = ("", "model.diffusion_model.")  # original layout names, bare or under SGM's prefix
# The files each tokenizer class needs in its folder (any one group).
TOKENIZER_FILES = {
    "CLIPTokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "T5TokenizerFast": (("tokenizer.json",), ("spiece.model",)),
}
CLIP_L = ("text_encoders.clip_l.", "conditioner.embedders.0.transformer.", "cond_stage_model.transformer.")
CLIP_G = ("text_encoders.clip_g.", "conditioner.embedders.1.model.")
T5 = ("text_encoders.t5xxl.",)
VAE = ("first_stage_model.", "vae.")

PLACEHOLDER_ATTRIBUTE = "sidecar_placeholder"  # on a stand-in component: the `model:` key that fills it

Shapes = dict[str, list[int]]


@dataclass(frozen=True)
class SingleFileModel:
    """A published model a single file can be: how to tell, its config, where the rest lives."""

    name: str
    arch: str
    repo: str  # the published diffusers repo (its tokenizers fit)
    fits: Callable[[Shapes], bool]
    components: dict[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)  # prefixes, config key
    config: Path | None = None  # default: CONFIGS / name

    @property
    def config_folder(self) -> Path:
        return self.config or CONFIGS / self.name


def tensor(shapes: Shapes, name: str) -> list[int] | None:
    """A tensor's shape under any of the original layouts' prefixes."""
    for prefix in PREFIXES:
        if prefix + name in shapes:
            return shapes[prefix + name]
    return None


def _width(name: str, width: int) -> Callable[[Shapes], bool]:
    return lambda shapes: (tensor(shapes, name) or [0, 0])[1] == width


FLUX_QKV = "double_blocks.0.img_attn.qkv.weight"
SD3_QKV = "joint_blocks.0.x_block.attn.qkv.weight"
FLUX_PARTS = {
    "vae": (VAE, "vae_path"),
    "text_encoder": (CLIP_L, "clip_l_path"),
    "text_encoder_2": (T5, "t5_path"),
}
SD3_PARTS = {
    "vae": (VAE, "vae_path"),
    "text_encoder": (CLIP_L, "clip_l_path"),
    "text_encoder_2": (CLIP_G, "clip_g_path"),
    "text_encoder_3": (T5, "t5_path"),
}
SDXL_PARTS = {
    "vae": (VAE, "vae_path"),
    "text_encoder": (CLIP_L, "clip_l_path"),
    "text_encoder_2": (CLIP_G, "clip_g_path"),
}

SINGLE_FILE_MODELS: list[SingleFileModel] = [
    SingleFileModel(
        "flux1-dev",
        "flux",
        "black-forest-labs/FLUX.1-dev",
        lambda s: _width(FLUX_QKV, 3072)(s) and tensor(s, "guidance_in.in_layer.weight") is not None,
        FLUX_PARTS,
    ),
    SingleFileModel(
        "flux1-schnell",
        "flux",
        "black-forest-labs/FLUX.1-schnell",
        lambda s: _width(FLUX_QKV, 3072)(s) and tensor(s, "guidance_in.in_layer.weight") is None,
        FLUX_PARTS,
    ),
    SingleFileModel(
        "sd3.5-large", "sd3", "stabilityai/stable-diffusion-3.5-large", _width(SD3_QKV, 2432), SD3_PARTS
    ),
    SingleFileModel(
        "sd3.5-medium", "sd3", "stabilityai/stable-diffusion-3.5-medium", _width(SD3_QKV, 1536), SD3_PARTS
    ),
    SingleFileModel(
        "sdxl-base-1.0",
        "sdxl",
        "stabilityai/stable-diffusion-xl-base-1.0",
        lambda s: (tensor(s, "label_emb.0.0.weight") or [0, 0])[1] == 2816,
        SDXL_PARTS,
    ),
]


def identify(path: Path) -> tuple[SingleFileModel, Shapes]:
    """Which published model the file holds, from its tensor names and shapes (header only)."""
    shapes = {name: list(info.shape) for name, info in read_header(path).tensors.items()}
    for model in SINGLE_FILE_MODELS:
        if model.fits(shapes):
            return model, shapes
    known = ", ".join(model.name for model in SINGLE_FILE_MODELS)
    raise ModelError(
        f"{path}: a single file of none of the models sidecar has configs for ({known}): "
        "point `name_or_path` at a diffusers folder instead",
        key="name_or_path",
    )


def load_single_file(
    pipeline_class: type[DiffusionPipeline], path: Path, *, dtype: torch.dtype
) -> DiffusionPipeline:
    """Load a single-file checkpoint offline with sidecar's shipped config for its model."""
    model, shapes = identify(path)
    index = {
        name: value
        for name, value in pipeline_class.load_config(model.config_folder).items()
        if isinstance(value, list) and len(value) == 2 and value[0] is not None
    }
    placeholders = {
        component: _placeholder(model, component, index[component], key)
        for component, (prefixes, key) in model.components.items()
        if not any(name.startswith(prefixes) for name in shapes)
    }
    with tempfile.TemporaryDirectory(prefix="sidecar-config-") as folder:
        config = Path(folder) / model.name
        shutil.copytree(model.config_folder, config)
        for subfolder, (_, class_name) in index.items():
            if class_name in TOKENIZER_FILES and not (config / subfolder).is_dir():
                (config / subfolder).symlink_to(tokenizer_folder(model, subfolder, class_name))
        return pipeline_class.from_single_file(
            str(path), config=str(config), dtype=dtype, local_files_only=True, **placeholders
        )


def tokenizer_folder(model: SingleFileModel, subfolder: str, class_name: str) -> Path:
    """Where this model's tokenizer files are: sidecar's tokenizer folder, else the HF cache."""
    root = Path(os.environ.get(TOKENIZERS_ENV) or DEFAULT_TOKENIZERS).expanduser()
    groups = TOKENIZER_FILES[class_name]
    local = root / model.name / subfolder
    if any(all((local / name).is_file() for name in group) for group in groups):
        return local
    from huggingface_hub import try_to_load_from_cache

    for group in groups:
        found = [try_to_load_from_cache(model.repo, f"{subfolder}/{name}") for name in group]
        if all(isinstance(item, str) for item in found):
            return Path(found[0]).parent
    files = " and ".join(f"`{name}`" for name in groups[0])
    raise ModelError(
        f"the {model.name} tokenizer is not on this machine, and sidecar never downloads: put {files} "
        f"from {model.repo}'s `{subfolder}/` folder in {local}/ (or set ${TOKENIZERS_ENV}), or download "
        f"them once into the Hugging Face cache: "
        f"`huggingface-cli download {model.repo} --include '{subfolder}/*'`",
        key="name_or_path",
    )


def _placeholder(
    model: SingleFileModel, component: str, library_class: list[str], key: str
) -> torch.nn.Module:
    """A component the file lacks, built on the meta device from the config: shapes, no weights.

    `model.<key>` replaces it; if nothing does, its first call raises naming the key.
    """
    import importlib

    library, class_name = library_class
    model_class = getattr(importlib.import_module(library), class_name)
    folder = model.config_folder / component
    with torch.device("meta"):
        if library == "transformers":
            module = model_class(model_class.config_class.from_pretrained(folder))
        else:
            module = model_class.from_config(model_class.load_config(folder))

    def refuse(*arguments) -> None:
        raise ModelError(
            f"the single file {model.name} holds no {component}; set `model.{key}` to its file", key=key
        )

    module.register_forward_pre_hook(refuse)
    if hasattr(module, "encode"):  # the VAE runs through encode/decode, not forward
        module.decode = module.encode = refuse  # type: ignore[method-assign]
    setattr(module, PLACEHOLDER_ATTRIBUTE, key)
    return module


def require_components(pipe: DiffusionPipeline, source: str | Path) -> None:
    """Refuse a pipeline that still holds a placeholder: a single file with the denoiser alone,
    without the `model:` keys that name the parts it lacks. Raised at load, naming each part and
    its key, rather than at the first render."""
    missing = [
        (name, getattr(module, PLACEHOLDER_ATTRIBUTE))
        for name, module in pipe.components.items()
        if getattr(module, PLACEHOLDER_ATTRIBUTE, None)
    ]
    if not missing:
        return
    component, key = missing[0]
    every = ", ".join(f"`model.{name_key}` ({name})" for name, name_key in missing)
    others = f" (every part the file lacks: {every})" if len(missing) > 1 else ""
    raise ModelError(
        f"must be set: the single file {Path(source).name} holds no {component}; point it at the "
        f"{component}'s file or folder{others}",
        key=key,
    )
