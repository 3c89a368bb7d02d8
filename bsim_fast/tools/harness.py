"""What the measuring tools share (bench, speedrun, gpu_check, kernel_bench): timing loops, time budgets,
targets → status → markdown, report writing and the environment record.

Timing. `timed(fn, device, warmup, iters)` is the one throughput loop: `fn` returns the items it handled; the
device is synchronised before the clock starts and when it stops (a host sync each, outside the timed calls).
`images_s(views, device, warmup, count, step)` runs `count` pairs of uint8 views through the trainer's own
step (`step.TrainStep`; without one, the views are only drawn: loader-only) inside it: the model-only rows
repeat one pair, the end-to-end rows and the speedrun's calibration draw them from a loader (`loader_views`).
`median_ms` is the per-call time of a kernel (CUDA events, L2 flushed before each call).

Budgets. `Budget`: work that would end after the deadline is skipped and reported so, never started.

Targets. Each tool decides from its own figures whether a target was met (True / False) or could not be
told (None: not measured); `judge` turns that into the status every report prints: `pass`, `miss`, `n/a`
(measured, but the targets are for another machine or size) or `not measured`. `targets_doc_table` is a
tool's targets as its document lists them, `targets_report_table` the evaluated targets in a report.

Reports. `write_report(out, stem, data, markdown)` writes `<stem>.json` and `<stem>.md` together and
`write_png` a figure, all through `bsim_fast.atomic`: a reader (or a run cut off while writing) finds the
previous version or the new one, complete. `environment` is `bsim_fast.provenance.environment`;
`environment_lines` is how a report's header states it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from bsim_fast.atomic import atomic_outputs, write_bytes_atomic
from bsim_fast.provenance import environment

__all__ = [
    "Budget",
    "environment",
    "environment_lines",
    "error_text",
    "images_s",
    "installed",
    "judge",
    "loader_views",
    "md_table",
    "median_ms",
    "meets",
    "peak_mem_gb",
    "reset_peak",
    "sync",
    "targets_doc_table",
    "targets_report_table",
    "timed",
    "write_png",
    "write_report",
]

STATUSES = ("pass", "miss", "n/a", "not measured")


# ----------------------------------------------------------------------------------------------- timing
def sync(device: torch.device | str) -> None:
    """Waits for the device's queued work (a host sync); nothing on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], int], device: torch.device | str, warmup: int, iters: int) -> tuple[float, float]:
    """(items/s, seconds timed) of `iters` calls of `fn`, which returns the items it handled, after `warmup`
    untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0, items = time.perf_counter(), 0
    for _ in range(iters):
        items += fn()
    sync(device)
    seconds = time.perf_counter() - t0
    return items / seconds, seconds


def images_s(
    views: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    warmup: int,
    count: int,
    step: Callable[[torch.Tensor, torch.Tensor], object] | None = None,
) -> tuple[float, float]:
    """(source images/s, seconds) over `count` pairs of views from `views` after `warmup` pairs, each pair
    through `step` (the trainer's step: model-only or end-to-end) or only drawn (loader-only)."""

    def one() -> int:
        a_u8, b_u8 = next(views)
        if step is not None:
            step(a_u8, b_u8)
        return a_u8.shape[0]

    return timed(one, device, warmup, count)


def loader_views(loader, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`n` batches of two views from `loader`, epoch after epoch from epoch 0 (labels dropped)."""
    epoch = 0
    while n > 0:
        got = 0
        for a_u8, b_u8, _ in loader.epoch(epoch):
            got += 1
            yield a_u8, b_u8
            n -= 1
            if n == 0:
                return
        if got == 0:
            raise RuntimeError("the loader yields no batch: fewer images than one batch")
        epoch += 1


def median_ms(fn: Callable[[], object], iters: int, device: torch.device | str) -> float:
    """Median time of one call of `fn` in ms, after one untimed call (compilation, allocator): CUDA events
    with L2 flushed before every call (the way a fresh batch arrives); wall time on a CPU."""
    device = torch.device(device)
    fn()
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # larger than any L2
        for _ in range(iters):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def reset_peak(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem_gb(device: torch.device | str) -> float | None:
    """Peak allocated device memory since the last reset; None (n/a) on a CPU, where it is not tracked."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None


# ---------------------------------------------------------------------------------------------- budgets
class Budget:
    """A deadline (Unix time; None: none). What would end after it is skipped, reported, never started."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    @classmethod
    def of(cls, seconds: float | None) -> Budget:
        """A budget of `seconds` from now."""
        return cls(None if seconds is None else time.time() + seconds)

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.time()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


# ---------------------------------------------------------------------------------------------- targets
def meets(value: float, op: str, bound: float) -> bool:
    """Whether `value` satisfies `op bound` (op: ">=" or "<=")."""
    if op not in (">=", "<="):
        raise ValueError(f"target op {op!r}: expected '>=' or '<='")
    return value >= bound if op == ">=" else value <= bound


def judge(met: bool | None, applicable: bool) -> str:
    """The status of a target: `not measured` without a figure (met None), `n/a` when the figure is from a
    machine or size the target is not for, else `pass` or `miss`."""
    if met is None:
        return "not measured"
    if not applicable:
        return "n/a"
    return "pass" if met else "miss"


def md_table(header: list[str], rows: Iterable[list]) -> list[str]:
    """A markdown table as lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def targets_doc_table(targets: list[dict], what: str, target_text: Callable[[dict], str]) -> str:
    """The targets as the documents list them (a test keeps each document equal to its tool's list)."""
    return "\n".join(md_table(["id", what, "target"], ([f"`{t['id']}`", t["what"], target_text(t)] for t in targets)))


def targets_report_table(evaluated: list[dict], measured_text: Callable[[object], str] = str) -> list[str]:
    """Evaluated targets (each with `target`, `measured`, `status`) as a report's lines."""
    rows = (
        [f"`{t['id']}`", t["what"], t["target"], "—" if t["measured"] is None else measured_text(t["measured"])]
        + [f"**{t['status']}**"]
        for t in evaluated
    )
    return md_table(["id", "what", "target", "measured", "status"], rows)


# ---------------------------------------------------------------------------------------------- reports
def write_report(out: Path, stem: str, data: dict, markdown: str | None = None) -> None:
    """`<out>/<stem>.json` (and `<stem>.md`), written together: each is its previous version or the new one,
    complete (atomic.py), and both are renamed into place only once both are written."""
    out = Path(out)
    text = json.dumps(data, indent=1, default=str)
    outputs = [(out / f"{stem}.json", False)] + ([(out / f"{stem}.md", False)] if markdown is not None else [])
    with atomic_outputs(*outputs) as temps:
        temps[0].write_text(text, encoding="utf-8")
        if markdown is not None:
            temps[1].write_text(markdown, encoding="utf-8")


def write_png(path: Path, figure, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG at `path`, written atomically."""
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=dpi)
    write_bytes_atomic(path, png.getvalue())


def environment_lines(env: dict) -> list[str]:
    """A report's header: the device, the versions that change results and where the code came from."""
    return [
        f"- device: {env.get('device')} ({env.get('gpu_memory_gb', '—')} GB), driver {env.get('driver') or '—'}, "
        f"{env.get('cpus')} CPU cores",
        f"- torch {env.get('torch')} (CUDA {env.get('cuda') or '—'}), torchvision {env.get('torchvision') or '—'}, "
        f"triton {env.get('triton') or '—'}, DALI {env.get('dali') or 'not installed'}, "
        f"FFCV {env.get('ffcv') or 'not installed'}, Python {env.get('python')}",
        f"- commit {env.get('commit') or '—'}, {env.get('time')}",
    ]


def installed(module: str) -> bool:
    """Whether `module` can be imported here, without importing it (FFCV's import alone takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # its parent package is missing, or it was made unimportable
        return False


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def error_text(e: BaseException) -> str:
    """An exception as one line of a report: its type and the first line of its message."""
    return f"{type(e).__name__}: {first_line(e)}"
