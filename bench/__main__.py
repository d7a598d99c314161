"""`python -m bench [--quick | --full] [--only NAME ...] [--threads N] [--results PATH]`."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import (
    batching,
    call_overhead,
    compile_speed,
    detection,
    embed_cache,
    memory,
    overhead,
    pool,
    report,
    start,
    swap,
    throughput,
)
from bench.common import PROFILES, Figure, Profile, Workspace, quiet_libraries

Benchmark = Callable[[Workspace, Profile], list[Figure]]
BENCHMARKS: dict[str, Benchmark] = {
    "overhead": overhead.run,
    "call_overhead": call_overhead.run,
    "start": start.run,
    "throughput": throughput.run,
    "swap": swap.run,
    "detection": detection.run,
    "batching": batching.run,
    "embed_cache": embed_cache.run,
    "memory": memory.run,
    "pool": pool.run,
    "compile": compile_speed.run,
}
# `pool` starts a local Ray; `compile` builds C++ kernels for minutes: only with `--only NAME`
OPT_IN = ("pool", "compile")
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results.json"
DEFAULT_THREADS = 1  # tiny matrices gain nothing from threads, and 2 threads on a shared box are erratic


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_const", const="quick", dest="profile", help="smallest run (smoke test)"
    )
    size.add_argument(
        "--full", action="store_const", const="full", dest="profile", help="more repeats and steps"
    )
    parser.set_defaults(profile="default")
    parser.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads (default 1)"
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"`--threads` must be a positive integer, got {args.threads}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="[bench] %(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(args.threads)
    quiet_libraries()
    profile = PROFILES[args.profile]
    names = args.only or [name for name in BENCHMARKS if name not in OPT_IN]
    started = time.perf_counter()
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as root:
        workspace = Workspace(Path(root), profile)
        for name in names:
            figures += BENCHMARKS[name](workspace, profile)
    content = report.results(figures, profile=profile, seconds=time.perf_counter() - started)
    report.write(args.results, content)
    print(report.header(content))
    print(report.table(figures))
    breakdown = report.phase_table(figures)
    if breakdown:
        print(f"\nwhere a checkpoint's time goes (call_overhead):\n{breakdown}")
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
