"""LoRA swapping (`sidecar.render.adapters.swap`), checked against diffusers loading the same file.

A LoRA must change the image, a swapped LoRA must equal one freshly loaded, strengths and
cached embeddings must not leak between checkpoints, and a LoRA that does not apply, a
pickle or a corrupt file must be refused, leaving the base model clean.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers_reference import (
    ARCHS,
    NOT_APPLYING,
    SIDECAR_APPLYING,
    TEXT_ENCODER_FORMATS,
    params,
    plain_call,
    render,
    render_one,
    sample,
)

from sidecar.arch import ARCH_SPECS
from sidecar.errors import CheckpointError, LoraError
from sidecar.render.base import Renderer

# diffusers 0.42 schedulers mix numpy and tensors in ways numpy 2 flags on every step.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array:DeprecationWarning"),
    # The `dpmsolver` samplers use an algorithm type diffusers deprecates (schedulers.py says why).
    pytest.mark.filterwarnings("ignore:`algorithm_types dpmsolver:FutureWarning"),
]

# ---------------------------------------------------------------------------------
# LoRA behaviour: it changes the image, swaps, strengths, cached embeddings
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "lora_format"), params(SIDECAR_APPLYING))
def test_lora_changes_the_image(arch, lora_format, tiny_lora, new_renderer, base_images):
    renderer = new_renderer(arch)
    report = renderer.apply_lora(tiny_lora(arch, lora_format))
    assert report.injected_total > 0
    image = render_one(renderer, sample(arch))
    mean_change = np.abs(image.astype(np.int16) - base_images(arch).astype(np.int16)).mean()
    assert mean_change > 1.0, f"the LoRA moved pixels by {mean_change:.3f} on average"


@pytest.mark.parametrize(("arch", "lora_format"), params(SIDECAR_APPLYING))
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


@pytest.mark.parametrize(("arch", "lora_format"), params(SIDECAR_APPLYING))
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
    *((arch, fmt, False) for arch, fmt in SIDECAR_APPLYING),
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


# Wrong-architecture LoRAs whose key names tell their architecture (`guess_lora_arch` is not None).
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
