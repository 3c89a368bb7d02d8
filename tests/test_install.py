"""Installing: an offline wheelhouse (this package + a pure-Python dependency, no torch) written by
scripts/pack_offline.sh and split into parts, installed by scripts/install.sh --offline into a fresh venv that
reuses the running interpreter's torch, with the package index switched off; the installed package's commands
and recipes from outside the clone; one OpenCV; the DALI build for torch's CUDA; the tested version bounds."""

import base64
import configparser
import hashlib
import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import project_copy

ROOT = Path(__file__).resolve().parents[1]
CLEAN = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what an environment itself sees
OFFLINE = {**CLEAN, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_FIND_LINKS": ""}


def pure_python_wheel(
    dest: Path, name: str = "bsimtestdep", version: str = "1.0", files: dict | None = None, requires: tuple = ()
) -> Path:
    """A minimal valid wheel holding `files` (default `name/__init__.py`), asking for `requires` (built by hand:
    no build backend, no network)."""
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        **(files or {f"{name}/__init__.py": b"VALUE = 42\n"}),
        f"{info}/METADATA": metadata.encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = ""
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    record += f"{info}/RECORD,,\n"
    wheel = dest / f"{info.split('.dist-info')[0]}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{info}/RECORD", record)
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


# ---- the installed package, from outside the clone ---------------------------------------------------------


def venv_over_this_environment(venv: Path) -> Path:
    """A venv that sees the running environment's packages (torch...), as scripts/install.sh makes one: a venv made
    from a venv sees only the base interpreter's, so the running one's site-packages are added by a .pth file."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if sys.prefix != sys.base_prefix:
        lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages())
        Path(purelib, "_parent_env.pth").write_text(lines)
    return python


@pytest.mark.slow
def test_installed_package_commands_and_recipes_work_outside_the_clone(tmp_path):
    python = venv_over_this_environment(tmp_path / "venv")
    source = project_copy(tmp_path / "src")
    r = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed", "."],
        cwd=source,
        env=OFFLINE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bin_dir = tmp_path / "venv" / "bin"

    def command(*args):
        return subprocess.run(
            [str(bin_dir / args[0]), *args[1:]], cwd=elsewhere, env=CLEAN, capture_output=True, text=True, timeout=600
        )

    r = command("python", "-c", "import bsim_fast.recipes as r, data_prep; print(r.__file__, data_prep.__file__)")
    assert r.returncode == 0 and all(f.startswith(str(tmp_path / "venv")) for f in r.stdout.split()), r.stdout
    for name in ("bsim-train", "bsim-eval", "bsim-write-ffcv", "bsim-write-dali", "bsim-speedrun", "bsim-bench"):
        r = command(name, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {name}"), (name, r.stderr[-2000:])
    r = command("bsim-train", "--config", "small/byol", "--check-only", "data.loader=torch", "data.val=")
    assert r.returncode == 0, r.stderr[-3000:]
    r = command("bsim-train", "--config", "_base/cifar", "--check-only")
    assert r.returncode == 2 and "a fragment that recipes build on" in r.stderr and r.stderr.count("\n") == 1
    r = command("bsim-write-dali", "--subset", "8", "--workers", "1")  # default output: data_out/ where it runs
    assert r.returncode == 0, r.stderr[-3000:]
    assert (elsewhere / "data_out" / "cifar10_mini_train_subset8_dali" / "meta.json").is_file()
    assert list(elsewhere.iterdir()) == [elsewhere / "data_out"]  # nothing else written where it ran
    licence = next((tmp_path / "venv").rglob("bsim_fast-*.dist-info/licenses/LICENSE")).read_text()
    assert licence.startswith("MIT License") and "bsim_fast contributors" in licence


# ---- one OpenCV -------------------------------------------------------------------------------------------


def cv2_wheels(dest: Path) -> None:
    """Stand-ins of the real wheels: both OpenCV builds provide `cv2` (as the real ones do, sharing its files),
    and ffcv asks for the GUI build (as ffcv 1.0.2 does)."""
    for name, flavour in (("opencv-python", "gui"), ("opencv-python-headless", "headless")):
        pure_python_wheel(dest, name, "4.0", {"cv2/__init__.py": f"FLAVOUR = {flavour!r}\n".encode()})
    pure_python_wheel(dest, "ffcv", "1.0.2", {"ffcv/__init__.py": b""}, requires=("numpy", "opencv-python"))
    pure_python_wheel(dest, "numpy", "2.0", {"numpy/__init__.py": b""})


def opencv_state(python: Path) -> tuple[list[str], str]:
    """(the installed distributions named opencv*, per `pip list`; the cv2 that imports)."""
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True, env=OFFLINE
    )
    names = sorted(d["name"] for d in json.loads(listed.stdout) if d["name"].lower().startswith("opencv"))
    flavour = subprocess.run(
        [str(python), "-c", "import cv2; print(cv2.FLAVOUR)"], capture_output=True, text=True, env=OFFLINE
    )
    return names, flavour.stdout.strip()


@pytest.mark.slow
def test_one_opencv_in_an_install(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cv2_wheels(wheels)
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=300)
    python = tmp_path / "venv" / "bin" / "python"
    env = {**OFFLINE, "PIP_FIND_LINKS": str(wheels)}

    def pip(*args):
        return subprocess.run([str(python), "-m", "pip", *args], env=env, capture_output=True, text=True, timeout=300)

    # install.sh's ffcv: the wheel asks for the headless build, so pip never brings opencv-python
    ffcv = wheels / "ffcv-1.0.2-py3-none-any.whl"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "wheelhouse.py"), "headless", str(ffcv), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert pip("install", "-q", r.stdout.strip()).returncode == 0
    assert opencv_state(python) == (["opencv-python-headless"], "headless")

    # an environment an earlier install left with both (the second one's files over the first's): one again
    assert pip("install", "-q", "opencv-python").returncode == 0
    assert opencv_state(python) == (["opencv-python", "opencv-python-headless"], "gui")
    r = subprocess.run(
        [str(python), str(ROOT / "scripts" / "wheelhouse.py"), "one-opencv"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0 and "one OpenCV: removed opencv-python" in r.stdout, r.stdout + r.stderr
    assert opencv_state(python) == (["opencv-python-headless"], "headless")


# ---- DALI beside torch --------------------------------------------------------------------------------------


def test_dali_build_follows_torchs_cuda_major():
    # DALI publishes one wheel per CUDA major (nvidia-dali-cuda120, nvidia-dali-cuda130); torch 2.11-2.14 wheels
    # are CUDA 12.6/12.8 or 13.0 builds, or CPU-only (no CUDA: the newest build)
    expected = {
        "12.6": "nvidia-dali-cuda120 dali-cuda12",
        "12.8": "nvidia-dali-cuda120 dali-cuda12",
        "13.0": "nvidia-dali-cuda130 dali-cuda13",
        "None": "nvidia-dali-cuda130 dali-cuda13",
    }
    for cuda, line in expected.items():
        r = subprocess.run(
            [sys.executable, "scripts/wheelhouse.py", "dali-package", cuda], cwd=ROOT, capture_output=True, text=True
        )
        assert r.stdout.strip() == line, (cuda, r.stdout, r.stderr)
    extras = configparser.ConfigParser()
    extras.read(ROOT / "setup.cfg")
    for line in expected.values():
        package, extra = line.split()
        assert extras["options.extras_require"][extra].strip().startswith(package)


DALI_BESIDE_TORCH = """
import io, json
import numpy as np, torch
from PIL import Image
product = torch.randn(8, 8) @ torch.randn(8, 8)  # torch first, then DALI, in one process
from nvidia.dali import fn, pipeline_def, types
import nvidia.dali
rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), np.uint8)
jpeg = io.BytesIO()
Image.fromarray(rgb).save(jpeg, "JPEG", quality=95)
data = np.frombuffer(jpeg.getvalue(), np.uint8)

