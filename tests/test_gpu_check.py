"""The acceptance command's CPU version (--tiny): every stage runs or says why not, and one report holds the
environment, the generated data's statistics, every row and every target with its status."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import tiny_folder
from PIL import Image

from bsim_fast.tools import bench_targets, gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_writes_a_complete_report(tmp_path):
    out = tmp_path / "check"
    r = subprocess.run(
        [
            "bash",
            "scripts/gpu_check.sh",
            str(out),
            "--tiny",
            "--images",
            "16",
            "--workers",
            "2",
            "--methods",
            "byol",
            "--modes",
            "bsim",
            "--size",
            "16",
            "--iters",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["pytest -m gpu"]["status"] in ("skipped", "ok")  # on CPU the GPU tests skip, and say so
    assert stages["data"]["status"] == "ok" and stages["bench"]["status"] == "ok", stages
    # ImageNet-like: 500x375 (or portrait) JPEGs, about 110 KB each
    d = report["data"]
    assert d["images"] == 16 and 60 < d["mean_kb"] < 170, d
    sizes = {Image.open(f).size for f in (out / "data" / "jpeg").rglob("*.jpg")}
    assert sizes <= {(500, 375), (375, 500)} and len(list((out / "data" / "jpeg").rglob("*.jpg"))) == 16
    rows = report["rows"]
    measured = {(row["kind"], row.get("loader")) for row in rows if "images_s" in row}
    for loader in ("ffcv", "dali", "torch"):  # written to both formats, read by every loader
        assert ("loader", loader) in measured and ("end_to_end", loader) in measured, measured
    assert [t["id"] for t in report["targets"]] == [t["id"] for t in bench_targets.TARGETS]
    env = report["environment"]
    assert env["torch"] and env["commit"] is not None and "device" in env
    md = (out / "report.md").read_text()
    for words in (
        "## Targets",
        "## Stages",
        "## Every row",
        "pytest -m gpu",
        bench_targets.TARGETS[0]["what"],
        "python -m bsim_fast.tools.speedrun",
    ):
        assert words in md
    assert (out / "bench.png").stat().st_size > 1000


def test_gpu_check_needs_an_output_folder():
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("usage:")


# ------------------------------------------------------------------------- the GPU machine's image, on a CPU
# The GPU image has no FFCV and no DALI: this makes both unimportable in every process of the check.
NO_FFCV_NO_DALI = 'import sys\nfor name in ("ffcv", "nvidia.dali"):\n    sys.modules[name] = None\n'


def cifar_like(dest: Path) -> Path:
    """CIFAR-10's form (train/ and test/ JPEG folders of 32x32 images, ten classes), cut from the built-in set."""
    tiny_folder(dest / "train", "train", per_class=8, classes=10)
    tiny_folder(dest / "test", "test", per_class=4, classes=10)
    return dest


