"""Train a SimCLR / MoCo v2 / BYOL / SimSiam model in SIM, BSIM or WBSIM mode.

    python -m bsim_fast.train --config configs/byol_bsim.yaml [section.key=value ...] [--resume auto]
    torchrun --nproc_per_node 8 -m bsim_fast.train --config ...      (scripts/train_8gpu.sh does this)

The step: loader -> views (uint8, device) -> cutmix_normalize -> method (networks + loss) -> optimiser.
Read top-down: setup (`build`, `resume_run`, `start`), the loop (`train`, `train_one_epoch`, `step`), what
happens between steps (`after_step`: log, checkpoint, callback, preemption) and at the end (`finish`), the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import cli
from .checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .config import Config, ConfigError, load_config, to_dict
from .dist import set_cpu_threads
from .metrics import MetricsLogger
from .mix import make_views
from .optim import build_optimizer, lr_at, scaled_lr, set_lr
from .recipes import recipe_path

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Keys a resumed run may change: they say where and how often to log, save and monitor, how many workers read
# the data and when to stop, not what is computed. `compile` changes float rounding, not the schedule;
# `nan_policy=skip` is how a run stopped by a NaN is continued. Any other difference needs `--resume force`.
RESUMABLE_CHANGES = {
    "train.out_dir",
    "train.max_steps",
    "train.log_every",
    "train.ckpt_every_steps",
    "train.keep_checkpoints",
    "train.tensorboard",
    "train.knn_every_epochs",
    "train.knn_k",
    "train.knn_t",
    "train.nan_policy",
    "train.compile",
    "data.workers",
    "data.val",
    "data.dali_hw_decoder_load",
}
# What a new run with --resume none moves aside (into out_dir/previous_N/) rather than mixing with its own
RUN_FILES = ("metrics.csv", "tb", "final.json", "backbone.pt", "backbone.json", "config.json")


class TrainError(RuntimeError):
    """A user-facing failure: printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------- setup
def setup_distributed() -> tuple[int, int, int, torch.device]:
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Partner and boxes depend only on (seed, step, rank), so a resumed run draws the same ones. The
    generator is on the host: N indices and boxes are drawn and validated there without a GPU sync, then
    copied asynchronously."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step) * 1009 + rank)
    return g


def rng_state() -> dict:
    # numpy's state as a tensor: checkpoints load with weights_only=True, which refuses numpy arrays
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_config(cfg: Config, world: int, path: str) -> None:
    per_rank, rem = divmod(cfg.data.batch_size, world * cfg.train.accum_steps)
    if rem or per_rank < 2:
        raise ConfigError(
            f"{path}: data.batch_size={cfg.data.batch_size} must be a multiple of world size "
            f"{world} x train.accum_steps {cfg.train.accum_steps} with at least 2 images per rank"
        )
    if not cfg.data.train.startswith("builtin") and not Path(cfg.data.train).exists():
        raise ConfigError(f"{path}: data.train = {cfg.data.train!r} does not exist")
    if cfg.data.val and not cfg.data.val.startswith("builtin") and not Path(cfg.data.val).exists():
        raise ConfigError(f"{path}: data.val = {cfg.data.val!r} does not exist")
    from .loaders import check_datasets

    check_datasets(cfg)  # a path of the wrong kind for data.loader, a missing converted built-in set


def check_resume_flag(resume: str) -> None:
    if resume not in ("auto", "force", "none") and not Path(resume).is_file():
        raise CheckpointError(f"--resume {resume}: not auto, force, none or an existing checkpoint file")


@dataclass
class TrainState:
    """Where a run is. Checkpoints save it and `resume_run` restores it, so a resumed run reads exactly the
    batches the uninterrupted one reads next, those of skipped (non-finite) steps included."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0
    batches_read: int = 0  # loader batches consumed in `epoch`, skipped ones included
    micro: int = 0  # micro-batches accumulated towards the next step (0 at every checkpoint)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, accum_steps: int) -> TrainState:
        if "batches_read" in ckpt:
            return cls(**{f.name: int(ckpt[f.name]) for f in dataclasses.fields(cls)})
        # checkpoints from before TrainState counted optimiser steps in the epoch (exact without skipped steps)
        return cls(ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"] * accum_steps, 0)


@dataclass
class Run:
    """What `build` sets up and the loop reads, and the running totals between two log lines."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    loader: Any
    method: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype
    view_dtype: torch.dtype
    total_steps: int
    warmup_steps: int
    base_lr: float
    max_steps: int
    knn: bool  # the k-NN monitor runs (data.val is set and the data has labels)
    model: torch.nn.Module = None  # `method`, wrapped in DDP when world > 1 (set by `start`)
    logger: MetricsLogger = None
    preempt: Preemption = None
    sums: torch.Tensor = None  # loss, lam, non-finite count, micro-batches since the last log line
    images_since: int = 0
    t_last: float = 0.0
    lr: float = 0.0
    last_loss: float = math.nan
    last_log_step: int = -1
    last_ckpt_step: int = -1  # the step checkpoints count from (the resumed one at the start)
    saved_step: int = -1  # the step this process last wrote a checkpoint for
    knn_step: int = -1
    knn_results: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def use_amp(self) -> bool:
        return self.device.type == "cuda" and self.amp_dtype != torch.float32

    def print(self, msg: str) -> None:
        if self.is_main:
            (self.logger.print if self.logger else print)(msg)


def build(cfg: Config, config_path: str = "config") -> Run:
    """Process group, seeds, loader, model, optimiser and schedule. Nothing in train.out_dir is touched."""
    rank, world, _, device = setup_distributed()
    check_config(cfg, world, config_path)
    if device.type == "cpu":
        set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), print if rank == 0 else None)
    from .loaders import build_train_loader
    from .methods import build_method

    seed_everything(cfg.train.seed)
    loader = build_train_loader(cfg, rank, world, device)
    steps_per_epoch = len(loader) // cfg.train.accum_steps
    if steps_per_epoch == 0:
        raise TrainError(f"data.train = {cfg.data.train!r}: fewer images than one batch of {cfg.data.batch_size}")
    total_steps = cfg.train.epochs * steps_per_epoch
    knn = bool(cfg.data.val)
    if knn and not getattr(loader, "labeled", True):
        knn = False
        if rank == 0:
            print(
                f"[knn] data.train = {cfg.data.train!r} is unlabeled: the k-NN monitor needs labelled data "
                f"and is skipped",
                flush=True,
            )

    method = build_method(cfg).to(device)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if world > 1 and cfg.model.sync_bn and device.type == "cuda":  # SyncBN has no CPU kernel
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    amp_dtype = DTYPES[cfg.train.precision]
    use_fp16_scaler = device.type == "cuda" and amp_dtype == torch.float16
    return Run(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        loader=loader,
        method=method,
        optimizer=build_optimizer(method, cfg, device),
        scaler=torch.amp.GradScaler("cuda", enabled=use_fp16_scaler),
        amp_dtype=amp_dtype,
        view_dtype=amp_dtype if device.type == "cuda" else torch.float32,
        total_steps=total_steps,
        warmup_steps=int(cfg.optim.warmup_epochs * steps_per_epoch),
        base_lr=scaled_lr(cfg),
        max_steps=min(cfg.train.max_steps or total_steps, total_steps),
        knn=knn,
    )


def config_differences(saved: dict, cfg: Config) -> list:
    """'section.key old -> new' for every key whose value differs from the checkpoint's config, except those
    in RESUMABLE_CHANGES. A key the checkpoint does not have (added since, or a setting of another method)
    counts if it is not the default."""
    defaults = Config()
    defaults.method.name = cfg.method.name  # `method:` holds the named method's own settings
    now, default = to_dict(cfg), to_dict(defaults)
    diffs = []
    for sec, values in now.items():
        for key, value in values.items():
            name = f"{sec}.{key}"
            old = saved.get(sec, {}).get(key, default[sec][key])
            if name not in RESUMABLE_CHANGES and old != value:
                diffs.append(f"{name} {old!r} -> {value!r}")
    return diffs


def load_into(run: Run, ckpt: dict, path: Path) -> None:
    """Model, optimiser and scaler from `ckpt`, refused in one line when its tensors do not fit this model."""
    own, theirs = run.method.state_dict(), ckpt["model"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    reshaped = [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    if missing or unexpected or reshaped:
        first = (missing + unexpected + reshaped)[0]
        raise CheckpointError(
            f"{path}: its tensors do not fit this model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(reshaped)} of another shape, e.g. {first!r}); "
            f"it was written by another recipe or model"
        )
    run.method.load_state_dict(theirs)
    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its optimiser state does not fit this optimiser ({e})") from None
    run.scaler.load_state_dict(ckpt["scaler"])


def set_aside_previous_run(out_dir: Path) -> Path | None:
    """Move an earlier run's checkpoints, metrics and exports into out_dir/previous_N/, so that a run started
    over (--resume none) neither mixes its files with them nor deletes them."""
    ckpts = list_checkpoints(out_dir)
    found = ckpts + [c.with_name(c.name + ".sha256") for c in ckpts] + [out_dir / name for name in RUN_FILES]
    found = [p for p in found if p.exists()]
    if not any(p.name.startswith("ckpt_") or p.name == "metrics.csv" for p in found):
        return None
    n = 1
    while (out_dir / f"previous_{n}").exists():
        n += 1
    aside = out_dir / f"previous_{n}"
    aside.mkdir()
    for p in found:
        os.replace(p, aside / p.name)
    return aside


def resume_run(run: Run, how: str = "auto") -> TrainState:
    """The state to start from, with model, optimiser, scaler and RNG restored from a checkpoint.

    how: `auto`, the newest valid checkpoint in train.out_dir (refused in one line if it was written by a
    different config, or if every checkpoint there is damaged); `force`, the same accepting a different
    config; `none`, start over (an earlier run's files are moved to out_dir/previous_N/); or a file."""
    if how == "none":
        if run.is_main and (aside := set_aside_previous_run(run.out_dir)) is not None:
            print(f"[resume] --resume none: starting over; the earlier run's files moved to {aside}", flush=True)
        return TrainState()
    log = print if run.is_main else (lambda m: None)
    if how in ("auto", "force"):
        path, ckpt = latest_valid(run.out_dir, log=log)
        if ckpt is None:
            return TrainState()
    else:
        path, ckpt = Path(how), load_checkpoint(how, require_hash=False, log=log)
    diffs = config_differences(ckpt["config"], run.cfg)
    if ckpt.get("world", run.world) != run.world:  # the per-rank order depends on it
        diffs.append(f"world size {ckpt['world']} -> {run.world}")
    if diffs and how != "force":
        raise CheckpointError(
            f"{path} was written by a different config: {'; '.join(diffs)}. Resume with the "
            f"same values, use another train.out_dir, or --resume force to continue anyway"
        )
    if diffs:
        log(f"[resume] --resume force: continuing {path} despite {'; '.join(diffs)}")
    load_into(run, ckpt, path)
    state = TrainState.from_checkpoint(ckpt, run.cfg.train.accum_steps)
    set_rng_state(ckpt["rng"][run.rank] if run.rank < len(ckpt["rng"]) else ckpt["rng"][0])
    log(f"[resume] {path}: step {state.step}, epoch {state.epoch}, batch {state.batches_read}")
    return state


def start(run: Run, state: TrainState) -> None:
    """What comes after the state is known: config.json, compile, DDP, metrics cut back to the resumed step."""
    cfg = run.cfg
    if run.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run.out_dir / "config.json", json.dumps(to_dict(cfg), indent=1).encode())
    if cfg.train.compile == "on" or (cfg.train.compile == "auto" and run.device.type == "cuda"):
        from .methods import compile_networks

        compile_networks(run.method)
    run.model = run.method
    if run.world > 1:
        with warnings.catch_warnings():
            # newer torch deprecates broadcast_buffers but says to keep it for rank-local buffers, which the
            # MoCo queue is (every rank enqueues the same gathered keys; broadcasting 64 MB a step is waste)
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
            run.model = torch.nn.parallel.DistributedDataParallel(
                run.method,
                device_ids=[run.device.index] if run.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
    run.logger = MetricsLogger(
        run.out_dir, run.is_main, run.max_steps, start_step=state.step, tensorboard=cfg.train.tensorboard
    )
    run.preempt = Preemption()
    run.sums = torch.zeros(4, device=run.device)
    run.t_last, run.last_ckpt_step, run.last_log_step = time.perf_counter(), state.step, state.step


# ---------------------------------------------------------------------------------------------- step
def all_ranks_true(flag: torch.Tensor) -> bool:
    """Every rank must take the same branch, or DDP's gradient all-reduce would hang."""
    flag = flag.float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


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


def step(run: Run, state: TrainState, a_u8: torch.Tensor, b_u8: torch.Tensor) -> bool:
    """One micro-batch: views, forward, backward; the last of `train.accum_steps` also steps the optimiser
    (returns True). Under train.nan_policy=skip a non-finite loss drops the whole step and leaves no trace."""
    cfg, method, accum = run.cfg, run.method, run.cfg.train.accum_steps
    skip = cfg.train.nan_policy == "skip"
    views = make_views(
        a_u8, b_u8, cfg, step_generator(cfg.train.seed, state.step * accum + state.micro, run.rank), run.view_dtype
    )
    # a skipped step must leave no trace: its forward already wrote BN statistics (and MoCo's queue)
    saved = [b.detach().clone() for b in method.buffers()] if skip else None
    accumulating = run.world > 1 and state.micro + 1 < accum
    with run.model.no_sync() if accumulating else nullcontext():
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.use_amp):
            loss = run.model(**views)["loss"].float()
        finite = torch.isfinite(loss)
        if skip and not all_ranks_true(finite):  # a host sync per micro-batch, under this policy only
            run.optimizer.zero_grad(set_to_none=True)  # drop this step's gradients entirely
            with torch.no_grad():
                for b, before in zip(method.buffers(), saved):
                    b.copy_(before)
            state.micro = 0
            run.print(f"[nan] step {state.step}: non-finite loss, step skipped (train.nan_policy=skip)")
            return False
        run.scaler.scale(loss / accum).backward()
    run.sums += torch.stack(
        [
            loss.detach().nan_to_num(0.0),
            views.get("lam_a", loss.new_ones(1)).mean(),
            (~finite).float(),
            loss.new_ones(()),
        ]
    )
    run.images_since += a_u8.shape[0] * run.world
    state.micro += 1
    if state.micro < accum:
        return False
    state.micro = 0
    run.lr = lr_at(state.step, run.total_steps, run.warmup_steps, run.base_lr, cfg.optim.min_lr_ratio)
    set_lr(run.optimizer, run.lr, run.base_lr)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    method.momentum_update((state.step + 1) / run.total_steps)
    state.step += 1
    run.logger.advance()
    return True


def train_one_epoch(run: Run, state: TrainState, callback: Callable | None = None) -> str | None:
    """Steps over the rest of epoch `state.epoch` until it ends or train.max_steps; returns a stop reason
    (preemption, the callback's) or None."""
    if state.batches_read >= len(run.loader):  # resumed at the very end of the epoch
        return None
    for a_u8, b_u8, _labels in run.loader.epoch(state.epoch, start_batch=state.batches_read):
        state.batches_read += 1
        if step(run, state, a_u8, b_u8):
            stop = after_step(run, state, callback)
            if stop or state.step >= run.max_steps:
                return stop
    if state.micro:  # a partial accumulation at the epoch's end: its gradients must not leak into the next
        run.optimizer.zero_grad(set_to_none=True)
        state.micro = 0
    return None


# -------------------------------------------------------------------------------------- between steps
def log_metrics(run: Run, state: TrainState) -> None:
    """Averages since the last log line to the console, metrics.csv and TensorBoard (a host sync)."""
    if run.world > 1:
        dist.all_reduce(run.sums)
    loss_sum, lam_sum, nonfinite, count = run.sums.tolist()
    run.sums.zero_()
    if nonfinite > 0:
        # checked before any checkpoint is written, so a poisoned state is never saved
        raise TrainError(
            f"non-finite loss at or before step {state.step} (lr {run.lr:.3g}); last good "
            f"checkpoint is step {run.last_ckpt_step}; set train.nan_policy=skip to skip such steps"
        )
    now = time.perf_counter()
    values = {
        "loss": loss_sum / max(count, 1),
        "lam": lam_sum / max(count, 1),
        "lr": run.lr,
        "img_s": run.images_since / max(now - run.t_last, 1e-9),
        "epoch": state.epoch,
    }
    if run.device.type == "cuda":
        values["mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.t_last, run.images_since, run.last_loss, run.last_log_step = now, 0, values["loss"], state.step
    run.logger.log(state.step, values)


def checkpoint(run: Run, state: TrainState) -> None:
    """Model, optimiser, scaler, TrainState, every rank's RNG, world size and config (checkpoint.py)."""
    rngs = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if run.is_main:
        ckpt = {
            "model": run.method.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(),
            **dataclasses.asdict(state),
            "rng": rngs,
            "world": run.world,
            "config": to_dict(run.cfg),
        }
        save_checkpoint(ckpt, run.out_dir, state.step, run.cfg.train.keep_checkpoints)
    run.last_ckpt_step = run.saved_step = state.step


def after_step(run: Run, state: TrainState, callback: Callable | None = None) -> str | None:
    """At a step boundary: the callback, preemption, logging and checkpoints; returns a stop reason or None."""
    cfg = run.cfg.train
    stop = None
    if callback is not None:
        t0 = time.perf_counter()
        stop = callback(state, run.method)
        run.t_last += time.perf_counter() - t0  # the callback's time is not training time (img_s)
    due_log = state.step % cfg.log_every == 0
    due_ckpt = state.step - run.last_ckpt_step >= cfg.ckpt_every_steps
    if (due_log or due_ckpt) and run.preempt.agreed(run.device):  # a collective: at these steps only
        stop = stop or "preempted (SIGTERM): checkpoint written"
    if due_log or due_ckpt or stop or state.step >= run.max_steps:
        log_metrics(run, state)
    if due_ckpt or stop:
        checkpoint(run, state)
    return stop


def monitor_knn(run: Run, state: TrainState) -> None:
    from .eval import knn_monitor
    from .loaders import build_eval_loader

    results = knn_monitor(
        run.method.backbone, run.cfg, build_eval_loader, run.rank, run.world, run.device, run.view_dtype, log=run.print
    )
    if results is None:  # unlabeled data: said once, not tried again
        run.knn = False
        return
    run.knn_results, run.knn_step = results, state.step
    run.logger.log(state.step, results, kind="knn")


def end_epoch(run: Run, state: TrainState) -> None:
    state.epoch += 1
    state.batches_read = 0
    every = run.cfg.train.knn_every_epochs
    if run.knn and every and state.epoch % every == 0:
        monitor_knn(run, state)


def finish(run: Run, state: TrainState, stop: str | None) -> dict:
    """A finished run writes its last checkpoint, k-NN, backbone.pt and final.json; a stopped one (its
    checkpoint already written) only says why."""
    if stop is None:
        if run.last_log_step != state.step:
            log_metrics(run, state)  # also the non-finite check before the last checkpoint
        if run.saved_step != state.step:
            checkpoint(run, state)
        if run.knn and run.knn_step != state.step:
            monitor_knn(run, state)
        if run.is_main:
            from .eval import export_backbone

            export_backbone(run.method.backbone, run.cfg, run.out_dir / "backbone.pt")
    run.logger.print(stop or f"[done] step {state.step}, epoch {state.epoch}; outputs in {run.out_dir}")
    run.logger.close()
    result = {"step": state.step, "epoch": state.epoch, "loss": run.last_loss, **run.knn_results}
    if stop is not None:
        result["stopped"] = stop
    elif run.is_main:
        atomic_write_bytes(run.out_dir / "final.json", json.dumps(result, indent=1).encode())
    return result


# ---------------------------------------------------------------------------------------------- main
def train(
    cfg: Config,
    resume: str = "auto",
    config_path: str = "config",
    callback: Callable[[TrainState, torch.nn.Module], str | None] | None = None,
) -> dict:
    """Train `cfg` to its end (or train.max_steps); returns {"step", "epoch", "loss", knn_top1/5 if data.val}.

    resume: auto | force | none | a checkpoint path (see `resume_run`).
    callback(state, method) -> Optional[str], for runners that watch a run without editing this loop (e.g.
    k-NN at wall-clock intervals for a time-to-accuracy curve):
      - called on every rank after every optimiser step, before that step's log line and checkpoint;
        `state` is the live TrainState (read it, do not change it), `method` the unwrapped Method
        (`method.backbone` for features; `eval.extract_features` puts it in eval mode and back);
      - return None to go on, or a reason: the run then writes a checkpoint, prints the reason and returns
        with "stopped": reason (no backbone.pt, no final.json); a rerun with resume="auto" continues it;
      - in a multi-process run it must return the same on every rank (decide from `state`, or broadcast
        rank 0's decision): the stop is a collective checkpoint;
      - its time is left out of the logged img_s; whatever it draws from the global RNGs changes the run
        (the torch eval loader draws one number per pass), so it belongs in the time-to-accuracy runs, not
        in runs compared bitwise.
    """
    run = build(cfg, config_path)
    state = resume_run(run, resume)
    start(run, state)
    stop = None
    while stop is None and state.epoch < cfg.train.epochs and state.step < run.max_steps:
        stop = train_one_epoch(run, state, callback)
        if stop is None and state.batches_read >= len(run.loader):
            end_epoch(run, state)
    return finish(run, state, stop)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", required=True, help="a recipe by name (byol_bsim, small/byol) or a .yaml file (configs/byol.yaml)"
    )
    parser.add_argument(
        "--resume",
        default="auto",
        help="auto (the default): the newest valid checkpoint in train.out_dir, refused if written "
        "by a different config; force: the same, accepting a different config; none: start "
        "over (an earlier run's files move to out_dir/previous_N/); or a checkpoint file",
    )
    parser.add_argument(
        "--check-only",
        action="store_true",
        help="check the config, dataset paths and --resume, then exit (WORLD_SIZE processes)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        config_path = str(recipe_path(args.config))
        cfg = load_config(config_path, args.overrides)
        check_resume_flag(args.resume)
        if args.check_only:
            check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), config_path)
            return 0
        train(cfg, args.resume, config_path)
    except (ConfigError, TrainError, CheckpointError) as e:
        report_error(f"error: {e}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the run is resumable, a traceback would only hide that
        if os.environ.get("RANK", "0") == "0":
            print("interrupted; the same command resumes from the newest checkpoint", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def report_error(line: str) -> None:
    """One line on stderr; under scripts/train_8gpu.sh each rank hands it to the launcher instead, which
    prints each distinct line once (eight ranks refusing the same checkpoint say it once)."""
    folder = os.environ.get("BSIM_ERROR_DIR")
    if folder and Path(folder).is_dir():
        Path(folder, f"rank{os.environ.get('RANK', '0')}.txt").write_text(line + "\n")
    else:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
