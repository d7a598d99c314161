"""The sample plan: a trainer's sample settings turned into concrete sample requests.

How one prompt becomes a request, in order:

1. settings layer up: the architecture's defaults (`ArchSpec`), then the config's sample
   settings (`sample:`, or what a trainer's reader filled in from its own keys), then a prompt's
   own keys, then inline flags in its text (`--w 768 --n blurry`), which win, as in ai-toolkit
   and kohya sd-scripts;
2. the seed: a per-prompt seed (`seed:` or `--d`/`--seed`) wins; else `sample.seed` (42), plus the
   prompt's index when `walk_seed: true`. A prompt with `random_seed` (OneTrainer), or without a
   seed under a trainer that draws one per sampling run (kohya, SimpleTuner's
   `validation_randomize`), gets a new seed per checkpoint step: the request says so
   (`seed_per_step`) and `SamplePlan.requests_for_step` makes it concrete;
3. for ai-toolkit / EriDiffusion configs only (`expands_prompts`), wildcards: `__name__` picks a
   line of `wildcards/name.txt` beside the config and `{a|b|c}` one option, from a
   `random.Random` seeded by the prompt's seed, index and text, so the prompt is the same at every
   step (nesting and wildcards inside wildcards resolve, up to `WILDCARD_MAX_DEPTH` rounds);
4. and the trigger word, put in before and after the wildcards, replaces `{trigger_word}`
   (EriDiffusion), `[trigger]` and `[name]` (ai-toolkit). As ai-toolkit does for samples, the
   trigger is not added to a prompt that lacks it; with no trigger word set, a placeholder is
   removed, with a warning. Other trainers render prompt text as written, and so does sidecar.

Embedded guidance (Flux.1, Kontext, Flux.2 [dev]: `ArchSpec.guidance`): in the YAML (ai-toolkit's
meaning) `--l`/`--cfg` set the embedded guidance like `guidance_scale`, and `--g` also does and wins;
in a kohya or musubi-tuner prompt file `--l` is true CFG (`true_cfg_scale`) and `--g` the embedded
guidance. The others ignore `--g` with a warning. The `sidecar check` text is
`sidecar.plan.report.format_plan`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from sidecar.arch import ArchSpec
from sidecar.errors import ConfigError, SamplerError
from sidecar.plan.config import TrainerConfig, resolve_relative
from sidecar.plan.models import PromptItem
from sidecar.plan.prompt_files import read_prompt_sources
from sidecar.plan.prompts import (
    WILDCARD_DIR,
    Origin,
    Source,
    Wildcards,
    apply_trigger,
    parse_prompt_flags,
)
from sidecar.plan.references import check_control_images
from sidecar.plan.request import Cadence, SamplePlan, SampleRequest
from sidecar.samplers import KOHYA_FALLBACK_SAMPLER, trainer_sampler, validate_sampler

logger = logging.getLogger("sidecar.plan")

DEFAULT_STRENGTH = 1.0
AITOOLKIT_DEFAULT_FPS = 16  # ai-toolkit's `fps` when a video sample names none (toolkit/config_modules.py)
VIDEO_FORMAT = "webp"  # a plan with video samples writes animated WebP (`sidecar.publish.video`)


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
    """The prompts in order: the command line's file wins; else the config's file, then its list."""
    if prompts_file is not None:
        return read_prompt_sources(Path(prompts_file), config)
    named = config.prompts_file
    if named is not None and not named.is_file():
        raise config.error(
            "sample",
            f"names prompt file {named}, which is not there (nor in a folder above the config); "
            "fix the path or pass a prompt file with --prompts",
        )
    sources = read_prompt_sources(named, config) if named is not None else []
    key = config.sample.prompts_key
    dialect = "aitoolkit" if config.dialect == "aitoolkit" and config.expands_prompts else "plain"
    sources += [
        Source(item.prompt, item, Origin(config, subpath=f"sample.{key}[{i}]"), dialect)
        for i, item in enumerate(config.sample.items)
    ]
    return sources


def _first(*values: object) -> object:
    return next((value for value in values if value is not None), None)


def _flag_sampler(config: TrainerConfig, flag: object, source: Source) -> object:
    """A `--ss` flag as its trainer reads it: kohya names (an unknown one is DDIM, as in
    `get_my_scheduler`); kohya's Flux and SD 3.5 sampling ignores it (always flow Euler)."""
    if flag is None or source.dialect not in ("kohya", "musubi"):
        return flag
    if config.spec.is_flow_model:
        logger.debug(
            "%s `--ss %s`: kohya's %s sampling ignores the sampler (always flow-matching Euler)",
            source.origin.where(),
            flag,
            config.spec.label,
        )
        return None
    try:
        return trainer_sampler("kohya", str(flag))
    except SamplerError:
        logger.warning(
            "%s `--ss %s` is not a kohya sampler; kohya renders it with %s, and so does sidecar",
            source.origin.where(),
            flag,
            KOHYA_FALLBACK_SAMPLER,
        )
        return KOHYA_FALLBACK_SAMPLER


