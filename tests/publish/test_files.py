"""Sample files: paths, atomic writes, A1111 infotext in PNG / JPEG / WebP."""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path

import pytest
from factories import sample_request
from PIL import Image

from sidecar.confined import ConfinedFolder, UnsafeEntryError
from sidecar.errors import ConfigError, TransientError
from sidecar.plan.request import SampleRequest
from sidecar.publish import files as output
from sidecar.publish.files import (
    NOTE_PREFIX,
    SamplePaths,
    SampleWriteError,
    link_sample,
    remove_stale_temp_files,
    sample_paths,
    step_dir,
    write_sample,
)
from sidecar.publish.infotext import infotext, read_infotext

SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"

REQUEST = sample_request(
    index=3, prompt="photo of sks dog, on a beach", negative_prompt="blurry, lowres", width=1024, height=768
)


def _image(mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, (32, 24))
    image.putpixel((1, 1), (200, 10, 10) if mode == "RGB" else (200, 10, 10, 128))
    return image


def _write(tmp_path: Path, request: SampleRequest = REQUEST, **kwargs) -> SamplePaths:
    options = {"base_model": SDXL_MODEL, "lora_name": "my_lora_000000500.safetensors", "arch": "sdxl"}
    options.update(kwargs)
    return write_sample(tmp_path, 500, request, _image(), **options)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------


def test_paths_follow_the_step_and_index_layout(tmp_path):
    assert step_dir(tmp_path, 500) == tmp_path / "step_000500"
    assert sample_paths(tmp_path, 500, 3, "png") == SamplePaths(
        tmp_path / "step_000500" / "sample_03.png", tmp_path / "step_000500" / "sample_03.txt"
    )
    assert sample_paths(tmp_path, 0, 12, "JPEG").image.name == "sample_12.jpg"
    assert sample_paths(tmp_path, 0, 0, "webp").image.name == "sample_00.webp"


def test_bad_format_step_or_index_raise_naming_the_argument(tmp_path):
    with pytest.raises(ConfigError, match=r"`format` must be one of .*got 'gif'"):
        sample_paths(tmp_path, 1, 0, "gif")
    with pytest.raises(ValueError, match="`step`"):
        step_dir(tmp_path, -1)
    with pytest.raises(ValueError, match="`index`"):
        sample_paths(tmp_path, 1, -2, "png")


# ---------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_format", "suffix", "pil_format"),
    [("png", ".png", "PNG"), ("jpg", ".jpg", "JPEG"), ("webp", ".webp", "WEBP")],
)
def test_write_sample_lands_at_its_paths(tmp_path, image_format, suffix, pil_format):
    paths = _write(tmp_path, image_format=image_format)
    assert paths == sample_paths(tmp_path, 500, REQUEST.index, image_format)
    assert paths.image.suffix == suffix
    with Image.open(paths.image) as image:
        assert image.format == pil_format and image.size == (32, 24)
    assert paths.text.read_text(encoding="utf-8") == REQUEST.prompt + "\n"
    assert sorted(p.name for p in paths.image.parent.iterdir()) == sorted([paths.image.name, paths.text.name])


def test_text_is_written_before_the_image(tmp_path, monkeypatch):
    order = []
    real_replace = os.replace
    monkeypatch.setattr(
        output.os,
        "replace",
        lambda src, dst, **dirs: (order.append(Path(dst).suffix), real_replace(src, dst, **dirs)),
    )
    _write(tmp_path)
    assert order == [".txt", ".png"]


def test_failed_rename_leaves_no_image_and_no_temp_file(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace_text_only(src, dst, **dirs):
        if str(dst).endswith(".png"):
            raise OSError("disk full")
        real_replace(src, dst, **dirs)

    monkeypatch.setattr(output.os, "replace", replace_text_only)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path)
    paths = sample_paths(tmp_path, 500, REQUEST.index, "png")
    assert not paths.image.exists()
    assert _temp_files(tmp_path) == []


