"""Where a result came from: device, package versions and the commit, recorded beside every run and report.

Training writes it to `run.json` in its run folder and the tools (`bsim_fast/tools/`) into their reports, so a
number can always be traced to the code and the machine that produced it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# the distributions whose versions change results; DALI's name carries the CUDA major it was built for
PACKAGES = {
    "torchvision": ("torchvision",),
    "triton": ("triton",),
    "ffcv": ("ffcv",),
    "dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120"),
    "numba": ("numba",),
}


def package_version(*dists: str) -> str | None:
    """The installed version of the first of `dists` that is installed, or None."""
    for dist in dists:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def git_commit() -> tuple[str, bool | None]:
    """(short commit, whether tracked files differ from it); ($BSIM_FAST_COMMIT, None) where the tree was copied
    without .git, ("", None) where neither is known."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if commit:
            return commit, bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("BSIM_FAST_COMMIT", ""), None


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


def environment(device: torch.device, world_size: int = 1) -> dict:
    """Device, versions, commit (with `+changes` when tracked files differ from it) and world size."""
    device = torch.device(device)
    commit, dirty = git_commit()
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "world_size": world_size,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit + ("+changes" if dirty else ""),
        "dirty": dirty,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    env.update({name: package_version(*dists) for name, dists in PACKAGES.items()})
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["multiprocessors"] = props.multi_processor_count
        env["driver"] = _driver()
    return env


__all__ = ["environment", "git_commit", "package_version"]
