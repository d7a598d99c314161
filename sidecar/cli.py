"""`sidecar` command line: parse (`cli_parser.py`), build the config, set up logging, call one function.

Exit codes: 0 done, 1 a render failed, 2 bad input (config, checkpoint, arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from sidecar.cli_parser import build_parser
from sidecar.errors import SidecarError
from sidecar.render.notices import quiet_import_notices  # torch-free: logging filters only

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
LOG_HANDLER_NAME = "sidecar-cli"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (`--log-format json`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(*, verbose: bool = False, log_format: str = "plain") -> None:
    """Plain lines on stderr (journald shows them well) or JSON lines; quiet libraries."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
        )
    handler.set_name(LOG_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == LOG_HANDLER_NAME]:
        root.removeHandler(old)  # called again (tests): replace ours, keep anyone else's
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("sidecar").setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_libraries()


def quiet_libraries() -> None:
    """diffusers and transformers print progress bars and advice meant for notebooks."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # sidecar never downloads
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    quiet_import_notices()  # torchao's kernels for other GPUs, and what it logs with them


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose, log_format=args.log_format or _config_log_format(args) or "plain")
    handler = COMMANDS[args.command]
    try:
        return handler(args)
    except SidecarError as error:
        logging.getLogger("sidecar").error("%s", error)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def _config_log_format(args: argparse.Namespace) -> str | None:
    """`sidecar.log_format` of the config the command reads, so the config takes effect
    before the first line is logged; None when there is none or it does not load (the
    command then reports why, in plain lines)."""
    path = getattr(args, "config", None) or getattr(args, "config_file", None)
    if path is None or not Path(path).is_file():
        return None
    try:
        from sidecar.plan.config import load_trainer_config

        return load_trainer_config(
            Path(path), process=_process(getattr(args, "process", None))
        ).sidecar.log_format
    except Exception:  # the command loads it again and reports the error
        return None


def _process(value: str | None) -> int | str | None:
    return int(value) if value is not None and value.isdigit() else value


def cmd_check(args: argparse.Namespace) -> int:
    from sidecar.app import commands

    print(
        commands.check(
            args.config_file,
            process=_process(args.process),
            prompts_file=args.prompts,
            gpu=args.gpu,
            vram=args.vram,
        )
    )
    return EXIT_OK


def _device_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {"gpu": args.gpu, "device": args.device, "dtype": args.dtype, "offload": args.offload}


def cmd_render(args: argparse.Namespace) -> int:
    from sidecar.app.commands import trainer_config
    from sidecar.app.render_cmd import render_command

    return render_command(
        checkpoint=args.checkpoint,
        config_path=trainer_config(args.config, checkpoint=args.checkpoint),
        process=_process(args.process),
        prompts_file=args.prompts,
        step=args.step,
        baseline=args.baseline,
        force=args.force,
        overrides={**_device_overrides(args), "output": args.output},
    )


def cmd_watch(args: argparse.Namespace) -> int:
    from sidecar.app.watch import WatchRequest, run_watch

    overrides = {
        **_device_overrides(args),
        "output": args.output,
        "backlog": args.backlog,
        "pattern": args.pattern,
        "polling": args.polling or None,
        "follow_symlinks": args.follow_symlinks or None,
        "share_gpu": args.share_gpu,
        "slot_file": args.slot_file,
        "slot_file_mode": args.slot_file_mode,
        "tensorboard": args.tensorboard,
        "compile": args.compile or None,
    }
    if args.runs is not None or args.ray is not None:
        from sidecar.app.coordinator import CoordinatorRequest, run_coordinator
        from sidecar.app.worker import PoolOptions

        request = CoordinatorRequest.from_command_line(
            runs_file=args.runs,
            output_dir=args.output_dir,
            config=args.config,
            process=_process(args.process),
            prompts=args.prompts,
            overrides=overrides,
            once=args.once,
        )
        options = PoolOptions(
            ray=args.ray,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker or 1.0,
            device=args.device,
            gpu=args.gpu,
        )
        return run_coordinator(request, options=options)
    if args.output_dir is None:
        raise SidecarError("`sidecar watch` needs OUTPUT_DIR, or `--runs RUNS_YAML` for a sweep")
    if args.workers is not None or args.gpus_per_worker is not None:
        raise SidecarError("`--workers` and `--gpus-per-worker` need `--ray`")
    from sidecar.app.commands import trainer_config

    request = WatchRequest(
        output_dir=args.output_dir,
        config_path=trainer_config(args.config, run_dir=args.output_dir),
        overrides=overrides,
        process=_process(args.process),
        prompts_file=args.prompts,
        once=args.once,
    )
    return run_watch(request)


def cmd_status(args: argparse.Namespace) -> int:
    from sidecar.app import commands

    if args.runs is not None:
        from sidecar.app.runs import runs_status

        if args.output_dir is not None or args.output is not None:
            raise SidecarError(
                "`sidecar status --runs` takes no OUTPUT_DIR or `--output`: the runs file names them"
            )
        print(runs_status(args.runs))
        return EXIT_OK
    if args.output_dir is None:
        raise SidecarError("`sidecar status` needs OUTPUT_DIR, or `--runs RUNS_YAML`")
    print(commands.status(args.output_dir, output=args.output))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.app.demo import run_demo

    result = run_demo(args.workdir, arch=args.arch)
    print(result.summary())
    return result.exit_code


def cmd_grid(args: argparse.Namespace) -> int:
    from sidecar.app import commands

    print(
        commands.grid(
            args.samples_dir,
            steps=args.steps,
            prompts=args.prompts,
            output=args.output,
            thumb_size=args.thumb_size,
            frames=args.frames,
        )
    )
    return EXIT_OK


def cmd_gallery(args: argparse.Namespace) -> int:
    from sidecar.app import commands

    print(commands.gallery(args.samples_dir))
    return EXIT_OK


def cmd_tiny(args: argparse.Namespace) -> int:
    from sidecar.app import commands

    print(commands.tiny(args.folder, size=args.size))
    return EXIT_OK


COMMANDS = {
    "check": cmd_check,
    "render": cmd_render,
    "watch": cmd_watch,
    "status": cmd_status,
    "demo": cmd_demo,
    "grid": cmd_grid,
    "gallery": cmd_gallery,
    "tiny": cmd_tiny,
}