def _sampler(config: TrainerConfig, flag: object, own: str | None, origin: Origin) -> str:
    """The canonical sampler name, checked against the architecture's table, errors located."""
    name = _first(flag, own, config.sample.sampler, config.spec.default_sampler)
    try:
        return validate_sampler(config.arch, str(name))
    except SamplerError as error:
        if flag is None and own is None and config.sample.sampler is not None:
            raise config.error("sample.sampler", str(error)) from None
        raise origin.error(str(error)) from None


def _guidance(config: TrainerConfig, source: Source, item: PromptItem, flags: dict) -> tuple[float, float]:
    """(guidance_scale, true_cfg_scale) as the source's trainer reads its keys and flags."""
    spec, sample = config.spec, config.sample
    cfg, embedded = flags.get("cfg"), flags.get("embedded_guidance")
    true_cfg = _first(item.true_cfg_scale, sample.true_cfg_scale)
    if spec.guidance == "embedded":  # Flux.1, Kontext, Flux.2 [dev]
        if source.dialect in ("kohya", "musubi"):  # --l is true CFG, --g the embedded guidance
            guidance = _first(embedded, item.guidance_scale, sample.guidance_scale, spec.default_guidance)
            true_cfg = _first(cfg, true_cfg)
        else:  # ai-toolkit: --l / --cfg and --g both set the embedded guidance; --g wins
            guidance = _first(
                embedded, cfg, item.guidance_scale, sample.guidance_scale, spec.default_guidance
            )
        if not spec.true_cfg and float(true_cfg) != 1.0:  # type: ignore[arg-type]
            logger.warning("%s true CFG is not offered on %s; ignored", source.origin.where(), spec.label)
            true_cfg = 1.0
        return float(guidance), float(true_cfg)  # type: ignore[arg-type]
    if embedded is not None:
        logger.warning(
            "%s `--g` (Flux embedded guidance) is ignored on %s; use `--l`", source.origin.where(), spec.label
        )
    if item.true_cfg_scale is not None and item.true_cfg_scale != 1.0:
        logger.warning(
            "%s `true_cfg_scale` is for Flux only (Flux.1, Kontext); ignored on %s (`guidance_scale` is %s)",
            source.origin.where(),
            spec.label,
            "true CFG" if spec.guidance == "true_cfg" else "CFG",
        )
    guidance = _first(cfg, item.guidance_scale, sample.guidance_scale, spec.default_guidance)
    return float(guidance), 1.0  # type: ignore[arg-type]


def _media(config: TrainerConfig, source: Source, item: PromptItem, flags: dict) -> dict[str, object]:
    """Control images, start image, frames and fps: carried for the stages that render them."""
    base = source.origin.file.parent if source.origin.file is not None else config.config_dir
    images = (*(flags.get("control_images") or ()), *item.all_control_images)  # type: ignore[misc]
    init_image = _first(flags.get("init_image"), item.init_image)
    frames = int(_first(flags.get("num_frames"), item.num_frames, config.sample.num_frames, 1))  # type: ignore[arg-type]
    frames = _snap_frames(frames, config.spec, source)
    fps = _first(flags.get("fps"), item.fps, config.sample.fps)
    if fps is None and frames > 1 and source.dialect == "aitoolkit":
        fps = AITOOLKIT_DEFAULT_FPS
    elif fps is None and frames > 1 and config.spec.frame_step:
        fps = config.spec.default_fps  # the model's reference frame rate
    return {
        "control_images": check_control_images(
            config, source.origin, tuple(dict.fromkeys(resolve_relative(str(p), base) for p in images))
        ),
        "init_image": resolve_relative(str(init_image), base) if init_image is not None else None,
        "num_frames": frames,
        "fps": int(fps) if fps is not None else None,  # type: ignore[arg-type]
    }


def _snap_frames(frames: int, spec: ArchSpec, source: Source) -> int:
    """A video model's frame count as its VAE takes it (1 + a multiple of its temporal factor),
    warning with the old and new value, as sizes are snapped. Rounded the way the sample's trainer
    does: musubi-tuner down (`(f - 1) // 4 * 4 + 1`), ai-toolkit and others as diffusers' Wan
    pipelines do (`f // 4 * 4 + 1`)."""
    step = spec.frame_step
    if not step or frames <= 1 or (frames - 1) % step == 0:
        return frames
    snapped = (frames - 1) // step * step + 1 if source.dialect == "musubi" else frames // step * step + 1
    logger.warning(
        "%s `num_frames` %d is not 1 + a multiple of %d for %s; using %d",
        source.origin.where(),
        frames,
        step,
        spec.label,
        snapped,
    )
    return snapped


def _expanded(config: TrainerConfig, sources: list[Source]) -> list[tuple[Source, tuple[int, int] | None]]:
    """SimpleTuner's unconditional sample first, and every prompt at each of its resolutions."""
    if config.unconditional:
        empty = Source("", PromptItem(prompt=""), Origin(config, subpath="sample.unconditional"), "plain")
        sources = [empty, *sources]
    sizes: list[tuple[int, int] | None] = list(config.resolutions) or [None]
    return [(source, size) for source in sources for size in sizes]


