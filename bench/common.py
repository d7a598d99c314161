"""What the benchmarks share: run profiles, figures and their statistics, the workspace of tiny models."""

from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sidecar.arch import Arch

Size = Literal["shallow", "deep", "wide"]  # wide: real layer widths, few blocks (`sidecar.testing.wide`)
ARCHS: tuple[Arch, ...] = ("sdxl", "sd3", "flux")
SIZES: tuple[Size, ...] = ("shallow", "deep")
TRIGGER = "sks"
PROMPTS = (
    "a photo of [trigger] on a beach",
    "[trigger] as an oil painting",
    "a pencil sketch of [trigger], detailed",
    "[trigger] in a snowy forest at dusk",
)
SAMPLERS: dict[str, str] = {"sdxl": "euler", "sd3": "flowmatch", "flux": "flowmatch"}
GUIDANCE_SCALE = 4.0
BASE_SEED = 42


@dataclass(frozen=True)
class Profile:
    """How much to measure: `quick` (the smoke test), `default` (`make bench`), `full`."""

    name: str
    repeats: int  # timed repeats per ratio (checkpoints, swaps, renders), after one warm-up
    steps: int  # denoising steps per image
    size_pixels: int
    prompts: int  # images per checkpoint
    archs: tuple[Arch, ...]
    deep: bool  # also the deep variants for overhead, swap and the embedding cache
    detection_checkpoints: int  # with the benchmark's settle setting
    detection_checkpoints_default: int  # with the default `Settings` (settle 1 s, idle back-off 1 s)
    memory_deep: bool  # peak RSS of the deep variants too
    batch_images: int = 4
    call_sizes: tuple[Size, ...] = ("deep", "wide")  # overhead against the pure `__call__`
    wide_steps: int = 1  # denoising steps on the wide models: a real-width step takes seconds on a CPU
    wide_repeats: int = 3  # checkpoints timed per wide case, after one warm-up
    swap_wide: bool = True  # the swap at real widths (rank-16 LoRAs of each wide model)
    start_cases: tuple[str, ...] = ("sdxl/deep",)  # start to first sample, `arch/size`
    start_repeats: int = 3
    throughput_case: str = "sdxl/shallow"
    throughput_checkpoints: int = 20
    throughput_prompts: int = 4

    @property
    def sizes(self) -> tuple[Size, ...]:
        return SIZES if self.deep else ("shallow",)


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        repeats=1,
        steps=1,
        size_pixels=64,
        prompts=1,
        archs=("sdxl",),
        deep=True,
        detection_checkpoints=2,
        detection_checkpoints_default=1,
        memory_deep=False,
        batch_images=2,
        call_sizes=("deep",),
        swap_wide=False,
        start_cases=("sdxl/shallow",),
        start_repeats=1,
        throughput_checkpoints=3,
        throughput_prompts=2,
    ),
    "default": Profile(
        name="default",
        repeats=5,
        steps=4,
        size_pixels=64,
        prompts=3,
        archs=ARCHS,
        deep=True,
        detection_checkpoints=20,
        detection_checkpoints_default=8,
        memory_deep=False,
    ),
    "full": Profile(
        name="full",
        repeats=11,
        steps=8,
        size_pixels=64,
        prompts=4,
        archs=ARCHS,
        deep=True,
        detection_checkpoints=20,
        detection_checkpoints_default=20,
        memory_deep=True,
        wide_steps=2,
        wide_repeats=5,
        start_cases=("sdxl/deep", "sd3/deep", "flux/deep"),
        start_repeats=5,
    ),
}


# ---------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Median and spread of repeated measurements."""

    median: float
    minimum: float
    maximum: float
    p95: float  # nearest rank; with few values this is the maximum
    count: int
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("`values` must hold at least one measurement, got none")
        ordered = sorted(values)
        rank = max(1, math.ceil(0.95 * len(ordered)))
        return cls(
            median=statistics.median(ordered),
            minimum=ordered[0],
            maximum=ordered[-1],
            p95=ordered[rank - 1],
            count=len(ordered),
            values=tuple(values),
        )


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Stats:
    """The stats of pairwise ratios: each pair was measured side by side in one round."""
    return Stats.of([a / b for a, b in zip(numerators, denominators, strict=True)])


def each_case(
    workspace: Workspace, profile: Profile, measure: Callable[[Workspace, Profile, Arch, Size], list[Figure]]
) -> list[Figure]:
    """`measure` for every size and architecture the profile asks for."""
    return [
        figure
        for size in profile.sizes
        for arch in profile.archs
        for figure in measure(workspace, profile, arch, size)
    ]


