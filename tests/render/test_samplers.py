"""Sampler names as trainers and UIs write them, checked per architecture by `sidecar.samplers`.

Building and stepping the schedulers is in test_schedulers.py.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from factories import REPO

from sidecar.arch import ARCH_SPECS, arch_spec
from sidecar.errors import SamplerError
from sidecar.samplers import (
    SAMPLERS_BY_ARCH,
    TRAINER_SAMPLERS,
    normalize_sampler_name,
    sampler_names,
    sampler_spec,
    trainer_sampler,
    validate_sampler,
)

# What trainers and UIs write -> (arch, canonical name)
SPELLINGS = [
    # kohya sd-scripts `sample_sampler` choices
    ("sdxl", "ddim", "ddim"),
    ("sdxl", "pndm", "pndm"),
    ("sdxl", "lms", "lms"),
    ("sdxl", "euler", "euler"),
    ("sdxl", "euler_a", "euler_a"),
    ("sdxl", "heun", "heun"),
    ("sdxl", "dpm_2", "dpm_2"),
    ("sdxl", "dpm_2_a", "dpm_2_a"),
    ("sdxl", "dpmsolver", "dpmsolver"),
    ("sdxl", "dpmsingle", "dpmsingle"),
    # ai-toolkit (its `k_` names are Karras; kohya's meaning is `KOHYA_SAMPLERS`, tested below)
    ("sdxl", "k_lms", "lms_karras"),
    ("sdxl", "k_euler", "euler_karras"),
    ("sdxl", "k_euler_a", "euler_a"),
    ("sdxl", "k_dpm_2", "dpm_2_karras"),
    ("sdxl", "k_dpm_2_a", "dpm_2_a_karras"),
    ("sdxl", "ddpm", "ddpm"),
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
    ("sdxl", "UniPC Karras", "unipc_karras"),
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

# Names valid on SDXL that each flow model must refuse: they run there and give wrong images.
NOISE_PREDICTION_ONLY = [
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
FLOW_ARCHS = [arch for arch, spec in ARCH_SPECS.items() if spec.is_flow_model]


def _available(arch: str, name: str) -> bool:
    spec = SAMPLERS_BY_ARCH[arch][name]
    return all(importlib.util.find_spec(module) for module in spec.requires)


def _written_names(arch: str) -> list[tuple[str, str]]:
    """(name as written, canonical) for every canonical name, alias and infotext label of `arch`."""
    names = []
    for canonical, spec in SAMPLERS_BY_ARCH[arch].items():
        label = f"{spec.label} {spec.schedule_type}" if spec.schedule_type else spec.label
        names += [(written, canonical) for written in (canonical, *spec.aliases, label)]
    return names


# ---------------------------------------------------------------------------------
# Valid names
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "written", "canonical"), SPELLINGS)
def test_spellings_resolve_to_canonical_names(arch, written, canonical):
    if not _available(arch_spec(arch).name, canonical):
        pytest.skip("needs an optional dependency")
    assert validate_sampler(arch, written) == canonical


@pytest.mark.parametrize("arch", sorted(SAMPLERS_BY_ARCH))
def test_every_alias_and_infotext_label_resolves_to_its_sampler(arch):
    """What sidecar writes into infotext reads back as the same sampler (A1111 "send to txt2img")."""
    for written, canonical in _written_names(arch):
        if _available(arch, canonical):
            assert validate_sampler(arch, written) == canonical, written


def test_normalisation_folds_case_separators_and_plus_signs():
    keys = {
        normalize_sampler_name(n)
        for n in ("DPM++ 2M Karras", "dpmpp_2m_karras", "dpm++_2m_karras", " dpmPP-2m-KARRAS ")
    }
    assert keys == {"dpmpp2mkarras"}


def test_default_samplers_are_valid():
    for arch, spec in ARCH_SPECS.items():
        assert validate_sampler(arch, spec.default_sampler) == spec.default_sampler


def test_sampler_names_are_sorted_canonical_and_available():
    for arch, table in SAMPLERS_BY_ARCH.items():
        names = sampler_names(arch)
        assert names and names == sorted(names)
        assert names == sorted(name for name in table if _available(arch, name))
        assert all(validate_sampler(arch, name) == name for name in names)


def test_sampler_spec_gives_infotext_labels():
    assert sampler_spec("sdxl", "k_dpmsolver++").label == "DPM++ 2M"
    assert sampler_spec("sdxl", "k_dpmsolver++").schedule_type == "Karras"
    assert sampler_spec("sdxl", "dpmpp_2m").schedule_type is None
    assert sampler_spec("flux", "euler").label == "Euler"
    with pytest.raises(SamplerError, match="not a known sampler name"):
        sampler_spec("sdxl", "euler_b")


def test_names_validate_without_importing_diffusers():
    """`sidecar check` validates names fast: `sidecar.samplers` imports neither diffusers nor torch."""
    code = (
        "import sys\n"
        "from sidecar.samplers import sampler_names, validate_sampler\n"
        "assert validate_sampler('flux', 'euler') == 'flowmatch' and sampler_names('sdxl')\n"
        "assert 'diffusers' not in sys.modules and 'torch' not in sys.modules, 'imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------
# Refused names: each message says why and lists the valid names
# ---------------------------------------------------------------------------------


def _refusal(arch: str, name: object) -> str:
    with pytest.raises(SamplerError) as info:
        validate_sampler(arch, name)
    return str(info.value)


@pytest.mark.parametrize("arch", FLOW_ARCHS)
@pytest.mark.parametrize("name", NOISE_PREDICTION_ONLY)
def test_noise_prediction_samplers_are_refused_on_flow_models(arch, name):
    message = _refusal(arch, name)
    assert (
        f"{name!r} is not valid for {arch}: it is a noise-prediction sampler with no flow-matching" in message
    )
    assert all(valid in message for valid in sampler_names(arch))


@pytest.mark.parametrize("arch", FLOW_ARCHS)
@pytest.mark.parametrize("name", KARRAS_NAMES)
def test_karras_is_refused_on_flow_models(arch, name):
    message = _refusal(arch, name)
    assert "Karras sigmas are not offered on flow-matching models" in message
    assert all(valid in message for valid in sampler_names(arch))


def test_a_spelling_of_another_architecture_suggests_the_name_here():
    message = _refusal("flux", "k_euler_a")
    assert "is a sdxl spelling not accepted for flux; did you mean 'euler_a'?" in message


def test_flow_only_names_are_refused_on_sdxl():
    message = _refusal("sdxl", "flowmatch")
    assert "is not valid for sdxl: it is a flow-matching sampler and sdxl predicts noise" in message
    assert "euler_a" in message and "dpmpp_2m_karras" in message


@pytest.mark.parametrize("arch", sorted(SAMPLERS_BY_ARCH))
def test_every_name_known_on_another_architecture_is_refused_with_a_reason(arch):
    """No name of another architecture passes, and none is called unknown."""
    here = {normalize_sampler_name(written) for written, _ in _written_names(arch)}
    for other in SAMPLERS_BY_ARCH:
        for written, _ in _written_names(other):
            if normalize_sampler_name(written) in here:
                continue
            message = _refusal(arch, written)
            assert "not a known sampler name" not in message, (other, written)
            assert f"Valid samplers for {arch}" in message, (other, written)


@pytest.mark.parametrize("arch", sorted(SAMPLERS_BY_ARCH))
@pytest.mark.parametrize("name", ["euler_b", "dpm++ 3m", "k_flowmatch", "lcm", "dpmpp_2m_sde_gpu"])
def test_unknown_names_raise_listing_the_valid_ones(arch, name):
    message = _refusal(arch, name)
    assert f"{name!r} is not a known sampler name" in message
    assert all(valid in message for valid in sampler_names(arch))


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_empty_or_non_string_names_raise(bad):
    with pytest.raises(SamplerError, match="non-empty string"):
        validate_sampler("sdxl", bad)


def test_missing_optional_dependency_is_named(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "scipy" else real_find_spec(name, *a),
    )
    assert "lms" not in sampler_names("sdxl") and "lms_karras" not in sampler_names("sdxl")
    with pytest.raises(SamplerError, match=r"needs scipy, which is not installed \(`pip install scipy`\)"):
        validate_sampler("sdxl", "k_lms")


# ------------------------------------------------------------------ trainers' own names


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("k_euler", "euler"),
        ("k_euler_a", "euler_a"),
        ("k_lms", "lms"),
        ("k_dpm_2", "dpm_2"),
        ("k_dpm_2_a", "dpm_2_a"),
    ],
)
def test_kohya_k_names_are_the_plain_samplers(written: str, canonical: str) -> None:
    """sd-scripts `get_my_scheduler` builds the same scheduler for `k_euler` as for `euler`."""
    assert trainer_sampler("kohya", written) == canonical
    assert SAMPLERS_BY_ARCH["sdxl"][canonical].schedule_type is None  # no Karras sigmas


@pytest.mark.parametrize(
    ("trainer", "written", "canonical"),
    [
        ("kohya", "dpmsolver++", "dpmpp_2m"),
        ("onetrainer", "EULER_A", "euler_a"),
        ("onetrainer", "dpmpp", "dpmpp_2m"),
        ("onetrainer", "DPMPP_SDE_KARRAS", "dpmpp_2m_sde_karras"),
        ("onetrainer", "UNIPC_KARRAS", "unipc_karras"),
        ("simpletuner", "euler-a", "euler_a"),
        ("simpletuner", "dpm++", "dpmpp_2m"),
        ("simpletuner", "flow_matching", "flowmatch"),
        ("simpletuner", "flow_unipc", "unipc"),
    ],
)
def test_trainer_names_map_to_ours(trainer: str, written: str, canonical: str) -> None:
    assert trainer_sampler(trainer, written) == canonical


@pytest.mark.parametrize("trainer", sorted(TRAINER_SAMPLERS))
def test_every_trainer_name_maps_to_a_sampler_of_some_architecture(trainer: str) -> None:
    known = {name for table in SAMPLERS_BY_ARCH.values() for name in table}
    assert set(TRAINER_SAMPLERS[trainer].values()) <= known


def test_unknown_trainer_names_list_that_trainers_names() -> None:
    with pytest.raises(SamplerError, match=r"'k_dpmpp' is not a kohya sampler name; kohya names: ddim, ddpm"):
        trainer_sampler("kohya", "k_dpmpp")
