"""Fixtures of the render-stage tests: fresh renderers of the tiny models, and their base images."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from diffusers_reference import render_one, sample

from sidecar.render.base import Renderer
from sidecar.render.registry import renderer_class


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
