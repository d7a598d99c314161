"""What sidecar's own LoRA converters share: reading LoRA modules, folding alpha, splitting fused rows.

A converter is one pure function per source format, `state_dict -> state_dict`, from the
trainer's keys to diffusers' PEFT names (`transformer.<layer>.lora_A.weight`, `….lora_B.weight`).
Alpha is folded into `lora_B` (the result loads from a dict, where diffusers has no alpha
slot and takes alpha = rank), and a fused layer's up rows are split into its parts with the
sizes read from the loaded model's layers, never from hard-coded widths. Keys a converter
does not map are an error naming them, never a silent drop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sidecar.errors import LoraError

# Suffixes of a LoRA module's tensors: (down, up) pairs in kohya and PEFT spellings, and alpha.
PAIR_SUFFIXES = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))
ALPHA_SUFFIX = ".alpha"

Layers = dict[str, dict[str, int]]  # {component: {layer name: out_features}} of the loaded model


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module of a file: its key (without suffix), factors and alpha (None: = rank)."""

    key: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with alpha / rank folded into B."""
        scale = 1.0 if self.alpha is None else self.alpha / self.rank
        return self.down, self.up * scale


def lora_modules(state_dict: dict[str, torch.Tensor]) -> tuple[list[LoraModule], list[str]]:
    """The file's LoRA modules, and the keys that belong to none (reported, never dropped)."""
    modules: list[LoraModule] = []
    used: set[str] = set()
    for key in state_dict:
        for down_suffix, up_suffix in PAIR_SUFFIXES:
            if not key.endswith(down_suffix):
                continue
            base = key.removesuffix(down_suffix)
            up_key, alpha_key = base + up_suffix, base + ALPHA_SUFFIX
            if up_key not in state_dict:
                continue
            alpha = state_dict.get(alpha_key)
            modules.append(
                LoraModule(base, state_dict[key], state_dict[up_key], None if alpha is None else float(alpha))
            )
            used.update((key, up_key, alpha_key))
    leftover = sorted(key for key in state_dict if key not in used)
    return modules, leftover


def peft_pair(component: str, layer: str, down: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{layer}.lora_A.weight": down.contiguous(),
        f"{component}.{layer}.lora_B.weight": up.contiguous(),
    }


def split_fused(
    module: LoraModule, component: str, parts: list[str], layers: Layers, *, swap_halves: bool = False
) -> dict[str, torch.Tensor]:
    """A fused module's LoRA as one per part: the down shared, the up's rows split by the parts' widths.

    `swap_halves` swaps the two halves of the rows (a modulation stored as (shift, scale)
    where diffusers has (scale, shift)).
    """
    down, up = module.folded()
    widths = [layers[component][part] for part in parts]
    if sum(widths) != up.shape[0]:
        raise LoraError(
            f"`{module.key}` has {up.shape[0]} output rows, but the base model's "
            f"{' + '.join(parts)} have {sum(widths)} ({' + '.join(map(str, widths))})"
        )
    if swap_halves:
        up = torch.cat(up.chunk(2)[::-1])
    converted: dict[str, torch.Tensor] = {}
    for part, rows in zip(parts, up.split(widths), strict=True):
        converted.update(peft_pair(component, part, down, rows))
    return converted


def flat_names(layers: Layers, component: str) -> dict[str, str]:
    """`{layer path with '.' -> '_': layer path}`: how kohya-style flat names find their layer."""
    return {name.replace(".", "_"): name for name in layers.get(component, {})}


def resolve_flat(layers: Layers, component: str, flat: str) -> str | None:
    """The layer a flat kohya-style name means; CLIP's may carry transformers 4's `text_model_`."""
    names = flat_names(layers, component)
    return names.get(flat) or names.get(flat.removeprefix("text_model_"))


def prefixed_pair(
    module: LoraModule, prefixes: dict[str, str], layers: Layers
) -> dict[str, torch.Tensor] | None:
    """A module named `<prefix><flat layer path>` (`lora_te3_encoder_block_0_…`) as PEFT keys."""
    for prefix, component in prefixes.items():
        if module.key.startswith(prefix):
            layer = resolve_flat(layers, component, module.key.removeprefix(prefix))
            return None if layer is None else peft_pair(component, layer, *module.folded())
    return None


def convert_each(
    state_dict: dict[str, torch.Tensor],
    convert_one: Callable[[LoraModule], dict[str, torch.Tensor] | None],
    *,
    what: str,
) -> dict[str, torch.Tensor]:
    """Every LoRA module through `convert_one` (None: it maps to no layer); unmapped keys raise."""
    modules, unconverted = lora_modules(state_dict)
    converted: dict[str, torch.Tensor] = {}
    for module in modules:
        pair = convert_one(module)
        if pair is None:
            unconverted.append(module.key)
        else:
            converted.update(pair)
    refuse_unconverted(unconverted, what=what)
    return converted


def refuse_unconverted(keys: list[str], *, what: str) -> None:
    """Raise naming the keys a converter could not map."""
    if keys:
        shown = ", ".join(f"`{key}`" for key in keys[:5])
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        raise LoraError(f"{len(keys)} keys of this {what} map to no layer of the base model: {shown}{more}")
