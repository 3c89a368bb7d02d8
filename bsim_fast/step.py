"""The training step: what `train` runs for every batch and what the benchmark and the speedrun time.

    step = TrainStep(cfg, device, steps_per_epoch)    # no dataset needed: views come from the caller
    step(a_u8, b_u8) -> bool                          # one micro-batch; True when the optimiser stepped
    step.state                                        # TrainState: the step, micro-batch (and the loop's position)

One micro-batch is: views (partner, boxes, λ, normalised in the dtype of `precision_for`), forward under
autocast, the NaN policy, backward through the loss scaler; the last of `train.accum_steps` micro-batches also
sets the scheduled learning rate, steps the optimiser and moves the target networks (EMA progress
step / total steps of the schedule). Built from the config alone: the method (SyncBN and DDP when world > 1,
compiled per `train.compile`), the optimiser, the scaler and the schedule of `steps_per_epoch` x `train.epochs`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import Config
from .methods import build_method, compile_networks
from .mix import make_views
from .optim import build_optimizer, lr_at, scaled_lr, set_lr
from .precision import precision_for
from .seeds import mix_seed


@dataclass
class TrainState:
    """Where a run is. Checkpoints save it and a resumed run restores it, so it reads exactly the batches the
    uninterrupted one reads next, those of skipped (non-finite) steps included."""

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


def step_generator(seed: int, micro_batch: int, rank: int) -> torch.Generator:
    """Partner and boxes depend only on (seed, micro-batch index, rank), mixed as every stream of a run is
    (seeds.mix_seed), so a resumed run draws the same ones. The generator is on the host: N indices and boxes
    are drawn and validated there without a GPU sync, then copied asynchronously."""
    g = torch.Generator(device="cpu")
    g.manual_seed(mix_seed(seed, micro_batch, rank))
    return g


def finite_everywhere_later(record: torch.Tensor) -> Callable[[], bool]:
    """Starts reading whether this micro-batch's loss was finite on every rank (`record[2]` counts a non-finite
    loss, `Method._result`) and returns the function that waits for the answer: every rank must take the same
    branch, or DDP's collectives would hang. The flag is reduced over the ranks and copied to pinned host memory
    now, so the caller can queue the backward before it waits: the one host sync per micro-batch that
    train.nan_policy=skip needs waits for the forward only."""
    flag = record[2:3]
    if dist.is_available() and dist.is_initialized():
        flag = flag.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.device.type != "cuda":
        return lambda: flag.item() == 0
    host = torch.empty(1, dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()

    def wait() -> bool:
        ready.synchronize()
        return host.item() == 0

    return wait


class ForwardState:
    """What a forward changes outside its outputs and `Method.hold`: BatchNorm's running statistics and counts.
    `save` copies them into buffers made once (a multi-tensor copy per dtype, the statistics' and the counts',
    as a multi-tensor kernel takes one dtype; no allocation), `restore` puts them back after a skipped step.
    MoCo's queue is not among them: its update waits for the step (`hold_updates`)."""

    def __init__(self, method: torch.nn.Module):
        self.live = [
            b
            for m in method.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]
        self.saved = [torch.empty_like(b) for b in self.live]
        self.by_dtype: dict[torch.dtype, list[int]] = {}
        for i, b in enumerate(self.live):
            self.by_dtype.setdefault(b.dtype, []).append(i)

    @torch.no_grad()
    def save(self) -> None:
        for idx in self.by_dtype.values():
            torch._foreach_copy_([self.saved[i] for i in idx], [self.live[i] for i in idx])

    @torch.no_grad()
    def restore(self) -> None:
        for idx in self.by_dtype.values():
            torch._foreach_copy_([self.live[i] for i in idx], [self.saved[i] for i in idx])


def compile_on(cfg: Config, device: torch.device) -> bool:
    return cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda")


