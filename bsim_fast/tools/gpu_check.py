"""The acceptance run: GPU tests, time to accuracy, an ImageNet-like data set, the benchmark, one report.

    bash scripts/gpu_check.sh OUT_DIR [--cifar DIR]   # on one GPU: within --budget-s (default 540 s)
    bash scripts/gpu_check.sh OUT_DIR --tiny          # the CPU version (the default without a GPU), a few minutes

Stages, in this order, each timed and reported, none stopping the others:
  1. `pytest -m gpu` (the tests that need CUDA; on a CPU they skip, which the report says);
  2. time to accuracy, when `--cifar DIR` gives CIFAR-10 (any form the speedrun reads: `train/` + `test/`
     image folders, the python version's archive or folder): `small/byol` (SIM) and `small/byol_wbsim`, each
     for `--tta-minutes` of training clock (default 1.5), eager, through the speedrun (`bsim_fast.tools.speedrun`:
     the set decoded once into GPU memory, the schedule fitted to the budget by a calibration of the trainer's
     step, k-NN top-1/top-5 half-way and at the end), its own report in `OUT_DIR/speedrun/`;
  3. an ImageNet-like JPEG set (`bsim_fast.tools.bench_data`: ~500×375, ~110 KB, photographic content) written to
     FFCV (`data_prep/write_ffcv.py`) and DALI (`data_prep/write_dali.py`) formats, each when its package is
     installed;
  4. the benchmark (`bsim_fast.tools.bench`) until the budget's end: kernels vs references and copy bandwidth,
     loader-only, model-only and end-to-end rows, most important first; rows that would overrun are skipped.
`report.md` and `report.json` (device, driver, versions, commit, every figure next to its target from
`bench_targets.TARGETS`, pass/miss, the time-to-accuracy table) are written when the run starts and rewritten
after every stage and after each recipe of stage 2, so a run cut off at any point leaves every finished figure
on disk. What cannot run (no GPU for the kernels, pytest, FFCV or DALI not installed) is said in one line, and
the rest runs. Exit status: 0 when every stage ran without an error (missed targets are findings, not errors),
1 when a test failed or a stage raised, 2 for bad arguments (checked before any work).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import torch

from bsim_fast import cli
from bsim_fast.atomic import disk_bytes, remove_path
from bsim_fast.config import ConfigError
from bsim_fast.host import available_cores

from . import bench, bench_data, cifar10, harness
from .bench_report import describe, table
from .bench_targets import evaluate
from .speedrun_report import recipes_table

REPO_ROOT = Path(__file__).resolve().parents[2]
TTA_RECIPES = ("small/byol", "small/byol_wbsim")
# Eager: in a clock of a minute or two, compilation (counted in the speedrun's clock, and not the same for SIM
# and WBSIM, whose mixed views are other graphs) would be a large, unequal share; the benchmark's compiled rows
# measure what compilation gains.
TTA_SET = ("train.compile=off",)
# Seconds a time-to-accuracy recipe takes beyond its training clock on one GPU: the calibration (15 warm-up and
# 60 timed eager steps), the model build, two k-NN passes over 60,000 images (the CPU version: a few steps).
TTA_OVERHEAD_S = {"gpu": 30.0, "tiny": 60.0}
TTA_START_S = 45.0  # the speedrun's start: imports and the decode of both splits into device memory
# The speedrun at tiny sizes, for the CPU version: a small model, k-NN on subsets, one calibration step.
TTA_TINY = ["--knn-bank", "200", "--knn-queries", "100", "--calibrate-steps", "1"]
TTA_TINY_SET = (
    "data.image_size=16",
    "data.batch_size=8",
    "model.proj_hidden=32",
    "model.proj_dim=16",
    "model.pred_hidden=16",
    "train.tensorboard=false",
)
SPEEDRUN_COMMAND = (
    "python -m bsim_fast.tools.speedrun --recipe small/byol --recipe small/byol_wbsim --minutes 5 "
    "--data CIFAR10_DIR --out runs/speedrun_5"
)


# ------------------------------------------------------------------------------------------------ stages
def run_logged(cmd, log: Path, timeout: float, poll: Callable[[], None] | None = None, poll_s: float = 5.0) -> tuple:
    """(exit code or 'timeout', seconds) of `cmd`, its output to `log`; `poll` is called every `poll_s` while
    it runs and once after. A command past `timeout` is ended with every process it started (its session)."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=min(poll_s, max(0.1, timeout - (time.time() - t0))))
                    break
                except subprocess.TimeoutExpired:
                    if poll is not None:
                        poll()
                    if time.time() - t0 >= timeout:
                        rc = "timeout"
                        break
        finally:
            if proc.poll() is None:  # timed out, or this run was interrupted: end the command's processes
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if poll is not None:
        poll()
    return rc, time.time() - t0


