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
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bsim_fast import cli
from bsim_fast.atomic import write_text_atomic
from bsim_fast.config import MODES, Config, load_config
from bsim_fast.host import available_cores
from bsim_fast.methods import METHODS
from bsim_fast.provenance import environment
from bsim_fast.recipes import recipe_path
from bsim_fast.step import TrainStep

# --------------------------------------------------------------------------------------------- targets
# One H100, full sizes. `metric` names a function of the rows in METRICS; `op` is how the measured value
# must compare with `value`. Sources: the project's product targets (BYOL-BSIM 2,200 images/s follows from
# ~116 ms per ResNet-50 step at batch 256) and the view-pipeline budget (docs/BENCHMARKS.md, kernels).
TARGETS = [
    dict(
        id="cutmix_speedup",
        what="CutMix + normalise kernel vs its PyTorch reference, N=256, 224², bf16",
        metric="cutmix_speedup",
        op=">=",
        value=3.0,
        unit="×",
    ),
    dict(
        id="cutmix_bandwidth",
        what="CutMix + normalise kernel, fraction of device-copy bandwidth",
        metric="cutmix_bandwidth",
        op=">=",
        value=0.70,
        unit="of copy",
    ),
    dict(
        id="view_pipeline_ms",
        what="photometric + CutMix + normalise of a 256 × 224² two-view batch",
        metric="view_pipeline_ms",
        op="<=",
        value=2.0,
        unit="ms",
    ),
    dict(
        id="view_pipeline_launches",
        what="kernel launches of that path, per view (outside the model)",
        metric="view_pipeline_launches",
        op="<=",
        value=6,
        unit="launches",
    ),
    dict(
        id="dali_loader",
        what="DALI loader-only, two-view images/s at 224 (recipe policy)",
        metric="loader_dali",
        op=">=",
        value=12000,
        unit="images/s",
    ),
    dict(
        id="ffcv_loader",
        what="FFCV loader-only (one decode, two views), images/s at 224, 16 cores",
        metric="loader_ffcv",
        op=">=",
        value=3300,
        unit="images/s",
    ),
    dict(
        id="byol_bsim_model",
        what="model-only BYOL-BSIM ResNet-50 224, batch 256, compiled, bf16",
        metric="byol_bsim_model",
        op=">=",
        value=2200,
        unit="images/s",
    ),
    dict(
        id="bsim_overhead",
        what="BSIM step time over SIM, BYOL ResNet-50 224 compiled",
        metric="bsim_overhead",
        op="<=",
        value=0.03,
        unit="fraction",
    ),
    dict(
        id="e2e_dali",
        what="end-to-end DALI / model-only (BYOL-BSIM ResNet-50 224)",
        metric="e2e_ratio_dali",
        op=">=",
        value=0.95,
        unit="× model-only",
    ),
    dict(
        id="e2e_ffcv",
        what="end-to-end FFCV / model-only (BYOL-BSIM ResNet-50 224)",
        metric="e2e_ratio_ffcv",
        op=">=",
        value=0.90,
        unit="× model-only",
    ),
    dict(
        id="e2e_vs_torchvision",
        what="best end-to-end (DALI or FFCV) / torchvision DataLoader end-to-end",
        metric="e2e_vs_torch",
        op=">=",
        value=8.0,
        unit="×",
    ),
]
REPO = Path(__file__).resolve().parents[2]  # the repository root
FULL_SIZE = 224  # the targets are for this resolution and ResNet-50
VIEW_PATH = "augment_cutmix_normalize_two_views"  # bsim_fast.tools.kernel_bench's row for the whole view path


def _one(rows, **match) -> dict | None:
    """The measured row (not skipped) whose fields equal `match`, or None."""
    for r in rows:
        if "skipped" not in r and "error" not in r and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _field(row, key):
    return None if row is None else row.get(key)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _bsim_overhead(rows):
    sim = _one(rows, kind="model", method="byol", mode="sim", arch="resnet50", size=FULL_SIZE, compile=True)
    bsim = _one(rows, kind="model", method="byol", mode="bsim", arch="resnet50", size=FULL_SIZE, compile=True)
    if sim is None or bsim is None:
        return None
    return sim["images_s"] / bsim["images_s"] - 1.0  # extra step time of BSIM, as a fraction of SIM's


def _e2e_ratio(rows, loader):
    return _field(_one(rows, kind="end_to_end", loader=loader, size=FULL_SIZE), "ratio_to_model")


