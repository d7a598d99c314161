"""LyCORIS files (LoKr, LoHa, LoCon as LyCORIS writes them), applied with the `lycoris-lora` library.

diffusers 0.42 loads LoKr only for Flux.2 and Z-Image and has no LoHa; PEFT's LoHa/LoKr
layers take one rank and alpha per adapter, where a LyCORIS file sets each module's own
factor shapes and scale (a LoKr with both factors full has a scale of 1 whatever its
alpha). So sidecar hands the file to the library that wrote it (SimpleTuner's choice):
`create_lycoris_from_weights` builds each module from its tensors and `apply_to` wraps the
layers' forward. The strength is the network's multiplier.

Key names: SimpleTuner's are LyCORIS' own (`lycoris_<layer path with _>`), ready for the
denoiser. kohya's (`lora_unet_…`, `lora_te1_…`; SDXL in the SGM layout) are renamed to those:
SDXL through diffusers' own kohya name conversion (which knows the SGM block numbering), the
transformer models and the text encoders by their flat layer paths.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_unet_state_dict_to_peft

from sidecar.render.adapters.conversion import Layers, flat_names, refuse_unconverted, resolve_flat
from sidecar.render.offload import NETWORK_ATTRIBUTE

LYCORIS_PREFIX = "lycoris_"  # LyCORIS' own module-name prefix (LycorisNetwork.LORA_PREFIX)
KOHYA_TEXT_PREFIXES = {
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
}
KOHYA_TEXT_PREFIXES_FLUX = {"lora_te1_": "text_encoder", "lora_te3_": "text_encoder_2"}


def lycoris_names(
    state_dict: dict[str, torch.Tensor], layers: Layers, *, denoiser: str, pipe: DiffusionPipeline
) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors per component, each key renamed to LyCORIS' `lycoris_<path>`."""
    module_keys = sorted({key.split(".", 1)[0] for key in state_dict if "." in key})
    flux = "single_transformer_blocks.0.proj_mlp" in layers.get(denoiser, {})
    text_prefixes = KOHYA_TEXT_PREFIXES_FLUX if flux else KOHYA_TEXT_PREFIXES
    sgm = _sgm_names(module_keys, pipe) if denoiser == "unet" else {}
    renamed: dict[str, str] = {}
    component_of: dict[str, str] = {}
    unconverted: list[str] = []
    for key in module_keys:
        found = _resolve(key, layers, denoiser=denoiser, sgm=sgm, text_prefixes=text_prefixes)
        if found is None:
            unconverted.append(key)
        else:
            component_of[key], layer = found
            renamed[key] = LYCORIS_PREFIX + layer.replace(".", "_")
    refuse_unconverted(unconverted, what="LyCORIS file")
    per_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module_key, _, suffix = key.partition(".")
        per_component.setdefault(component_of[module_key], {})[f"{renamed[module_key]}.{suffix}"] = tensor
    return per_component


def _resolve(
    key: str, layers: Layers, *, denoiser: str, sgm: dict[str, tuple[str, str]], text_prefixes: dict[str, str]
) -> tuple[str, str] | None:
    """(component, layer path) of one module key, or None."""
    if key in sgm:
        return sgm[key]
    if key.startswith(LYCORIS_PREFIX):
        layer = flat_names(layers, denoiser).get(key.removeprefix(LYCORIS_PREFIX))
        return None if layer is None else (denoiser, layer)
    for prefix, component in (
        ("lora_unet_", denoiser),
        ("lora_transformer_", denoiser),
        *text_prefixes.items(),
    ):
        if key.startswith(prefix):
            layer = resolve_flat(layers, component, key.removeprefix(prefix))
            return None if layer is None else (component, layer)
    return None


