"""The HTML gallery: structure read with `html.parser`, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
from factories import REPO, sample_request
from PIL import Image, ImageDraw

from sidecar.confined import UnsafeEntryError
from sidecar.publish.catalog import find_samples, read_sample_info
from sidecar.publish.files import NOTE_PREFIX, write_sample
from sidecar.publish.gallery import THUMB_SIZE_PX, build_gallery, thumbnail_path

ARTIFACTS = Path(os.environ.get("SIDECAR_ARTIFACTS", REPO / "out" / "artifacts"))
CHROMIUM_TIMEOUT_S = 30
XSS = "<script>alert(1)</script> sks dog & friends"
REQUEST = sample_request(
    prompt="a photo of sks dog, on a beach", negative_prompt="blurry, lowres", strength=0.8
)
PROMPTS = (REQUEST.prompt, XSS, "an oil painting of sks dog in a field of sunflowers")


def make_samples(
    root: Path,
    steps: tuple[int, ...],
    *,
    prompts: tuple[str, ...] = PROMPTS,
    size: int = 32,
    labelled: bool = False,
) -> None:
    """Solid-colour samples with real infotext; `labelled` draws the step and prompt on them."""
    for step in steps:
        for index, prompt in enumerate(prompts):
            request = replace(REQUEST, index=index, prompt=prompt, seed=42 + index, width=size, height=size)
            image = Image.new("RGB", (size, size), (40 + 50 * index % 200, 30 + step // 20 % 200, 120))
            if labelled:
                draw = ImageDraw.Draw(image)
                draw.ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(230, 200, 60))
                draw.text((8, 8), f"#{index:02d} step {step}", fill=(255, 255, 255))
            write_sample(
                root,
                step,
                request,
                image,
                image_format="jpg" if index == 2 else "png",
                base_model="stabilityai/stable-diffusion-xl-base-1.0",
                lora_name=None if step == 0 else f"my_lora_{step:09d}.safetensors",
                arch="sdxl",
            )


class GalleryParser(HTMLParser):
    """Columns, rows, cells and links of the gallery page, as a browser-less reader sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []
        self.rows: list[dict] = []
        self.links: list[str] = []
        self.scripts = 0
        self.lazy_images = 0
        self._in_row_header = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "th" and "data-step" in values:
            self.steps.append(int(values["data-step"] or -1))
        elif tag == "tr" and "data-prompt" in values:
            self.rows.append({"prompt": int(values["data-prompt"] or -1), "cells": [], "text": ""})
        elif tag == "th" and self.rows and values.get("class") == "prompt":
            self._in_row_header = True
        elif tag == "td" and self.rows:
            self.rows[-1]["cells"].append("missing" if values.get("class") == "missing" else "image")
        elif tag == "script":
            self.scripts += 1
        if tag == "img":
            self.links.append(values["src"] or "")
            self.lazy_images += values.get("loading") == "lazy"
        if tag == "a" and "href" in values:
            self.links.append(values["href"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "th":
            self._in_row_header = False

    def handle_data(self, data: str) -> None:
        if self._in_row_header:
            self.rows[-1]["text"] += data


def parse(page: Path) -> GalleryParser:
    parser = GalleryParser()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


# ---------------------------------------------------------------------------------
# Without a browser
# ---------------------------------------------------------------------------------


def test_rows_are_prompts_columns_are_steps_baseline_first(tmp_path: Path) -> None:
    make_samples(tmp_path, (1500, 500, 0, 1000))  # written out of order
    page = build_gallery(tmp_path)
    assert page == tmp_path / "index.html"
    parsed = parse(page)
    assert parsed.steps == [0, 500, 1000, 1500]
    assert [row["prompt"] for row in parsed.rows] == [0, 1, 2]
    assert all(row["cells"] == ["image"] * 4 for row in parsed.rows)
    assert parsed.lazy_images == 12


def test_row_shows_the_full_prompt_and_its_settings(tmp_path: Path) -> None:
    make_samples(tmp_path, (0, 500))
    text = parse(build_gallery(tmp_path)).rows[0]["text"]
    assert REQUEST.prompt in text
    assert "negative: blurry, lowres" in text
    for setting in ("size 32x32", "steps 20", "sampler Euler a", "cfg 7", "seed 42", "strength 0.8"):
        assert setting in text


def test_prompt_text_is_escaped_never_markup(tmp_path: Path) -> None:
    make_samples(tmp_path, (0, 500))
    page = build_gallery(tmp_path)
    source = page.read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; sks dog &amp; friends" in source
    assert "<script>alert(1)" not in source
    parsed = parse(page)
    assert parsed.scripts == 1  # the page's own, optional, script
    assert XSS in parsed.rows[1]["text"]


def test_links_are_relative_and_nothing_reaches_the_network(tmp_path: Path) -> None:
    make_samples(tmp_path, (0, 500))
    page = build_gallery(tmp_path)
    source = page.read_text(encoding="utf-8")
    assert "http://" not in source and "https://" not in source and "//" not in re.sub(r"<[^>]*>", "", source)
    links = parse(page).links
    assert links
    for link in links:
        assert not link.startswith(("/", "file:", "http")), link
        assert (tmp_path / link).is_file(), link
    assert "step_000500/sample_00.png" in links
    assert ".thumbs/step_000500/sample_00.webp" in links
    assert "step_000500/sample_02.jpg" in links


def test_missing_sample_is_an_empty_cell_and_step_grid_is_linked(tmp_path: Path) -> None:
    from sidecar.publish.grids import write_step_grid

    make_samples(tmp_path, (0, 500, 1000))
    (tmp_path / "step_000500" / "sample_01.png").unlink()
    write_step_grid(tmp_path, 1000)
    parsed = parse(build_gallery(tmp_path))
    assert parsed.rows[1]["cells"] == ["image", "missing", "image"]
    assert "step_001000/grid.png" in parsed.links
    assert "grid.png" not in " ".join(link for link in parsed.links if "step_000500" in link)


def test_thumbnails_are_small_and_made_only_when_missing_or_stale(tmp_path: Path) -> None:
    make_samples(tmp_path, (500,), size=600)
    build_gallery(tmp_path)
    image = tmp_path / "step_000500" / "sample_00.png"
    thumb = thumbnail_path(tmp_path, image)
    assert thumb == tmp_path / ".thumbs" / "step_000500" / "sample_00.webp"
    with Image.open(thumb) as opened:
        assert opened.format == "WEBP"
        assert max(opened.size) == THUMB_SIZE_PX
    before = thumb.stat().st_mtime_ns
    build_gallery(tmp_path)
    assert thumb.stat().st_mtime_ns == before  # fresh: left alone

    later = time.time() + 10
    os.utime(image, (later, later))  # the sample was re-rendered
    build_gallery(tmp_path)
    assert thumb.stat().st_mtime_ns != before

    image.unlink()  # a thumbnail without its image goes
    image.with_suffix(".txt").unlink()
    build_gallery(tmp_path)
    assert not thumb.exists()


def test_temp_files_and_other_folders_are_not_samples(tmp_path: Path) -> None:
    make_samples(tmp_path, (500,))
    (tmp_path / "step_000500" / ".sample_03.png.abc123.tmp").write_bytes(b"half")
    (tmp_path / "step_000500" / "grid.png").write_bytes(b"")
    (tmp_path / "not_a_step").mkdir()
    (tmp_path / "step_000700").mkdir()  # empty: no column
    assert list(find_samples(tmp_path)) == [500]
    assert sorted(find_samples(tmp_path)[500]) == [0, 1, 2]


def test_thumbnails_are_never_written_or_removed_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    (victim / "step_000500").mkdir(parents=True)
    (victim / "step_000500" / "sample_09.webp").write_bytes(b"not a thumbnail of ours")
    make_samples(tmp_path, (500,))
    (tmp_path / ".thumbs").symlink_to(victim)

    with pytest.raises(UnsafeEntryError, match=r"\.thumbs` is a symbolic link"):
        build_gallery(tmp_path)

    assert sorted(p.name for p in (victim / "step_000500").iterdir()) == ["sample_09.webp"]


def test_a_note_in_the_prompt_file_is_not_part_of_the_prompt(tmp_path: Path) -> None:
    make_samples(tmp_path, (500,), prompts=(REQUEST.prompt,))
    text = tmp_path / "step_000500" / "sample_00.txt"
    text.write_text(f"{REQUEST.prompt}\n{NOTE_PREFIX}a hard link of step_000400/sample_00.png\n")
    assert read_sample_info(tmp_path / "step_000500" / "sample_00.png").prompt == REQUEST.prompt


def test_sample_without_metadata_still_gets_a_row(tmp_path: Path) -> None:
    folder = tmp_path / "step_000100"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "sample_00.png")
    assert read_sample_info(folder / "sample_00.png").prompt == ""
    parsed = parse(build_gallery(tmp_path))
    assert [row["cells"] for row in parsed.rows] == [["image"]]


def test_100_steps_by_10_prompts_stays_a_small_page(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # 2000 durable writes only slow the setup
    prompts = tuple(f"prompt number {i}, sks dog, highly detailed" for i in range(10))
    steps = tuple(range(0, 100 * 250, 250))
    make_samples(tmp_path, steps, prompts=prompts, size=16)
    page = build_gallery(tmp_path)
    parsed = parse(page)
    assert len(parsed.steps) == 100 and len(parsed.rows) == 10
    assert all(len(row["cells"]) == 100 for row in parsed.rows)
    size = page.stat().st_size
    assert size < 250_000, f"index.html is {size} bytes for 1000 samples"  # about 0.2 KB a cell
    assert len(list((tmp_path / ".thumbs").rglob("*.webp"))) == 1000


# ---------------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------------

# Written into a test copy of the page: after load, it puts what the browser saw into the DOM.
CHECK_SCRIPT = """
window.addEventListener("load", () => {
  const images = [...document.images].map((image) => [image.getAttribute("src"), image.naturalWidth]);
  const remote = performance.getEntriesByType("resource").map((entry) => entry.name)
    .filter((name) => !name.startsWith("file:"));
  const result = {
    images: images,
    remote: remote,
    scripts: document.scripts.length,
    zoomShown: !document.getElementById("zoom").hidden,
    columns: [...document.querySelectorAll("thead th[data-step]")].map((th) => th.dataset.step),
    rows: [...document.querySelectorAll("tbody tr")].map((tr) => tr.querySelectorAll("td").length),
    xssText: document.querySelector('tr[data-prompt="1"] .text').textContent,
  };
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify(result);
  document.body.append(out);
});
"""


def find_chromium() -> str | None:
    for name in (os.environ.get("SIDECAR_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run, offline and quiet, with a timeout."""
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False)


def check_copy(page: Path) -> Path:
    """The page with the check script allowed (its hash added to the page's own policy) and
    images set to load eagerly, since a lazy image off screen is never fetched."""
    body = f"\n{CHECK_SCRIPT}\n"
    digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii")
    source = page.read_text(encoding="utf-8")
    assert source.count("script-src ") == 1
    source = source.replace("script-src ", f"script-src 'sha256-{digest}' ")
    source = source.replace('loading="lazy"', 'loading="eager"').replace(
        "</body>", f"<script>{body}</script></body>"
    )
    copy = page.with_name("check.html")  # beside the page: the same relative links
    copy.write_text(source, encoding="utf-8")
    return copy


@pytest.fixture(scope="module")
def browser() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not found (Debian: apt-get install -y chromium)")
    return binary


def test_gallery_in_headless_chromium(tmp_path: Path, browser: str) -> None:
    steps = (0, 250, 500, 750, 1000, 1250, 1500, 1750)
    make_samples(tmp_path / "samples", steps, size=192, labelled=True)
    (tmp_path / "samples" / "step_000750" / "sample_02.jpg").unlink()  # one missing cell
    page = build_gallery(tmp_path / "samples", title="my_first_sdxl_lora_v1 samples")

    dumped = chromium(
        browser, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", check_copy(page).as_uri()
    )
    match = re.search(r'<pre id="check">(.*?)</pre>', dumped.stdout, re.S)
    assert match, f"no check result; chromium said: {dumped.stderr[-2000:]}"
    result = json.loads(html.unescape(match.group(1)))

    assert result["columns"] == [str(step) for step in steps]  # baseline first, then in order
    assert result["rows"] == [len(steps)] * 3
    assert len(result["images"]) == 3 * len(steps) - 1
    broken = [src for src, width in result["images"] if width <= 0]
    assert not broken, f"images that did not load: {broken}"
    assert result["remote"] == []
    assert result["zoomShown"]  # the page's own script ran under its content security policy
    assert result["scripts"] == 2  # the page's and the check's: none made from the prompt
    assert result["xssText"] == XSS
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dumped.stdout

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "gallery.png"
    shot = chromium(
        browser,
        tmp_path / "profile",
        "--window-size=1400,900",
        "--virtual-time-budget=3000",
        f"--screenshot={screenshot}",
        page.as_uri(),
    )
    assert screenshot.is_file(), f"no screenshot; chromium said: {shot.stderr[-2000:]}"
    with Image.open(screenshot) as image:
        assert image.size == (1400, 900)
