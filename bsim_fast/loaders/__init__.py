"""Loaders: one protocol, four back ends, one registry (docs/DESIGN.md).

    loader = build_train_loader(cfg, rank, world_size, device)
    len(loader)                                                   # batches per epoch on this rank
    for a_u8, b_u8, labels in loader.epoch(epoch, start_batch=0)  # uint8 [N,S,S,3] x2 on device, int64 [N] host
    for x_u8, labels in build_eval_loader(cfg, path, rank, world_size, device)   # centre crop, every sample once
    loader.labeled                                                # False for an unlabeled set (every label -1)

The kinds, the formats each reads and the one check of a dataset path are in `registry.py` (no back end,
no torch); a back end loads when a loader of its kind is built, so each works without the others installed.
What the back ends share is in `base.py`.

Adding a loader: a module here with a `TrainLoader` and an `EvalLoader` subclass (base.py), plus one line in
`registry.LOADERS` (and one in `FORMATS` if it reads a new kind of path).
"""

from __future__ import annotations

import importlib

from .registry import (
    FORMATS,
    KINDS,
    LOADERS,
    DatasetError,
    check_dataset,
    check_datasets,
    check_kind,
    kind_for_path,
    path_format,
)


def _backend(kind: str, role: str):
    check_kind(kind)
    spec = LOADERS[kind]
    return getattr(importlib.import_module(f"{__name__}.{spec.module}"), getattr(spec, role))


def build_train_loader(cfg, rank: int, world_size: int, device):
    """The train loader of `data.loader` over `data.train` (checked as it is opened)."""
    check_kind(cfg.data.loader, cfg.where("data.loader"))
    return _backend(cfg.data.loader, "train")(cfg, rank, world_size, device)


def build_eval_loader(cfg, path: str, rank: int, world_size: int, device, kind: str | None = None):
    """The eval loader of `kind` (default: `data.loader`, as the k-NN monitor wants); `eval` passes
    `kind_for_path(path)` to read paths of any kind."""
    return _backend(kind or cfg.data.loader, "eval")(cfg, path, rank, world_size, device)


__all__ = [
    "FORMATS",
    "KINDS",
    "LOADERS",
    "DatasetError",
    "build_eval_loader",
    "build_train_loader",
    "check_dataset",
    "check_datasets",
    "check_kind",
    "kind_for_path",
    "path_format",
]
