"""A training's run folder (`train.out_dir`): checked before any work, and held by one run at a time.

`check_out_dir` refuses in one line a folder that cannot be a run folder: an empty name (it would be the
current folder), an existing file, a path below a file, a folder that cannot be written (read-only file
system, no permission). `RunLock` is `run.lock` in the folder, held by rank 0 while it trains: the kernel's
lock on the file (`fcntl.lockf`, a POSIX record lock: released when the process ends however it ends, and not
inherited by the loader's worker processes) and in the file who holds it (pid, host, start time, command).
A second training into a busy folder is refused naming the pid and host; a lock whose holder is gone (killed,
or its pid now another program's) is taken over with a line saying so. On a file system without POSIX locks
the file alone decides: a live process of this host, or any process of another host, holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from .cli import program_name

LOCK_NAME = "run.lock"


class RunFolderError(RuntimeError):
    """A run folder that cannot be used: printed as one line, exit code 2."""


def check_out_dir(out_dir: str, where: str = "train.out_dir") -> Path:
    """The run folder, or one line naming what is wrong with it; `where` is the file or override that set it.
    Writes nothing that stays (a probe file is created and removed in the folder, or in the nearest existing
    folder above it when it does not exist yet)."""
    if not str(out_dir).strip():
        raise RunFolderError(
            f"{where}: train.out_dir is empty (it would be the current folder); name the run's folder, e.g. "
            f"train.out_dir=runs/NAME"
        )
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"train.out_dir={out_dir} is a file, not a folder ({where})")
    existing = path
    while not existing.exists():  # the nearest folder that exists: the one the run's folders are made in
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"train.out_dir={out_dir}: {existing} is a file, so no folder can be made below it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunFolderError(f"train.out_dir={out_dir}: cannot write in {existing} ({e.strerror})") from None
    return path


# ------------------------------------------------------------------------------------------ processes
def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), None if there is no such
    process. With the boot id it tells a pid apart from a later process that got the same number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if sys.platform.startswith("linux"):
            return None
        try:  # no /proc: whether the pid exists is all that can be told
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    return int(stat.rpartition(")")[2].split()[19])  # after the command name, which may hold spaces


def this_process() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot": boot_id(),
        "proc_start": process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([program_name(), *sys.argv[1:]]),
    }


def holder_state(holder: dict) -> str:
    """`alive`, `gone` (no such process), `reused` (its pid is now another program's) or `elsewhere` (another
    host: cannot be told from here) for the process a lock file names."""
    if holder.get("host") != socket.gethostname():
        return "elsewhere"
    if holder.get("boot") and holder["boot"] != boot_id():
        return "gone"  # the machine was restarted since
    pid = holder.get("pid")
    start = process_start(pid) if isinstance(pid, int) and pid > 0 else None
    if start is None:
        return "gone"
    recorded = holder.get("proc_start")
    if recorded and start and recorded != start:  # 0 or None: not known, the pid alone counts
        return "reused"
    return "alive"


def describe(holder: dict) -> str:
    if not holder:
        return "a training that is starting"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('started', '?')})"


# ------------------------------------------------------------------------------------------------ the lock
NO_POSIX_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """`run.lock` in a run folder: `acquire()` before any work (one line if the folder is busy), `release()`
    at the end (the file is removed). `busy()` asks without taking it (`--check-only`)."""

    def __init__(self, out_dir: str | Path, log=print):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.log = log
        self.fd: int | None = None

    def read_holder(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode(errors="replace")
        try:
            holder = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            holder = {"pid": "?", "host": "?", "started": f"unreadable {LOCK_NAME}"}
        return holder if isinstance(holder, dict) else {}

    def refusal(self, holder: dict) -> RunFolderError:
        how = (
            f"if that run has ended (its end cannot be seen from this host), remove {self.path}; "
            if holder and holder_state(holder) == "elsewhere"
            else "wait for it to end or stop it, "
        )
        return RunFolderError(
            f"train.out_dir={self.out_dir} is in use by another training: {describe(holder)}; "
            f"{how}or choose another train.out_dir"
        )

    def busy(self) -> str | None:
        """The refusal `acquire` would give, without taking the lock or creating anything; None if free."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock conflicts with the holder's
                locked_by_other, posix = False, True
                fcntl.lockf(fd, fcntl.LOCK_UN)
            except OSError as e:
                locked_by_other, posix = e.errno in (errno.EAGAIN, errno.EACCES), e.errno not in NO_POSIX_LOCKS
            holder = self.read_holder(fd)
        finally:
            os.close(fd)
        if locked_by_other or (holder and self._holds(holder, posix)):
            return str(self.refusal(holder))
        return None

    def _holds(self, holder: dict, posix: bool) -> bool:
        """Whether the process a lock file names still holds it, when the kernel's lock is free (or missing)."""
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            return False  # this process: a lock it left (an earlier train() in the same process)
        state = holder_state(holder)
        return state == "alive" or (state == "elsewhere" and not posix)

    def acquire(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # a holder that removes the file as we open it: open the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            posix = True
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    holder = self.read_holder(fd)
                    os.close(fd)
                    raise self.refusal(holder) from None
                if e.errno not in NO_POSIX_LOCKS:
                    os.close(fd)
                    raise RunFolderError(f"{self.path}: cannot lock the run folder ({e.strerror})") from None
                posix = False
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)
        else:
            raise RunFolderError(f"{self.path}: the lock file keeps changing; another training is starting here")
        holder = self.read_holder(fd)
        if holder and self._holds(holder, posix):
            os.close(fd)
            raise self.refusal(holder)
        if holder and holder.get("pid") != os.getpid():
            why = {"reused": "its pid is now another program's", "elsewhere": "its lock was let go"}
            self.log(
                f"[lock] {self.path}: the training of {describe(holder)} is no longer running "
                f"({why.get(holder_state(holder), 'its process is gone')}); this run takes the folder over"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(this_process()) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """The file removed, then the kernel's lock let go: a process that opened the old file sees it gone."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
