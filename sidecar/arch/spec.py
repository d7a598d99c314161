"""The shape of an architecture's facts: `ArchSpec`, its memory `Workload`, the component roles.

Pure data, no torch: config parsing, the sample plan, `sidecar check` and the memory plan read
them without a model loaded. The architectures themselves are in `sidecar/arch/specs.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Arch = Literal[
    "sdxl",
    "sd3",
    "flux",
    "sd15",
    "chroma",
    "flux_kontext",
    "flux2",
    "flux2_klein",
    "qwen_image",
    "qwen_image_edit",
    "qwen_image_edit_plus",
    "zimage",
    "wan",
]
# How `guidance_scale` acts: classifier-free guidance (the negative prompt always runs), Flux's
# embedded (distilled) guidance, or true CFG (a negative pass at `guidance_scale`, Qwen-Image's
# `true_cfg_scale`).
GuidanceKind = Literal["cfg", "embedded", "true_cfg"]

# The role of each pipeline component in the memory plan.
BACKBONE = "backbone"
TEXT_ENCODER = "text encoder"
VAE = "vae"

GIB = 1024**3


@dataclass(frozen=True)
class Workload:
    """Working memory per phase, bf16, one image (the memory plan scales it by dtype and batch).

    Estimates from the activations alive at once in the widest layer (tokens x widths x 2 bytes),
    rounded up; `bench/gpu_check.sh` measures them against a real card.
    """

    denoise_bytes_per_mp: int  # one denoising step at 1 MP; CFG's doubled batch included
    decode_bytes_per_mp: int  # the VAE decode of 1 MP, untiled
    encode_bytes: int  # one prompt through the largest text encoder


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
    guidance: GuidanceKind
    pipeline_classes: tuple[str, ...]  # diffusers `model_index.json` `_class_name` values
    # Substrings of tensor names in a single-file checkpoint; `ARCH_SPECS`' order breaks ties
    # where one family's names contain another's (Chroma's blocks are Flux's).
    single_file_markers: tuple[str, ...]
    components: tuple[tuple[str, str], ...]  # (pipeline component, BACKBONE / TEXT_ENCODER / VAE)
    workload: Workload
    text_encoder_keys: tuple[tuple[str, str], ...] = ()  # `model:` key of a separate file -> component
    # Single-file checkpoints: tensor-name prefix -> component, first match wins; "" takes the rest.
    single_file_prefixes: tuple[tuple[str, str], ...] = (("", "transformer"),)
    default_repo: str = ""  # where diffusers takes what a single file lacks (read from the cache only)
    control_images: int = 0  # reference images a sample may carry (`ctrl_img`, `--ci`); 0: none
    true_cfg: bool = False  # takes `true_cfg_scale`: a negative pass beside the embedded guidance (Flux)
    # The key-name groups (`LORA_KEY_MARKERS`) of the LoRA files this architecture takes; the
    # loader then checks shapes. Flux.2's trainers write BFL's block names, which are Flux.1's.
    lora_groups: tuple[str, ...] = ()
    default_height: int | None = None  # where the reference size is not square; None: `default_size`
    # Video models: a frame count is 1 + a multiple of the VAE's temporal factor; 0: images only.
    frame_step: int = 0
    default_fps: int = 16  # a video sample's fps when neither the sample nor the config names one
    # Other names users and trainers write for it (ai-toolkit's `arch`, its UI's, EriDiffusion's,
    # kohya's, SimpleTuner's), beside `name` itself; lower case.
    aliases: tuple[str, ...] = ()

    def takes_lora_of(self, group: str) -> bool:
        """Whether a LoRA whose key names are those of `group` may go on this model."""
        return group in (self.lora_groups or (self.name,))
