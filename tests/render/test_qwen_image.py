"""Qwen-Image: renders equal plain diffusers calls (true CFG, ai-toolkit's always-present negative, padded
batches); LoRAs in every trainer's layout; swaps; refusals. The Edit variants need torchvision."""

from __future__ import annotations

import pytest
from arch_reference import (
    check_base,
    check_batch,
    check_lora,
    check_refused,
    check_swap,
    plain_call,
    reference_image,
    render_one,
    sample,
)

ARCH = "qwen_image"


def test_base_equals_a_plain_call_with_the_empty_negative(tiny_arch_model):
    check_base(ARCH, tiny_arch_model(ARCH))


def test_base_with_a_negative_prompt_equals_a_plain_call(tiny_arch_model):
    check_base(ARCH, tiny_arch_model(ARCH), negative_prompt="blurry, low quality", guidance_scale=2.5)


def test_a_batch_of_prompts_of_different_lengths_equals_a_plain_call(tiny_arch_model):
    check_batch(ARCH, tiny_arch_model(ARCH))


@pytest.mark.parametrize("lora_format", ["peft", "aitoolkit", "kohya"])
def test_lora_equals_a_plain_call(lora_format, tiny_arch_model, tiny_arch_lora):
    check_lora(ARCH, tiny_arch_model(ARCH), tiny_arch_lora(ARCH, lora_format), strength=0.8)


def test_the_next_checkpoint_swaps_in_place(tiny_arch_model, tiny_arch_lora):
    first, second = tiny_arch_lora(ARCH, "kohya", seed=0), tiny_arch_lora(ARCH, "kohya", seed=1)
    check_swap(ARCH, tiny_arch_model(ARCH), first, second)


def test_an_sdxl_lora_is_refused(tiny_arch_model, tiny_lora):
    check_refused(ARCH, tiny_arch_model(ARCH), tiny_lora("sdxl"), "Stable Diffusion XL")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_edit_with_a_reference_equals_a_plain_call(arch, tiny_arch_model, tmp_path):
    """The pipeline takes the reference to ~1 MP for its VAE whatever the sample's size: slow on CPU."""
    pytest.importorskip("torchvision", reason="transformers' Qwen2-VL processor needs torchvision")
    from arch_reference import new_renderer

    folder = tiny_arch_model(arch)
    request = sample(arch, control_images=(str(reference_image(tmp_path / "ref.png")),), width=64, height=48)
    got = render_one(new_renderer(arch, folder), request)
    assert got.shape == (48, 64, 3)
    assert (got == plain_call(folder, arch, [request])[0]).all()


def test_its_language_model_is_a_text_encoder_the_placement_moves(tiny_arch_model):
    """Qwen-Image (like Flux.2 and Z-Image) has no `model:` key for a separate text-encoder file, yet
    its Qwen2.5-VL must leave the card once prompts are cached, as CLIP and T5 do."""
    from sidecar.plan.request import ModelSource
    from sidecar.render.registry import load_renderer

    renderer = load_renderer(ModelSource(arch=ARCH, name_or_path=str(tiny_arch_model(ARCH))), device="cpu")
    assert renderer.encoder_components == ("text_encoder",)
    assert renderer.placement.encoder_names == ("text_encoder",)


class QwenVLProcessorStandIn:
    """Qwen2-VL's processor without its video part (which needs torchvision): the image processor's
    patches, each `<|image_pad|>` expanded to the image's merged patch count, then the tokenizer."""

    def __init__(self, tokenizer):
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer, self.image_processor = tokenizer, Qwen2VLImageProcessorPil()

    def __call__(self, text, images=None, padding=True, return_tensors="pt"):
        extra: dict = {}
        if images is not None:
            extra = dict(
                self.image_processor(
                    images=list(images) if isinstance(images, list) else [images], return_tensors="pt"
                )
            )
            counts = iter(
                int(grid.prod()) // self.image_processor.merge_size**2 for grid in extra["image_grid_thw"]
            )
            text = [
                "".join(
                    part if i == 0 else "<|image_pad|>" * next(counts) + part
                    for i, part in enumerate(t.split("<|image_pad|>"))
                )
                for t in text
            ]
        encoded = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        encoded.update(extra)
        return encoded


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_edit_renderers_equal_their_pipelines_own_call(arch, tmp_path):
    """The text encoder's view of the references (`encode_request`) and the references handed to the
    call are the pipeline's own: pixel-equal to a plain call on the same in-memory pipeline. (The
    pipelines take each reference to ~1 MP for the VAE whatever the sample's size: seconds on CPU.)"""
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    from sidecar.render.registry import renderer_class
    from sidecar.testing.tiny_more import _qwen_components

    pipeline_class = renderer_class(arch).pipeline_class
    torch.manual_seed(0)
    components = _qwen_components(deep=False)
    pipe = pipeline_class(**components, processor=QwenVLProcessorStandIn(components["tokenizer"]))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    count = 1 if arch == "qwen_image_edit" else 2
    references = [reference_image(tmp_path / f"ref{n}.png", size=(80 - 16 * n, 48)) for n in range(count)]
    request = sample(
        arch, width=64, height=48, control_images=tuple(map(str, references)), guidance_scale=3.0
    )
    (got,) = [
        np.asarray(image) for _, image in renderer_class(arch)(pipe, base_model="memory").render([request])
    ]
    images = [Image.open(path).convert("RGB").resize((64, 48), Image.BILINEAR) for path in references]
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    want = pipe(
        image=images if count > 1 else images[0],
        prompt=request.prompt,
        negative_prompt="",
        true_cfg_scale=3.0,
        height=48,
        width=64,
        num_inference_steps=2,
        generator=[torch.Generator("cpu").manual_seed(request.seed)],
    ).images[0]
    np.testing.assert_array_equal(got, np.asarray(want))
