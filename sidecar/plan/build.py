"""The sample plan: a trainer's `sample:` section turned into concrete sample requests.

How one prompt becomes a request, in order:

1. settings layer up: the architecture's defaults (`ArchSpec`), then the `sample:` section, then a
   prompt's own mapping keys, then inline flags in its text (`--w 768 --n blurry`), which win, as
   in ai-toolkit and kohya sd-scripts;
2. the seed: a per-prompt seed (`seed:` or `--d`/`--seed`) wins; else `sample.seed` (42), plus the
   prompt's index when `walk_seed: true`;
3. wildcards: `__name__` picks a line of `wildcards/name.txt` beside the config and `{a|b|c}` one
   option, from a `random.Random` seeded by the prompt's seed, index and text, so the prompt is
   the same at every step. Choices resolve innermost first, so nesting works; a wildcard may
   itself hold wildcards, up to `WILDCARD_MAX_DEPTH` rounds;
4. the trigger word, put in before and after the wildcards, replaces `{trigger_word}`
   (EriDiffusion), `[trigger]` and `[name]` (ai-toolkit, whose `[name]` also means the trigger
   word in prompts). As ai-toolkit does for samples, the trigger is not added to a prompt that
   lacks it. With no trigger word set, a placeholder is removed, with a warning.

Flux guidance: in the YAML (ai-toolkit's meaning) `--l`/`--cfg` set the embedded guidance like
`guidance_scale`, and `--g` also does and wins; in a kohya prompt file `--l` is true CFG
(`true_cfg_scale`) and `--g` the embedded guidance. SDXL and SD 3.5 ignore `--g` with a warning.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from sidecar.arch import ArchSpec
from sidecar.errors import ConfigError, SamplerError
from sidecar.plan.config import TrainerConfig
from sidecar.plan.models import PromptItem
from sidecar.plan.prompts import (
    WILDCARD_DIR,
    Origin,
    Source,
    Wildcards,
    apply_trigger,
    parse_prompt_flags,
    read_prompt_file,
)
from sidecar.plan.request import SamplePlan, SampleRequest
from sidecar.samplers import validate_sampler
from sidecar.settings import SAMPLES_DIR_NAME, samples_dir

logger = logging.getLogger("sidecar.plan")

DEFAULT_STRENGTH = 1.0


def _snap(value: int, spec: ArchSpec, key: str, origin: Origin) -> int:
    """Round a size down to the architecture's multiple, warning with the old and new value."""
    snapped = value - value % spec.size_multiple
    if snapped <= 0:
        raise origin.error(
            f"`{key}` must be at least {spec.size_multiple} ({spec.label} sizes are "
            f"multiples of {spec.size_multiple}), got {value}"
        )
    if snapped != value:
        logger.warning(
            "%s `%s` %d is not a multiple of %d for %s; using %d",
            origin.where(),
            key,
            value,
            spec.size_multiple,
            spec.label,
            snapped,
        )
    return snapped


def _sources(config: TrainerConfig, prompts_file: Path | None) -> list[Source]:
    if prompts_file is not None:
        path = Path(prompts_file)
        return [
            Source(text, None, Origin(config, file=path, line=line)) for line, text in read_prompt_file(path)
        ]
    key = config.sample.prompts_key
    return [
        Source(item.prompt, item, Origin(config, subpath=f"sample.{key}[{i}]"))
        for i, item in enumerate(config.sample.items)
    ]


def _first(*values: object) -> object:
    return next((value for value in values if value is not None), None)


def _sampler(config: TrainerConfig, flag: object, own: str | None, origin: Origin) -> str:
    """The canonical sampler name, checked against the architecture's table, errors located."""
    name = _first(flag, own, config.sample.sampler, config.spec.default_sampler)
    try:
        return validate_sampler(config.arch, str(name))
    except SamplerError as error:
        if flag is None and own is None and config.sample.sampler is not None:
            raise config.error("sample.sampler", str(error)) from None
        raise origin.error(str(error)) from None


