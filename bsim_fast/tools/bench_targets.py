"""The benchmark's targets (one H100, full sizes) and how each is read from the benchmark's rows.

`TARGETS` is the one source of the targets table in docs/BENCHMARKS.md (`targets_markdown`, which a test keeps
equal to the document) and of the pass / miss column of the benchmark's and the acceptance run's reports
(`evaluate`, through `harness.judge`).
"""

from __future__ import annotations

from collections.abc import Callable

from . import harness

# One H100, full sizes. `metric` names a function of the rows in METRICS; `op` is how the measured value
# must compare with `value`. Sources: the project's product targets (BYOL-BSIM 2,200 images/s follows from
# ~116 ms per ResNet-50 step at batch 256) and the view-pipeline budget (docs/BENCHMARKS.md, kernels).
TARGETS = [
    dict(
        id="cutmix_speedup",
        what="CutMix + normalise kernel vs its PyTorch reference, N=256, 224², bf16",
        metric="cutmix_speedup",
        op=">=",
        value=3.0,
        unit="×",
    ),
    dict(
        id="cutmix_bandwidth",
        what="CutMix + normalise kernel, fraction of device-copy bandwidth",
        metric="cutmix_bandwidth",
        op=">=",
        value=0.70,
        unit="of copy",
    ),
    dict(
        id="view_pipeline_ms",
        what="photometric + CutMix + normalise of a 256 × 224² two-view batch",
        metric="view_pipeline_ms",
        op="<=",
        value=2.0,
        unit="ms",
    ),
    dict(
        id="view_pipeline_launches",
        what="kernel launches of that path, per view (outside the model)",
        metric="view_pipeline_launches",
        op="<=",
        value=6,
        unit="launches",
    ),
    dict(
        id="dali_loader",
        what="DALI loader-only, two-view images/s at 224 (recipe policy)",
        metric="loader_dali",
        op=">=",
        value=12000,
        unit="images/s",
    ),
    dict(
        id="ffcv_loader",
        what="FFCV loader-only (one decode, two views), images/s at 224, 16 cores",
        metric="loader_ffcv",
        op=">=",
        value=3300,
        unit="images/s",
    ),
    dict(
        id="byol_bsim_model",
        what="model-only BYOL-BSIM ResNet-50 224, batch 256, compiled, bf16",
        metric="byol_bsim_model",
        op=">=",
        value=2200,
        unit="images/s",
    ),
    dict(
        id="bsim_overhead",
        what="BSIM step time over SIM, BYOL ResNet-50 224 compiled",
        metric="bsim_overhead",
        op="<=",
        value=0.03,
        unit="fraction",
    ),
    dict(
        id="e2e_dali",
        what="end-to-end DALI / model-only (BYOL-BSIM ResNet-50 224)",
        metric="e2e_ratio_dali",
        op=">=",
        value=0.95,
        unit="× model-only",
    ),
    dict(
        id="e2e_ffcv",
        what="end-to-end FFCV / model-only (BYOL-BSIM ResNet-50 224)",
        metric="e2e_ratio_ffcv",
        op=">=",
        value=0.90,
        unit="× model-only",
    ),
    dict(
        id="e2e_vs_torchvision",
        what="best end-to-end (DALI or FFCV) / torchvision DataLoader end-to-end",
        metric="e2e_vs_torch",
        op=">=",
        value=8.0,
        unit="×",
    ),
]
FULL_SIZE = 224  # the targets are for this resolution and ResNet-50
VIEW_PATH = "augment_cutmix_normalize_two_views"  # bsim_fast.tools.kernel_bench's row for the whole view path


def measured_row(rows, **match) -> dict | None:
    """The measured row (not skipped) whose fields equal `match`, or None."""
    for r in rows:
        if "skipped" not in r and "error" not in r and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _field(row, key):
    return None if row is None else row.get(key)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _bsim_overhead(rows):
    sim = measured_row(rows, kind="model", method="byol", mode="sim", arch="resnet50", size=FULL_SIZE, compile=True)
    bsim = measured_row(rows, kind="model", method="byol", mode="bsim", arch="resnet50", size=FULL_SIZE, compile=True)
    if sim is None or bsim is None:
        return None
    return sim["images_s"] / bsim["images_s"] - 1.0  # extra step time of BSIM, as a fraction of SIM's


def _e2e_ratio(rows, loader):
    return _field(measured_row(rows, kind="end_to_end", loader=loader, size=FULL_SIZE), "ratio_to_model")


def _e2e_vs_torch(rows):
    best = [
        _field(measured_row(rows, kind="end_to_end", loader=k, size=FULL_SIZE), "images_s") for k in ("dali", "ffcv")
    ]
    best = max((b for b in best if b is not None), default=None)
    return _ratio(best, _field(measured_row(rows, kind="end_to_end", loader="torch", size=FULL_SIZE), "images_s"))


METRICS: dict[str, Callable[[list[dict]], float | None]] = {
    "cutmix_speedup": lambda rows: _field(measured_row(rows, kind="kernel", name="cutmix_normalize"), "speedup"),
    "cutmix_bandwidth": lambda rows: _field(measured_row(rows, kind="kernel", name="cutmix_normalize"), "frac_of_copy"),
    "view_pipeline_ms": lambda rows: _field(measured_row(rows, kind="kernel", name=VIEW_PATH), "ms"),
    "view_pipeline_launches": lambda rows: _field(measured_row(rows, kind="kernel", name=VIEW_PATH), "launches"),
    "loader_dali": lambda rows: _field(measured_row(rows, kind="loader", loader="dali", size=FULL_SIZE), "images_s"),
    "loader_ffcv": lambda rows: _field(measured_row(rows, kind="loader", loader="ffcv", size=FULL_SIZE), "images_s"),
    "byol_bsim_model": lambda rows: _field(
        measured_row(rows, kind="model", method="byol", mode="bsim", arch="resnet50", size=FULL_SIZE, compile=True),
        "images_s",
    ),
    "bsim_overhead": _bsim_overhead,
    "e2e_ratio_dali": lambda rows: _e2e_ratio(rows, "dali"),
    "e2e_ratio_ffcv": lambda rows: _e2e_ratio(rows, "ffcv"),
    "e2e_vs_torch": _e2e_vs_torch,
}


def target_text(t: dict) -> str:
    value = f"{t['value']:,}" if isinstance(t["value"], int) or t["value"] >= 100 else f"{t['value']:g}"
    sep = "" if t["unit"].startswith("×") else " "
    return f"{'≥' if t['op'] == '>=' else '≤'} {value}{sep}{t['unit']}"


def evaluate(rows: list[dict], applicable: bool) -> list[dict]:
    """Each target with its measured value and its status (`harness.judge`). On a CPU or at tiny sizes the
    targets do not apply (`n/a`): they are for one H100 at full sizes."""
    out = []
    for t in TARGETS:
        value = METRICS[t["metric"]](rows)
        met = None if value is None else harness.meets(value, t["op"], t["value"])
        out.append({**t, "target": target_text(t), "measured": value, "status": harness.judge(met, applicable)})
    return out


def targets_markdown() -> str:
    """The targets table of docs/BENCHMARKS.md (a test checks the document holds exactly this)."""
    return harness.targets_doc_table(TARGETS, "what (one H100)", target_text)
