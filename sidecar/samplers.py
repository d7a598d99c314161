"""Sampler names, as trainers write them, to diffusers schedulers, per architecture.

The names come from the trainers sidecar follows: ai-toolkit (`toolkit/sampler.py`),
kohya sd-scripts (`sample_sampler`), OneTrainer (`NoiseScheduler`), plus the A1111 /
ComfyUI spellings users copy from UIs. Each architecture has a whitelist: a name that
is not on it is a `SamplerError` naming the valid ones, never a silent fallback.

Why a whitelist per architecture: SD 3.5 and Flux are rectified-flow models. A
noise-prediction scheduler (DDIM, Euler, DPM++ ...) runs on SD 3.5 without an error
and gives wrong images, and raises on Flux; Karras sigmas on the flow DPM-Solver give
NaN. So flow models get only flow-matching schedulers, and there `euler` means
flow-match Euler (as in ComfyUI and the EriDiffusion Flux configs).

Every scheduler is built with `Class.from_config(base_config, **overrides)`, so the
model's own settings (betas, timestep spacing, steps offset, shift, dynamic shifting)
are kept and only what makes the sampler differ is overridden.

The tables below are pure data (class names as strings), shared facts like `sidecar.arch`:
the plan validates names against them, publishing writes their labels into infotext, and
`sidecar.render.schedulers` builds the diffusers scheduler. diffusers is never imported here.

Name differences between trainers, and what sidecar does:
- `k_` prefix: ai-toolkit reads it as Karras sigmas (`k_euler`, `k_lms`, `k_dpmsolver++`);
  kohya's `get_my_scheduler` (sd-scripts `library/train_util.py`) reads `k_euler`, `k_euler_a`,
  `k_lms`, `k_dpm_2`, `k_dpm_2_a` as the k-diffusion names of the plain samplers. The tables
  below keep ai-toolkit's meaning; a name read from a kohya config goes through
  `KOHYA_SAMPLERS` first (`trainer_sampler`), so each trainer's name means what its code
  makes of it. `k_euler_a` is plain Euler a for both: diffusers' Euler ancestral has no
  Karras sigmas.
- OneTrainer's `noise_scheduler` values (`modules/util/enum/NoiseScheduler.py`, built in
  `modules/util/create.py`) and SimpleTuner's `--validation_noise_scheduler`
  (`SCHEDULER_NAME_MAP` in `simpletuner/helpers/training/validation.py`) map by
  `ONETRAINER_SAMPLERS` and `SIMPLETUNER_SAMPLERS`.
- `dpmsolver++` (ai-toolkit, kohya) is DPM-Solver++ multistep of order 2, i.e. DPM++ 2M.
- `dpm++ 2m sde` is the multistep SDE variant (`sde-dpmsolver++`, OneTrainer's
  DPMPP_SDE), which needs no torchsde; the brownian-tree `DPMSolverSDEScheduler` is not used.
- kohya forces DDIM's `clip_sample=True`; sidecar keeps SDXL's `clip_sample=False`,
  since clipping gives wrong SDXL images.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sidecar.arch import arch_spec
from sidecar.errors import SamplerError

logger = logging.getLogger("sidecar.samplers")


class _FromBaseShift:
    """Marker: take this value from the base config's `shift` (FlowMatch's name for it)."""

    def __repr__(self) -> str:
        return "FROM_BASE_SHIFT"


FROM_BASE_SHIFT: Any = _FromBaseShift()
DEFAULT_FLOW_SHIFT = 1.0  # FlowMatchEulerDiscreteScheduler's default `shift`


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: how infotext names it, which diffusers class, which settings differ."""

    label: str  # A1111 infotext `Sampler:` value
    scheduler: str  # diffusers class name, resolved only in `make_scheduler`
    overrides: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # other spellings trainers and UIs use
    requires: tuple[str, ...] = ()  # importable modules the scheduler needs besides diffusers
    schedule_type: str | None = None  # A1111 infotext `Schedule type:` (e.g. "Karras")
    # (key, required value, value when the key is absent): what the base config must hold
    # for the pipeline's calls to work with this scheduler.
    base_requirements: tuple[tuple[str, Any, Any], ...] = ()
    # True when `step()` draws noise from torch's global RNG because the pipeline passes it
    # no generator (flow models' stochastic Euler): seed that RNG per image to reproduce it.
    global_rng: bool = False


