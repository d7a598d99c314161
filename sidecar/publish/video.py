"""Video samples: `sample_XX.webp` (animated) + `sample_XX.mp4` (H.264) + `sample_XX.txt`.

The animated WebP is what the gallery, thumbnails and grids use (Pillow, as ai-toolkit writes
its video samples); the MP4 is for sharing and players. MP4s are encoded with PyAV, whose wheels
bring their own FFmpeg with libx264: encoding runs in process into the open temp file (no
subprocess, no path handed to another program), which is what lets it go through the same
confined atomic write as every other file (`sidecar.confined`). imageio-ffmpeg would need an
`ffmpeg` subprocess writing to a path of its own.

Each file is written atomically, the `.txt` first, the MP4, then the WebP last: a WebP on disk
means the sample is complete. The A1111 infotext, with `Frames` and `FPS` added, goes into the
WebP's EXIF UserComment (as for still WebP samples), the MP4's `comment` tag, and the `.txt`
(for a video the `.txt` holds the whole infotext, since not every player shows MP4 tags).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import IO, Literal, NamedTuple

from PIL import Image

from sidecar.plan.request import SampleRequest
from sidecar.publish.files import VIDEO_SUFFIX, atomic_write, sample_paths, write_prompt_file, write_retrying
from sidecar.publish.infotext import exif_with_comment, infotext

logger = logging.getLogger("sidecar.publish")

ANIMATION_FORMAT = "webp"  # the sample's main file: what `find_samples` and the gallery see
WEBP_QUALITY = 90
WEBP_METHOD = 4  # Pillow's speed/size trade-off (0 fast .. 6 small); its default
H264_CODEC = "libx264"
H264_CRF = "18"  # visually lossless for x264; samples are judged by eye
H264_PRESET = "medium"
H264_PIXEL_FORMAT = "yuv420p"  # what every browser and phone decodes
MP4_COMMENT_KEY = "comment"  # the `©cmt` atom players and `ffprobe` show
DEFAULT_FPS = 16  # Wan's `sample_fps`, for a request that names none
FrameChoice = Literal["first", "middle", "last"]
FRAME_CHOICES: tuple[str, ...] = ("first", "middle", "last")


class VideoPaths(NamedTuple):
    """Where one video sample's files go; `image` (the animated WebP) is the main file."""

    image: Path
    video: Path
    text: Path


def video_paths(samples_dir: Path, step: int, index: int) -> VideoPaths:
    paths = sample_paths(samples_dir, step, index, ANIMATION_FORMAT)
    return VideoPaths(image=paths.image, video=paths.image.with_suffix(VIDEO_SUFFIX), text=paths.text)


def fps_of(request: SampleRequest) -> int:
    return request.fps or DEFAULT_FPS


def video_infotext(request: SampleRequest, frame_count: int, **options: object) -> str:
    """The sample's A1111 infotext (`infotext.infotext`, `options` its arguments) with `Frames` and `FPS`."""
    return f"{infotext(request, **options)}, Frames: {frame_count}, FPS: {fps_of(request)}"  # type: ignore[arg-type]


def encode_webp(
    frames: Sequence[Image.Image], *, fps: float, text: str | None = None, quality: int = WEBP_QUALITY
) -> bytes:
    """An animated WebP that loops forever, `text` in its EXIF UserComment."""
    first, *rest = [frame.convert("RGB") for frame in frames]
    exif = exif_with_comment(text) if text else None
    buffer = io.BytesIO()
    first.save(
        buffer,
        format="WEBP",
        save_all=True,
        append_images=rest,
        duration=round(1000 / fps),  # ms per frame
        loop=0,
        quality=quality,
        method=WEBP_METHOD,
        **({"exif": exif} if exif else {}),
    )
    return buffer.getvalue()


