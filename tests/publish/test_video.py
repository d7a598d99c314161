"""Video samples: animated WebP + H.264 MP4 + `.txt`, atomic, with their settings where each can hold them."""

from __future__ import annotations

import dataclasses
import errno
import io
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from sidecar.cli import main
from sidecar.errors import SidecarError
from sidecar.plan.request import SampleRequest
from sidecar.publish.catalog import find_samples, read_sample_info
from sidecar.publish.files import SampleWriteError, remove_stale_temp_files, write_sample
from sidecar.publish.gallery import build_gallery
from sidecar.publish.grids import compare_grid, write_step_grid
from sidecar.publish.infotext import read_infotext
from sidecar.publish.step import publish_step
from sidecar.publish.video import (
    animation_fps,
    frame_count,
    frame_index,
    load_frame,
    load_frames,
    write_video_sample,
)

REQUEST = SampleRequest(
    index=3,
    prompt="a fox, running",
    negative_prompt="blurry",
    width=48,
    height=32,
    steps=2,
    guidance_scale=5.0,
    true_cfg_scale=1.0,
    sampler="flowmatch",
    seed=7,
    strength=0.8,
    num_frames=5,
    fps=8,
)
LABELS = {"base_model": "/models/Wan2.1-T2V-1.3B-Diffusers", "lora_name": "my_lora_000000500.safetensors"}


def frames(count: int = 5, size: tuple[int, int] = (48, 32)) -> list[Image.Image]:
    """Frames of flat colours far apart, so lossy codecs keep them recognisable."""
    return [Image.new("RGB", size, (40 * i + 20, 200 - 40 * i, 90)) for i in range(count)]


def write(tmp_path: Path, **options):
    return write_video_sample(tmp_path, 500, REQUEST, frames(), arch="wan", **LABELS, **options)


