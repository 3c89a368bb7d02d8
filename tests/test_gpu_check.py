"""The acceptance command's CPU version (--tiny): every stage runs or says why not, and one report holds the
environment, the generated data's statistics, every row and every target with its status."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from bsim_fast.tools import bench

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
    assert [t["id"] for t in report["targets"]] == [t["id"] for t in bench.TARGETS]
    env = report["environment"]
    assert env["torch"] and env["commit"] is not None and "device" in env
    md = (out / "report.md").read_text()
    for words in (
        "## Targets",
        "## Stages",
        "## Every row",
        "pytest -m gpu",
        bench.TARGETS[0]["what"],
        "python -m bsim_fast.tools.speedrun",
    ):
        assert words in md
    assert (out / "bench.png").stat().st_size > 1000


def test_gpu_check_needs_an_output_folder():
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("usage:")