def build_plan(config: TrainerConfig, *, prompts_file: Path | None = None) -> SamplePlan:
    """The concrete requests for `config`'s sample section (or a kohya `prompts_file` instead)."""
    spec, sample = config.spec, config.sample
    is_flux = config.arch == "flux"
    sources = _sources(config, prompts_file)
    if not sources:
        if prompts_file is not None:
            raise ConfigError("has no prompts (every line is blank or a # comment)", file=str(prompts_file))
        raise config.error(
            f"sample.{sample.prompts_key}", "has no prompts; add at least one to render samples"
        )

    section = Origin(config, subpath="sample")
    base_width = _snap(
        sample.width or spec.default_size,
        spec,
        "width",
        Origin(config, subpath="sample.width") if sample.width else section,
    )
    base_height = _snap(
        sample.height or spec.default_size,
        spec,
        "height",
        Origin(config, subpath="sample.height") if sample.height else section,
    )
    if not is_flux and sample.true_cfg_scale != 1.0:
        logger.warning(
            "%s `true_cfg_scale` is for Flux only; ignored on %s",
            config.where("sample.true_cfg_scale"),
            spec.label,
        )
    wildcards = Wildcards(config.config_dir / WILDCARD_DIR)

    requests = []
    for index, source in enumerate(sources):
        item, origin = source.item, source.origin
        text, flags = parse_prompt_flags(source.text, origin)
        if item is None:
            item = PromptItem(prompt=text)

        cfg, embedded = flags.get("cfg"), flags.get("embedded_guidance")
        true_cfg = _first(item.true_cfg_scale, sample.true_cfg_scale)
        if is_flux and prompts_file is not None:  # kohya: --l is true CFG, --g the embedded guidance
            guidance = _first(embedded, item.guidance_scale, sample.guidance_scale, spec.default_guidance)
            true_cfg = _first(cfg, true_cfg)
        elif is_flux:  # ai-toolkit: --l / --cfg and --g both set the embedded guidance; --g wins
            guidance = _first(
                embedded, cfg, item.guidance_scale, sample.guidance_scale, spec.default_guidance
            )
        else:
            if embedded is not None:
                logger.warning(
                    "%s `--g` (Flux embedded guidance) is ignored on %s; use `--l`",
                    origin.where(),
                    spec.label,
                )
            if item.true_cfg_scale is not None and item.true_cfg_scale != 1.0:
                logger.warning(
                    "%s `true_cfg_scale` is for Flux only; ignored on %s", origin.where(), spec.label
                )
            guidance = _first(cfg, item.guidance_scale, sample.guidance_scale, spec.default_guidance)
            true_cfg = 1.0

        own_seed = _first(flags.get("seed"), item.seed)
        seed = own_seed if own_seed is not None else sample.seed + (index if sample.walk_seed else 0)
        width = _first(flags.get("width"), item.width)
        height = _first(flags.get("height"), item.height)

        negative = str(_first(flags.get("negative"), item.neg, sample.neg))
        rng = random.Random(f"{seed}:{index}:{source.text}")
        # The trigger goes in before wildcards (so `{a [trigger]|b}` is a plain choice) and again
        # after (so a wildcard file may hold placeholders too).
        trigger = config.trigger_word
        prompt = wildcards.resolve(apply_trigger(text, trigger, origin), rng, origin)
        negative = wildcards.resolve(apply_trigger(negative, trigger, origin), rng, origin)
        requests.append(
            SampleRequest(
                index=index,
                prompt=apply_trigger(prompt, trigger, origin),
                negative_prompt=apply_trigger(negative, trigger, origin),
                width=_snap(int(width), spec, "width", origin) if width is not None else base_width,
                height=_snap(int(height), spec, "height", origin) if height is not None else base_height,
                steps=int(
                    _first(flags.get("steps"), item.sample_steps, sample.sample_steps, spec.default_steps)
                ),
                guidance_scale=float(guidance),
                true_cfg_scale=float(true_cfg),
                sampler=_sampler(config, flags.get("sampler"), item.sampler, origin),
                seed=int(seed),
                strength=float(
                    _first(
                        flags.get("strength"),
                        item.network_multiplier,
                        sample.network_multiplier,
                        DEFAULT_STRENGTH,
                    )
                ),
            )
        )
    return SamplePlan(
        requests=tuple(requests),
        image_format=sample.format,
        batch_size=sample.batch_size,
        sample_every=sample.sample_every,
    )


def _number(value: float) -> str:
    return f"{value:g}"


def format_plan(config: TrainerConfig, plan: SamplePlan) -> str:
    """The text `sidecar check CONFIG` prints: what will be rendered, with every value resolved."""
    if config.sidecar.output is not None or config.run_dir is not None:
        folder = str(samples_dir(config.sidecar.output, run_dir=config.run_dir or Path()))
    else:
        folder = (
            f"{SAMPLES_DIR_NAME}/ in the run folder the checkpoints are in (OUTPUT_DIR for `sidecar watch`)"
        )
    where = f" ({config.yaml_prefix})" if config.yaml_prefix else ""
    every = f", every {plan.sample_every} steps" if plan.sample_every else ""
    header = [
        ("config", f"{config.path}{where}"),
        ("architecture", f"{config.spec.label} ({config.arch})"),
        ("base model", config.model.name_or_path),
        ("trigger word", config.trigger_word or "(none)"),
        ("samples dir", folder),
        ("images", f"{plan.image_format}, batch size {plan.batch_size}{every}"),
    ]
    label_width = max(len(label) for label, _ in header)
    lines = [f"{label:<{label_width}}  {value}" for label, value in header]

    is_flux = config.arch == "flux"
    columns = [
        "#",
        "size",
        "steps",
        "sampler",
        "guidance",
        *(["true cfg"] if is_flux else []),
        "seed",
        "strength",
        "prompt",
    ]
    rows = []
    for request in plan.requests:
        rows.append(
            [
                f"{request.index:02d}",
                f"{request.width}x{request.height}",
                str(request.steps),
                request.sampler,
                _number(request.guidance_scale),
                *([_number(request.true_cfg_scale)] if is_flux else []),
                str(request.seed),
                _number(request.strength),
                request.prompt,
            ]
        )
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns[:-1])]
    indent = "  "

    def render(cells: list[str]) -> str:
        fixed = "  ".join(f"{cell:<{width}}" for cell, width in zip(cells[:-1], widths, strict=True))
        return f"{indent}{fixed}  {cells[-1]}".rstrip()

    lines += ["", f"{len(plan.requests)} sample(s):", render(columns)]
    negative_indent = " " * (len(indent) + sum(widths) + 2 * len(widths))
    for request, row in zip(plan.requests, rows, strict=True):
        lines.append(render(row))
        lines.append(f"{negative_indent}negative: {request.negative_prompt or '(none)'}")
    return "\n".join(lines)
