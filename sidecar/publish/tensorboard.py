"""Samples as TensorBoard images, at the checkpoint's step, so they sit beside the trainer's loss.

Events are written with the `tensorboard` package's own `EventFileWriter` (what torch's
`SummaryWriter` uses underneath) as classic image summaries, which every TensorBoard shows
in its Images tab; a video sample as an animated GIF there, as torch's `add_video` does.
`tensorboard` is an optional extra: it is imported only when a sink is made.

Where the events go (`tensorboard_dir`):
- the trainer config names a `log_dir` (ai-toolkit: on the process, else on the job): into
  `<log_dir>/<name>_samples`. ai-toolkit writes its own run to `<log_dir>/<name>_<YYYYmmdd-HHMMSS>`,
  so `tensorboard --logdir <log_dir>` lists the trainer's run and sidecar's side by side, on one
  step axis. sidecar keeps a run of its own: two processes appending to one run folder make
  TensorBoard skip events.
- else: `tensorboard/` beside the samples folder (`<training_folder>/<name>/tensorboard` in
  ai-toolkit's layout).

TensorBoard keeps only 10 images per tag by default; start it with
`--samples_per_plugin images=0` (keep all) to scrub through every step.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from PIL import Image

from sidecar.errors import SidecarError
from sidecar.plan.request import SampleRequest
from sidecar.publish.video import animation_fps, frame_count, load_frames

logger = logging.getLogger("sidecar.publish")

INSTALL_HINT = "pip install 'sidecar[tensorboard]'"
TAG_PREFIX = "samples"
TAG_PROMPT_CHARS = 40  # the prompt part of a tag: enough to recognise it in TensorBoard's list
RUN_SUFFIX = "_samples"  # sidecar's run folder under the trainer's log_dir: `<name>_samples`
FALLBACK_DIR_NAME = "tensorboard"  # beside the samples folder when no log_dir is configured
EVENT_FILE_SUFFIX = ".sidecar"
FLUSH_SECONDS = 30

_NOT_TAG_CHARS = re.compile(r"[^a-z0-9]+")


def sample_tag(request: SampleRequest) -> str:
    """`samples/00_a_photo_of_sks_dog`: the index keeps tags unique and ordered, the prompt
    makes them recognisable. The same prompt gives the same tag at every step."""
    words = _NOT_TAG_CHARS.sub("_", request.prompt.lower()).strip("_")
    short = words[:TAG_PROMPT_CHARS].rstrip("_")
    return f"{TAG_PREFIX}/{request.index:02d}_{short}" if short else f"{TAG_PREFIX}/{request.index:02d}"


def _import_tensorboard() -> tuple[Any, Any, Any]:
    """(EventFileWriter, event_pb2, summary_pb2), or a SidecarError saying what to install."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as error:
        raise SidecarError(
            f"writing samples to TensorBoard needs the `tensorboard` package ({error}); "
            f"install it with: {INSTALL_HINT}"
        ) from error
    return EventFileWriter, event_pb2, summary_pb2


