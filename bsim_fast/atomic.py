"""Atomic outputs: a file or folder appears under its final name complete, or not at all.

Checkpoints (bsim_fast/checkpoint.py) and the dataset converters (data_prep/) write through `atomic_output`:
everything goes to `<final>.tmp-<pid>` beside the final path, is fsynced, and is renamed into place. A killed
writer leaves only its temporary, which the next writer of the same path removes (its pid no longer runs).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator


class DiskFullError(OSError):
    """No space left while writing `path`; the temporary is removed and a previous `path` is untouched."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path}", str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return (f"no space left on device while writing {self.path} "
                f"(temporary output removed; previous output kept)")


def temp_name(final: Path) -> Path:
    return final.with_name(f"{final.name}.tmp-{os.getpid()}")


def remove_stale_temps(final: Path) -> None:
    """Removes `<final>.tmp-<pid>` left by a converter that was killed (its pid no longer runs)."""
    for candidate in final.parent.glob(f"{final.name}.tmp-*"):
        pid = candidate.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        remove_path(candidate)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            fsync_tree(child)
    fsync_path(path)


@contextlib.contextmanager
def atomic_output(final: Path, directory: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `final`; on success it is fsynced and renamed to `final`.

    On any exception the temporary is removed and a previous `final` is left untouched. A full disk
    raises `DiskFullError` naming `final`. A folder output replaces an old folder by renaming the old one
    aside first (a folder cannot be os.replace'd over a non-empty one), so `final` is never partial.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = temp_name(final)
    remove_path(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if directory and final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            remove_path(old)
        else:
            os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException as exc:
        remove_path(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not isinstance(exc, DiskFullError):
            raise DiskFullError(final) from exc
        raise


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_output(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def disk_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with atomic_output(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
