"""First contact, as a new user meets it (issue 24: converters, scripts, entry points): real processes on real
folders. A photo folder as people keep it; a converter output named without its suffix; recipes by name, by
path and as one's own copy, fragments refused; `--help` that does nothing else and argument errors in one line,
for every script in scripts/ and every `python -m` entry point."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, project_copy
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PIP_NO_INDEX": "1"}


def run(args, cwd=ROOT, timeout=600, **env):
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**ENV, **env}, stdin=subprocess.DEVNULL
    )


def error_line(r) -> str:
    """The one line of a refusal: exit 2, nothing else on stderr, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    return lines[0]


def solid(path: Path, rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), rgb).save(path, "JPEG", quality=95)


# ---- case 3: a labelled folder as people keep photos -----------------------------------------------------

THUMB = (255, 0, 255)  # every thumbnail and metadata image: magenta, a colour no photo below has


@pytest.fixture
def photos(tmp_path):
    """Two class folders, two pictures at the top beside them, and what a NAS, a file manager, a Mac and Windows
    leave there. Returns (root, {relative path of each photo: its colour})."""
    root = tmp_path / "PHOTOS"
    kept = {"cats/a.jpg": (200, 30, 30), "cats/b.jpg": (30, 200, 30), "dogs/c.jpg": (30, 30, 200)}
    top = {"IMG_0001.jpg": (200, 200, 30), "IMG_0002.jpg": (30, 200, 200)}
    for rel, rgb in {**kept, **top}.items():
        solid(root / rel, rgb)
    for rel in (
        "@eaDir/IMG_0001.jpg/SYNOPHOTO_THUMB_XL.jpg",  # Synology: one @eaDir in every folder
        "cats/@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg",
        "dogs/@eaDir/c.jpg/SYNOPHOTO_THUMB_M.jpg",
        ".thumbnails/normal/x.jpg",  # a Linux file manager
        "__MACOSX/cats/._a.jpg",  # unzipped on a Mac
        "#recycle/old.jpg",  # Synology recycle bin
        "System Volume Information/tracking.jpg",  # Windows
    ):
        solid(root / rel, THUMB)
    (root / "notes.txt").write_text("holiday")
    (root / "cats" / "Thumbs.db").write_bytes(b"\0" * 8)
    (root / "cats" / ".DS_Store").write_bytes(b"\0" * 8)
    return root, kept, top


