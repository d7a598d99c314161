"""The plan's output, shared with every later stage: what to render, and from which base model.

These are plain frozen dataclasses with no behaviour beyond (de)serialisation, so the
job store, the renderers and the publishers can import them without pulling in the
config readers. The job store keeps each checkpoint's requests as JSON (`to_dict`);
`from_dict` reads rows written by older versions, whose requests lack fields added
since, by giving those fields their defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.arch import Arch


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
        )

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
        return cls(**dict(data))


@dataclass(frozen=True)
class SamplePlan:
    """Everything to render for one checkpoint; stored with each checkpoint the store adds."""

    requests: tuple[SampleRequest, ...]
    image_format: str = "png"  # "png" | "jpg" | "webp"
    batch_size: int = 1
    sample_every: int | None = None  # render steps that are a multiple of it (plus first and final)

    def output_options(self) -> dict[str, Any]:
        """What publishing needs besides the requests, as stored with each checkpoint."""
        return {"image_format": self.image_format, "batch_size": self.batch_size}


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
