#!/usr/bin/env python
"""Fidelity against cost: top-1 (or the feature cosine to the unreduced model when
there are no labels) versus GFLOPs, and versus throughput, one series per method.

Reads the JSON of ``tools/eval_imagenet.py`` (fidelity, GFLOPs, and throughput
when it was measured) and of ``tools/benchmark.py`` (GFLOPs, img/s, speedup; no
fidelity). Several files are merged: fidelity comes from the eval files, and a
benchmark row of the same model, input size, method and options (defaults
included) supplies the throughput of that setting, preferred over the eval
file's own. The unreduced baseline is drawn as a black star. Settings evaluated
on different images (another model, size, data folder or image count) are drawn
as separate groups, each with its own baseline.

  python tools/plot_pareto.py eval.json --out pareto.png
  python tools/plot_pareto.py eval.json bench.json --throughput img_per_s --batch-size 32 --out pareto.svg
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

METRICS = {  # key: axis label
    "top1": "top-1 accuracy (%)", "top5": "top-5 accuracy (%)",
    "cos_mean": "feature cosine to the unreduced model (mean)",
    "cos_p5": "feature cosine to the unreduced model (5th percentile)",
    "nn_agreement": "nearest-neighbour agreement with the unreduced model",
}
THROUGHPUTS = {"speedup": "speedup over the unreduced model (x)", "img_per_s": "throughput (images/s)"}
EVAL_FIELDS = ("setting", "method", "gflops")
BENCH_FIELDS = ("model", "img_size", "batch_size", "setting", "method", "options", "gflops", "gflops_baseline",
                "img_per_s", "img_per_s_baseline", "speedup")
SUFFIXES = (".png", ".svg", ".pdf")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="JSON files of tools/eval_imagenet.py / benchmark.py")
    parser.add_argument("--out", type=Path, default=Path("pareto.png"), help="image file: .png, .svg or .pdf")
    parser.add_argument("--metric", choices=["auto", *METRICS], default="auto",
                        help="fidelity axis (auto: top-1 when every eval row has it, else cos_mean)")
    parser.add_argument("--throughput", choices=sorted(THROUGHPUTS), default="speedup",
                        help="x axis of the second panel (default speedup: comparable across machines)")
    parser.add_argument("--batch-size", type=int, help="benchmark batch size to use (default: the largest)")
    parser.add_argument("--title", help="figure title (default: model, size and data of the eval files)")
    args = parser.parse_args(argv)
    if args.out.suffix.lower() not in SUFFIXES:
        parser.error(f"--out {args.out}: the suffix must be one of {', '.join(SUFFIXES)}")
    return args


@dataclass
class Point:
    group: str
    method: str
    setting: str
    fidelity: float
    gflops: float
    throughput: Optional[float]


def canonical(options: Any) -> str:
    return json.dumps(options or {}, sort_keys=True, default=str)


def load(path: Path) -> tuple[str, dict[str, Any]]:
    """('eval' or 'benchmark', report), with a clear error for anything else."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    rows = report.get("rows") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: no 'rows' list; expected the JSON of tools/eval_imagenet.py or "
                         "tools/benchmark.py (--out results.json)")
    kind = "benchmark" if report.get("tool") == "benchmark" or "img_per_s_baseline" in rows[0] else "eval"
    required = BENCH_FIELDS if kind == "benchmark" else EVAL_FIELDS
    for i, row in enumerate(rows):
        missing = [f for f in required if f not in row]
        if missing:
            raise ValueError(f"{path}: row {i} ({row.get('setting', '?')}) lacks the field(s) {missing} "
                             f"that a {kind} JSON has")
    if kind == "eval":
        if not any(row.get(m) is not None for row in rows for m in METRICS):
            raise ValueError(f"{path}: no fidelity field ({', '.join(METRICS)}) has a value in any row")
        if not any(row["method"] == "none" for row in rows):
            raise ValueError(f"{path}: no unreduced row (method 'none') to mark the baseline")
    return kind, report