# Settings shared by several entries.
KARRAS = {"use_karras_sigmas": True}
NO_KARRAS = {"use_karras_sigmas": False}  # explicit, in case the base config turned it on
DDIM_SETTINGS = {"clip_sample": False, "set_alpha_to_one": False}  # DDIM's own defaults ruin SDXL
DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
# `dpmsolver` (not ++) refuses diffusers' default `final_sigmas_type="zero"`.
DPMSOLVER = {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"}
# Flow-matching DPM-Solver / UniPC. The flow pipelines pass `mu` when the base config has
# `use_dynamic_shifting` (Flux dev), which sets `flow_shift = exp(mu)`; otherwise (SD 3.5,
# Flux schnell) `flow_shift` must be the model's `shift`. Never Karras here: it gives NaN.
FLOW_SOLVER = {
    "use_flow_sigmas": True,
    "prediction_type": "flow_prediction",
    "flow_shift": FROM_BASE_SHIFT,
    "use_karras_sigmas": False,
}

# ---------------------------------------------------------------------------------
# Stable Diffusion XL: noise-prediction (epsilon) schedulers
# ---------------------------------------------------------------------------------
SDXL_SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec("DDIM", "DDIMScheduler", DDIM_SETTINGS),
    "ddpm": SamplerSpec("DDPM", "DDPMScheduler", {"clip_sample": False}),
    "pndm": SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, aliases=("plms",)),
    "lms": SamplerSpec("LMS", "LMSDiscreteScheduler", NO_KARRAS, requires=("scipy",)),
    "lms_karras": SamplerSpec(
        "LMS", "LMSDiscreteScheduler", KARRAS, aliases=("k_lms",), requires=("scipy",), schedule_type="Karras"
    ),
    "euler": SamplerSpec("Euler", "EulerDiscreteScheduler", NO_KARRAS),
    "euler_karras": SamplerSpec(
        "Euler", "EulerDiscreteScheduler", KARRAS, aliases=("k_euler",), schedule_type="Karras"
    ),
    "euler_a": SamplerSpec(
        "Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "euler_ancestral")
    ),
    "heun": SamplerSpec("Heun", "HeunDiscreteScheduler", NO_KARRAS),
    "dpm_2": SamplerSpec("DPM2", "KDPM2DiscreteScheduler", NO_KARRAS),
    "dpm_2_karras": SamplerSpec(
        "DPM2", "KDPM2DiscreteScheduler", KARRAS, aliases=("k_dpm_2",), schedule_type="Karras"
    ),
    "dpm_2_a": SamplerSpec(
        "DPM2 a", "KDPM2AncestralDiscreteScheduler", NO_KARRAS, aliases=("dpm_2_ancestral",)
    ),
    "dpm_2_a_karras": SamplerSpec(
        "DPM2 a", "KDPM2AncestralDiscreteScheduler", KARRAS, aliases=("k_dpm_2_a",), schedule_type="Karras"
    ),
    "dpmsolver": SamplerSpec("DPM-Solver 2M", "DPMSolverMultistepScheduler", {**DPMSOLVER, **NO_KARRAS}),
    "dpmsolver_karras": SamplerSpec(
        "DPM-Solver 2M",
        "DPMSolverMultistepScheduler",
        {**DPMSOLVER, **KARRAS},
        aliases=("k_dpmsolver",),
        schedule_type="Karras",
    ),
    "dpmsingle": SamplerSpec(
        "DPM++ 2S", "DPMSolverSinglestepScheduler", {**DPMPP_2M, **NO_KARRAS}, aliases=("dpmpp_2s",)
    ),
    "dpmpp_2m": SamplerSpec(
        "DPM++ 2M", "DPMSolverMultistepScheduler", {**DPMPP_2M, **NO_KARRAS}, aliases=("dpmsolver++",)
    ),
    "dpmpp_2m_karras": SamplerSpec(
        "DPM++ 2M",
        "DPMSolverMultistepScheduler",
        {**DPMPP_2M, **KARRAS},
        aliases=("k_dpmsolver++", "dpmsolver++_karras"),
        schedule_type="Karras",
    ),
    "dpmpp_2m_sde": SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {**DPMPP_2M_SDE, **NO_KARRAS}),
    "dpmpp_2m_sde_karras": SamplerSpec(
        "DPM++ 2M SDE", "DPMSolverMultistepScheduler", {**DPMPP_2M_SDE, **KARRAS}, schedule_type="Karras"
    ),
    "unipc": SamplerSpec("UniPC", "UniPCMultistepScheduler", NO_KARRAS),
    "unipc_karras": SamplerSpec("UniPC", "UniPCMultistepScheduler", KARRAS, schedule_type="Karras"),
}