@dataclass(frozen=True)
class Target:
    """`median <= value` (or `>=`): what the issue asks of a figure."""

    op: Literal["<=", ">="]
    value: float

    def met_by(self, measured: float) -> bool:
        return measured <= self.value if self.op == "<=" else measured >= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclass(frozen=True)
class Figure:
    """One reported number: a benchmark's metric for one case, with its spread and target."""

    benchmark: str  # "overhead"
    case: str  # "sdxl/shallow"
    metric: str  # "ratio", "seconds"...
    unit: str  # "x", "s", "img/s", "MiB"
    stats: Stats
    target: Target | None = None
    statistic: Literal["median", "p95"] = "median"  # which one the target applies to
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.target.met_by(getattr(self.stats, self.statistic))

    def to_json(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "benchmark": self.benchmark,
            "case": self.case,
            "metric": self.metric,
            "unit": self.unit,
            "median": stats.median,
            "min": stats.minimum,
            "max": stats.maximum,
            "p95": stats.p95,
            "n": stats.count,
            "values": list(stats.values),
            "target": None if self.target is None else f"{self.statistic} {self.target}",
            "met": self.met,
            "settings": self.settings,
        }


# ---------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------


def timed(action: Callable[[], object]) -> float:
    """Seconds `action` takes; garbage is collected before, so one side does not pay the other's."""
    gc.collect()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def alternate(repeats: int, *sides: Callable[[int], float]) -> list[tuple[float, ...]]:
    """`repeats` rounds of measurements, one per side; the order flips every round (A B, B A...).

    Each side gets the round number (to pick its checkpoint); each round's tuple is in `sides` order.
    """
    rounds = []
    for number in range(repeats):
        order = range(len(sides)) if number % 2 == 0 else reversed(range(len(sides)))
        measured = {index: sides[index](number) for index in order}
        rounds.append(tuple(measured[index] for index in range(len(sides))))
    return rounds


def progress(message: str) -> None:
    """A progress line on stderr; the table goes to stdout."""
    logging.getLogger("bench").warning(message)


def quiet_libraries() -> None:
    """No loading bars or per-component lines from diffusers and transformers; sidecar at WARNING."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("sidecar").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------
# The workspace: tiny models and LoRA files, built once per run
# ---------------------------------------------------------------------------------


class Workspace:
    """A folder of tiny models and LoRA files for one run; each is built on first use."""

    def __init__(self, root: Path, profile: Profile) -> None:
        self.root = Path(root)
        self.profile = profile
        self._counter = 0

    def model(self, arch: Arch, size: Size) -> Path:
        from sidecar.testing.tiny import save_tiny_model

        return save_tiny_model(arch, self.root / "models" / f"tiny-{arch}-{size}", size=size)

    def trainer_lora(self, arch: Arch, size: Size, *, seed: int, rank: int, scale: float = 1.0) -> Path:
        """A PEFT LoRA of the trainers' default layers (attention, MLP, modulation) at `rank`: the
        size of a real one per block (`sidecar.testing.trainer_loras`); seeds and scales vary the weights."""
        from sidecar.testing.trainer_loras import write_trainer_lora

        path = self.root / "loras" / f"{arch}-{size}-r{rank}-{seed}-{scale:g}.safetensors"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_trainer_lora(self.model(arch, size), arch, path, "peft", rank=rank, seed=seed, scale=scale)
        return path

    def lora(self, arch: Arch, size: Size, *, seed: int) -> Path:
        """A PEFT LoRA of the tiny model; different seeds give files of the same layout (hot-swappable)."""
        from sidecar.testing.loras import write_lora

        path = self.root / "loras" / f"{arch}-{size}-{seed}.safetensors"
        if not path.is_file():
            write_lora(self.model(arch, size), arch, path, seed=seed, scale=0.5 + seed / 10)
        return path

    def scratch(self, name: str) -> Path:
        """A new empty folder."""
        self._counter += 1
        folder = self.root / "scratch" / f"{self._counter:03d}-{name}"
        folder.mkdir(parents=True)
        return folder


def sample_requests(arch: Arch, profile: Profile, *, count: int | None = None) -> list:
    """Requests like those of `bench.harness.write_config`, for the benchmarks that drive a renderer."""
    from sidecar.plan.request import SampleRequest

    count = count or profile.prompts
    prompts = [PROMPTS[number % len(PROMPTS)] for number in range(count)]
    return [
        SampleRequest(
            index=index,
            prompt=prompt.replace("[trigger]", TRIGGER),
            negative_prompt="",
            width=profile.size_pixels,
            height=profile.size_pixels,
            steps=profile.steps,
            guidance_scale=GUIDANCE_SCALE,
            true_cfg_scale=1.0,
            sampler=SAMPLERS[arch],
            seed=BASE_SEED + index,
            strength=1.0,
        )
        for index, prompt in enumerate(prompts)
    ]
