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


def all_ranks_true(flag: torch.Tensor) -> bool:
    """Every rank must take the same branch, or DDP's gradient all-reduce would hang (a host sync)."""
    flag = flag.float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


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
        if compile_on(cfg, self.device):
            compile_networks(self.method)  # state-dict keys unchanged: a checkpoint loads into it
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
        skip = cfg.train.nan_policy == "skip"
        gen = step_generator(cfg.train.seed, state.step * accum + state.micro, self.rank)
        views = make_views(a_u8, b_u8, cfg, gen, self.precision.view_dtype)
        # a skipped step must leave no trace: its forward already wrote BN statistics (and MoCo's queue)
        saved = [b.detach().clone() for b in method.buffers()] if skip else None
        accumulating = self.world > 1 and state.micro + 1 < accum
        with self.model.no_sync() if accumulating else nullcontext():
            with self.precision.autocast_context():
                loss = self.model(**views)["loss"].float()
            finite = torch.isfinite(loss)
            if skip and not all_ranks_true(finite):  # a host sync per micro-batch, under this policy only
                self.optimizer.zero_grad(set_to_none=True)  # drop this step's gradients entirely
                with torch.no_grad():
                    for b, before in zip(method.buffers(), saved):
                        b.copy_(before)
                state.micro = 0
                self.log(f"[nan] step {state.step}: non-finite loss, step skipped (train.nan_policy=skip)")
                return False
            self.scaler.scale(loss / accum).backward()
        lam = views.get("lam_a", loss.new_ones(1)).mean()
        self.sums += torch.stack([loss.detach().nan_to_num(0.0), lam, (~finite).float(), loss.new_ones(())])
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

    def drop_partial_accumulation(self) -> None:
        """At an epoch's end: gradients of an unfinished accumulation must not leak into the next epoch."""
        if self.state.micro:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.micro = 0
