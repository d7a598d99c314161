"""What sidecar knows of each architecture without importing torch or diffusers.

Config parsing, the sample plan and `sidecar check` need the defaults and the
detection markers below; they must stay fast and work without a model loaded, so
these facts live here and the renderers in `sidecar/render/` read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Arch = Literal["sdxl", "sd3", "flux"]


@dataclass(frozen=True)
class ArchSpec:
    """Per-architecture facts. Sizes in pixels."""

    name: Arch
    label: str
    size_multiple: int  # width and height must be multiples of this (VAE factor x patch size)
    default_size: int
    default_steps: int
    default_guidance: float
    default_sampler: str
    is_flow_model: bool  # rectified-flow models take only flow-matching samplers
    pipeline_classes: tuple[str, ...]  # diffusers `model_index.json` `_class_name` values
    single_file_markers: tuple[str, ...]  # substrings of tensor names in a single-file checkpoint


SDXL = ArchSpec(
    name="sdxl",
    label="Stable Diffusion XL",
    size_multiple=8,
    default_size=1024,
    default_steps=20,
    default_guidance=7.0,
    default_sampler="euler_a",
    is_flow_model=False,
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    single_file_markers=("conditioner.embedders.1.model.", "label_emb.0.0.weight"),
)

SD3 = ArchSpec(
    name="sd3",
    label="Stable Diffusion 3.5",
    size_multiple=16,
    default_size=1024,
    default_steps=28,
    default_guidance=4.5,
    default_sampler="flowmatch",
    is_flow_model=True,
    pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
    single_file_markers=("joint_blocks.0.context_block.",),
)

FLUX = ArchSpec(
    name="flux",
    label="Flux.1",
    size_multiple=16,
    default_size=1024,
    default_steps=20,
    default_guidance=4.0,
    default_sampler="flowmatch",
    is_flow_model=True,
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline"),
    single_file_markers=("double_blocks.0.img_attn.",),
)

ARCH_SPECS: dict[str, ArchSpec] = {spec.name: spec for spec in (SDXL, SD3, FLUX)}

# Names users and trainers write for each architecture (ai-toolkit `arch`, EriDiffusion, kohya).
ARCH_ALIASES: dict[str, Arch] = {
    "sdxl": "sdxl",
    "sd_xl": "sdxl",
    "xl": "sdxl",
    "sd3": "sd3",
    "sd35": "sd3",
    "sd3.5": "sd3",
    "sd3_5": "sd3",
    "sd35_large": "sd3",
    "sd35_medium": "sd3",
    "sd3.5_large": "sd3",
    "sd3.5_medium": "sd3",
    "v3": "sd3",
    "flux": "flux",
    "flux1": "flux",
    "flux.1": "flux",
    "flux_dev": "flux",
    "flux_schnell": "flux",
    "flux-dev": "flux",
    "flux-schnell": "flux",
    "flux_kontext": "flux",  # ai-toolkit's FLUX.1 Kontext; its control images travel in the request
}


def arch_spec(name: str) -> ArchSpec:
    """The spec for an architecture name or alias; raises naming the known names."""
    key = ARCH_ALIASES.get(name.strip().lower())
    if key is None:
        known = ", ".join(sorted(ARCH_ALIASES))
        raise ValueError(f"unknown architecture {name!r}; known names: {known}")
    return ARCH_SPECS[key]


def arch_from_pipeline_class(class_name: str) -> Arch | None:
    """The architecture of a diffusers `model_index.json` `_class_name`, or None."""
    for spec in ARCH_SPECS.values():
        if class_name in spec.pipeline_classes:
            return spec.name
    return None


def arch_from_tensor_names(names: list[str] | tuple[str, ...] | set[str]) -> Arch | None:
    """The architecture of a single-file checkpoint from its tensor names, or None."""
    for spec in ARCH_SPECS.values():
        if any(marker in name for name in names for marker in spec.single_file_markers):
            return spec.name
    return None
