"""Train a SimCLR / MoCo v2 / BYOL / SimSiam model in SIM, BSIM or WBSIM mode.

    python -m bsim_fast.train --config configs/byol_bsim.yaml [section.key=value ...] [--resume auto]
    torchrun --nproc_per_node 8 -m bsim_fast.train --config ...      (scripts/train_8gpu.sh does this)

The step: loader -> views (uint8, device) -> cutmix_normalize -> method (networks + loss) -> optimiser.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, atomic_write_bytes, latest_valid, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, load_config, to_dict
from .metrics import MetricsLogger
from .mix import make_views
from .optim import build_optimizer, lr_at, scaled_lr, set_lr

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
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
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2]), "python": json.dumps(random.getstate())}
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
        raise ConfigError(f"{path}: data.batch_size={cfg.data.batch_size} must be a multiple of world size "
                          f"{world} x train.accum_steps {cfg.train.accum_steps} with at least 2 images per rank")
    if not cfg.data.train.startswith("builtin") and not Path(cfg.data.train).exists():
        raise ConfigError(f"{path}: data.train = {cfg.data.train!r} does not exist")
    if cfg.data.val and not cfg.data.val.startswith("builtin") and not Path(cfg.data.val).exists():
        raise ConfigError(f"{path}: data.val = {cfg.data.val!r} does not exist")
    from .loaders import check_datasets
    check_datasets(cfg)       # a path of the wrong kind for data.loader, a missing converted built-in set


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


# ---------------------------------------------------------------------------------------------- main
def train(cfg: Config, resume: str = "auto", config_path: str = "config") -> dict:
    rank, world, _, device = setup_distributed()
    check_config(cfg, world, config_path)
    from .loaders import build_eval_loader, build_train_loader
    from .methods import build_method, compile_networks
    from .eval import export_backbone, knn_monitor

    seed_everything(cfg.train.seed)
    out_dir = Path(cfg.train.out_dir)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "config.json", json.dumps(to_dict(cfg), indent=1).encode())

    loader = build_train_loader(cfg, rank, world, device)
    accum = cfg.train.accum_steps
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise TrainError(f"data.train = {cfg.data.train!r}: fewer images than one batch of {cfg.data.batch_size}")
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = int(cfg.optim.warmup_epochs * steps_per_epoch)
    base_lr = scaled_lr(cfg)

    method = build_method(cfg).to(device)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if world > 1 and cfg.model.sync_bn and device.type == "cuda":   # SyncBN has no CPU kernel
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    optimizer = build_optimizer(method, cfg, device)
    amp_dtype = DTYPES[cfg.train.precision]
    use_amp = device.type == "cuda" and amp_dtype != torch.float32
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    view_dtype = amp_dtype if device.type == "cuda" else torch.float32

    step, epoch, batch_in_epoch = 0, 0, 0
    if resume != "none":
        path, state = (latest_valid(out_dir, log=print if is_main else (lambda m: None)) if resume == "auto"
                       else (Path(resume), load_checkpoint(resume)))
        if state is not None:
            method.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
            if is_main:
                print(f"[resume] {path}: step {step}, epoch {epoch}, batch {batch_in_epoch}", flush=True)

    compile_on = cfg.train.compile == "on" or (cfg.train.compile == "auto" and device.type == "cuda")
    if compile_on:
        compile_networks(method)
    model = method
    if world > 1:
        with warnings.catch_warnings():
            # newer torch deprecates broadcast_buffers but says to keep it for rank-local buffers, which the
            # MoCo queue is (every rank enqueues the same gathered keys; broadcasting 64 MB a step is waste)
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
            model = torch.nn.parallel.DistributedDataParallel(
                method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    logger = MetricsLogger(out_dir, is_main, total_steps, start_step=step, tensorboard=cfg.train.tensorboard)
    preempt = Preemption()
    max_steps = cfg.train.max_steps or total_steps
    last_ckpt_step = step

    def checkpoint() -> None:
        nonlocal last_ckpt_step
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if is_main:
            state = {"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                     "batch_in_epoch": batch_in_epoch, "rng": rngs, "config": to_dict(cfg)}
            save_checkpoint(state, out_dir, step, cfg.train.keep_checkpoints)
        last_ckpt_step = step

    sums = torch.zeros(4, device=device)   # loss, lam, non-finite count, micro-batches (no per-step sync)
    t_last, images_since = time.perf_counter(), 0
    stop_reason = None
    knn_results = {}
    last_loss = float("nan")
    while epoch < cfg.train.epochs and step < max_steps and stop_reason is None:
        micro = 0
        for a_u8, b_u8, _labels in loader.epoch(epoch, start_batch=batch_in_epoch * accum):
            gen = step_generator(cfg.train.seed, step * accum + micro, rank)
            views = make_views(a_u8, b_u8, cfg, gen, view_dtype)
            # a skipped step must leave no trace: its forward already wrote BN statistics (and MoCo's queue)
            buffers = [b.detach().clone() for b in method.buffers()] if cfg.train.nan_policy == "skip" else None
            sync_ctx = model.no_sync() if (world > 1 and micro + 1 < accum) else nullcontext()
            with sync_ctx:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    out = model(**views)
                loss = out["loss"].float()
                finite = torch.isfinite(loss)
                if cfg.train.nan_policy == "skip" and not all_ranks_true(finite):
                    optimizer.zero_grad(set_to_none=True)   # drop this step's gradients entirely
                    with torch.no_grad():
                        for b, saved in zip(method.buffers(), buffers):
                            b.copy_(saved)
                    micro = 0
                    logger.print(f"[nan] step {step}: non-finite loss, step skipped (train.nan_policy=skip)")
                    continue
                scaler.scale(loss / accum).backward()
            sums += torch.stack([loss.detach().nan_to_num(0.0), views.get("lam_a", loss.new_ones(1)).mean(),
                                 (~finite).float(), loss.new_ones(())])
            images_since += a_u8.shape[0] * world
            micro += 1
            if micro < accum:
                continue
            micro = 0
            lr = lr_at(step, total_steps, warmup_steps, base_lr, cfg.optim.min_lr_ratio)
            set_lr(optimizer, lr, base_lr)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            method.momentum_update((step + 1) / total_steps)
            step += 1
            batch_in_epoch += 1
            logger.advance()

            due_log = step % cfg.train.log_every == 0
            due_ckpt = step - last_ckpt_step >= cfg.train.ckpt_every_steps
            if due_log or due_ckpt or step >= max_steps:
                if world > 1:
                    dist.all_reduce(sums)
                loss_sum, lam_sum, nonfinite, count = sums.tolist()
                sums.zero_()
                if nonfinite > 0:
                    # checked before any checkpoint is written, so a poisoned state is never saved
                    raise TrainError(f"non-finite loss at or before step {step} (lr {lr:.3g}); last good "
                                     f"checkpoint is step {last_ckpt_step}; set train.nan_policy=skip to skip such steps")
                now = time.perf_counter()
                values = {"loss": loss_sum / max(count, 1), "lam": lam_sum / max(count, 1), "lr": lr,
                          "img_s": images_since / (now - t_last), "epoch": epoch}
                if device.type == "cuda":
                    values["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                t_last, images_since = now, 0
                last_loss = values["loss"]
                logger.log(step, values)
            if due_ckpt:
                checkpoint()
            if (due_log or due_ckpt) and preempt.agreed(device):
                checkpoint()
                stop_reason = "preempted (SIGTERM): checkpoint written"
                break
            if step >= max_steps:
                break
        else:
            epoch += 1
            batch_in_epoch = 0
            if cfg.data.val and cfg.train.knn_every_epochs and epoch % cfg.train.knn_every_epochs == 0:
                knn_results = knn_monitor(method.backbone, cfg, build_eval_loader, rank, world, device, view_dtype)
                logger.log(step, knn_results, kind="knn")

    if stop_reason is None:
        checkpoint()
        if cfg.data.val and not knn_results:
            knn_results = knn_monitor(method.backbone, cfg, build_eval_loader, rank, world, device, view_dtype)
            logger.log(step, knn_results, kind="knn")
        if is_main:
            export_backbone(method.backbone, cfg, out_dir / "backbone.pt")
    logger.print(stop_reason or f"[done] step {step}, epoch {epoch}; outputs in {out_dir}")
    logger.close()
    result = {"step": step, "epoch": epoch, "loss": last_loss, **knn_results}
    if is_main and stop_reason is None:
        atomic_write_bytes(out_dir / "final.json", json.dumps(result, indent=1).encode())
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a recipe, e.g. configs/byol_bsim.yaml")
    parser.add_argument("--resume", default="auto", help="auto (newest valid checkpoint in out_dir), none, or a path")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, args.resume, args.config)
    except (ConfigError, TrainError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
