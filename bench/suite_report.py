"""Writers for bench_all.py: the markdown table, the JSON document and the PNG chart.

They take one results dict (see ``bench_all.build_results``)::

    {"title", "machine": {...}, "params": {...}, "notes": [str],
     "contenders": [{"key", "label"}],
     "figures": [{"key", "label", "unit", "values": {contender: float | None},
                  "failed": {contender: str}, "goal": {contender: float}, "samples": {contender: int}}]}

A value of None is "n/a" (the figure does not apply to that contender, or it was skipped);
a contender in ``failed`` shows "failed". Goals are upper bounds (value <= goal).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "count":
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def verdicts(figure: dict[str, Any], labels: dict[str, str]) -> str:
    """``<= 25 ERA local: ok · <= 40 ERA Docker: MISSED`` for the goals of a figure."""
    parts = []
    for key, bound in (figure.get("goal") or {}).items():
        if key not in labels:
            continue
        value = figure["values"].get(key)
        if key in (figure.get("failed") or {}):
            state = "failed"
        elif value is None:
            state = "not measured"
        else:
            state = "ok" if value <= bound else "MISSED"
        parts.append(f"≤ {bound:g} {labels[key]}: {state}")
    return " · ".join(parts)


def cell(figure: dict[str, Any], key: str) -> str:
    if key in (figure.get("failed") or {}):
        return "failed"
    return fmt(figure["values"].get(key), figure["unit"])


def markdown(results: dict[str, Any]) -> str:
    contenders = results["contenders"]
    labels = {c["key"]: c["label"] for c in contenders}
    m = results.get("machine", {})
    lines = [f"# {results.get('title', 'Benchmark')}", ""]
    lines.append(" · ".join(str(x) for x in (
        m.get("date"), f"{m.get('cpu_count')} CPUs", f"Python {m.get('python')}",
        f"ipykernel {m.get('ipykernel')}", f"jupyter_client {m.get('jupyter_client')}",
        f"kernel_gateway {m.get('kernel_gateway')}", f"{results.get('params', {}).get('mode', '')} run",
        f"{results.get('wall_s', 0):.0f} s") if x))
    lines += ["", "| figure | " + " | ".join(c["label"] for c in contenders) + " | goal |",
              "| --- | " + " | ".join("---:" for _ in contenders) + " | --- |"]
    for figure in results["figures"]:
        lines.append(f"| {figure['label']} ({figure['unit']}) | "
                     + " | ".join(cell(figure, c["key"]) for c in contenders)
                     + f" | {verdicts(figure, labels)} |")
    failures = [f"- {figure['label']}, {labels.get(key, key)} failed: {message}"
                for figure in results["figures"] for key, message in (figure.get("failed") or {}).items()]
    notes = [f"- {note}" for note in results.get("notes", [])]
    if notes or failures:
        lines += [""] + notes + failures
    return "\n".join(lines) + "\n"


def write_markdown(results: dict[str, Any], path: Path) -> str:
    text = markdown(results)
    Path(path).write_text(text)
    return text


def write_json(results: dict[str, Any], path: Path) -> None:
    def clean(value: Any) -> Any:  # NaN is not JSON
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    Path(path).write_text(json.dumps(clean(results), indent=2, ensure_ascii=False) + "\n")


PANELS = (("ms", "latency (ms, log scale, lower is better)", True),
          ("runs/s", "load throughput (runs/s, higher is better)", False),
          ("MiB", "memory per idle kernel (MiB)", False),
          ("count", "load errors", False))
COLOURS = ("#7f7f7f", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b")


def write_png(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: one group per figure, one colour per contender; latency on top, the rest below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contenders = results["contenders"]
    panels = [(title, log, [f for f in results["figures"] if f["unit"] == unit]) for unit, title, log in PANELS]
    panels = [p for p in panels if p[2]]
    top, rest = panels[:1], panels[1:]
    fig = plt.figure(figsize=(14, 9.5 if rest else 5.5))
    grid = fig.add_gridspec(2 if rest else 1, max(1, len(rest)), height_ratios=[3, 2] if rest else [1])
    axes = [fig.add_subplot(grid[0, :])] + [fig.add_subplot(grid[1, i]) for i in range(len(rest))]
    bar = 0.8 / max(1, len(contenders))
    for n, (ax, (title, log, figures)) in enumerate(zip(axes, top + rest)):
        highest = 0.0
        for i, contender in enumerate(contenders):
            xs, ys = [], []
            for j, figure in enumerate(figures):
                value = figure["values"].get(contender["key"])
                failed = contender["key"] in (figure.get("failed") or {})
                if value is None or failed or (isinstance(value, float) and math.isnan(value)):
                    continue
                xs.append(j - 0.4 + bar * (i + 0.5))
                ys.append(max(value, 1e-3) if log else value)
            highest = max([highest, *ys])
            bars = ax.bar(xs, ys, bar, label=contender["label"], color=COLOURS[i % len(COLOURS)])
            if n:  # few bars: print the values
                ax.bar_label(bars, labels=[fmt(y, figures[0]["unit"]) for y in ys], fontsize=8)
        for j, figure in enumerate(figures):  # goals: a dashed tick over the bar they bind
            for key, bound in (figure.get("goal") or {}).items():
                i = next((k for k, c in enumerate(contenders) if c["key"] == key), None)
                if i is not None and (bound > 0 or not log):
                    x = j - 0.4 + bar * (i + 0.5)
                    ax.hlines(bound, x - bar / 2, x + bar / 2, colors="red", linestyles="dashed", linewidth=1.5)
        if log:
            ax.set_yscale("log")
        else:  # linear panels start at 0; an all-zero panel (no errors) still gets a scale
            ax.set_ylim(0, max(1.0, highest * 1.15))
        ax.set_xticks(range(len(figures)))
        ax.set_xticklabels([f["label"] for f in figures], rotation=20 if n == 0 else 0,
                           ha="right" if n == 0 else "center", fontsize=8)
        ax.set_xlim(-0.6, len(figures) - 0.4)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    m = results.get("machine", {})
    fig.suptitle(f"{results.get('title', 'Benchmark')} — {m.get('date', '')}, {m.get('cpu_count')} CPUs, "
                 f"{results.get('params', {}).get('mode', '')} run (red dashes: goals; missing bar: n/a)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