def eval_group(report: dict[str, Any]) -> tuple[str, Optional[int], str]:
    """(model, img size, description) of an eval report: rows of one group share their images."""
    model = str(report.get("model", "?"))
    size = (report.get("preprocessing") or {}).get("input_size")
    img_size = int(size[-1]) if size else None
    data = report.get("data")
    where = f"{Path(data).parent.name}/{Path(data).name}" if data else "?"
    return model, img_size, f"{model}, {img_size or '?'} px, {where} ({report.get('num_images', '?')} images)"


def choose_metric(requested: str, evals: list[tuple[Path, dict[str, Any]]]) -> str:
    rows = [(path, row) for path, report in evals for row in report["rows"]]
    if requested == "auto":
        return "top1" if all(row.get("top1") is not None for _, row in rows) else "cos_mean"
    lacking = sorted({str(path) for path, row in rows if row.get(requested) is None})
    if lacking:
        raise ValueError(f"--metric {requested}: no value in {', '.join(lacking)}")
    return requested


def benchmark_index(benches: list[tuple[Path, dict[str, Any]]], batch_size: Optional[int]
                    ) -> tuple[dict[tuple, dict[str, Any]], dict[tuple, dict[str, Any]], list[str]]:
    """Benchmark rows by (model, img size, method, options) and the baselines by
    (model, img size), at the chosen batch size of each (model, img size)."""
    rows = [row for _, report in benches for row in report["rows"]]
    sizes: dict[tuple, set] = {}
    for row in rows:
        sizes.setdefault((row["model"], row["img_size"]), set()).add(row["batch_size"])
    notes, chosen = [], {}
    for key, batches in sizes.items():
        if batch_size is not None:
            if batch_size not in batches:
                raise ValueError(f"--batch-size {batch_size}: the benchmark of {key[0]} at {key[1]} px has "
                                 f"batch sizes {sorted(batches)}")
            chosen[key] = batch_size
        else:
            chosen[key] = max(batches)
            if len(batches) > 1:
                notes.append(f"{key[0]} {key[1]} px: throughput at batch {chosen[key]} of {sorted(batches)} "
                             "(pick with --batch-size)")
    settings, baselines = {}, {}
    for row in rows:
        key = (row["model"], row["img_size"])
        if row["batch_size"] == chosen[key]:
            settings[(*key, row["method"], canonical(row["options"]))] = row
            baselines[key] = row
    return settings, baselines, notes


def collect(paths: list[Path], metric: str, throughput: str, batch_size: Optional[int]
            ) -> tuple[list[Point], list[Point], str, list[str], Optional[str]]:
    """Points and baselines of every group, the metric used, notes, and where the
    throughput came from (None when there is none)."""
    loaded = [(path, *load(path)) for path in paths]
    evals = [(path, report) for path, kind, report in loaded if kind == "eval"]
    benches = [(path, report) for path, kind, report in loaded if kind == "benchmark"]
    if not evals:
        raise ValueError(f"{', '.join(map(str, paths))}: only tools/benchmark.py output, which has no fidelity "
                         "(top-1 / feature cosine); add a JSON of tools/eval_imagenet.py")
    metric = choose_metric(metric, evals)
    bench_rows, bench_baselines, notes = benchmark_index(benches, batch_size)
    points: dict[tuple[str, str], Point] = {}
    baselines: dict[str, Point] = {}
    sources = set()
    for path, report in evals:
        model, img_size, group = eval_group(report)
        for row in report["rows"]:
            value = row.get(metric)
            if value is None:
                notes.append(f"{path}: {row['setting']} has no {metric}; left out")
                continue
            bench = (bench_baselines.get((model, img_size)) if row["method"] == "none" else
                     bench_rows.get((model, img_size, row["method"], canonical(row.get("options")))))
            speed = None
            if bench is not None:
                speed = (1.0 if row["method"] == "none" else bench["speedup"]) if throughput == "speedup" else \
                    bench["img_per_s_baseline" if row["method"] == "none" else "img_per_s"]
                sources.add(f"tools/benchmark.py, batch {bench['batch_size']}")
            elif row.get(throughput) is not None:
                speed = row[throughput]
                measured = report.get("throughput") or {}
                sources.add(f"tools/eval_imagenet.py, batch {measured.get('batch_size', '?')}")
            point = Point(group, row["method"], row["setting"], float(value), float(row["gflops"]), speed)
            if row["method"] == "none":
                baselines[group] = point
            else:
                if (group, row["setting"]) in points:
                    notes.append(f"{row['setting']} on {group} appears twice; the one in {path} is kept")
                points[(group, row["setting"])] = point
    device = {str(report.get("device")) for _, report in benches} or \
        {str(report.get("device")) for _, report in evals if report.get("throughput")}
    source = (", ".join(sorted(sources)) + f"; device {', '.join(sorted(device))}") if sources else None
    return list(points.values()), list(baselines.values()), metric, notes, source


