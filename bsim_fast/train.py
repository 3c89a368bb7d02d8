"""Train a SimCLR / MoCo v2 / BYOL / SimSiam model in SIM, BSIM or WBSIM mode.

    python -m bsim_fast.train --config configs/byol_bsim.yaml [section.key=value ...] [--resume auto]
    torchrun --nproc_per_node 8 -m bsim_fast.train --config ...      (scripts/train_8gpu.sh does this)

The step: loader -> views (uint8, device) -> cutmix_normalize -> method (networks + loss) -> optimiser
(`step.TrainStep`, the one training step; the benchmark and the speedrun time the same one).
Read top-down: the loop (`train`, `train_one_epoch`), what happens between steps (`after_step`: log, checkpoint,
callback, preemption) and at the end (`finish`), the CLI. Setup is `run.py` (`build`, `start`), checkpoints of
a run `resume.py` (`resume_run`, `save_run`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import cli
from .atomic import DiskFullError, write_text_atomic
from .checkpoint import CheckpointError
from .config import Config, ConfigError, load_config
from .dist import end_with_launcher, hand_over, setup_distributed
from .eval import export_backbone, knn_monitor
from .loaders import build_eval_loader, check_datasets
from .recipes import recipe_path
from .records import finish_wandb
from .resume import check_resume_flag, resume_run, save_run
from .run import Run, TrainError, build, check_config, hold_run_folder, start
from .runfolder import RunFolderError
from .step import TrainState, compile_on, step_generator
from .views import lam_draws, step_views, views_grid

__all__ = ["TrainError", "TrainState", "main", "train"]


# ---------------------------------------------------------------------------------------------- loop
def train_one_epoch(run: Run, state: TrainState, callback: Callable | None = None) -> str | None:
    """Steps over the rest of epoch `state.epoch` until it ends or train.max_steps; returns a stop reason
    (preemption, the callback's) or None."""
    if state.batches_read >= len(run.loader):  # resumed at the very end of the epoch
        return None
    for a_u8, b_u8, _labels in run.loader.epoch(state.epoch, start_batch=state.batches_read):
        state.batches_read += 1
        if run.train_step(a_u8, b_u8):
            run.logger.advance()
            if run.cfg.train.image_every_steps and state.step % run.cfg.train.image_every_steps == 0:
                log_views(run, state, a_u8, b_u8)
            stop = after_step(run, state, callback)
            if stop or state.step >= run.max_steps:
                return stop
    run.train_step.drop_partial_accumulation()
    return None


# -------------------------------------------------------------------------------------- between steps
IMAGE_ROWS = 8  # samples in the trainer's views grid (the views command's default --n)


def log_views(run: Run, state: TrainState, a_u8: torch.Tensor, b_u8: torch.Tensor) -> None:
    """The views grid of `python -m bsim_fast.views` (`views_grid`) for the step just taken, to TensorBoard:
    the first IMAGE_ROWS samples of its last micro-batch on rank 0, with λ of the steps since the last log line
    beside them. Costs, at these steps only: the micro-batch mixed again in fp32 from the step's generator (no
    RNG of the run is drawn), a host copy of those rows and of λ (a host sync), a matplotlib drawing."""
    if not (run.is_main and run.logger.tb):
        return
    cfg, micro = run.cfg, state.step * run.cfg.train.accum_steps - 1  # the micro-batch index the step drew with
    batch = step_views(a_u8, b_u8, cfg, step_generator(cfg.train.seed, micro, run.rank), rows=IMAGE_ROWS)
    lam = run.train_step.take_lam_values(reset=False)
    side = a_u8.shape[1]
    lam = lam.numpy() if lam is not None else lam_draws(10_000, side, cfg.bsim.alpha, cfg.train.seed)
    title = f"{cfg.recipe} ({cfg.method.mode.upper()}) · step {state.step} · rank {run.rank} · {side} px"
    run.logger.image(state.step, "train/views", views_grid(batch, lam, cfg.bsim.alpha, title))


def log_metrics(run: Run, state: TrainState) -> None:
    """Averages since the last log line to the console, metrics.csv and TensorBoard (a host sync)."""
    step = run.train_step
    if run.world > 1:
        dist.all_reduce(step.sums)
    loss_sum, lam_sum, nonfinite, count = step.sums.tolist()
    step.sums.zero_()
    images, step.images = step.images, 0
    if nonfinite > 0:
        # checked before any checkpoint is written, so a poisoned state is never saved
        raise TrainError(
            f"non-finite loss at or before step {state.step} (lr {step.lr:.3g}); last good "
            f"checkpoint is step {run.last_ckpt_step}; set train.nan_policy=skip to skip such steps"
        )
    now = time.perf_counter()
    values = {
        "loss": loss_sum / max(count, 1),
        "lam": lam_sum / max(count, 1),
        "lr": step.lr,
        "img_s": images / max(now - run.t_last, 1e-9),
        "epoch": state.epoch,
    }
    if run.device.type == "cuda":
        values["mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.t_last, run.last_loss, run.last_log_step = now, values["loss"], state.step
    run.logger.log(state.step, values)
    lam = step.take_lam_values()  # a copy from the device after the host sync above (rank 0's λ)
    if lam is not None:
        run.logger.histogram(state.step, "train/lam_values", lam)


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
        save_run(run)
    return stop


def monitor_knn(run: Run, state: TrainState) -> None:
    backbone = run.method.backbone
    data = run.cfg.data  # a minute or more of features on a CPU: said before, not only after
    run.print(f"[knn] step {state.step}: features of {data.train} (the bank) and {data.val} (the queries)")
    results = knn_monitor(backbone, run.cfg, build_eval_loader, run.rank, run.world, run.device, log=run.print)
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
            save_run(run)
        if run.knn and run.knn_step != state.step:
            monitor_knn(run, state)
        if run.is_main:
            export_backbone(run.method.backbone, run.cfg, run.out_dir / "backbone.pt")
    run.logger.print(stop or f"[done] step {state.step}, epoch {state.epoch}; outputs in {run.out_dir}")
    run.logger.close()
    result = {"step": state.step, "epoch": state.epoch, "loss": run.last_loss, **run.knn_results}
    if stop is not None:
        result["stopped"] = stop
    elif run.is_main:
        write_text_atomic(run.out_dir / "final.json", json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------- main
def train(
    cfg: Config, resume: str = "auto", callback: Callable[[TrainState, torch.nn.Module], str | None] | None = None
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
    rank, world, _, device = setup_distributed()
    check_config(cfg, world, paths=False)
    check_datasets(cfg)  # before the run folder is made: a dataset refused leaves no folder behind
    say = print if rank == 0 else (lambda line: None)
    say(
        f"[train] {cfg.method.name} ({cfg.method.mode}) into {cfg.train.out_dir}: building the {cfg.data.loader} "
        f"loader and the {cfg.model.arch} model on {device.type} ({world} process(es))"
    )
    with hold_run_folder(cfg, rank, world):  # one run per folder, all ranks agreeing, before any work
        run = build(cfg)
        state = resume_run(run, resume)
        start(run, resume)
        compiling = " and compiling the networks" if compile_on(cfg, device) else ""
        run.print(
            f"[train] step {state.step + 1}: filling the loader's pipeline{compiling}; then a line every "
            f"{cfg.train.log_every} step(s) with the time spent and the time left"
        )
        stop = None
        try:
            while stop is None and state.epoch < cfg.train.epochs and state.step < run.max_steps:
                stop = train_one_epoch(run, state, callback)
                if stop is None and state.batches_read >= len(run.loader):
                    end_epoch(run, state)
            result = finish(run, state, stop)
        except BaseException:
            if run.wandb is not None:
                finish_wandb(run.wandb, exit_code=1)
            raise
        if run.wandb is not None:
            finish_wandb(run.wandb)  # after `finish` closed the TensorBoard writer it syncs
        return result


def main(argv=None) -> int:
    """The command line; under `bsim_fast.dist.launch` (scripts/train_8gpu.sh) each rank hands its exit code
    and its one line to the launcher, which says each distinct line once."""
    end_with_launcher()  # first: a rank whose launcher is gone must not start writing the run folder
    hand_over("running")
    code, line = run_command(argv)
    if not hand_over(code, line) and line:
        print(line, file=sys.stderr)
    return code


def run_command(argv) -> tuple[int, str | None]:
    """(exit code, the one line to say on stderr or None)."""
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
    parser.add_argument("overrides", nargs="*", help="section.key=value (before, between or after the options)")
    args = parser.parse_intermixed_args(argv)  # `--config R --resume none data.val=`: overrides anywhere
    try:
        config_path = str(recipe_path(args.config))
        cfg = load_config(config_path, args.overrides)
        check_resume_flag(args.resume)
        if args.check_only:
            check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
            return 0, None
        train(cfg, args.resume)
    except (ConfigError, TrainError, CheckpointError, DiskFullError, RunFolderError) as e:
        return 2, f"error: {e}"
    except KeyboardInterrupt:  # Ctrl-C: the run is resumable, a traceback would only hide that
        main_rank = os.environ.get("RANK", "0") == "0" or os.environ.get("BSIM_ERROR_DIR")
        return 130, "interrupted; the same command resumes from the newest checkpoint" if main_rank else None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0, None


if __name__ == "__main__":
    sys.exit(main())