def stored_colours(shard_folder: Path) -> list[tuple[int, ...]]:
    colours = []
    for tar_path in sorted(shard_folder.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    image = np.asarray(Image.open(tar.extractfile(member)).convert("RGB"), np.float64)
                    colours.append(tuple(int(round(c)) for c in image.reshape(-1, 3).mean(0)))
    return colours


def near(a, b, tolerance=6) -> bool:  # JPEG moves a flat colour by a few levels
    return max(abs(x - y) for x, y in zip(a, b)) <= tolerance


def test_photo_folder_as_people_keep_it(photos, tmp_path):
    root, kept, top = photos
    out = tmp_path / "photos.beton"
    r = run([sys.executable, "data_prep/write_ffcv.py", "--source", str(root), "--output", str(out), "--workers", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    err = [line for line in r.stderr.replace("\r", "\n").splitlines() if line and not re.match(r"\w+:\s+\d", line)]
    passed = [line for line in err if line.startswith("passed over")]
    assert len(passed) == 1, err  # one line names every hidden and system folder, none taken as a class
    for name in ("@eaDir (3x)", ".thumbnails", "__MACOSX", "#recycle", "System Volume Information"):
        assert name in passed[0], passed[0]
    unclassed = [line for line in err if "IMG_0001.jpg" in line]
    assert len(unclassed) == 1 and unclassed[0].startswith(
        f"left out 2 image(s) at the top of {root}, in no class folder"
    ), err
    assert "--no-labels" in unclassed[0] and "not images" not in unclassed[0]
    non_images = [line for line in err if line.startswith("ignored 2 file(s) that are not images")]
    assert len(non_images) == 1 and "notes.txt" in non_images[0] and "cats/Thumbs.db" in non_images[0], err
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["classes"] == ["cats", "dogs"] and summary["images_written"] == 3
    assert summary["unclassed_images"] == 2 and "--no-labels takes them" in r.stdout.splitlines()[0]

    # --no-labels: every photo, the two at the top included, and no thumbnail
    shards = tmp_path / "photos_dali"
    r = run(
        [sys.executable, "data_prep/write_dali.py", "--source", str(root), "--no-labels", "--output", str(shards)]
        + ["--workers", "1", "--order", "source"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    colours = stored_colours(shards)
    expected = [rgb for _, rgb in sorted({**kept, **top}.items(), key=lambda kv: str(root / kv[0]))]
    assert len(colours) == 5 and all(near(c, e) for c, e in zip(colours, expected)), (colours, expected)
    assert not any(near(c, THUMB, 40) for c in colours)

    # the loaders list the folder by the same rules (the torch loader reads it as the converter did)
    from bsim_fast.loaders.base import scan_folder

    source = scan_folder(str(root))
    assert source.classes == ["cats", "dogs"] and [os.path.relpath(p, root) for p in source.paths] == sorted(kept)


def test_metadata_folders_beside_photos_are_not_classes(tmp_path):
    root = tmp_path / "roll"
    for k in range(3):
        solid(root / f"IMG_{k}.jpg", (40 * k, 90, 90))
    solid(root / "@eaDir" / "IMG_0.jpg" / "SYNOPHOTO_THUMB_XL.jpg", THUMB)
    solid(root / ".thumbnails" / "x.jpg", THUMB)
    r = run([sys.executable, "data_prep/write_ffcv.py", "--source", str(root), "--output", str(tmp_path / "r.beton")])
    line = error_line(r)
    assert f"no class folders in {root}" in line and "@eaDir" in line and "--no-labels" in line
    assert not (tmp_path / "r.beton").exists()


# ---- case 7: an output named without its suffix ----------------------------------------------------------


def test_converter_outputs_are_named_as_the_trainer_reads_them(tmp_path):
    r = run([sys.executable, "data_prep/write_ffcv.py", "--subset", "8", "--output", str(tmp_path / "photos")])
    line = error_line(r)
    assert f"--output {tmp_path / 'photos'}" in line and f"use --output {tmp_path / 'photos'}.beton" in line
    r = run([sys.executable, "data_prep/write_dali.py", "--subset", "8", "--output", str(tmp_path / "shards.beton")])
    assert "would be taken for an FFCV file" in error_line(r)
    assert list(tmp_path.iterdir()) == []  # refused before any work: nothing written, no temporary

    from bsim_fast.loaders import check_dataset

    out = tmp_path / "photos.beton"
    r = run([sys.executable, "data_prep/write_ffcv.py", "--subset", "8", "--workers", "1", "--output", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert check_dataset("ffcv", str(out)) == str(out)  # what the converter wrote, the trainer takes


# ---- case 5: recipes by name or path, fragments refused --------------------------------------------------


@pytest.mark.slow
def test_recipes_by_name_or_path_and_fragments_refused(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    # one's own copy in another folder: its bases (../_base/...) are the shipped ones
    shutil.copy(ROOT / "configs" / "small" / "byol.yaml", exp / "my_byol.yaml")
    (exp / "no_method.yaml").write_text("data: {batch_size: 8}\n")
    script = str(ROOT / "scripts" / "train_8gpu.sh")
    out = tmp_path / "run"
    args = [*TINY, "data.val=", "train.max_steps=1", f"train.out_dir={out}"]
    r = run(["bash", script, "my_byol.yaml", *args], cwd=exp)  # a path relative to where the user stands
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "backbone.pt").is_file() and "[done] step 1" in r.stdout

    missing = tmp_path / "nowhere"
    r = run(["bash", script, "configs/small/byol.yaml", f"data.train={missing}"])  # accepted: the dataset is refused
    assert str(missing) in error_line(r)
    line = error_line(run(["bash", script, "_base/cifar"]))
    assert line.startswith("error: _base/cifar: a fragment that recipes build on, not a recipe (a file in a _base/")
    assert "small/byol_bsim" in line.split("choose one of:")[1].split(), line

    # every entry point that takes a recipe resolves it the same way (bsim_fast.recipes)
    from bsim_fast import train
    from bsim_fast.tools import speedrun

    for recipe, words in (
        ("configs/_base/cifar.yaml", "a fragment that recipes build on, not a recipe (a file in a _base/"),
        (str(exp / "no_method.yaml"), "a fragment that recipes build on, not a recipe (it names no method.name"),
        ("byol_bsmi", "no such recipe"),
    ):
        assert train.main(["--check-only", "--config", recipe]) == 2
        assert capsys.readouterr().err.startswith(f"error: {recipe}: {words}")
    assert speedrun.main(["--recipe", "_base/aug_byol", "--data", "builtin", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.startswith("error: --recipe _base/aug_byol: a fragment")
    assert not (tmp_path / "s").exists()


def test_a_copied_recipe_whose_base_is_ambiguous_is_refused_naming_both(tmp_path):
    shutil.copy(ROOT / "configs" / "small" / "byol_bsim.yaml", tmp_path / "mine.yaml")  # base: byol.yaml
    from bsim_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "mine.yaml")
    message = str(caught.value)
    assert "base 'byol.yaml' is not beside it" in message and "byol.yaml, small/byol.yaml" in message
    (tmp_path / "mine.yaml").write_text("base: small/byol.yaml\nmethod: {mode: bsim}\n")
    assert load_config(tmp_path / "mine.yaml").model.cifar_stem is True  # the shipped small/byol.yaml


# ---- case 8: --help does nothing else; argument errors in one line ---------------------------------------


def entry_modules() -> list[str]:
    """Every `python -m` entry point: the modules with a __main__ block in bsim_fast/ and data_prep/."""
    found = []
    for path in sorted([*ROOT.glob("bsim_fast/**/*.py"), *ROOT.glob("data_prep/*.py")]):
        if re.search(r'^if __name__ == "__main__":', path.read_text(), re.M):
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A copy of the repository's files (no .venv, no data_out): what --help must leave as it found it."""
    return project_copy(tmp_path_factory.mktemp("clone"))


PROBE = """
import contextlib, io, json, runpy, sys, warnings
# one process runs them all, so a module may already be imported by an earlier one; `python -m` starts afresh
warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
arg, modules, results = sys.argv[1], sys.argv[2:], {}
for module in modules:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [module, arg]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    results[module] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def run_modules(clone: Path, modules: list[str], arg: str) -> dict:
    """Each module run as `python -m MODULE ARG` (runpy, as -m does; one process, one torch import)."""
    r = run([sys.executable, "-c", PROBE, arg, *modules], cwd=clone, PYTHONPATH=str(clone))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_help_does_nothing_else_everywhere(clone):
    before = snapshot(clone)
    scripts = sorted(p.name for p in (ROOT / "scripts").glob("*.sh"))
    assert {"install.sh", "quickstart.sh", "bench.sh", "train_8gpu.sh", "test.sh"} <= set(scripts)
    for name, flag in [*((name, "--help") for name in scripts), ("install.sh", "-h"), ("quickstart.sh", "-h")]:
        r = run(["bash", f"scripts/{name}", flag], cwd=clone, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() and not r.stderr.strip(), (name, r.stderr[-2000:])
        assert snapshot(clone) == before, (name, snapshot(clone) ^ before)  # nothing converted or installed
    modules = entry_modules()
    assert {"bsim_fast.train", "bsim_fast.eval", "data_prep.write_ffcv", "bsim_fast.tools.speedrun"} <= set(modules)
    for module, (code, out, err) in run_modules(clone, modules, "--help").items():
        assert code == 0 and "usage:" in out, (module, code, err[-2000:])
    assert snapshot(clone) == before


def test_argument_errors_are_one_line(clone):
    # bsim_fast.dist is torchrun itself (its own parser); every other entry point is ours
    modules = [m for m in entry_modules() if m != "bsim_fast.dist"]
    for module, (code, _out, err) in run_modules(clone, modules, "--no-such-flag").items():
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (module, code, err[-2000:])
        assert ": error: " in lines[0] and lines[0].endswith("(see --help)"), lines  # argparse's words
    r = run(["bash", "scripts/gpu_check.sh", "out", "--methods", "byoll"], cwd=clone)  # checked before any work
    assert "invalid choice: 'byoll'" in error_line(r) and not (clone / "out").exists()
