"""A training run's setup: the checks before any work, `build` (process group, loader, the training step) and
`start` (config.json, run.json, the W&B run and the metrics logger once the resumed step is known). `train.py`
runs the loop over it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .atomic import write_text_atomic
from .config import Config, ConfigError, to_dict
from .dist import set_cpu_threads, setup_distributed
from .loaders import build_train_loader, check_dataset, check_datasets, check_kind
from .metrics import MetricsLogger
from .models import check_arch
from .provenance import environment
from .records import check_wandb, read_record, record_start, start_wandb
from .runfolder import LOCK_NAME, RunFolderError, RunLock, check_out_dir
from .seeds import seed_everything
from .step import TrainState, TrainStep


class TrainError(RuntimeError):
    """A user-facing failure: printed as one line, exit code 2."""


def check_config(cfg: Config, world: int, paths: bool = True) -> None:
    """What can be checked before any work, in one line each naming the file or override: the batch over
    ranks and accumulation, the names the registries hold, train.wandb (`records.check_wandb`), and (with
    `paths`) data.train and data.val (`loaders.check_datasets`; `build` leaves data.train to the loader, which
    checks it as it opens it) and the run folder: writable, and not held by another training
    (`hold_run_folder` does both for a run)."""
    per_rank, rem = divmod(cfg.data.batch_size, world * cfg.train.accum_steps)
    if rem or per_rank < 2:
        raise ConfigError(
            f"{cfg.where('data.batch_size')}: data.batch_size={cfg.data.batch_size} must be a multiple of world "
            f"size {world} x train.accum_steps {cfg.train.accum_steps} with at least 2 images per rank"
        )
    check_kind(cfg.data.loader, cfg.where("data.loader"))
    check_arch(cfg.model.arch, cfg.where("model.arch"))
    check_wandb(cfg)
    if paths:
        check_datasets(cfg)
        check_out_dir(cfg.train.out_dir, cfg.where("train.out_dir"))
        busy = RunLock(cfg.train.out_dir).busy()
        if busy:
            raise RunFolderError(busy)


@contextmanager
def hold_run_folder(cfg: Config, rank: int, world: int) -> Iterator[None]:
    """One training per run folder: rank 0 checks train.out_dir and takes its lock (`runfolder.RunLock`)
    before any work, and every rank learns the outcome, so that on a refusal no rank starts (one line, the
    same on each). The lock is let go when the block ends, however it ends."""
    lock, refusal = None, None
    if rank == 0:
        try:
            check_out_dir(cfg.train.out_dir, cfg.where("train.out_dir"))
            lock = RunLock(cfg.train.out_dir, log=lambda line: print(line, flush=True))
            lock.acquire()
        except RunFolderError as e:
            refusal = str(e)
        except OSError as e:  # the folder passed its checks and still cannot hold the lock (a full disk, ...)
            refusal = f"train.out_dir={cfg.train.out_dir}: cannot take its {LOCK_NAME} ({e.strerror})"
    if world > 1:
        outcome = [refusal]
        dist.broadcast_object_list(outcome, src=0)
        refusal = outcome[0]
    if refusal:
        raise RunFolderError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


class Preemption:
    """SIGTERM (a scheduler's preemption notice) asks for a checkpoint at the next step boundary."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class Run:
    """What `build` sets up and the loop reads, and the bookkeeping between two log lines."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    loader: Any
    train_step: TrainStep
    max_steps: int
    knn: bool  # the k-NN monitor runs (data.val is set and the data has labels)
    preempt: Preemption
    logger: MetricsLogger | None = None  # set by `start`: it cuts metrics.csv back to the resumed step
    wandb: Any = None  # the W&B run of train.wandb (rank 0), set by `start`
    t_last: float = 0.0
    last_loss: float = math.nan
    last_log_step: int = -1
    last_ckpt_step: int = -1  # the step checkpoints count from (the resumed one at the start)
    saved_step: int = -1  # the step this process last wrote a checkpoint for
    knn_step: int = -1
    knn_results: dict = field(default_factory=dict)

    @property
    def method(self) -> torch.nn.Module:
        return self.train_step.method

    @property
    def state(self) -> TrainState:
        return self.train_step.state

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    def print(self, msg: str) -> None:
        if self.is_main:
            (self.logger.print if self.logger else print)(msg)


def build(cfg: Config) -> Run:
    """Process group, seeds, loader and the training step. Nothing in train.out_dir is touched (`train` holds
    the folder around it: `hold_run_folder`)."""
    rank, world, _, device = setup_distributed()
    check_config(cfg, world, paths=False)
    if cfg.data.val:
        check_dataset(cfg.data.loader, cfg.data.val, "data.val")  # opened epochs from now: checked before work
    if device.type == "cpu":
        set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), print if rank == 0 else None)
    seed_everything(cfg.train.seed)
    loader = build_train_loader(cfg, rank, world, device)
    steps_per_epoch = len(loader) // cfg.train.accum_steps
    if steps_per_epoch == 0:
        raise TrainError(f"data.train = {cfg.data.train!r}: fewer images than one batch of {cfg.data.batch_size}")
    knn = bool(cfg.data.val)
    if knn and not getattr(loader, "labeled", True):
        knn = False
        if rank == 0:
            print(
                f"[knn] data.train = {cfg.data.train!r} is unlabeled: the k-NN monitor needs labelled data "
                f"and is skipped",
                flush=True,
            )
    train_step = TrainStep(cfg, device, steps_per_epoch, rank, world, log=print if rank == 0 else None)
    return Run(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        loader=loader,
        train_step=train_step,
        max_steps=min(cfg.train.max_steps or train_step.total_steps, train_step.total_steps),
        knn=knn,
        preempt=Preemption(),
    )


def start(run: Run, resume: str = "auto") -> None:
    """What comes once the state is known: config.json, this start in run.json (records.py) and the W&B run
    (before the TensorBoard writer it syncs), metrics cut back to the resumed step, the clocks."""
    step = run.state.step
    if run.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.out_dir / "config.json", json.dumps(to_dict(run.cfg), indent=1))
        record = read_record(run.out_dir)
        if run.cfg.train.wandb:
            run.wandb = start_wandb(run.cfg, run.out_dir, record)
        record_start(run.out_dir, record, {"step": step, "resume": resume, **environment(run.device, run.world)})
        if run.cfg.train.tensorboard:
            run.train_step.lam_values = []  # kept for λ's histogram at each log line
    run.logger = MetricsLogger(
        run.out_dir, run.is_main, run.max_steps, start_step=step, tensorboard=run.cfg.train.tensorboard
    )
    run.train_step.log = run.print
    run.t_last, run.last_ckpt_step, run.last_log_step = time.perf_counter(), step, step
