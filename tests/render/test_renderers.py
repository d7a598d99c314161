"""Renderers checked against diffusers itself: every image must be a plain pipeline call's.

Each reference is an ordinary `DiffusionPipeline.from_pretrained(...)` with the LoRA loaded
through `load_lora_weights(path)` and the seed in a CPU generator, so a renderer that
re-implements, forgets or reorders anything (a LoRA scale, a negative prompt, a seed, the
scheduler's config) gives different pixels. Tiny models, 64x64, two steps, on CPU.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EulerAncestralDiscreteScheduler
from sidecar.arch import ARCH_SPECS

from sidecar.errors import CheckpointError, LoraError, SamplerError
from sidecar.plan.request import SampleRequest
from sidecar.render.base import Renderer, plan_batches, stack_embeddings
from sidecar.render.registry import renderer_class
from sidecar.render.schedulers import make_scheduler
from sidecar.samplers import sampler_names
from sidecar.testing.loras import LORA_FORMATS

# diffusers 0.42 schedulers mix numpy and tensors in ways numpy 2 flags on every step.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array:DeprecationWarning"),
    # The `dpmsolver` samplers use an algorithm type diffusers deprecates (schedulers.py says why).
    pytest.mark.filterwarnings("ignore:`algorithm_types dpmsolver:FutureWarning"),
]

ARCHS = ("sdxl", "sd3", "flux")
SIZE = 64  # pixels: an 8x8 latent
STEPS = 2
PROMPT = "a red fox in the snow"
ATTENTION_KWARGS = {
    "sdxl": "cross_attention_kwargs",
    "sd3": "joint_attention_kwargs",
    "flux": "joint_attention_kwargs",
}
# LoRA formats diffusers ignores without an error: sidecar must raise for them.
NOT_APPLYING = (("sdxl", "unprefixed"), ("sd3", "kohya"), ("sd3", "unprefixed"), ("flux", "unprefixed"))
APPLYING = tuple(
    (arch, fmt) for arch in ARCHS for fmt in LORA_FORMATS[arch] if (arch, fmt) not in NOT_APPLYING
)
TEXT_ENCODER_FORMATS = ("peft", "kohya", "kohya_sgm")  # SDXL


def params(rows, xfails: dict[tuple, str] | None = None) -> list:
    """One `pytest.param` per row, named `a-b-c`; rows in `xfails` are strict xfails with that reason."""
    xfails = xfails or {}
    return [
        pytest.param(
            *row,
            id="-".join(map(str, row)),
            marks=[pytest.mark.xfail(strict=True, reason=xfails[row])] if row in xfails else [],
        )
        for row in rows
    ]


def sample(arch: str, **changes) -> SampleRequest:
    """A request with the architecture's default sampler and guidance, small and short."""
    spec = ARCH_SPECS[arch]
    fields = {
        "index": 0,
        "prompt": PROMPT,
        "negative_prompt": "",
        "width": SIZE,
        "height": SIZE,
        "steps": STEPS,
        "guidance_scale": spec.default_guidance,
        "true_cfg_scale": 1.0,
        "sampler": spec.default_sampler,
        "seed": 7,
        "strength": 1.0,
    }
    fields.update(changes)
    return SampleRequest(**fields)


def render(renderer: Renderer, requests: Sequence[SampleRequest], *, batch_size: int = 1) -> list[np.ndarray]:
    return [np.asarray(image) for _, image in renderer.render(requests, batch_size=batch_size)]


def render_one(renderer: Renderer, request: SampleRequest) -> np.ndarray:
    (image,) = render(renderer, [request])
    return image


def max_difference(first: np.ndarray, second: np.ndarray) -> int:
    return int(np.abs(first.astype(np.int16) - second.astype(np.int16)).max())


def plain_pipeline(folder: Path, lora: Path | None = None) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="reference")  # from the file: keeps lora_alpha
    return pipe