def short_label(setting: str) -> str:
    """'tome(r=13)' -> 'r=13'; a method at its defaults -> 'defaults'."""
    return setting[setting.index("(") + 1:-1] if "(" in setting and setting.endswith(")") else "defaults"


def plot(points: list[Point], baselines: list[Point], metric: str, throughput: str, source: Optional[str],
         out: Path, title: Optional[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("gflops", "GFLOPs per image (fvcore, multiply-adds)")]
    if any(p.throughput is not None for p in points):
        panels.append(("throughput", THROUGHPUTS[throughput] + (f"\n{source}" if source else "")))
    methods = sorted({p.method for p in points})
    groups = sorted({p.group for p in points} | {b.group for b in baselines})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    markers, styles = "osD^vP", ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.8), squeeze=False)
    for ax, (field, xlabel) in zip(axes[0], panels):
        for g, group in enumerate(groups):
            suffix = f" [{g + 1}]" if len(groups) > 1 else ""
            for method in methods:
                series = sorted((p for p in points if p.group == group and p.method == method
                                 and getattr(p, field) is not None), key=lambda p: getattr(p, field))
                if not series:
                    continue
                xs, ys = [getattr(p, field) for p in series], [p.fidelity for p in series]
                ax.plot(xs, ys, styles[g % len(styles)], marker=markers[g % len(markers)], color=colors[method],
                        label=method + suffix, markersize=6, linewidth=1.3)
                for p, x, y in zip(series, xs, ys):
                    ax.annotate(short_label(p.setting), (x, y), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=colors[method])
            for base in (b for b in baselines if b.group == group and getattr(b, field) is not None):
                ax.plot([getattr(base, field)], [base.fidelity], "*", color="black", markersize=14,
                        label="unreduced" + suffix, zorder=5)
                ax.annotate("unreduced", (getattr(base, field), base.fidelity), textcoords="offset points",
                            xytext=(-8, -14), ha="right", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(METRICS[metric])
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.12, y=0.08)
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = min(len(labels), 6)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    if title is None:
        title = groups[0] if len(groups) == 1 else "\n".join(f"[{g + 1}] {group}" for g, group in enumerate(groups))
    fig.suptitle(title, fontsize=11)
    legend_rows = -(-len(labels) // columns)
    fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.02, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        points, baselines, metric, notes, source = collect(args.inputs, args.metric, args.throughput,
                                                           args.batch_size)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if not any(p.throughput is not None for p in points):
            print("note: no throughput for these settings (eval without timing and no matching benchmark "
                  "rows): GFLOPs panel only", file=sys.stderr)
        plot(points, baselines, metric, args.throughput, source, args.out, args.title)
    except ValueError as error:
        print(f"plot_pareto.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(points)} settings, {METRICS[metric]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
