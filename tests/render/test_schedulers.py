"""`make_scheduler`: each sampler, built from the model's own scheduler config, steps as pipelines call it.

The base configs are those of the tiny models (`sidecar.testing.tiny`), passed the way the
renderer passes them: `dict(pipe.scheduler.config)` of the scheduler the model shipped with.
Name validation alone is in test_samplers.py.
"""

from __future__ import annotations

import importlib.util
import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from sidecar.arch import ARCH_SPECS
from sidecar.errors import SamplerError
from sidecar.render.schedulers import make_scheduler
from sidecar.samplers import SAMPLERS_BY_ARCH, sampler_names
from sidecar.testing.tiny import FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG, SDXL_SCHEDULER_CONFIG

# diffusers 0.42 schedulers mix numpy and tensors in ways numpy 2 flags on every step.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

# The schedulers the tiny models ship with, as `sidecar.testing.tiny` builds them.
SHIPPED = {
    "sdxl": EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
    "sd3": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
    "flux": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
}
BASE_CONFIGS = {arch: dict(scheduler.config) for arch, scheduler in SHIPPED.items()}
# Flux schnell: a fixed shift instead of resolution-dependent (dynamic) shifting.
FLUX_SCHNELL_CONFIG = {**FLUX_SCHEDULER_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}
# The architectures whose shipped scheduler configs are here; the newer ones' samplers render end
# to end on their tiny models (`test_arch_samplers.py`).
FLOW_ARCHS = [arch for arch in SHIPPED if ARCH_SPECS[arch].is_flow_model]
STEPS = 8
KARRAS_RHO = 7.0  # Karras et al. (2022): sigma^(1/rho) is evenly spaced


def _needs(arch: str, name: str) -> list[pytest.MarkDecorator]:
    """A skip mark where the sampler needs a module that is not installed (scipy for LMS)."""
    missing = [m for m in SAMPLERS_BY_ARCH[arch][name].requires if importlib.util.find_spec(m) is None]
    return [pytest.mark.skip(reason=f"{name} needs {', '.join(missing)}")] if missing else []


def _every_sampler(archs=tuple(SHIPPED)):
    return [
        pytest.param(
            arch,
            name,
            id=f"{arch}-{name}",
            marks=_needs(arch, name),
        )
        for arch in archs
        for name in SAMPLERS_BY_ARCH[arch]
    ]


def _karras_pairs():
    """(Karras variant, the same sampler without Karras) on SDXL."""
    table = SAMPLERS_BY_ARCH["sdxl"]
    return [
        pytest.param(
            name,
            name.removesuffix("_karras"),
            id=name,
            marks=_needs("sdxl", name),
        )
        for name, spec in table.items()
        if spec.schedule_type == "Karras"
    ]


# ---------------------------------------------------------------------------------
# The pipelines' calls
# ---------------------------------------------------------------------------------


def _flux_timesteps(scheduler):
    """FluxPipeline.__call__ step 5, with a 1024x1024 image (64x64 packed latents -> 4096 tokens)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sigmas = np.linspace(1.0, 1 / STEPS, STEPS)
    if hasattr(scheduler.config, "use_flow_sigmas") and scheduler.config.use_flow_sigmas:
        sigmas = None
    mu = calculate_shift(
        4096,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, STEPS, "cpu", sigmas=sigmas, mu=mu)
    return timesteps


def _sd3_timesteps(scheduler):
    """StableDiffusion3Pipeline.__call__ step 5 (no `sigmas` given by the caller)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        calculate_shift,
        retrieve_timesteps,
    )

    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", None):
        kwargs["mu"] = calculate_shift(
            4096,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.16),
        )
    timesteps, _ = retrieve_timesteps(scheduler, STEPS, "cpu", sigmas=None, **kwargs)
    return timesteps


