"""The architecture facts: names trainers write, detection from single files' tensor names, and
which LoRA key names each base takes."""

from __future__ import annotations

import pytest

from sidecar.arch import (
    ARCH_ALIASES,
    ARCH_SPECS,
    arch_from_pipeline_class,
    arch_from_tensor_names,
    arch_spec,
    guess_lora_arch,
)

# A tensor name each published single file has (its own names, as its tools save them).
SINGLE_FILE_NAMES = {
    "sdxl": "conditioner.embedders.1.model.ln_final.weight",
    "sd3": "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight",
    "flux": "double_blocks.0.img_attn.qkv.weight",  # flux1-dev.safetensors (and Kontext's, the same names)
    "chroma": "distilled_guidance_layer.in_proj.weight",  # Chroma1-HD.safetensors, beside Flux's blocks
    "flux2": "double_stream_modulation_img.lin.weight",  # flux2-dev.safetensors, beside Flux's blocks
    "sd15": "cond_stage_model.transformer.text_model.final_layer_norm.weight",  # v1-5-pruned-emaonly
    "qwen_image": "transformer_blocks.0.img_mod.1.weight",  # ComfyUI's qwen_image_*.safetensors
    "zimage": "noise_refiner.0.attention.qkv.weight",  # ComfyUI's z_image_turbo_*.safetensors
}


@pytest.mark.parametrize(("arch", "name"), SINGLE_FILE_NAMES.items())
def test_single_files_are_told_apart_by_their_tensor_names(arch, name):
    shared = ["double_blocks.0.img_attn.qkv.weight"] if arch in ("chroma", "flux2") else []
    assert arch_from_tensor_names([*shared, name]) == arch


def test_every_pipeline_class_names_one_architecture():
    seen: dict[str, str] = {}
    for spec in ARCH_SPECS.values():
        for class_name in spec.pipeline_classes:
            assert seen.setdefault(class_name, spec.name) == spec.name, class_name
            assert arch_from_pipeline_class(class_name) == spec.name


@pytest.mark.parametrize(
    ("written", "arch"),
    [
        ("chroma", "chroma"),
        ("flux_kontext", "flux_kontext"),
        ("flux2", "flux2"),
        ("flux2_klein_4b", "flux2_klein"),
        ("flux2_klein_9b", "flux2_klein"),
        ("qwen_image", "qwen_image"),
        ("qwen_image:2512", "qwen_image"),
        ("qwen_image_edit", "qwen_image_edit"),
        ("qwen_image_edit_plus:2511", "qwen_image_edit_plus"),
        ("zimage:turbo", "zimage"),
        ("zimage:deturbo", "zimage"),
        ("sd15", "sd15"),
        ("sd1", "sd15"),
        ("flex1", "flux"),
    ],
)
def test_the_names_ai_toolkit_writes(written, arch):
    assert arch_spec(written).name == arch


def test_each_alias_names_one_architecture():
    """Aliases stand in each spec; one written in two specs would silently mean the later one."""
    written = [alias for spec in ARCH_SPECS.values() for alias in (spec.name, *spec.aliases)]
    assert len(written) == len(set(written)) == len(ARCH_ALIASES)
    assert all(alias == alias.strip().lower() for alias in written)  # `canonical_arch` lowers what it reads
    for spec in ARCH_SPECS.values():
        assert all(ARCH_ALIASES[alias] == spec.name for alias in (spec.name, *spec.aliases))


@pytest.mark.parametrize(
    ("keys", "group"),
    [
        (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "sd15"),
        (["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"], "sd15"),
        (["unet.down_blocks.1.attentions.0.proj_in.lora_A.weight", "lora_te2_x.lora_down.weight"], "sdxl"),
        (["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"], "flux2"),
        (["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"], "flux"),  # Flux.1's and Flux.2's
        (["diffusion_model.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight"], "qwen_image"),
        (["lora_unet_layers_0_attention_to_q.lora_down.weight"], "zimage"),
        (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], None),  # several have these
    ],
)
def test_lora_key_names_tell_the_group(keys, group):
    assert guess_lora_arch(keys) == group


def test_which_bases_take_which_lora_names():
    assert ARCH_SPECS["flux_kontext"].takes_lora_of("flux") and ARCH_SPECS["chroma"].takes_lora_of("flux")
    assert ARCH_SPECS["flux2"].takes_lora_of("flux")  # Flux.2's trainers write BFL's (Flux.1's) names
    assert not ARCH_SPECS["flux"].takes_lora_of("flux2")
    assert not ARCH_SPECS["sd15"].takes_lora_of("sdxl") and not ARCH_SPECS["sdxl"].takes_lora_of("sd15")
    assert ARCH_SPECS["qwen_image_edit_plus"].takes_lora_of("qwen_image")
