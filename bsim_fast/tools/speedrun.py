"""Time to accuracy: k-NN top-1 on CIFAR-10 against minutes of training, for one or more recipes.

    python -m bsim_fast.tools.speedrun --recipe small/byol --recipe small/byol_bsim --recipe small/byol_wbsim \\
        --minutes 30 --data DIR
    python -m bsim_fast.tools.speedrun --recipe small/byol --recipe small/byol_wbsim --minutes 5 --data DIR \\
        --out runs/sr5

--data: CIFAR-10 as `train/` + `test/` image folders, `cifar-10-python.tar.gz` or `cifar-10-batches-py/`
(bsim_fast/tools/cifar10.py: the pickles are read without running code); `--download` fetches it into DIR when the
machine has a network; `builtin` is the bundled 6,000-image subset (smoke runs).

Per recipe, one after the other (sequential on purpose: two runs sharing a GPU would each be slowed by the
other, and each one's time to accuracy is what is measured):
  1. both splits are decoded once into device memory (`data.loader=gpu_resident`, the fastest loader for
     32-pixel images); the k-NN bank and queries read the same copy;
  2. the schedule is fitted to the budget: a short calibration (the real training step, compiled as in the
     run, on the real data) measures images/s, and `train.epochs` becomes the whole epochs that fit
     `--minutes` (less the measured compile time, times a 0.97 margin for the trainer's own bookkeeping);
     warm-up keeps the recipe's fraction of the schedule (10 of 200 epochs: 5%) and the cosine ends with the
     last epoch. `--epochs N` fixes the schedule instead and skips the calibration;
  3. `train.train` runs with a per-step callback that keeps the clock, runs k-NN every `--eval-every`
     minutes of it and at the end, and stops the run when the budget is spent;
  4. `speedrun.md`, `speedrun.json` and `speedrun.png` in `--out` are rewritten after every recipe, and each
     recipe's `curve.csv` (beside the trainer's `metrics.csv` and `tb/`) after every k-NN.

The clock (what "minutes" means in the report): training time, from the call of `train()` (model build and
`torch.compile`'s compilation included) to the end of the step before each k-NN, with the GPU synchronised at
that point; the k-NN passes are left out of it and stated separately, as are the decode into device memory
and the calibration. k-NN: k=200, T=0.07 (InstDisc), every training image (centre crop, no augmentation) as
the bank and every test image as a query; `--knn-bank N` / `--knn-queries N` use fixed random subsets instead
(for slow machines; the targets then do not apply). No checkpoints are written during the run (they would
cost training time, and a resumed speedrun's clock would mean nothing); the end writes one and, when the
schedule finished, `backbone.pt`.

Bad arguments are one line and exit 2, before any work. Exit 1 when a recipe failed (the others still run).
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import io
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bsim_fast import cli
from bsim_fast.atomic import write_text_atomic
from bsim_fast.config import Config, ConfigError, load_config, parse_override
from bsim_fast.host import available_cores
from bsim_fast.precision import precision_for
from bsim_fast.recipes import recipe_path
from bsim_fast.step import TrainStep

from . import cifar10
from .speedrun_chart import plot

REPO_ROOT = Path(__file__).resolve().parents[2]
# Set by the speedrun for every recipe (the schedule, the data, where the run writes); --set may not change them.
RESERVED = {
    "train.epochs": "--epochs",
    "optim.warmup_epochs": "--epochs",
    "train.out_dir": "--out",
    "data.loader": None,
    "data.gpu_resident": None,
    "data.train": "--data",
    "data.val": "--data",
    "train.knn_every_epochs": "--eval-every",
    "train.ckpt_every_steps": None,
}
MARGIN = 0.97  # of the usable budget: the trainer's log lines and host syncs, which the calibration skips
EVAL_BATCH = {"cuda": 1024, "cpu": 256}
CALIBRATION = {"cuda": (15, 60), "cpu": (1, 2)}  # (warm-up steps, timed steps) of the calibration
BUDGET_STOP = "time budget reached"
# A pass stands for the mark (or budget) it passed only when taken within this fraction of --eval-every after
# it; one taken later (the first step's compilation, a slow step) stands for its own clock
MARK_SLACK = 0.1
REPORT_FILES = ("speedrun.md", "speedrun.json", "speedrun.png")

# One H100, the full CIFAR-10. `modes`: the run that counts is the best of these (BSIM or WBSIM). Anchors: SimCLR
# 90.3% k-NN in 99 min on one A100 (dkobak/simclr-cifar10); BYOL 91.0% k-NN in 401 min on one RTX A6000
# (lightly's CIFAR-10 benchmark, 800 epochs).
TARGETS = [
    dict(id="byol_sim_90_in_30min", what="BYOL (SIM)", method="byol", modes=("sim",), top1=90.0, minutes=30),
    dict(
        id="byol_bsim_90_in_30min",
        what="BYOL, best of BSIM and WBSIM",
        method="byol",
        modes=("bsim", "wbsim"),
        top1=90.0,
        minutes=30,
    ),
    dict(id="byol_sim_85_in_5min", what="BYOL (SIM)", method="byol", modes=("sim",), top1=85.0, minutes=5),
    dict(
        id="byol_bsim_85_in_5min",
        what="BYOL, best of BSIM and WBSIM",
        method="byol",
        modes=("bsim", "wbsim"),
        top1=85.0,
        minutes=5,
    ),
]


class SpeedrunError(ConfigError):
    """A bad argument; one line, exit 2."""


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--recipe",
        action="append",
        required=True,
        help="a recipe, e.g. small/byol_wbsim (configs/small/byol_wbsim.yaml) or a .yaml path; "
        "repeat for several (run one after the other)",
    )
    p.add_argument("--minutes", default="30", help="training-clock budget of each recipe (default 30)")
    p.add_argument(
        "--data",
        required=True,
        help="CIFAR-10: train/ + test/ image folders, cifar-10-python.tar.gz, "
        "cifar-10-batches-py/, a folder holding one, or builtin",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch cifar-10-python.tar.gz into --data when it holds no CIFAR-10 (needs a network)",
    )
    p.add_argument("--out", default="runs/speedrun", help="report folder; each recipe trains in a sub-folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.add_argument("--epochs", type=str, default=None, help="fixed schedule instead of one fitted to --minutes")
    p.add_argument(
        "--eval-every",
        default=None,
        help="minutes of training clock between k-NN passes (default: 1 up to 10-minute budgets, 2.5 up to 60, else 5)",
    )
    p.add_argument("--knn-bank", default="0", help="training images in the k-NN bank (default 0: all)")
    p.add_argument("--knn-queries", default="0", help="test images as k-NN queries (default 0: all)")
    p.add_argument("--calibrate-steps", default=None, help="timed steps of the calibration (default 60; 2 on a CPU)")
    p.add_argument(
        "--cache",
        default=None,
        help="where the python version is converted to PNG folders (default: $BSIM_FAST_CACHE or ~/.cache/bsim_fast)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="an override for every recipe, e.g. --set data.batch_size=512",
    )
    return p.parse_args(argv)


def _number(flag: str, text, kind=float, low: float = 0.0, strict: bool = True):
    """`text` as a finite number above `low` (or at least `low` when not strict), else one line."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or (value <= low if strict else value < low):
        what = "an integer" if kind is int else "a number"
        raise SpeedrunError(f"{flag} {text}: must be {what} {'>' if strict else '>='} {low:g}")
    return value