def test_crash_while_encoding_leaves_no_image(tmp_path, monkeypatch):
    def half_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half an image")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(Image.Image, "save", half_save)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        _write(tmp_path)
    assert not sample_paths(tmp_path, 500, REQUEST.index, "png").image.exists()
    assert _temp_files(tmp_path) == []


def test_failed_rewrite_keeps_the_previous_complete_sample(tmp_path, monkeypatch):
    first = _write(tmp_path)
    before = first.image.read_bytes()
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: (fp.write(b"partial"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        _write(tmp_path, replace(REQUEST, prompt="another prompt"))
    assert first.image.read_bytes() == before


def test_temp_files_of_a_killed_process_are_removed_at_startup(tmp_path):
    folder = step_dir(tmp_path, 500)
    folder.mkdir(parents=True)
    leftovers = [folder / ".sample_03.png.0a1b2c3d4e5f.tmp", folder / ".sample_03.txt.00ff00ff00ff.tmp"]
    keep = [folder / "sample_03.png", folder / "notes.tmp", folder / ".hidden", tmp_path / "readme.txt"]
    for path in (*leftovers, *keep):
        path.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == 2
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in keep)
    assert remove_stale_temp_files(tmp_path) == 0
    assert remove_stale_temp_files(tmp_path / "missing") == 0


def test_a_temp_file_left_by_a_kill_is_recognised_as_stale(tmp_path, monkeypatch):
    def killed(src, dst, **dirs):
        raise KeyboardInterrupt

    monkeypatch.setattr(output.os, "replace", killed)
    monkeypatch.setattr(ConfinedFolder, "unlink", lambda self, name: False)  # a kill skips the cleanup
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path)
    monkeypatch.undo()
    left = _temp_files(tmp_path)
    assert len(left) == 1 and left[0].read_bytes() == (REQUEST.prompt + "\n").encode()
    assert remove_stale_temp_files(tmp_path) == 1
    assert _temp_files(tmp_path) == []


def test_rewriting_a_sample_replaces_it(tmp_path):
    _write(tmp_path, replace(REQUEST, prompt="first prompt"))
    paths = _write(tmp_path, replace(REQUEST, prompt="second prompt"))
    files = sorted(p.name for p in paths.image.parent.iterdir())
    assert files == ["sample_03.png", "sample_03.txt"]
    assert paths.text.read_text(encoding="utf-8") == "second prompt\n"
    assert read_infotext(paths.image).startswith("second prompt\n")


def test_written_files_get_normal_permissions(tmp_path):
    paths = _write(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert paths.image.stat().st_mode & 0o777 == 0o666 & ~umask


def test_rgba_images_are_saved_as_jpeg_and_webp(tmp_path):
    for image_format in ("jpg", "webp"):
        paths = write_sample(
            tmp_path,
            1,
            REQUEST,
            _image("RGBA"),
            image_format=image_format,
            base_model="m",
            lora_name=None,
            arch="sdxl",
        )
        assert read_infotext(paths.image) is not None


# ---------------------------------------------------------------------------------
# Round trip through the files
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
@pytest.mark.parametrize(
    "prompt", ["photo of sks dog, on a beach", "東京の夜景, ネオン\nsecond line: “quotes” é"]
)
def test_infotext_round_trips(tmp_path, image_format, prompt):
    request = replace(REQUEST, prompt=prompt)
    paths = _write(tmp_path, request, image_format=image_format)
    expected = infotext(
        request, base_model=SDXL_MODEL, lora_name="my_lora_000000500.safetensors", step=500, arch="sdxl"
    )
    assert read_infotext(paths.image) == expected
    assert paths.text.read_text(encoding="utf-8") == prompt + "\n"


@pytest.mark.parametrize("image_format", ["jpg", "webp"])
def test_exif_user_comment_is_stored_as_a1111_does(tmp_path, image_format):
    """piexif `UserComment.dump(encoding="unicode")`: `UNICODE\\0` then UTF-16 big-endian."""
    paths = _write(tmp_path, image_format=image_format)
    with Image.open(paths.image) as image:
        raw = image.getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\x00"
    assert raw[8:].decode("utf-16-be") == read_infotext(paths.image)


def test_png_uses_the_parameters_text_chunk(tmp_path):
    paths = _write(tmp_path)
    with Image.open(paths.image) as image:
        assert image.info["parameters"] == read_infotext(paths.image)


def test_read_infotext_of_an_image_without_metadata_is_none(tmp_path):
    for name in ("plain.png", "plain.jpg", "plain.webp"):
        _image().save(tmp_path / name)
        assert read_infotext(tmp_path / name) is None


# --- never through a symlink; transient write errors -----------------------------------------


def test_a_step_folder_that_is_a_symlink_is_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "step_000500").symlink_to(victim)
    with pytest.raises(UnsafeEntryError, match=r"step_000500` is a symbolic link"):
        _write(samples)
    assert list(victim.iterdir()) == []