def _e2e_vs_torch(rows):
    best = [_field(_one(rows, kind="end_to_end", loader=k, size=FULL_SIZE), "images_s") for k in ("dali", "ffcv")]
    best = max((b for b in best if b is not None), default=None)
    return _ratio(best, _field(_one(rows, kind="end_to_end", loader="torch", size=FULL_SIZE), "images_s"))


METRICS: dict[str, Callable[[list[dict]], float | None]] = {
    "cutmix_speedup": lambda rows: _field(_one(rows, kind="kernel", name="cutmix_normalize"), "speedup"),
    "cutmix_bandwidth": lambda rows: _field(_one(rows, kind="kernel", name="cutmix_normalize"), "frac_of_copy"),
    "view_pipeline_ms": lambda rows: _field(_one(rows, kind="kernel", name=VIEW_PATH), "ms"),
    "view_pipeline_launches": lambda rows: _field(_one(rows, kind="kernel", name=VIEW_PATH), "launches"),
    "loader_dali": lambda rows: _field(_one(rows, kind="loader", loader="dali", size=FULL_SIZE), "images_s"),
    "loader_ffcv": lambda rows: _field(_one(rows, kind="loader", loader="ffcv", size=FULL_SIZE), "images_s"),
    "byol_bsim_model": lambda rows: _field(
        _one(rows, kind="model", method="byol", mode="bsim", arch="resnet50", size=FULL_SIZE, compile=True), "images_s"
    ),
    "bsim_overhead": _bsim_overhead,
    "e2e_ratio_dali": lambda rows: _e2e_ratio(rows, "dali"),
    "e2e_ratio_ffcv": lambda rows: _e2e_ratio(rows, "ffcv"),
    "e2e_vs_torch": _e2e_vs_torch,
}


def target_text(t: dict) -> str:
    value = f"{t['value']:,}" if isinstance(t["value"], int) or t["value"] >= 100 else f"{t['value']:g}"
    sep = "" if t["unit"].startswith("×") else " "
    return f"{'≥' if t['op'] == '>=' else '≤'} {value}{sep}{t['unit']}"


def evaluate(rows: list[dict], applicable: bool) -> list[dict]:
    """Each target with its measured value and `pass` / `miss` / `not measured`. On a CPU or at tiny sizes
    the targets do not apply (`n/a`): they are for one H100 at full sizes."""
    out = []
    for t in TARGETS:
        value = METRICS[t["metric"]](rows)
        if value is None:
            status = "not measured"
        elif not applicable:
            status = "n/a"
        else:
            status = "pass" if (value >= t["value"] if t["op"] == ">=" else value <= t["value"]) else "miss"
        out.append({**t, "target": target_text(t), "measured": value, "status": status})
    return out


def targets_markdown() -> str:
    """The targets table of docs/BENCHMARKS.md (a test checks the document holds exactly this)."""
    lines = ["| id | what (one H100) | target |", "|---|---|---|"]
    lines += [f"| `{t['id']}` | {t['what']} | {target_text(t)} |" for t in TARGETS]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Budget:
    """Rows that would end after the deadline are skipped (reported, not run). `None`: no deadline."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def allows(self, seconds: float) -> bool:
        return self.deadline is None or time.time() + seconds <= self.deadline


def timed(fn: Callable[[], int], device: torch.device, warmup: int, iters: int) -> tuple:
    """(images/s, seconds timed) of `fn` (which returns the images it handled), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0, images = time.perf_counter(), 0
    for _ in range(iters):
        images += fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    return images / seconds, seconds


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem_gb(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset; None (n/a) on a CPU, where it is not tracked."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


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


def step_images(step: TrainStep, a_u8: torch.Tensor, b_u8: torch.Tensor) -> int:
    """One training step on the views; the source images it took."""
    step(a_u8, b_u8)
    return a_u8.shape[0]


def synthetic_views(batch: int, size: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g).to(device)
    b = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g).to(device)
    return a, b


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