# ---------------------------------------------------------------------------------
# Flow-matching models (SD 3.5, Flux): flow schedulers only
# ---------------------------------------------------------------------------------
FLOW_SAMPLERS: dict[str, SamplerSpec] = {
    # The model's own scheduler, as shipped.
    "flowmatch": SamplerSpec(
        "Euler",
        "FlowMatchEulerDiscreteScheduler",
        {"stochastic_sampling": False},
        aliases=("euler", "flowmatch_euler", "flow_match", "flow_match_euler"),
    ),
    # Re-noises to the next sigma each step. FluxPipeline / StableDiffusion3Pipeline call
    # `step()` without their generator, so this draws from torch's global RNG.
    "euler_a": SamplerSpec(
        "Euler a",
        "FlowMatchEulerDiscreteScheduler",
        {"stochastic_sampling": True},
        aliases=("euler_ancestral",),
        global_rng=True,
    ),
    "dpmpp_2m": SamplerSpec(
        "DPM++ 2M", "DPMSolverMultistepScheduler", {**DPMPP_2M, **FLOW_SOLVER}, aliases=("dpmsolver++",)
    ),
    "unipc": SamplerSpec("UniPC", "UniPCMultistepScheduler", FLOW_SOLVER),
}

SD3_SAMPLERS: dict[str, SamplerSpec] = FLOW_SAMPLERS
# FluxPipeline always passes `mu`; DPMSolverMultistepScheduler accepts it only with
# exponential dynamic shifting (Flux dev's config), and asserts otherwise (Flux schnell).
FLUX_SAMPLERS: dict[str, SamplerSpec] = {
    **FLOW_SAMPLERS,
    "dpmpp_2m": replace(
        FLOW_SAMPLERS["dpmpp_2m"],
        base_requirements=(
            ("use_dynamic_shifting", True, False),
            ("time_shift_type", "exponential", "exponential"),
        ),
    ),
}

# The newer flow models' pipelines all pass `mu` (Flux's resolution-dependent shift), and most
# pass their own `sigmas` too, which flow DPM-Solver's `set_timesteps` does not take: FluxPipeline
# and the Flux.2 pipelines drop them for a scheduler with `use_flow_sigmas`, Chroma's, Kontext's and
# Qwen-Image's do not. Z-Image's sigmas are a list flow UniPC cannot scale. Each table offers
# what renders (tests/render/test_arch_samplers.py).
FLOW_WITHOUT_DPM: dict[str, SamplerSpec] = {
    name: spec for name, spec in FLUX_SAMPLERS.items() if name != "dpmpp_2m"
}
EULER_ONLY: dict[str, SamplerSpec] = {name: FLOW_SAMPLERS[name] for name in ("flowmatch", "euler_a")}
SAMPLERS_BY_ARCH: dict[str, dict[str, SamplerSpec]] = {
    "sdxl": SDXL_SAMPLERS,
    "sd3": SD3_SAMPLERS,
    "flux": FLUX_SAMPLERS,
    "sd15": SDXL_SAMPLERS,
    # Wan passes no `mu` (a fixed flow shift): SD 3.5's table. Its published scheduler is flow
    # UniPC (`unipc`); ai-toolkit samples with flow Euler (`flowmatch`), sidecar's default.
    "wan": SD3_SAMPLERS,
    "flux2": FLUX_SAMPLERS,
    "flux2_klein": FLUX_SAMPLERS,
    **{
        arch: FLOW_WITHOUT_DPM
        for arch in ("chroma", "flux_kontext", "qwen_image", "qwen_image_edit", "qwen_image_edit_plus")
    },
    "zimage": EULER_ONLY,
}

