"""Sampler names -> diffusers schedulers, per architecture, checked against how the pipelines call them."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from factories import REPO
from sidecar.arch import ARCH_SPECS, arch_spec

from sidecar.errors import SamplerError
from sidecar.render.registry import schedulers
from sidecar.render.schedulers import make_scheduler
from sidecar.samplers import (
    SAMPLERS_BY_ARCH,
    normalize_sampler_name,
    sampler_names,
    sampler_spec,
    validate_sampler,
)

# diffusers 0.42 schedulers mix numpy and tensors in ways numpy 2 flags on every step.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

# The schedulers the real models ship with (`scheduler/scheduler_config.json`).
SDXL_BASE_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SD3_BASE_CONFIG = {  # stabilityai/stable-diffusion-3.5-large / -medium
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.31.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
FLUX_BASE_CONFIG = {  # black-forest-labs/FLUX.1-dev
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL_BASE_CONFIG = {**FLUX_BASE_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}
BASE_CONFIGS = {"sdxl": SDXL_BASE_CONFIG, "sd3": SD3_BASE_CONFIG, "flux": FLUX_BASE_CONFIG}

# name -> (class name, settings the built scheduler's config must hold)
EXPECTED_SDXL = {
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "dpm_2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "dpm_2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "dpm_2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "use_karras_sigmas": False}),
    "dpmsolver_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver", "use_karras_sigmas": True},
    ),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {"use_karras_sigmas": False}),
    "unipc_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
}
FLOW_DPM = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "use_karras_sigmas": False}
EXPECTED_FLOW = {
    "flowmatch": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": False}),
    "euler_a": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {**FLOW_DPM, "algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "unipc": ("UniPCMultistepScheduler", FLOW_DPM),
}
EXPECTED = {"sdxl": EXPECTED_SDXL, "sd3": EXPECTED_FLOW, "flux": EXPECTED_FLOW}

# What trainers and UIs write -> (arch, canonical name)
SPELLINGS = [
    # ai-toolkit / kohya
    ("sdxl", "k_euler", "euler_karras"),
    ("sdxl", "k_lms", "lms_karras"),
    ("sdxl", "k_dpm_2", "dpm_2_karras"),
    ("sdxl", "k_dpm_2_a", "dpm_2_a_karras"),
    ("sdxl", "k_euler_a", "euler_a"),
    ("sdxl", "dpmsolver++", "dpmpp_2m"),
    ("sdxl", "k_dpmsolver++", "dpmpp_2m_karras"),
    ("sdxl", "k_dpmsolver", "dpmsolver_karras"),
    # A1111 labels and spellings
    ("sdxl", "DPM++ 2M Karras", "dpmpp_2m_karras"),
    ("sdxl", "dpmpp_2m_karras", "dpmpp_2m_karras"),
    ("sdxl", "dpm++_2m_karras", "dpmpp_2m_karras"),
    ("sdxl", "DPM++-2M-Karras", "dpmpp_2m_karras"),
    ("sdxl", "dpm++ 2m", "dpmpp_2m"),
    ("sdxl", "dpm++ 2m sde", "dpmpp_2m_sde"),
    ("sdxl", "DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"),
    ("sdxl", "Euler a", "euler_a"),
    ("sdxl", "EULER_A", "euler_a"),
    ("sdxl", "DPM2 a Karras", "dpm_2_a_karras"),
    ("sdxl", "PLMS", "pndm"),
    ("sdxl", "UniPC", "unipc"),
    # ComfyUI
    ("sdxl", "euler_ancestral", "euler_a"),
    ("sdxl", "uni_pc", "unipc"),
    # flow models: euler means flow-match Euler
    ("flux", "euler", "flowmatch"),
    ("flux", "Euler", "flowmatch"),
    ("sd3", "euler", "flowmatch"),
    ("sd3", "flowmatch", "flowmatch"),
    ("sd3", "Euler a", "euler_a"),
    ("flux", "dpm++ 2m", "dpmpp_2m"),
    ("flux", "dpmsolver++", "dpmpp_2m"),
    ("sd3", "UNIPC", "unipc"),
    # architecture aliases
    ("flux_dev", "flowmatch", "flowmatch"),
    ("sd3.5", "dpmpp_2m", "dpmpp_2m"),
]

# Names valid elsewhere that each flow model must refuse.
NOT_ON_FLOW = [
    "ddim",
    "ddpm",
    "pndm",
    "lms",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "dpmsolver",
    "dpmsingle",
    "dpmpp_2m_sde",
]
KARRAS_NAMES = [
    "k_euler",
    "euler_karras",
    "dpm++ 2m karras",
    "k_dpmsolver++",
    "unipc_karras",
    "k_dpm_2",
    "k_lms",
]


def _available(arch: str, name: str) -> bool:
    spec = SAMPLERS_BY_ARCH[arch][name]
    return all(importlib.util.find_spec(module) for module in spec.requires)


def _cases(kind: str):
    return [
        pytest.param(arch, name, id=f"{arch}-{name}")
        for arch in ("sdxl", "sd3", "flux")
        for name in EXPECTED[arch]
        if kind == "all" or (kind == "flow" and ARCH_SPECS[arch].is_flow_model)
    ]


# ---------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------


def test_tables_hold_exactly_the_expected_names():
    for arch, expected in EXPECTED.items():
        assert set(SAMPLERS_BY_ARCH[arch]) == set(expected), arch


@pytest.mark.parametrize(("arch", "name"), _cases("all"))
def test_table_entry_names_the_expected_class(arch, name):
    spec = SAMPLERS_BY_ARCH[arch][name]
    assert spec.scheduler == EXPECTED[arch][name][0]


def test_flow_models_get_flow_schedulers_only_and_never_karras():
    for arch, table in SAMPLERS_BY_ARCH.items():
        if not ARCH_SPECS[arch].is_flow_model:
            continue
        for name, spec in table.items():
            assert spec.scheduler.startswith("FlowMatch") or spec.overrides.get("use_flow_sigmas"), name
            assert not spec.overrides.get("use_karras_sigmas"), name


def test_default_samplers_are_valid():
    for arch, spec in ARCH_SPECS.items():
        assert validate_sampler(arch, spec.default_sampler) == spec.default_sampler


def test_sampler_names_are_sorted_canonical_and_available():
    for arch in SAMPLERS_BY_ARCH:
        names = sampler_names(arch)
        assert names == sorted(names)
        assert set(names) == {name for name in EXPECTED[arch] if _available(arch, name)}


def test_names_validate_without_importing_diffusers():
    """`sidecar check` validates names fast: the module itself imports neither diffusers nor torch.

    Loaded from its file, apart from the `sidecar.pipelines` package whose init imports the renderers.
    """
    code = (
        "import importlib.util, sys\n"
        "path = 'sidecar/pipelines/schedulers.py'\n"
        "spec = importlib.util.spec_from_file_location('standalone_schedulers', path)\n"
        "module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert module.validate_sampler('flux', 'euler') == 'flowmatch' and module.sampler_names('sdxl')\n"
        "assert 'diffusers' not in sys.modules and 'torch' not in sys.modules, 'imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_only_flow_euler_a_draws_from_the_global_rng():
    flagged = {
        (arch, name) for arch, table in SAMPLERS_BY_ARCH.items() for name, s in table.items() if s.global_rng
    }
    assert flagged == {("sd3", "euler_a"), ("flux", "euler_a")}


# ---------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "written", "canonical"), SPELLINGS)
def test_spellings_resolve_to_canonical_names(arch, written, canonical):
    if not _available(arch_spec(arch).name, canonical):
        pytest.skip("needs an optional dependency")
    assert validate_sampler(arch, written) == canonical


def test_normalisation_folds_case_separators_and_plus_signs():
    keys = {
        normalize_sampler_name(n)
        for n in ("DPM++ 2M Karras", "dpmpp_2m_karras", "dpm++_2m_karras", " dpmPP-2m-KARRAS ")
    }
    assert len(keys) == 1


def test_infotext_labels_resolve_back_to_their_sampler():
    for arch, table in SAMPLERS_BY_ARCH.items():
        for name, spec in table.items():
            label = f"{spec.label} {spec.schedule_type}" if spec.schedule_type else spec.label
            if _available(arch, name):
                assert validate_sampler(arch, label) == name, (arch, label)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
@pytest.mark.parametrize("name", NOT_ON_FLOW)
def test_noise_prediction_samplers_are_refused_on_flow_models(arch, name):
    with pytest.raises(SamplerError) as info:
        validate_sampler(arch, name)
    message = str(info.value)
    assert repr(name) in message and "flow" in message
    for valid in sampler_names(arch):
        assert valid in message


@pytest.mark.parametrize("arch", ["sd3", "flux"])
@pytest.mark.parametrize("name", KARRAS_NAMES)
def test_karras_is_refused_on_flow_models(arch, name):
    with pytest.raises(SamplerError, match="Karras"):
        validate_sampler(arch, name)


def test_a_spelling_of_another_architecture_suggests_the_name_here():
    with pytest.raises(SamplerError, match="did you mean 'euler_a'"):
        validate_sampler("flux", "k_euler_a")


def test_flow_only_names_are_refused_on_sdxl():
    with pytest.raises(SamplerError, match="flow-matching sampler") as info:
        validate_sampler("sdxl", "flowmatch")
    assert "euler_a" in str(info.value) and "dpmpp_2m_karras" in str(info.value)


@pytest.mark.parametrize("arch", ["sdxl", "sd3", "flux"])
@pytest.mark.parametrize("name", ["euler_b", "dpm++ 3m", "k_flowmatch", "lcm", "dpmpp_2m_sde_gpu"])
def test_unknown_names_raise_listing_the_valid_ones(arch, name):
    with pytest.raises(SamplerError, match="not a known sampler name") as info:
        validate_sampler(arch, name)
    assert all(valid in str(info.value) for valid in sampler_names(arch))


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_empty_or_non_string_names_raise(bad):
    with pytest.raises(SamplerError, match="non-empty string"):
        validate_sampler("sdxl", bad)


def test_missing_optional_dependency_is_named(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        schedulers.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "scipy" else real_find_spec(name, *a),
    )
    assert "lms" not in sampler_names("sdxl")
    with pytest.raises(SamplerError, match="needs scipy"):
        validate_sampler("sdxl", "k_lms")


def test_sampler_spec_gives_infotext_labels():
    assert sampler_spec("sdxl", "k_dpmsolver++").label == "DPM++ 2M"
    assert sampler_spec("sdxl", "k_dpmsolver++").schedule_type == "Karras"
    assert sampler_spec("flux", "euler").label == "Euler"


# ---------------------------------------------------------------------------------
# Building schedulers
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "name"), _cases("all"))
def test_make_scheduler_builds_the_expected_class_and_config(arch, name):
    if not _available(arch, name):
        pytest.skip(f"{name} needs {SAMPLERS_BY_ARCH[arch][name].requires}")
    class_name, settings = EXPECTED[arch][name]
    scheduler = make_scheduler(arch, name, BASE_CONFIGS[arch])
    assert type(scheduler).__name__ == class_name
    for key, value in settings.items():
        assert scheduler.config[key] == value, key


@pytest.mark.parametrize("name", [n for n in EXPECTED_SDXL if n != "euler_a"])
def test_sdxl_schedulers_keep_the_base_betas_and_spacing(name):
    if not _available("sdxl", name):
        pytest.skip("needs an optional dependency")
    config = make_scheduler("sdxl", name, SDXL_BASE_CONFIG).config
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        assert config[key] == SDXL_BASE_CONFIG[key], key
    if "timestep_spacing" in config:
        assert config["timestep_spacing"] == "leading"
        assert config["steps_offset"] == 1


def test_ddim_keeps_sdxl_clip_sample_off_even_from_a_bare_config():
    scheduler = make_scheduler("sdxl", "ddim", {"beta_schedule": "scaled_linear"})
    assert scheduler.config.clip_sample is False and scheduler.config.set_alpha_to_one is False


def test_sd3_flow_solvers_take_flow_shift_from_the_base_shift():
    for name in ("dpmpp_2m", "unipc"):
        assert make_scheduler("sd3", name, SD3_BASE_CONFIG).config.flow_shift == 3.0
        assert make_scheduler("sd3", name, {**SD3_BASE_CONFIG, "shift": 5.0}).config.flow_shift == 5.0


def test_flux_flow_solvers_keep_dynamic_shifting_and_the_pipeline_shift_keys():
    custom = {**FLUX_BASE_CONFIG, "base_shift": 0.4, "max_shift": 1.3}
    for name in ("dpmpp_2m", "unipc"):
        config = make_scheduler("flux", name, custom).config
        assert config.use_dynamic_shifting is True
        assert (config["base_shift"], config["max_shift"]) == (0.4, 1.3)


def test_flux_dpm_needs_dynamic_shifting():
    with pytest.raises(SamplerError, match="use_dynamic_shifting"):
        make_scheduler("flux", "dpmpp_2m", FLUX_SCHNELL_BASE_CONFIG)


def test_make_scheduler_refuses_what_validate_refuses():
    with pytest.raises(SamplerError):
        make_scheduler("flux", "ddim", FLUX_BASE_CONFIG)
    with pytest.raises(SamplerError):
        make_scheduler("sd3", "dpmpp_2m_karras", SD3_BASE_CONFIG)


def test_make_scheduler_accepts_a_frozen_scheduler_config():
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = FlowMatchEulerDiscreteScheduler.from_config(FLUX_BASE_CONFIG).config
    assert make_scheduler("flux", "dpmpp_2m", base).config.use_flow_sigmas is True


# ---------------------------------------------------------------------------------
# As the pipelines call them
# ---------------------------------------------------------------------------------

STEPS = 8


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


def _run_steps(scheduler, timesteps):
    """The denoising loop's scheduler calls on random tensors; returns the final latents."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # FlowMatch's stochastic step draws from the global RNG
    scheduler.set_begin_index(0)
    latents = torch.randn(1, 16, 8, 8, generator=generator) * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in timesteps:
        model_output = torch.randn(latents.shape, generator=generator)
        latents = scheduler.step(model_output, t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize(("arch", "name"), _cases("flow"))
def test_flow_schedulers_work_as_the_pipeline_calls_them(arch, name):
    scheduler = make_scheduler(arch, name, BASE_CONFIGS[arch])
    timesteps = _flux_timesteps(scheduler) if arch == "flux" else _sd3_timesteps(scheduler)
    assert len(timesteps) == STEPS
    sigmas = scheduler.sigmas
    assert torch.isfinite(sigmas).all() and float(sigmas[0]) <= 1.0 and float(sigmas[-1]) == 0.0
    assert torch.all(sigmas[:-1] > sigmas[1:])  # strictly decreasing noise
    assert torch.isfinite(_run_steps(scheduler, timesteps)).all()


@pytest.mark.parametrize("name", ["flowmatch", "euler_a", "unipc"])
def test_flux_schnell_config_works_without_dynamic_shifting(name):
    scheduler = make_scheduler("flux", name, FLUX_SCHNELL_BASE_CONFIG)
    timesteps = _flux_timesteps(scheduler)
    assert torch.isfinite(_run_steps(scheduler, timesteps)).all()


def test_flow_dpm_follows_the_same_shift_as_the_model_scheduler():
    """Flow DPM++ 2M on SD 3.5 and Flux starts from the shifted sigma the shipped scheduler uses."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for arch, timesteps_of in (("sd3", _sd3_timesteps), ("flux", _flux_timesteps)):
        reference = FlowMatchEulerDiscreteScheduler.from_config(BASE_CONFIGS[arch])
        timesteps_of(reference)
        dpm = make_scheduler(arch, "dpmpp_2m", BASE_CONFIGS[arch])
        timesteps_of(dpm)
        # same shift: the second sigma (first after 1.0) agrees to a step's rounding
        assert abs(float(dpm.sigmas[1]) - float(reference.sigmas[1])) < 0.02, arch


@pytest.mark.parametrize("name", sorted(EXPECTED_SDXL))
def test_sdxl_schedulers_step_to_finite_latents(name):
    if not _available("sdxl", name):
        pytest.skip("needs an optional dependency")
    scheduler = make_scheduler("sdxl", name, SDXL_BASE_CONFIG)
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

    timesteps, _ = retrieve_timesteps(scheduler, STEPS, "cpu")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        assert torch.isfinite(model_input).all()
        noise_pred = torch.randn(latents.shape, generator=generator) * 0.1
        kwargs = {"generator": generator} if accepts_generator else {}
        latents = scheduler.step(noise_pred, t, latents, return_dict=False, **kwargs)[0]
    assert torch.isfinite(latents).all()