def _sdxl_timesteps(scheduler):
    """StableDiffusionXLPipeline.__call__ step 4."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

    timesteps, _ = retrieve_timesteps(scheduler, STEPS, "cpu")
    return timesteps


TIMESTEPS_OF = {"sdxl": _sdxl_timesteps, "sd3": _sd3_timesteps, "flux": _flux_timesteps}


def _denoise(arch: str, scheduler, *, global_seed: int = 0) -> torch.Tensor:
    """The denoising loop's scheduler calls, as `arch`'s pipeline makes them, on random tensors.

    The SDXL pipeline scales the model input and passes its generator to `step()` where
    the scheduler takes one; the flow pipelines pass no generator. Returns the final latents.
    """
    timesteps = TIMESTEPS_OF[arch](scheduler)
    assert len(timesteps) >= STEPS
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(global_seed)
    channels = 4 if arch == "sdxl" else 16
    latents = torch.randn(1, channels, 8, 8, generator=generator) * getattr(
        scheduler, "init_noise_sigma", 1.0
    )
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generator} if arch == "sdxl" and takes_generator else {}
    for t in timesteps:
        if arch == "sdxl":
            model_input = scheduler.scale_model_input(latents, t)
            assert torch.isfinite(model_input).all()
        noise_pred = torch.randn(latents.shape, generator=generator) * (0.1 if arch == "sdxl" else 1.0)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False, **kwargs)[0]
    return latents


# ---------------------------------------------------------------------------------
# Every sampler
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "name"), _every_sampler())
def test_every_sampler_steps_to_finite_latents_as_its_pipeline_calls_it(arch, name):
    scheduler = make_scheduler(arch, name, BASE_CONFIGS[arch])
    assert torch.isfinite(_denoise(arch, scheduler)).all()
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        assert torch.isfinite(sigmas).all()


@pytest.mark.parametrize(("arch", "name"), _every_sampler(FLOW_ARCHS))
def test_flow_samplers_run_a_flow_schedule(arch, name):
    """Flow sigmas go from at most 1 down to 0, strictly: no noise-prediction or Karras schedule."""
    scheduler = make_scheduler(arch, name, BASE_CONFIGS[arch])
    assert len(TIMESTEPS_OF[arch](scheduler)) == STEPS
    sigmas = scheduler.sigmas
    assert float(sigmas[0]) <= 1.0 and float(sigmas[-1]) == 0.0
    assert torch.all(sigmas[:-1] > sigmas[1:])


@pytest.mark.parametrize(("arch", "name"), _every_sampler(["sdxl"]))
def test_sdxl_samplers_keep_the_models_betas_and_spacing(arch, name):
    scheduler = make_scheduler(arch, name, BASE_CONFIGS[arch])
    base = BASE_CONFIGS[arch]
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        if key in scheduler.config:
            assert scheduler.config[key] == base[key], key
    assert torch.allclose(scheduler.alphas_cumprod, SHIPPED[arch].alphas_cumprod)
    if "timestep_spacing" in scheduler.config:
        assert scheduler.config.timestep_spacing == base["timestep_spacing"]
        assert scheduler.config.steps_offset == base["steps_offset"]


@pytest.mark.parametrize(("arch", "name"), _every_sampler(FLOW_ARCHS))
def test_flow_samplers_keep_the_models_shift(arch, name):
    """Every flow sampler starts from the shifted sigma the model's own scheduler uses."""
    reference = FlowMatchEulerDiscreteScheduler.from_config(BASE_CONFIGS[arch])
    TIMESTEPS_OF[arch](reference)
    scheduler = make_scheduler(arch, name, BASE_CONFIGS[arch])
    TIMESTEPS_OF[arch](scheduler)
    # same shift: the first sigma after 1.0 agrees to a step's rounding (unshifted it is 0.875)
    assert abs(float(scheduler.sigmas[1]) - float(reference.sigmas[1])) < 0.02
    shift = scheduler.config.get("flow_shift", scheduler.config.get("shift"))
    assert shift == BASE_CONFIGS[arch]["shift"]


@pytest.mark.parametrize(("arch", "name"), _every_sampler())
def test_every_overridden_setting_reaches_the_scheduler(arch, name):
    """No setting a sampler differs by is dropped on the way (a scheduler ignores unknown keys)."""
    scheduler = make_scheduler(arch, name, BASE_CONFIGS[arch])
    for key, value in SAMPLERS_BY_ARCH[arch][name].overrides.items():
        expected = BASE_CONFIGS[arch]["shift"] if key == "flow_shift" else value
        assert scheduler.config[key] == expected, key


@pytest.mark.parametrize(("arch", "name"), _every_sampler())
def test_only_samplers_marked_global_rng_draw_from_the_global_rng(arch, name):
    """`global_rng` tells the renderer to seed torch's RNG per image; it must match what `step()` does."""
    first = _denoise(arch, make_scheduler(arch, name, BASE_CONFIGS[arch]), global_seed=1)
    second = _denoise(arch, make_scheduler(arch, name, BASE_CONFIGS[arch]), global_seed=2)
    assert torch.equal(first, second) is not SAMPLERS_BY_ARCH[arch][name].global_rng


# ---------------------------------------------------------------------------------
# Names, Karras, shift
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(SHIPPED))
def test_aliases_and_labels_build_the_same_scheduler_as_the_canonical_name(arch):
    for canonical in sampler_names(arch):
        spec = SAMPLERS_BY_ARCH[arch][canonical]
        expected = make_scheduler(arch, canonical, BASE_CONFIGS[arch])
        label = f"{spec.label} {spec.schedule_type}" if spec.schedule_type else spec.label
        for written in (*spec.aliases, label, canonical.upper().replace("_", " ")):
            built = make_scheduler(arch, written, BASE_CONFIGS[arch])
            assert type(built) is type(expected), written
            assert dict(built.config) == dict(expected.config), written


