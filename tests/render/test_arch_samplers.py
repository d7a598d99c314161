"""Every sampler the newer architectures' tables offer renders on their tiny models, and one their
pipeline cannot drive is refused with the valid names (no silent fallback)."""

from __future__ import annotations

import pytest
from arch_reference import new_renderer, render_one, sample

from sidecar.errors import SamplerError
from sidecar.samplers import sampler_names, validate_sampler

ARCHS = ("sd15", "chroma", "flux_kontext", "flux2", "flux2_klein", "qwen_image", "zimage")
CASES = [(arch, name) for arch in ARCHS for name in sampler_names(arch)]


@pytest.mark.parametrize(("arch", "sampler"), CASES, ids=[f"{arch}-{name}" for arch, name in CASES])
def test_every_offered_sampler_renders(arch, sampler, tiny_arch_model):
    image = render_one(new_renderer(arch, tiny_arch_model(arch)), sample(arch, sampler=sampler))
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_a_sampler_the_pipeline_cannot_drive_is_refused_with_the_valid_names():
    """Chroma's, Kontext's and Qwen-Image's pipelines hand the scheduler sigmas flow DPM-Solver does
    not take; Z-Image's are a list flow UniPC cannot scale."""
    with pytest.raises(
        SamplerError,
        match=r"not offered for chroma.*Valid samplers for chroma \(Chroma\): euler_a, flowmatch, unipc",
    ):
        validate_sampler("chroma", "dpmpp_2m")
    with pytest.raises(SamplerError, match=r"Valid samplers for zimage \(Z-Image\): euler_a, flowmatch \("):
        validate_sampler("zimage", "unipc")
    assert validate_sampler("flux2", "dpmpp_2m") == "dpmpp_2m"
