"""The benchmark command runs end to end on CPU at tiny sizes and writes JSON, a table and a PNG."""
import json
import subprocess
import sys

from helpers import tiny_folder


def test_bench_tiny_smoke(tmp_path):
    folder = tiny_folder(tmp_path / "imgs", "train", per_class=8, classes=4)
    r = subprocess.run([sys.executable, "-m", "bsim_fast.bench", "--tiny", "--methods", "byol", "--modes", "sim", "bsim",
                        "--ffcv", str(tmp_path / "none.beton"), "--dali", str(tmp_path / "none"), "--folder", str(folder),
                        "--batch", "8", "--iters", "1", "--workers", "0", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    kinds = {(row["kind"], row.get("loader"), row.get("mode")) for row in report["rows"]}
    assert {("loader", "torch", None), ("model", None, "sim"), ("model", None, "bsim"), ("end_to_end", "torch", None)} <= kinds
    assert all(row["images_s"] > 0 for row in report["rows"] if "images_s" in row)
    assert (tmp_path / "out" / "bench.png").stat().st_size > 1000
    assert "images/s" in r.stdout and json.loads(r.stdout.strip().splitlines()[-1])["rows"]
