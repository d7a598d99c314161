"""Diffusers schedulers for sampler names: the model's own scheduler config, with the
sampler's settings on top (`sidecar.samplers` holds the tables)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import diffusers
from diffusers import SchedulerMixin

from sidecar.arch import arch_spec
from sidecar.errors import SamplerError
from sidecar.samplers import (
    DEFAULT_FLOW_SHIFT,
    FROM_BASE_SHIFT,
    PIPELINE_READS_FROM_CONFIG,
    SAMPLERS_BY_ARCH,
    sampler_names,
    validate_sampler,
)

logger = logging.getLogger("sidecar.render")


def _resolve(value: Any, base_config: Mapping[str, Any]) -> Any:
    if value is FROM_BASE_SHIFT:
        return float(base_config.get("shift", DEFAULT_FLOW_SHIFT))
    return value


def make_scheduler(arch: str, name: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """A new scheduler for sampler `name`, built from the model's own scheduler config.

    `base_config` must be the config of the scheduler the model shipped with
    (`pipe.scheduler.config` before any swap), so its betas, spacing and shift are kept.
    """
    spec = arch_spec(arch)
    canonical = validate_sampler(spec.name, name)
    entry = SAMPLERS_BY_ARCH[spec.name][canonical]
    for key, required, default in entry.base_requirements:
        if base_config.get(key, default) != required:
            raise SamplerError(
                f"`sampler` {name!r} on {spec.name} needs `{key}={required!r}` in the model's scheduler "
                f"config, got {base_config.get(key, default)!r}; valid samplers that work with this model: "
                f"{', '.join(n for n in sampler_names(spec.name) if n != canonical)}"
            )
    overrides = {key: _resolve(value, base_config) for key, value in entry.overrides.items()}

    try:
        scheduler_cls = getattr(diffusers, entry.scheduler)
        accepted = set(inspect.signature(scheduler_cls.__init__).parameters)
    except ImportError as exc:  # a diffusers backend (scipy, torchsde) is missing
        raise SamplerError(f"`sampler` {name!r} ({entry.scheduler}) cannot be built: {exc}".strip()) from exc
    # Only keys the class takes: the rest would be ignored anyway, with a warning per swap.
    config = {key: value for key, value in base_config.items() if key in accepted or key.startswith("_")}
    scheduler = scheduler_cls.from_config(config, **overrides)
    carried = {
        key: base_config[key]
        for key in PIPELINE_READS_FROM_CONFIG
        if key in base_config and key not in accepted
    }
    if carried:
        scheduler.register_to_config(**carried)
    logger.debug("sampler %r on %s -> %s %s", name, spec.name, entry.scheduler, overrides)
    return scheduler
