"""The sample plan: a trainer's `sample:` section turned into concrete sample requests.

CONTRACT (shared with the renderers, the job store and output; keep the fields):
`SampleRequest` is one fully resolved image. Everything else in this module is
being written by the config/prompts work.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    sampler: str  # a name from pipelines/schedulers.py, e.g. "euler_a", "flowmatch"
    seed: int
    strength: float  # LoRA multiplier (`network_multiplier`, `--m`); 0 renders the base

    def batch_key(self) -> tuple:
        """Requests with equal keys can render in one pipeline call."""
        return (self.width, self.height, self.steps, self.guidance_scale, self.true_cfg_scale,
                self.sampler, self.strength)
