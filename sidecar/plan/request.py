"""The plan's output, shared with every later stage: what to render, and from which base model.

These are plain frozen dataclasses with no behaviour beyond (de)serialisation, so the
job store, the renderers and the publishers can import them without pulling in the
config readers. The job store keeps each checkpoint's requests as JSON (`to_dict`);
`from_dict` reads rows written by older versions, whose requests lack fields added
since, by giving those fields their defaults.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sidecar.arch import Arch

SEED_RANGE = 2**31  # seeds drawn per step stay in the range every trainer and UI accepts
CadenceUnit = Literal["step", "epoch", "second"]


def seed_for_step(seed: int, step: int | None, index: int) -> int:
    """A new seed for each checkpoint step, as trainers draw one per sampling run (OneTrainer's
    `random_seed`, kohya without `--d`, SimpleTuner's `validation_randomize`).

    Drawn from `seed`, the step and the prompt's index rather than the clock, so rendering
    the same step again (a resumed or forced render) gives the same image.
    """
    return random.Random(f"{seed}:{step}:{index}").randrange(SEED_RANGE)


@dataclass(frozen=True)
class SampleRequest:
    """One image to render, every setting resolved; nothing is left to a default."""

    index: int  # position in the sample list; names the files sample_{index:02d}.*
    prompt: str  # final text: trigger word and wildcards resolved, inline flags removed
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float  # CFG on SDXL / SD 3.5; embedded (distilled) guidance on Flux
    true_cfg_scale: float  # Flux only: > 1 with a negative prompt runs true CFG; 1.0 is off
    sampler: str  # a canonical name from sidecar.samplers, e.g. "euler_a", "flowmatch"
    seed: int
    strength: float  # LoRA multiplier (`network_multiplier`, `--m`); 0 renders the base
    # The trainer draws a new seed at every sampling run: `seed` is only the base of the
    # per-step seed `for_step` puts in (see `seed_for_step`).
    seed_per_step: bool = False
    # Carried for the stages that will render them; text-to-image renderers ignore them.
    control_images: tuple[str, ...] = ()  # ai-toolkit `ctrl_img*`, musubi `--ci`
    init_image: str | None = None  # musubi `--i` (image-to-video start frame)
    num_frames: int = 1  # ai-toolkit `num_frames`, musubi `--f`; 1 is a still image
    fps: int | None = None  # ai-toolkit `fps`

    def batch_key(self) -> tuple:
        """Requests with equal keys can render in one pipeline call."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.true_cfg_scale,
            self.sampler,
            self.strength,
            self.control_images,
            self.init_image,
            self.num_frames,
            self.fps,
        )

    def for_step(self, step: int | None) -> SampleRequest:
        """The request as rendered at `step`: a per-step seed made concrete, else itself."""
        if not self.seed_per_step:
            return self
        return dataclasses.replace(self, seed=seed_for_step(self.seed, step, self.index), seed_per_step=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SampleRequest:
        """A request stored by this or an older version; a field it lacks takes its default.

        A stored field this version does not know means the row was written by a newer
        sidecar: that is refused by the store's schema version before rows are read.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"stored sample request has unknown fields {unknown}")
        missing = [
            name
            for name, f in known.items()
            if name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ]
        if missing:
            raise ValueError(f"stored sample request lacks required fields {missing}")
        values = dict(data)
        if isinstance(values.get("control_images"), list):  # JSON has no tuples
            values["control_images"] = tuple(values["control_images"])
        return cls(**values)


@dataclass(frozen=True)
class SamplePlan:
    """Everything to render for one checkpoint; stored with each checkpoint the store adds."""

    requests: tuple[SampleRequest, ...]
    image_format: str = "png"  # "png" | "jpg" | "webp"
    batch_size: int = 1
    sample_every: int | None = None  # render steps that are a multiple of it (plus first and final)
    cadence: Cadence | None = None  # the trainer's cadence in epochs or time, and where it starts

    def output_options(self) -> dict[str, Any]:
        """What publishing needs besides the requests, as stored with each checkpoint."""
        return {"image_format": self.image_format, "batch_size": self.batch_size}

    @property
    def largest_pixels(self) -> int:
        """Width x height of the largest sample: what the memory plan sizes activations for."""
        return max((request.width * request.height for request in self.requests), default=1024 * 1024)

    def requests_for_step(self, step: int | None) -> tuple[SampleRequest, ...]:
        """The requests to store with the checkpoint of `step`: per-step seeds made concrete."""
        return tuple(request.for_step(step) for request in self.requests)


@dataclass(frozen=True)
class Cadence:
    """Which checkpoints the trainer would have sampled, where `sample_every` (steps) cannot say.

    Trainers sample every N steps (`SamplePlan.sample_every`, applied by the job store), every
    N epochs (kohya `sample_every_n_epochs`, OneTrainer `EPOCH`, SimpleTuner
    `validation_epoch_interval`) or every N seconds of wall time (OneTrainer `SECOND`,
    `MINUTE`, `HOUR`), from a first step or epoch on (ai-toolkit `sample_start_step`,
    SimpleTuner `validate_after_step`, OneTrainer `sample_skip_first`). The first checkpoint
    seen and the final one always render, as under `sample_every`.
    """

    every: float | None = None  # in `unit`s; None: every checkpoint
    unit: CadenceUnit = "step"
    start_step: int = 0  # checkpoints before this step are not sampled
    start_epoch: int = 0

    def skip_reason(
        self,
        *,
        step: int | None,
        epoch: int | None,
        is_final: bool,
        seconds_since_last: float | None,
    ) -> str | None:
        """Why a checkpoint is not rendered, or None when it is.

        `seconds_since_last` is the time since the last checkpoint this cadence let through
        (None: none yet, so this one is the first past the start). A step or epoch the file
        does not tell never skips: sidecar renders what it cannot place.
        """
        if is_final:
            return None
        if step is not None and step < self.start_step:
            return f"sampling starts at step {self.start_step}; this is step {step}"
        if epoch is not None and epoch < self.start_epoch:
            return f"sampling starts at epoch {self.start_epoch}; this is epoch {epoch}"
        if seconds_since_last is None or self.every is None or self.every <= 0:
            return None  # the first checkpoint past the start always renders, as under `sample_every`
        if self.unit == "epoch" and epoch is not None and epoch % int(self.every) != 0:
            return f"sample every {int(self.every)} epochs: epoch {epoch} is not a multiple"
        if self.unit == "second" and seconds_since_last < self.every:
            return f"sample every {self.every:g} s: {seconds_since_last:.0f} s since the last one sampled"
        return None

    def describe(self) -> str:
        """`every 2 epochs from step 500`, for `sidecar check`."""
        parts = []
        if self.every:
            unit = {"step": "steps", "epoch": "epochs", "second": "s"}[self.unit]
            parts.append(f"every {self.every:g} {unit}" if unit != "s" else f"every {self.every:g} s")
        if self.start_step:
            parts.append(f"from step {self.start_step}")
        if self.start_epoch:
            parts.append(f"from epoch {self.start_epoch}")
        return " ".join(parts) or "every checkpoint"


@dataclass(frozen=True)
class ModelSource:
    """The base model a trainer config names, as the renderer loads it.

    `name_or_path` is a diffusers folder, a single `.safetensors` file or a cached hub id;
    the separate files replace the base's own components.
    """

    arch: Arch
    name_or_path: str
    vae_path: str | None = None
    text_encoder_paths: Mapping[str, str | None] = field(default_factory=dict)  # clip_l_path, ...
    quantize: bool | str = False
    low_vram: bool = False

    @property
    def label(self) -> str:
        return Path(self.name_or_path).name or self.name_or_path