def test_temp_files_are_not_cleaned_through_a_linked_step_folder(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / ".sample_03.png.0a1b2c3d4e5f.tmp").write_bytes(b"not sidecar's")
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "step_000500").symlink_to(victim)
    assert remove_stale_temp_files(samples) == 0
    assert (victim / ".sample_03.png.0a1b2c3d4e5f.tmp").exists()


class FailingWrites:
    """`os.replace` that fails with `errno` for the first `times` calls (a full disk that frees)."""

    def __init__(self, monkeypatch, error: int, times: int) -> None:
        self.left = times
        self.error = error
        self.real = os.replace
        monkeypatch.setattr(output.os, "replace", self)

    def __call__(self, src, dst, **dirs):
        if self.left > 0:
            self.left -= 1
            raise OSError(self.error, os.strerror(self.error))
        return self.real(src, dst, **dirs)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO, errno.EBUSY], ids=["ENOSPC", "EIO", "EBUSY"])
def test_a_transient_write_error_is_retried_and_leaves_nothing_half_written(tmp_path, monkeypatch, error):
    FailingWrites(monkeypatch, error, times=2)
    waits: list[float] = []
    paths = _write(tmp_path, retry_seconds=(0.5, 1.0, 2.0), sleep=waits.append)
    assert waits == [0.5, 1.0]
    assert read_infotext(paths.image).startswith(REQUEST.prompt)
    assert _temp_files(tmp_path) == []


def test_a_write_error_that_does_not_pass_is_a_transient_error_and_nothing_is_left(tmp_path, monkeypatch):
    FailingWrites(monkeypatch, errno.ENOSPC, times=100)
    waits: list[float] = []
    with pytest.raises(SampleWriteError, match=r"No space left on device \(tried 3 times\)") as info:
        _write(tmp_path, retry_seconds=(0.5, 1.0), sleep=waits.append)
    assert isinstance(info.value, TransientError)
    assert waits == [0.5, 1.0]
    assert not sample_paths(tmp_path, 500, REQUEST.index, "png").image.exists()
    assert _temp_files(tmp_path) == []


def test_other_write_errors_are_not_retried(tmp_path, monkeypatch):
    FailingWrites(monkeypatch, errno.EACCES, times=1)
    with pytest.raises(PermissionError):
        _write(tmp_path, sleep=lambda seconds: pytest.fail("retried a permission error"))


def test_a_sample_linked_from_an_identical_step_shares_its_image_and_says_so(tmp_path):
    first = _write(tmp_path)
    linked = link_sample(tmp_path, 600, REQUEST, first.image, note="same bytes as step_000500")
    assert linked is not None
    assert linked.image == step_dir(tmp_path, 600) / "sample_03.png"
    assert linked.image.stat().st_ino == first.image.stat().st_ino
    note_line = f"{NOTE_PREFIX}same bytes as step_000500\n"
    assert linked.text.read_text(encoding="utf-8") == f"{REQUEST.prompt}\n{note_line}"
    assert link_sample(tmp_path, 700, REQUEST, tmp_path / "step_000100" / "sample_03.png", note="x") is None
    assert link_sample(tmp_path, 500, REQUEST, first.image, note="x") == first  # a final at the same step
