"""The speedrun's chart: k-NN top-1 against training minutes, one line per recipe (bsim_fast.tools.speedrun).

`chart_layout` is the numbers (the fitted y-axis, the end-of-curve labels), `chart` draws them, `plot` writes
the PNG. The y-axis fits the data: on 0..100 the BSIM-vs-SIM gap of about a point would be a few pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import harness

Y_MARGIN = 0.12  # of the values' range, each side of the fitted y-axis
Y_MIN_MARGIN = 0.5  # k-NN points: a flat curve still gets an axis one point tall
LABEL_GAP = 0.05  # of the axis height between two end-of-curve labels (over a line of 8-point text)


def chart_layout(results: list[dict]) -> tuple[tuple[float, float], list[tuple[str, float, float, str]]]:
    """The chart's y-axis and its end-of-curve labels, as numbers (no drawing).

    The y-axis is fitted to the k-NN values (not 0..100, where the BSIM-vs-SIM gap of a point is a few pixels):
    their range widened by Y_MARGIN of it each side, at least Y_MIN_MARGIN points, clipped to 0..100. Each
    curve's last point is labelled with its value, (recipe, minutes, text y, "91.23"); labels closer than
    LABEL_GAP of the axis are pushed apart upwards (lowest first), and the axis grows to hold the top one."""
    curves = [r for r in results if r["curve"]]
    values = [p["knn_top1"] for r in curves for p in r["curve"]]
    if not values:
        return (0.0, 100.0), []
    lo, hi = min(values), max(values)
    margin = max(Y_MARGIN * (hi - lo), Y_MIN_MARGIN)
    lo, hi = max(0.0, lo - margin), min(100.0, hi + margin)
    gap = LABEL_GAP * (hi - lo)
    labels, below = [], -math.inf
    for r in sorted(curves, key=lambda r: r["curve"][-1]["knn_top1"]):
        last = r["curve"][-1]
        text_y = max(last["knn_top1"], below + gap)
        labels.append((r["recipe"], last["minutes"], text_y, f"{last['knn_top1']:.2f}"))
        below = text_y
    return (lo, max(hi, below + gap / 2)), labels


def chart(results: list[dict], env: dict, targets: list[dict]):
    """k-NN top-1 against training minutes, one line per recipe (images/s in the legend), each curve's last
    value printed at its end, the targets' levels (those within the fitted axis) and minutes dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    (lo, hi), labels = chart_layout(results)
    colours = {}
    for r in results:
        if not r["curve"]:
            continue
        speed = f", {r['steady_images_s']:,.0f} img/s" if r.get("steady_images_s") else ""
        (line,) = ax.plot(
            [p["minutes"] for p in r["curve"]],
            [p["knn_top1"] for p in r["curve"]],
            marker="o",
            markersize=3,
            label=f"{r['recipe']} ({r['mode'].upper()}{speed})",
        )
        colours[r["recipe"]] = line.get_color()
    for recipe, minutes, text_y, text in labels:
        # x: 5 points right of the curve's end; y: the label's own height (apart from its neighbours)
        ax.annotate(
            text,
            (minutes, text_y),
            xytext=(5, text_y),
            textcoords=("offset points", "data"),
            va="center",
            fontsize=8,
            color=colours[recipe],
        )
    for level in sorted({t["top1"] for t in targets}):
        if lo <= level <= hi:
            ax.axhline(level, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(f"{level:g}%", (0, level), xytext=(2, 2), textcoords="offset points", fontsize=7, color="grey")
    for minutes in sorted({t["minutes"] for t in targets}):
        if any(r["budget_min"] >= minutes for r in results):
            ax.axvline(minutes, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("training minutes (k-NN passes not included)")
    ax.set_ylabel("k-NN top-1 (%)")
    ends = [p["minutes"] for r in results for p in r["curve"]]
    ax.set_xlim(0, 1.1 * max(ends) if ends and max(ends) > 0 else None)  # room for the last values' labels
    ax.set_ylim(lo, hi)
    ax.grid(alpha=0.3)
    if colours:
        ax.legend(fontsize=8, loc="best")
    ax.set_title(
        f"CIFAR-10 time to accuracy · {env.get('device')} · commit {env.get('commit') or '?'} · "
        f"torch {env.get('torch')}",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot(results: list[dict], path: Path, env: dict, targets: list[dict]) -> None:
    """`chart` as a PNG at `path`, written atomically."""
    harness.write_png(path, chart(results, env, targets))
