"""Reading LoRA files: their format, their likely architecture, and whether they applied.

diffusers' loaders do the loading and the key conversion (kohya, ComfyUI, PEFT...).
What they do not do is complain: unprefixed keys, or kohya keys on SD 3.5, load as a
silent no-op with one log line. A LoRA that does not apply is the worst bug a
sample renderer can have, so sidecar counts the LoRA modules diffusers converted
from the file and the layers it actually injected, and raises or warns.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from sidecar.arch import ARCH_SPECS, Arch, guess_lora_arch
from sidecar.errors import CheckpointError, LoraError
from sidecar.weights import refuse_pickle

logger = logging.getLogger("sidecar.render")


# Key suffixes that mark one LoRA module's down (A) matrix, in every naming diffusers knows.
DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight", ".lora.down.weight", "_lora.down.weight")
LYCORIS_MARKERS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".oft_blocks")

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")
PEFT_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.")
COMFY_PREFIXES = ("diffusion_model.", "model.diffusion_model.")
TEXT_ENCODER_MARKERS = ("text_encoder", "lora_te", "te1.", "te2.", "text_encoders.", "clip_l.", "t5.")
# OneTrainer's OMI layout: Flux's BFL names under `transformer.` (`convert_onetrainer.py`).
OMI_MARKERS = ("transformer.double_blocks.", "transformer.single_blocks.")


@dataclass(frozen=True)
class LoraFile:
    """What a LoRA file holds, read from its safetensors header only."""

    path: Path
    format: str  # peft | kohya | comfyui | omi | lycoris | unprefixed
    arch_guess: str | None  # a `sidecar.arch.LORA_KEY_MARKERS` group; None when several fit
    module_count: int  # LoRA modules as stored in the file (before any conversion)
    has_text_encoder: bool  # re-encode prompts with the LoRA applied
    first_keys: tuple[str, ...]
    metadata: dict[str, str]
    keys: tuple[str, ...] = ()  # every tensor name, to choose the route (`routes.route_for`)


@dataclass(frozen=True)
class LoraReport:
    """How a LoRA applied to a loaded pipeline."""

    lora: LoraFile
    expected: dict[str, int]  # LoRA modules per component after diffusers' conversion
    injected: dict[str, int]  # layers that really carry the adapter, per component
    hotswapped: bool

    @property
    def expected_total(self) -> int:
        return sum(self.expected.values())

    @property
    def injected_total(self) -> int:
        return sum(self.injected.values())


def inspect_lora(path: str | Path) -> LoraFile:
    """Read a LoRA file's header and tell its format and architecture.

    Raises `CheckpointError` for a pickle, an unreadable safetensors file, or one
    with no LoRA weights at all (a base model, an optimizer state...).
    """
    path = Path(path)
    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = dict(handle.metadata() or {})
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: no such file (deleted or pruned before it was read)") from error
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    lora_format = detect_format(keys)
    if lora_format is None:
        sample = ", ".join(f"`{key}`" for key in sorted(keys)[:3]) or "no tensors"
        raise CheckpointError(f"{path}: holds no LoRA weights (keys like {sample})")
    down_keys = [key for key in keys if key.endswith(DOWN_SUFFIXES) or key.endswith(LYCORIS_MARKERS)]
    return LoraFile(
        path=path,
        format=lora_format,
        arch_guess=guess_lora_arch(keys),
        module_count=len(down_keys),
        has_text_encoder=any(marker in key for key in down_keys for marker in TEXT_ENCODER_MARKERS),
        first_keys=tuple(sorted(keys)[:3]),
        metadata=metadata,
        keys=tuple(keys),
    )


def detect_format(keys: list[str]) -> str | None:
    """The naming convention of a LoRA's keys, or None when none are LoRA keys."""
    if any(marker in key for key in keys for marker in LYCORIS_MARKERS):
        return "lycoris"
    lora_keys = [key for key in keys if key.endswith(DOWN_SUFFIXES)]
    if not lora_keys:
        return None
    if all(key.startswith(KOHYA_PREFIXES) for key in lora_keys):
        return "kohya"
    if all(key.startswith(COMFY_PREFIXES) for key in lora_keys):
        return "comfyui"
    if any(key.startswith(OMI_MARKERS) for key in lora_keys):
        return "omi"
    if all(key.startswith(PEFT_PREFIXES) for key in lora_keys):
        return "peft"
    return "unprefixed"


def expected_modules(converted_state_dict: dict) -> dict[str, int]:
    """LoRA modules per pipeline component in a state dict diffusers has converted."""
    counts: Counter[str] = Counter()
    for key in converted_state_dict:
        if key.endswith(DOWN_SUFFIXES):
            component = key.split(".", 1)[0] if key.startswith(PEFT_PREFIXES) else "unmapped"
            counts[component] += 1
    return dict(counts)


def check_applied(lora: LoraFile, expected: dict[str, int], injected: dict[str, int], *, arch: Arch) -> None:
    """Raise when nothing applied; warn when part of the file did not.

    `expected` counts modules after diffusers' conversion; `injected` the layers that
    really carry the adapter.
    """
    label = ARCH_SPECS[arch].label
    if sum(injected.values()) == 0:
        hint = ""
        if lora.arch_guess and not ARCH_SPECS[arch].takes_lora_of(lora.arch_guess):
            hint = (
                f"; its key names are those of a {ARCH_SPECS[lora.arch_guess].label} LoRA, "
                f"but the base model is {label}"
            )
        elif lora.format == "unprefixed":
            hint = (
                "; its keys have no `unet.` / `transformer.` prefix, so diffusers cannot tell "
                "which model they belong to"
            )
        elif expected.get("unmapped"):
            hint = f"; diffusers has no converter for {lora.format} keys on {label}"
        keys = ", ".join(f"`{key}`" for key in lora.first_keys)
        raise LoraError(
            f"{lora.path}: the LoRA did not apply: 0 of {lora.module_count} LoRA modules "
            f"({lora.format} format, keys like {keys}) matched a layer of the {label} base model{hint}"
        )
    if lora.arch_guess and not ARCH_SPECS[arch].takes_lora_of(lora.arch_guess):
        # Some layer names exist in several architectures (SD 3.5 and Flux share
        # `transformer_blocks.N.attn.to_q`): a foreign LoRA can half-apply. Never render that.
        raise LoraError(
            f"{lora.path}: this is a {ARCH_SPECS[lora.arch_guess].label} LoRA (keys like "
            f"`{lora.first_keys[0]}`), but the base model is {label}; "
            f"{sum(injected.values())} layers matched by name only"
        )
    for component, count in sorted(expected.items()):
        got = injected.get(component, 0)
        if got < count:
            logger.warning(
                "%s: only %d of %d LoRA modules for %s applied; the rest match no layer of the %s base",
                lora.path,
                got,
                count,
                component,
                label,
            )