def test_gpu_check_tiny_with_time_to_accuracy_on_an_image_without_ffcv_or_dali(tmp_path):
    """--cifar adds the time-to-accuracy stage (SIM and WBSIM, k-NN at the end, both in report.md); without FFCV
    and DALI every stage says what it left out in one line and the rest runs: nothing on the path of the
    check, the speedrun or the benchmark imports either at module level."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_FFCV_NO_DALI)
    out = tmp_path / "check"
    argv = ["--tiny", "--skip-tests", "--cifar", str(cifar_like(tmp_path / "cifar")), "--images", "8"]
    argv += ["--methods", "byol", "--modes", "bsim", "--size", "16", "--iters", "1", "--only", "loader", "model"]
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(shim), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(out), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["ffcv"] is not None  # installed here, yet unimportable under the shim
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["pytest -m gpu", "time to accuracy", "data", "bench"]
    assert all(s["status"] in ("ok", "skipped") for s in stages.values()), stages
    assert "ffcv: ffcv not installed, not written" in stages["data"]["detail"]
    assert "dali: nvidia.dali not installed, not written" in stages["data"]["detail"]
    skipped = {(row["kind"], row["loader"]): row["skipped"] for row in report["rows"] if "skipped" in row}
    assert skipped[("loader", "ffcv")] == "ffcv not installed (ffcv)"
    assert skipped[("loader", "dali")] == "dali not installed (nvidia.dali)"
    assert any(row["kind"] == "loader" and row["loader"] == "torch" and "images_s" in row for row in report["rows"])

    tta = report["time_to_accuracy"]
    assert [(r["recipe"], r["mode"]) for r in tta["recipes"]] == [("small/byol", "sim"), ("small/byol_wbsim", "wbsim")]
    assert (tta["data"]["train_images"], tta["data"]["test_images"]) == (80, 40)
    assert tta["data"]["loader"] == "gpu_resident" and tta["settings"]["minutes"] == 0.05
    for run in tta["recipes"]:
        assert run["error"] is None and run["budget_min"] == 0.05 and run["compile"] == "off"
        assert run["final"] == run["curve"][-1] and run["final"]["why"].startswith(("time budget", "end of"))
        # 40 queries, each right or wrong: whole multiples of 2.5 %
        assert run["final"]["knn_top1"] / 2.5 == round(run["final"]["knn_top1"] / 2.5)
    md = (out / "report.md").read_text()
    finals = [f"{r['final']['knn_top1']:.2f}" for r in tta["recipes"]]
    for words in ("## Time to accuracy", "| small/byol | sim |", "| small/byol_wbsim | wbsim |", "WBSIM − SIM"):
        assert words in md, words
    assert all(f"| {top1} |" in md for top1 in finals), finals
    assert (out / "speedrun" / "speedrun.md").exists() and (out / "speedrun" / "speedrun.png").exists()


def test_bad_cifar_folder_is_one_line_before_any_work(tmp_path):
    out = tmp_path / "check"
    r = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(out), "--tiny", "--cifar", str(tmp_path / "nowhere")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: --cifar {tmp_path / 'nowhere'}: not found") and not out.exists()


# ------------------------------------------------------------------------- results on disk as they come
def test_each_stage_rewrites_the_report_as_it_finishes(tmp_path):
    check = gpu_check.Check(tmp_path, {"device": "cpu", "torch": "x"}, tiny=True, tta_why_not="no `--cifar DIR` given")
    check.write_report()
    assert "## Stages" in (tmp_path / "report.md").read_text() and json.loads((tmp_path / "report.json").read_text())
    check.run("first", lambda: ("ok", "one figure"))
    assert "| first | ok | 0 | one figure |" in (tmp_path / "report.md").read_text()
    check.run("second", lambda: 1 / 0)  # a stage that raises is its row; the report still follows
    md = (tmp_path / "report.md").read_text()
    assert (
        "| second | error | 0 | ZeroDivisionError: division by zero |" in md and "Not run: no `--cifar DIR` given" in md
    )
    assert [s["stage"] for s in json.loads((tmp_path / "report.json").read_text())["stages"]] == ["first", "second"]


def test_a_stage_command_is_polled_while_it_runs_and_ended_whole_at_its_timeout(tmp_path):
    marker, grandchild = tmp_path / "written", tmp_path / "grandchild.pid"
    code = (
        "import pathlib, subprocess, sys, time\n"
        f"pathlib.Path({str(marker)!r}).write_text('x')\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"pathlib.Path({str(grandchild)!r}).write_text(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    seen = []
    rc, seconds = gpu_check.run_logged(
        [sys.executable, "-c", code], tmp_path / "log", timeout=3, poll=lambda: seen.append(marker.exists()), poll_s=0.2
    )
    assert rc == "timeout" and seconds < 30 and True in seen  # seen while it ran, not only after
    pid = int(grandchild.read_text())
    time.sleep(0.5)
    try:
        os.kill(pid, 0)
        alive = Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except ProcessLookupError:
        alive = False
    assert not alive, "the command's own child outlived its timeout"
    rc, _ = gpu_check.run_logged([sys.executable, "-c", "print('hi')"], tmp_path / "log2", timeout=30)
    assert rc == 0 and (tmp_path / "log2").read_text() == "hi\n"