class TensorBoardSink:
    """Writes rendered samples into a TensorBoard log folder, one image summary per sample.

    Use as a context manager, or call `close()`: events are flushed after every `add_samples`
    so a running TensorBoard sees each step at once.
    """

    def __init__(self, log_dir: Path, *, max_size_px: int | None = None) -> None:
        """`max_size_px`: scale each image down so its long side fits (event files grow by the
        full PNG of every sample at every step); None keeps the samples' own size."""
        event_file_writer, self._event_pb2, self._summary_pb2 = _import_tensorboard()
        self.log_dir = Path(log_dir)
        self.max_size_px = max_size_px
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = event_file_writer(
            str(self.log_dir), flush_secs=FLUSH_SECONDS, filename_suffix=EVENT_FILE_SUFFIX
        )
        self._closed = False

    def _image_value(self, tag: str, path: Path) -> Any:
        if frame_count(path) > 1:
            return self._video_value(tag, path)
        with Image.open(path) as source:
            image = source.convert("RGBA" if "A" in source.getbands() else "RGB")
        image = self._fit(image)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return self._value(tag, image, buffer.getvalue())

    def _video_value(self, tag: str, path: Path) -> Any:
        """A video sample as an animated GIF image summary: what torch's `SummaryWriter.add_video`
        writes, and what TensorBoard's Images tab plays (it serves GIF, not WebP or MP4)."""
        frames = [self._fit(frame) for frame in load_frames(path)]
        buffer = io.BytesIO()
        first, *rest = frames
        first.save(
            buffer,
            format="GIF",
            save_all=True,
            append_images=rest,
            duration=round(1000 / animation_fps(path)),
            loop=0,
        )
        return self._value(tag, first, buffer.getvalue())

    def _fit(self, image: Image.Image) -> Image.Image:
        if self.max_size_px is not None and max(image.size) > self.max_size_px:
            image = image.copy()
            image.thumbnail((self.max_size_px, self.max_size_px), Image.Resampling.LANCZOS)
        return image

    def _value(self, tag: str, image: Image.Image, data: bytes) -> Any:
        encoded = self._summary_pb2.Summary.Image(
            height=image.height,
            width=image.width,
            colorspace=len(image.getbands()),  # 3 RGB, 4 RGBA
            encoded_image_string=data,
        )
        return self._summary_pb2.Summary.Value(tag=tag, image=encoded)

    def add_samples(
        self, step: int, rendered: Sequence[tuple[SampleRequest, Path]], *, wall_time: float | None = None
    ) -> int:
        """Write each `(request, image path)` at global step `step`; returns how many were written.

        An image that cannot be read is skipped with a warning: TensorBoard is a view, and
        must not fail a job whose files are already on disk.
        """
        if self._closed:
            raise SidecarError(f"the TensorBoard sink for {self.log_dir} is closed")
        values = []
        for request, path in rendered:
            try:
                values.append(self._image_value(sample_tag(request), Path(path)))
            except OSError as error:
                logger.warning("not sent to TensorBoard: cannot read %s: %s", path, error)
        if not values:
            return 0
        event = self._event_pb2.Event(
            wall_time=time.time() if wall_time is None else wall_time,
            step=int(step),
            summary=self._summary_pb2.Summary(value=values),
        )
        self._writer.add_event(event)
        self._writer.flush()
        logger.debug("TensorBoard: %d image(s) at step %d in %s", len(values), step, self.log_dir)
        return len(values)

    def close(self) -> None:
        if not self._closed:
            self._writer.close()
            self._closed = True

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# ---------------------------------------------------------------------------------
# Where to write
# ---------------------------------------------------------------------------------


def tensorboard_dir(*, log_dir: Path | None, name: str, samples_dir: Path) -> Path:
    """The rule: `<log_dir>/<name>_samples` when the trainer logs to TensorBoard, else
    `tensorboard/` beside the samples folder."""
    if log_dir is not None:
        return Path(log_dir) / f"{name or 'sidecar'}{RUN_SUFFIX}"
    return Path(samples_dir).parent / FALLBACK_DIR_NAME


def tensorboard_dir_for(
    *, option: Path | None, log_dir: Path | None, name: str, samples_dir: Path
) -> Path | None:
    """Where the daemon writes TensorBoard images, or None for nowhere.

    `--tensorboard DIR` (or `sidecar.tensorboard`) wins, and needs the `tensorboard` extra
    (`TensorBoardSink` says so). Without it, samples go beside the trainer's loss curves when
    its config names a `log_dir` and the extra is installed; without the extra that default
    is dropped with one warning, and the daemon runs.
    """
    if option is not None:
        return Path(option)
    if log_dir is None:
        return None
    if not tensorboard_installed():
        logger.warning(
            "the trainer logs to TensorBoard (%s), but the `tensorboard` package is not installed: "
            "samples go to the samples folder only; %s to see them there too",
            log_dir,
            INSTALL_HINT,
        )
        return None
    return tensorboard_dir(log_dir=log_dir, name=name, samples_dir=samples_dir)


def tensorboard_installed() -> bool:
    """Whether the `tensorboard` package imports (what `TensorBoardSink` will need)."""
    try:
        _import_tensorboard()
    except SidecarError:
        return False
    return True
