"""Views of a rendered step: its contact sheet, the gallery across steps, TensorBoard images.

Called once a step's images are all on disk, by the daemon and by `sidecar render`.
They only read the sample files, so a failure here never fails a render.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sidecar.plan.request import SampleRequest
from sidecar.publish.gallery import build_gallery, find_samples
from sidecar.publish.grids import write_step_grid
from sidecar.publish.tensorboard import TensorBoardSink


def publish_step(
    samples_dir: Path,
    step: int,
    requests: Sequence[SampleRequest],
    *,
    tensorboard: TensorBoardSink | None = None,
) -> None:
    """After a step's images are all on disk: its contact sheet, the gallery, TensorBoard."""
    write_step_grid(samples_dir, step)  # captions from each image's infotext: what was rendered
    build_gallery(samples_dir)
    if tensorboard is not None:
        on_disk = find_samples(samples_dir).get(step, {})
        tensorboard.add_samples(step, [(r, on_disk[r.index]) for r in requests if r.index in on_disk])