# ------------------------------------------------------------------------------------------------ rows
class Bench:
    """Runs rows in order and keeps them; every row is written to `<out>/bench.json` as soon as it exists."""

    def __init__(self, settings: Settings, paths: dict[str, str], out: Path, budget: Budget, env: dict):
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
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "bench.json", json.dumps(self.report(), indent=1))

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
            rows = [{"kind": "kernel", "name": "kernels", "error": f"{type(e).__name__}: {first_line(e)}"}]
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
            self.add({**base, "error": f"{type(e).__name__}: {first_line(e)}"})
        return None

    def loaders(self) -> None:
        for kind, path in self.paths.items():
            base = {
                "kind": "loader",
                "loader": kind,
                "size": self.s.size,
                "batch": self.s.batch,
                "workers": self.s.workers,
                "policy": policy_name(self.s.size),
            }
            if not self.budget.allows(20):
                self.add({**base, "skipped": "time budget"})
                continue
            loader = self.build_loader(kind, self.loader_cfg(kind, path), base)
            if loader is None:
                continue
            try:
                reset_peak(self.s.device)
                ips, seconds, n = loader_images_s(loader, self.s.warmup, self.s.loader_batches, self.s.device)
                self.add(
                    {
                        **base,
                        "images_s": ips,
                        "batches": n,
                        "seconds": seconds,
                        "peak_mem_gb": peak_mem_gb(self.s.device),
                    }
                )
            except Exception as e:  # noqa: BLE001
                self.add({**base, "error": f"{type(e).__name__}: {first_line(e)}"})
            finally:
                loader = None

    # ---- model-only and end-to-end
    def model_row(self, method, mode, arch, size, compile_on, step: TrainStep | None = None) -> TrainStep | None:
        batch = self.s.batch_for(arch)
        base = {
            "kind": "model",
            "method": method,
            "mode": mode,
            "arch": arch,
            "size": size,
            "batch": batch,
            "compile": compile_on,
        }
        if _one(self.rows, **base) is not None:
            return step
        if step is None and not self.budget.allows(self.s.cost_s(arch, compile_on)):
            self.add({**base, "skipped": "time budget"})
            return None
        try:
            if step is None:
                cfg = recipe_cfg(method, mode, arch, size, batch, compile_on, self.s.precision)
                step = train_step(cfg, self.s.device)
            a, b = synthetic_views(batch, size, self.s.device)
            reset_peak(self.s.device)
            ips, seconds = timed(lambda: step_images(step, a, b), self.s.device, self.s.warmup, self.s.iters)
            self.add(
                {
                    **base,
                    "images_s": ips,
                    "seconds": seconds,
                    "steps": self.s.iters,
                    "peak_mem_gb": peak_mem_gb(self.s.device),
                }
            )
            return step
        except Exception as e:  # noqa: BLE001
            self.add({**base, "error": f"{type(e).__name__}: {first_line(e)}"})
            return None

    def end_to_end(self) -> None:
        """BYOL-BSIM through each loader, with its ratio to model-only measured on the same training step (same
        compiled graphs, same warm-up, same number of steps), model-only timed before and after the loaders
        and the faster of the two kept, so drift cannot make a loader look faster than the model."""
        s = self.s
        compile_on = True in s.compiles
        arch, size = s.e2e_arch, s.size
        base = {
            "kind": "end_to_end",
            "size": size,
            "batch": s.batch,
            "workers": s.workers,
            "arch": arch,
            "compile": compile_on,
            "policy": policy_name(size),
        }
        if not self.budget.allows(s.cost_s(arch, compile_on) + 15 * len(self.paths)):
            for kind in self.paths:
                self.add({**base, "loader": kind, "skipped": "time budget"})
            return
        cfg = recipe_cfg("byol", "bsim", arch, size, s.batch, compile_on, s.precision)
        try:
            step = train_step(cfg, s.device)
        except Exception as e:  # noqa: BLE001
            for kind in self.paths:
                self.add({**base, "loader": kind, "error": f"TrainStep: {type(e).__name__}: {first_line(e)}"})
            return
        a, b = synthetic_views(s.batch, size, s.device)
        model_ips = [timed(lambda: step_images(step, a, b), s.device, s.warmup, s.loader_batches)[0]]
        results = []
        for kind, path in self.paths.items():
            row = {**base, "loader": kind}
            if not self.budget.allows(15):
                results.append({**row, "skipped": "time budget"})
                continue
            loader = self.build_loader(kind, self.loader_cfg(kind, path, compile_on), row)
            if loader is None:
                continue
            try:
                reset_peak(s.device)
                ips, seconds, n = loader_images_s(loader, s.warmup, s.loader_batches, s.device, step)
                results.append(
                    {**row, "images_s": ips, "batches": n, "seconds": seconds, "peak_mem_gb": peak_mem_gb(s.device)}
                )
            except Exception as e:  # noqa: BLE001
                results.append({**row, "error": f"{type(e).__name__}: {first_line(e)}"})
            loader = None
        reset_peak(s.device)
        model_ips.append(timed(lambda: step_images(step, a, b), s.device, s.warmup, s.loader_batches)[0])
        model = max(model_ips)
        # The same measurement is the model-only row of this configuration (no second compilation).
        self.add(
            {
                "kind": "model",
                "method": "byol",
                "mode": "bsim",
                "arch": arch,
                "size": size,
                "batch": s.batch,
                "compile": compile_on,
                "images_s": model,
                "steps": s.loader_batches,
                "peak_mem_gb": peak_mem_gb(s.device),
                "note": "measured with the end-to-end rows",
            }
        )
        for r in results:
            if "images_s" in r:
                r["model_images_s"] = model
                r["ratio_to_model"] = r["images_s"] / model
                # A loader cannot make the step faster: a ratio above 1 is timing noise (tiny runs, a busy
                # CPU shared by workers and the model), so it is reported as not meaningful.
                r["ratio_meaningful"] = r["ratio_to_model"] <= 1.02 and not s.tiny
            self.add(r)
        step = None
        if compile_on:
            torch._dynamo.reset()

    def models(self) -> None:
        """Model-only rows, most important first: the targets' rows, then every method eager, then the rest
        compiled (each compiled ResNet-50 costs about a minute of compilation)."""
        s = self.s
        order = []
        for compile_on in sorted(s.compiles, reverse=True):  # BYOL compiled first: the targets read it
            for arch, size in s.archs[:1]:
                for mode in ("bsim", "sim"):
                    if "byol" in s.methods and mode in s.modes:
                        order.append(("byol", mode, arch, size, compile_on))
        for arch, size in s.archs:
            for method in s.methods:
                for mode in s.modes:
                    order.append((method, mode, arch, size, False))
        if True in s.compiles:
            for arch, size in s.archs:
                for method in s.methods:
                    for mode in s.modes:
                        order.append((method, mode, arch, size, True))
        for method, mode, arch, size, compile_on in order:
            if compile_on not in s.compiles:
                continue
            self.model_row(method, mode, arch, size, compile_on)
            if compile_on:  # drop the compiled graphs (and the parameters they hold) before the next model
                torch._dynamo.reset()
                if s.device.type == "cuda":
                    torch.cuda.empty_cache()