def _distinct_positive(sigmas: torch.Tensor) -> torch.Tensor:
    """The schedule's noise levels, without the final 0 and KDPM2's repeated entries."""
    sigmas = torch.unique_consecutive(sigmas.double())
    return sigmas[sigmas > 0]


def _is_karras_spaced(sigmas: torch.Tensor) -> bool:
    roots = _distinct_positive(sigmas) ** (1 / KARRAS_RHO)
    steps = roots[1:] - roots[:-1]
    return bool(torch.allclose(steps, steps[0], rtol=1e-3))


@pytest.mark.parametrize(("karras", "plain"), _karras_pairs())
def test_karras_variants_really_change_the_sigmas(karras, plain):
    with_karras = make_scheduler("sdxl", karras, BASE_CONFIGS["sdxl"])
    without = make_scheduler("sdxl", plain, BASE_CONFIGS["sdxl"])
    assert type(with_karras) is type(without)
    with_karras.set_timesteps(STEPS)
    without.set_timesteps(STEPS)
    assert _is_karras_spaced(with_karras.sigmas)
    assert not _is_karras_spaced(without.sigmas)


def test_karras_stays_off_when_the_base_config_turned_it_on():
    base = {**BASE_CONFIGS["sdxl"], "use_karras_sigmas": True}
    scheduler = make_scheduler("sdxl", "euler", base)
    scheduler.set_timesteps(STEPS)
    assert not _is_karras_spaced(scheduler.sigmas)


def test_ddim_keeps_sdxl_clip_sample_off_even_from_a_bare_config():
    scheduler = make_scheduler("sdxl", "ddim", {"beta_schedule": "scaled_linear"})
    assert scheduler.config.clip_sample is False and scheduler.config.set_alpha_to_one is False


def test_sd3_flow_solvers_follow_a_changed_base_shift():
    for name in ("dpmpp_2m", "unipc"):
        low = make_scheduler("sd3", name, BASE_CONFIGS["sd3"])
        high = make_scheduler("sd3", name, {**BASE_CONFIGS["sd3"], "shift": 5.0})
        assert (low.config.flow_shift, high.config.flow_shift) == (3.0, 5.0)
        _sd3_timesteps(low)
        _sd3_timesteps(high)
        assert float(high.sigmas[1]) > float(low.sigmas[1])  # a larger shift keeps more noise early


def test_flux_flow_solvers_keep_dynamic_shifting_and_the_pipeline_shift_keys():
    custom = {**BASE_CONFIGS["flux"], "base_shift": 0.4, "max_shift": 1.3}
    for name in ("dpmpp_2m", "unipc"):
        config = make_scheduler("flux", name, custom).config
        assert config.use_dynamic_shifting is True
        assert (config["base_shift"], config["max_shift"]) == (0.4, 1.3)


@pytest.mark.parametrize("name", ["flowmatch", "euler_a", "unipc"])
def test_flux_schnell_config_works_without_dynamic_shifting(name):
    scheduler = make_scheduler("flux", name, FLUX_SCHNELL_CONFIG)
    assert torch.isfinite(_denoise("flux", scheduler)).all()


def test_flux_dpm_needs_dynamic_shifting():
    with pytest.raises(SamplerError, match="use_dynamic_shifting") as info:
        make_scheduler("flux", "dpmpp_2m", FLUX_SCHNELL_CONFIG)
    assert "euler_a, flowmatch, unipc" in str(info.value)


def test_make_scheduler_refuses_what_validate_refuses():
    with pytest.raises(SamplerError, match="noise-prediction sampler"):
        make_scheduler("flux", "ddim", BASE_CONFIGS["flux"])
    with pytest.raises(SamplerError, match="Karras"):
        make_scheduler("sd3", "dpmpp_2m_karras", BASE_CONFIGS["sd3"])


@pytest.mark.parametrize("arch", sorted(SHIPPED))
def test_make_scheduler_takes_the_config_as_a_model_folder_stores_it(arch, tmp_path):
    """`scheduler_config.json` also holds `_class_name` and `_diffusers_version` (of the shipped class)."""
    SHIPPED[arch].save_config(tmp_path)
    stored = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert stored["_class_name"] == type(SHIPPED[arch]).__name__
    for name in sampler_names(arch):
        scheduler = make_scheduler(arch, name, stored)
        assert type(scheduler).__name__ == SAMPLERS_BY_ARCH[arch][name].scheduler
        assert torch.isfinite(_denoise(arch, scheduler)).all(), name


def test_make_scheduler_accepts_a_frozen_scheduler_config():
    assert make_scheduler("flux", "dpmpp_2m", SHIPPED["flux"].config).config.use_flow_sigmas is True
