"""DToP in mmseg (models/mm_dtop.py, configs/segmentation/*_dtop*.py) on CPU with tiny inputs and
random weights: the configs, unreduced training of the exit heads, p0=1 = the unreduced
segmentor, p0=0 = the exit heads' frozen map, per-image GFLOPs, the tools on the synthetic set."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.optim import build_optim_wrapper

import tokenreduce
from models import mm_utils
from models.mm_dtop import DToPEncoderDecoder

from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
SEGMENTATION = REPO / "configs/segmentation"
ADE_HEADS, ADE_DTOP = (SEGMENTATION / f"upernet_vit-s16-sfp_ade20k_{s}.py" for s in ("dtop-heads", "dtop"))
SYN_HEADS, SYN_DTOP = (SEGMENTATION / f"upernet_vit-s16-sfp_synthetic_{s}.py" for s in ("dtop-heads", "dtop"))


@functools.lru_cache(maxsize=None)
def _parsed(path: Path):
    return mm_utils.load_config(path)


def tiny(path: Path, side: int = 64, **reduction):
    """The config at ``path`` for ``side``x``side`` inputs, whole-image inference, no stochastic
    depth; ``reduction`` overrides the dtop options."""
    cfg = copy.deepcopy(_parsed(path))
    cfg.model.backbone.drop_path_rate = 0.0
    cfg.model.data_preprocessor.size = (side, side)
    cfg.model.test_cfg = dict(mode="whole")
    if reduction:
        cfg.model.backbone.reduction.update(reduction)
    return cfg


def build_pair(side: int = 64, **reduction):
    """The synthetic DToP model (``reduction`` options) and the same weights without early exit."""
    reduced = mm_utils.build_model(tiny(SYN_DTOP, side, **reduction))
    plain = mm_utils.build_model(tiny(SYN_HEADS, side))
    plain.load_state_dict(reduced.state_dict())
    return reduced, plain


def preprocessed(model, side: int, batch_size: int = 2):
    batch = mm_utils.synthetic_batch("segmentation", side, side, batch_size=batch_size, num_classes=4)
    return batch, model.data_preprocessor(batch, False)["inputs"]


def test_configs_official_schedule_and_reduction_only():
    heads, dtop = _parsed(ADE_HEADS), _parsed(ADE_DTOP)
    assert heads.model.type == "DToPEncoderDecoder" and heads.model.exit_after == (5, 7)
    assert [h.num_classes for h in heads.model.exit_heads] == [150, 150]
    assert heads.train_cfg.max_iters == 40000 and heads.param_scheduler[-1].end == 40000
    assert heads.optim_wrapper.optimizer.type == "AdamW" and heads.optim_wrapper.optimizer.lr == 2e-5
    assert mm_utils.reduction_of(heads) is None and mm_utils.reduction_of(dtop) == dict(
        type="dtop", p0=0.9, top_k=5, mode="restore")
    assert mm_utils.baseline_of(dtop).to_dict() == heads.to_dict()
    assert mm_utils.baseline_of(_parsed(SYN_DTOP)).to_dict() == _parsed(SYN_HEADS).to_dict()


def test_heads_learn_at_ten_times_the_backbone_rate():
    cfg = tiny(ADE_HEADS)
    cfg.model.decode_head.channels, cfg.model.auxiliary_head.channels = 32, 32
    for head in cfg.model.exit_heads:
        head.channels = 32
    model = mm_utils.build_model(cfg)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lr_of = {id(p): group["lr"] for group in wrapper.optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        expected = 2e-4 if name.split(".")[0] in ("decode_head", "auxiliary_head", "exit_heads") else 2e-5
        assert lr_of[id(parameter)] == pytest.approx(expected), name


def test_training_step_runs_unreduced_and_trains_the_exit_heads():
    reduced, plain = build_pair(p0=0.0)  # at inference nearly every token would exit
    batch = mm_utils.synthetic_batch("segmentation", 64, 64, batch_size=2, num_classes=4)
    data = reduced.data_preprocessor(batch, True)
    losses = {}
    for name, model in (("reduced", reduced), ("plain", plain)):
        torch.manual_seed(0)  # the same dropout in both
        losses[name] = model.train().loss(data["inputs"], data["data_samples"])
    assert sorted(losses["reduced"]) == sorted(losses["plain"])
    assert {"exit_0.loss_ce", "exit_1.loss_ce", "decode.loss_ce", "aux.loss_ce"} <= set(losses["reduced"])
    for key, value in losses["reduced"].items():
        torch.testing.assert_close(value, losses["plain"][key], rtol=0, atol=0)
    before = {k: v.clone() for k, v in reduced.named_parameters()}
    step = reduced.train_step(batch, build_optim_wrapper(reduced, tiny(SYN_DTOP).optim_wrapper))
    assert all(torch.isfinite(v).all() for v in step.values())
    unchanged = [k for k, v in reduced.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged
    assert tokenreduce.applied_method(reduced.backbone.model).name == "dtop"  # reduced again after the step
    assert reduced.backbone.model.blocks[5]._forward_hooks == {}


def test_p0_one_predicts_exactly_as_the_unreduced_segmentor():
    reduced, plain = build_pair(p0=1.0)
    batch = mm_utils.synthetic_batch("segmentation", 64, 64, batch_size=2, num_classes=4)
    with torch.no_grad():
        ours, theirs = reduced.test_step(batch), plain.test_step(batch)
    assert not reduced.exit_record().exited.any()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.seg_logits.data, b.seg_logits.data)
        assert torch.equal(a.pred_sem_seg.data, b.pred_sem_seg.data)


def test_p0_zero_without_top_k_takes_the_first_exit_heads_map():
    """Every token exits after block 5: the map is exit head 0's logits on the unreduced block-5
    grid, bilinearly upsampled."""
    reduced, plain = build_pair(p0=0.0, top_k=0)
    batch, inputs = preprocessed(reduced, 64)
    grids = []
    plain.backbone.model.blocks[5].register_forward_hook(lambda m, i, o: grids.append(o))
    with torch.no_grad():
        plain.extract_feat(inputs)
        grid = grids[0][:, 1:].transpose(1, 2).reshape(2, -1, 4, 4)
        expected = F.interpolate(reduced.exit_heads[0]([grid]), size=(64, 64), mode="bilinear", align_corners=False)
        predictions = reduced.test_step(batch)
    assert reduced.exit_record().stage.eq(0).all()
    torch.testing.assert_close(torch.stack([p.seg_logits.data for p in predictions]), expected, rtol=1e-4, atol=1e-4)


def test_p0_zero_keeps_the_top_k_and_returns_full_maps():
    reduced, plain = build_pair(side=128, p0=0.0, top_k=2)
    batch, inputs = preprocessed(reduced, 128)
    with torch.no_grad():
        predictions, final = reduced.test_step(batch), plain.test_step(batch)
    record = reduced.exit_record()
    assert [p.pred_sem_seg.data.shape for p in predictions] == [(1, 128, 128)] * 2
    assert 0 < record.exited.float().mean() < 1
    # per image at most top_k tokens per class stay after the first exit (4 classes, 64 tokens)
    assert ((record.stage != 0).sum(dim=1) <= 2 * 4).all()
    # a pixel of a patch that never exited keeps the decode head's logits of the reduced backbone
    logits = torch.stack([p.seg_logits.data for p in predictions])
    stayed = F.interpolate((~record.exited).view(2, 1, 8, 8).float(), size=(128, 128), mode="nearest") > 0
    with torch.no_grad():
        head = reduced.decode_head.predict(reduced.extract_feat(inputs), [p.metainfo for p in batch["data_samples"]],
                                           reduced.test_cfg)
    assert torch.equal(logits.masked_select(stayed.expand_as(logits)), head.masked_select(stayed.expand_as(head)))
    assert not torch.equal(logits, torch.stack([p.seg_logits.data for p in final]))


def test_gflops_per_image_fall_below_the_baseline_as_p0_falls():
    side = 128
    gflops = {}
    for p0 in (1.0, 0.0):
        reduced, plain = build_pair(side=side, p0=p0, top_k=1)
        _, inputs = preprocessed(reduced, side)
        gflops[p0] = tokenreduce.count_flops_per_image(mm_utils.TensorForward(reduced, None), inputs)
    baseline = tokenreduce.count_flops_per_image(mm_utils.TensorForward(plain, None), inputs)
    assert len(set(baseline)) == 1
    # p0=1: the baseline plus the exit heads; p0=0: at most one token per class runs after block 5
    for never, always, base in zip(gflops[1.0], gflops[0.0], baseline, strict=True):
        assert always < base < never < 1.1 * base
    # the backbone's count (tools/mm_benchmark.py) includes the exit heads the reduction runs
    backbone = tokenreduce.count_flops(plain.backbone, (3, side, side))
    assert tokenreduce.count_flops(mm_utils.backbone_for_flops(plain), (3, side, side)) == backbone  # no exits
    reduced = mm_utils.build_model(tiny(SYN_DTOP, side, p0=1.0))
    with_heads = tokenreduce.count_flops(mm_utils.backbone_for_flops(reduced), (3, side, side))
    exit_head_gflops = 2 * 384 * 32 * 9 * (side // 16) ** 2 / 1e9  # FCN 3x3 conv, the rest is < 1 %
    assert with_heads - backbone == pytest.approx(exit_head_gflops, rel=0.02)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.backbone.reduction.update(heads=[]), r"\['heads'\] come from the segmentor"),
    (lambda m: m.backbone.reduction.update(exit_after=(5, 7)), r"\['exit_after'\] come from the segmentor"),
    (lambda m: m.backbone.update(reduction=dict(type="tome", r=2, mode="restore")), "type='dtop' .* or no reduction"),
    (lambda m: m.update(exit_after=(5,)), "2 exit_heads for exit_after=\\(5,\\)"),
    (lambda m: m.update(exit_after=(7, 5)), "must be increasing blocks in \\[0, 10\\]"),
    (lambda m: m.update(exit_after=(5, 11)), "must be increasing blocks in \\[0, 10\\]"),
    (lambda m: m.exit_heads[1].update(num_classes=3), r"exit heads predict \[3\] classes, the decode head 4"),
])
def test_bad_arguments_are_refused(change, message):
    cfg = tiny(SYN_DTOP)
    change(cfg.model)
    with pytest.raises(ValueError, match=message):
        mm_utils.build_model(cfg)


def test_registered():
    from mmseg.registry import MODELS
    assert MODELS.get("DToPEncoderDecoder") is DToPEncoderDecoder


@pytest.mark.slow
def test_tools_train_heads_then_test_with_early_exit(tmp_path):
    data = load_tool("make_synthetic_dense").make_dataset(tmp_path / "data", train=4, val=2, size=64, seed=0)
    iters = 2
    options = [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}",
               f"default_hooks.checkpoint.interval={iters}", "train_dataloader.batch_size=2",
               "model.backbone.drop_path_rate=0.0"]
    # step 1's weights (an mmengine-style checkpoint: weights plus pickled training state), without exit heads
    step1 = mm_utils.build_model(tiny(SEGMENTATION / "upernet_vit-s16-sfp_synthetic.py"), seed=1).state_dict()
    torch.save({"state_dict": step1, "message_hub": {"loss": np.zeros(2)}}, tmp_path / "step1.pth")
    runner = load_tool("train").main([str(SYN_HEADS), "--data-root", str(data / "ade20k"), "--work-dir",
                                      str(tmp_path / "train"), "--load-from", str(tmp_path / "step1.pth"),
                                      "--cfg-options", *options])
    assert {"train/exit_0.loss_ce", "train/exit_1.loss_ce"} <= set(runner.message_hub.log_scalars)
    trained = runner.model.state_dict()
    assert set(trained) - set(step1) == {k for k in trained if k.startswith("exit_heads.")}
    key = "backbone.model.patch_embed.proj.weight"  # started from step 1: moved by 2 small AdamW steps only
    assert 0 < (trained[key] - step1[key]).abs().max() < 0.01
    out = tmp_path / "dtop.json"
    metrics = load_tool("test").main([str(SYN_DTOP), str(tmp_path / "train" / f"iter_{iters}.pth"), "--data-root",
                                      str(data / "ade20k"), "--work-dir", str(tmp_path / "test"), "--out", str(out),
                                      "--flops", "--cfg-options", "model.backbone.reduction.p0=1.0"])
    assert 0 <= metrics["mIoU"] <= 100 and json.loads(out.read_text()) == metrics
    # p0=1: nothing exits, every image costs the whole model's forward at 64x64 with the exit heads
    model = mm_utils.build_model(tiny(SYN_DTOP, p0=1.0))
    assert metrics["gflops"] == pytest.approx(tokenreduce.count_flops(mm_utils.TensorForward(model, None), (3, 64, 64)))
