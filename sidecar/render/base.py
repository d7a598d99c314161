"""The renderer interface: one base pipeline loaded once, LoRAs swapped in, samples out.

Each architecture file (`sdxl.py`, `sd3.py`, `flux.py`) subclasses `Renderer` and
fills in two things: how to encode one prompt, and how to turn a batch of requests
plus their embeddings into the keyword arguments of the diffusers pipeline's
`__call__`. Everything else (base loading, LoRA swapping and checking, sampler
choice, batching, the embedding cache) lives here once. The denoising loop is
always diffusers' own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from sidecar.arch import ArchSpec
from sidecar.errors import LoraError, ModelError
from sidecar.plan.request import SampleRequest
from sidecar.render.adapters.lora_files import LoraFile, LoraReport
from sidecar.render.adapters.swap import AdapterSlot
from sidecar.render.devices import free_cuda_cache, is_cuda_oom
from sidecar.render.loading import load_base_pipeline, load_text_encoder, load_vae
from sidecar.render.memory import Placement
from sidecar.render.model_sizes import BACKBONE, COMPONENTS, TEXT_ENCODER
from sidecar.render.schedulers import make_scheduler
from sidecar.render.single_file import require_components
from sidecar.samplers import sampler_spec

logger = logging.getLogger("sidecar.render")

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
        self.adapter = AdapterSlot(
            pipe, pipeline_class=self.pipeline_class, spec=self.spec, lifted=self._offload_lifted
        )
        self.placement: Placement | None = None  # set when placed on a device (`load_renderer`)
        self._device: tuple[tuple[str, bool], torch.device] | None = None  # (placement state, device)
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
        single file. `sidecar.render.memory.apply_memory_mode` then places it on its device.

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
        require_components(pipe, model_source)  # a denoiser-only single file: every part it lacks named
        return cls(pipe, base_model=str(model_source), on_event=on_event)

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (diffusers' `_execution_device`). Asking diffusers walks every
        module (0.1 s per image on a deep model with a LoRA), so a placed pipeline's answer is kept
        until its memory mode changes or it is parked."""
        if self.placement is None:
            return self.pipe._execution_device
        key = (self.placement.mode, self.placement.parked)
        if self._device is None or self._device[0] != key:
            self._device = (key, self.pipe._execution_device)
        return self._device[1]

    @property
    def encode_device(self) -> torch.device:
        """Where prompts are encoded: the CPU when the plan keeps the text encoders there."""
        if self.placement is not None and self.placement.encoders_on_cpu:
            return torch.device("cpu")
        return self.device

    @property
    def encoder_components(self) -> tuple[str, ...]:
        """The pipeline's text encoders (their role in `sidecar.arch`), whether or not a config can
        name a separate file for them: Qwen-Image's, Flux.2's and Z-Image's language models have no
        such key, and must leave the card all the same."""
        return tuple(name for name, role in COMPONENTS[self.spec.name].items() if role == TEXT_ENCODER)

    @property
    def backbone(self) -> torch.nn.Module:
        """The transformer or UNet: what `model.quantize` stores in 8 bits."""
        name = next(name for name, role in COMPONENTS[self.spec.name].items() if role == BACKBONE)
        return getattr(self.pipe, name)

    def _offload_lifted(self) -> contextlib.AbstractContextManager[None]:
        """Group and sequential offload's hooks off while a LyCORIS network goes on or off."""
        if self.placement is None:
            return contextlib.nullcontext()
        return self.placement.lifted(self.pipe)

    def _encoders_attached(self) -> contextlib.AbstractContextManager[None]:
        """Text encoders held on the CPU rejoin the pipeline for a LoRA change or an encode."""
        if self.placement is None:
            return contextlib.nullcontext()
        return self.placement.encoders_attached(self.pipe)

    # -- LoRA ----------------------------------------------------------------------------

    @property
    def lora(self) -> LoraFile | None:
        """The LoRA file applied now, or None for the base model alone."""
        return self.adapter.lora

    def apply_lora(self, path: str | Path) -> LoraReport:
        """Swap the loaded LoRA for the one at `path`, without reloading the base.

        See `sidecar.render.adapters.swap` for the three ways. Raises `LoraError` when the
        LoRA does not apply to this base; the base is then left without any LoRA. CUDA
        running out of memory meanwhile steps to a stronger memory mode and applies it again.
        """

        def apply() -> LoraReport:
            in_place = self.placement is None or self.placement.mode == "none"
            with self._encoders_attached():
                return self.adapter.apply(path, in_place_allowed=in_place)

        try:
            if self.placement is None:
                report = apply()
            else:
                report = self.placement.run(self.pipe, apply, phase="applying the LoRA")
        except LoraError:
            self._forget_lora_embeddings()
            raise
        self._lora_generation += 1  # text-encoder embeddings of the old LoRA are stale
        self._forget_lora_embeddings()
        self.on_event(
            "lora_applied",
            {"path": str(report.lora.path), "hotswapped": report.hotswapped, "layers": report.injected_total},
        )
        return report

    def remove_lora(self) -> None:
        """Unload the LoRA: the pipeline renders the base model again."""
        with self._encoders_attached():
            self.adapter.remove()
        self._forget_lora_embeddings()

    def _forget_lora_embeddings(self) -> None:
        self._embeddings = {key: value for key, value in self._embeddings.items() if key[2] is None}

    # -- placement -----------------------------------------------------------------------

    def park(self) -> None:
        """Hold no VRAM until `unpark` (a card shared with the trainer); a no-op on the CPU."""
        if self.placement is not None:
            self.placement.park(self.pipe)

    def unpark(self) -> None:
        if self.placement is not None:
            self.placement.unpark(self.pipe)

    # -- rendering -----------------------------------------------------------------------

    def render_resilient(
        self, requests: Sequence[SampleRequest], *, batch_size: int = 1
    ) -> Iterator[tuple[SampleRequest, Image.Image]]:
        """`render`, stepping to a stronger memory mode on CUDA out-of-memory.

        Encoding, denoising and decoding all happen in here. The stronger mode is kept for
        later checkpoints; the images not yet yielded are rendered again in it. With no
        stronger mode left it is `memory.OutOfMemoryError`, with the plan's figures.
        """
        remaining = list(requests)
        while remaining:
            try:
                for request, image in self.render(remaining, batch_size=batch_size):
                    remaining.remove(request)
                    yield request, image
            except Exception as error:
                placement = self.placement
                if not is_cuda_oom(error) or placement is None:
                    raise
                placement.step_down(phase="rendering", error=error)
                placement.run(self.pipe, lambda: None, phase="rendering", place_first=True)

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
        device = self.device
        stacked = {
            name: _to_device(value, device) for name, value in self.batch_embeddings(embeddings).items()
        }  # encoded on the CPU when the plan keeps the text encoders there
        arguments = self.call_arguments(batch, stacked)  # type: ignore[arg-type]
        arguments.update(
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            generator=[torch.Generator("cpu").manual_seed(request.seed) for request in batch],
            output_type="pil",
        )
        if self.lora is not None:
            arguments[self.attention_kwargs] = {"scale": first.strength}
            self.adapter.set_strength(first.strength)  # LyCORIS and T5 adapters take it here
        yield from zip(batch, self.outputs(batch, self.pipe(**arguments)), strict=True)

    def outputs(self, batch: Sequence[SampleRequest], output: Any) -> Sequence[Any]:
        """Each request's result in the pipeline's output: its image; a video model's frames (`wan.py`)."""
        return output.images

    def embeddings(self, request: SampleRequest) -> Embeddings:
        """The prompt's embeddings, encoded once and reused for every checkpoint.

        While the LoRA has no text-encoder weights the text encoders are untouched, so
        the base embeddings stay valid across swaps; with text-encoder weights the key
        includes the LoRA and its strength, and they are encoded again.
        """
        key = self._embedding_key(request)
        if key not in self._embeddings:
            lora_scale = request.strength if key[2] is not None else None
            # as inside `__call__`: autograd changes the attention kernels
            if lora_scale is not None:
                self.adapter.set_strength(lora_scale)
            with torch.no_grad(), self._encoders_attached():
                self._embeddings[key] = self.encode_request(request, lora_scale)
        return self._embeddings[key]

    def _embedding_key(self, request: SampleRequest) -> tuple:
        lora_key = None
        if self.lora is not None and self.lora.has_text_encoder:
            lora_key = (self._lora_generation, request.strength)
        # The reference images: the text encoder of an edit model sees them (`encode_request`).
        return (request.prompt, request.negative_prompt, lora_key, request.control_images)

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
        if placement.encoders_on_cpu:
            return  # encoded on the CPU (`encode_device`), never brought to the card
        missing = [request for request in requests if self._embedding_key(request) not in self._embeddings]
        if missing:
            self._move_text_encoders(placement.device)
            for request in missing:
                self.embeddings(request)
        if self.lora is None or not self.lora.has_text_encoder:
            self._move_text_encoders(torch.device("cpu"))

    def _move_text_encoders(self, device: torch.device) -> None:
        for name in self.encoder_components:
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

    def encode_request(self, request: SampleRequest, lora_scale: float | None) -> Embeddings:
        """Encode one request: its prompt and negative by default; an architecture whose text
        encoder also reads the reference images (Qwen-Image-Edit) overrides this."""
        return self.encode(request.prompt, request.negative_prompt, lora_scale)

    def batch_embeddings(self, embeddings: Sequence[Embeddings]) -> dict[str, Any]:
        """One batch's embeddings as `__call__` takes them: one stacked tensor per field by
        default; a pipeline taking variable-length sequences (Z-Image, Qwen-Image) overrides this."""
        return stack_embeddings(embeddings)

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


def _to_device(value: Any, device: torch.device) -> Any:
    """A tensor, a list of tensors or None, on `device`."""
    if isinstance(value, list):
        return [item.to(device) for item in value]
    return value.to(device) if value is not None else None


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