def reference_scheduler(arch: str, sampler: str, pipe: DiffusionPipeline):
    """The scheduler of a plain call. The default sampler is built without sidecar: SDXL's
    `euler_a` is Euler ancestral on the model's own config, the flow models' `flowmatch` is
    the scheduler they ship with; other samplers go through `make_scheduler`."""
    if sampler != ARCH_SPECS[arch].default_sampler:
        return make_scheduler(arch, sampler, pipe.scheduler.config)
    if arch == "sdxl":
        return EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe.scheduler


def plain_call(
    folder: Path,
    arch: str,
    requests: Sequence[SampleRequest],
    *,
    lora: Path | None = None,
    pipe: DiffusionPipeline | None = None,
    **call_arguments,
) -> list[np.ndarray]:
    """One plain diffusers call for `requests` (equal settings): prompts as a list when several."""
    first = requests[0]
    pipe = pipe or plain_pipeline(folder, lora)
    pipe.scheduler = reference_scheduler(arch, first.sampler, pipe)
    single = len(requests) == 1
    if "prompt_embeds" not in call_arguments:
        negatives = [request.negative_prompt for request in requests]
        call_arguments["prompt"] = first.prompt if single else [request.prompt for request in requests]
        call_arguments["negative_prompt"] = (
            (negatives[0] if single else negatives) if any(negatives) else None
        )
    if lora is not None:
        call_arguments[ATTENTION_KWARGS[arch]] = {"scale": first.strength}
    if first.true_cfg_scale != 1.0:
        call_arguments["true_cfg_scale"] = first.true_cfg_scale
    images = pipe(
        height=first.height,
        width=first.width,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(request.seed) for request in requests],
        **call_arguments,
    ).images
    return [np.asarray(image) for image in images]


@pytest.fixture
def new_renderer(tiny_models) -> Callable[[str], Renderer]:
    """A fresh renderer of a tiny model (loading one takes a tenth of a second)."""

    def make(arch: str, **options) -> Renderer:
        return renderer_class(arch).from_model(tiny_models[arch], **options)

    return make


@pytest.fixture(scope="module")
def base_images(tiny_models) -> Callable[[str], np.ndarray]:
    """`base_images(arch)`: the default request rendered by a fresh renderer with no LoRA."""
    images: dict[str, np.ndarray] = {}

    def get(arch: str) -> np.ndarray:
        if arch not in images:
            images[arch] = render_one(renderer_class(arch).from_model(tiny_models[arch]), sample(arch))
        return images[arch]

    return get


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
# LoRA behaviour: it changes the image, swaps, strengths, cached embeddings
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "lora_format"), params(APPLYING))
def test_lora_changes_the_image(arch, lora_format, tiny_lora, new_renderer, base_images):
    renderer = new_renderer(arch)
    report = renderer.apply_lora(tiny_lora(arch, lora_format))
    assert report.injected_total > 0
    image = render_one(renderer, sample(arch))
    mean_change = np.abs(image.astype(np.int16) - base_images(arch).astype(np.int16)).mean()
    assert mean_change > 1.0, f"the LoRA moved pixels by {mean_change:.3f} on average"


@pytest.mark.parametrize(("arch", "lora_format"), params(APPLYING))
def test_hotswapped_lora_equals_freshly_loaded(arch, lora_format, tiny_lora, new_renderer):
    first, second = tiny_lora(arch, lora_format, seed=11), tiny_lora(arch, lora_format, seed=12)
    renderer = new_renderer(arch)
    renderer.apply_lora(first)
    first_image = render_one(renderer, sample(arch))
    report = renderer.apply_lora(second)
    assert report.hotswapped is True
    assert renderer.lora.path == second
    swapped = render_one(renderer, sample(arch))
    fresh = new_renderer(arch)
    fresh.apply_lora(second)
    np.testing.assert_array_equal(swapped, render_one(fresh, sample(arch)))
    assert not np.array_equal(swapped, first_image), "the swap left the first LoRA's weights"


