"""Issue 23's budgets for one training step outside the networks' compiled graphs, counted on the CUDA code path
without a GPU (`bsim_fast.tools.step_counts`: the Triton kernels under the interpreter, a TorchDispatchMode for
every other launch, the compiled graphs left out): at most 40 launches, and the views reach the networks with
no copy after the CutMix kernel, at most 20 E of views' traffic (E = one uint8 view batch, N·S·S·3 bytes).

The counts run in one subprocess (TRITON_INTERPRET must be set before the kernels are imported). Launch counts
do not depend on the batch or the image size, so a tiny batch is counted; the bytes are per E.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

CASES = [(m, mode, "stop") for m in ("byol", "simclr") for mode in ("sim", "bsim", "wbsim")]
CASES += [("byol", "wbsim", "skip"), ("simclr", "wbsim", "skip")]  # the NaN policy's save and host sync


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    out = tmp_path_factory.mktemp("counts") / "counts.json"
    env = dict(os.environ, TRITON_INTERPRET="1", BSIM_FAST_TRITON="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    rows = []
    for policy in ("stop", "skip"):
        modes = ["sim", "bsim", "wbsim"] if policy == "stop" else ["wbsim"]
        args = ["--methods", "byol", "simclr", "--modes", *modes, "--nan-policy", policy, "--json", str(out)]
        proc = subprocess.run(
            [sys.executable, "-m", "bsim_fast.tools.step_counts", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if proc.returncode != 0:
            pytest.fail(f"step_counts failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows += json.loads(out.read_text())["rows"]
    return {(r["method"], r["mode"], r["nan_policy"]): r for r in rows}


@pytest.mark.parametrize("method,mode,policy", CASES)
def test_step_launches_and_view_traffic_within_budget(counted, method, mode, policy):
    row = counted[(method, mode, policy)]
    assert row["bytes_exact"], row  # the kernels' bytes were recorded access by access
    assert row["launches"] <= row["budget"]["launches"] == 40, row
    assert row["view_bytes_e"] <= row["budget"]["view_bytes_e"] == 20.0, row
    # the views: two CutMix launches and one host-to-device copy of partner, boxes and λ (none in SIM)
    assert row["triton"] == ["_cutmix_normalize_kernel"] * 2 and row["h2d_copies"] == (mode != "sim"), row
    # the CutMix kernel reads each uint8 view once (1 E), in BSIM the partner's pixels inside the box too (less
    # than 1 E), and writes each bf16 output once (2 E each); nothing else touches the views outside the networks
    outputs = 1 if mode == "sim" else 2
    least = 2 * (1 + 2 * outputs)
    assert least <= row["view_bytes_e"] <= least + (0 if mode == "sim" else 2), row
    assert "cat" not in row["aten"], row
    # ... nor inside the compiled graph: what reads the views' batch there (through slices) is a first convolution
    assert row["view_readers"] == ["convolution"], row
