"""The `sidecar` command line's arguments: one subparser per command, and the value types they read.

`sidecar.cli` parses with it, builds the settings and calls one function in `sidecar.app`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sidecar import __version__
from sidecar.arch import ARCH_SPECS
from sidecar.settings import BACKLOG_POLICIES, DTYPE_NAMES, LOG_FORMATS, OFFLOAD_MODES, SLOT_FILE_MODES

PROMPTS_HELP = (
    "a prompt file instead of the config's prompts: kohya .txt/.toml/.json, "
    "a OneTrainer sample list or a SimpleTuner user prompt library"
)


def build_parser() -> argparse.ArgumentParser:
    """`sidecar` and its commands; logging options are taken before or after the command."""
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Render a LoRA trainer's sample images out of process, on a GPU it does not use.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None)
    # The same two options after the command too (`sidecar watch ... --log-format json`, as a
    # service's argument list puts them); SUPPRESS keeps a value given before the command.
    logging_options = argparse.ArgumentParser(add_help=False)
    logging_options.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    logging_options.add_argument("--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    def config_options(command: argparse.ArgumentParser, *, required: bool = True) -> None:
        command.add_argument(
            "--config",
            type=Path,
            required=required,
            help="the trainer's config (default: the one the trainer keeps or copies in the run folder)",
        )
        command.add_argument(
            "--process",
            default=None,
            help="which config.process[] entry: index or name (default: first with `sample:`)",
        )
        command.add_argument(
            "--prompts",
            type=Path,
            default=None,
            help=PROMPTS_HELP,
        )

    def device_options(command: argparse.ArgumentParser) -> None:
        where = command.add_mutually_exclusive_group()
        where.add_argument("--gpu", type=int, default=None, help="render on cuda:N only")
        where.add_argument("--device", default=None, help="a torch device, e.g. cpu")
        command.add_argument("--dtype", choices=DTYPE_NAMES, default=None)
        command.add_argument("--offload", choices=OFFLOAD_MODES, default=None)

    check = commands.add_parser(
        "check", help="parse a trainer config and print the sample plan", parents=[logging_options]
    )
    check.add_argument(
        "config_file",
        type=Path,
        metavar="CONFIG",
        nargs="?",
        default=Path("."),
        help="the trainer's config, or a run folder to find it in (default: the current folder)",
    )
    check.add_argument("--process", default=None)
    check.add_argument("--prompts", type=Path, default=None, help=PROMPTS_HELP)
    card = check.add_mutually_exclusive_group()
    card.add_argument("--gpu", type=int, default=None, help="plan for the free memory of cuda:N")
    card.add_argument(
        "--vram", type=_vram_size, default=None, metavar="SIZE", help="plan for a card of SIZE, e.g. 12GiB"
    )

    render = commands.add_parser("render", help="render one checkpoint's samples", parents=[logging_options])
    render.add_argument("checkpoint", type=Path, nargs="?", metavar="CHECKPOINT")
    config_options(render, required=False)
    device_options(render)
    render.add_argument("--output", type=Path, default=None, help="samples folder")
    render.add_argument("--step", type=int, default=None, help="the step, when the file name has none")
    render.add_argument("--force", action="store_true", help="render samples already on disk again")
    render.add_argument(
        "--baseline", action="store_true", help="render the base model without LoRA into step_000000"
    )

    watch = commands.add_parser(
        "watch", help="watch a trainer's output folder and render each checkpoint", parents=[logging_options]
    )
    watch.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", nargs="?", default=None)
    config_options(watch, required=False)
    device_options(watch)
    watch.add_argument(
        "--output", type=Path, default=None, help="samples folder (default OUTPUT_DIR/samples)"
    )
    watch.add_argument("--backlog", choices=BACKLOG_POLICIES, default=None)
    watch.add_argument("--pattern", default=None, help="checkpoint file-name regex with a `step` group")
    watch.add_argument("--polling", action="store_true", help="poll instead of inotify (network filesystems)")
    watch.add_argument("--once", action="store_true", help="render what is there, then exit")
    watch.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="also read checkpoints that are symlinks to files outside OUTPUT_DIR (linked-in storage)",
    )
    watch.add_argument(
        "--share-gpu",
        type=int,
        default=None,
        metavar="N",
        help="one-GPU box: render on cuda:N only while no other process uses it (NVML)",
    )
    watch.add_argument(
        "--slot-file",
        type=Path,
        default=None,
        help="render only while this file exists (or is absent, or its lock is free: --slot-file-mode)",
    )
    watch.add_argument("--slot-file-mode", choices=SLOT_FILE_MODES, default=None)
    watch.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write each sample as a TensorBoard image at its step",
    )
    watch.add_argument(
        "--compile",
        action="store_true",
        help="compile the backbone's repeated blocks once (torch.compile); LoRA swaps keep the graph",
    )
    pool_options(watch)

    status = commands.add_parser(
        "status", help="the queue, the last rendered step and the failures", parents=[logging_options]
    )
    status.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", nargs="?", default=None)
    status.add_argument(
        "--output", type=Path, default=None, help="samples folder (default OUTPUT_DIR/samples)"
    )
    status.add_argument(
        "--runs", type=Path, default=None, metavar="RUNS_YAML", help="every run of a sweep file"
    )

    demo = commands.add_parser(
        "demo", help="a simulated training run beside the daemon, on tiny models", parents=[logging_options]
    )
    demo.add_argument("--workdir", type=Path, default=Path("out/demo"))
    demo.add_argument("--arch", choices=tuple(ARCH_SPECS), default="sdxl")

    grid = commands.add_parser(
        "grid", help="one image of chosen steps x prompts, to share", parents=[logging_options]
    )
    grid.add_argument("samples_dir", type=Path, metavar="SAMPLES_DIR")
    grid.add_argument("--steps", type=_int_list, default=None, help="e.g. 500,1000,1500 (default: all)")
    grid.add_argument(
        "--prompts", type=_int_list, default=None, help="prompt indexes, e.g. 0,2 (default: all)"
    )
    grid.add_argument("-o", "--output", type=Path, required=True, help="the image to write (.png/.jpg/.webp)")
    grid.add_argument(
        "--thumb-size", type=int, default=None, help="long side of a cell in px (default: as rendered)"
    )
    grid.add_argument(
        "--frames",
        type=_frame_list,
        default=["middle"],
        help="video samples: frames side by side per cell, e.g. first,middle,last or 0,40 (default: middle)",
    )

    gallery = commands.add_parser("gallery", help="rebuild SAMPLES_DIR/index.html", parents=[logging_options])
    gallery.add_argument("samples_dir", type=Path, metavar="SAMPLES_DIR")

    tiny = commands.add_parser(
        "tiny", help="build the tiny offline models into a folder", parents=[logging_options]
    )
    tiny.add_argument("folder", type=Path)
    tiny.add_argument("--size", choices=("shallow", "deep", "wide"), default="shallow")
    return parser


def pool_options(watch: argparse.ArgumentParser) -> None:
    """`sidecar watch --runs` and the Ray workers (`sidecar.app.coordinator`)."""
    watch.add_argument(
        "--runs", type=Path, default=None, metavar="RUNS_YAML", help="serve every run of a sweep file"
    )
    watch.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="render on Ray workers: local, auto or an address",
    )
    watch.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU)")
    watch.add_argument("--gpus-per-worker", type=float, default=None, metavar="G", help="default 1")


def _vram_size(value: str) -> str:
    from sidecar.render.memory_plan import parse_size  # no torch: sizes only

    try:
        parse_size(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _int_list(value: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _frame_list(value: str) -> list[str | int]:
    """`first,middle,last` or 0-based frame indexes, mixed as one likes."""
    frames: list[str | int] = []
    for part in (part.strip().lower() for part in value.split(",")):
        if part.isdigit():
            frames.append(int(part))
        elif part in ("first", "middle", "last"):
            frames.append(part)
        elif part:
            raise argparse.ArgumentTypeError(
                f"`--frames` takes first, middle, last or frame numbers, got {part!r}"
            )
    if not frames:
        raise argparse.ArgumentTypeError(f"`--frames` names no frame: {value!r}")
    return frames