class TrainStep:
    """The step `train` trains with (see the module docstring); `sums` and `images` are the running totals
    the trainer's log line reads and resets."""

    def __init__(
        self,
        cfg: Config,
        device: torch.device | str,
        steps_per_epoch: int,
        rank: int = 0,
        world: int = 1,
        log: Callable[[str], None] | None = print,
    ):
        self.cfg, self.device, self.rank, self.world = cfg, torch.device(device), rank, world
        self.log = log or (lambda line: None)
        self.precision = precision_for(cfg.train.precision, self.device)
        self.method = self._build_method()
        self.optimizer = build_optimizer(self.method, cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.grad_scaler)
        self.total_steps = cfg.train.epochs * steps_per_epoch
        self.warmup_steps = int(cfg.optim.warmup_epochs * steps_per_epoch)
        self.base_lr = scaled_lr(cfg)
        self.lr = 0.0
        self.state = TrainState()
        self.sums = torch.zeros(4, device=self.device)  # loss, lam, non-finite count, micro-batches
        self.images = 0  # images through the micro-batches in `sums`, over all ranks
        # λ', λ'' of each micro-batch since the trainer last took them (`take_lam_values`), kept only when it
        # asks (a list, not None): references to the step's own tensors, no copy and no host sync here
        self.lam_values: list[torch.Tensor] | None = None
        self.method.hold_updates = True  # MoCo's enqueue after the backward, and never on a skipped step
        self.forward_state = ForwardState(self.method) if cfg.train.nan_policy == "skip" else None
        if compile_on(cfg, self.device):
            compile_networks(self.method)  # state-dict keys unchanged: a checkpoint loads into it
        if self.device.type == "cuda":
            # The step's shapes never change (fixed image size, drop_last batches), so cuDNN times its convolution
            # algorithms once per shape and keeps the fastest. Process-wide; the k-NN monitor's other shapes are
            # timed once each too. The choice by timing can differ between runs, like cuDNN's non-deterministic
            # kernels already could: GPU runs were never bitwise repeatable, CPU runs are (the tests).
            torch.backends.cudnn.benchmark = True
        self.model = self._wrap(self.method)

    def _build_method(self) -> torch.nn.Module:
        method = build_method(self.cfg).to(self.device)
        if self.cfg.train.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if self.world > 1 and self.cfg.model.sync_bn and self.device.type == "cuda":  # SyncBN has no CPU kernel
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        return method

    def _wrap(self, method: torch.nn.Module) -> torch.nn.Module:
        """DDP when world > 1. Its construction broadcasts rank 0's parameters, which every rank initialised
        alike; a checkpoint loaded afterwards is copied into the same tensors."""
        if self.world == 1:
            return method
        with warnings.catch_warnings():
            # newer torch deprecates broadcast_buffers but says to keep it for rank-local buffers, which the
            # MoCo queue is (every rank enqueues the same gathered keys; broadcasting 64 MB a step is waste)
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
            return torch.nn.parallel.DistributedDataParallel(
                method, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False
            )

    def __call__(self, a_u8: torch.Tensor, b_u8: torch.Tensor) -> bool:
        """One micro-batch: views, forward, backward; the last of `train.accum_steps` also steps the optimiser
        (returns True). Under train.nan_policy=skip a non-finite loss drops the whole step and leaves no trace."""
        cfg, method, state, accum = self.cfg, self.method, self.state, self.cfg.train.accum_steps
        gen = step_generator(cfg.train.seed, state.step * accum + state.micro, self.rank)
        views = make_views(a_u8, b_u8, cfg, gen, self.precision.view_dtype, order=method.view_order())
        batch = {k: views[k] for k in ("views", "partner", "lam_a", "lam_b") if k in views}
        if self.forward_state is not None:  # a skipped step must leave no trace: the forward writes BN statistics
            self.forward_state.save()
        accumulating = self.world > 1 and state.micro + 1 < accum
        with self.model.no_sync() if accumulating else nullcontext():
            with self.precision.autocast_context():
                out = self.model(**batch)
            finite = finite_everywhere_later(out["record"]) if self.forward_state is not None else None
            loss = out["loss"].float()
            # the backward is queued before the host waits for `finite`; a skipped step's gradients are dropped
            self.scaler.scale(loss if accum == 1 else loss / accum).backward()
        if finite is not None and not finite():
            self._skip()
            return False
        method.apply_held_updates()
        self.sums.add_(out["record"])  # loss, lam, non-finite, micro-batches: made in the compiled objective
        self.images += a_u8.shape[0] * self.world
        if self.lam_values is not None and "lam_a" in views:
            self.lam_values += [views["lam_a"], views["lam_b"]]
        state.micro += 1
        if state.micro < accum:
            return False
        state.micro = 0
        self.lr = lr_at(state.step, self.total_steps, self.warmup_steps, self.base_lr, cfg.optim.min_lr_ratio)
        set_lr(self.optimizer, self.lr, self.base_lr)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        method.momentum_update((state.step + 1) / self.total_steps)
        state.step += 1
        return True

    def take_lam_values(self, reset: bool = True) -> torch.Tensor | None:
        """The λ values kept since the last reset, on the host (a device copy: for where the host waits anyway,
        a log line), then (`reset`) a fresh start; None when none were kept (SIM, or not asked for)."""
        if not self.lam_values:
            return None
        values = torch.cat(self.lam_values).cpu()
        if reset:
            self.lam_values = []
        return values

    def _skip(self) -> None:
        """Drop this step: its gradients (earlier micro-batches' too), BN statistics and held updates."""
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_state.restore()
        self.method.drop_held_updates()
        self.state.micro = 0
        self.log(f"[nan] step {self.state.step}: non-finite loss, step skipped (train.nan_policy=skip)")

    def drop_partial_accumulation(self) -> None:
        """At an epoch's end: gradients of an unfinished accumulation must not leak into the next epoch."""
        if self.state.micro:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.micro = 0