# Keys FluxPipeline / StableDiffusion3Pipeline read from `scheduler.config` to compute `mu`
# (with their own defaults when absent). Flow DPM-Solver / UniPC do not take them, so
# `make_scheduler` carries them over from the base config: a model whose values differ
# from the pipeline defaults keeps its resolution-dependent shift.
PIPELINE_READS_FROM_CONFIG = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")

NAME_RULES = "names are case-insensitive; spaces, '_' and '-' are ignored; '++' may be written 'pp'"

# ---------------------------------------------------------------------------------
# Trainers' own names -> the canonical names above
# ---------------------------------------------------------------------------------
# kohya sd-scripts `--sample_sampler` choices and `--ss` (library/train_util.py,
# `get_my_scheduler`): the `k_` names are the same schedulers, without Karras sigmas.
# musubi-tuner has no sampler option. kohya's Flux and SD3 sampling ignores the name
# (always flow-matching Euler): the kohya reader maps those to `flowmatch` itself.
KOHYA_SAMPLERS: dict[str, str] = {
    "ddim": "ddim",
    "ddpm": "ddpm",
    "pndm": "pndm",
    "lms": "lms",
    "k_lms": "lms",
    "euler": "euler",
    "k_euler": "euler",
    "euler_a": "euler_a",
    "k_euler_a": "euler_a",
    "dpmsolver": "dpmsolver",
    "dpmsolver++": "dpmpp_2m",  # DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"), order 2
    "dpmsingle": "dpmsingle",
    "heun": "heun",
    "dpm_2": "dpm_2",
    "k_dpm_2": "dpm_2",
    "dpm_2_a": "dpm_2_a",
    "k_dpm_2_a": "dpm_2_a",
}
KOHYA_FALLBACK_SAMPLER = "ddim"  # what `get_my_scheduler` builds for a name it does not know

# OneTrainer `NoiseScheduler` (modules/util/enum/NoiseScheduler.py), as `create_noise_scheduler`
# builds them (modules/util/create.py): DPMPP is DPM-Solver++ multistep of order 2.
ONETRAINER_SAMPLERS: dict[str, str] = {
    "DDIM": "ddim",
    "EULER": "euler",
    "EULER_A": "euler_a",
    "DPMPP": "dpmpp_2m",
    "DPMPP_SDE": "dpmpp_2m_sde",
    "UNIPC": "unipc",
    "EULER_KARRAS": "euler_karras",
    "DPMPP_KARRAS": "dpmpp_2m_karras",
    "DPMPP_SDE_KARRAS": "dpmpp_2m_sde_karras",
    "UNIPC_KARRAS": "unipc_karras",
}

# SimpleTuner `--validation_noise_scheduler` (`SCHEDULER_NAME_MAP` and `_configure_scheduler`
# in simpletuner/helpers/training/validation.py): on flow-matching models `euler` becomes
# flow-matching Euler and `unipc` flow UniPC, which are sidecar's `flowmatch` and `unipc` there.
SIMPLETUNER_SAMPLERS: dict[str, str] = {
    "ddim": "ddim",
    "ddpm": "ddpm",
    "euler": "euler",
    "euler-a": "euler_a",
    "unipc": "unipc",
    "dpm++": "dpmpp_2m",
    "flow_matching": "flowmatch",
    "flow_match_euler": "flowmatch",
    "flow_unipc": "unipc",
}

TRAINER_SAMPLERS: dict[str, dict[str, str]] = {
    "kohya": KOHYA_SAMPLERS,
    "onetrainer": ONETRAINER_SAMPLERS,
    "simpletuner": SIMPLETUNER_SAMPLERS,
}


def trainer_sampler(trainer: str, name: str) -> str:
    """The canonical name of a trainer's own sampler name (case-insensitive), before the
    architecture check of `validate_sampler`; raises `SamplerError` listing that trainer's names."""
    table = TRAINER_SAMPLERS[trainer]
    by_key = {key.lower(): canonical for key, canonical in table.items()}
    if isinstance(name, str) and name.strip().lower() in by_key:
        return by_key[name.strip().lower()]
    raise SamplerError(
        f"`sampler` {name!r} is not a {trainer} sampler name; {trainer} names: {', '.join(table)}"
    )


