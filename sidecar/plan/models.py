"""The sections sidecar reads of a trainer config, as pydantic models.

Everything else in a trainer's file is accepted and ignored. Unset sizes, steps,
guidance and sampler come from the architecture's facts (`sidecar.arch`) when the
plan is built.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from sidecar.values import (
    ArchName,
    Flag,
    ImageFormat,
    Negative,
    NonNegativeInt,
    NonNegativeNumber,
    Number,
    PositiveInt,
    Quantize,
    SamplerName,
    Section,
    Text,
    show,
)

DEFAULT_SEED = 42

# Keys real trainers write inside `sample:` that sidecar does not use: accepted without a warning.
QUIET_SAMPLE_KEYS = frozenset(
    {
        "guidance_rescale",
        "adapter_conditioning_scale",
        "refiner_start_at",
        "extra_values",
        "sampling_flow_shift",
        "do_cfg_norm",
        "nag_scale",
        "nag_alpha",
        "nag_tau",
        "attention_backend",
        "ext",
        "sample_dir",
        "samples_dir",
    }
)
QUIET_PROMPT_KEYS = frozenset(
    {
        "ctrl_idx",
        "do_cfg_norm",
        "nag_scale",
        "nag_alpha",
        "nag_tau",
        "extra_values",
    }
)


class PromptItem(Section):
    """One entry of `sample.prompts`: a plain string, or a mapping with per-prompt settings."""

    prompt: Text
    neg: Negative | None = None
    width: PositiveInt | None = None
    height: PositiveInt | None = None
    seed: NonNegativeInt | None = None
    guidance_scale: NonNegativeNumber | None = None
    true_cfg_scale: NonNegativeNumber | None = None
    sample_steps: PositiveInt | None = None
    network_multiplier: Number | None = None
    sampler: SamplerName | None = None
    random_seed: Flag | None = None  # a new seed at every step (OneTrainer's meaning)
    # Carried to the request for the stages that render them (ai-toolkit's names, then sidecar's).
    ctrl_img: Text | None = None
    ctrl_img_1: Text | None = None
    ctrl_img_2: Text | None = None
    ctrl_img_3: Text | None = None
    control_images: list[Text] | None = None
    init_image: Text | None = None
    num_frames: PositiveInt | None = None
    fps: PositiveInt | None = None

    @property
    def all_control_images(self) -> tuple[str, ...]:
        """`control_images`, then ai-toolkit's `ctrl_img` / `ctrl_img_1..3`, each once, in order."""
        found = [
            *(self.control_images or ()),
            self.ctrl_img,
            self.ctrl_img_1,
            self.ctrl_img_2,
            self.ctrl_img_3,
        ]
        return tuple(dict.fromkeys(path for path in found if path))

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"prompt": data}
        if isinstance(data, dict):
            return data
        raise PydanticCustomError(
            "sidecar_value",
            "{reason}",
            {"reason": f"must be a prompt string or a mapping with a `prompt` key, got {show(data)}"},
        )


class SampleConfig(Section):
    """The `sample:` section. Unset sizes, steps, guidance and sampler come from the ArchSpec."""

    sampler: SamplerName | None = None
    sample_every: PositiveInt | None = None
    sample_steps: PositiveInt | None = None
    guidance_scale: NonNegativeNumber | None = None
    true_cfg_scale: NonNegativeNumber = 1.0  # Flux true CFG; 1.0 is off
    prompts: list[PromptItem] = Field(default_factory=list)
    samples: list[PromptItem] | None = None  # newer ai-toolkit's name for the same list
    neg: Negative = ""
    width: PositiveInt | None = None
    height: PositiveInt | None = None
    seed: NonNegativeInt = DEFAULT_SEED
    walk_seed: Flag = False
    random_seed: Flag = False  # a new seed at every step for prompts without their own seed
    network_multiplier: Number = 1.0
    format: ImageFormat = "png"
    batch_size: PositiveInt = 1
    sample_start_step: NonNegativeInt = 0  # ai-toolkit: checkpoints before this step are not sampled
    num_frames: PositiveInt | None = None  # ai-toolkit video models; carried, not rendered here
    fps: PositiveInt | None = None

    @property
    def prompts_key(self) -> str:
        """The key the prompt list was read from; ai-toolkit prefers `samples` over `prompts`."""
        return "samples" if self.samples is not None else "prompts"

    @property
    def items(self) -> list[PromptItem]:
        return self.samples if self.samples is not None else self.prompts


class ModelConfig(Section):
    """The `model:` section. A bare string (`model: org/name`) is taken as `name_or_path`."""

    name_or_path: Text
    arch: ArchName | None = None
    is_flux: Flag = False
    is_v3: Flag = False
    is_sdxl: Flag = False
    is_xl: Flag = False  # ai-toolkit's spelling of is_sdxl
    vae_path: Text | None = None
    clip_l_path: Text | None = None
    clip_g_path: Text | None = None
    t5_path: Text | None = None
    quantize: Quantize = False
    low_vram: Flag = False

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"name_or_path": data} if isinstance(data, str) else data


class NetworkConfig(Section):
    type: Text | None = None
    linear: PositiveInt | None = None
    linear_alpha: Number | None = None


class SaveConfig(Section):
    save_every: PositiveInt | None = None
    max_step_saves_to_keep: NonNegativeInt | None = None
    dtype: Text | None = None


class ProcessSection(Section):
    """What sidecar reads of one ai-toolkit process, or of a flat file's top level."""

    name: Text | None = None
    type: Text | None = None
    training_folder: Text | None = None
    trigger_word: Text | None = None
    device: Text | None = None
    low_vram: Flag = False  # EriDiffusion writes it beside `model:`
    model: ModelConfig
    network: NetworkConfig | None = None
    save: SaveConfig | None = None
    sample: SampleConfig