@pipeline_def(batch_size=2, num_threads=1, device_id=None)
def decode():
    return fn.decoders.image(fn.external_source(source=lambda: [data, data], batch=True), output_type=types.RGB)

pipe = decode()
pipe.build()
(images,) = pipe.run()
ours = torch.from_numpy(np.array(images.at(1))).int()
pillow = torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB"))).int()
print(json.dumps({"dali": nvidia.dali.__version__, "cuda": torch.version.cuda, "diff": int((ours - pillow).abs().max()),
                  "shape": list(ours.shape), "finite": bool(torch.isfinite(product).all())}))
"""


def test_dali_and_torch_load_side_by_side_and_a_cpu_pipeline_runs():
    pytest.importorskip("nvidia.dali")
    r = subprocess.run([sys.executable, "-c", DALI_BESIDE_TORCH], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    # both decoders are libjpeg-turbo: the same pixels (Pillow is the reference)
    assert result["shape"] == [24, 32, 3] and result["diff"] <= 1 and result["finite"], result


# ---- the tested versions -------------------------------------------------------------------------------------


def test_setup_bounds_hold_the_versions_tested_and_no_newer():
    from packaging.requirements import Requirement

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = filter(None, config["options"]["install_requires"].split("\n"))
    requirements = {r.name: r.specifier for r in map(Requirement, lines)}
    # tested: torch 2.11 (GPU image) to 2.14.1 (here), torchvision 0.26 to 0.29.1, triton 3.6 to 3.8
    for name, tested, newer, older in (
        ("torch", ("2.11.0", "2.14.1"), "2.14.2", "2.10.0"),
        ("torchvision", ("0.26.0", "0.29.1"), "0.30.0", "0.25.0"),
        ("triton", ("3.6.0", "3.8.0", "3.8.1"), "3.9.0", "3.5.0"),
        ("ffcv", ("1.0.2",), "1.0.3", "1.0.1"),
    ):
        spec = requirements[name]
        assert all(spec.contains(v) for v in tested) and not spec.contains(newer) and not spec.contains(older), name