def loader_images_s(loader, warmup: int, batches: int, device, step: TrainStep | None = None):
    """(two-view images/s, seconds, batches) over `batches` batches after `warmup`, across epochs as needed;
    with `step`, each batch also goes through a training step (end-to-end)."""
    it = _batches(loader, warmup + batches)
    for _ in range(warmup):
        a_u8, b_u8 = next(it)
        if step is not None:
            step(a_u8, b_u8)
    _sync(device)
    t0, images = time.perf_counter(), 0
    for a_u8, b_u8 in it:
        images += step_images(step, a_u8, b_u8) if step is not None else a_u8.shape[0]
    _sync(device)
    seconds = time.perf_counter() - t0
    return images / seconds, seconds, batches


def _batches(loader, n: int) -> Iterator:
    epoch = 0
    while n > 0:
        got = 0
        for a_u8, b_u8, _ in loader.epoch(epoch):
            got += 1
            yield a_u8, b_u8
            n -= 1
            if n == 0:
                return
        if got == 0:
            raise RuntimeError("the loader yields no batch: fewer images than one batch")
        epoch += 1


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


# ---------------------------------------------------------------------------------------------- output
def policy_name(size: int) -> str:
    return "configs/small (no blur)" if size <= 64 else "ImageNet recipe (blur 1.0/0.1, solarize 0/0.2)"


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def describe(r: dict) -> str:
    if r["kind"] == "kernel":
        return f"{r['name']}" + (f" N={r['n']} {r['size']}² {r['dtype']}" if "n" in r else "")
    if r["kind"] == "model":
        return (
            f"{r['method']}/{r['mode']} {r['arch']}@{r['size']} b{r['batch']} {'compiled' if r['compile'] else 'eager'}"
        )
    return f"{r['loader']}@{r['size']} b{r['batch']} w{r['workers']}"


def fmt_gb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def table(rows: list[dict]) -> str:
    lines = [f"{'kind':<11} {'what':<44} {'images/s':>12} {'peak GB':>8}  note"]
    for r in rows:
        what = describe(r)
        if "skipped" in r or "error" in r:
            lines.append(
                f"{r['kind']:<11} {what:<44} {'-':>12} {'-':>8}  "
                f"{'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}"
            )
            continue
        if r["kind"] == "kernel":
            lines.append(
                f"{'kernel':<11} {what:<44} {r['ms']:>10.4f}ms {'':>8}  ref {r['ref_ms']:.4f} ms, "
                f"{r['speedup']:.2f}x, {r['gbps']:.0f} GB/s = {100 * r['frac_of_copy']:.0f}% of copy"
                + (f", {r['launches']:g} launches/view" if r.get("launches") is not None else "")
            )
            continue
        note = ""
        if "ratio_to_model" in r:
            note = f"{r['ratio_to_model']:.2f}x model-only"
            if not r["ratio_meaningful"]:
                note += " (not meaningful: timing noise / tiny run)"
        lines.append(f"{r['kind']:<11} {what:<44} {r['images_s']:>12,.0f} {fmt_gb(r.get('peak_mem_gb')):>8}  {note}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, env: dict) -> None:
    """One panel per kind of row, each on its own (log) scale with the value printed at every bar, so no
    kind hides another; device, commit and versions in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    kernels = [r for r in rows if r["kind"] == "kernel" and "ms" in r]
    if kernels:
        bars = []
        for r in kernels:
            bars.append((f"{r['name']} (Triton)", r["ms"], "tab:purple"))
            if r.get("ref_ms") and r["ref_ms"] == r["ref_ms"]:  # NaN: no reference for this row
                bars.append((f"{r['name']} (PyTorch ref.)", r["ref_ms"], "tab:gray"))
        panels.append(("kernels: ms per call (lower is better)", bars, "{:.3g} ms"))
    for kind, title, colour in (
        ("loader", "loader-only: two-view images/s", "tab:blue"),
        ("model", "model-only: images/s", "tab:orange"),
        ("end_to_end", "end-to-end: images/s (ratio to model-only)", "tab:green"),
    ):
        bars = []
        for r in rows:
            if r["kind"] != kind or "images_s" not in r:
                continue
            label = describe(r)
            if "ratio_to_model" in r:
                label += f"  ({r['ratio_to_model']:.2f}x{'' if r['ratio_meaningful'] else ', n/m'})"
            bars.append((label, r["images_s"], colour))
        if bars:
            panels.append((title, bars, "{:,.0f}"))
    if not panels:
        return
    heights = [0.28 * len(b) + 0.9 for _, b, _ in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(10, sum(heights) + 0.8), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for ax, (title, bars, fmt) in zip(axes[:, 0], panels):
        values = [v for _, v, _ in bars]
        ax.barh([n for n, _, _ in bars], values, color=[c for *_, c in bars])
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 2, max(values) * 6)  # room for the printed values
        for i, v in enumerate(values):
            ax.text(v * 1.05, i, fmt.format(v) if v >= 100 else f"{v:.3g}", va="center", fontsize=7)
        ax.set_title(title, fontsize=9, loc="left")
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    fig.suptitle(
        f"bsim_fast bench · {env.get('device')} · commit {env.get('commit') or '?'} · "
        f"torch {env.get('torch')} · {env.get('time')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = build_parser()
    args = p.parse_args(argv)
    if args.targets_md:
        print(targets_markdown())
        return 0
    only = {"kernel" if s == "cutmix" else s for s in args.only}
    device = torch.device("cuda" if cuda else "cpu")
    settings = Settings(args, device)
    env = environment(device)
    paths = {k: v for k, v in (("ffcv", args.ffcv), ("dali", args.dali), ("torch", args.folder))}
    bench = Bench(settings, paths, Path(args.out), Budget(args.deadline), env)
    print(f"bench on {env['device']} ({'tiny' if settings.tiny else 'full'} sizes)", flush=True)
    for kind, path in list(paths.items()):
        if path != "builtin" and not Path(path).exists():
            for row_kind in ("loader", "end_to_end"):
                bench.add(
                    {
                        "kind": row_kind,
                        "loader": kind,
                        "size": settings.size,
                        "batch": settings.batch,
                        "workers": settings.workers,
                        "skipped": f"no dataset at {path}",
                    }
                )
            del paths[kind]
    if "kernel" in only:
        bench.kernels()
    if "loader" in only:
        bench.loaders()
    if "end_to_end" in only and paths:
        bench.end_to_end()
    if "model" in only:
        bench.models()
    bench.save()
    try:
        plot(bench.rows, Path(args.out) / "bench.png", env)
    except ImportError as e:  # matplotlib is optional for the numbers
        print(f"bench.png not written: {e}")
    print(table(bench.rows))
    print(json.dumps(bench.report()))
    return 1 if any("error" in r for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
