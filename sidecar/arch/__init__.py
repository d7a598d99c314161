"""What sidecar knows of each architecture without importing torch or diffusers.

Config parsing, the sample plan, `sidecar check` and the memory plan need the defaults,
the detection markers and the components; they must stay fast and work without a model
loaded, so these facts live here and the renderers in `sidecar/render/` read them:
- `spec.py`: the shape of the facts (`ArchSpec`, `Workload`, the component roles);
- `specs.py`: one `ArchSpec` per architecture, its aliases among its facts, and
  `ARCH_SPECS` in detection order. Adding an architecture is one `ArchSpec` there, one
  renderer file, one registry line and a tiny builder in `sidecar/testing/`;
- this module: the lookups (a name or alias, a pipeline class, a single file's tensor names,
  a LoRA's key names -> the architecture).
"""

from __future__ import annotations

from sidecar.arch.spec import BACKBONE, GIB, TEXT_ENCODER, VAE, Arch, ArchSpec, GuidanceKind, Workload
from sidecar.arch.specs import ARCH_ALIASES, ARCH_SPECS

__all__ = [
    "ARCH_ALIASES",
    "ARCH_SPECS",
    "BACKBONE",
    "GIB",
    "LORA_KEY_MARKERS",
    "TEXT_ENCODER",
    "VAE",
    "Arch",
    "ArchSpec",
    "GuidanceKind",
    "Workload",
    "arch_from_pipeline_class",
    "arch_from_tensor_names",
    "arch_spec",
    "canonical_arch",
    "guess_lora_arch",
    "known_arch_labels",
]


def canonical_arch(name: str) -> Arch | None:
    """The architecture a name or alias means, or None. ai-toolkit's UI writes a variant
    after a colon (`zimage:turbo`, `qwen_image_edit_plus:2511`) and drops it, as sidecar does."""
    key = name.strip().lower().split(":", 1)[0].strip()
    return ARCH_ALIASES.get(key)


def arch_spec(name: str) -> ArchSpec:
    """The spec for an architecture name or alias; raises naming the known names."""
    key = canonical_arch(name)
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
    """The architecture of a single-file checkpoint from its tensor names, or None.

    Specs are tried in `ARCH_SPECS` order, the more specific first (a Chroma file also has
    Flux's `double_blocks`).
    """
    for spec in ARCH_SPECS.values():
        if any(marker in name for name in names for marker in spec.single_file_markers):
            return spec.name
    return None


# Substrings of LoRA keys that only one group of architectures' modules have, in the layouts
# their trainers write (diffusers / PEFT, kohya / musubi `lora_unet_…`, ai-toolkit / ComfyUI
# `diffusion_model.…`). A group is named after the architecture whose label the messages use.
LORA_KEY_MARKERS: dict[str, tuple[str, ...]] = {
    "flux": ("double_blocks", "single_blocks", "single_transformer_blocks"),  # Flux.1, Kontext, Chroma
    "flux2": ("to_qkv_mlp_proj", "linear_in", "stream_modulation"),  # Flux.2's fused single block, its MLP
    "sd3": ("joint_blocks",),
    "sdxl": (
        "unet.",
        "lora_unet_down_blocks",
        "lora_unet_up_blocks",
        "lora_unet_mid_block",
        "lora_unet_input_blocks",
        "lora_unet_output_blocks",
        "lora_unet_middle_block",
        "lora_te2_",
    ),
    # SD 1.5's first down block and last up block have attention, SDXL's do not; one text encoder.
    "sd15": (
        "down_blocks.0.attentions",
        "down_blocks_0_attentions",
        "up_blocks.3.attentions",
        "up_blocks_3_attentions",
        "input_blocks_1_1_",
        "lora_te_text_model",
    ),
    "qwen_image": ("img_mlp.net", "img_mlp_net", "txt_mlp.net", "txt_mlp_net", "img_mod.1", "img_mod_1"),
    "zimage": ("noise_refiner", "context_refiner", "feed_forward", ".attention.to_", "_attention_to_"),
}
# A group whose markers are found wins over the one named beside it, whose names it shares.
LORA_MARKER_PRECEDENCE = (("flux2", "flux"), ("sd15", "sdxl"))
# Keys of a transformer denoiser: never a UNet's (a `lora_te2_` CLIP-G beside them is SD 3.5's).
TRANSFORMER_KEY_PREFIXES = ("lora_transformer_", "transformer.", "lycoris_transformer_blocks_")


def guess_lora_arch(keys: list[str] | tuple[str, ...]) -> str | None:
    """The one group of architectures (`LORA_KEY_MARKERS`) whose module names a LoRA's keys use,
    or None when they fit several or none. `ArchSpec.takes_lora_of` says which bases take it."""
    found = {
        group for group, markers in LORA_KEY_MARKERS.items() if any(m in key for key in keys for m in markers)
    }
    for winner, loser in LORA_MARKER_PRECEDENCE:
        if winner in found:
            found.discard(loser)
    if any(key.startswith(TRANSFORMER_KEY_PREFIXES) for key in keys):
        found -= {"sdxl", "sd15"}
    return found.pop() if len(found) == 1 else None


def known_arch_labels() -> str:
    """`Stable Diffusion XL (sdxl), ...`: for messages that list what sidecar renders."""
    return ", ".join(f"{spec.label} ({spec.name})" for spec in ARCH_SPECS.values())
