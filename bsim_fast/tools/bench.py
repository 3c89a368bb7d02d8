"""Throughput benchmark: kernels, loader-only, model-only and end-to-end two-view images/s, peak memory.

    python -m bsim_fast.tools.bench                      # full sizes on a GPU (ResNet-50 @ 224, ResNet-18 @ 32)
    python -m bsim_fast.tools.bench --tiny               # CPU smoke run (default without a GPU)
    python -m bsim_fast.tools.bench --only model --methods byol --modes sim bsim
    python -m bsim_fast.tools.bench --targets-md         # the targets table of docs/BENCHMARKS.md

Prints a table and writes `<out>/bench.json` (rewritten after every row, so a crash keeps what was measured)
and `<out>/bench.png`. "images/s" counts source images per second; each carries two views (and, in BSIM, two
mixed views). Loader and end-to-end rows use the photometric policy of the recipe at their resolution (the
ImageNet recipe at 224: blur and solarize; the small recipe at 32). `--deadline` (a Unix time) makes the
rows that would not finish in time come out as skipped: rows run in the order of `plan()`, most important
first. What cannot run here (DALI not installed, the Triton kernel without CUDA) is a skipped row with its
reason, never an error of the others.

The targets (`TARGETS`) are the one source of the table in docs/BENCHMARKS.md and of the pass/miss column of
the acceptance report (`bsim_fast.tools.gpu_check`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from bsim_fast import cli
from bsim_fast.config import MODES, Config, load_config
from bsim_fast.host import available_cores
from bsim_fast.methods import METHODS
from bsim_fast.recipes import recipe_path
from bsim_fast.step import TrainStep

from . import harness
from .bench_report import describe, plot, table
from .bench_targets import FULL_SIZE, evaluate, measured_row, targets_markdown

# The package each loader needs beyond torch: without it its rows are skipped, saying so.
PACKAGES = {"ffcv": "ffcv", "dali": "nvidia.dali"}


# ------------------------------------------------------------------------------------------ the step
def recipe_cfg(method: str, mode: str, arch: str, size: int, batch: int, compile_on: bool, precision: str) -> Config:
    """The recipe of `method`/`mode` at this resolution: ImageNet recipes above 64 px, configs/small/ below.
    Its `aug` section is the photometric policy the loader and end-to-end rows use."""
    recipe = method if mode == "sim" else f"{method}_{mode}"
    small = size <= 64
    cfg = load_config(
        recipe_path(f"{'small/' if small else ''}{recipe}"),
        [
            f"model.arch={arch}",
            f"data.image_size={size}",
            f"data.batch_size={batch}",
            f"train.compile={'on' if compile_on else 'off'}",
            f"train.precision={precision}",
        ],
    )
    if cfg.model.queue_size < 4 * batch:
        cfg.model.queue_size = 4 * batch
    return cfg


def train_step(cfg: Config, device: torch.device) -> TrainStep:
    """The trainer's own step (step.TrainStep: views, forward, backward, LR schedule, loss scaler, NaN policy,
    target-network progress over the schedule) for views already on the device. Its schedule is that of the
    set the recipe is for: ImageNet's 1,281,167 images above 64 px, CIFAR-10's 50,000 below."""
    images = 1_281_167 if cfg.data.image_size > 64 else 50_000
    return TrainStep(cfg, device, max(1, images // cfg.data.batch_size))


def synthetic_views(batch: int, size: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g).to(device)
    b = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g).to(device)
    return a, b


def policy_name(size: int) -> str:
    return "configs/small (no blur)" if size <= 64 else "ImageNet recipe (blur 1.0/0.1, solarize 0/0.2)"


# -------------------------------------------------------------------------------------------- settings
class Settings:
    """Sizes, iteration counts and row order for one run; `tiny` is the CPU smoke version."""

    def __init__(self, args, device: torch.device):
        tiny = args.tiny
        self.tiny, self.device, self.precision = tiny, device, args.precision
        self.size = args.size or (32 if tiny else FULL_SIZE)
        self.batch = args.batch or (16 if tiny else 256)
        self.workers = args.workers if args.workers is not None else (2 if tiny else min(16, available_cores()))
        # Timed steps per row: long enough to average over the loader's jitter and the allocator; on a GPU a
        # ResNet-50 step is ~0.1 s, so 20 steps + 5 warm-up cost ~3 s per row (the 10-minute budget of
        # gpu_check holds 24 eager rows, the key compiled rows, three loaders and their end-to-end runs).
        self.iters = args.iters or (6 if tiny else 20)
        self.warmup = 1 if tiny else 5
        self.loader_batches = args.iters or (8 if tiny else 40)
        self.archs = [("resnet18", self.size)] if tiny else [("resnet50", FULL_SIZE), ("resnet18", 32)]
        self.compiles = [False] if (tiny or args.no_compile) else [False, True]
        self.methods, self.modes = args.methods, args.modes
        self.e2e_arch = "resnet18" if self.size <= 64 else "resnet50"

    def batch_for(self, arch: str) -> int:
        if self.tiny or self.batch != 256:
            return self.batch
        return 256 if arch == "resnet50" else 512

    def cost_s(self, arch: str, compile_on: bool) -> float:
        """Rough seconds a model row takes on a GPU (compilation dominates): for the deadline only."""
        if self.tiny:
            return 2.0
        return (75.0 if arch == "resnet50" else 45.0) if compile_on else (8.0 if arch == "resnet50" else 4.0)

    def model_order(self) -> list[tuple]:
        """(method, mode, arch, size, compiled) of the model-only rows, most important first: the targets'
        rows (BYOL compiled), then every method eager, then the rest compiled (each compiled ResNet-50 costs
        about a minute of compilation)."""
        (arch0, size0), byol = self.archs[0], "byol" in self.methods
        targets = [
            ("byol", mode, arch0, size0, c) for c in sorted(self.compiles, reverse=True) for mode in ("bsim", "sim")
        ]
        order = [t for t in targets if byol and t[1] in self.modes]
        for compile_on in self.compiles:
            order += [
                (m, mode, a, size, compile_on) for a, size in self.archs for m in self.methods for mode in self.modes
            ]
        return list(dict.fromkeys(order))


# ------------------------------------------------------------------------------------------------ rows
class Bench:
    """Runs rows in order and keeps them; every row is written to `<out>/bench.json` as soon as it exists."""

    def __init__(self, settings: Settings, paths: dict[str, str], out: Path, budget: harness.Budget, env: dict):
        self.s, self.paths, self.out, self.budget, self.env = settings, paths, out, budget, env
        self.rows: list[dict] = []

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        what = describe(row)
        if "skipped" in row:
            print(f"  {row['kind']} {what}: skipped ({row['skipped']})", flush=True)
        elif "error" in row:
            print(f"  {row['kind']} {what}: ERROR {row['error']}", flush=True)
        elif "images_s" in row:
            print(f"  {row['kind']} {what}: {row['images_s']:,.0f} images/s", flush=True)
        else:
            print(f"  {row['kind']} {what}: {row.get('ms', 0):.4g} ms", flush=True)
        self.save()
        return row

    def save(self) -> None:
        harness.write_report(self.out, "bench", self.report())

    def report(self) -> dict:
        return {
            "environment": self.env,
            "tiny": self.s.tiny,
            "rows": self.rows,
            "targets": evaluate(self.rows, applicable=not self.s.tiny and self.s.device.type == "cuda"),
        }

    # ---- kernels
    def kernels(self) -> None:
        try:
            rows = bench_kernels(self.s.tiny, self.s.device)
        except Exception as e:  # noqa: BLE001 - a kernel failure is reported; loaders and models still run
            rows = [{"kind": "kernel", "name": "kernels", "error": harness.error_text(e)}]
        for row in rows:
            self.add(row)

    # ---- loaders
    def loader_cfg(self, kind: str, path: str, compile_on: bool = False) -> Config:
        cfg = recipe_cfg("byol", "bsim", self.s.e2e_arch, self.s.size, self.s.batch, compile_on, self.s.precision)
        cfg.data.loader, cfg.data.train = kind, path
        cfg.data.batch_size, cfg.data.workers = self.s.batch, self.s.workers
        return cfg

    def build_loader(self, kind: str, cfg: Config, base: dict):
        """The loader, or None after adding a skipped row (not installed) or an error row."""
        from bsim_fast.loaders import build_train_loader

        try:
            return build_train_loader(cfg, 0, 1, self.s.device)
        except ImportError as e:
            self.add({**base, "skipped": f"{kind} not installed ({e.name or e})"})
        except Exception as e:  # noqa: BLE001 - one loader's failure must not hide the others
            self.add({**base, "error": harness.error_text(e)})
        return None

    def loader_row(self, kind: str, path: str, base: dict, step: TrainStep | None = None) -> dict | None:
        """Loader-only (no `step`) or end-to-end two-view images/s through `kind`; None when it could not be
        built (its skipped or error row is already added)."""
        s = self.s
        loader = self.build_loader(kind, self.loader_cfg(kind, path, step is not None and True in s.compiles), base)
        if loader is None:
            return None
        try:
            harness.reset_peak(s.device)
            views = harness.loader_views(loader, s.warmup + s.loader_batches)
            ips, seconds = harness.images_s(views, s.device, s.warmup, s.loader_batches, step)
            peak = harness.peak_mem_gb(s.device)
            return {**base, "images_s": ips, "batches": s.loader_batches, "seconds": seconds, "peak_mem_gb": peak}
        except Exception as e:  # noqa: BLE001
            return {**base, "error": harness.error_text(e)}

    def loaders(self) -> None:
        s = self.s
        for kind, path in self.paths.items():
            base = {"kind": "loader", "loader": kind, "size": s.size, "batch": s.batch, "workers": s.workers}
            base["policy"] = policy_name(s.size)
            if not self.budget.allows(20):
                self.add({**base, "skipped": "time budget"})
                continue
            row = self.loader_row(kind, path, base)
            if row is not None:
                self.add(row)

    # ---- model-only and end-to-end
    def model_row(self, method, mode, arch, size, compile_on) -> None:
        batch = self.s.batch_for(arch)
        base = dict(kind="model", method=method, mode=mode, arch=arch, size=size, batch=batch, compile=compile_on)
        if measured_row(self.rows, **base) is not None:
            return
        if not self.budget.allows(self.s.cost_s(arch, compile_on)):
            self.add({**base, "skipped": "time budget"})
            return
        try:
            step = train_step(recipe_cfg(method, mode, arch, size, batch, compile_on, self.s.precision), self.s.device)
            views = itertools.repeat(synthetic_views(batch, size, self.s.device))
            harness.reset_peak(self.s.device)
            ips, seconds = harness.images_s(views, self.s.device, self.s.warmup, self.s.iters, step)
            peak = harness.peak_mem_gb(self.s.device)
            self.add({**base, "images_s": ips, "seconds": seconds, "steps": self.s.iters, "peak_mem_gb": peak})
        except Exception as e:  # noqa: BLE001
            self.add({**base, "error": harness.error_text(e)})

    def end_to_end(self) -> None:
        """BYOL-BSIM through each loader, with its ratio to model-only measured on the same training step (same
        compiled graphs, same warm-up, same number of steps), model-only timed before and after the loaders
        and the faster of the two kept, so drift cannot make a loader look faster than the model."""
        s = self.s
        compile_on = True in s.compiles
        arch, size = s.e2e_arch, s.size
        base = dict(kind="end_to_end", size=size, batch=s.batch, workers=s.workers, arch=arch, compile=compile_on)
        base["policy"] = policy_name(size)
        if not self.budget.allows(s.cost_s(arch, compile_on) + 15 * len(self.paths)):
            for kind in self.paths:
                self.add({**base, "loader": kind, "skipped": "time budget"})
            return
        cfg = recipe_cfg("byol", "bsim", arch, size, s.batch, compile_on, s.precision)
        try:
            step = train_step(cfg, s.device)
        except Exception as e:  # noqa: BLE001
            for kind in self.paths:
                self.add({**base, "loader": kind, "error": f"TrainStep: {harness.error_text(e)}"})
            return
        views = itertools.repeat(synthetic_views(s.batch, size, s.device))
        model_ips = [harness.images_s(views, s.device, s.warmup, s.loader_batches, step)[0]]
        results = []
        for kind, path in self.paths.items():
            if not self.budget.allows(15):
                results.append({**base, "loader": kind, "skipped": "time budget"})
            elif (row := self.loader_row(kind, path, {**base, "loader": kind}, step)) is not None:
                results.append(row)
        harness.reset_peak(s.device)
        model_ips.append(harness.images_s(views, s.device, s.warmup, s.loader_batches, step)[0])
        self.add_end_to_end(base, max(model_ips), results)
        step = None
        if compile_on:
            torch._dynamo.reset()

    def add_end_to_end(self, base: dict, model: float, results: list[dict]) -> None:
        """The model-only row measured with the end-to-end rows (no second compilation), then those rows with
        their ratio to it."""
        s = self.s
        self.add(
            dict(
                kind="model",
                method="byol",
                mode="bsim",
                arch=base["arch"],
                size=base["size"],
                batch=s.batch,
                compile=base["compile"],
                images_s=model,
                steps=s.loader_batches,
                peak_mem_gb=harness.peak_mem_gb(s.device),
                note="measured with the end-to-end rows",
            )
        )
        for r in results:
            if "images_s" in r:
                r["model_images_s"] = model
                r["ratio_to_model"] = r["images_s"] / model
                # A loader cannot make the step faster: a ratio above 1 is timing noise (tiny runs, a busy
                # CPU shared by workers and the model), so it is reported as not meaningful.
                r["ratio_meaningful"] = r["ratio_to_model"] <= 1.02 and not s.tiny
            self.add(r)

    def models(self) -> None:
        """Model-only rows in `Settings.model_order`."""
        for method, mode, arch, size, compile_on in self.s.model_order():
            self.model_row(method, mode, arch, size, compile_on)
            if compile_on:  # drop the compiled graphs (and the parameters they hold) before the next model
                torch._dynamo.reset()
                if self.s.device.type == "cuda":
                    torch.cuda.empty_cache()


def bench_kernels(tiny: bool, device: torch.device) -> list[dict]:
    """Kernel rows (kind="kernel": name, ms, ref_ms, speedup, gbps, copy_gbps, frac_of_copy, launches per view,
    bytes) from `bsim_fast.tools.kernel_bench`: CutMix + normalise, each view's photometric policy, and the whole
    two-view path against their PyTorch references and a device copy. Without CUDA: one skipped row (the
    kernels are tested, and their launches counted, under TRITON_INTERPRET=1 by the test suite)."""
    base = {"kind": "kernel", "name": "cutmix_normalize"}
    if device.type != "cuda":
        return [{**base, "skipped": "the Triton kernels need CUDA (tested on CPU under TRITON_INTERPRET=1)"}]
    try:
        from .kernel_bench import bench_kernels as kernel_rows
    except ImportError as e:
        return [{**base, "skipped": f"kernel benchmark unavailable ({e})"}]
    return kernel_rows(tiny, device, sweep=False)


# ------------------------------------------------------------------------------------------------- main
STAGES = ["kernel", "loader", "model", "end_to_end"]


def build_parser() -> cli.ArgumentParser:
    """The benchmark's options (gpu_check checks the ones it passes on before any work)."""
    cuda = torch.cuda.is_available()
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", default=not cuda, help="small sizes (default without a GPU)")
    p.add_argument(
        "--only",
        nargs="*",
        default=STAGES,
        choices=STAGES + ["cutmix"],
        help="stages to run (cutmix: old name of kernel)",
    )
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--ffcv", default="data_out/cifar10_mini_train.beton", help=".beton for the loader runs")
    p.add_argument("--dali", default="data_out/cifar10_mini_train_dali", help="DALI shard folder")
    p.add_argument("--folder", default="builtin", help="ImageFolder tree for the torch DataLoader baseline")
    p.add_argument("--size", type=int, default=None, help="loader resolution (default 224 on GPU, 32 tiny)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="timed steps / batches per row")
    p.add_argument("--no-compile", action="store_true", help="model-only: eager runs only")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--deadline", type=float, default=None, help="Unix time: rows that would end later are skipped")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--targets-md", action="store_true", help="print the targets table (docs/BENCHMARKS.md) and exit")
    return p


def drop_missing_datasets(bench: Bench) -> None:
    """A loader whose package is not installed, or whose dataset path does not exist, is a skipped loader and
    end-to-end row, said once, not an error."""
    s = bench.s
    for kind, path in list(bench.paths.items()):
        if kind in PACKAGES and not harness.installed(PACKAGES[kind]):
            why = f"{kind} not installed ({PACKAGES[kind]})"
        elif path != "builtin" and not Path(path).exists():
            why = f"no dataset at {path}"
        else:
            continue
        for row_kind in ("loader", "end_to_end"):
            row = {"kind": row_kind, "loader": kind, "size": s.size, "batch": s.batch, "workers": s.workers}
            bench.add({**row, "skipped": why})
        del bench.paths[kind]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.targets_md:
        print(targets_markdown())
        return 0
    only = {"kernel" if s == "cutmix" else s for s in args.only}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(args, device)
    env = harness.environment(device)
    paths = {"ffcv": args.ffcv, "dali": args.dali, "torch": args.folder}
    bench = Bench(settings, paths, Path(args.out), harness.Budget(args.deadline), env)
    print(f"bench on {env['device']} ({'tiny' if settings.tiny else 'full'} sizes)", flush=True)
    drop_missing_datasets(bench)
    if "kernel" in only:
        bench.kernels()
    if "loader" in only:
        bench.loaders()
    if "end_to_end" in only and bench.paths:
        bench.end_to_end()
    if "model" in only:
        bench.models()
    bench.save()
    try:
        plot(bench.rows, Path(args.out) / "bench.png", env)
    except ImportError as e:  # matplotlib is optional for the numbers
        print(f"bench.png not written: {e}")
    print(table(bench.rows))
    print(json.dumps(bench.report(), default=str))
    return 1 if any("error" in r for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