@pytest.mark.parametrize(("arch", "lora_format"), params(APPLYING))
def test_next_checkpoint_of_a_run_is_copied_in_place_without_diffusers_loader(
    arch, lora_format, tiny_lora, new_renderer, monkeypatch
):
    """Same keys, shapes and alphas: the swap copies tensors into the adapter (no model walk)."""
    renderer = new_renderer(arch)
    renderer.apply_lora(tiny_lora(arch, lora_format, seed=11))
    loads: list[dict] = []
    original = renderer.pipe.load_lora_weights
    monkeypatch.setattr(
        renderer.pipe,
        "load_lora_weights",
        lambda *args, **kwargs: loads.append(kwargs) or original(*args, **kwargs),
    )
    report = renderer.apply_lora(tiny_lora(arch, lora_format, seed=12))
    assert report.hotswapped and report.injected_total > 0
    if lora_format == "kohya_sgm":
        # diffusers maps SGM block names to its own only inside its loader: its hot-swap it is.
        assert [kwargs.get("hotswap") for kwargs in loads] == [True]
    else:
        assert loads == []


def test_text_encoder_lora_swaps_through_diffusers(tiny_lora, new_renderer, monkeypatch):
    """Text-encoder weights take diffusers' path (and re-encode the prompts)."""
    renderer = new_renderer("sdxl")
    renderer.apply_lora(tiny_lora("sdxl", seed=11, text_encoder=True))
    loads: list[dict] = []
    original = renderer.pipe.load_lora_weights
    monkeypatch.setattr(
        renderer.pipe,
        "load_lora_weights",
        lambda *args, **kwargs: loads.append(kwargs) or original(*args, **kwargs),
    )
    second = tiny_lora("sdxl", seed=12, text_encoder=True)
    renderer.apply_lora(second)
    assert loads, "a text-encoder LoRA must not be copied in place"
    fresh = new_renderer("sdxl")
    fresh.apply_lora(second)
    np.testing.assert_array_equal(render_one(renderer, sample("sdxl")), render_one(fresh, sample("sdxl")))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("change", [{"alpha": 2.0}, {"rank": 8}], ids=["new-alpha", "new-rank"])
def test_swap_to_lora_with_other_alpha_or_rank_equals_freshly_loaded(arch, change, tiny_lora, new_renderer):
    """Same module count and format, so a hot-swap is tried: its scaling must follow the new file."""
    second = tiny_lora(arch, seed=12, **change)
    renderer = new_renderer(arch)
    renderer.apply_lora(tiny_lora(arch, seed=11))
    renderer.apply_lora(second)
    fresh = new_renderer(arch)
    fresh.apply_lora(second)
    np.testing.assert_array_equal(render_one(renderer, sample(arch)), render_one(fresh, sample(arch)))


@pytest.mark.parametrize("lora_format", TEXT_ENCODER_FORMATS)
def test_swapped_text_encoder_lora_equals_freshly_loaded(lora_format, tiny_lora, new_renderer):
    second = tiny_lora("sdxl", lora_format, seed=12, text_encoder=True)
    renderer = new_renderer("sdxl")
    renderer.apply_lora(tiny_lora("sdxl", lora_format, seed=11, text_encoder=True))
    render_one(renderer, sample("sdxl"))  # fills the embedding cache with the first LoRA's
    renderer.apply_lora(second)
    fresh = new_renderer("sdxl")
    fresh.apply_lora(second)
    np.testing.assert_array_equal(render_one(renderer, sample("sdxl")), render_one(fresh, sample("sdxl")))


STRENGTH_CASES = (
    *((arch, fmt, False) for arch, fmt in APPLYING),
    ("sdxl", "peft", True),
    ("sdxl", "kohya", True),
)


def strength_id(case: tuple) -> str:
    arch, fmt, text_encoder = case
    return f"{arch}-{fmt}" + ("-text-encoder" if text_encoder else "")


