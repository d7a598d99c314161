"""What `sidecar check CONFIG` prints: the resolved plan, every value as it will be rendered."""

from __future__ import annotations

from pathlib import Path

from sidecar.plan.config import TrainerConfig
from sidecar.plan.request import SamplePlan, SampleRequest
from sidecar.settings import SAMPLES_DIR_NAME, samples_dir

PER_STEP_SEED = "per step"  # the seed column of a request whose seed changes with the step


def _number(value: float) -> str:
    return f"{value:g}"


def _cadence(plan: SamplePlan) -> str:
    parts = []
    if plan.sample_every:
        parts.append(f"every {plan.sample_every} steps")
    if plan.cadence is not None:
        parts.append(plan.cadence.describe())
    return f", {' '.join(parts)}" if parts else ""


def _extras(request: SampleRequest) -> list[str]:
    """Lines for what a request carries besides an image's settings (control images, video)."""
    lines = [f"control image: {path}" for path in request.control_images]
    if request.init_image:
        lines.append(f"start image: {request.init_image}")
    if request.num_frames > 1:
        fps = f" at {request.fps} fps" if request.fps else ""
        lines.append(f"frames: {request.num_frames}{fps}")
    return lines


def format_plan(config: TrainerConfig, plan: SamplePlan) -> str:
    """The text `sidecar check CONFIG` prints: what will be rendered, with every value resolved."""
    if config.sidecar.output is not None or config.run_dir is not None:
        folder = str(samples_dir(config.sidecar.output, run_dir=config.run_dir or Path()))
    else:
        folder = (
            f"{SAMPLES_DIR_NAME}/ in the run folder the checkpoints are in (OUTPUT_DIR for `sidecar watch`)"
        )
    where = f" ({config.yaml_prefix})" if config.yaml_prefix else ""
    header = [
        ("config", f"{config.path}{where}"),
        ("trainer", config.trainer),
        ("architecture", f"{config.spec.label} ({config.arch})"),
        ("base model", config.model.name_or_path),
        ("trigger word", config.trigger_word or "(none)"),
        ("samples dir", folder),
        ("images", f"{plan.image_format}, batch size {plan.batch_size}{_cadence(plan)}"),
    ]
    if config.prompts_file is not None:
        header.insert(5, ("prompt file", str(config.prompts_file)))
    label_width = max(len(label) for label, _ in header)
    lines = [f"{label:<{label_width}}  {value}" for label, value in header]

    is_flux = config.spec.true_cfg  # a true CFG column where the model takes one beside its guidance
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
                PER_STEP_SEED if request.seed_per_step else str(request.seed),
                _number(request.strength),
                request.prompt or "(empty: unconditional)",
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
        lines += [f"{negative_indent}{extra}" for extra in _extras(request)]
    if any(request.seed_per_step for request in plan.requests):
        lines += [
            "",
            f"seed `{PER_STEP_SEED}`: a new seed at every checkpoint step, as the trainer draws one",
        ]
    return "\n".join(lines)
