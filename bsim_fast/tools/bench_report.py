"""The benchmark's rows as text and as a chart: `describe` (one row in a few words), `table` (every row, as the
console and the acceptance report print them) and `plot` (`bench.png`, written atomically)."""

from __future__ import annotations

from pathlib import Path

from . import harness


def describe(r: dict) -> str:
    if r["kind"] == "kernel":
        return f"{r['name']}" + (f" N={r['n']} {r['size']}² {r['dtype']}" if "n" in r else "")
    if r["kind"] == "model":
        return (
            f"{r['method']}/{r['mode']} {r['arch']}@{r['size']} b{r['batch']} {'compiled' if r['compile'] else 'eager'}"
        )
    return f"{r['loader']}@{r['size']} b{r['batch']} w{r['workers']}"


def fmt_gb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def table(rows: list[dict]) -> str:
    lines = [f"{'kind':<11} {'what':<44} {'images/s':>12} {'peak GB':>8}  note"]
    for r in rows:
        what = describe(r)
        if "skipped" in r or "error" in r:
            lines.append(
                f"{r['kind']:<11} {what:<44} {'-':>12} {'-':>8}  "
                f"{'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}"
            )
            continue
        if r["kind"] == "kernel":
            lines.append(
                f"{'kernel':<11} {what:<44} {r['ms']:>10.4f}ms {'':>8}  ref {r['ref_ms']:.4f} ms, "
                f"{r['speedup']:.2f}x, {r['gbps']:.0f} GB/s = {100 * r['frac_of_copy']:.0f}% of copy"
                + (f", {r['launches']:g} launches/view" if r.get("launches") is not None else "")
            )
            continue
        note = ""
        if "ratio_to_model" in r:
            note = f"{r['ratio_to_model']:.2f}x model-only"
            if not r["ratio_meaningful"]:
                note += " (not meaningful: timing noise / tiny run)"
        lines.append(f"{r['kind']:<11} {what:<44} {r['images_s']:>12,.0f} {fmt_gb(r.get('peak_mem_gb')):>8}  {note}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, env: dict) -> None:
    """One panel per kind of row, each on its own (log) scale with the value printed at every bar, so no
    kind hides another; device, commit and versions in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    kernels = [r for r in rows if r["kind"] == "kernel" and "ms" in r]
    if kernels:
        bars = []
        for r in kernels:
            bars.append((f"{r['name']} (Triton)", r["ms"], "tab:purple"))
            if r.get("ref_ms") and r["ref_ms"] == r["ref_ms"]:  # NaN: no reference for this row
                bars.append((f"{r['name']} (PyTorch ref.)", r["ref_ms"], "tab:gray"))
        panels.append(("kernels: ms per call (lower is better)", bars, "{:.3g} ms"))
    for kind, title, colour in (
        ("loader", "loader-only: two-view images/s", "tab:blue"),
        ("model", "model-only: images/s", "tab:orange"),
        ("end_to_end", "end-to-end: images/s (ratio to model-only)", "tab:green"),
    ):
        bars = []
        for r in rows:
            if r["kind"] != kind or "images_s" not in r:
                continue
            label = describe(r)
            if "ratio_to_model" in r:
                label += f"  ({r['ratio_to_model']:.2f}x{'' if r['ratio_meaningful'] else ', n/m'})"
            bars.append((label, r["images_s"], colour))
        if bars:
            panels.append((title, bars, "{:,.0f}"))
    if not panels:
        return
    heights = [0.28 * len(b) + 0.9 for _, b, _ in panels]
    fig = Figure(figsize=(10, sum(heights) + 0.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (title, bars, fmt) in zip(axes[:, 0], panels):
        values = [v for _, v, _ in bars]
        ax.barh([n for n, _, _ in bars], values, color=[c for *_, c in bars])
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 2, max(values) * 6)  # room for the printed values
        for i, v in enumerate(values):
            ax.text(v * 1.05, i, fmt.format(v) if v >= 100 else f"{v:.3g}", va="center", fontsize=7)
        ax.set_title(title, fontsize=9, loc="left")
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    fig.suptitle(
        f"bsim_fast bench · {env.get('device')} · commit {env.get('commit') or '?'} · "
        f"torch {env.get('torch')} · {env.get('time')}",
        fontsize=9,
    )
    fig.tight_layout()
    harness.write_png(path, fig)
