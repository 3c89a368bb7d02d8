"""The benchmark command on CPU at tiny sizes (JSON, table, PNG), and its target evaluation against hand-written
rows. Speed itself is measured by the benchmark, never asserted by a test."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_folder

from bsim_fast.tools import bench, bench_targets, harness

ROOT = Path(__file__).resolve().parents[1]


def run_bench(tmp_path, *extra):
    folder = tiny_folder(tmp_path / "imgs", "train", per_class=8, classes=4)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bsim_fast.tools.bench",
            "--tiny",
            "--methods",
            "byol",
            "--modes",
            "sim",
            "bsim",
            "--ffcv",
            str(tmp_path / "none.beton"),
            "--dali",
            str(tmp_path / "none"),
            "--folder",
            str(folder),
            "--batch",
            "8",
            "--size",
            "16",
            "--iters",
            "1",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "out"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bench_tiny_smoke(tmp_path):
    r = run_bench(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = report["rows"]
    kinds = {(row["kind"], row.get("loader"), row.get("mode")) for row in rows if "skipped" not in row}
    expected = {
        ("loader", "torch", None),
        ("model", None, "sim"),
        ("model", None, "bsim"),
        ("end_to_end", "torch", None),
    }
    assert expected <= kinds
    timed = [row for row in rows if "seconds" in row]
    assert {row["kind"] for row in timed} == {"loader", "model", "end_to_end"}
    for row in timed:  # images/s is the images counted over the seconds timed: batch x batches (or steps)
        count = row["batches"] if "batches" in row else row["steps"]
        assert row["images_s"] * row["seconds"] == pytest.approx(row["batch"] * count), row
    # no dataset for ffcv/dali, no CUDA for the kernel: skipped rows with their reason, not errors
    skipped = {(row["kind"], row.get("loader") or row.get("name")): row["skipped"] for row in rows if "skipped" in row}
    assert "no dataset" in skipped[("loader", "ffcv")] and "CUDA" in skipped[("kernel", "cutmix_normalize")]
    # CPU: peak memory is n/a (None), not 0.00
    assert all(row["peak_mem_gb"] is None for row in rows if "images_s" in row)
    e2e = next(row for row in rows if row["kind"] == "end_to_end" and "images_s" in row)
    assert e2e["ratio_meaningful"] is False  # tiny: flagged, never a claim
    # its model-only figure is the model row measured with it, and the ratio is the two figures' ratio
    model = [row for row in rows if row.get("note") == "measured with the end-to-end rows"]
    assert len(model) == 1 and (model[0]["method"], model[0]["mode"]) == ("byol", "bsim")
    assert e2e["model_images_s"] == model[0]["images_s"]
    assert e2e["ratio_to_model"] == pytest.approx(e2e["images_s"] / model[0]["images_s"])
    # the targets are for one GPU at full sizes: n/a or not measured here, never pass/miss
    assert [t["id"] for t in report["targets"]] == [t["id"] for t in bench_targets.TARGETS]
    assert {t["status"] for t in report["targets"]} <= {"n/a", "not measured"}
    assert (tmp_path / "out" / "bench.png").stat().st_size > 1000
    assert "images/s" in r.stdout and " n/a " in r.stdout and "not meaningful" in r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1])["rows"]


def test_rows_past_the_deadline_are_skipped_not_run(tmp_path):
    r = run_bench(tmp_path, "--deadline", str(time.time() - 1))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    model = [
        row
        for row in rows
        if row["kind"] in ("model", "loader", "end_to_end") and "no dataset" not in row.get("skipped", "")
    ]
    assert model and all(row.get("skipped") == "time budget" for row in model), model


def settings(size):
    args = argparse.Namespace(
        tiny=True,
        size=size,
        batch=8,
        workers=0,
        iters=1,
        precision="bf16",
        no_compile=True,
        methods=["byol"],
        modes=["bsim"],
    )
    return bench.Settings(args, torch.device("cpu"))


def test_loader_rows_use_the_policy_of_the_recipe_at_their_resolution(tmp_path):
    at224 = bench.Bench(settings(224), {}, tmp_path, harness.Budget(None), {}).loader_cfg("torch", "builtin")
    at32 = bench.Bench(settings(32), {}, tmp_path, harness.Budget(None), {}).loader_cfg("torch", "builtin")
    assert list(at224.aug.blur_p) == [1.0, 0.1] and list(at224.aug.solarize_p) == [0.0, 0.2]  # ImageNet recipe
    assert list(at32.aug.blur_p) == [0.0, 0.0]  # configs/small
    assert at224.data.image_size == 224 and at224.data.loader == "torch"


def test_targets_against_hand_written_rows():
    def model(mode, ips):
        return {
            "kind": "model",
            "method": "byol",
            "mode": mode,
            "arch": "resnet50",
            "size": 224,
            "batch": 256,
            "compile": True,
            "images_s": ips,
        }

    rows = [
        model("sim", 2300.0),
        model("bsim", 2250.0),
        {"kind": "loader", "loader": "ffcv", "size": 224, "images_s": 3000.0},
        {"kind": "loader", "loader": "dali", "size": 224, "skipped": "dali not installed"},
        {"kind": "end_to_end", "loader": "ffcv", "size": 224, "images_s": 2000.0, "ratio_to_model": 2000 / 2250},
        {"kind": "end_to_end", "loader": "torch", "size": 224, "images_s": 250.0, "ratio_to_model": 250 / 2250},
        {"kind": "kernel", "name": "cutmix_normalize", "ms": 0.2, "speedup": 3.7, "frac_of_copy": 0.65},
        {"kind": "kernel", "name": "augment_cutmix_normalize_two_views", "ms": 2.4, "launches": 5.5},
    ]
    got = {t["id"]: (t["measured"], t["status"]) for t in bench_targets.evaluate(rows, applicable=True)}
    assert got["byol_bsim_model"] == (2250.0, "pass")
    assert abs(got["bsim_overhead"][0] - (2300 / 2250 - 1)) < 1e-12 and got["bsim_overhead"][1] == "pass"  # 2.2%
    assert got["ffcv_loader"] == (3000.0, "miss")
    assert got["dali_loader"] == (None, "not measured")  # a skipped row is not a measurement
    assert got["e2e_ffcv"][1] == "miss" and got["e2e_vs_torchvision"] == (8.0, "pass")
    assert got["cutmix_speedup"] == (3.7, "pass") and got["cutmix_bandwidth"] == (0.65, "miss")
    assert got["view_pipeline_ms"] == (2.4, "miss") and got["view_pipeline_launches"] == (5.5, "pass")
    assert {s for _, s in got.values()} <= {"pass", "miss", "not measured"}
    assert all(t["status"] in ("n/a", "not measured") for t in bench_targets.evaluate(rows, applicable=False))


def test_benchmarks_doc_holds_the_targets_table():
    doc = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    assert bench_targets.targets_markdown() in doc, "regenerate with: python -m bsim_fast.tools.bench --targets-md"
