"""Loaders: one protocol, four back ends, one registry (docs/DESIGN.md).

    loader = build_train_loader(cfg, rank, world_size, device)
    len(loader)                                                   # batches per epoch on this rank
    for a_u8, b_u8, labels in loader.epoch(epoch, start_batch=0)  # uint8 [N,S,S,3] x2 on device, int64 [N] host
    for x_u8, labels in build_eval_loader(cfg, path, rank, world_size, device)   # centre crop, every sample once
    loader.labeled                                                # False for an unlabeled set (every label -1)

`LOADERS` is the one list of loader kinds: `data.loader`'s allowed values (config.py), the back end that
`build_*_loader` opens, the formats each reads (`check_dataset`, `kind_for_path` for eval, the benchmark's
rows). This module imports no back end (nor torch): they load when a loader of their kind is built, so each
works without the others installed. What the back ends share is in `base.py`.

Adding a loader: a module here with a `TrainLoader` and an `EvalLoader` subclass (base.py), plus one line in
`LOADERS` (and one in `FORMATS` if it reads a new kind of path).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path


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


def loader_kind(cfg) -> str:
    """The kind a config asks for: `data.gpu_resident=true` reads the folder or .beton of `data.loader`
    into device memory (README "Small datasets")."""
    return "gpu_resident" if cfg.data.gpu_resident else cfg.data.loader


def path_format(path) -> str | None:
    """'beton', 'shards', 'folder' (a key of FORMATS), or None for anything else; looks at names only."""
    p = Path(path)
    if p.is_dir():
        return "shards" if (p / "meta.json").is_file() else "folder"
    if p.is_file() and p.suffix == ".beton":
        return "beton"
    return None


def kind_for_path(path: str) -> str:
    """The loader that reads `path` (for `eval`, which takes paths of any kind): ffcv for a .beton, dali for a
    shard folder, torch for an image folder or the built-in set; a one-line error for anything else."""
    path = os.fspath(path)
    if path == "builtin" or path.startswith("builtin:"):
        return "torch"
    from .base import DatasetError

    if not os.path.exists(path):
        raise DatasetError(f"{path}: dataset not found")
    fmt = path_format(path)
    for kind, spec in LOADERS.items():
        if fmt is not None and spec.reads[0] == fmt:
            return kind
    raise DatasetError(f"{path}: neither a .beton file, a DALI shard folder nor an image folder")


def check_dataset(kind: str, path: str, key: str = "data path") -> str:
    """Checks, before any work, that loader `kind` can read `path`; returns the path it will open.

    One line (a ConfigError: exit 2) naming the path, what it is and the `data.loader` that reads it; for the
    built-in set, the converter command when the converted copy is missing."""
    from .base import check_format, resolve_path

    resolved = resolve_path(kind, path)
    check_format(kind, resolved, key)
    return resolved


def check_datasets(cfg) -> None:
    """`check_dataset` for data.train and (when set) data.val of a training config."""
    kind = loader_kind(cfg)
    check_dataset(kind, cfg.data.train, "data.train")
    if cfg.data.val:
        check_dataset(kind, cfg.data.val, "data.val")


def _backend(kind: str, role: str):
    if kind not in LOADERS:
        raise ValueError(f"data.loader = {kind!r} is not one of {', '.join(KINDS)}")
    spec = LOADERS[kind]
    return getattr(importlib.import_module(f"{__name__}.{spec.module}"), getattr(spec, role))


def build_train_loader(cfg, rank: int, world_size: int, device):
    return _backend(loader_kind(cfg), "train")(cfg, rank, world_size, device)


def build_eval_loader(cfg, path: str, rank: int, world_size: int, device, kind: str | None = None):
    """The eval loader of `kind` (default: the config's, as the k-NN monitor wants); `eval` passes
    `kind_for_path(path)` to read paths of any kind."""
    return _backend(kind or loader_kind(cfg), "eval")(cfg, path, rank, world_size, device)