def build_plan(config: TrainerConfig, *, prompts_file: Path | None = None) -> SamplePlan:
    """The concrete requests for `config`'s sample settings (or a `prompts_file` instead)."""
    spec, sample = config.spec, config.sample
    sources = _sources(config, prompts_file)
    if not sources:
        if prompts_file is not None:
            raise ConfigError("has no prompts (every line is blank or a # comment)", file=str(prompts_file))
        raise config.error(
            f"sample.{sample.prompts_key}",
            "has no prompts; add at least one to render samples, or pass a prompt file with --prompts",
        )

    section = Origin(config, subpath="sample")
    base_width = _snap(
        sample.width or spec.default_size,
        spec,
        "width",
        Origin(config, subpath="sample.width") if sample.width else section,
    )
    base_height = _snap(
        sample.height or spec.default_height or spec.default_size,
        spec,
        "height",
        Origin(config, subpath="sample.height") if sample.height else section,
    )
    if not spec.true_cfg and sample.true_cfg_scale != 1.0:
        logger.warning(
            "%s `true_cfg_scale` is for Flux only (Flux.1, Kontext); ignored on %s",
            config.where("sample.true_cfg_scale"),
            spec.label,
        )
    wildcards = Wildcards(config.config_dir / WILDCARD_DIR)

    requests = []
    for index, (source, size) in enumerate(_expanded(config, sources)):
        origin = source.origin
        text, flags = parse_prompt_flags(source.text, origin, dialect=source.dialect)
        item = source.item if source.item is not None else PromptItem(prompt=text)
        guidance, true_cfg = _guidance(config, source, item, flags)

        own_seed = _first(flags.get("seed"), item.seed)
        seed = own_seed if own_seed is not None else sample.seed + (index if sample.walk_seed else 0)
        per_step = (
            item.random_seed if item.random_seed is not None else own_seed is None and sample.random_seed
        )
        width = _first(flags.get("width"), item.width, size[0] if size else None)
        height = _first(flags.get("height"), item.height, size[1] if size else None)
        negative = str(_first(flags.get("negative"), item.neg, sample.neg))
        prompt = text
        if config.expands_prompts:
            rng = random.Random(f"{seed}:{index}:{source.text}")
            # The trigger goes in before wildcards (so `{a [trigger]|b}` is a plain choice) and
            # again after (so a wildcard file may hold placeholders too).
            trigger = config.trigger_word
            prompt = wildcards.resolve(apply_trigger(text, trigger, origin), rng, origin)
            negative = wildcards.resolve(apply_trigger(negative, trigger, origin), rng, origin)
            prompt, negative = (
                apply_trigger(prompt, trigger, origin),
                apply_trigger(negative, trigger, origin),
            )
        requests.append(
            SampleRequest(
                index=index,
                prompt=prompt,
                negative_prompt=negative,
                width=_snap(int(width), spec, "width", origin) if width is not None else base_width,  # type: ignore[call-overload]
                height=_snap(int(height), spec, "height", origin) if height is not None else base_height,  # type: ignore[call-overload]
                steps=int(
                    _first(flags.get("steps"), item.sample_steps, sample.sample_steps, spec.default_steps)  # type: ignore[arg-type]
                ),
                guidance_scale=guidance,
                true_cfg_scale=true_cfg,
                sampler=_sampler(
                    config, _flag_sampler(config, flags.get("sampler"), source), item.sampler, origin
                ),
                seed=int(seed),  # type: ignore[call-overload]
                strength=float(
                    _first(  # type: ignore[arg-type]
                        flags.get("strength"),
                        item.network_multiplier,
                        sample.network_multiplier,
                        DEFAULT_STRENGTH,
                    )
                ),
                seed_per_step=bool(per_step),
                **_media(config, source, item, flags),  # type: ignore[arg-type]
            )
        )
    image_format = sample.format
    if spec.frame_step and image_format != VIDEO_FORMAT and any(r.num_frames > 1 for r in requests):
        # The animated WebP is a video sample's main file (an MP4 lies beside it); ai-toolkit
        # switches a config's `format` to webp for video samples too (`SampleConfig`).
        logger.info(
            "%s: video samples are written as animated WebP (and MP4), not %s", spec.label, image_format
        )
        image_format = VIDEO_FORMAT
    return SamplePlan(
        requests=tuple(requests),
        image_format=image_format,
        batch_size=sample.batch_size,
        sample_every=sample.sample_every,
        cadence=_cadence(config),
    )


def _cadence(config: TrainerConfig) -> Cadence | None:
    """The reader's cadence, with ai-toolkit's `sample_start_step` folded in."""
    start = config.sample.sample_start_step
    if config.cadence is None:
        return Cadence(start_step=start) if start else None
    if start and not config.cadence.start_step:
        return Cadence(config.cadence.every, config.cadence.unit, start, config.cadence.start_epoch)
    return config.cadence
