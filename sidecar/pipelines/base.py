"""The renderer interface: one base pipeline loaded once, LoRAs swapped in, samples out.

Each architecture file (`sdxl.py`, `sd3.py`, `flux.py`) subclasses `Renderer` and
fills in two things: how to encode one prompt, and how to turn a batch of requests
plus their embeddings into the keyword arguments of the diffusers pipeline's
`__call__`. Everything else (base loading, LoRA swapping and checking, sampler
choice, batching, the embedding cache) lives here once. The denoising loop is
always diffusers' own.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from sidecar.architectures import ARCH_SPECS, ArchSpec
from sidecar.devices import Placement, free_cuda_cache
from sidecar.errors import LoraError, ModelError
from sidecar.lora import LoraFile, LoraReport, check_applied, expected_modules, inspect_lora
from sidecar.pipelines.loading import load_base_pipeline, load_text_encoder, load_vae
from sidecar.pipelines.schedulers import make_scheduler, sampler_spec
from sidecar.prompts import SampleRequest

logger = logging.getLogger("sidecar.render")

ADAPTER_NAME = "sidecar"  # the one adapter slot the renderer swaps checkpoints through
Embeddings = dict[str, torch.Tensor]
EventCallback = Callable[[str, dict[str, Any]], None]


def _no_event(event: str, fields: dict[str, Any]) -> None:
    """Default progress callback: renderers never print."""


class Renderer(ABC):
    """One architecture's base pipeline, with at most one LoRA applied at a time."""

    spec: ClassVar[ArchSpec]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    attention_kwargs: ClassVar[str]  # the `__call__` argument that carries the LoRA scale
    text_encoder_keys: ClassVar[dict[str, str]]  # config key of a separate encoder file -> component

    def __init__(
        self, pipe: DiffusionPipeline, *, base_model: str, on_event: EventCallback = _no_event
    ) -> None:
        self.pipe = pipe
        self.base_model = base_model
        self.on_event = on_event
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self.lora: LoraFile | None = None
        self.placement: Placement | None = None  # set when placed on a device (sampling.load_renderer)
        self._adapter_weights: dict[str, dict[str, torch.nn.Parameter]] = {}  # for in-place swaps
        self._adapter_alphas: object = None
        self._adapter_injected: dict[str, int] = {}
        self._lora_generation = 0  # bumps on every swap; keys text-encoder-LoRA embeddings
        self._embeddings: dict[tuple, Embeddings] = {}
        pipe.set_progress_bar_config(disable=True)

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model_source: str | Path,
        *,
        vae_path: str | Path | None = None,
        text_encoder_paths: dict[str, str | Path | None] | None = None,
        dtype: torch.dtype = torch.float32,
        on_event: EventCallback = _no_event,
    ) -> Renderer:
        """Load the base pipeline once, on the CPU: a diffusers folder, a cached hub id, or a
        single file. `sidecar.devices.apply_memory_mode` then places it on its device.

        `text_encoder_paths` maps config keys (`clip_l_path`, `clip_g_path`, `t5_path`) to
        separate text-encoder files or folders that replace the base's own.
        """
        pipe = load_base_pipeline(cls.pipeline_class, model_source, dtype=dtype)
        if vae_path:
            pipe.vae = load_vae(vae_path, dtype=dtype)
        for key, path in (text_encoder_paths or {}).items():
            if not path:
                continue
            if key not in cls.text_encoder_keys:
                known = ", ".join(f"`model.{name}`" for name in cls.text_encoder_keys)
                raise ModelError(f"is not used by {cls.spec.label}; it takes {known}", key=key)
            component = cls.text_encoder_keys[key]
            setattr(pipe, component, load_text_encoder(getattr(pipe, component), path, key=key, dtype=dtype))
        return cls(pipe, base_model=str(model_source), on_event=on_event)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    # -- LoRA ----------------------------------------------------------------------------

    def apply_lora(self, path: str | Path) -> LoraReport:
        """Swap the loaded LoRA for the one at `path`, without reloading the base.

        The next checkpoint of the same training run (same keys, shapes and alphas) is
        copied into the loaded adapter; another file of the same layout goes through
        diffusers' hot-swap; anything else is unloaded and loaded. diffusers loads from
        the path, not a state dict, so `lora_alpha` in the header metadata is kept.
        Raises `LoraError` when the LoRA does not apply to this base.
        """
        lora = inspect_lora(path)
        converted, alphas = self._converted_state_dict(lora)
        expected = expected_modules(converted)
        if self._copy_into_adapter(lora, converted, alphas):
            return self._applied(lora, expected, self._adapter_injected, hotswapped=True)
        hotswap = self._can_hotswap(lora)
        if hotswap:
            try:
                self.pipe.load_lora_weights(str(lora.path), adapter_name=ADAPTER_NAME, hotswap=True)
            except (RuntimeError, ValueError) as error:
                logger.info("hot-swap of %s failed (%s); unloading and loading instead", lora.path, error)
                hotswap = False
        if not hotswap:
            self.remove_lora()
            try:
                self.pipe.load_lora_weights(str(lora.path), adapter_name=ADAPTER_NAME)
            except (RuntimeError, ValueError, KeyError) as error:
                self.remove_lora()
                raise LoraError(self._load_error_message(lora, error)) from error
        injected = self._injected_layers()
        try:
            check_applied(lora, expected, injected, arch=self.spec.name)
        except LoraError:
            self.remove_lora()
            raise
        self._adapter_weights = self._adapter_parameters()
        self._adapter_alphas = alphas
        self._adapter_injected = injected
        return self._applied(lora, expected, injected, hotswapped=hotswap)

    def _applied(
        self, lora: LoraFile, expected: dict[str, int], injected: dict[str, int], *, hotswapped: bool
    ) -> LoraReport:
        """Bookkeeping once a LoRA is in: text-encoder embeddings of the old one are stale."""
        self.lora = lora
        self._lora_generation += 1
        self._embeddings = {key: value for key, value in self._embeddings.items() if key[2] is None}
        report = LoraReport(lora=lora, expected=expected, injected=injected, hotswapped=hotswapped)
        self.on_event(
            "lora_applied",
            {"path": str(lora.path), "hotswapped": hotswapped, "layers": report.injected_total},
        )
        return report

    def _copy_into_adapter(self, lora: LoraFile, converted: dict[str, torch.Tensor], alphas: object) -> bool:
        """The next checkpoint of the same run: copy its weights into the loaded adapter.

        diffusers' own hot-swap walks the whole model (`state_dict()`, every module) on
        each swap; when the new file has exactly the loaded adapter's keys, shapes and
        alphas, copying the tensors in place gives the same weights for a fraction of the
        cost. Anything else (text-encoder weights, other alphas, offloaded weights that
        live outside the modules) returns False and takes diffusers' path.
        """
        placement_mode = self.placement.mode if self.placement is not None else "none"
        if (
            not self._can_hotswap(lora)
            or lora.has_text_encoder
            or placement_mode != "none"
            or alphas != self._adapter_alphas
            or not self._adapter_weights
        ):
            return False
        copies: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for component, parameters in self._adapter_weights.items():
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

    def remove_lora(self) -> None:
        """Unload the LoRA: the pipeline renders the base model again."""
        if ADAPTER_NAME in self._adapter_names():
            self.pipe.delete_adapters(ADAPTER_NAME)
        self.lora = None
        self._adapter_weights = {}
        self._embeddings = {key: value for key, value in self._embeddings.items() if key[2] is None}

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
        except (RuntimeError, ValueError, KeyError, AssertionError, IndexError) as error:
            self.remove_lora()  # a failed apply always leaves the base alone, never the old LoRA
            raise LoraError(
                f"{lora.path}: diffusers cannot convert this {lora.format} LoRA for "
                f"{self.spec.label}{self._arch_hint(lora)}: {_first_line(error)}"
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
            f"{self._arch_hint(lora)}: {_first_line(error)}"
        )

    # -- rendering -----------------------------------------------------------------------

    def render(
        self, requests: Sequence[SampleRequest], *, batch_size: int = 1
    ) -> Iterator[tuple[SampleRequest, Image.Image]]:
        """Render `requests`, yielding each image as soon as its batch is done.

        Requests with equal settings share a pipeline call of up to `batch_size`
        images; each image has its own CPU generator seeded from its request, so a
        batch gives the images of one-by-one renders.
        """
        self._prepare_embeddings(requests)
        for batch in plan_batches(requests, batch_size=batch_size):
            if sampler_spec(self.spec.name, batch[0].sampler).global_rng:
                # This scheduler draws its step noise from torch's global generator: one
                # image per call, the global generator seeded from the request.
                for request in batch:
                    torch.manual_seed(step_noise_seed(request.seed))
                    yield from self._render_batch([request])
            else:
                yield from self._render_batch(batch)

    def _render_batch(self, batch: Sequence[SampleRequest]) -> Iterator[tuple[SampleRequest, Image.Image]]:
        """One pipeline call for requests that share their settings."""
        self.on_event("batch_start", {"indices": [request.index for request in batch]})
        embeddings = [self.embeddings(request) for request in batch]
        first = batch[0]
        self.pipe.scheduler = make_scheduler(self.spec.name, first.sampler, self.base_scheduler_config)
        arguments = self.call_arguments(batch, stack_embeddings(embeddings))
        arguments.update(
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            generator=[torch.Generator("cpu").manual_seed(request.seed) for request in batch],
            output_type="pil",
        )
        if self.lora is not None:
            arguments[self.attention_kwargs] = {"scale": first.strength}
        images = self.pipe(**arguments).images
        yield from zip(batch, images, strict=True)

    def embeddings(self, request: SampleRequest) -> Embeddings:
        """The prompt's embeddings, encoded once and reused for every checkpoint.

        While the LoRA has no text-encoder weights the text encoders are untouched, so
        the base embeddings stay valid across swaps; with text-encoder weights the key
        includes the LoRA and its strength, and they are encoded again.
        """
        key = self._embedding_key(request)
        if key not in self._embeddings:
            lora_scale = request.strength if key[2] is not None else None
            with torch.no_grad():  # as inside `__call__`: autograd changes the attention kernels
                self._embeddings[key] = self.encode(request.prompt, request.negative_prompt, lora_scale)
        return self._embeddings[key]

    def _embedding_key(self, request: SampleRequest) -> tuple:
        lora_key = None
        if self.lora is not None and self.lora.has_text_encoder:
            lora_key = (self._lora_generation, request.strength)
        return (request.prompt, request.negative_prompt, lora_key)

    def _prepare_embeddings(self, requests: Sequence[SampleRequest]) -> None:
        """Encode what is not cached yet, then let the text encoders leave the GPU.

        With every embedding cached and a LoRA without text-encoder weights, the text
        encoders have nothing to do until the prompts change: on a card of its own with
        `offload=none` they wait in CPU RAM (Flux's T5 alone is ~9.5 GB in bf16; this is
        what lets a 24 GB card render Flux). diffusers runs such a split pipeline on the
        accelerator its backbone sits on. The offload modes move them already.
        """
        placement = self.placement
        if placement is None or placement.device.type != "cuda" or placement.mode != "none":
            return
        missing = [request for request in requests if self._embedding_key(request) not in self._embeddings]
        if missing:
            self._move_text_encoders(placement.device)
            for request in missing:
                self.embeddings(request)
        if self.lora is None or not self.lora.has_text_encoder:
            self._move_text_encoders(torch.device("cpu"))

    def _move_text_encoders(self, device: torch.device) -> None:
        for name in self.text_encoder_keys.values():
            encoder = getattr(self.pipe, name, None)
            if not isinstance(encoder, torch.nn.Module):
                continue
            if next(encoder.parameters()).device != device:
                encoder.to(device)
                logger.debug("%s moved to %s", name, device)
        if device.type == "cpu":
            free_cuda_cache()

    @abstractmethod
    def encode(self, prompt: str, negative_prompt: str, lora_scale: float | None) -> Embeddings:
        """Encode one prompt and its negative with the pipeline's own `encode_prompt`."""

    @abstractmethod
    def call_arguments(self, batch: Sequence[SampleRequest], embeddings: Embeddings) -> dict[str, Any]:
        """`__call__` arguments for one batch (sizes, steps and generators are added after)."""

    def release(self) -> None:
        """Drop the pipeline and free its memory."""
        self.remove_lora()
        self._embeddings.clear()
        self.pipe = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _first_line(error: Exception, *, limit: int = 300) -> str:
    """An exception's first line, cut short: diffusers' messages can list every key of a file."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def step_noise_seed(seed: int) -> int:
    """The global-RNG seed for schedulers that draw step noise from it (flow `euler_a`).

    Derived, not the request's seed itself: with the same seed the first step's noise
    would be the initial latents again, and the ancestral step would equal plain Euler.
    """
    digest = hashlib.sha256(f"sidecar-step-noise:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def plan_batches(requests: Sequence[SampleRequest], *, batch_size: int) -> list[list[SampleRequest]]:
    """Group requests with equal settings, in first-seen order, into batches of `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    groups: dict[tuple, list[SampleRequest]] = {}
    for request in requests:
        # With and without a negative prompt can differ in kind (Flux true CFG): never mixed.
        key = (*request.batch_key(), bool(request.negative_prompt))
        groups.setdefault(key, []).append(request)
    return [
        group[start : start + batch_size]
        for group in groups.values()
        for start in range(0, len(group), batch_size)
    ]


def stack_embeddings(embeddings: Sequence[Embeddings]) -> Embeddings:
    """One batch tensor per field; `None` fields (no negative prompt) stay `None`."""
    stacked: Embeddings = {}
    for name in embeddings[0]:
        values = [item[name] for item in embeddings]
        stacked[name] = None if any(value is None for value in values) else torch.cat(values)  # type: ignore[assignment]
    return stacked
