#!/usr/bin/env python
"""GFLOPs and speed of mmsegmentation / mmdetection configs: each config's baseline (the same
config without ``backbone.reduction``) and the reduced model side by side, on the same weights.

Per config: backbone GFLOPs (``tokenreduce.count_flops`` on the backbone, one image; with DToP's
exit heads, which its early exit runs), GFLOPs of the whole model's tensor-mode forward (fvcore
with the library's handles; '-' where fvcore cannot trace it; a two-stage detector's tensor mode
runs every proposal through the box and mask heads), and images/s of a whole ``test_step``
(preprocessing, inference, post-processing) on a fixed synthetic batch, baseline and reduced
timed interleaved (median of the repeats), so machine load hits both alike. Weights are random:
speed and FLOPs do not depend on them, except for input-dependent reductions (DToP's exits).

  python tools/mm_benchmark.py configs/segmentation/upernet_vit-s16-sfp_ade20k_tome.py
  python tools/mm_benchmark.py configs/detection/*_tome.py --shape 800 1344 --out mm.json --out mm.csv
  python tools/mm_benchmark.py CONFIG --shape 256 256 --repeats 1 --batches 1 --no-speed
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import tokenreduce  # noqa: E402
from models import mm_utils  # noqa: E402
from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce.flops import flop_analysis  # noqa: E402

DETECTION_SHAPE = (800, 1344)  # COCO's test resize: short side 800, long side 1333, padded to 32
TABLE = [  # (row key, header, format): ev.format_table columns
    ("config", "config", "{}"), ("shape", "input", "{}"), ("reduction", "reduction", "{}"),
    ("backbone_gflops_baseline", "backbone GFLOPs base", "{:.2f}"), ("backbone_gflops", "backbone GFLOPs", "{:.2f}"),
    ("backbone_flop_ratio", "FLOP ratio", "{:.2f}x"), ("model_gflops_baseline", "model GFLOPs base", "{:.2f}"),
    ("model_gflops", "model GFLOPs", "{:.2f}"), ("img_per_s_baseline", "img/s base", "{:.2f}"),
    ("img_per_s", "img/s", "{:.2f}"), ("speedup", "speedup", "{:.2f}x"),
]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", type=Path, help="mmseg / mmdet configs (reduced or baselines)")
    parser.add_argument("--shape", nargs=2, type=int, metavar=("H", "W"),
                        help=f"input size (default: the config's crop_size, detection {DETECTION_SHAPE})")
    parser.add_argument("--batch-size", type=int, default=1, help="images per timed test_step (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats, median taken (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed test_steps per model first (default 1)")
    parser.add_argument("--batches", type=int, default=2, help="test_steps timed per repeat (default 2)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--no-speed", action="store_true", help="GFLOPs only")
    parser.add_argument("--no-model-flops", action="store_true", help="backbone GFLOPs only (fvcore on the whole "
                                                                      "detector is slow)")
    parser.add_argument("--out", action="append", default=[], type=Path, help=".json or .csv; repeatable")
    args = parser.parse_args(argv)
    ev.check_positive(parser, args, ("batch_size", "repeats", "batches", "threads"))
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.shape and min(args.shape) < 32:
        parser.error(f"--shape {args.shape}: both sides must be >= 32")
    for path in args.out:
        if path.suffix.lower() not in (".json", ".csv"):
            parser.error(f"--out {path}: use a .json or .csv file name")
    return args


def default_shape(cfg: Any) -> tuple[int, int]:
    if cfg.get("crop_size"):
        return tuple(cfg.crop_size)
    return DETECTION_SHAPE


def reduction_label(reduction: Optional[dict]) -> str:
    if reduction is None:
        return "none"
    options = dict(reduction)
    return f"{options.pop('type')}(" + ",".join(f"{k}={v!r}" for k, v in options.items()) + ")"


def model_gflops(model: torch.nn.Module, batch: dict[str, Any]) -> Optional[float]:
    """fvcore GFLOPs of the tensor-mode forward of one preprocessed image, or None (with the
    reason on stderr) where fvcore cannot trace the model."""
    data = model.data_preprocessor(batch, False)
    try:
        with torch.no_grad():
            return flop_analysis(mm_utils.TensorForward(model, data["data_samples"]), data["inputs"]).total() / 1e9
    except Exception as error:  # noqa: BLE001 - any tracing failure means "not countable", reported
        print(f"  whole-model GFLOPs not counted: fvcore could not trace it ({type(error).__name__}: {error})",
              file=sys.stderr)
        return None


def measure_config(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    cfg = mm_utils.load_config(path)
    task = mm_utils.task_of(cfg)
    reduction = mm_utils.reduction_of(cfg)
    height, width = args.shape or default_shape(cfg)
    configs = [mm_utils.baseline_of(cfg)] + ([cfg] if reduction is not None else [])
    models = [mm_utils.build_model(c) for c in configs]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())  # same weights; reduction adds no parameters
    row: dict[str, Any] = {"config": str(path), "shape": f"{height}x{width}", "reduction": reduction_label(reduction),
                           "task": task}
    one = mm_utils.synthetic_batch(task, height, width, batch_size=1)
    for suffix, model in zip(("_baseline", ""), models):
        row["backbone_gflops" + suffix] = tokenreduce.count_flops(mm_utils.backbone_for_flops(model),
                                                                   (3, height, width))
        row["model_gflops" + suffix] = None if args.no_model_flops else model_gflops(model, one)
    if reduction is not None:
        row["backbone_flop_ratio"] = row["backbone_gflops_baseline"] / row["backbone_gflops"]
    if not args.no_speed:
        batch = mm_utils.synthetic_batch(task, height, width, batch_size=args.batch_size)
        steps = [mm_utils.TestStep(model, batch) for model in models]
        rates = ev.measure_throughput(steps, (3, height, width), args.batch_size, torch.device("cpu"),
                                      warmup=args.warmup, repeats=args.repeats, batches=args.batches)
        row["img_per_s_baseline"] = rates[0]
        if reduction is not None:
            row["img_per_s"], row["speedup"] = rates[1], rates[1] / rates[0]
    return row


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for path in args.configs:
        print(f"{path} ...", file=sys.stderr)
        rows.append(measure_config(path, args))
    report = {
        "rows": rows, "device": "cpu", "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "repeats": args.repeats, "batches": args.batches, "weights": "random init",
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }
    print(ev.format_table(rows, TABLE))
    for path in args.out:
        ev.write_results(path, report)
    return report


if __name__ == "__main__":
    main()