def default_eval_every(minutes: float) -> float:
    """Marks that fall on 5 and on round budgets (the targets' minutes): 1, 2.5 or 5 minutes apart."""
    if minutes <= 2:
        return minutes / 4
    return 1.0 if minutes <= 10 else 2.5 if minutes <= 60 else 5.0


@dataclass
class Plan:
    recipes: list[tuple]  # (name, path, Config)
    minutes: float
    eval_every: float
    epochs: int | None
    bank: int
    queries: int
    calibrate_steps: int | None
    out: Path
    overrides: list[str]
    data: cifar10.Found


def check_arguments(args) -> Plan:
    """Everything that can be checked before any work (data conversion, decoding, training)."""
    minutes = _number("--minutes", args.minutes)
    eval_every = default_eval_every(minutes) if args.eval_every is None else _number("--eval-every", args.eval_every)
    if eval_every > minutes:
        raise SpeedrunError(f"--eval-every {args.eval_every}: longer than --minutes {args.minutes}")
    epochs = None if args.epochs is None else _number("--epochs", args.epochs, int)
    bank = _number("--knn-bank", args.knn_bank, int, strict=False)
    queries = _number("--knn-queries", args.knn_queries, int, strict=False)
    calibrate = None if args.calibrate_steps is None else _number("--calibrate-steps", args.calibrate_steps, int)
    for text in args.overrides:
        section, key, _ = parse_override(text)
        if f"{section}.{key}" in RESERVED:
            how = RESERVED[f"{section}.{key}"]
            raise SpeedrunError(
                f"--set {text}: {section}.{key} is set by the speedrun" + (f" (use {how})" if how else "")
            )
    if len(set(args.recipe)) != len(args.recipe):
        raise SpeedrunError(
            f"--recipe: {', '.join(sorted({r for r in args.recipe if args.recipe.count(r) > 1}))} given twice"
        )
    recipes = []
    for name in args.recipe:
        try:
            path = recipe_path(name)
        except ConfigError as exc:
            raise SpeedrunError(f"--recipe {exc}") from None
        cfg = load_config(path, args.overrides)
        if cfg.data.image_size > 64:
            raise SpeedrunError(
                f"--recipe {name}: an ImageNet recipe (data.image_size={cfg.data.image_size}); the "
                f"speedrun trains on CIFAR-10 at 32 px: use small/{path.stem}"
            )
        recipes.append((name, path, cfg))
    data = cifar10.find(args.data, args.download)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpeedrunError(f"--out {out}: exists and is not a folder")
    earlier = [f for f in REPORT_FILES if (out / f).exists()]
    if earlier and not args.overwrite:
        raise SpeedrunError(
            f"--out {out}: holds an earlier report ({earlier[0]}); pass --overwrite to replace it, or another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpeedrunError(f"--out {out}: cannot be created ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise SpeedrunError(f"--out {out}: not writable")
    return Plan(recipes, minutes, eval_every, epochs, bank, queries, calibrate, out, list(args.overrides), data)


# ------------------------------------------------------------------------------------------- the config
def speedrun_config(path: Path, overrides: list[str], data: cifar10.Cifar10, out_dir: Path, device) -> Config:
    """The recipe with the speedrun's settings: GPU-resident data, the k-NN left to the speedrun (data.val
    empty, so `train` does not run its own), no checkpoints before the end, compile resolved (the calibration
    must compile exactly when the run does)."""
    cfg = load_config(path, [f"data.workers={min(16, available_cores())}", *overrides])  # --set may lower
    cfg.data.loader = "gpu_resident"
    cfg.data.train, cfg.data.val = str(data.train), ""
    cfg.train.out_dir = str(out_dir)
    cfg.train.knn_every_epochs = 0
    if cfg.train.compile == "auto":
        cfg.train.compile = "on" if device.type == "cuda" else "off"
    return cfg


def steps_per_epoch(cfg: Config, train_images: int) -> int:
    per_batch = cfg.data.batch_size // cfg.train.accum_steps  # one process: the loader's batch
    return (train_images // per_batch) // cfg.train.accum_steps


@dataclass
class Schedule:
    epochs: int
    warmup_epochs: float
    steps_per_epoch: int
    total_steps: int
    how: str


def fit_schedule(
    cfg: Config,
    train_images: int,
    budget_s: float,
    images_s: float | None = None,
    startup_s: float = 0.0,
    epochs: int | None = None,
) -> Schedule:
    """Whole epochs that fit the budget at `images_s` (or `epochs` as given); warm-up keeps the recipe's
    fraction of its schedule; the cosine ends with the last step (optim.lr_at)."""
    spe = steps_per_epoch(cfg, train_images)
    if epochs is None:
        usable = max(0.0, budget_s - startup_s) * MARGIN
        epochs = max(1, int(usable * images_s / (spe * cfg.data.batch_size)))
        how = (
            f"fitted: {images_s:,.0f} images/s x {usable / 60:.2f} min ({budget_s / 60:g} min less "
            f"{startup_s:.0f} s compile, x {MARGIN})"
        )
    else:
        how = "--epochs"
    warmup = cfg.optim.warmup_epochs * epochs / cfg.train.epochs
    return Schedule(epochs, warmup, spe, epochs * spe, how)


def calibrate(cfg: Config, device: torch.device, steps: int | None) -> dict:
    """End-to-end images/s of the trainer's own step (step.TrainStep: views, forward, backward, schedule,
    scaler, optimiser; compiled when the run is) on batches of the GPU-resident loader, after a warm-up that
    pays for compilation."""
    from bsim_fast.loaders import build_train_loader

    from .bench import loader_images_s

    warmup, timed = CALIBRATION[device.type]
    timed = steps or timed
    t0 = time.perf_counter()
    loader = build_train_loader(cfg, 0, 1, device)
    step = TrainStep(cfg, device, len(loader) // cfg.train.accum_steps)
    images_s, seconds, _ = loader_images_s(loader, warmup, timed, device, step)
    total = time.perf_counter() - t0
    # the warm-up's time beyond its steps' share is compilation and first-touch: the run pays it again, less
    # whatever the compile caches save
    startup = max(0.0, total - seconds - warmup * cfg.data.batch_size / images_s)
    del step, loader
    release_memory(device)
    return {"images_s": images_s, "warmup_steps": warmup, "timed_steps": timed, "seconds": total, "startup_s": startup}


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- k-NN
class KnnEval:
    """k-NN top-1/top-5 of a backbone: the training split's centre crops as the bank, the test split as
    queries, both read from the GPU-resident copy (decoded once, shared with the training loader)."""

    def __init__(self, cfg: Config, data: cifar10.Cifar10, device: torch.device, bank: int = 0, queries: int = 0):
        from bsim_fast.loaders import build_eval_loader

        eval_cfg = copy.deepcopy(cfg)
        eval_cfg.data.batch_size = EVAL_BATCH[device.type]
        self.device = device
        self.bank = build_eval_loader(eval_cfg, str(data.train), 0, 1, device)
        self.queries = build_eval_loader(eval_cfg, str(data.test), 0, 1, device)
        for loader, n in ((self.bank, bank), (self.queries, queries)):
            if 0 < n < len(loader.indices):  # a fixed random subset, the same for every pass and recipe
                loader.indices = np.sort(np.random.default_rng(0).choice(loader.indices, n, replace=False))
        self.bank_size, self.query_size = len(self.bank.indices), len(self.queries.indices)
        self.k, self.t = cfg.train.knn_k, cfg.train.knn_t  # as reported (each pass reads its recipe's)

    def __call__(self, backbone: torch.nn.Module, cfg: Config) -> dict:
        from bsim_fast.eval import extract_features, knn_classify

        precision = precision_for(cfg.train.precision, self.device)
        bank_f, bank_y = extract_features(backbone, self.bank, cfg.data.mean, cfg.data.std, precision)
        query_f, query_y = extract_features(backbone, self.queries, cfg.data.mean, cfg.data.std, precision)
        return knn_classify(bank_f, bank_y, query_f, query_y, cfg.train.knn_k, cfg.train.knn_t)


# ---------------------------------------------------------------------------------------------- the clock
class Clock:
    """Training time: seconds since `start`, less the time spent in k-NN passes (`pause`)."""

    def __init__(self, device: torch.device):
        self.device, self.t0, self.paused = device, None, 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def now(self, sync: bool = False) -> float:
        if sync and self.device.type == "cuda":  # a host sync: the host runs a few steps ahead of the GPU
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.t0 - self.paused

    def pause(self, seconds: float) -> None:
        self.paused += seconds


class Watch:
    """The per-step callback of `train.train` (its docstring has the contract): k-NN at every mark of the
    training clock (every `every_s`), at the schedule's last step and when the budget is spent, where it
    returns the stop reason. Each pass is appended to `curve` and written to `curve.csv`."""

    def __init__(
        self,
        clock: Clock,
        knn: Callable,
        cfg: Config,
        schedule: Schedule,
        budget_s: float,
        every_s: float,
        curve_csv: Path,
        log: Callable[[str], None] = print,
        name: str = "",
    ):
        self.clock, self.knn, self.cfg, self.schedule = clock, knn, cfg, schedule
        self.budget_s, self.every_s, self.csv, self.log, self.name = budget_s, every_s, curve_csv, log, name
        self.last_step = min(cfg.train.max_steps or schedule.total_steps, schedule.total_steps)
        self.next_mark = every_s
        self.curve: list[dict] = []
        self.method = None
        self.first = None  # (clock, step) at the first callback: compilation is behind it
        self.last = (0.0, 0)  # (clock, step) at the latest callback
        self.eval_s = 0.0

    def __call__(self, state, method) -> str | None:
        self.method = method
        t = self.clock.now()
        self.last = (t, state.step)
        if self.first is None:
            t = self.clock.now(sync=True)
            self.first = self.last = (t, state.step)
        end, over, due = state.step >= self.last_step, t >= self.budget_s, t >= self.next_mark
        if not (end or over or due):
            return None
        t = self.clock.now(sync=True)
        self.last = (t, state.step)
        over = t >= self.budget_s
        # The mark a pass stands for: the latest interval mark it passed, when the pass was taken close after
        # it (at the first step boundary the host sees, a few steps later at most: the host decides on its
        # unsynchronised clock and runs ahead of the GPU); its own clock when it was taken more than MARK_SLACK
        # of an interval after it (a long first step: a model of clock t is never filed under an earlier mark
        # it had not reached) or when the schedule ended between marks; the budget when it ends the run.
        mark, why = t, "end of schedule"
        if due:
            while self.next_mark <= t:  # a step longer than the interval passes several marks: the last counts
                mark, why = self.next_mark, "interval"
                self.next_mark += self.every_s
            if t - mark > MARK_SLACK * self.every_s:
                mark, why = t, f"interval, taken {t - mark:.1f} s after its mark"
        if over:  # the budget ends the curve (marks past it mean nothing)
            mark, why = self.budget_s, "time budget"
        if end and why != "end of schedule":
            why += ", end of schedule"
        self.evaluate(state, t, mark, why)
        return BUDGET_STOP if over and not end else None

    def evaluate(self, state, t: float, mark: float, why: str) -> dict:
        t0 = time.perf_counter()
        result = self.knn(self.method.backbone, self.cfg)
        seconds = time.perf_counter() - t0
        self.clock.pause(seconds)
        self.eval_s += seconds
        batch = self.cfg.data.batch_size
        prev_t, prev_step = (self.curve[-1]["minutes"] * 60, self.curve[-1]["step"]) if self.curve else self.first
        images_s = (state.step - prev_step) * batch / (t - prev_t) if t > prev_t and state.step > prev_step else None
        point = {
            "minutes": t / 60,
            "mark_min": mark / 60,
            "why": why,
            "step": state.step,
            "epoch": state.epoch + state.batches_read / max(1, self.schedule.steps_per_epoch),
            "knn_top1": result["knn_top1"],
            "knn_top5": result["knn_top5"],
            "eval_s": seconds,
            "images_s": images_s,
        }
        self.curve.append(point)
        write_csv(self.csv, self.curve)
        speed = f", {images_s:,.0f} img/s" if images_s else ""
        self.log(
            f"[speedrun] {self.name} {point['minutes']:.2f} min: k-NN top-1 {point['knn_top1']:.2f}% top-5 "
            f"{point['knn_top5']:.2f}% (step {state.step}, epoch {point['epoch']:.2f}{speed}; "
            f"k-NN {seconds:.1f} s)"
        )
        return point


def write_csv(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(
        {k: ("" if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows
    )
    write_text_atomic(path, out.getvalue())


# ---------------------------------------------------------------------------------------------- one recipe
def time_to(curve: list[dict], top1: float) -> dict | None:
    """The first k-NN pass at or above `top1`: its clock minutes and the mark it was taken for."""
    return next((p for p in curve if p["knn_top1"] >= top1), None)


def run_recipe(
    name: str,
    path: Path,
    plan: Plan,
    data: cifar10.Cifar10,
    knn: KnnEval,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> dict:
    from bsim_fast.train import train

    out_dir = plan.out / name.replace("/", "_").replace(".yaml", "")
    cfg = speedrun_config(path, plan.overrides, data, out_dir, device)
    budget_s = plan.minutes * 60
    started = time.perf_counter()
    result = {
        "recipe": name,
        "method": cfg.method.name,
        "mode": cfg.method.mode,
        "out_dir": str(out_dir),
        "batch_size": cfg.data.batch_size,
        "compile": cfg.train.compile,
        "budget_min": plan.minutes,
        "calibration": None,
        "curve": [],
        "error": None,
        "stopped": None,
    }
    try:
        calibration = None
        if plan.epochs is None:
            log(
                f"[speedrun] {name}: calibrating the schedule ({'compiling, ' if cfg.train.compile == 'on' else ''}"
                f"timing {plan.calibrate_steps or CALIBRATION[device.type][1]} steps)"
            )
            calibration = calibrate(cfg, device, plan.calibrate_steps)
            result["calibration"] = calibration
        schedule = fit_schedule(
            cfg,
            data.train_images,
            budget_s,
            calibration and calibration["images_s"],
            calibration["startup_s"] if calibration else 0.0,
            plan.epochs,
        )
        cfg.train.epochs, cfg.optim.warmup_epochs = schedule.epochs, schedule.warmup_epochs
        cfg.train.ckpt_every_steps = schedule.total_steps + 1  # only the end writes one
        result["schedule"] = asdict(schedule)
        log(
            f"[speedrun] {name}: {schedule.epochs} epochs ({schedule.total_steps} steps, warm-up "
            f"{schedule.warmup_epochs:.2f} epochs; {schedule.how}); budget {plan.minutes:g} min, k-NN every "
            f"{plan.eval_every:g} min on {knn.bank_size} / {knn.query_size} images"
        )
        clock = Clock(device)
        watch = Watch(clock, knn, cfg, schedule, budget_s, plan.eval_every * 60, out_dir / "curve.csv", log, name)
        clock.start()
        final = train(cfg, resume="none", callback=watch)
        t_end, step_end = watch.last
        ended_unseen = watch.method is not None and (not watch.curve or watch.curve[-1]["step"] != final["step"])
        if ended_unseen:  # stopped where no pass was due (preempted): the last model still gets one
            watch.evaluate(
                SimpleNamespace(step=final["step"], epoch=final["epoch"], batches_read=0), t_end, t_end, "end"
            )
        result["stopped"] = final.get("stopped")
        first_t, first_step = watch.first or (0.0, 0)
        steady = (
            (step_end - first_step) * cfg.data.batch_size / (t_end - first_t)
            if t_end > first_t and step_end > first_step
            else None
        )
        result.update(
            curve=watch.curve,
            steps=step_end,
            epochs_done=final["epoch"],
            train_min=t_end / 60,
            first_step_s=first_t,
            eval_s=watch.eval_s,
            evals=len(watch.curve),
            images_s=step_end * cfg.data.batch_size / t_end if t_end > 0 else None,
            steady_images_s=steady,
        )
    except Exception as e:  # noqa: BLE001 - one recipe's failure is its row; the next recipe still runs
        from bsim_fast.checkpoint import CheckpointError
        from bsim_fast.train import TrainError

        if not isinstance(e, (ConfigError, TrainError, CheckpointError)):  # not a user-facing one-liner: a bug
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result["error"] = f"{type(e).__name__}: {first}"
        log(f"[speedrun] {name}: failed: {result['error']}")
    finally:
        torch._dynamo.reset()  # the next recipe compiles its own graphs; free these and their memory
        release_memory(device)
    curve = result["curve"]
    result["final"] = curve[-1] if curve else None
    result["wall_s"] = time.perf_counter() - started
    result["time_to"] = {str(int(x)): (p["minutes"] if (p := time_to(curve, x)) else None) for x in (85.0, 90.0)}
    return result


# ---------------------------------------------------------------------------------------------- targets
def evaluate_targets(results: list[dict], applicable: bool) -> list[dict]:
    """Each target against its runs (the best counts): `pass` when a k-NN pass taken for a mark within the
    target's minutes reached its top-1; `miss` when a run whose budget was those minutes did not; `not measured`
    when only shorter or longer runs are there (a 30-minute schedule is not a 5-minute one: run --minutes 5),
    or none; `n/a`, with the figures, where the targets do not apply (not a GPU, not the full CIFAR-10, k-NN
    on subsets)."""
    out = []
    for t in TARGETS:
        runs = [r for r in results if r["method"] == t["method"] and r["mode"] in t["modes"] and r["curve"]]
        status, measured = "not measured", None
        for r in runs:
            within = [p for p in r["curve"] if p["mark_min"] <= t["minutes"] + 1e-6]
            hit = next((p for p in within if p["knn_top1"] >= t["top1"]), None)
            best = max((p["knn_top1"] for p in within), default=None)
            if hit:
                status, measured = "pass", f"{hit['knn_top1']:.2f}% at {hit['minutes']:.2f} min ({r['recipe']})"
                break
            if best is None:
                continue
            if abs(r["budget_min"] - t["minutes"]) <= 0.01 * t["minutes"]:
                status, measured = "miss", f"best {best:.2f}% in {t['minutes']} min ({r['recipe']})"
            elif status != "miss":
                measured = (
                    f"{best:.2f}% by {min(t['minutes'], r['budget_min']):g} min of a {r['budget_min']:g}-min "
                    f"schedule ({r['recipe']}; run --minutes {t['minutes']})"
                )
        if not applicable and status in ("pass", "miss"):
            status = "n/a"
        out.append({**t, "target": target_text(t), "measured": measured, "status": status})
    return out


def target_text(t: dict) -> str:
    return f"≥ {t['top1']:g}% k-NN top-1 in ≤ {t['minutes']} min"


def targets_markdown() -> str:
    """The targets table of docs/RESULTS.md (a test checks the document holds exactly this)."""
    lines = ["| id | what (one H100, full CIFAR-10) | target |", "|---|---|---|"]
    lines += [f"| `{t['id']}` | {t['what']} | {target_text(t)} |" for t in TARGETS]
    return "\n".join(lines)


def applicability(device: torch.device, data: cifar10.Cifar10, knn: KnnEval) -> str | None:
    """Why the targets do not apply to this run, or None when they do."""
    if device.type != "cuda":
        return "not a GPU run"
    if not data.is_full:
        return f"not the full CIFAR-10 ({data.train_images} / {data.test_images} images)"
    if knn.bank_size < data.train_images or knn.query_size < data.test_images:
        return "k-NN on subsets (--knn-bank / --knn-queries)"
    return None


# ---------------------------------------------------------------------------------------------- report
def _pct(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def _num(v, digits=0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def at_minutes(curve: list[dict], minutes: float) -> float | None:
    """Top-1 at `minutes` of training clock: the last pass taken for a mark at or before it, when the run got
    that far (a pass at or after it exists); else None."""
    before = [p for p in curve if p["mark_min"] <= minutes + 1e-6]
    reached = any(p["mark_min"] >= minutes - 1e-6 for p in curve)
    return before[-1]["knn_top1"] if before and reached else None


def write_report(
    plan: Plan,
    env: dict,
    data: cifar10.Cifar10,
    knn: KnnEval,
    setup: dict,
    results: list[dict],
    not_applicable: str | None,
) -> dict:
    targets = evaluate_targets(results, not_applicable is None)
    settings = {
        "minutes": plan.minutes,
        "eval_every_min": plan.eval_every,
        "epochs": plan.epochs,
        "overrides": plan.overrides,
        "order": "sequential",
        "knn": {"k": knn.k, "t": knn.t, "bank": knn.bank_size, "queries": knn.query_size},
        "clock": "training time from the call of train() (model build and compilation included) to the "
        "end of the step before each k-NN, GPU synchronised; k-NN passes, the decode into device "
        "memory and the calibration are not in it and are stated separately",
    }
    report = {
        "environment": env,
        "data": {
            "origin": data.origin,
            "train_images": data.train_images,
            "test_images": data.test_images,
            "classes": data.classes,
            "full_cifar10": data.is_full,
            "loader": "gpu_resident",
            **setup,
        },
        "settings": settings,
        "recipes": results,
        "targets": targets,
        "targets_apply": not_applicable is None,
        "targets_not_applicable_because": not_applicable,
    }
    write_text_atomic(plan.out / "speedrun.json", json.dumps(report, indent=1))

    e = env
    lines = [
        "# Time to accuracy: k-NN top-1 on CIFAR-10 against training minutes",
        "",
        f"- device: {e.get('device')} ({e.get('gpu_memory_gb', '—')} GB), torch {e.get('torch')}, "
        f"commit {e.get('commit') or '—'}, {e.get('time')}",
        f"- data: {data.origin}: {data.train_images:,} training / {data.test_images:,} test images, "
        f"{len(data.classes)} classes; decoded once into {setup['device']} memory "
        f"(`data.loader=gpu_resident`) in {setup['decode_s']:.1f} s, not in the clock",
        f"- k-NN: k={settings['knn']['k']}, T={settings['knn']['t']}, bank {knn.bank_size:,} training images "
        f"(centre crop), {knn.query_size:,} test queries",
        f"- budget: {plan.minutes:g} min of training clock per recipe, k-NN every {plan.eval_every:g} min and "
        f"at the end; recipes run one after the other",
        f"- clock: {settings['clock']}",
        "- targets: "
        + (
            f"**do not apply** ({not_applicable}); figures shown for the record"
            if not_applicable
            else "one H100, the full CIFAR-10: see below"
        ),
        "",
        "## Recipes",
        "",
        "| recipe | mode | schedule | batch | steps | images/s (after compile) | training min | first step s "
        "| k-NN passes, s | calibration s | top-1 at 5 min | final top-1 | final top-5 | to 85% (min) "
        "| to 90% (min) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, fin, cal = r.get("schedule") or {}, r["final"] or {}, r["calibration"] or {}
        note = r["error"] or (f"stopped: {r['stopped']}" if r["stopped"] else "schedule finished")
        sched = f"{s['epochs']} ep, warm-up {s['warmup_epochs']:.2f}" if s else "—"
        lines.append(
            f"| {r['recipe']} | {r['mode']} | {sched} | {r['batch_size']} | {_num(r.get('steps'))} "
            f"| {_num(r.get('images_s'))} ({_num(r.get('steady_images_s'))}) "
            f"| {_num(r.get('train_min'), 2)} | {_num(r.get('first_step_s'), 1)} "
            f"| {r.get('evals', 0)}, {_num(r.get('eval_s'), 1)} | {_num(cal.get('seconds'), 1)} "
            f"| {_pct(at_minutes(r['curve'], 5))} | {_pct(fin.get('knn_top1'))} | {_pct(fin.get('knn_top5'))} "
            f"| {_num(r['time_to']['85'], 2)} | {_num(r['time_to']['90'], 2)} | {note} |"
        )
    lines += [
        "",
        "## k-NN top-1 (%) against training minutes, side by side",
        "",
        "| minutes | " + " | ".join(f"{r['recipe']} ({r['mode'].upper()})" for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    marks = sorted({round(p["mark_min"], 4) for r in results for p in r["curve"] if p["why"].startswith("interval")})
    for m in marks:
        cells = [
            next(
                (
                    _pct(p["knn_top1"])
                    for p in r["curve"]
                    if round(p["mark_min"], 4) == m and p["why"].startswith("interval")
                ),
                "",
            )
            for r in results
        ]
        lines.append(f"| {m:g} | " + " | ".join(cells) + " |")
    lines.append(
        "| end | "
        + " | ".join(
            f"{_pct(r['final']['knn_top1'])} at {r['final']['minutes']:.2f} min" if r["final"] else "—" for r in results
        )
        + " |"
    )
    lines += ["", "## Targets", "", "| id | what | target | measured | status |", "|---|---|---|---|---|"]
    lines += [
        f"| `{t['id']}` | {t['what']} | {t['target']} | {t['measured'] or '—'} | **{t['status']}** |" for t in targets
    ]
    lines += [
        "",
        "Chart: `speedrun.png`. Raw figures: `speedrun.json`. Per recipe: `<recipe>/curve.csv` (every k-NN "
        "pass), `metrics.csv` and `tb/` (every logged step).",
        "",
    ]
    write_text_atomic(plan.out / "speedrun.md", "\n".join(lines))
    return report


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"interrupted; {args.out} holds the report of the recipes that finished", file=sys.stderr)
        return 130


def run(args) -> int:
    try:
        plan = check_arguments(args)
        from bsim_fast.dist import setup_distributed

        _, world, _, device = setup_distributed()
        if world > 1:
            raise SpeedrunError(f"WORLD_SIZE={world}: the speedrun runs in one process on one GPU")
        data = cifar10.prepare(plan.data, Path(args.cache) if args.cache else None, workers=min(16, available_cores()))
        if device.type == "cpu":
            from bsim_fast.dist import set_cpu_threads

            set_cpu_threads(1)
        print(
            f"[speedrun] {data.origin}: {data.train_images:,} / {data.test_images:,} images; device {device}",
            flush=True,
        )
        t0 = time.perf_counter()
        first_cfg = speedrun_config(plan.recipes[0][1], plan.overrides, data, plan.out, device)
        knn = KnnEval(first_cfg, data, device, plan.bank, plan.queries)  # decodes both splits once
        setup = {"decode_s": time.perf_counter() - t0, "device": str(device)}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from bsim_fast.provenance import environment

    env = environment(device)
    not_applicable = applicability(device, data, knn)
    if not_applicable:
        print(f"[speedrun] the targets do not apply: {not_applicable}", flush=True)
    results: list[dict] = []
    for name, path, _ in plan.recipes:
        results.append(run_recipe(name, path, plan, data, knn, device))
        write_report(plan, env, data, knn, setup, results, not_applicable)
        try:
            plot(results, plan.out / "speedrun.png", env, TARGETS)
        except ImportError as e:
            print(f"[speedrun] speedrun.png not written: {e}", flush=True)
        if (results[-1]["stopped"] or "").startswith("preempted"):
            break
    print((plan.out / "speedrun.md").read_text())
    print(f"[speedrun] wrote {plan.out / 'speedrun.md'}, speedrun.json, speedrun.png")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
