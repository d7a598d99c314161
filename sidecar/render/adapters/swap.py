"""One LoRA at a time on a loaded pipeline, swapped without reloading the base.

The renderer keeps one adapter slot (`ADAPTER_NAME`). Three ways to put a LoRA in it,
cheapest first:

1. the next checkpoint of the same run (same keys, shapes and alphas): its weights are
   copied into the loaded adapter in place (`_copy_into_adapter`);
2. another file of the same layout: diffusers' `load_lora_weights(..., hotswap=True)`;
3. anything else: unload, then `load_lora_weights`.

diffusers loads from the path, not a state dict, so `lora_alpha` in the header metadata
is kept. After each load, the layers that really carry the adapter are counted against
the modules in the file (`check_applied`): a LoRA that applies to nothing is an error,
never a silent no-op.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.tuners.tuners_utils import BaseTunerLayer

from sidecar.arch import ARCH_SPECS, ArchSpec
from sidecar.errors import LoraError
from sidecar.render.adapters.lora_files import (
    LoraFile,
    LoraReport,
    check_applied,
    expected_modules,
    inspect_lora,
)

logger = logging.getLogger("sidecar.render")

ADAPTER_NAME = "sidecar"  # the one adapter slot the renderer swaps checkpoints through
CONVERSION_ERRORS = (RuntimeError, ValueError, KeyError, AssertionError, IndexError)


def first_line(error: BaseException, *, limit: int = 300) -> str:
    """An exception's first line, cut short: diffusers' messages can list every key of a file."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class AdapterSlot:
    """The pipeline's one LoRA slot: what is loaded, and how to swap the next file in."""

    def __init__(self, pipe: DiffusionPipeline, *, pipeline_class: type[DiffusionPipeline], spec: ArchSpec):
        self.pipe = pipe
        self.pipeline_class = pipeline_class
        self.spec = spec
        self.lora: LoraFile | None = None
        self._weights: dict[str, dict[str, torch.nn.Parameter]] = {}  # for in-place swaps
        self._alphas: object = None
        self._injected: dict[str, int] = {}

    def apply(self, path: str | Path, *, in_place_allowed: bool = True) -> LoraReport:
        """Swap the loaded LoRA for the one at `path`; raises `LoraError` when it does not apply.

        `in_place_allowed` is False while offload hooks hold the weights outside the
        modules, where copying into the parameters would miss them.
        """
        lora = inspect_lora(path)
        converted, alphas = self._converted_state_dict(lora)
        expected = expected_modules(converted)
        if in_place_allowed and self._copy_into_adapter(lora, converted, alphas):
            return self._loaded(lora, expected, self._injected, hotswapped=True)
        hotswap = self._can_hotswap(lora)
        if hotswap:
            try:
                self.pipe.load_lora_weights(str(lora.path), adapter_name=ADAPTER_NAME, hotswap=True)
            except (RuntimeError, ValueError) as error:
                logger.info("hot-swap of %s failed (%s); unloading and loading instead", lora.path, error)
                hotswap = False
        if not hotswap:
            self.remove()
            try:
                self.pipe.load_lora_weights(str(lora.path), adapter_name=ADAPTER_NAME)
            except (RuntimeError, ValueError, KeyError) as error:
                self.remove()
                raise LoraError(self._load_error_message(lora, error)) from error
        injected = self._injected_layers()
        try:
            check_applied(lora, expected, injected, arch=self.spec.name)
        except LoraError:
            self.remove()
            raise
        self._weights = self._adapter_parameters()
        self._alphas = alphas
        self._injected = injected
        return self._loaded(lora, expected, injected, hotswapped=hotswap)

    def remove(self) -> None:
        """Unload the LoRA: the pipeline renders the base model again."""
        if ADAPTER_NAME in self._adapter_names():
            self.pipe.delete_adapters(ADAPTER_NAME)
        self.lora = None
        self._weights = {}

    def _loaded(
        self, lora: LoraFile, expected: dict[str, int], injected: dict[str, int], *, hotswapped: bool
    ) -> LoraReport:
        self.lora = lora
        return LoraReport(lora=lora, expected=expected, injected=injected, hotswapped=hotswapped)

    def _copy_into_adapter(self, lora: LoraFile, converted: dict[str, torch.Tensor], alphas: object) -> bool:
        """The next checkpoint of the same run: copy its weights into the loaded adapter.

        diffusers' own hot-swap walks the whole model (`state_dict()`, every module) on
        each swap; when the new file has exactly the loaded adapter's keys, shapes and
        alphas, copying the tensors in place gives the same weights for a fraction of the
        cost. Anything else (text-encoder weights, other alphas) returns False and takes
        diffusers' path.
        """
        if (
            not self._can_hotswap(lora)
            or lora.has_text_encoder
            or alphas != self._alphas
            or not self._weights
        ):
            return False
        copies: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for component, parameters in self._weights.items():
            prefix = f"{component}."
            part = {
                key.removeprefix(prefix): value for key, value in converted.items() if key.startswith(prefix)
            }
            part = convert_unet_state_dict_to_peft(part)
            if set(part) != set(parameters):
                return False
            for key, tensor in part.items():
                if tensor.shape != parameters[key].shape:
                    return False
                copies.append((parameters[key], tensor))
        if len(copies) != sum(1 for key in converted if key.endswith((".weight", ".bias"))):
            return False  # the file holds weights for something the adapter does not have
        with torch.no_grad():
            for parameter, tensor in copies:
                parameter.copy_(tensor)
        return True

    def _adapter_parameters(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """The adapter's LoRA matrices, `{component: {"<module>.lora_A.weight": parameter}}`."""
        marker = f".{ADAPTER_NAME}."
        weights: dict[str, dict[str, torch.nn.Parameter]] = {}
        for name, component in self.pipe.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            found = {
                key.replace(marker, "."): parameter
                for key, parameter in component.named_parameters()
                if marker in key and (".lora_A." in key or ".lora_B." in key)
            }
            if found:
                weights[name] = found
        return weights

    def _adapter_names(self) -> set[str]:
        return {name for names in self.pipe.get_list_adapters().values() for name in names}

    def _can_hotswap(self, lora: LoraFile) -> bool:
        """Same format, module count and text-encoder use as the loaded LoRA: same layout."""
        loaded = self.lora
        return (
            loaded is not None
            and ADAPTER_NAME in self._adapter_names()
            and (loaded.format, loaded.module_count, loaded.has_text_encoder)
            == (lora.format, lora.module_count, lora.has_text_encoder)
        )

    def _converted_state_dict(self, lora: LoraFile) -> tuple[dict[str, torch.Tensor], object]:
        """The file's weights after diffusers' own key conversion, and what sets their scale.

        The scale comes from kohya `.alpha` tensors (returned by diffusers as network
        alphas) or from PEFT's `lora_adapter_metadata` header; two files with equal
        values of both scale their weights alike.
        """
        try:
            converted = self.pipeline_class.lora_state_dict(str(lora.path))
        except CONVERSION_ERRORS as error:
            self.remove()  # a failed apply always leaves the base alone, never the old LoRA
            raise LoraError(
                f"{lora.path}: diffusers cannot convert this {lora.format} LoRA for "
                f"{self.spec.label}{self._arch_hint(lora)}: {first_line(error)}"
            ) from error
        if isinstance(converted, tuple):
            state_dict, network_alphas = converted[0], converted[1]
        else:
            state_dict, network_alphas = converted, None
        alphas = (
            tuple(sorted((key, float(value)) for key, value in (network_alphas or {}).items())),
            lora.metadata.get(LORA_ADAPTER_METADATA_KEY),
        )
        return state_dict, alphas

    def _injected_layers(self) -> dict[str, int]:
        """Layers per component that really carry the sidecar adapter."""
        injected: dict[str, int] = {}
        for name, component in self.pipe.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            count = sum(
                1
                for module in component.modules()
                if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in getattr(module, "lora_A", {})
            )
            if count:
                injected[name] = count
        return injected

    def _arch_hint(self, lora: LoraFile) -> str:
        """`(a Flux.1 LoRA)` when the key names tell another architecture, else nothing."""
        if lora.arch_guess and lora.arch_guess != self.spec.name:
            return f" (its key names are those of a {ARCH_SPECS[lora.arch_guess].label} LoRA)"
        return ""

    def _load_error_message(self, lora: LoraFile, error: Exception) -> str:
        mismatch = [line.strip() for line in str(error).splitlines() if "size mismatch" in line][:2]
        if mismatch:
            return (
                f"{lora.path}: LoRA shapes do not match the {self.spec.label} base model"
                f"{self._arch_hint(lora)}: " + "; ".join(mismatch)
            )
        return (
            f"{lora.path}: diffusers could not load this {lora.format} LoRA on {self.spec.label}"
            f"{self._arch_hint(lora)}: {first_line(error)}"
        )
