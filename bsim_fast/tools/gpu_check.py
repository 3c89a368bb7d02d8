"""The acceptance run: GPU tests, an ImageNet-like data set, the benchmark, one report with pass/miss per target.

    bash scripts/gpu_check.sh OUT_DIR            # on one GPU, ~10 minutes
    bash scripts/gpu_check.sh OUT_DIR --tiny     # the CPU version (the default without a GPU), a few minutes

Stages, each timed and reported, none stopping the others:
  1. `pytest -m gpu` (the tests that need CUDA; on a CPU they skip, which the report says);
  2. an ImageNet-like JPEG set (`bsim_fast.tools.bench_data`: ~500×375, ~110 KB, photographic content) written to
     FFCV (`data_prep/write_ffcv.py`) and DALI (`data_prep/write_dali.py`) formats;
  3. the benchmark (`bsim_fast.tools.bench`): kernels vs references and copy bandwidth, loader-only two-view images/s
     for FFCV / DALI / torchvision at 224 with the 224 recipe's policy, model-only SIM/BSIM/WBSIM for the four
     methods at ResNet-50 224 and ResNet-18 32, eager and compiled, end-to-end per loader with its ratio to
     model-only, peak memory; rows that would overrun the time budget are reported as skipped;
  4. `report.md` + `report.json` (device, driver, versions, commit, every figure next to its target from
     `bench.TARGETS`, pass/miss) and `bench.png`.
What cannot run (DALI not installed, no GPU for the kernels) is a skipped row, not a failure. Exit status: 0
when every stage ran without an error (missed targets are findings, not errors), 1 when a test failed or a
stage raised, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from bsim_fast import cli
from bsim_fast.atomic import write_text_atomic
from bsim_fast.host import available_cores
from bsim_fast.provenance import environment

from . import bench, bench_data

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEEDRUN_COMMAND = (
    "python -m bsim_fast.tools.speedrun --recipe small/byol --recipe small/byol_wbsim --minutes 3 "
    "--data CIFAR10_DIR --out runs/speedrun_3"
)


class Stages:
    """The record of every stage: name, status (ok / failed / skipped / error), seconds, detail."""

    def __init__(self):
        self.items = []

    def run(self, name, fn):
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.time()
        try:
            status, detail = fn()
        except Exception as e:  # noqa: BLE001 - a stage's failure is reported; the next stage still runs
            status, detail = "error", f"{type(e).__name__}: {bench.first_line(e)}"
        item = {"stage": name, "status": status, "seconds": round(time.time() - t0, 1), "detail": detail}
        self.items.append(item)
        print(f"[gpu_check] {name}: {status} ({item['seconds']} s) {detail}", flush=True)
        return item


def run_logged(cmd, log: Path, timeout: float, env=None) -> tuple:
    """(exit code or 'timeout', seconds); output to `log`."""
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, timeout=max(1, timeout), env=env
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.time() - t0


def gpu_tests(out: Path, timeout: float):
    """`pytest -m gpu`; counts from its JUnit XML."""
    xml = out / "gpu_tests.xml"
    rc, _ = run_logged(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests"],
        out / "gpu_tests.log",
        timeout,
    )
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


def make_data(out: Path, count: int, workers: int, timeout: float, state: dict):
    jpeg = out / "data" / "jpeg"
    if jpeg.exists():
        shutil.rmtree(jpeg)
    summary = bench_data.write_set(jpeg, count, workers=workers)
    state["folder"] = str(jpeg)
    state["data"] = summary
    detail = [f"{summary['images']} JPEGs, {summary['mean_kb']:.0f} KB average, {summary['content']}"]
    status = "ok"
    for kind, script, output in (
        ("ffcv", "write_ffcv.py", out / "data" / "set.beton"),
        ("dali", "write_dali.py", out / "data" / "set_dali"),
    ):
        if output.is_dir():  # a previous run's output: converted again from this run's images
            shutil.rmtree(output)
        elif output.exists():
            output.unlink()
        cmd = [
            sys.executable,
            f"data_prep/{script}",
            "--source",
            str(jpeg),
            "--output",
            str(output),
            "--workers",
            str(workers),
        ]
        if kind == "ffcv":
            cmd += ["--max-resolution", "512", "--jpeg-quality", "90"]
        rc, seconds = run_logged(cmd, out / f"convert_{kind}.log", timeout)
        if rc == 0 and output.exists():
            state[kind] = str(output)
            size = sum(f.stat().st_size for f in output.rglob("*")) if output.is_dir() else output.stat().st_size
            detail.append(f"{kind}: {size / 1e6:.0f} MB in {seconds:.0f} s")
        else:
            status = "error"
            detail.append(f"{kind}: conversion failed ({rc}; log: convert_{kind}.log)")
    return status, "; ".join(detail)


def run_bench(out: Path, state: dict, tiny: bool, deadline: float, extra: list):
    bench_out = out / "bench"
    cmd = [
        sys.executable,
        "-m",
        "bsim_fast.tools.bench",
        "--out",
        str(bench_out),
        "--deadline",
        str(deadline),
        "--folder",
        state.get("folder", "builtin"),
        "--ffcv",
        state.get("ffcv", str(out / "data" / "missing.beton")),
        "--dali",
        state.get("dali", str(out / "data" / "missing_dali")),
    ]
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


# ---------------------------------------------------------------------------------------------- report
def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def write_report(out: Path, env: dict, stages: Stages, state: dict, tiny: bool, started: float) -> dict:
    rows = state.get("bench", {}).get("rows", [])
    applicable = not tiny and torch.cuda.is_available()
    targets = bench.evaluate(rows, applicable)
    report = {
        "environment": env,
        "tiny": tiny,
        "seconds": round(time.time() - started, 1),
        "stages": stages.items,
        "data": state.get("data"),
        "targets": targets,
        "rows": rows,
        "skipped": [f"{r['kind']} {bench.describe(r)}: {r['skipped']}" for r in rows if "skipped" in r],
        "errors": [f"{r['kind']} {bench.describe(r)}: {r['error']}" for r in rows if "error" in r],
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))

    e = env
    lines = [
        f"# bsim_fast acceptance report{' (tiny CPU run: targets do not apply)' if tiny else ''}",
        "",
        f"- device: {e.get('device')} ({e.get('gpu_memory_gb', '—')} GB), driver {e.get('driver') or '—'}, "
        f"{e.get('cpus')} CPU cores",
        f"- torch {e.get('torch')} (CUDA {e.get('cuda') or '—'}), torchvision {e.get('torchvision') or '—'}, "
        f"triton {e.get('triton') or '—'}, DALI {e.get('dali') or 'not installed'}, "
        f"FFCV {e.get('ffcv') or 'not installed'}, Python {e.get('python')}",
        f"- commit {e.get('commit') or '—'}, {e.get('time')}, whole run {report['seconds']:.0f} s",
        "",
    ]
    if state.get("data"):
        d = state["data"]
        lines += [
            f"Data: {d['images']} generated JPEGs, {d['width_height'][0]}×{d['width_height'][1]} "
            f"(a fifth portrait), {d['mean_kb']:.0f} KB average, {d['content']}.",
            "",
        ]
    lines += ["## Stages", "", "| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} | {s['detail']} |" for s in stages.items]
    lines += [
        "",
        "## Targets (bench.TARGETS, as in docs/BENCHMARKS.md)",
        "",
        "| id | what | target | measured | status |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{t['id']}` | {t['what']} | {t['target']} | {_fmt(t['measured'])} | **{t['status']}** |" for t in targets
    ]
    lines += ["", "## Every row", "", "```", bench.table(rows) if rows else "(no rows)", "```", ""]
    if report["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in report["skipped"]] + [""]
    lines += [
        "Chart: `bench.png`. Raw rows: `report.json`. Logs: `gpu_tests.log`, `convert_*.log`, `bench.log`.",
        "",
        "Time to accuracy does not fit these 10 minutes; it is its own command (docs/RESULTS.md), e.g. BYOL SIM "
        f"against WBSIM for 3 minutes each, about 10 minutes: `{SPEEDRUN_COMMAND}`.",
        "",
    ]
    write_text_atomic(out / "report.md", "\n".join(lines))
    return report


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (created; report.md, report.json, bench.png, logs, data/)")
    p.add_argument("--tiny", action="store_true", default=not cuda, help="the CPU version (default without a GPU)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget of the whole run (default 540 on a GPU, 900 tiny)",
    )
    p.add_argument("--tests-timeout-s", type=float, default=None, help="for pytest -m gpu (default 150)")
    p.add_argument("--images", type=int, default=None, help="generated JPEGs (default 4000; 24 tiny)")
    p.add_argument("--workers", type=int, default=None, help="data and loader workers (default: cores, ≤ 16)")
    p.add_argument("--skip-tests", action="store_true", help="leave out pytest -m gpu")
    args, extra = p.parse_known_args(argv)  # the rest goes to bsim_fast.tools.bench (e.g. --methods byol)
    bench.build_parser().parse_args(extra)  # checked now: a typo is one line before minutes of tests and data
    if args.images is not None and args.images < 1:
        print("error: --images must be at least 1", file=sys.stderr)
        return 2
    started = time.time()
    budget = args.budget_s or (900.0 if args.tiny else 540.0)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or min(16, available_cores())
    images = args.images or (24 if args.tiny else 4000)
    if args.tiny and not any(a.startswith("--batch") for a in extra):
        extra += ["--batch", "8"]
    if args.workers is not None and not any(a.startswith("--workers") for a in extra):
        extra += ["--workers", str(workers)]
    env = environment(torch.device("cuda" if cuda else "cpu"))
    stages, state = Stages(), {}
    if args.skip_tests:
        stages.items.append({"stage": "pytest -m gpu", "status": "skipped", "seconds": 0, "detail": "--skip-tests"})
    else:
        stages.run("pytest -m gpu", lambda: gpu_tests(out, args.tests_timeout_s or 150))
    stages.run("data", lambda: make_data(out, images, workers, max(60, budget / 4), state))
    deadline = started + budget - 20  # leaves time for the report
    stages.run("bench", lambda: run_bench(out, state, args.tiny, deadline, extra))
    report = write_report(out, env, stages, state, args.tiny, started)
    print((out / "report.md").read_text())
    print(f"[gpu_check] wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'bench.png'}")
    failed = [s for s in stages.items if s["status"] in ("failed", "error")]
    return 1 if failed or report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