@pytest.mark.parametrize(
    ("arch", "lora_format", "text_encoder"),
    STRENGTH_CASES,
    ids=[strength_id(case) for case in STRENGTH_CASES],
)
def test_strength_changes_between_samples_leave_the_adapter_untouched(
    arch, lora_format, text_encoder, tiny_lora, new_renderer, base_images
):
    """0.0 renders the base exactly; a 1.0 after it equals a 1.0-only render; 0.0 again is the base."""
    lora = tiny_lora(arch, lora_format, text_encoder=text_encoder)
    renderer = new_renderer(arch)
    renderer.apply_lora(lora)
    at_zero = render_one(renderer, sample(arch, strength=0.0))
    at_one = render_one(renderer, sample(arch, strength=1.0))
    at_zero_again = render_one(renderer, sample(arch, strength=0.0))
    fresh = new_renderer(arch)
    fresh.apply_lora(lora)
    np.testing.assert_array_equal(at_zero, base_images(arch))
    np.testing.assert_array_equal(at_one, render_one(fresh, sample(arch, strength=1.0)))
    np.testing.assert_array_equal(at_zero_again, base_images(arch))


class CountingEncoder:
    """Wraps a renderer's `encode` and counts the calls."""

    def __init__(self, renderer: Renderer) -> None:
        self.encode = renderer.encode
        self.calls = 0

    def __call__(self, *arguments, **options):
        self.calls += 1
        return self.encode(*arguments, **options)


@pytest.mark.parametrize(
    ("arch", "text_encoder"),
    [("sdxl", False), ("sd3", False), ("flux", False), ("sdxl", True)],
    ids=["sdxl", "sd3", "flux", "sdxl-text-encoder"],
)
def test_cached_embeddings_equal_fresh_ones(arch, text_encoder, tiny_lora, new_renderer, monkeypatch):
    renderer = new_renderer(arch)
    renderer.apply_lora(tiny_lora(arch, text_encoder=text_encoder))
    counter = CountingEncoder(renderer)
    monkeypatch.setattr(renderer, "encode", counter)
    request = sample(arch, negative_prompt="" if arch == "flux" else "blurry")
    first = render_one(renderer, request)
    second = render_one(renderer, request)
    assert counter.calls == 1, "the second render encoded the prompt again"
    np.testing.assert_array_equal(second, first)
    cached = {key: dict(value) for key, value in renderer._embeddings.items()}
    assert cached, "nothing was cached"
    renderer._embeddings.clear()
    np.testing.assert_array_equal(render_one(renderer, request), first)
    assert counter.calls == 2
    assert renderer._embeddings.keys() == cached.keys()
    for key, fields in cached.items():
        for name, value in fields.items():
            fresh = renderer._embeddings[key][name]
            assert (value is None and fresh is None) or torch.equal(value, fresh), name


@pytest.mark.parametrize(
    ("text_encoder", "encodes_again"),
    [(False, False), (True, True)],
    ids=["unet-lora-keeps-embeddings", "text-encoder-lora-encodes-again"],
)
def test_lora_swap_reencodes_prompts_only_for_text_encoder_loras(
    text_encoder, encodes_again, tiny_lora, new_renderer, monkeypatch
):
    renderer = new_renderer("sdxl")
    renderer.apply_lora(tiny_lora("sdxl", seed=11, text_encoder=text_encoder))
    counter = CountingEncoder(renderer)
    monkeypatch.setattr(renderer, "encode", counter)
    render_one(renderer, sample("sdxl"))
    renderer.apply_lora(tiny_lora("sdxl", seed=12, text_encoder=text_encoder))
    render_one(renderer, sample("sdxl"))
    assert counter.calls == (2 if encodes_again else 1)


