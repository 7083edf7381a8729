"""The comparison table: one row per setting, printed aligned, written as JSON, CSV or Markdown."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .inference import SampleResults
from .metrics import feature_fidelity
from .settings import Setting


def comparison_rows(settings: Sequence[Setting], results: SampleResults, gflops: Sequence[Optional[float]],
                    images_per_s: Optional[Sequence[float]]) -> list[dict[str, Any]]:
    """One row per setting; model 0 must be the unreduced baseline.

    speedup = img/s ÷ baseline img/s; flop_ratio = baseline GFLOPs ÷ GFLOPs;
    efficiency = speedup ÷ flop_ratio (1.0: the FLOPs saved all turn into time).
    """
    rows = []
    for m, setting in enumerate(settings):
        row: dict[str, Any] = {"setting": setting.label, "method": setting.method}
        row.update(results.accuracy(m))
        row["gflops"] = gflops[m]
        row["flop_ratio"] = gflops[0] / gflops[m] if gflops[0] and gflops[m] else None
        row.update(feature_fidelity(results.features[0], results.features[m]))
        row["img_per_s"] = images_per_s[m] if images_per_s else None
        row["speedup"] = images_per_s[m] / images_per_s[0] if images_per_s else None
        row["efficiency"] = (row["speedup"] / row["flop_ratio"]
                             if row["speedup"] is not None and row["flop_ratio"] else None)
        rows.append(row)
    return rows


TABLE_COLUMNS = [  # (key, header, format)
    ("setting", "setting", "{}"), ("top1", "top-1", "{:.2f}"), ("top5", "top-5", "{:.2f}"),
    ("gflops", "GFLOPs", "{:.3f}"), ("flop_ratio", "FLOP ratio", "{:.2f}x"),
    ("cos_mean", "cos mean", "{:.4f}"), ("cos_p5", "cos p5", "{:.4f}"),
    ("nn_agreement", "NN agree", "{:.3f}"), ("img_per_s", "img/s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"), ("efficiency", "efficiency", "{:.2f}"),
]


def _table_cells(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS
                 ) -> list[list[str]]:
    """Header plus one formatted line per row ('-' where not measured)."""
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None or value != value else fmt.format(value)

    return [[header for _, header, _ in columns]] + [
        [cell(row, key, fmt) for key, _, fmt in columns] for row in rows
    ]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> str:
    """Rows as a Markdown table ('-' where not measured)."""
    table = _table_cells(rows, columns)
    lines = ["| " + " | ".join(line) + " |" for line in table]
    lines.insert(1, "|" + "---|" * len(table[0]))
    return "\n".join(lines)


def describe_timing(report: dict[str, Any]) -> str:
    """How throughput was measured, for a table's caption."""
    throughput = report.get("throughput") or {}
    return (f"throughput: batch {throughput.get('batch_size')}, device {report['device']}, amp {report['amp']}"
            if throughput else "throughput not measured")


def format_markdown(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table, preceded by what it was measured on."""
    caption = (f"{report['weights']}; {report['num_images']} images of `{Path(report['data']).name}` "
               f"({Path(report['data']).parent.name}); {describe_timing(report)}. Written by `tools/eval_imagenet.py`.")
    return caption + "\n\n" + markdown_table(report["rows"])


README_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


def section_markers(name: str) -> tuple[str, str]:
    """The comment pair a Markdown file marks a tool's section with: ``<!-- name:start -->`` ..."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"section name {name!r} must be letters, digits, '-' or '_'")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_markdown(path: Path, report: dict[str, Any],
                   markdown: Callable[[dict[str, Any]], str] = format_markdown,
                   markers: tuple[str, str] = README_MARKERS) -> None:
    """Write ``markdown(report)``; into an existing file between ``markers`` when
    it has them (so the README's results are the tool's output, not typed by hand)."""
    write_between_markers(path, markdown(report), markers)


def write_between_markers(path: Path, text: str, markers: tuple[str, str] = README_MARKERS) -> None:
    """Write ``text`` to ``path``, or only between ``markers`` when the file exists and has them."""
    start, end = markers
    if path.exists() and start in (old := path.read_text()) and end in old:
        head, rest = old.split(start, 1)
        text = head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    path.write_text(text if text.endswith("\n") else text + "\n")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> str:
    """Aligned plain-text table of rows ('-' where not measured); ``columns`` are
    (key, header, format) triples, the comparison's by default. Columns whose
    format is ``{}`` are left-aligned (text), the others right-aligned (numbers)."""
    table = _table_cells(rows, columns)
    widths = [max(len(line[c]) for line in table) for c in range(len(columns))]
    left = [fmt == "{}" for _, _, fmt in columns]
    lines = ["  ".join(text.ljust(w) if left[c] else text.rjust(w) for c, (text, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_results(path: Path, report: dict[str, Any],
                  markdown: Callable[[dict[str, Any]], str] = format_markdown,
                  markers: tuple[str, str] = README_MARKERS) -> None:
    """Save a report: its rows as CSV (.csv), as ``markdown(report)`` (.md, see
    ``write_markdown``), else the whole of it as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".md":
        write_markdown(path, report, markdown, markers)
    elif path.suffix.lower() == ".csv":
        rows = report["rows"]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    else:
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