def encode_mp4(
    frames: Sequence[Image.Image], handle: IO[bytes], *, fps: int, text: str | None = None
) -> None:
    """Write an H.264 MP4 of `frames` into `handle` (seekable: the muxer finishes the index at the end).

    Odd sizes are padded by one pixel (4:2:0 needs even ones); Wan's are multiples of 16.
    """
    import av  # PyAV: imported where a video is written, so image-only use never loads FFmpeg

    width, height = frames[0].size
    even = (width + width % 2, height + height % 2)
    with av.open(handle, mode="w", format="mp4") as container:
        if text:
            container.metadata[MP4_COMMENT_KEY] = text
        stream = container.add_stream(H264_CODEC, rate=Fraction(fps))
        stream.width, stream.height = even
        stream.pix_fmt = H264_PIXEL_FORMAT
        stream.options = {"crf": H264_CRF, "preset": H264_PRESET}
        for frame in frames:
            image = frame.convert("RGB")
            if image.size != even:
                padded = Image.new("RGB", even)
                padded.paste(image)
                image = padded
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())


def write_video_sample(
    samples_dir: Path,
    step: int,
    request: SampleRequest,
    frames: Sequence[Image.Image],
    *,
    base_model: str,
    lora_name: str | None,
    arch: str,
    note: str | None = None,
    retry_seconds: Sequence[float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> VideoPaths:
    """Write one video sample's `.txt`, MP4 and animated WebP, each atomically, the WebP last.

    Transient write errors (disk full, I/O error) are retried as for images
    (`files.write_retrying`), then `SampleWriteError`; nothing half-written is left.
    """
    if not frames:
        raise ValueError(f"`frames` must hold at least one frame, got none for sample {request.index}")
    paths = video_paths(samples_dir, step, request.index)
    fps = fps_of(request)
    text = video_infotext(
        request, len(frames), base_model=base_model, lora_name=lora_name, step=step, arch=arch
    )
    webp = encode_webp(frames, fps=fps, text=text)

    def write() -> None:
        write_prompt_file(samples_dir, paths.text, text, note=note)
        atomic_write(
            paths.video, lambda handle: encode_mp4(frames, handle, fps=fps, text=text), root=samples_dir
        )
        atomic_write(paths.image, lambda handle: handle.write(webp), root=samples_dir)

    write_retrying(paths.image, write, retry_seconds=retry_seconds, **({"sleep": sleep} if sleep else {}))
    return paths


# ---------------------------------------------------------------------------------
# Reading back: frames of an animated sample (grids, thumbnails, TensorBoard)
# ---------------------------------------------------------------------------------


def frame_count(path: Path) -> int:
    """Frames in an image file: 1 for a still image."""
    with Image.open(path) as image:
        return int(getattr(image, "n_frames", 1))


def frame_index(choice: FrameChoice | int, count: int) -> int:
    """`first` / `middle` / `last` or a 0-based index, within `count` frames."""
    if isinstance(choice, int):
        if not 0 <= choice < count:
            raise ValueError(f"`frame` must be in 0..{count - 1}, got {choice}")
        return choice
    if choice not in FRAME_CHOICES:
        raise ValueError(f"`frame` must be one of {', '.join(FRAME_CHOICES)} or an index, got {choice!r}")
    return {"first": 0, "middle": count // 2, "last": count - 1}[choice]


def load_frame(path: Path, choice: FrameChoice | int = "middle") -> Image.Image:
    """One frame of a sample as RGB: the still image itself, or the chosen frame of an animation."""
    with Image.open(path) as image:
        count = int(getattr(image, "n_frames", 1))
        if count > 1:
            image.seek(frame_index(choice, count))
        return image.convert("RGB")


def load_frames(path: Path) -> list[Image.Image]:
    """Every frame of a sample as RGB (one for a still image)."""
    frames = []
    with Image.open(path) as image:
        for number in range(int(getattr(image, "n_frames", 1))):
            image.seek(number)
            frames.append(image.convert("RGB"))
    return frames


def animation_fps(path: Path, default: int = DEFAULT_FPS) -> float:
    """Frames per second of an animated sample, from its frame duration."""
    with Image.open(path) as image:
        image.load()  # Pillow reads a frame's duration as it decodes it
        duration = image.info.get("duration")
    return 1000 / duration if duration else float(default)


def is_video_sample(path: Path) -> bool:
    """A sample whose main file is an animation with its MP4 beside it."""
    return Path(path).with_suffix(VIDEO_SUFFIX).is_file()
