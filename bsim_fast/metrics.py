"""Metrics to the console (a progress bar), to `metrics.csv` and to TensorBoard (with the views grid and λ's
histogram), from rank 0 only.

A resumed run starts where its checkpoint was written, so what the interrupted run logged after that step is
removed first (metrics.csv rewritten atomically, TensorBoard events purged): every step is in the files once.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

from .atomic import write_text_atomic


def cut_metrics(path: Path, step: int) -> int:
    """Drop the rows of metrics.csv logged after `step`'s checkpoint: later steps, and k-NN rows at `step`
    itself (the k-NN runs after the checkpoint and is run again). Returns how many rows were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]

    def kept(row) -> bool:
        try:
            s = int(row[0])
        except (ValueError, IndexError):  # a row the killed run left half-written
            return False
        return s < step or (s == step and row[1] == "train")

    keep = [r for r in body if kept(r)]
    if len(keep) < len(body):
        out = io.StringIO()
        csv.writer(out).writerows([header] + keep)
        write_text_atomic(path, out.getvalue())
    return len(body) - len(keep)


def clock(seconds: float) -> str:
    """0:41, 12:05, 3:02:10."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Elapsed time and time left, for the plain progress line: the pace is measured from the first logged step
    of this process on (the steps before it carry the start-up: filling the loader, compiling), so the first
    line says the elapsed time only. Times in seconds of one clock (time.monotonic)."""

    def __init__(self, total_steps: int, now: float):
        self.total, self.t0, self.ref = total_steps, now, None

    def line(self, step: int, now: float) -> str:
        text = f"elapsed {clock(now - self.t0)}"
        if self.ref is None:
            self.ref = (now, step)
            return text
        t_ref, step_ref = self.ref
        if step > step_ref:
            text += f" left {clock((now - t_ref) / (step - step_ref) * max(0, self.total - step))}"
        return text


class MetricsLogger:
    """total_steps: the steps this run will reach (what the progress line shows after the slash);
    start_step: the step it resumes from (0 for a new run): later rows are removed (`cut_metrics`)."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.progress = Progress(total_steps, time.monotonic())
        self.bar = None
        self.tb = None
        self._csv_file = None
        self._csv = None
        if not enabled:
            return
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        from tqdm import tqdm

        self.total_steps = total_steps
        cut_metrics(self.out_dir / "metrics.csv", start_step)
        # a bar on a terminal; in a log file (no TTY) one plain line per logging step instead
        self.bar = (
            tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout)
            if sys.stdout.isatty()
            else None
        )
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the events a killed run wrote after the resumed step
                tb_dir = self.out_dir / "tb"
                self.tb = SummaryWriter(str(tb_dir), purge_step=start_step + 1 if tb_dir.exists() else None)
            except ImportError:
                print("[metrics] tensorboard is not installed; logging to metrics.csv only")

    def log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        # long format (one row per value) so a resumed run appends to the same file whatever it logs
        new = self._csv is None and not (self.out_dir / "metrics.csv").exists()
        if self._csv is None:
            self._csv_file = open(self.out_dir / "metrics.csv", "a", newline="")
            self._csv = csv.writer(self._csv_file)
        if new:
            self._csv.writerow(["step", "kind", "name", "value"])
        for k, v in values.items():
            self._csv.writerow([step, kind, k, f"{float(v):.6g}"])
        self._csv_file.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"{kind}/{k}", float(v), step)
        shown = {k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "lr", "img_s", "lam", "mem_gb")}
        if kind == "train" and self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
        elif kind == "train":  # a log file: the bar's elapsed and remaining time written out
            values_text = " ".join(f"{k}={v}" for k, v in shown.items())
            times = self.progress.line(step, time.monotonic())
            print(f"step {step}/{self.total_steps} {values_text} {times}", flush=True)
        else:
            self.print(f"[{kind}] step {step}: " + json.dumps({k: round(float(v), 4) for k, v in values.items()}))

    def image(self, step: int, tag: str, image) -> None:
        """An HWC uint8 picture (`views.views_grid`) to TensorBoard; nothing without it."""
        if self.tb:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def histogram(self, step: int, tag: str, values) -> None:
        """The distribution of `values` (a host tensor or array) to TensorBoard; nothing without it."""
        if self.tb and len(values):
            self.tb.add_histogram(tag, values, step)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb:
            self.tb.close()
        if self._csv_file:
            self._csv_file.close()
