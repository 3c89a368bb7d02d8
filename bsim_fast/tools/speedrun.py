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

import copy
import csv
import gc
import io
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bsim_fast.atomic import write_text_atomic
from bsim_fast.config import Config, ConfigError, load_config
from bsim_fast.host import available_cores
from bsim_fast.precision import precision_for
from bsim_fast.step import TrainStep

from . import cifar10, harness
from .speedrun_args import Plan, SpeedrunError, build_parser, check_arguments
from .speedrun_chart import plot
from .speedrun_report import TARGETS, applicability, write_report

MARGIN = 0.97  # of the usable budget: the trainer's log lines and host syncs, which the calibration skips
EVAL_BATCH = {"cuda": 1024, "cpu": 256}
CALIBRATION = {"cuda": (15, 60), "cpu": (1, 2)}  # (warm-up steps, timed steps) of the calibration
BUDGET_STOP = "time budget reached"
# A pass stands for the interval mark it passed only when taken within this fraction of --eval-every after it;
# one taken later (the first step's compilation, a slow step) stands for its own clock
MARK_SLACK = 0.1


# ------------------------------------------------------------------------------------------- the config
def speedrun_config(path: Path, overrides: list[str], data: cifar10.Cifar10, out_dir: Path, device) -> Config:
    """The recipe with the speedrun's settings: GPU-resident data, the k-NN left to the speedrun (data.val
    empty, so `train` does not run its own), no checkpoints before the end, compile resolved (the calibration
    must compile exactly when the run does), no view pictures (their drawing would be clock time spent alike
    in every recipe, measuring nothing)."""
    cfg = load_config(path, [f"data.workers={min(16, available_cores())}", *overrides])  # --set may lower
    cfg.data.loader = "gpu_resident"
    cfg.data.train, cfg.data.val = str(data.train), ""
    cfg.train.out_dir = str(out_dir)
    cfg.train.knn_every_epochs = 0
    cfg.train.image_every_steps = 0
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

    warmup, timed = CALIBRATION[device.type]
    timed = steps or timed
    t0 = time.perf_counter()
    loader = build_train_loader(cfg, 0, 1, device)
    step = TrainStep(cfg, device, len(loader) // cfg.train.accum_steps)
    images_s, seconds = harness.images_s(harness.loader_views(loader, warmup + timed), device, warmup, timed, step)
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
    """One recipe: the schedule fitted to the budget, the run under the clock with its k-NN passes. A failure
    is the recipe's `error` (the next recipe still runs)."""
    out_dir = plan.out / name.replace("/", "_").replace(".yaml", "")
    cfg = speedrun_config(path, plan.overrides, data, out_dir, device)
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
        schedule = schedule_for(name, cfg, plan, data.train_images, device, log, result)
        log(
            f"[speedrun] {name}: {schedule.epochs} epochs ({schedule.total_steps} steps, warm-up "
            f"{schedule.warmup_epochs:.2f} epochs; {schedule.how}); budget {plan.minutes:g} min, k-NN every "
            f"{plan.eval_every:g} min on {knn.bank_size} / {knn.query_size} images"
        )
        result.update(train_under_clock(name, cfg, schedule, plan, knn, device, log, out_dir / "curve.csv"))
    except Exception as e:  # noqa: BLE001 - one recipe's failure is its row; the next recipe still runs
        from bsim_fast.checkpoint import CheckpointError
        from bsim_fast.train import TrainError

        if not isinstance(e, (ConfigError, TrainError, CheckpointError)):  # not a user-facing one-liner: a bug
            traceback.print_exc()
        result["error"] = harness.error_text(e)
        log(f"[speedrun] {name}: failed: {result['error']}")
    finally:
        torch._dynamo.reset()  # the next recipe compiles its own graphs; free these and their memory
        release_memory(device)
    curve = result["curve"]
    result["final"] = curve[-1] if curve else None
    result["wall_s"] = time.perf_counter() - started
    result["time_to"] = {str(int(x)): (p["minutes"] if (p := time_to(curve, x)) else None) for x in (85.0, 90.0)}
    return result


def schedule_for(
    name: str, cfg: Config, plan: Plan, train_images: int, device: torch.device, log: Callable, result: dict
) -> Schedule:
    """The schedule of this recipe (calibrated unless --epochs), set into `cfg` and recorded in `result`."""
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
        train_images,
        plan.minutes * 60,
        calibration and calibration["images_s"],
        calibration["startup_s"] if calibration else 0.0,
        plan.epochs,
    )
    cfg.train.epochs, cfg.optim.warmup_epochs = schedule.epochs, schedule.warmup_epochs
    cfg.train.ckpt_every_steps = schedule.total_steps + 1  # only the end writes one
    result["schedule"] = asdict(schedule)
    return schedule


def train_under_clock(
    name: str,
    cfg: Config,
    schedule: Schedule,
    plan: Plan,
    knn: KnnEval,
    device: torch.device,
    log: Callable,
    curve_csv: Path,
) -> dict:
    """`train.train` with the Watch as its callback; the curve and the clock's figures."""
    from bsim_fast.train import train

    clock = Clock(device)
    watch = Watch(clock, knn, cfg, schedule, plan.minutes * 60, plan.eval_every * 60, curve_csv, log, name)
    clock.start()
    final = train(cfg, resume="none", callback=watch)
    t_end, step_end = watch.last
    ended_unseen = watch.method is not None and (not watch.curve or watch.curve[-1]["step"] != final["step"])
    if ended_unseen:  # stopped where no pass was due (preempted): the last model still gets one
        watch.evaluate(SimpleNamespace(step=final["step"], epoch=final["epoch"], batches_read=0), t_end, t_end, "end")
    first_t, first_step = watch.first or (0.0, 0)
    steady = (
        (step_end - first_step) * cfg.data.batch_size / (t_end - first_t)
        if t_end > first_t and step_end > first_step
        else None
    )
    return dict(
        stopped=final.get("stopped"),
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


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    return build_parser(__doc__).parse_args(argv)


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
    env = harness.environment(device)
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
