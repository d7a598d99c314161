"""One LoRA at a time on a loaded pipeline, swapped without reloading the base.

The renderer keeps one adapter slot (`ADAPTER_NAME`). Three ways to put a LoRA in it,
cheapest first:

1. the next checkpoint of the same run (same keys, shapes and alphas): its weights are
   copied into the loaded adapter in place (`_copy_into_adapter`);
2. another file of the same layout: diffusers' `load_lora_weights(..., hotswap=True)`;
3. anything else: unload, then `load_lora_weights`.

Each file takes the route `routes.route_for` gives it: layouts diffusers converts load from
the path, so `lora_alpha` in the header metadata is kept; layouts sidecar converts itself
load from the converted state dict (alpha folded in); LyCORIS files go to the
`lycoris-lora` library (`lycoris.py`), swapped in place the same way. After each load, the
layers that really carry the adapter are counted against the modules in the file
(`check_applied`): a LoRA that applies to nothing is an error, never a silent no-op.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from sidecar.arch import ARCH_SPECS, ArchSpec
from sidecar.errors import LoraError
from sidecar.render.adapters.conversion import Layers
from sidecar.render.adapters.encoders import (
    inject_encoder_lora,
    layer_widths,
    remove_encoder_lora,
    set_encoder_strength,
    skipped_encoders,
)
from sidecar.render.adapters.lora_files import (
    LoraFile,
    LoraReport,
    check_applied,
    expected_modules,
    inspect_lora,
)
from sidecar.render.adapters.lycoris import Lift, LycorisSlot, file_modules, lycoris_names
from sidecar.render.adapters.routes import Route, convert_kohya_flux, route_for

logger = logging.getLogger("sidecar.render")

ADAPTER_NAME = "sidecar"  # the one adapter slot the renderer swaps checkpoints through
CONVERSION_ERRORS = (RuntimeError, ValueError, KeyError, AssertionError, IndexError)


def first_line(error: BaseException, *, limit: int = 300) -> str:
    """An exception's first line, cut short: diffusers' messages can list every key of a file."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def adapter_names(pipe: DiffusionPipeline) -> set[str]:
    """The PEFT adapters loaded anywhere in the pipeline."""
    return {name for names in pipe.get_list_adapters().values() for name in names}


def injected_layers(modules: Mapping[str, object]) -> dict[str, int]:
    """Layers per module (of those that are `torch.nn.Module`s) that really carry the sidecar adapter."""
    injected: dict[str, int] = {}
    for name, component in modules.items():
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