def _sgm_names(module_keys: list[str], pipe: DiffusionPipeline) -> dict[str, tuple[str, str]]:
    """kohya SDXL names (SGM or diffusers blocks) -> (component, layer), by diffusers' own converter.

    Each name goes through `lora_state_dict` as a one-number LoRA whose value is its index:
    the converted key holding that number is its diffusers layer. LyCORIS' modules use
    exactly kohya's names, only their tensors differ.
    """
    kohya = [key for key in module_keys if key.startswith(("lora_unet_", "lora_te1_", "lora_te2_"))]
    if not kohya:
        return {}
    probe: dict[str, torch.Tensor] = {}
    for index, key in enumerate(kohya):
        probe[f"{key}.lora_down.weight"] = torch.full((1, 1), float(index))
        probe[f"{key}.lora_up.weight"] = torch.zeros(1, 1)
    converted = type(pipe).lora_state_dict(probe, unet_config=pipe.unet.config)
    state_dict = converted[0] if isinstance(converted, tuple) else converted
    names: dict[str, tuple[str, str]] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        part = {
            k.removeprefix(f"{component}."): v for k, v in state_dict.items() if k.startswith(f"{component}.")
        }
        for key, value in convert_unet_state_dict_to_peft(part).items():
            if key.endswith(".lora_A.weight"):
                names[kohya[int(value.item())]] = (component, key.removesuffix(".lora_A.weight"))
    return names


Lift = Callable[[], contextlib.AbstractContextManager[None]]


class LycorisSlot:
    """The LyCORIS networks applied to a pipeline's components (at most one per component).

    Each network hangs on its component (`NETWORK_ATTRIBUTE`), so it moves with it. Networks go on
    and off inside `lifted()`: the renderer's placement takes group and sequential offload's hooks
    off meanwhile (`memory.Placement.lifted`), and offloads the pipeline again, networks included.
    """

    def __init__(self, pipe: DiffusionPipeline, *, lifted: Lift = contextlib.nullcontext) -> None:
        self.pipe = pipe
        self.lifted = lifted
        self.networks: dict[str, torch.nn.Module] = {}
        self._alphas: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def active(self) -> bool:
        return bool(self.networks)

    def apply(
        self, weights: dict[str, dict[str, torch.Tensor]], *, multiplier: float = 1.0
    ) -> dict[str, int]:
        """Build and apply one network per component; `{component: layers wrapped}`."""
        from lycoris import create_lycoris_from_weights

        with self.lifted():
            self.remove()
            for component, tensors in weights.items():
                module = getattr(self.pipe, component)
                parameter = next(module.parameters())  # real: no offload hook holds it aside
                network, _ = create_lycoris_from_weights(multiplier, None, module, weights_sd=dict(tensors))
                network.apply_to()
                network.to(device=parameter.device, dtype=parameter.dtype)
                module.add_module(NETWORK_ATTRIBUTE, network)
                self.networks[component] = network
                self._alphas[component] = _alphas(tensors)
        return {component: len(network.loras) for component, network in self.networks.items()}

    def copy_in_place(self, weights: dict[str, dict[str, torch.Tensor]]) -> bool:
        """The next checkpoint of a run (same modules, shapes and alphas): copy its factors in."""
        if set(weights) != set(self.networks):
            return False
        for component, tensors in weights.items():
            current = self.networks[component].state_dict()
            if set(tensors) != set(current) or _alphas(tensors).keys() != self._alphas[component].keys():
                return False
            if any(tensors[key].shape != current[key].shape for key in tensors):
                return False
            if any(
                not torch.equal(value, self._alphas[component][key])
                for key, value in _alphas(tensors).items()
            ):
                return False  # a module's scale is fixed from its alpha when it is built
        with torch.no_grad():
            for component, tensors in weights.items():
                self.networks[component].load_state_dict(tensors, strict=True)
        return True

    def set_multiplier(self, multiplier: float) -> None:
        for network in self.networks.values():
            network.set_multiplier(multiplier)

    def remove(self) -> None:
        if self.networks:
            with self.lifted():
                for component, network in self.networks.items():
                    network.restore()
                    module = getattr(self.pipe, component)
                    if NETWORK_ATTRIBUTE in module._modules:
                        del module._modules[NETWORK_ATTRIBUTE]
        self.networks = {}
        self._alphas = {}


def _alphas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in tensors.items() if re.search(r"\.alpha$", key)}


def file_modules(weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, int]:
    """LyCORIS modules per component in renamed weights."""
    return {
        component: len({key.split(".", 1)[0] for key in tensors}) for component, tensors in weights.items()
    }