def gpu_tests(out: Path, timeout: float):
    """`pytest -m gpu`; counts from its JUnit XML."""
    if not harness.installed("pytest"):
        return "skipped", "pytest not installed"
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests"]
    rc, _ = run_logged(cmd, out / "gpu_tests.log", timeout)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    detail = (
        f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
        f" (log: gpu_tests.log)"
    )
    if rc == "timeout":
        return "error", f"timed out after {timeout:.0f} s; " + detail
    if counts["failures"] or counts["errors"] or rc not in (0, 5):
        return "failed", detail
    if passed == 0:
        return "skipped", detail + ("; no CUDA device" if not torch.cuda.is_available() else "")
    return "ok", detail


def time_to_accuracy(check: Check, cifar: str, minutes: float, timeout: float):
    """The speedrun of TTA_RECIPES for `minutes` each; its report is read into this one after each recipe."""
    out = check.out / "speedrun"
    report = out / "speedrun.json"
    cmd = [sys.executable, "-m", "bsim_fast.tools.speedrun", "--data", cifar, "--out", str(out), "--overwrite"]
    cmd += [x for r in TTA_RECIPES for x in ("--recipe", r)]
    cmd += ["--minutes", f"{minutes:g}", "--eval-every", f"{minutes / 2:g}"] + (TTA_TINY if check.tiny else [])
    cmd += [x for o in TTA_SET + (TTA_TINY_SET if check.tiny else ()) for x in ("--set", o)]
    seen = {"mtime": None}
    if report.exists():
        report.unlink()  # an earlier run's figures must not pass for this one's

    def poll() -> None:
        mtime = report.stat().st_mtime_ns if report.exists() else None
        if mtime != seen["mtime"]:
            seen["mtime"] = mtime
            check.state["tta"] = json.loads(report.read_text())
            check.write_report()

    rc, _ = run_logged(cmd, check.out / "speedrun.log", timeout, poll)
    if not report.exists():
        return "error", f"no speedrun.json (exit {rc}; log: speedrun.log)"
    recipes = check.state["tta"]["recipes"]
    detail = "; ".join(
        f"{r['recipe']}: {r['error']}"
        if r["error"]
        else f"{r['recipe']}: k-NN top-1 {r['final']['knn_top1']:.2f}% at {r['final']['minutes']:.2f} min"
        if r["final"]
        else f"{r['recipe']}: no k-NN pass"
        for r in recipes
    )
    if rc == "timeout" or len(recipes) < len(TTA_RECIPES):
        return (
            "error",
            f"cut off ({rc}) after {len(recipes)} of {len(TTA_RECIPES)} recipes; {detail} (log: speedrun.log)",
        )
    failed = rc != 0 or any(r["error"] or not r["final"] for r in recipes)
    return ("error" if failed else "ok"), detail + " (log: speedrun.log)"


def make_data(out: Path, count: int, workers: int, timeout: float, state: dict):
    jpeg = out / "data" / "jpeg"
    if jpeg.exists():
        shutil.rmtree(jpeg)
    summary = bench_data.write_set(jpeg, count, workers=workers)
    state["folder"], state["data"] = str(jpeg), summary
    detail = [f"{summary['images']} JPEGs, {summary['mean_kb']:.0f} KB average, {summary['content']}"]
    status = "ok"
    for kind, script, output in (
        ("ffcv", "write_ffcv.py", out / "data" / "set.beton"),
        ("dali", "write_dali.py", out / "data" / "set_dali"),
    ):
        remove_path(output)  # a previous run's output: converted again from this run's images
        if not harness.installed(bench.PACKAGES[kind]):
            detail.append(f"{kind}: {bench.PACKAGES[kind]} not installed, not written")
            continue
        cmd = [sys.executable, f"data_prep/{script}", "--source", str(jpeg), "--output", str(output)]
        cmd += ["--workers", str(workers)] + (["--max-resolution", "512", "--jpeg-quality", "90"] * (kind == "ffcv"))
        rc, seconds = run_logged(cmd, out / f"convert_{kind}.log", timeout)
        if rc == 0 and output.exists():
            state[kind] = str(output)
            detail.append(f"{kind}: {disk_bytes(output) / 1e6:.0f} MB in {seconds:.0f} s")
        else:
            status = "error"
            detail.append(f"{kind}: conversion failed ({rc}; log: convert_{kind}.log)")
    return status, "; ".join(detail)