class AdapterSlot:
    """The pipeline's one LoRA slot: what is loaded, and how to swap the next file in."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        pipeline_class: type[DiffusionPipeline],
        spec: ArchSpec,
        lifted: Lift = contextlib.nullcontext,
    ):
        self.pipe = pipe
        self.pipeline_class = pipeline_class
        self.spec = spec
        self.lora: LoraFile | None = None
        self._weights: dict[str, dict[str, torch.nn.Parameter]] = {}  # for in-place swaps
        self._alphas: object = None
        self._injected: dict[str, int] = {}
        self._route: Route | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}  # of the loaded file's converted tensors
        self._layers: Layers | None = None
        self.lycoris = LycorisSlot(pipe, lifted=lifted)  # offload hooks off while networks change
        self._extra: dict[str, torch.nn.Module] = {}  # text encoders loaded outside diffusers' loader

    def apply(self, path: str | Path, *, in_place_allowed: bool = True) -> LoraReport:
        """Swap the loaded LoRA for the one at `path`; raises `LoraError` when it does not apply.

        `in_place_allowed` is False while offload hooks hold the weights outside the
        modules, where copying into the parameters would miss them.
        """
        lora = inspect_lora(path)
        try:
            route = route_for(list(lora.keys), arch=self.spec.name)
        except LoraError as error:
            self.remove()
            raise LoraError(f"{lora.path}: {error}") from error
        if route.kind == "lycoris":
            return self._apply_lycoris(lora, in_place_allowed=in_place_allowed)
        if self.lycoris.active:
            self.remove()
        converted, alphas, source = self._converted_state_dict(lora, route)
        expected = expected_modules(converted)
        if in_place_allowed and route == self._route and self._copy_into_adapter(lora, converted, alphas):
            return self._loaded(lora, expected, self._injected, hotswapped=True)
        extra = skipped_encoders(converted, self.pipeline_class, self.pipe)
        shapes = {key: tuple(value.shape) for key, value in converted.items()}
        # diffusers' hot-swap needs the loaded adapter's ranks (a kohya split-qkv file has 3x the rank)
        hotswap = self._can_hotswap(lora) and route == self._route and not extra and shapes == self._shapes
        if hotswap:
            try:
                self.pipe.load_lora_weights(_fresh(source), adapter_name=ADAPTER_NAME, hotswap=True)
            except (RuntimeError, ValueError) as error:
                logger.info("hot-swap of %s failed (%s); unloading and loading instead", lora.path, error)
                hotswap = False
        if not hotswap:
            self.remove()
            try:
                self.pipe.load_lora_weights(_fresh(source), adapter_name=ADAPTER_NAME)
                for component, weights in extra.items():
                    self._extra[component] = inject_encoder_lora(self.pipe, component, weights, ADAPTER_NAME)
            except (RuntimeError, ValueError, KeyError) as error:
                self.remove()
                raise LoraError(self._load_error_message(lora, error)) from error
        injected = injected_layers(self.pipe.components)
        try:
            check_applied(lora, expected, injected, arch=self.spec.name)
        except LoraError:
            self.remove()
            raise
        self._weights = self._adapter_parameters()
        self._shapes = shapes
        self._alphas = alphas
        self._injected = injected
        self._route = route
        return self._loaded(lora, expected, injected, hotswapped=hotswap)

    def _apply_lycoris(self, lora: LoraFile, *, in_place_allowed: bool) -> LoraReport:
        """A LyCORIS file through the `lycoris-lora` library; the next checkpoint copied in place."""
        try:
            weights = lycoris_names(
                load_file(str(lora.path)), self.layers(), denoiser=self.denoiser, pipe=self.pipe
            )
        except LoraError as error:
            self.remove()
            raise LoraError(f"{lora.path}: {error}") from error
        expected = file_modules(weights)
        loaded = self.lora
        if (
            in_place_allowed
            and loaded is not None
            and loaded.format == "lycoris"
            and loaded.module_count == lora.module_count
            and self.lycoris.copy_in_place(weights)
        ):
            return self._loaded(lora, expected, self._injected, hotswapped=True)
        with self.lycoris.lifted():  # one re-offload for the old network's removal and the new one
            self.remove()
            self._unwrap_peft_layers()
            injected = self.lycoris.apply(weights)
            try:
                check_applied(lora, expected, injected, arch=self.spec.name)
            except LoraError:
                self.remove()
                raise
        self._injected = injected
        return self._loaded(lora, expected, injected, hotswapped=False)

    def _unwrap_peft_layers(self) -> None:
        """Take out the PEFT wrappers an earlier LoRA left (they stay for hot-swaps): LyCORIS
        wraps the plain layers."""
        if any(
            isinstance(module, BaseTunerLayer)
            for component in self.pipe.components.values()
            if isinstance(component, torch.nn.Module)
            for module in component.modules()
        ):
            self.pipe.unload_lora_weights()

    def set_strength(self, strength: float) -> None:
        """The LoRA's strength for the next call: LyCORIS networks take it as their multiplier,
        and text encoders outside the pipeline's LoRA loader (which its `encode_prompt` does
        not scale) as their PEFT scale; the others take it from the call's kwargs."""
        self.lycoris.set_multiplier(strength)
        set_encoder_strength(self._extra, strength, ADAPTER_NAME)

    def remove(self) -> None:
        """Unload the LoRA: the pipeline renders the base model again."""
        if ADAPTER_NAME in adapter_names(self.pipe):
            self.pipe.delete_adapters(ADAPTER_NAME)
        for encoder in self._extra.values():
            remove_encoder_lora(encoder, ADAPTER_NAME)
        self._extra = {}
        self.lycoris.remove()
        self.lora = None
        self._weights = {}
        self._route = None

    @property
    def denoiser(self) -> str:
        return "unet" if isinstance(getattr(self.pipe, "unet", None), torch.nn.Module) else "transformer"

    def layers(self) -> Layers:
        """`{component: {layer: out width}}` of the base model's linear and conv layers.

        Read once, from the layers under any adapter wrapping, so converters split fused
        rows by the model's own widths.
        """
        if self._layers is None:
            self._layers = {}
            for name, component in self.pipe.components.items():
                if isinstance(component, torch.nn.Module):
                    self._layers[name] = layer_widths(component)
        return self._layers

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
        """The adapter's LoRA matrices, `{component: {"<module>.lora_A.weight": parameter}}`.

        diffusers loads a fused layer's shared down matrix (kohya's qkv) as one tensor behind
        q, k and v: each gets its own storage here, or copying the next checkpoint's three
        downs in place would leave all three the last one.
        """
        marker = f".{ADAPTER_NAME}."
        weights: dict[str, dict[str, torch.nn.Parameter]] = {}
        storages: set[int] = set()
        for name, component in self.pipe.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            found = {
                key.replace(marker, "."): parameter
                for key, parameter in component.named_parameters()
                if marker in key and (".lora_A." in key or ".lora_B." in key)
            }
            for parameter in found.values():
                if parameter.data_ptr() in storages:
                    parameter.data = parameter.data.clone()
                storages.add(parameter.data_ptr())
            if found:
                weights[name] = found
        return weights

    def _can_hotswap(self, lora: LoraFile) -> bool:
        """Same format, module count and text-encoder use as the loaded LoRA: same layout."""
        loaded = self.lora
        return (
            loaded is not None
            and ADAPTER_NAME in adapter_names(self.pipe)
            and (loaded.format, loaded.module_count, loaded.has_text_encoder)
            == (lora.format, lora.module_count, lora.has_text_encoder)
        )

    def _converted_state_dict(
        self, lora: LoraFile, route: Route
    ) -> tuple[dict[str, torch.Tensor], object, str | dict[str, torch.Tensor]]:
        """The file's weights after key conversion, what sets their scale, and what to load.

        diffusers' layouts: its own conversion, loaded from the path; the scale comes from
        kohya `.alpha` tensors (returned by diffusers as network alphas) or from PEFT's
        `lora_adapter_metadata` header, and two files with equal values of both scale their
        weights alike. sidecar's layouts: its converter, alpha folded in, loaded from the dict.
        """
        if route.kind == "converted":
            try:
                tensors = load_file(str(lora.path))
                if route.converter is None:
                    converted = convert_kohya_flux(tensors, self.layers(), self.pipeline_class)
                else:
                    converted = route.converter(tensors, self.layers())
            except (LoraError, *CONVERSION_ERRORS) as error:
                self.remove()
                raise LoraError(
                    f"{lora.path}: cannot convert this {route.layout} LoRA for {self.spec.label}"
                    f"{self._arch_hint(lora)}: {first_line(error)}"
                ) from error
            return converted, ("folded",), converted
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
        return state_dict, alphas, str(lora.path)

    def _arch_hint(self, lora: LoraFile) -> str:
        """`(a Flux.1 LoRA)` when the key names tell another architecture, else nothing."""
        if lora.arch_guess and not self.spec.takes_lora_of(lora.arch_guess):
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


def _fresh(source: str | dict[str, torch.Tensor]) -> str | dict[str, torch.Tensor]:
    """What `load_lora_weights` takes: a path, or a copy of a state dict (diffusers pops from it)."""
    return dict(source) if isinstance(source, dict) else source
