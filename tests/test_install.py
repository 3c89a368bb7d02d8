"""Offline install: a small wheelhouse (this package + a pure-Python dependency, no torch) written by
scripts/pack_offline.sh and split into parts, installed by scripts/install.sh --offline into a fresh venv that
reuses the running interpreter's torch, with the package index switched off."""

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pure_python_wheel(dest: Path, name: str = "bsimtestdep", version: str = "1.0") -> Path:
    """A minimal valid wheel holding `name/__init__.py` (built by hand: no build backend, no network)."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = ""
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    record += f"{name}-{version}.dist-info/RECORD,,\n"
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return wheel


@pytest.mark.slow
def test_pack_split_and_offline_install_reuses_system_torch(tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": "",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    house = tmp_path / "house"
    dep = pure_python_wheel(tmp_path)
    r = subprocess.run(
        [
            "bash",
            "scripts/pack_offline.sh",
            str(house),
            "--no-ffcv",
            "--no-deps",
            "--no-dali",
            "--extra-wheel",
            str(dep),
            "--split-mb",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    parts = sorted(p.name for p in house.iterdir())
    assert parts[:2] == ["part-00", "part-01"], parts  # the package (~2 MB) is cut into 1 MB chunks
    assert (house / "part-00" / "SHA256SUMS").exists() and (house / "part-00" / "requirements.txt").exists()
    assert any(".chunk-" in f.name for p in house.iterdir() for f in p.iterdir())

    venv = tmp_path / "venv"
    r = subprocess.run(
        ["bash", "scripts/install.sh", "--offline", str(house)],
        cwd=ROOT,
        env={**env, "VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "reusing torch" in r.stdout and "[install] ready: torch" in r.stdout, r.stdout

    probe = (
        "import bsimtestdep, bsim_fast, torch, sys; "
        "print(bsimtestdep.__file__); print(bsim_fast.__file__); print(torch.__file__); print(bsimtestdep.VALUE)"
    )
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the venv itself sees
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    dep_file, pkg_file, torch_file, value = r.stdout.split()
    # The dependency comes from the wheelhouse; the package too, unless the reused environment already has this
    # version of it (the suite's own environment has it as an editable install, which then stays in use).
    assert dep_file.startswith(str(venv)) and pkg_file.endswith("bsim_fast/__init__.py"), r.stdout
    assert not torch_file.startswith(str(venv)), r.stdout  # the running Python's
    assert value == "42"


def test_offline_install_refuses_a_folder_that_is_not_a_wheelhouse(tmp_path):
    (tmp_path / "house").mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "VENV": str(tmp_path / "venv"), "PIP_NO_INDEX": "1"}
    r = subprocess.run(
        ["bash", "scripts/install.sh", "--offline", str(tmp_path / "house")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0
    assert "no SHA256SUMS" in r.stderr and "Traceback" not in r.stderr


def test_pack_refuses_bad_arguments_in_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for args, words in ((["--split-mb", "abc"], "--split-mb"), (["--have", "nope.txt"], "--have"), ([], "not empty")):
        dest = tmp_path / ("full" if not args else "new")
        r = subprocess.run(
            ["bash", "scripts/pack_offline.sh", str(dest), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHON": sys.executable},
        )
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
