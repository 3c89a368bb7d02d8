"""The loader registry: the kinds, the formats each reads, and the one check of a dataset path.

`LOADERS` is the one list of loader kinds: the values `data.loader` may take (`check_kind`), the back end that
`build_*_loader` opens, the formats each reads. `check_dataset(kind, path, key)` is the one check of a dataset
path (it exists, or is the built-in set and its converted copy exists, and `kind` reads its format): the
loaders run it as they open a path, the trainer for `data.val` before any work, `eval` through `kind_for_path`.
Imports no back end and not torch, so the names and the checks work without FFCV or DALI installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import datasets
from ..config import ConfigError


@dataclass(frozen=True)
class LoaderSpec:
    module: str  # bsim_fast.loaders.<module>
    train: str  # its TrainLoader subclass
    eval: str  # its EvalLoader subclass
    reads: tuple[str, ...]  # FORMATS it opens; the first is how it reads the built-in set
    about: str


# What a dataset path can be, by what is on disk (`path_format`).
FORMATS = {"beton": "an FFCV .beton file", "shards": "a DALI shard folder", "folder": "an image folder"}

LOADERS = {
    "ffcv": LoaderSpec(
        "ffcv_loader", "FfcvTrainLoader", "FfcvEvalLoader", ("beton",), "FFCV: JPEG decode + crops in numba threads"
    ),
    "dali": LoaderSpec(
        "dali_loader",
        "DaliTrainLoader",
        "DaliEvalLoader",
        ("shards",),
        "DALI: decode + crops on the GPU (CPU without one)",
    ),
    "torch": LoaderSpec(
        "torch_loader",
        "TorchTrainLoader",
        "TorchEvalLoader",
        ("folder",),
        "torch DataLoader over an image folder (Pillow in worker processes)",
    ),
    "gpu_resident": LoaderSpec(
        "gpu_resident",
        "GpuResidentTrainLoader",
        "GpuResidentEvalLoader",
        ("folder", "beton"),
        "small sets decoded once into device memory",
    ),
}
KINDS = tuple(LOADERS)

# Where the converters put the built-in set by default (configs/small name the same files).
BUILTIN = "builtin"
BUILTIN_CONVERTED = {
    "beton": ("data_out/cifar10_mini_{split}.beton", "data_prep/write_ffcv.py"),
    "shards": ("data_out/cifar10_mini_{split}_dali", "data_prep/write_dali.py"),
}
REPO_ROOT = Path(__file__).resolve().parents[2]


class DatasetError(ConfigError, datasets.SourceError):
    """A configured dataset cannot be read (wrong kind for the loader, a bad file found while reading).

    One line naming the file. A ConfigError, so every entry point (train, eval) prints it and exits 2; a
    SourceError, so code that handles the converters' source errors handles it too."""


def check_kind(kind: str, where: str = "data.loader") -> None:
    """One line naming `where` (the file or override that set data.loader) when `kind` is no loader."""
    if kind not in LOADERS:
        raise ConfigError(f"{where}: data.loader = {kind!r} is not one of {', '.join(KINDS)}")


def path_format(path) -> str | None:
    """'beton', 'shards', 'folder' (a key of FORMATS), or None for anything else; looks at names only."""
    p = Path(path)
    if p.is_dir():
        return "shards" if (p / "meta.json").is_file() else "folder"
    if p.is_file() and p.suffix == ".beton":
        return "beton"
    return None


def builtin_split(path: str) -> str | None:
    """'builtin' -> 'train', 'builtin:test' -> 'test', anything else -> None."""
    if path == BUILTIN:
        return "train"
    if path.startswith(BUILTIN + ":"):
        split = path.split(":", 1)[1]
        if split not in datasets.SPLITS:
            raise DatasetError(f"data path {path!r}: the built-in set has splits 'train' and 'test'")
        return split
    return None


def kind_for_path(path: str) -> str:
    """The loader that reads `path` (for `eval`, which takes paths of any kind): ffcv for a .beton, dali for a
    shard folder, torch for an image folder or the built-in set; a one-line error for anything else."""
    path = os.fspath(path)
    if builtin_split(path) is not None:
        return "torch"
    if not os.path.exists(path):
        raise DatasetError(f"{path}: dataset not found")
    fmt = path_format(path)
    for kind, spec in LOADERS.items():
        if fmt is not None and spec.reads[0] == fmt:
            return kind
    raise DatasetError(f"{path}: neither a .beton file, a DALI shard folder nor an image folder")


def resolve_path(kind: str, path: str, key: str = "data path") -> str:
    """The dataset path a back end opens. For the built-in set: the ImageFolder tree, or the converted copy
    at its conventional place for a loader that reads only a converted format. Converting on the fly is
    not done here: under DDP every rank (and every node) would race to write the same file, and a
    conversion is a step a user should see; the error says the exact command instead."""
    path = os.fspath(path)
    split = builtin_split(path)
    if split is None:
        if not Path(path).exists():
            raise DatasetError(f"{key} = {path!r}: dataset not found (data.loader={kind})")
        return path
    fmt = LOADERS[kind].reads[0]
    if fmt == "folder":
        return str(datasets.builtin_root() / split)
    converted, converter = BUILTIN_CONVERTED[fmt]
    converted = converted.format(split=split)
    for candidate in (Path(converted), REPO_ROOT / converted):
        if candidate.exists():
            return str(candidate)
    raise DatasetError(
        f"{key} = {path!r} with data.loader={kind} needs the converted set {converted}: run "
        f"`python {converter} --split {split}` (writes {converted}), "
        f"or set data.loader=torch to read the built-in images directly"
    )


def check_format(kind: str, path: str, key: str = "data path") -> None:
    """One line if `path` (resolved) is not a format `kind` reads, naming what it is and the loader that
    reads it."""
    fmt = path_format(path)
    spec = LOADERS[kind]
    if fmt in spec.reads:
        return
    what = FORMATS[fmt] if fmt else "neither a .beton file, a DALI shard folder nor an image folder"
    readers = [k for k, s in LOADERS.items() if fmt in s.reads and k != "gpu_resident"]
    hint = f"; set data.loader={readers[0]}" if readers else ""
    raise DatasetError(
        f"{key} = {path!r} is {what}; data.loader={kind} reads {' or '.join(FORMATS[f] for f in spec.reads)}{hint}"
    )


def check_dataset(kind: str, path: str, key: str = "data path") -> str:
    """Checks, before any work, that loader `kind` can read `path`; returns the path it will open.

    One line (a ConfigError: exit 2) naming the path, what it is and the `data.loader` that reads it; for the
    built-in set, the converter command when the converted copy is missing."""
    check_kind(kind)
    if not os.fspath(path).strip():  # an empty path is the current folder: never what was meant
        raise DatasetError(
            f"{key} is empty: name the dataset (an image folder, a .beton, a DALI shard folder, or builtin for the "
            f"built-in set)"
        )
    resolved = resolve_path(kind, path, key)
    check_format(kind, resolved, key)
    return resolved


def check_datasets(cfg) -> None:
    """`check_dataset` for data.train and (when set) data.val of a training config."""
    check_kind(cfg.data.loader, cfg.where("data.loader"))
    check_dataset(cfg.data.loader, cfg.data.train, "data.train")
    if cfg.data.val:
        check_dataset(cfg.data.loader, cfg.data.val, "data.val")