@pytest.mark.parametrize("lora_format", TEXT_ENCODER_FORMATS)
def test_text_encoder_lora_reencodes_prompts(lora_format, tiny_models, tiny_lora, new_renderer):
    """The text-encoder part takes effect (the UNet part is the unet-only file's, same seed)
    and is scaled with the strength, as in a plain call."""
    with_text_encoder = tiny_lora("sdxl", lora_format, text_encoder=True)
    renderer = new_renderer("sdxl")
    report = renderer.apply_lora(with_text_encoder)
    assert report.lora.has_text_encoder is True
    assert report.injected.get("text_encoder", 0) > 0
    assert report.injected.get("text_encoder_2", 0) > 0
    full, half = render(renderer, [sample("sdxl"), sample("sdxl", index=1, strength=0.5)])

    unet_only = new_renderer("sdxl")
    assert unet_only.apply_lora(tiny_lora("sdxl", lora_format)).lora.has_text_encoder is False
    assert not np.array_equal(full, render_one(unet_only, sample("sdxl")))

    folder = tiny_models["sdxl"]
    (reference,) = plain_call(folder, "sdxl", [sample("sdxl")], lora=with_text_encoder)
    np.testing.assert_array_equal(full, reference)
    (reference_half,) = plain_call(folder, "sdxl", [sample("sdxl", strength=0.5)], lora=with_text_encoder)
    np.testing.assert_array_equal(half, reference_half)


# ---------------------------------------------------------------------------------
# LoRAs that must not apply, and files that must not be read
# ---------------------------------------------------------------------------------

# (base, LoRA architecture, LoRA format)
WRONG_ARCH = (
    ("sdxl", "flux", "peft"),
    ("sdxl", "flux", "kohya"),
    ("sdxl", "sd3", "peft"),
    ("sdxl", "sd3", "kohya"),
    ("sd3", "sdxl", "peft"),
    ("sd3", "sdxl", "kohya"),
    ("sd3", "sdxl", "kohya_sgm"),
    ("sd3", "flux", "kohya"),
    ("sd3", "flux", "peft"),
    ("flux", "sdxl", "peft"),
    ("flux", "sdxl", "kohya"),
    ("flux", "sdxl", "kohya_sgm"),
    ("flux", "sd3", "kohya"),
    ("flux", "sd3", "peft"),
)


@pytest.mark.parametrize(("base", "lora_arch", "lora_format"), params(WRONG_ARCH))
def test_wrong_architecture_lora_raises_lora_error(
    base, lora_arch, lora_format, tiny_lora, new_renderer, base_images
):
    renderer = new_renderer(base)
    with pytest.raises(LoraError) as error:
        renderer.apply_lora(tiny_lora(lora_arch, lora_format))
    assert ARCH_SPECS[base].label in str(error.value)
    assert renderer.lora is None
    np.testing.assert_array_equal(render_one(renderer, sample(base)), base_images(base))


# Wrong-architecture LoRAs whose key names tell their architecture (`guess_arch` is not None).
NAMED_ARCH_CASES = (
    ("sdxl", "flux", "peft"),
    ("sdxl", "flux", "kohya"),
    ("sdxl", "sd3", "kohya"),
    ("sd3", "sdxl", "peft"),
    ("sd3", "sdxl", "kohya"),
    ("sd3", "flux", "kohya"),
    ("flux", "sdxl", "peft"),
    ("flux", "sdxl", "kohya"),
    ("flux", "sd3", "kohya"),
)


@pytest.mark.parametrize(("base", "lora_arch", "lora_format"), params(NAMED_ARCH_CASES))
def test_wrong_architecture_error_names_the_loras_architecture(
    base, lora_arch, lora_format, tiny_lora, new_renderer
):
    """Where the key names tell the LoRA's architecture, the error says so, next to the base's."""
    with pytest.raises(LoraError) as error:
        new_renderer(base).apply_lora(tiny_lora(lora_arch, lora_format))
    message = str(error.value)
    assert ARCH_SPECS[base].label in message
    assert ARCH_SPECS[lora_arch].label in message


@pytest.mark.parametrize(("arch", "lora_format"), params(NOT_APPLYING))
def test_lora_that_diffusers_ignores_raises_did_not_apply(arch, lora_format, tiny_lora, new_renderer):
    with pytest.raises(LoraError, match="did not apply") as error:
        new_renderer(arch).apply_lora(tiny_lora(arch, lora_format))
    assert "0 of" in str(error.value)


# (base, LoRA architecture, LoRA format): every way an apply fails.
FAILING_APPLIES = (
    *((arch, arch, fmt) for arch, fmt in NOT_APPLYING),
    ("sdxl", "flux", "kohya"),  # peft raises while loading
    ("flux", "sdxl", "kohya"),  # diffusers' converter raises
    ("sd3", "sdxl", "peft"),  # loads, injects nothing
)


def adapter_names(renderer: Renderer) -> set[str]:
    return {name for names in renderer.pipe.get_list_adapters().values() for name in names}


@pytest.mark.parametrize(("base", "lora_arch", "lora_format"), params(FAILING_APPLIES))
def test_failed_apply_leaves_no_adapter_and_renders_the_base(
    base, lora_arch, lora_format, tiny_lora, new_renderer, base_images
):
    renderer = new_renderer(base)
    with pytest.raises(LoraError):
        renderer.apply_lora(tiny_lora(lora_arch, lora_format))
    assert renderer.lora is None
    assert adapter_names(renderer) == set()
    np.testing.assert_array_equal(render_one(renderer, sample(base)), base_images(base))


@pytest.mark.parametrize(("base", "lora_arch", "lora_format"), params(FAILING_APPLIES))
def test_failed_apply_after_a_lora_keeps_the_renderer_consistent(
    base, lora_arch, lora_format, tiny_lora, new_renderer, base_images
):
    """`renderer.lora` tells what renders after the failure, and the next LoRA applies cleanly."""
    previous, following = tiny_lora(base, seed=11), tiny_lora(base, seed=12)
    renderer = new_renderer(base)
    renderer.apply_lora(previous)
    previous_image = render_one(renderer, sample(base))
    with pytest.raises(LoraError):
        renderer.apply_lora(tiny_lora(lora_arch, lora_format))
    after_failure = render_one(renderer, sample(base))
    if renderer.lora is None:
        np.testing.assert_array_equal(after_failure, base_images(base))
    else:
        assert renderer.lora.path == previous
        np.testing.assert_array_equal(after_failure, previous_image)
    renderer.apply_lora(following)
    fresh = new_renderer(base)
    fresh.apply_lora(following)
    np.testing.assert_array_equal(render_one(renderer, sample(base)), render_one(fresh, sample(base)))


class TouchOnUnpickle:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".CKPT"])
def test_pickle_lora_is_refused_and_never_loaded(suffix, tmp_path, new_renderer, monkeypatch):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"x{suffix}"
    path.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": TouchOnUnpickle(marker)}))

    def refuse(*arguments, **options):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    renderer = new_renderer("sdxl")
    with pytest.raises(CheckpointError, match="pickle"):
        renderer.apply_lora(path)
    assert not marker.exists()
    assert renderer.lora is None


def corrupt_copies(good: Path, folder: Path) -> dict[str, Path]:
    data = good.read_bytes()
    contents = {
        "truncated": data[: len(data) // 2],
        "header-only": data[:20],
        "garbage": b"not a safetensors file" * 8,
        "empty": b"",
    }
    paths = {}
    for name, content in contents.items():
        paths[name] = folder / f"{name}.safetensors"
        paths[name].write_bytes(content)
    return paths


@pytest.mark.parametrize("damage", ["truncated", "header-only", "garbage", "empty"])
def test_corrupt_safetensors_raises_checkpoint_error(damage, tmp_path, tiny_lora, new_renderer, base_images):
    path = corrupt_copies(tiny_lora("sdxl"), tmp_path)[damage]
    renderer = new_renderer("sdxl")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        renderer.apply_lora(path)
    assert renderer.lora is None
    np.testing.assert_array_equal(render_one(renderer, sample("sdxl")), base_images("sdxl"))


def test_safetensors_without_lora_keys_raises_checkpoint_error(tiny_models, new_renderer):
    # A base-model component: real weights, no LoRA.
    (weights,) = (tiny_models["sdxl"] / "text_encoder").glob("*.safetensors")
    with pytest.raises(CheckpointError, match="holds no LoRA weights"):
        new_renderer("sdxl").apply_lora(weights)


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
    with pytest.raises(KeyError, match="flux, sd3, sdxl"):
        renderer_class("sd15")


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
