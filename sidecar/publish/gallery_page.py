"""The gallery's HTML page: pure, from what `gallery.build_gallery` found and made.

One file with inline CSS and a few lines of optional inline JS; every link is relative, so it
works from `file://`, from any static web server and from a copied folder, and it makes no
network request (its Content-Security-Policy forbids any). A video sample's cell plays its
animated thumbnail in place and links its MP4. An `<img>` rather than `<video autoplay muted
loop>`: a page of a few hundred cells would pass the number of media players a browser keeps
alive at once (Chromium's is 75), and lazy loading works for images only.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from sidecar.publish.catalog import STEP_GRID_NAME, step_label
from sidecar.publish.files import VIDEO_SUFFIX
from sidecar.publish.infotext import SampleInfo
from sidecar.settings import BASELINE_STEP, SamplesFolder

# Settings shown under each prompt, in this order: (infotext key, label).
_SHOWN_SETTINGS = (
    ("Size", "size"),
    ("Steps", "steps"),
    ("Sampler", "sampler"),
    ("Schedule type", "schedule"),
    ("CFG scale", "cfg"),
    ("Guidance", "guidance"),
    ("Seed", "seed"),
    ("Lora strength", "strength"),
)

_CSS = """
:root { --thumb: 160px; color-scheme: dark; }
* { box-sizing: border-box; }
body { margin: 0; background: #15161a; color: #e6e6e6; font: 13px/1.4 system-ui, sans-serif; }
header { padding: 8px 12px; display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
header h1 { font-size: 15px; margin: 0; font-weight: 600; }
header .meta { color: #9a9aa3; }
.scroll { overflow: auto; height: calc(100vh - 44px); }
table { border-collapse: separate; border-spacing: 0; }
th, td { padding: 4px; vertical-align: top; border-right: 1px solid #26272d;
  border-bottom: 1px solid #26272d; }
thead th { position: sticky; top: 0; z-index: 2; background: #1d1e23; font-weight: 600;
  white-space: nowrap; text-align: center; }
thead th a { color: inherit; }
th.prompt { position: sticky; left: 0; z-index: 1; background: #1d1e23; text-align: left;
  font-weight: normal; width: 300px; min-width: 300px; max-width: 300px; }
thead th.prompt { z-index: 3; }
th.base { background: #24262e; }
.idx { color: #9a9aa3; font-variant-numeric: tabular-nums; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 9.8em; overflow: auto; }
.neg { color: #d49a9a; white-space: pre-wrap; overflow-wrap: anywhere; max-height: 4.2em;
  overflow: auto; }
.settings { color: #9a9aa3; font-size: 12px; margin-top: 2px; }
td { min-width: calc(var(--thumb) + 8px); }
td img { display: block; width: var(--thumb); height: var(--thumb); object-fit: contain; }
td.missing { color: #55565e; text-align: center; vertical-align: middle; }
.video { position: relative; }
.video .mp4 { position: absolute; right: 2px; bottom: 2px; padding: 0 4px; font-size: 11px;
  background: rgba(0, 0, 0, 0.6); color: #e6e6e6; border-radius: 3px; text-decoration: none; }
""".strip()

# Optional: a slider for the thumbnail size. The page is complete without it.
_JS = """
const slider = document.getElementById("zoom");
slider.hidden = false;
slider.addEventListener("input", () => {
  document.documentElement.style.setProperty("--thumb", slider.value + "px");
});
""".strip()
_SCRIPT_BODY = f"\n{_JS}\n"  # exactly what stands between the tags: the policy hashes it


def _csp(script: str) -> str:
    """A policy that allows only this page's own script and images from its folder, so nothing
    in a prompt can run and the page never reaches the network."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src 'self' file:; media-src 'self' file:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


def _settings_text(info: SampleInfo) -> str:
    shown = [f"{label} {info.params[key]}" for key, label in _SHOWN_SETTINGS if info.params.get(key)]
    return " · ".join(shown)


def _href(samples_dir: Path, path: Path) -> str:
    """A relative, URL-safe link from `index.html` to `path`."""
    return html.escape(quote(path.relative_to(samples_dir).as_posix(), safe="/"))


def _reference_cell(samples_dir: Path, images: list[tuple[str, Path | None]]) -> str:
    """Each control image's thumbnail, linking to the image itself (a `file:` URL)."""
    cells = []
    for source, thumb in images:
        name = html.escape(Path(source).name)
        if thumb is None:
            cells.append(f'<span class="missing" title="{html.escape(source)}">{name} (missing)</span>')
            continue
        link = html.escape(Path(source).resolve().as_uri())
        cells.append(
            f'<a href="{link}" title="{html.escape(source)}"><img src="{_href(samples_dir, thumb)}"'
            f' loading="lazy" alt="{name}"></a>'
        )
    return "".join(cells)


def render_page(
    samples_dir: Path,
    samples: Mapping[int, Mapping[int, Path]],
    thumbs: Mapping[Path, Path],
    infos: Mapping[int, SampleInfo],
    *,
    title: str,
    references: Mapping[int, list[tuple[str, Path | None]]] | None = None,
) -> str:
    """The HTML of the gallery (pure: reads nothing from disk but `grid.png`'s and MP4s' presence).

    `references`: per prompt, its control images and their thumbnails (None: unreadable), shown
    as the row's first column; the column is there only when some prompt has one.
    """
    references = references or {}
    steps = list(samples)
    prompt_indexes = sorted({index for images in samples.values() for index in images})
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_csp(_SCRIPT_BODY)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{_CSS}\n</style></head><body>",
        f"<header><h1>{html.escape(title)}</h1>",
        f'<span class="meta">{len(prompt_indexes)} prompt(s) × {len(steps)} step(s)</span>',
        '<label class="meta">thumbnails <input id="zoom" type="range" min="64" max="512" value="160"'
        " hidden></label></header>",
        '<div class="scroll"><table id="gallery"><thead><tr><th class="prompt">prompt</th>',
    ]
    if any(references.values()):
        out.append('<th class="ref" title="the control images the samples were rendered from">reference</th>')
    for step in steps:
        label = html.escape(step_label(step))
        css = ' class="base" title="the base model without LoRA"' if step == BASELINE_STEP else ""
        grid = SamplesFolder(samples_dir).step(step) / STEP_GRID_NAME
        if grid.is_file():
            label = f'<a href="{_href(samples_dir, grid)}" title="all samples of this step">{label}</a>'
        out.append(f'<th{css} data-step="{step}">{label}</th>')
    out.append("</tr></thead><tbody>")
    for index in prompt_indexes:
        info = infos.get(index, SampleInfo(prompt=""))
        negative = (
            f'<div class="neg">negative: {html.escape(info.negative_prompt)}</div>'
            if info.negative_prompt
            else ""
        )
        out.append(
            f'<tr data-prompt="{index}"><th class="prompt"><span class="idx">#{index:02d}</span> '
            f'<div class="text">{html.escape(info.prompt)}</div>{negative}'
            f'<div class="settings">{html.escape(_settings_text(info))}</div></th>'
        )
        if any(references.values()):
            out.append(f"<td>{_reference_cell(samples_dir, references.get(index, []))}</td>")
        for step in steps:
            image = samples[step].get(index)
            if image is None:
                out.append('<td class="missing" title="not rendered (yet)">missing</td>')
                continue
            alt = html.escape(f"#{index:02d} {step_label(step)}")
            cell = (
                f'<a href="{_href(samples_dir, image)}"><img src="{_href(samples_dir, thumbs[image])}"'
                f' loading="lazy" alt="{alt}"></a>'
            )
            video = image.with_suffix(VIDEO_SUFFIX)
            if video.is_file():  # the animated thumbnail plays in place; the MP4 for players
                mp4 = f'<a class="mp4" href="{_href(samples_dir, video)}">MP4</a>'
                cell = f'<div class="video">{cell}{mp4}</div>'
            out.append(f"<td>{cell}</td>")
        out.append("</tr>")
    out.append(f"</tbody></table></div>\n<script>{_SCRIPT_BODY}</script>\n</body></html>\n")
    return "\n".join(out)
