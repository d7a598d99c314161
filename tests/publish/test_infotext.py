"""The A1111 infotext: written as A1111 writes it, and read back by A1111's parser and the gallery's."""

from __future__ import annotations

import json
import re
from dataclasses import replace

from factories import sample_request

from sidecar.publish.infotext import infotext, parse_infotext

SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"

REQUEST = sample_request(
    index=3, prompt="photo of sks dog, on a beach", negative_prompt="blurry, lowres", width=1024, height=768
)
FLUX_REQUEST = replace(REQUEST, sampler="flowmatch", guidance_scale=3.5, negative_prompt="")
GALLERY_REQUEST = sample_request(
    prompt="a photo of sks dog, on a beach", negative_prompt="blurry, lowres", strength=0.8
)

# A1111's infotext parser (modules/infotext_utils.py `parse_generation_parameters`), reduced.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_like_a1111(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, params) the way A1111 reads an infotext."""
    *lines, last = text.strip().split("\n")
    if len(A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    params = {}
    for key, value in A1111_PARAM.findall(last):
        value = value.strip()
        params[key] = json.loads(value) if value.startswith('"') else value
    return "\n".join(prompt), "\n".join(negative), params


def test_sdxl_infotext_reads_like_a1111():
    text = infotext(
        REQUEST, base_model=SDXL_MODEL, lora_name="my_lora_000000500.safetensors", step=500, arch="sdxl"
    )
    assert text == (
        "photo of sks dog, on a beach\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 1024x768, "
        "Model: stabilityai/stable-diffusion-xl-base-1.0, Lora: my_lora_000000500.safetensors, "
        "Lora strength: 1, Step: 500"
    )


def test_a1111_parser_reads_every_field_back():
    request = replace(REQUEST, prompt="line one, with comma\nline two", guidance_scale=4.5, strength=0.75)
    text = infotext(
        request,
        base_model="C:/models/sd_xl: base.safetensors",
        lora_name="a, b.safetensors",
        step=None,
        arch="sdxl",
    )
    prompt, negative, params = parse_like_a1111(text)
    assert prompt == request.prompt
    assert negative == request.negative_prompt
    assert params == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "4.5",
        "Seed": "42",
        "Size": "1024x768",
        "Model": "sd_xl: base",
        "Lora": "a, b.safetensors",
        "Lora strength": "0.75",
    }


def test_karras_samplers_write_a_schedule_type():
    text = infotext(
        replace(REQUEST, sampler="k_dpmsolver++"), base_model="m", lora_name=None, step=1, arch="sdxl"
    )
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7" in text


def test_flux_writes_guidance_and_cfg_only_with_true_cfg():
    plain = infotext(
        replace(FLUX_REQUEST, negative_prompt="ignored"), base_model="m", lora_name=None, step=10, arch="flux"
    )
    assert "Guidance: 3.5" in plain and "CFG scale" not in plain
    assert "Negative prompt" not in plain  # Flux ignored it: no true CFG
    true_cfg = replace(FLUX_REQUEST, negative_prompt="blurry", true_cfg_scale=4.0)
    text = infotext(true_cfg, base_model="m", lora_name=None, step=10, arch="flux")
    assert "\nNegative prompt: blurry\n" in text
    assert "Sampler: Euler, CFG scale: 4, Guidance: 3.5, Seed: 42" in text


def test_sd3_writes_cfg_scale():
    text = infotext(
        replace(FLUX_REQUEST, guidance_scale=4.5), base_model="m", lora_name=None, step=None, arch="sd3"
    )
    assert "Sampler: Euler, CFG scale: 4.5, Seed: 42" in text and "Guidance" not in text


def test_no_lora_and_no_step_leave_their_fields_out():
    text = infotext(REQUEST, base_model="m", lora_name=None, step=None, arch="sdxl")
    assert "Lora" not in text and "Step:" not in text


def test_local_model_paths_become_their_name():
    for base, name in [("/models/flux1-dev.safetensors", "flux1-dev"), ("/models/FLUX.1-dev", "FLUX.1-dev")]:
        assert f"Model: {name}," in infotext(
            FLUX_REQUEST, base_model=base, lora_name=None, step=1, arch="flux"
        )


def test_an_unknown_sampler_is_written_as_given():
    text = infotext(replace(REQUEST, sampler="mystery"), base_model="m", lora_name=None, step=1, arch="sdxl")
    assert "Sampler: mystery," in text


def test_the_gallery_parser_reads_every_field_back() -> None:
    text = infotext(
        replace(GALLERY_REQUEST, prompt="a, b: c"),
        base_model="sdxl",
        lora_name="x.safetensors",
        step=500,
        arch="sdxl",
    )
    info = parse_infotext(text)
    assert info.prompt == "a, b: c"
    assert info.negative_prompt == "blurry, lowres"
    assert info.params["Seed"] == "42"
    assert info.params["Lora strength"] == "0.8"
    assert info.params["Size"] == "64x64"
    assert info.seed == "42" and info.strength == "0.8"
