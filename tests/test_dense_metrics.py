"""Dense agreement metrics on hand-made maps, the image list they run on, and the per-image gathering."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tokenreduce.evaluation import dense as dm
from tokenreduce import evaluation as ev


def maps(*rows: list[list[float]]) -> torch.Tensor:
    """[B, 1, H, W] from nested lists, one per image."""
    return torch.tensor(rows, dtype=torch.float32)[:, None]


def test_mae_and_iou_on_hand_made_maps():
    reference = maps([[0.9, 0.6, 0.1, 0.0]], [[0.2, 0.2, 0.2, 0.2]], [[0.5, 0.5, 0.0, 0.0]])
    other = maps([[0.8, 0.4, 0.7, 0.0]], [[0.1, 0.3, 0.2, 0.2]], [[0.5, 0.49, 0.0, 0.0]])
    agreement = dm.map_agreement(reference, other)
    # |diffs| per image: (0.1, 0.2, 0.6, 0) / 4; (0.1, 0.1, 0, 0) / 4; (0, 0.01, 0, 0) / 4
    assert agreement.mae.tolist() == pytest.approx([0.225, 0.05, 0.0025], abs=1e-7)
    # salient (>= 0.5): image 0: {0, 1} vs {0, 2}; image 1: none in either; image 2: {0, 1} vs {0}
    assert agreement.intersection.tolist() == [1, 0, 1]
    assert agreement.union.tolist() == [3, 0, 2]
    assert agreement.iou().tolist() == pytest.approx([1 / 3, 1.0, 0.5])  # empty union counts as 1
    assert agreement.mae.dtype == agreement.iou().dtype == torch.float64


def test_only_valid_pixels_count():
    reference = maps([[1.0, 1.0, 0.0, 0.0]])
    other = maps([[1.0, 0.0, 1.0, 0.0]])
    valid = torch.tensor([[[[True, True, False, False]]]])
    agreement = dm.map_agreement(reference, other, valid)
    assert agreement.mae.tolist() == [0.5]  # (0 + 1) / 2 valid pixels
    assert (agreement.intersection.item(), agreement.union.item()) == (1, 2)
    with pytest.raises(ValueError, match=r"image\(s\) \[0\] of the batch have no valid pixel"):
        dm.map_agreement(reference, other, torch.zeros_like(valid))
    with pytest.raises(ValueError, match=r"map shapes differ"):
        dm.map_agreement(reference, other[..., :2])


def test_summary_means_and_tails():
    mae = torch.linspace(0, 0.2, 21, dtype=torch.float64)  # 0, 0.01, ..., 0.2
    intersection = torch.tensor([0] + list(range(1, 21)))
    union = torch.tensor([0] + [20] * 20)  # image 0: empty union (IoU 1); then 0.05, 0.10, ..., 1.0
    summary = dm.MapAgreement(mae, intersection, union).summary()
    assert summary["mae"] == pytest.approx(0.1)
    assert summary["mae_p95"] == pytest.approx(0.19)
    assert summary["iou50"] == pytest.approx((1 + sum(i / 20 for i in range(1, 21))) / 21)
    assert summary["iou50_p5"] == pytest.approx(0.10)  # sorted 0.05, 0.10, ..., 1, 1: the 2nd of 21
    assert summary["empty_union"] == 1


def test_box_mask_marks_each_box():
    boxes = torch.tensor([[1, 0, 2, 3], [0, 2, 3, 1]])  # (top, left, height, width)
    mask = dm.box_mask(boxes, (3, 4))
    assert mask.shape == (2, 1, 3, 4)
    assert mask[0, 0].int().tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert mask[1, 0].int().tolist() == [[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0]]


def write_folder(root: Path, shades: list[int]) -> None:
    """One class folder of 4x4 grey images, named so that the listing keeps ``shades`` in order."""
    (root / "class_a").mkdir(parents=True)
    for i, shade in enumerate(shades):
        Image.new("L", (4, 4), shade).save(root / "class_a" / f"{i:02d}.png")


def shade_and_full_box(image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)[None, :, :, 0] / 255)
    return pixels, torch.tensor([0, 0, 4, 4])


def test_images_of_several_folders_spread_evenly(tmp_path):
    write_folder(tmp_path / "a", [10, 20, 30])
    write_folder(tmp_path / "b", [40, 50, 60, 70, 80])
    everything = dm.DenseImages([tmp_path / "a", tmp_path / "b"], shade_and_full_box)
    assert everything.total == len(everything) == 8
    assert everything.counts == {str(tmp_path / "a"): 3, str(tmp_path / "b"): 5}
    pixels, box, index = everything[4]
    assert pixels.shape == (1, 4, 4) and pixels[0, 0, 0].item() == pytest.approx(50 / 255) and index == 4
    limited = dm.DenseImages([tmp_path / "a", tmp_path / "b"], shade_and_full_box, limit=3)
    assert [round(limited[i][0][0, 0, 0].item() * 255) for i in range(3)] == [10, 30, 60]  # indices 0, 2, 5
    with pytest.raises(ValueError, match="no data folder"):
        dm.DenseImages([], shade_and_full_box)


class Brighten(nn.Module):
    """A stand-in dense model: the input image plus a constant, clipped to [0, 1]."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images + self.offset).clamp(0, 1)


def test_evaluate_maps_scores_each_model_against_the_first_in_dataset_order(tmp_path):
    shades = [0, 64, 100, 130, 200, 255]
    write_folder(tmp_path / "a", shades)
    dataset = dm.DenseImages([tmp_path / "a"], shade_and_full_box)
    loader = ev.make_loader(dataset, batch_size=4, workers=0)
    reference, shifted = dm.evaluate_maps([Brighten(0.0), Brighten(0.25)], loader, torch.device("cpu"))
    assert reference.mae.tolist() == [0.0] * 6 and reference.iou().tolist() == [1.0] * 6
    values = torch.tensor(shades, dtype=torch.float32) / 255
    assert shifted.mae.tolist() == pytest.approx(((values + 0.25).clamp(max=1) - values).tolist())
    # salient: reference from 130/255 on (pixels 3..5), shifted from 64/255 on (1..5): IoU 1 where both agree
    assert shifted.iou().tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert shifted.union.tolist() == [0, 16, 16, 16, 16, 16]
