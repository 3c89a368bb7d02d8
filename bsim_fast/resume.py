"""A run and its checkpoints: what one holds (`save_run`), and how a run continues from one (`resume_run`):
the newest valid checkpoint, refused in one line when another config wrote it, restored so that the resumed
run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch.distributed as dist

from .checkpoint import CheckpointError, latest_valid, list_checkpoints, load_checkpoint, save_checkpoint
from .config import Config, to_dict, upgrade
from .run import Run
from .seeds import rng_state, set_rng_state
from .step import TrainState

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
    "train.image_every_steps",
    "train.wandb",
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
RUN_FILES = ("metrics.csv", "tb", "final.json", "backbone.pt", "backbone.json", "config.json", "run.json", "wandb")


def check_resume_flag(resume: str) -> None:
    if resume not in ("auto", "force", "none") and not Path(resume).is_file():
        raise CheckpointError(f"--resume {resume}: not auto, force, none or an existing checkpoint file")


def save_run(run: Run) -> None:
    """Model, optimiser, scaler, TrainState, every rank's RNG, world size and config (checkpoint.py)."""
    state, step = run.state, run.train_step
    rngs = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if run.is_main:
        ckpt = {
            "model": step.method.state_dict(),
            "optimizer": step.optimizer.state_dict(),
            "scaler": step.scaler.state_dict(),
            **dataclasses.asdict(state),
            "rng": rngs,
            "world": run.world,
            "config": to_dict(run.cfg),
        }
        save_checkpoint(ckpt, run.out_dir, state.step, run.cfg.train.keep_checkpoints)
    run.last_ckpt_step = run.saved_step = state.step


def config_differences(saved: dict, cfg: Config) -> list:
    """'section.key old -> new' for every key whose value differs from the checkpoint's config, except those
    in RESUMABLE_CHANGES. A key the checkpoint does not have (added since, or a setting of another method)
    counts if it is not the default."""
    defaults = Config()
    defaults.method.name = cfg.method.name  # `method:` holds the named method's own settings
    now, default, saved = to_dict(cfg), to_dict(defaults), upgrade(saved)
    diffs = []
    for sec, values in now.items():
        for key, value in values.items():
            name = f"{sec}.{key}"
            old = saved.get(sec, {}).get(key, default[sec][key])
            if name not in RESUMABLE_CHANGES and old != value:
                diffs.append(f"{name} {old!r} -> {value!r}")
    return diffs


def load_into(step, ckpt: dict, path: Path) -> None:
    """Model, optimiser and scaler of a TrainStep from `ckpt`, refused in one line when its tensors do not fit
    this model."""
    own, theirs = step.method.state_dict(), ckpt["model"]
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
    step.method.load_state_dict(theirs)
    try:
        step.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its optimiser state does not fit this optimiser ({e})") from None
    step.scaler.load_state_dict(ckpt["scaler"])
    step.state = TrainState.from_checkpoint(ckpt, step.cfg.train.accum_steps)


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
        os.replace(p, aside / p.name)  # a move within one folder, not a write: nothing to make atomic
    return aside


def resume_run(run: Run, how: str = "auto") -> TrainState:
    """The state to start from, with model, optimiser, scaler and RNG restored from a checkpoint.

    how: `auto`, the newest valid checkpoint in train.out_dir (refused in one line if it was written by a
    different config, or if every checkpoint there is damaged); `force`, the same accepting a different
    config; `none`, start over (an earlier run's files are moved to out_dir/previous_N/); or a file."""
    if how == "none":
        if run.is_main and (aside := set_aside_previous_run(run.out_dir)) is not None:
            print(f"[resume] --resume none: starting over; the earlier run's files moved to {aside}", flush=True)
        return run.state
    log = print if run.is_main else (lambda m: None)
    if how in ("auto", "force"):
        path, ckpt = latest_valid(run.out_dir, log=log)
        if ckpt is None:
            return run.state
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
    load_into(run.train_step, ckpt, path)
    set_rng_state(ckpt["rng"][run.rank] if run.rank < len(ckpt["rng"]) else ckpt["rng"][0])
    state = run.state
    log(f"[resume] {path}: step {state.step}, epoch {state.epoch}, batch {state.batches_read}")
    return state
