"""Shared test helpers: a tiny ImageFolder cut from the built-in dataset, tiny-model overrides, and a copy of the
project's files."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.arch=resnet18",
    "model.cifar_stem=true",
    "model.proj_hidden=32",
    "model.proj_dim=16",
    "model.pred_hidden=16",
    "model.queue_size=64",
    "data.loader=torch",
    "data.image_size=16",
    "data.batch_size=8",
    "data.workers=0",
    "train.log_every=1",
    "train.compile=off",
    "train.tensorboard=false",
    "optim.warmup_epochs=1",
    "train.knn_k=5",
]

# aug settings under which a view is the stored image: full-image crops (of square images), no flip, no photometric
IDENTITY_AUG = dict(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    gray_p=0.0,
    blur_p=(0.0, 0.0),
    solarize_p=(0.0, 0.0),
)


def tiny_folder(dest: Path, split: str = "train", per_class: int = 6, classes: int = 4) -> Path:
    """The first `per_class` images of the first `classes` classes of the built-in set, as an ImageFolder."""
    from bsim_fast.datasets import builtin_root

    src = builtin_root() / split
    for cls in sorted(p.name for p in src.iterdir())[:classes]:
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / cls).iterdir())[:per_class]:
            shutil.copy(f, dest / cls / f.name)
    return dest


def project_copy(dest: Path) -> Path:
    """The project's files (tracked and new, not ignored; tests/ left out) copied to `dest`: no .venv, data_out,
    build/ or .egg-info, so what runs there (an install, a script's --help) leaves the repository untouched."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        if (ROOT / rel).is_file() and not rel.startswith("tests/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest
