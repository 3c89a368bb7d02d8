"""The speedrun's command line: its options (`build_parser`) and everything about them that can be checked
before any work (`check_arguments` → `Plan`): numbers, overrides the speedrun sets itself, recipes, the data,
the report folder. A bad argument is a `SpeedrunError`: one line, exit 2.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

from bsim_fast import cli
from bsim_fast.config import ConfigError, load_config, parse_override
from bsim_fast.recipes import recipe_path

from . import cifar10

REPORT_FILES = ("speedrun.md", "speedrun.json", "speedrun.png")
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


class SpeedrunError(ConfigError):
    """A bad argument; one line, exit 2."""


# ---------------------------------------------------------------------------------------------- arguments


# ---------------------------------------------------------------------------------------------- arguments
def build_parser(description: str) -> cli.ArgumentParser:
    p = cli.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return p


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
