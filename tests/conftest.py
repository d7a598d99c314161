"""Shared pytest fixtures. Each block says which tests own it; append new blocks below."""

from __future__ import annotations

# ---------------------------------------------------------------------------------
# Tiny models and LoRA files (owned by test_tiny.py, test_lora.py, test_pipelines.py).
# Each model is built once per test session; each LoRA file is written once.
# ---------------------------------------------------------------------------------
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def quiet_diffusers() -> None:
    """diffusers and transformers log a line (and a progress bar) per component loaded."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session", autouse=True)
def single_threaded_torch():
    """One intra-op thread while the tiny models render, restored afterwards.

    Their matrices are too small to gain from threads, and on a shared 2-core runner
    OpenMP's spin-waiting made a 2-step SDXL render take 0.03 s to 8 s at random.
    Results stay comparable: references are computed in the same process.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, quiet_diffusers, single_threaded_torch) -> dict[str, Path]:
    """`{arch: folder}`: the shallow tiny SDXL, SD 3.5 and Flux models, saved as diffusers folders."""
    from sidecar.testing.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny_model(arch, root / f"tiny-{arch}") for arch in ("sdxl", "sd3", "flux")}


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, tiny_models) -> Callable[..., Path]:
    """`tiny_lora(arch, lora_format="peft", **write_lora_options) -> Path`, each file written once.

    The options are those of `sidecar.tiny.write_lora` (rank, alpha, seed, scale, text_encoder,
    metadata); equal arguments give the same file.
    """
    from sidecar.testing.loras import write_lora

    root = tmp_path_factory.mktemp("tiny-loras")
    written: dict[tuple, Path] = {}

    def make(arch: str, lora_format: str = "peft", **options) -> Path:
        key = (arch, lora_format, *sorted((name, repr(value)) for name, value in options.items()))
        if key not in written:
            path = root / f"{arch}-{lora_format}-{len(written)}.safetensors"
            written[key] = write_lora(tiny_models[arch], arch, path, lora_format=lora_format, **options)
        return written[key]

    return make


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_models) -> Path:
    """The shallow tiny SDXL folder (the daemon and fault tests render with it)."""
    return tiny_models["sdxl"]


# --- end of the tiny-model block ---------------------------------------------------


# ---------------------------------------------------------------------------------
# Wide models: real layer widths, few blocks (owned by tests/render/test_formats_*.py).
# Each is built once per session (a few seconds, 0.8-2.5 GB on disk) when a test asks for it.
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory, quiet_diffusers, single_threaded_torch) -> Callable[..., Path]:
    """`wide_model(arch, sd3_variant="medium") -> folder`, see `sidecar.testing.wide`."""
    from sidecar.testing.wide import save_wide_model

    root = tmp_path_factory.mktemp("wide-models")

    def get(arch: str, sd3_variant: str = "medium") -> Path:
        name = f"wide-{arch}" if arch != "sd3" else f"wide-sd3-{sd3_variant}"
        return save_wide_model(arch, root / name, sd3_variant=sd3_variant)

    return get


# --- end of the wide-model block ---------------------------------------------------


# ---------------------------------------------------------------------------------
# The newer architectures' tiny models and LoRA files (owned by tests/render/test_sd15.py,
# test_chroma.py, test_flux_kontext.py, test_flux2.py, test_qwen_image.py, test_zimage.py).
# Each model is built once per session, when a test first asks for it (0.1-1 s each).
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_arch_model(tmp_path_factory, quiet_diffusers, single_threaded_torch) -> Callable[[str], Path]:
    """`tiny_arch_model(arch) -> folder`: the shallow tiny model of any architecture, built on first use."""
    from sidecar.testing.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-arch-models")

    def get(arch: str) -> Path:
        return save_tiny_model(arch, root / f"tiny-{arch}")  # type: ignore[arg-type]

    return get


@pytest.fixture(scope="session")
def tiny_arch_lora(tmp_path_factory, tiny_arch_model) -> Callable[..., Path]:
    """`tiny_arch_lora(arch, lora_format="peft", **options) -> Path`: `sidecar.testing.loras_more`
    files, each written once (equal arguments give the same file)."""
    from sidecar.testing.loras_more import write_more_lora

    root = tmp_path_factory.mktemp("tiny-arch-loras")
    written: dict[tuple, Path] = {}

    def make(arch: str, lora_format: str = "peft", **options) -> Path:
        key = (arch, lora_format, *sorted((name, repr(value)) for name, value in options.items()))
        if key not in written:
            path = root / f"{arch}-{lora_format}-{len(written)}.safetensors"
            folder = tiny_arch_model(arch)
            written[key] = write_more_lora(folder, arch, path, lora_format=lora_format, **options)
        return written[key]

    return make


# --- end of the newer-architecture block -------------------------------------------


# ---------------------------------------------------------------------------------
# Quiet imports (owned by tests/render/test_notices.py): what torchao logs when transformers
# imports it (kernels for GPUs this machine lacks) is dropped, as the CLI does; every other
# warning still shows. At import, not in a hook: the stage conftests below import diffusers
# before pytest configures the session.
# ---------------------------------------------------------------------------------
from sidecar.render.notices import quiet_import_notices  # noqa: E402 (the block's own import)

quiet_import_notices()
