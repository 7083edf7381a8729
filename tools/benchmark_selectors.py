#!/usr/bin/env python
"""Time of the visual-token selectors alone (after the ViT forward), side by side.

By default: choosing 64 of 576 tokens for a batch of 32 on a ViT-L/14-336-sized
token grid (24x24 patches, 1024 channels, class attention of blocks 0..22 for
VTC-CLS), on random inputs: features N(0, 1), class attention a softmax of
N(0, 1) logits. Speed does not depend on the values (every selector's work is
fixed by the sizes). Timed interleaved (each selector once per repeat), median
of the repeats; ``--threads`` sets torch's CPU threads.

  python tools/benchmark_selectors.py
  python tools/benchmark_selectors.py --keep 144 --batch-size 8 --device cuda --out selectors_bench.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce import selection  # noqa: E402

README_MARKERS = ("<!-- selector-speed:start -->", "<!-- selector-speed:end -->")  # --out README.md fills these
COLUMNS = [("selector", "selector", "{}"), ("ms_per_batch", "ms / batch", "{:.2f}"),
           ("ms_per_image", "ms / image", "{:.3f}")]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=576, help="patch tokens (default 576: 24x24, ViT-L/14 at 336)")
    parser.add_argument("--channels", type=int, default=1024, help="feature width (default 1024, ViT-L)")
    parser.add_argument("--layers", type=int, default=23, help="blocks of class attention VTC-CLS sums (default 23)")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--selector", action="append", default=[], choices=selection.SELECTORS,
                        help="repeatable (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats, median taken (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per selector first (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", action="append", default=[], type=Path,
                        help=".json, .csv or .md (the table; into README.md between the "
                             "<!-- selector-speed:start/end --> markers); repeatable")
    args = parser.parse_args(argv)
    for name in ("batch_size", "tokens", "channels", "layers", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    selection.check_keep(args.keep, args.tokens)
    args.selector = list(dict.fromkeys(args.selector or selection.SELECTORS))
    return args


def workloads(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], Tensor]]:
    generator = torch.Generator().manual_seed(args.seed)
    features = torch.randn(args.batch_size, args.tokens, args.channels, generator=generator).to(device)
    scores = torch.randn(args.batch_size, args.layers, args.tokens, generator=generator).softmax(-1).to(device)
    return {name: (lambda name=name: selection.choose(name, features, scores, args.keep)) for name in args.selector}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = ev.check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = workloads(args, device)
    times = ev.interleaved_seconds(runs, device, args.warmup, args.repeats)
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows.append({"selector": name, "ms_per_batch": 1e3 * median, "ms_per_image": 1e3 * median / args.batch_size,
                     "ms_runs": [1e3 * s for s in seconds]})
    caption = (f"keep {args.keep} of {args.tokens} tokens x {args.channels} channels, batch {args.batch_size}, "
               f"{args.layers} layers of class attention (VTC-CLS); random inputs; {device}, "
               f"{torch.get_num_threads()} thread(s); median of {args.repeats} interleaved repeats")
    print(caption + "\n" + ev.format_table(rows, COLUMNS))
    report = {"caption": caption, "batch_size": args.batch_size, "tokens": args.tokens, "channels": args.channels,
              "layers": args.layers, "keep": args.keep, "device": str(device), "threads": torch.get_num_threads(),
              "repeats": args.repeats, "rows": rows}
    for path in args.out:
        if path.suffix.lower() == ".md":
            path.parent.mkdir(parents=True, exist_ok=True)
            text = caption + ". Written by `tools/benchmark_selectors.py`.\n\n" + ev.markdown_table(rows, COLUMNS)
            ev.write_between_markers(path, text, README_MARKERS)
        else:
            ev.write_results(path, report)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