def run_bench(out: Path, state: dict, tiny: bool, deadline: float, extra: list):
    bench_out = out / "bench"
    cmd = [sys.executable, "-m", "bsim_fast.tools.bench", "--out", str(bench_out), "--deadline", str(deadline)]
    cmd += ["--folder", state.get("folder", "builtin")]
    cmd += ["--ffcv", state.get("ffcv", str(out / "data" / "missing.beton"))]
    cmd += ["--dali", state.get("dali", str(out / "data" / "missing_dali"))]
    cmd += (["--tiny"] if tiny else []) + list(extra)
    rc, _ = run_logged(cmd, out / "bench.log", deadline - time.time() + 60)
    report = bench_out / "bench.json"
    if not report.exists():
        return "error", f"no bench.json (exit {rc}; log: bench.log)"
    state["bench"] = json.loads(report.read_text())
    if (bench_out / "bench.png").exists():
        shutil.copy(bench_out / "bench.png", out / "bench.png")
    rows = state["bench"]["rows"]
    n_ok = sum(1 for r in rows if "skipped" not in r and "error" not in r)
    n_skip = sum(1 for r in rows if "skipped" in r)
    n_err = sum(1 for r in rows if "error" in r)
    detail = f"{n_ok} rows measured, {n_skip} skipped, {n_err} errors (log: bench.log)"
    if rc == "timeout":
        return "error", "timed out; " + detail
    return ("error" if n_err or rc not in (0, 1) else "ok"), detail


# ------------------------------------------------------------------------------------------------ report
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def tta_lines(tta: dict | None, why_not: str | None) -> list[str]:
    """The time-to-accuracy section: the speedrun's recipes table and WBSIM's end figure against SIM's."""
    lines = ["## Time to accuracy (CIFAR-10, k-NN top-1)", ""]
    if tta is None:
        return lines + [f"Not run: {why_not}.", ""]
    d, s = tta["data"], tta["settings"]
    lines += [
        f"{', '.join(f'`{r}`' for r in TTA_RECIPES)}, {s['minutes']:g} min of training clock each, eager, one after "
        f"the other (`speedrun/speedrun.md`: the whole report; `speedrun/speedrun.png`: the chart). Data: "
        f"{d['origin']}, {d['train_images']:,} training / {d['test_images']:,} test images in {d['device']} "
        f"memory; k-NN k={s['knn']['k']}, bank {s['knn']['bank']:,}, {s['knn']['queries']:,} queries.",
        "",
        *recipes_table(tta["recipes"]),
        "",
    ]
    finals = {r["mode"]: r["final"]["knn_top1"] for r in tta["recipes"] if r["final"]}
    if {"sim", "wbsim"} <= finals.keys():
        lines += [
            f"WBSIM − SIM at the end: {finals['wbsim'] - finals['sim']:+.2f} points of k-NN top-1 (one run each, "
            f"{s['minutes']:g} minutes: an indication, not a result).",
            "",
        ]
    return lines


