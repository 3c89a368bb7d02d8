"""Atomic outputs: a file or folder appears under its final name complete, or not at all.

Checkpoints, metrics, exports and reports (`write_bytes_atomic` / `write_text_atomic`) and the dataset
converters (data_prep/) write through `atomic_output`: everything goes to `<final>.tmp-<pid>` beside the final
path, is fsynced, and is renamed into place. A killed writer leaves only its temporary, which the next writer
of the same path removes (its pid no longer runs).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path


class DiskFullError(OSError):
    """No space left while writing `path`. With nothing in `installed`, every temporary is removed and the
    previous output is untouched; otherwise `installed` lists what was already replaced by its new version."""

    def __init__(self, path: Path, installed: Sequence[Path] = ()):
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path}", str(path))
        self.path = Path(path)
        self.installed = [Path(p) for p in installed]

    def __str__(self) -> str:
        if not self.installed:
            return f"no space left on device while writing {self.path} (temporary output removed; previous output kept)"
        done = ", ".join(str(p) for p in self.installed)
        return (
            f"no space left on device while installing {self.path}: {done} already replaced by the new "
            f"version, the rest not (rerun once there is space)"
        )


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
    with atomic_outputs((final, directory)) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_outputs(*outputs: tuple[Path, bool]) -> Iterator[list[Path]]:
    """`atomic_output` for files that belong together (an output and its sidecar files): (final, directory)
    pairs in, their temporaries out.

    Everything is written and fsynced before the first rename, so a full disk (which strikes while writing,
    not while renaming) leaves every previous file as it was; the renames then follow in the order given.
    """
    prepared: list[tuple[Path, Path, bool]] = []
    installed: list[Path] = []
    try:
        for final, directory in outputs:
            final = Path(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(final)
            tmp = temp_name(final)
            remove_path(tmp)
            prepared.append((final, tmp, directory))
            if directory:
                tmp.mkdir()
        yield [tmp for _, tmp, _ in prepared]
        for _, tmp, _ in prepared:
            fsync_tree(tmp)
        for final, tmp, directory in prepared:
            _install(tmp, final, directory)
            installed.append(final)
        for parent in dict.fromkeys(final.parent for final, _, _ in prepared):
            fsync_path(parent)
    except BaseException as exc:
        for _, tmp, _ in prepared:
            remove_path(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not isinstance(exc, DiskFullError):
            raise DiskFullError(Path(outputs[0][0]), installed) from exc
        raise


def _install(tmp: Path, final: Path, directory: bool) -> None:
    if not (directory and final.exists()):
        os.replace(tmp, final)
        return
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)  # the previous folder goes back under its name
        raise
    remove_path(old)


def disk_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """The one way the package writes a whole file (checkpoints, metrics.csv, config.json, reports): all of
    `data` or the previous file; a full disk raises `DiskFullError` naming `final`."""
    with atomic_output(Path(final)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text_atomic(final: Path, text: str) -> None:
    """`write_bytes_atomic` of `text` in UTF-8."""
    write_bytes_atomic(final, text.encode("utf-8"))
