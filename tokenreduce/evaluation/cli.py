"""What the evaluation tools share on the command line: running options, timing, the main."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .device import AMP_DTYPES, check_device
from .distributed import barrier, init_distributed, is_distributed, rank, shutdown_distributed
from .settings import Setting
from .speed import measure_throughput


def add_running_arguments(parser: argparse.ArgumentParser, batch_size: int) -> argparse._ArgumentGroup:
    """Device, precision, batching, throughput and output options; returns the group
    so that a tool can add its own running options to it."""
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none",
                     help="autocast dtype for evaluation and timing (default none: fp32)")
    run.add_argument("--batch-size", type=int, default=batch_size)
    run.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    run.add_argument("--no-throughput", action="store_true", help="skip the speed measurement")
    run.add_argument("--throughput-batch-size", type=int, default=32, help="default 32")
    run.add_argument("--throughput-batches", type=int, default=1, help="batches timed per repeat (default 1)")
    run.add_argument("--throughput-repeats", type=int, default=3, help="interleaved repeats, median taken (default 3)")
    run.add_argument("--throughput-warmup", type=int, default=1, help="untimed batches per model first (default 1)")
    run.add_argument("--out", action="append", default=[], type=Path,
                     help="write results: .json (everything), .csv (the table) or .md (a Markdown table, put "
                          "between the <!-- results:start/end --> markers when the file has them, e.g. README.md); "
                          "repeatable")
    return run


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> None:
    """The tools' one wording for a count below 1 (an argument error); None, an option not given, passes."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_running_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts that must be positive, and the rest that must not be negative."""
    check_positive(parser, args, ("batch_size", "throughput_batches", "throughput_repeats", "throughput_batch_size"))
    if args.workers < 0 or args.throughput_warmup < 0:
        parser.error(f"--workers and --throughput-warmup must be >= 0, got {args.workers} and {args.throughput_warmup}")


def timed_throughput(models: Sequence[nn.Module], input_size: tuple[int, ...], args: argparse.Namespace,
                     device: torch.device, channels_last: bool = False
                     ) -> tuple[Optional[dict[str, Any]], Optional[list[float]]]:
    """(how throughput was measured, images/s per model), measured on rank 0 alone
    while the other ranks wait; (None, None) with ``--no-throughput``."""
    plan, rates = None, None
    if rank() == 0 and not args.no_throughput:
        plan = {"batch_size": args.throughput_batch_size, "batches": args.throughput_batches,
                "repeats": args.throughput_repeats, "warmup": args.throughput_warmup, "measured_on": "rank 0 only"}
        print(f"throughput: {plan['repeats']} interleaved repeats x {plan['batches']} batches of "
              f"{plan['batch_size']} synthetic {input_size} inputs per model ...")
        rates = measure_throughput(models, input_size, plan["batch_size"], device, args.amp, channels_last,
                                   plan["warmup"], plan["repeats"], plan["batches"])
    barrier()
    return plan, rates


def run_tool(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Callable[[], list[Setting]],
             evaluate: Callable[[argparse.Namespace, list[Setting], torch.device], None]) -> int:
    """An evaluation tool's main: settings and device checked as argument errors,
    torchrun's process group set up and torn down, a ``ValueError`` met during the
    run printed as the tool's error (exit status 2)."""
    try:
        chosen = settings()
        check_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    device = init_distributed(args.device)
    try:
        evaluate(args, chosen, device)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1
