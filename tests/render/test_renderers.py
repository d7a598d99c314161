"""Renderers checked against diffusers itself: every image must be a plain pipeline call's.

See `diffusers_reference` for how the reference is made. Also batching, every sampler end to
end, batch planning and the registry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers_reference import (
    APPLYING,
    ARCHS,
    PROMPT,
    SIZE,
    max_difference,
    params,
    plain_call,
    render,
    render_one,
    sample,
)

from sidecar.arch import ARCH_SPECS
from sidecar.errors import SamplerError
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Renderer, plan_batches, stack_embeddings
from sidecar.render.registry import renderer_class
from sidecar.samplers import sampler_names

# diffusers 0.42 schedulers mix numpy and tensors in ways numpy 2 flags on every step.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array:DeprecationWarning"),
    # The `dpmsolver` samplers use an algorithm type diffusers deprecates (schedulers.py says why).
    pytest.mark.filterwarnings("ignore:`algorithm_types dpmsolver:FutureWarning"),
]

# ---------------------------------------------------------------------------------
# Pixel equality with a plain diffusers call
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_render_without_lora_with_the_default_sampler_equals_plain_call(arch, tiny_models, new_renderer):
    request = sample(arch)
    (reference,) = plain_call(tiny_models[arch], arch, [request])
    np.testing.assert_array_equal(render_one(new_renderer(arch), request), reference)


@pytest.mark.parametrize(("arch", "lora_format"), params(APPLYING))
def test_render_with_lora_equals_plain_call(arch, lora_format, tiny_models, tiny_lora, new_renderer):
    """A strength other than 1 also checks that the LoRA scale reaches the denoiser."""
    lora = tiny_lora(arch, lora_format)
    request = sample(arch, strength=0.7)
    renderer = new_renderer(arch)
    renderer.apply_lora(lora)
    (reference,) = plain_call(tiny_models[arch], arch, [request], lora=lora)
    np.testing.assert_array_equal(render_one(renderer, request), reference)


@pytest.mark.parametrize(
    ("arch", "changes"),
    [
        ("sdxl", {"negative_prompt": "blurry, low quality"}),
        ("sd3", {"negative_prompt": "blurry, low quality"}),
        ("flux", {"negative_prompt": "blurry, low quality", "true_cfg_scale": 3.0}),
    ],
    ids=["sdxl-negative", "sd3-negative", "flux-true-cfg"],
)
def test_render_with_negative_prompt_equals_plain_call(arch, changes, tiny_models, tiny_lora, new_renderer):
    lora = tiny_lora(arch)
    request = sample(arch, **changes)
    renderer = new_renderer(arch)
    renderer.apply_lora(lora)
    image = render_one(renderer, request)
    (reference,) = plain_call(tiny_models[arch], arch, [request], lora=lora)
    np.testing.assert_array_equal(image, reference)
    (without_negative,) = plain_call(tiny_models[arch], arch, [sample(arch)], lora=lora)
    assert not np.array_equal(image, without_negative), "the negative prompt changed nothing"


@pytest.mark.parametrize(
    ("arch", "sampler"), params([("sdxl", "dpmpp_2m_karras"), ("sd3", "dpmpp_2m"), ("flux", "unipc")])
)
def test_render_with_another_sampler_equals_plain_call(arch, sampler, tiny_models, new_renderer, base_images):
    request = sample(arch, sampler=sampler)
    image = render_one(new_renderer(arch), request)
    (reference,) = plain_call(tiny_models[arch], arch, [request])
    np.testing.assert_array_equal(image, reference)
    assert not np.array_equal(image, base_images(arch)), "the sampler changed nothing"


# ---------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------


def batch_requests(arch: str) -> list[SampleRequest]:
    """Four requests with equal settings; the third repeats the first at another batch position."""
    prompts = [(PROMPT, 7), ("a lighthouse at dusk, oil painting", 8), (PROMPT, 7), ("x", 9)]
    return [
        sample(arch, index=index, prompt=prompt, seed=seed) for index, (prompt, seed) in enumerate(prompts)
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_render_equals_plain_batched_call_on_the_same_embeddings(
    arch, tiny_models, tiny_lora, new_renderer
):
    """The denoising of a batch is exactly diffusers': one call, one generator per image."""
    lora = tiny_lora(arch)
    requests = batch_requests(arch)
    events: list[tuple[str, dict]] = []
    renderer = new_renderer(arch, on_event=lambda event, fields: events.append((event, fields)))
    renderer.apply_lora(lora)
    batched = render(renderer, requests, batch_size=4)
    assert [fields["indices"] for event, fields in events if event == "batch_start"] == [[0, 1, 2, 3]]
    embeddings = stack_embeddings([renderer.embeddings(request) for request in requests])
    embeddings = {name: value for name, value in embeddings.items() if value is not None}
    references = plain_call(tiny_models[arch], arch, requests, lora=lora, **embeddings)
    for image, reference in zip(batched, references, strict=True):
        np.testing.assert_array_equal(image, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_render_matches_plain_batched_prompt_call(arch, tiny_models, tiny_lora, new_renderer):
    """Against `pipe(prompt=[...], generator=[...])`, within one uint8 level.

    Not bit-exact: sidecar encodes each prompt on its own (to cache it across checkpoints)
    while the plain call encodes the list at once, and CPU kernels are not batch-invariant
    (SDXL's pooled text projection differs by ~4e-7 between a batch of 1 and of 3).
    """
    lora = tiny_lora(arch)
    requests = batch_requests(arch)
    renderer = new_renderer(arch)
    renderer.apply_lora(lora)
    batched = render(renderer, requests, batch_size=4)
    references = plain_call(tiny_models[arch], arch, requests, lora=lora)
    differences = [
        max_difference(image, reference) for image, reference in zip(batched, references, strict=True)
    ]
    assert max(differences) <= 1, differences


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_render_matches_one_by_one(arch, tiny_lora, new_renderer):
    """Within one uint8 level (CPU kernels are not batch-invariant at ~1e-6), with each
    image's own seed: a batch must not share or shift noise between its images."""
    requests = batch_requests(arch)
    renderer = new_renderer(arch)
    renderer.apply_lora(tiny_lora(arch))
    batched = render(renderer, requests, batch_size=4)
    one_by_one = render(renderer, requests, batch_size=1)
    for image, single in zip(batched, one_by_one, strict=True):
        assert max_difference(image, single) <= 1
    # The same request at two batch positions gets the same noise...
    assert max_difference(batched[0], batched[2]) <= 1
    # ...and the tolerance means something: another seed and prompt move pixels far more.
    assert max_difference(one_by_one[0], one_by_one[1]) > 10
    assert max_difference(one_by_one[0], one_by_one[3]) > 10


# ---------------------------------------------------------------------------------
# Samplers, end to end
# ---------------------------------------------------------------------------------

SAMPLER_CASES = tuple((arch, name) for arch in ARCHS for name in sampler_names(arch))


@pytest.fixture(scope="module")
def sampler_renderers(tiny_models) -> dict[str, Renderer]:
    """One base renderer per architecture, shared: these tests only change the sampler."""
    return {arch: renderer_class(arch).from_model(tiny_models[arch]) for arch in ARCHS}


@pytest.mark.parametrize(("arch", "sampler"), params(SAMPLER_CASES))
def test_every_sampler_renders_a_finite_image(arch, sampler, sampler_renderers, monkeypatch):
    """NaN latents decode to a black uint8 image without an error, so the latents are checked."""
    renderer = sampler_renderers[arch]
    vae = renderer.pipe.vae
    decode = vae.decode
    decoded: list[bool] = []

    def checked_decode(latents, *arguments, **options):
        decoded.append(bool(torch.isfinite(latents).all()))
        return decode(latents, *arguments, **options)

    monkeypatch.setattr(vae, "decode", checked_decode)
    torch.manual_seed(0)  # flow `euler_a` draws its noise from the global RNG
    image = render_one(renderer, sample(arch, sampler=sampler, steps=3))
    assert decoded == [True]
    assert image.shape == (SIZE, SIZE, 3)
    assert image.std() > 1.0, "a flat image"


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_flow_euler_a_image_depends_on_its_own_seed_only(arch, new_renderer):
    """Flow `euler_a` draws its step noise from torch's global RNG, not the pipeline's generator:
    whatever state that RNG is in and whichever batch the request is in, its seed decides."""
    requests = [
        sample(arch, index=0, sampler="euler_a", seed=7),
        sample(arch, index=1, sampler="euler_a", seed=8),
    ]
    renderer = new_renderer(arch)
    batched = render(renderer, requests, batch_size=2)
    for state in (12345, 99):
        torch.manual_seed(state)
        np.testing.assert_array_equal(render_one(renderer, requests[1]), batched[1])
        np.testing.assert_array_equal(render_one(renderer, requests[0]), batched[0])
    assert max_difference(batched[0], batched[1]) > 10


@pytest.mark.parametrize("arch", params([("sd3",), ("flux",)]))
def test_flow_euler_a_step_noise_is_not_the_initial_noise(arch, new_renderer):
    renderer = new_renderer(arch)
    ancestral = render_one(renderer, sample(arch, sampler="euler_a"))
    deterministic = render_one(renderer, sample(arch, sampler="flowmatch"))
    assert not np.array_equal(ancestral, deterministic), "euler_a rendered as plain flow-match Euler"


@pytest.mark.parametrize(
    ("arch", "sampler"),
    params([("sdxl", "not_a_sampler"), ("sdxl", "flowmatch"), ("sd3", "euler_karras"), ("flux", "ddim")]),
)
def test_invalid_sampler_raises_sampler_error(arch, sampler, sampler_renderers):
    with pytest.raises(SamplerError, match=sampler):
        render_one(sampler_renderers[arch], sample(arch, sampler=sampler))


# ---------------------------------------------------------------------------------
# Batch planning and the renderer registry (no models)
# ---------------------------------------------------------------------------------


def test_plan_batches_groups_equal_settings_in_first_seen_order_and_chunks():
    requests = [
        sample("sdxl", index=0, width=512),
        sample("sdxl", index=1, width=768),
        sample("sdxl", index=2, width=512),
        sample("sdxl", index=3, width=512, seed=99),  # the seed is per image: same batch
        sample("sdxl", index=4, width=768),
        sample("sdxl", index=5, width=512, prompt="another prompt"),
    ]
    batches = plan_batches(requests, batch_size=2)
    assert [[request.index for request in batch] for batch in batches] == [[0, 2], [3, 5], [1, 4]]


@pytest.mark.parametrize(
    "changes",
    [
        {"width": 128},
        {"height": 128},
        {"steps": 3},
        {"guidance_scale": 2.0},
        {"true_cfg_scale": 2.0},
        {"sampler": "euler"},
        {"strength": 0.5},
        {"negative_prompt": "blurry"},
    ],
    ids=lambda changes: next(iter(changes)),
)
def test_plan_batches_never_mixes_requests_whose_settings_differ(changes):
    requests = [sample("sdxl", index=0), sample("sdxl", index=1, **changes), sample("sdxl", index=2)]
    batches = plan_batches(requests, batch_size=8)
    assert [[request.index for request in batch] for batch in batches] == [[0, 2], [1]]


def test_plan_batches_with_batch_size_one_keeps_every_request_once():
    requests = [sample("sdxl", index=index, width=512 + 64 * (index % 2)) for index in range(5)]
    batches = plan_batches(requests, batch_size=1)
    assert all(len(batch) == 1 for batch in batches)
    assert sorted(batch[0].index for batch in batches) == list(range(5))
    assert plan_batches([], batch_size=4) == []


@pytest.mark.parametrize("batch_size", [0, -1])
def test_plan_batches_rejects_a_batch_size_below_one(batch_size):
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        plan_batches([sample("sdxl")], batch_size=batch_size)


def test_stack_embeddings_concatenates_each_field_and_keeps_missing_ones_none():
    first = {
        "prompt_embeds": torch.zeros(1, 4, 3),
        "pooled_prompt_embeds": torch.zeros(1, 3),
        "negative_prompt_embeds": None,
    }
    second = {
        "prompt_embeds": torch.ones(1, 4, 3),
        "pooled_prompt_embeds": torch.ones(1, 3),
        "negative_prompt_embeds": None,
    }
    stacked = stack_embeddings([first, second])
    assert stacked.keys() == first.keys()
    assert torch.equal(stacked["prompt_embeds"], torch.cat([first["prompt_embeds"], second["prompt_embeds"]]))
    assert stacked["pooled_prompt_embeds"].shape == (2, 3)
    assert stacked["pooled_prompt_embeds"][1].eq(1).all()
    assert stacked["negative_prompt_embeds"] is None


def test_stack_embeddings_gives_none_when_any_request_lacks_a_field():
    with_negative = {"negative_prompt_embeds": torch.zeros(1, 2)}
    without = {"negative_prompt_embeds": None}
    assert stack_embeddings([with_negative, without])["negative_prompt_embeds"] is None


def test_renderer_registry_covers_every_architecture_and_names_the_known_ones():
    for arch in ARCH_SPECS:
        assert renderer_class(arch).spec.name == arch
    with pytest.raises(KeyError, match="chroma, flux, flux2, flux2_klein, flux_kontext, qwen_image"):
        renderer_class("sd2")


@pytest.mark.parametrize("arch", ARCHS)
def test_text_encoders_leave_the_gpu_once_every_prompt_is_cached(arch, tiny_lora, new_renderer, monkeypatch):
    """Placement on a (pretend) CUDA card with offload=none: encoders come for new prompts only.

    The move itself is `module.to(device)`; here it is recorded, as this machine has no CUDA.
    """
    from sidecar.render.memory import MemoryPolicy, Placement

    renderer = new_renderer(arch)
    renderer.placement = Placement(device=torch.device("cuda", 0), policy=MemoryPolicy("none"))
    moves: list[str] = []
    monkeypatch.setattr(renderer, "_move_text_encoders", lambda device: moves.append(device.type))
    renderer.apply_lora(tiny_lora(arch))
    render(renderer, [sample(arch)])
    assert moves == ["cuda", "cpu"]  # encoded on the card, then off it
    render(renderer, [sample(arch)])
    assert moves == ["cuda", "cpu", "cpu"]  # cached: the encoders are not brought back
    render(renderer, [sample(arch, prompt="a new prompt")])
    assert moves[-2:] == ["cuda", "cpu"]


def test_text_encoders_stay_for_a_text_encoder_lora_and_in_offload_modes(
    tiny_lora, new_renderer, monkeypatch
):
    from sidecar.render.memory import MemoryPolicy, Placement

    renderer = new_renderer("sdxl")
    moves: list[str] = []
    monkeypatch.setattr(renderer, "_move_text_encoders", lambda device: moves.append(device.type))
    renderer.placement = Placement(device=torch.device("cuda", 0), policy=MemoryPolicy("none"))
    renderer.apply_lora(tiny_lora("sdxl", text_encoder=True))
    render(renderer, [sample("sdxl")])
    assert moves == ["cuda"]  # the LoRA changes the encoders: they stay for the next strength
    renderer.placement = Placement(device=torch.device("cuda", 0), policy=MemoryPolicy("model"))
    render(renderer, [sample("sdxl", prompt="other")])
    assert moves == ["cuda"]  # model offload moves them itself