def normalize_sampler_name(name: str) -> str:
    """The lookup key of a sampler name: `DPM++ 2M Karras` == `dpmpp_2m_karras` == `dpm++-2m-karras`."""
    key = name.strip().lower().replace("++", "pp")
    return re.sub(r"[\s_\-]+", "", key)


def _build_index(table: Mapping[str, SamplerSpec]) -> dict[str, str]:
    """Lookup key -> canonical name, for the canonical names, their aliases and infotext labels."""
    index: dict[str, str] = {}
    for canonical, spec in table.items():
        label = f"{spec.label} {spec.schedule_type}" if spec.schedule_type else spec.label
        for name in (canonical, *spec.aliases, label):
            key = normalize_sampler_name(name)
            if index.setdefault(key, canonical) != canonical:
                raise RuntimeError(f"sampler name {name!r} maps to both {index[key]!r} and {canonical!r}")
    return index


_INDEX_BY_ARCH: dict[str, dict[str, str]] = {arch: _build_index(t) for arch, t in SAMPLERS_BY_ARCH.items()}


def _missing_modules(spec: SamplerSpec) -> list[str]:
    return [module for module in spec.requires if importlib.util.find_spec(module) is None]


def sampler_spec(arch: str, name: str) -> SamplerSpec:
    """The table entry of a valid sampler name (labels for infotext); raises like `validate_sampler`."""
    spec = arch_spec(arch)
    return SAMPLERS_BY_ARCH[spec.name][validate_sampler(spec.name, name)]


def sampler_names(arch: str) -> list[str]:
    """Canonical sampler names usable on `arch` with the installed packages, sorted."""
    table = SAMPLERS_BY_ARCH[arch_spec(arch).name]
    return sorted(name for name, spec in table.items() if not _missing_modules(spec))


def validate_sampler(arch: str, name: str) -> str:
    """The canonical name of `name` on `arch`, or a `SamplerError` that lists the valid names."""
    spec = arch_spec(arch)
    if not isinstance(name, str) or not name.strip():
        raise SamplerError(f"`sampler` must be a non-empty string, got {name!r}")
    valid = ", ".join(sampler_names(spec.name))
    key = normalize_sampler_name(name)
    canonical = _INDEX_BY_ARCH[spec.name].get(key)
    if canonical is not None:
        missing = _missing_modules(SAMPLERS_BY_ARCH[spec.name][canonical])
        if missing:
            raise SamplerError(
                f"`sampler` {name!r} needs {', '.join(missing)}, which is not installed "
                f"(`pip install {' '.join(missing)}`); valid samplers for {spec.name}: {valid}"
            )
        return canonical
    raise SamplerError(
        f"`sampler` {name!r} {_why_invalid(spec.name, key)}. Valid samplers for "
        f"{spec.name} ({spec.label}): {valid} ({NAME_RULES})"
    )


def _why_invalid(arch: str, key: str) -> str:
    """Why a name is not on `arch`'s whitelist: known elsewhere (and why not here) or unknown."""
    is_flow = arch_spec(arch).is_flow_model
    offered_on = [
        other for other, index in _INDEX_BY_ARCH.items() if key in index and arch_spec(other).is_flow_model
    ]
    if is_flow and offered_on:  # a flow sampler this model's pipeline cannot drive
        return (
            f"is not offered for {arch}: its pipeline hands the scheduler settings this sampler does "
            f"not take (it works on {', '.join(offered_on)})"
        )
    for other, index in _INDEX_BY_ARCH.items():
        if other == arch or key not in index:
            continue
        other_spec = SAMPLERS_BY_ARCH[other][index[key]]
        if index[key] in SAMPLERS_BY_ARCH[arch]:  # e.g. kohya's `k_euler_a` on a flow model
            return f"is a {other} spelling not accepted for {arch}; did you mean {index[key]!r}?"
        if is_flow and other_spec.overrides.get("use_karras_sigmas"):
            return (
                f"is not valid for {arch}: Karras sigmas are not offered on flow-matching models "
                "(flow DPM-Solver gives NaN with them); use the name without Karras where one exists"
            )
        if is_flow:
            return (
                f"is not valid for {arch}: it is a noise-prediction sampler with no flow-matching "
                "counterpart, and on flow models such samplers give wrong images or fail"
            )
        return f"is not valid for {arch}: it is a flow-matching sampler and {arch} predicts noise"
    return "is not a known sampler name"
