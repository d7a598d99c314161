"""The fault matrix, video samples: a process killed while it writes a video leaves no half file.

A real process writes a video sample (`write_video_sample`) and is killed with SIGKILL while the
MP4 is half encoded into its temp file. Nothing of the sample may be visible under its names: no
`sample_00.mp4`, no `sample_00.webp` (the file the gallery, the grid and `sidecar render` look
for), and the next start's clean-up removes the hidden temp file; writing it again then works.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from sidecar.publish.catalog import find_samples
from sidecar.publish.files import remove_stale_temp_files
from sidecar.publish.video import frame_count

WAIT_SECONDS = 60.0  # for the child to reach the middle of its MP4

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from PIL import Image
    import sidecar.publish.video as video
    from sidecar.plan.request import SampleRequest

    samples, marker = Path(sys.argv[1]), Path(sys.argv[2])
    real = video.encode_mp4

    def encode_then_hang(frames, handle, **options):
        real(frames[:2], handle, **options)  # half the video is in the temp file
        handle.flush()
        marker.write_text("mid-write")
        time.sleep(600)

    video.encode_mp4 = encode_then_hang
    request = SampleRequest(index=0, prompt="a fox", negative_prompt="", width=32, height=32, steps=2,
        guidance_scale=5.0, true_cfg_scale=1.0, sampler="flowmatch", seed=1, strength=1.0,
        num_frames=5, fps=16)
    frames = [Image.new("RGB", (32, 32), (50 * i, 0, 0)) for i in range(5)]
    video.write_video_sample(samples, 500, request, frames, base_model="m", lora_name="l", arch="wan")
    """
)


def test_a_video_sample_killed_mid_write_leaves_no_half_file(tmp_path):
    samples, marker = tmp_path / "samples", tmp_path / "mid-write"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(samples), str(marker)])
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not marker.exists():
            assert child.poll() is None, "the writer ended before reaching the middle of its MP4"
            assert time.monotonic() < deadline, "the writer never reached the middle of its MP4"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()

    folder = samples / "step_000500"
    visible = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    assert visible == ["sample_00.txt"]  # written first; no MP4, no WebP under their names
    hidden = [name for name in os.listdir(folder) if name.startswith(".")]
    assert len(hidden) == 1 and hidden[0].startswith(".sample_00.mp4.")  # the half MP4, hidden
    assert find_samples(samples) == {}  # nothing for the gallery, the grid or `sidecar render`

    assert remove_stale_temp_files(samples) == 1  # what the next start does
    subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD.replace("video.encode_mp4 = encode_then_hang", ""),
            str(samples),
            str(marker),
        ],
        check=True,
        timeout=WAIT_SECONDS,
    )
    assert sorted(os.listdir(folder)) == ["sample_00.mp4", "sample_00.txt", "sample_00.webp"]
    assert frame_count(Path(folder) / "sample_00.webp") == 5
