"""Checkpoints that survive being killed at any moment.

A checkpoint is `ckpt_<step>.pt` plus `ckpt_<step>.pt.sha256`. Both are written under a temporary name,
flushed and renamed, the hash last: a file without a matching hash is incomplete or damaged, and
`latest_valid` falls back to the previous one, saying so in one line.
"""
from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from .atomic import DiskFullError, atomic_output

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary beside `path`, fsync, rename (the converters' `atomic_output`). On failure the
    temporary is removed and whatever was at `path` before is untouched."""
    try:
        with atomic_output(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
    except DiskFullError:
        raise CheckpointError(f"{path}: no space left on device; previous checkpoints kept") from None


def atomic_torch_save(obj, path: Path) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(state: dict, out_dir: Path, step: int, keep: int) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ckpt_{step:08d}.pt"
    digest = atomic_torch_save(state, path)
    atomic_write_bytes(path.with_name(path.name + ".sha256"), (digest + "\n").encode())
    for old in list_checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def list_checkpoints(out_dir: Path) -> list:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if CKPT_RE.match(p.name))


def verify(path: Path) -> Optional[str]:
    """None if `path` is complete and intact, else the reason it is not."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return "no .sha256 (incomplete write)"
    expected = sidecar.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        return "sha256 mismatch (truncated or corrupted)"
    return None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    reason = verify(Path(path))
    if reason:
        raise CheckpointError(f"{path}: {reason}")
    return torch.load(path, map_location=map_location, weights_only=True)


def latest_valid(out_dir: Path, log: Callable[[str], None] = print) -> Tuple[Optional[Path], Optional[dict]]:
    """The newest checkpoint that verifies and loads; damaged ones are reported and skipped."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # a damaged file must not stop the resume: fall back to an older one
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            log(f"[resume] skipping {path}: {msg}")
    return None, None