class Check:
    """The run's record: every stage (name, status ok / failed / skipped / error, seconds, detail) and what
    the stages found; `report.md` and `report.json` rewritten from it after every stage."""

    def __init__(self, out: Path, env: dict, tiny: bool, tta_why_not: str | None):
        self.out, self.env, self.tiny, self.tta_why_not = out, env, tiny, tta_why_not
        self.started = time.time()
        self.stages: list[dict] = []
        self.state: dict = {}

    def run(self, name: str, fn: Callable[[], tuple]) -> dict:
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.time()
        try:
            status, detail = fn()
        except Exception as e:  # noqa: BLE001 - a stage's failure is reported; the next stage still runs
            status, detail = "error", harness.error_text(e)
        return self.record(name, status, round(time.time() - t0, 1), detail)

    def record(self, name: str, status: str, seconds: float, detail: str) -> dict:
        item = {"stage": name, "status": status, "seconds": seconds, "detail": detail}
        self.stages.append(item)
        print(f"[gpu_check] {name}: {status} ({seconds} s) {detail}", flush=True)
        self.write_report()
        return item

    def report(self) -> dict:
        rows = self.state.get("bench", {}).get("rows", [])
        return {
            "environment": self.env,
            "tiny": self.tiny,
            "seconds": round(time.time() - self.started, 1),
            "stages": self.stages,
            "data": self.state.get("data"),
            "targets": evaluate(rows, not self.tiny and torch.cuda.is_available()),
            "time_to_accuracy": self.state.get("tta"),
            "rows": rows,
            "skipped": [f"{r['kind']} {describe(r)}: {r['skipped']}" for r in rows if "skipped" in r],
            "errors": [f"{r['kind']} {describe(r)}: {r['error']}" for r in rows if "error" in r],
        }

    def write_report(self) -> dict:
        report = self.report()
        title = f"# bsim_fast acceptance report{' (tiny CPU run: targets do not apply)' if self.tiny else ''}"
        lines = [title, "", *harness.environment_lines(self.env), f"- whole run {report['seconds']:.0f} s", ""]
        if report["data"]:
            d = report["data"]
            lines += [
                f"Data: {d['images']} generated JPEGs, {d['width_height'][0]}×{d['width_height'][1]} "
                f"(a fifth portrait), {d['mean_kb']:.0f} KB average, {d['content']}.",
                "",
            ]
        stages = ([s["stage"], s["status"], f"{s['seconds']:.0f}", s["detail"]] for s in self.stages)
        lines += ["## Stages", "", *harness.md_table(["stage", "status", "seconds", "detail"], stages), ""]
        lines += tta_lines(report["time_to_accuracy"], self.tta_why_not)
        lines += ["## Targets (bench_targets.TARGETS, as in docs/BENCHMARKS.md)", ""]
        lines += [*harness.targets_report_table(report["targets"], _fmt), ""]
        lines += ["## Every row", "", "```", table(report["rows"]) if report["rows"] else "(no rows)", "```", ""]
        if report["skipped"]:
            lines += ["## Skipped", ""] + [f"- {s}" for s in report["skipped"]] + [""]
        lines += [
            "Chart: `bench.png`. Raw rows: `report.json`. Logs: `gpu_tests.log`, `speedrun.log`, `convert_*.log`, "
            "`bench.log`.",
            "",
            f"The speedrun's own targets (5 and 30 minutes) need longer runs: `{SPEEDRUN_COMMAND}` (docs/RESULTS.md).",
            "",
        ]
        harness.write_report(self.out, "report", report, "\n".join(lines))
        return report


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (created; report.md, report.json, bench.png, logs, data/, speedrun/)")
    p.add_argument(
        "--tiny",
        action="store_true",
        default=not torch.cuda.is_available(),
        help="the CPU version (default without a GPU)",
    )
    p.add_argument(
        "--budget-s", type=float, default=None, help="the whole run's budget (default 540 on a GPU, 900 tiny)"
    )
    p.add_argument("--cifar", default=None, help="CIFAR-10 for the time-to-accuracy stage (as the speedrun's --data)")
    p.add_argument("--tta-minutes", type=float, default=None, help="training clock per recipe (default 1.5; 0.05 tiny)")
    p.add_argument("--tests-timeout-s", type=float, default=None, help="for pytest -m gpu (default 150)")
    p.add_argument("--images", type=int, default=None, help="generated JPEGs (default 4000; 24 tiny)")
    p.add_argument("--workers", type=int, default=None, help="data and loader workers (default: cores, ≤ 16)")
    p.add_argument("--skip-tests", action="store_true", help="leave out pytest -m gpu")
    return p


def check_arguments(args, extra: list) -> str | None:
    """One line for the first bad argument (before any work), else None."""
    bench.build_parser().parse_args(extra)  # what goes on to the benchmark: a typo is one line now (exit 2)
    for flag, value in (("--images", args.images), ("--budget-s", args.budget_s), ("--tta-minutes", args.tta_minutes)):
        if value is not None and not value > 0:
            return f"{flag} {value:g}: must be > 0"
    if args.cifar is not None:
        try:
            cifar10.find(args.cifar, flag="--cifar")
        except ConfigError as e:
            return str(e)
    return None


def main(argv=None) -> int:
    args, extra = build_parser().parse_known_args(argv)  # the rest goes to bsim_fast.tools.bench
    error = check_arguments(args, extra)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    budget = harness.Budget.of(args.budget_s or (900.0 if args.tiny else 540.0))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or min(16, available_cores())
    if args.tiny and not any(a.startswith("--batch") for a in extra):
        extra += ["--batch", "8"]
    if args.workers is not None and not any(a.startswith("--workers") for a in extra):
        extra += ["--workers", str(workers)]
    env = harness.environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    check = Check(out, env, args.tiny, None if args.cifar else "no `--cifar DIR` given")
    check.write_report()
    if args.skip_tests:
        check.record("pytest -m gpu", "skipped", 0, "--skip-tests")
    else:
        check.run("pytest -m gpu", lambda: gpu_tests(out, args.tests_timeout_s or 150))
    if args.cifar:
        minutes = args.tta_minutes or (0.05 if args.tiny else 1.5)
        reserve = len(TTA_RECIPES) * (minutes * 60 + TTA_OVERHEAD_S["tiny" if args.tiny else "gpu"]) + TTA_START_S
        check.run("time to accuracy", lambda: time_to_accuracy(check, args.cifar, minutes, 1.5 * reserve))
    images = args.images or (24 if args.tiny else 4000)
    check.run("data", lambda: make_data(out, images, workers, max(60, budget.left() / 4), check.state))
    check.run("bench", lambda: run_bench(out, check.state, args.tiny, budget.deadline - 20, extra))
    report = check.write_report()
    print((out / "report.md").read_text())
    print(f"[gpu_check] wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'bench.png'}")
    failed = [s for s in check.stages if s["status"] in ("failed", "error")]
    return 1 if failed or report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
