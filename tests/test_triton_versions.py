"""The kernel tests under triton 3.6, the version of the GPU machines' image, beside the version installed here
(CI installs the newest that setup.cfg allows, 3.8 today). An API that 3.6 lacks would otherwise first show on
a GPU slot, and cost it.

triton 3.6's wheel for this Python and platform is fetched from the package index (`pip download`; kept in the
cache, `$BSIM_FAST_CACHE` or ~/.cache/bsim_fast, so a second run needs no network), unpacked with
`pip install --no-deps --target` into a temporary folder, and put first on the PYTHONPATH of a pytest run of
tests/test_kernels.py: its interpreter cases (their own subprocess inherits the path) and the PTX compiled for
sm_90 run against 3.6 with this torch and this numpy (3.6's interpreter once refused a runtime loop bound under
numpy 2.4: docs/BENCHMARKS.md). Skipped, in one line, when the wheel cannot be fetched."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bsim_fast.atomic import atomic_output
from bsim_fast.datasets import cache_dir

ROOT = Path(__file__).resolve().parents[1]
TRITON = "3.6.0"


def wheels() -> list[Path]:
    """triton TRITON's wheel for this interpreter, from the cache or fetched into it (atomically: a
    fetch cut off leaves no folder under the final name)."""
    folder = cache_dir() / f"triton-{TRITON}-py{sys.version_info.major}{sys.version_info.minor}-wheel"
    if not list(folder.glob("*.whl")):
        with atomic_output(folder, directory=True) as tmp:
            fetched = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
                + ["--disable-pip-version-check", "-q", f"triton=={TRITON}", "-d", str(tmp)],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if fetched.returncode != 0:
                lines = (fetched.stderr or fetched.stdout).strip().splitlines() or ["(no output)"]
                pytest.skip(f"triton {TRITON} not fetched for Python {sys.version.split()[0]}: {lines[-1][:200]}")
    return sorted(folder.glob("*.whl"))


@pytest.mark.slow
def test_kernel_tests_pass_under_triton_3_6(tmp_path):
    target = tmp_path / "triton"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check", "-q"]
        + ["--target", str(target), *map(str, wheels())],
        check=True,
        capture_output=True,
        timeout=900,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "import numpy, torch, triton; print(triton.__version__, triton.__file__, numpy.__version__)",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert found.stdout.split()[:1] == [TRITON], found.stdout + found.stderr[-2000:]
    assert found.stdout.split()[1].startswith(str(target)), found.stdout
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_kernels.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = [line for line in run.stdout.splitlines() if " PASSED" in line]
    assert any("test_ptx_for_sm90_vector_accesses_and_rounding" in line for line in passed), run.stdout[-3000:]
    assert sum("test_interpreter_" in line for line in passed) >= 30, run.stdout[-3000:]
