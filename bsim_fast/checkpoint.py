"""Checkpoints that survive being killed at any moment.

A checkpoint is `ckpt_<step>.pt` plus `ckpt_<step>.pt.sha256`. Both are written under a temporary name,
flushed and renamed, the hash last: a file whose hash does not match is damaged, one without a hash is
unverified, and `latest_valid` falls back to the previous one, saying so in one line. Files are loaded with
`weights_only=True`: a checkpoint holding pickled code is refused, never run.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .atomic import DiskFullError, write_bytes_atomic, write_text_atomic

CKPT_RE = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    pass


def atomic_torch_save(obj, path: Path) -> str:
    """torch.save through `atomic.write_bytes_atomic`; returns the file's sha256."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(state: dict, out_dir: Path, step: int, keep: int) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ckpt_{step:08d}.pt"
    try:
        digest = atomic_torch_save(state, path)
        write_text_atomic(path.with_name(path.name + ".sha256"), digest + "\n")
    except DiskFullError as e:
        raise CheckpointError(f"{e.path}: no space left on device; previous checkpoints kept") from None
    for old in list_checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def list_checkpoints(out_dir: Path) -> list:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if CKPT_RE.match(p.name))


def verify(path: Path) -> str | None:
    """None if `path` matches its `.sha256`, else what is wrong with it."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return MISSING_HASH
    expected = sidecar.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        return "sha256 mismatch (truncated or corrupted)"
    return None


# The hash is written after the checkpoint is in place, so a checkpoint without one is complete but unverified:
# its run was killed between the two renames, or the file was copied without its .sha256.
MISSING_HASH = "no .sha256 beside it (its run was killed before writing it, or it was copied without it)"


def torch_load(path: Path, map_location="cpu"):
    """torch.load(weights_only=True) with one-line reasons: a file holding pickled code is refused (loading it
    would run that code), a file that is no PyTorch archive is named as such."""
    import pickle
    import zipfile

    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (not a zip archive)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: holds pickled code or objects other than tensors; refused for safety "
            f"(loading it could run that code)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None


def load_checkpoint(
    path: Path, map_location="cpu", require_hash: bool = True, log: Callable[[str], None] = print
) -> dict:
    """A verified checkpoint. Without its `.sha256` it is refused, or with require_hash=False (a file the user
    named) loaded after one line saying it is unverified."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    reason = verify(path)
    if reason and not (reason == MISSING_HASH and not require_hash):
        raise CheckpointError(f"{path}: {reason}")
    state = torch_load(path, map_location)
    if reason:  # after loading, so that a refused file gets one line, not two
        log(f"warning: {path}: {MISSING_HASH}; loaded it unverified")
    return state


def latest_valid(out_dir: Path, log: Callable[[str], None] = print) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that verifies and loads, damaged ones reported (one line each) and skipped;
    (None, None) if there is none. If there are checkpoints but none is valid, a run would silently start
    over: CheckpointError instead, saying what to do."""
    found = list_checkpoints(out_dir)
    first_reason = None
    for path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # a damaged file must not stop the resume: fall back to an older one
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            msg = msg[len(f"{path}: ") :] if msg.startswith(f"{path}: ") else msg
            first_reason = first_reason or msg
            log(f"[resume] skipping {path}: {msg}")
    if found:
        raise CheckpointError(
            f"{out_dir}: none of its {len(found)} checkpoint(s) can be resumed (newest: "
            f"{first_reason}); --resume PATH loads one unverified, --resume none starts over "
            f"(moving them to {Path(out_dir) / 'previous_N'})"
        )
    return None, None
