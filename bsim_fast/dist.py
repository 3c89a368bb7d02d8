"""The process group (`setup_distributed`, from torchrun's environment) and thin helpers over torch.distributed
that degrade to the identity in a single process; the CPU thread count; the launcher scripts/train_8gpu.sh runs
(torchrun, with one line instead of its failure report) and the ranks' tie to it (`end_with_launcher`):

    python -m bsim_fast.dist [torchrun arguments] -m bsim_fast.train --config ...
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from .host import available_cores


def setup_distributed() -> tuple[int, int, int, torch.device]:
    """(rank, world size, local rank, device) from torchrun's environment (one process without it); the
    process group is started when world > 1 (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank, world, local_rank, device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sends each rank the gradient of its own rows.

    Every rank computes the same loss on the gathered tensor and DDP then averages parameter gradients
    over ranks, so the gradient of each rank's rows is summed over ranks here (all_reduce, which every
    backend has, gloo included); the average then equals the single-process gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


# The collectives run eagerly under torch.compile (`torch.compiler.disable`): a compiled method's graph is
# split where they are called, over several processes only (one process never reaches them).
@torch.compiler.disable
def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _GatherWithGrad.apply(x)


@torch.compiler.disable
@torch.no_grad()
def _concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()  # before empty_like, so the receive buffers have the layout that is sent
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks (same shape on each) along dim 0, keeping the autograd graph."""
    return x if world() == 1 else _gather_with_grad(x)


def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks (same shape on each) along dim 0, without gradient."""
    return x if world() == 1 else _concat_all_gather(x)


@torch.compiler.disable
@torch.no_grad()
def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `x` on every rank with rank `src`'s `x` (in place; `x` must be contiguous); returns `x`."""
    if world() > 1:
        dist.broadcast(x, src)
    return x


def cpu_threads(cores: int, local_processes: int) -> int:
    """Torch threads per process for a CPU run: half the cores this machine gives us, shared by its processes.
    OpenMP threads wait for each other at every parallel region, so when a thread's core is busy (a loader
    worker, another job) the whole op waits for it: on 2 cores with another process busy, a tiny step took
    5.1 s with 2 threads and 0.31 s with 1. Half leaves room for the loader and the rest of the machine."""
    return max(1, cores // (2 * max(1, local_processes)))


def set_cpu_threads(local_processes: int, log: Callable[[str], None] | None = print) -> int:
    """Set torch's thread count by `cpu_threads` unless OMP_NUM_THREADS says otherwise; says so in one line."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    cores = available_cores()
    n = cpu_threads(cores, local_processes)
    torch.set_num_threads(n)
    if log:
        log(
            f"[threads] CPU run: {n} torch thread(s) per process ({cores} cores, {local_processes} process(es); "
            f"half, so that a busy core does not stall OpenMP; OMP_NUM_THREADS overrides)"
        )
    return n


# ------------------------------------------------------------------------------------------ launcher
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_launcher() -> None:
    """A rank started by torchrun ends when its launcher ends, whatever ended it (kill -9 on the launcher's
    process group included: torchrun starts each rank in a session of its own, so the group's signal never
    reaches it, and an orphaned rank would go on writing the run folder). On Linux the kernel sends the rank
    SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG); the parent is then checked once, for a launcher
    that died before the call. Elsewhere a thread watches the parent (once a second). Checkpoints are written
    atomically, so a killed rank loses only the steps since the last one; the run resumes as after kill -9."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not a torchrun rank: a user's process outlives its shell
        return
    launcher = int(os.environ.get("BSIM_LAUNCHER_PID", "0")) or os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch_parent, args=(launcher,), daemon=True, name="launcher-watch").start()
    if os.getppid() != launcher:
        print(
            f"[launch] rank {os.environ.get('RANK', '?')}: its launcher (pid {launcher}) has ended; ending too",
            file=sys.stderr,
        )
        os._exit(1)


def _watch_parent(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def hand_over(code: int | str, line: str | None = None) -> bool:
    """A rank's exit code (`running` at its start) and its one line for the launcher (`launch`), which says
    each distinct line once; False when there is no launcher (the caller prints the line itself)."""
    folder = os.environ.get("BSIM_ERROR_DIR")
    if not (folder and Path(folder).is_dir()):
        return False
    rank = os.environ.get("RANK", "0")
    if line:
        Path(folder, f"rank{rank}.txt").write_text(line + "\n")
    Path(folder, f"rank{rank}.code").write_text(f"{code}\n")
    return True


def launch(argv: list) -> int:
    """torchrun `argv`; a failure is told in one line and its exit code kept: a child's user error (exit 2,
    one line handed over through BSIM_ERROR_DIR) is printed once however many ranks raised it, any other
    failure gets one line naming the rank and code after the child's own output. A signal to the launcher
    (SIGTERM, SIGINT, SIGHUP) is passed on to the ranks by torchrun; its exit code is then theirs (0 after a
    SIGTERM's checkpoint, 130 after Ctrl-C) and their line is said once."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun logs every failure as an error line, then raises a ~30-line report, and a signal as a warning
    # line; we say each in one line
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.ERROR)
    os.environ["BSIM_LAUNCHER_PID"] = str(os.getpid())  # the ranks' parent: `end_with_launcher`
    with tempfile.TemporaryDirectory(prefix="bsim_errors_") as errors:
        os.environ["BSIM_ERROR_DIR"] = errors
        try:
            run(parse_args(argv))
            return 0
        except ChildFailedError as e:
            if say_lines(errors):
                return 2
            rank, failure = min(e.failures.items())
            code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -9 -> 137
            how = f"code {failure.exitcode}" if failure.exitcode > 0 else f"signal {-failure.exitcode}"
            print(f"error: rank {rank} of {e.name} exited with {how} (its output is above)", file=sys.stderr)
            return code
        except SignalException as e:
            said = say_lines(errors)
            codes = [p.read_text().strip() for p in Path(errors).glob("rank*.code")]
            if codes and all(c.isdigit() for c in codes):  # every rank ended on its own terms (a checkpoint
                return max(map(int, codes))  # after SIGTERM, one line after Ctrl-C), none was cut short
            if not said:
                print(f"[launch] stopped by signal {e.sigval} before the ranks could end cleanly", file=sys.stderr)
            return 128 + int(e.sigval)


def say_lines(errors: str) -> bool:
    """The distinct lines the ranks handed over, once each, in order; whether there were any."""
    lines = sorted(p.read_text() for p in Path(errors).glob("rank*.txt"))
    for line in dict.fromkeys(lines):
        sys.stderr.write(line)
    return bool(lines)


__all__ = [
    "setup_distributed",
    "is_dist",
    "rank",
    "world",
    "gather_with_grad",
    "concat_all_gather",
    "broadcast_",
    "cpu_threads",
    "set_cpu_threads",
    "end_with_launcher",
    "hand_over",
    "launch",
]


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
