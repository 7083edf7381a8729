#!/usr/bin/env python
"""A tiny synthetic dense-prediction set: coloured shapes (circle, square, triangle) on textured
backgrounds, with exact masks and boxes, written in ADE20K's and COCO's folder formats, so that the
OpenMMLab configs train and evaluate on CPU in minutes (configs/*/..._synthetic*.py).

Each class has its own hue family and each shape its own outline, so a model can learn both cues
from few images. Shapes do not overlap; masks and COCO polygons come from the same polygon.

  python tools/make_synthetic_dense.py                          # /tmp/tokenreduce-synthetic
  python tools/make_synthetic_dense.py --out DIR --train 64 --val 16 --size 128 --seed 0

  DIR/ade20k/images/{training,validation}/*.jpg, DIR/ade20k/annotations/{training,validation}/*.png
      (label 0 unused, background 1, circle 2, square 3, triangle 4: ADE20K's reduce_zero_label)
  DIR/coco/{train2017,val2017}/*.jpg, DIR/coco/annotations/instances_{train,val}2017.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_OUT = Path("/tmp/tokenreduce-synthetic")
SHAPES = ("circle", "square", "triangle")  # COCO category ids 1..3; ADE20K labels 2..4 (1 = background)
HUES = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (50, 60, 220)}
SPLITS = {"train": ("training", "train2017"), "val": ("validation", "val2017")}


def shape_polygon(shape: str, center: tuple[float, float], radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` (a circle as a 32-gon) inscribed in a circle of ``radius``."""
    corners = {"circle": 32, "square": 4, "triangle": 3}[shape]
    cx, cy = center
    return [(cx + radius * math.cos(angle + 2 * math.pi * i / corners),
             cy + radius * math.sin(angle + 2 * math.pi * i / corners)) for i in range(corners)]


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted texture: a smooth colour gradient, stripes at a random angle and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(70, 150, 3)
    slope = rng.uniform(-40, 40, (2, 3))
    theta, period = rng.uniform(0, math.pi), rng.uniform(6, 20)
    stripes = 12 * np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) * size / period)
    image = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + stripes[..., None]
    return image + rng.normal(0, 8, (size, size, 3))


def place_shapes(size: int, rng: np.random.Generator, max_shapes: int = 3, tries: int = 50
                 ) -> list[tuple[str, tuple[float, float], float]]:
    """1..max_shapes non-overlapping (shape, centre, radius), each fully inside the image."""
    placed: list[tuple[str, tuple[float, float], float]] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        for _ in range(tries):
            radius = rng.uniform(0.12, 0.22) * size
            center = tuple(rng.uniform(radius + 1, size - radius - 1, 2))
            if all(math.dist(center, c) > radius + r + 2 for _, c, r in placed):
                placed.append((SHAPES[int(rng.integers(len(SHAPES)))], center, radius))
                break
    return placed


def render(size: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """One image, its ADE20K label map and its COCO instances (category, polygon, bbox, area)."""
    image = background(size, rng)
    labels = Image.new("L", (size, size), 1)
    instances = []
    for shape, center, radius in place_shapes(size, rng):
        polygon = shape_polygon(shape, center, radius, rng.uniform(0, 2 * math.pi))
        mask_image = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask_image).polygon(polygon, fill=1)
        mask = np.asarray(mask_image, dtype=bool)
        colour = np.clip(np.array(HUES[shape]) + rng.normal(0, 20, 3), 0, 255)
        image[mask] = colour + rng.normal(0, 10, (int(mask.sum()), 3))
        ImageDraw.Draw(labels).polygon(polygon, fill=2 + SHAPES.index(shape))
        ys, xs = np.nonzero(mask)
        x0, y0 = float(xs.min()), float(ys.min())
        instances.append(dict(
            category_id=1 + SHAPES.index(shape),
            segmentation=[[round(v, 2) for point in polygon for v in point]],
            bbox=[x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0],
            area=float(mask.sum()), iscrowd=0))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), np.asarray(labels), instances


def write_split(out: Path, split: str, count: int, size: int, rng: np.random.Generator) -> None:
    ade_split, coco_split = SPLITS[split]
    folders = [out / "ade20k" / "images" / ade_split, out / "ade20k" / "annotations" / ade_split,
               out / "coco" / coco_split, out / "coco" / "annotations"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        name = f"{split}_{index:05d}"
        image, labels, instances = render(size, rng)
        image.save(folders[0] / f"{name}.jpg", quality=95)
        Image.fromarray(labels).save(folders[1] / f"{name}.png")
        image.save(folders[2] / f"{name}.jpg", quality=95)
        images.append(dict(id=index + 1, file_name=f"{name}.jpg", width=size, height=size))
        for instance in instances:
            annotations.append(dict(id=len(annotations) + 1, image_id=index + 1, **instance))
    categories = [dict(id=i + 1, name=shape, supercategory="shape") for i, shape in enumerate(SHAPES)]
    coco = dict(images=images, annotations=annotations, categories=categories)
    (folders[3] / f"instances_{coco_split}.json").write_text(json.dumps(coco))


def make_dataset(out: Path, train: int = 64, val: int = 16, size: int = 128, seed: int = 0) -> Path:
    """Write both formats under ``out``; returns ``out``. Same seed, same files."""
    if train < 1 or val < 1:
        raise ValueError(f"--train {train} / --val {val}: each split needs at least 1 image")
    if size < 32:
        raise ValueError(f"--size {size}: images must be at least 32 pixels (the detectors' smallest box)")
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        write_split(out, split, count, size, rng)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--train", type=int, default=64, help="training images (default 64)")
    parser.add_argument("--val", type=int, default=16, help="validation images (default 16)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = make_dataset(args.out, args.train, args.val, args.size, args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(f"ADE20K layout: {out / 'ade20k'}\nCOCO layout:   {out / 'coco'}")


if __name__ == "__main__":
    main()