def test_a_video_sample_is_an_animated_webp_an_mp4_and_its_txt(tmp_path):
    paths = write(tmp_path)
    folder = tmp_path / "step_000500"
    assert sorted(p.name for p in folder.iterdir()) == ["sample_03.mp4", "sample_03.txt", "sample_03.webp"]
    assert paths.image == folder / "sample_03.webp" and paths.video == folder / "sample_03.mp4"
    assert frame_count(paths.image) == 5
    assert animation_fps(paths.image) == 8
    with Image.open(paths.image) as image:
        assert image.info.get("loop") == 0  # loops forever
    for number, frame in enumerate(load_frames(paths.image)):
        expected = np.asarray(frames()[number], dtype=int)
        assert np.abs(np.asarray(frame, dtype=int) - expected).max() < 12
    with av.open(str(paths.video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.width, stream.height, stream.average_rate) == (48, 32, 8)
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == 5
    for number, frame in enumerate(decoded):
        assert np.abs(frame.astype(int) - np.asarray(frames()[number], dtype=int)).max() < 12


def test_the_settings_frames_and_fps_go_where_each_container_holds_them(tmp_path):
    paths = write(tmp_path)
    text = read_infotext(paths.image)  # the WebP's EXIF UserComment, as A1111 writes it
    assert text.startswith("a fox, running\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, CFG scale: 5")
    assert text.endswith("Frames: 5, FPS: 8")
    assert "Lora: my_lora_000000500.safetensors, Lora strength: 0.8, Step: 500" in text
    with av.open(str(paths.video)) as container:
        assert container.metadata["comment"] == text
    assert paths.text.read_text(encoding="utf-8") == text + "\n"  # the .txt always has it
    info = read_sample_info(paths.image)
    assert info.prompt == "a fox, running"
    assert (info.params["Frames"], info.params["FPS"], info.seed) == ("5", "8", "7")


def test_odd_sizes_are_padded_for_h264(tmp_path):
    paths = write_video_sample(
        tmp_path, 1, REQUEST, frames(size=(33, 17)), arch="wan", base_model="m", lora_name=None
    )
    with av.open(str(paths.video)) as container:
        assert (container.streams.video[0].width, container.streams.video[0].height) == (34, 18)
    assert Image.open(paths.image).size == (33, 17)


def test_frames_are_chosen_by_name_or_index(tmp_path):
    paths = write(tmp_path)
    assert [frame_index(choice, 5) for choice in ("first", "middle", "last", 1)] == [0, 2, 4, 1]
    middle = np.asarray(load_frame(paths.image, "middle"), dtype=int)
    assert np.abs(middle - np.asarray(frames()[2], dtype=int)).max() < 12
    with pytest.raises(ValueError, match="`frame` must be one of first, middle, last"):
        frame_index("centre", 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`frame` must be in 0\.\.4, got 5"):
        frame_index(5, 5)
    still = tmp_path / "still.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(still)
    assert frame_count(still) == 1 and load_frame(still, "last").getpixel((0, 0)) == (1, 2, 3)


def test_a_full_disk_leaves_no_half_file_and_is_retried(tmp_path, monkeypatch):
    import sidecar.publish.video as video

    calls = {"n": 0}
    real = video.encode_mp4

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(video, "encode_mp4", flaky)
    paths = write(tmp_path, retry_seconds=[0.0], sleep=lambda seconds: None)
    assert paths.video.is_file() and frame_count(paths.image) == 5
    assert not [p for p in (tmp_path / "step_000500").iterdir() if p.name.startswith(".")]

    monkeypatch.setattr(video, "encode_mp4", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(SampleWriteError, match="nothing half-written is left"):
        write_video_sample(
            tmp_path, 600, REQUEST, frames(), arch="wan", retry_seconds=[], sleep=lambda s: None, **LABELS
        )
    assert not (tmp_path / "step_000600" / "sample_03.webp").exists()  # no WebP: the sample is not there
    assert 600 not in find_samples(tmp_path)
    assert not [p for p in (tmp_path / "step_000600").iterdir() if p.suffix in (".mp4", ".tmp")]


def test_stale_mp4_temp_files_are_cleaned(tmp_path):
    folder = tmp_path / "step_000500"
    folder.mkdir()
    (folder / ".sample_00.mp4.0a1b2c.tmp").write_bytes(b"half")
    assert remove_stale_temp_files(tmp_path) == 1


# ---------------------------------------------------------------------------------
# The views: step grid, compare grid, gallery, TensorBoard
# ---------------------------------------------------------------------------------


def write_steps(samples_dir: Path, steps=(0, 500)) -> None:
    still = dataclasses.replace(REQUEST, index=1, num_frames=1)
    for step in steps:
        write_video_sample(samples_dir, step, REQUEST, frames(), arch="wan", **LABELS)
        write_sample(samples_dir, step, still, frames(1)[0], image_format="webp", arch="wan", **LABELS)


def test_the_step_grid_shows_each_video_samples_middle_frame(tmp_path):
    write_steps(tmp_path, steps=(500,))
    grid = np.asarray(Image.open(write_step_grid(tmp_path, 500)), dtype=int)
    middle = np.asarray(frames()[2], dtype=int)[0, 0]
    first = np.asarray(frames()[0], dtype=int)[0, 0]
    cell = grid[8 + 16, 8 + 48 + 8 + 24]  # the centre of the second cell (#03; #01 is the still one)
    assert np.abs(cell - middle).max() < 12 and np.abs(cell - first).max() > 40


def test_the_compare_grid_lays_out_the_chosen_frames(tmp_path):
    write_steps(tmp_path)
    one = Image.open(compare_grid(tmp_path, steps=[500], prompts=[3], output=tmp_path / "one.png"))
    three = Image.open(
        compare_grid(
            tmp_path,
            steps=[500],
            prompts=[3],
            output=tmp_path / "three.png",
            frames=["first", "middle", "last"],
        )
    )
    assert three.width - one.width == 2 * (48 + 8)  # two more frames, each with its padding
    cli = ["grid", str(tmp_path), "--steps", "500", "--prompts", "3", "--frames", "first,last"]
    assert main([*cli, "-o", str(tmp_path / "cli.png")]) == 0
    assert Image.open(tmp_path / "cli.png").width == one.width + 48 + 8
    with pytest.raises(SidecarError, match=r"`frame` must be in 0\.\.4, got 9"):
        compare_grid(tmp_path, steps=[500], prompts=[3], output=tmp_path / "x.png", frames=[9])
    with pytest.raises(SystemExit):
        main(["grid", str(tmp_path), "--frames", "centre", "-o", str(tmp_path / "bad.png")])


def test_the_gallery_plays_a_video_cell_in_place_and_links_its_mp4(tmp_path):
    write_steps(tmp_path)
    page = build_gallery(tmp_path).read_text(encoding="utf-8")
    assert '<a class="mp4" href="step_000500/sample_03.mp4">MP4</a>' in page
    assert page.count('class="mp4"') == 2  # the two video cells; the still sample has none
    assert "media-src 'self' file:" in page
    thumb = tmp_path / ".thumbs" / "step_000500" / "sample_03.webp"
    assert frame_count(thumb) == 5 and animation_fps(thumb) == 8  # an animated thumbnail
    assert frame_count(tmp_path / ".thumbs" / "step_000500" / "sample_01.webp") == 1


# Headless Chromium's virtual time (`--virtual-time-budget`) runs out while the page is idle, and
# decoding a video leaves the page idle: short busy steps keep it spending real time (about
# 3 s at most) while the media pipeline decodes, so the result is there when the DOM is dumped.
CHECK_VIDEO = """
window.addEventListener("load", () => {
  const video = document.createElement("video");
  video.muted = true;
  let reported = false;
  const report = (state) => {
    reported = true;
    const out = document.createElement("pre");
    out.id = "check";
    out.textContent = JSON.stringify(state);
    document.body.append(out);
  };
  video.addEventListener("loadeddata", () => report({width: video.videoWidth, ready: video.readyState,
    thumbs: [...document.images].map((image) => image.naturalWidth)}));
  video.addEventListener("error", () => report({error: String(video.error && video.error.code)}));
  video.src = document.querySelector("a.mp4").getAttribute("href");
  let steps = 0;
  const busy = () => {
    if (reported || steps++ > 300) return;
    let spin = 0;
    for (let i = 0; i < 2e6; i++) spin += i;
    setTimeout(busy, 0);
  };
  busy();
});
"""


def test_a_video_cell_decodes_in_headless_chromium(tmp_path):
    import base64
    import hashlib
    import html
    import json
    import re
    import shutil
    import subprocess

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium not found (Debian: apt-get install -y chromium)")
    write_steps(tmp_path / "samples")
    page = build_gallery(tmp_path / "samples")
    body = f"\n{CHECK_VIDEO}\n"
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    source = page.read_text(encoding="utf-8").replace("script-src ", f"script-src 'sha256-{digest}' ")
    source = source.replace('loading="lazy"', 'loading="eager"').replace(
        "</body>", f"<script>{body}</script></body>"
    )
    check = page.with_name("check.html")
    check.write_text(source, encoding="utf-8")
    dumped = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp_path / 'profile'}", "--autoplay-policy=no-user-gesture-required",
         "--virtual-time-budget=5000", "--dump-dom", check.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    match = re.search(r'<pre id="check">(.*?)</pre>', dumped.stdout, re.S)
    assert match, f"no check result; chromium said: {dumped.stderr[-2000:]}"
    result = json.loads(html.unescape(match.group(1)))
    assert result.get("width") == 48 and result["ready"] >= 2, result  # the MP4 decoded: H.264 in Chromium
    assert all(width > 0 for width in result["thumbs"]) and len(result["thumbs"]) == 4


def test_tensorboard_gets_each_video_sample_as_an_animated_gif(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sidecar.publish.tensorboard import TensorBoardSink, sample_tag

    write_steps(tmp_path / "samples", steps=(500,))
    with TensorBoardSink(tmp_path / "tb") as sink:
        publish_step(tmp_path / "samples", 500, [REQUEST], tensorboard=sink)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    [image] = events.Images(sample_tag(REQUEST))
    assert image.step == 500
    with Image.open(io.BytesIO(image.encoded_image_string)) as gif:
        assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (48, 32)
