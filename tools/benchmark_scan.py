#!/usr/bin/env python
"""Speed of the exact forms of the selective scan (``tokenreduce.ssm.chunked_scan``)
side by side, at Vision Mamba's sizes: one direction of one block, d_inner = 2 x
width channels, d_state 16, 197 tokens, fp32, no autograd.

Forms: the sequential per-token loop (1 chunk), sqrt(L) chunks, and the chunk
count the library picks (``tokenreduce.ssm.chunk_count``). Timed interleaved
(loop, sqrt, picked, loop, ...), median of the repeats; the table also gives the
largest difference to the loop (the forms are the same sums, so float rounding).

  python tools/benchmark_scan.py                                   # widths 192/384/768, batch 1/8/32
  python tools/benchmark_scan.py --width 384 --batch-size 8 --repeats 3 --threads 2
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce.ssm import chunk_count, chunked_scan  # noqa: E402

D_STATE = 16
TABLE = [("width", "width", "{:d}"), ("batch_size", "batch", "{:d}"), ("form", "form", "{}"),
         ("chunks", "chunks", "{:d}"), ("ms", "ms per scan", "{:.2f}"), ("speedup", "vs loop", "{:.2f}x"),
         ("max_abs_diff", "max |diff| to loop", "{:.1e}")]


def scan_inputs(batch: int, tokens: int, channels: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs shaped like a Vim block's scan (Mamba's initial dt and A ranges)."""
    generator = torch.Generator().manual_seed(seed)
    delta = F.softplus(torch.randn(batch, tokens, channels, generator=generator) - 4.0)
    u = torch.randn(batch, tokens, channels, generator=generator)
    A = -torch.arange(1, D_STATE + 1, dtype=torch.float32).repeat(channels, 1)
    B, C = (torch.randn(batch, tokens, D_STATE, generator=generator) for _ in range(2))
    return delta * u, delta, A, B, C


def time_forms(inputs: tuple[torch.Tensor, ...], counts: list[int], repeats: int, warmup: int = 1) -> list[float]:
    """Median seconds per scan of each chunk count, timed in turn within each repeat."""
    times: list[list[float]] = [[] for _ in counts]
    for count in counts:
        for _ in range(warmup):
            chunked_scan(*inputs, count)
    for _ in range(repeats):
        for i, count in enumerate(counts):
            start = time.perf_counter()
            chunked_scan(*inputs, count)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@torch.inference_mode()
def run(widths: list[int], batch_sizes: list[int], tokens: int, repeats: int) -> list[dict]:
    rows = []
    for width in widths:
        channels = 2 * width
        for batch in batch_sizes:
            inputs = scan_inputs(batch, tokens, channels)
            forms = {"loop": 1, "sqrt(L)": math.isqrt(tokens), "picked": chunk_count(batch, tokens, channels, D_STATE)}
            seconds = time_forms(inputs, list(forms.values()), repeats)
            loop = chunked_scan(*inputs, 1)
            for (form, count), s in zip(forms.items(), seconds):
                rows.append({"width": width, "batch_size": batch, "form": form, "chunks": count, "ms": 1e3 * s,
                             "speedup": seconds[0] / s,
                             "max_abs_diff": (chunked_scan(*inputs, count) - loop).abs().max().item()})
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", action="append", type=int, default=[], help="model width (default 192, 384, 768)")
    parser.add_argument("--batch-size", action="append", type=int, default=[], help="default 1, 8, 32")
    parser.add_argument("--tokens", type=int, default=197, help="sequence length (default 197: 14x14 + class)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats, median taken (default 5)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    for name in ("width", "batch_size"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.tokens, args.repeats) < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--tokens, --repeats and --threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.width or [192, 384, 768], args.batch_size or [1, 8, 32], args.tokens, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, d_state {D_STATE}")
    print(ev.format_table(rows, TABLE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
