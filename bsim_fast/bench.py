"""Throughput benchmark: loader-only, model-only and end-to-end two-view images/s, and the CutMix kernel.

    python -m bsim_fast.bench                      # full sizes on a GPU (ResNet-50 @ 224, ResNet-18 @ 32)
    python -m bsim_fast.bench --tiny               # CPU smoke run (default without a GPU)
    python -m bsim_fast.bench --only model --methods byol --modes sim bsim

Prints a table and writes `<out>/bench.json` and `<out>/bench.png`. "images/s" counts source images per second;
each carries two views (and, in BSIM, two mixed views).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from .config import Config, load_config
from .optim import build_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], int], device: torch.device, warmup: int, iters: int) -> float:
    """Images per second of `fn` (which returns the images it handled), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0, images = time.perf_counter(), 0
    for _ in range(iters):
        images += fn()
    _sync(device)
    return images / (time.perf_counter() - t0)


def recipe_cfg(method: str, mode: str, arch: str, size: int, batch: int, compile_on: bool, precision: str) -> Config:
    recipe = method if mode == "sim" else f"{method}_{mode}"
    small = size <= 64
    cfg = load_config(f"configs/{'small/' if small else ''}{recipe}.yaml",
                      [f"model.arch={arch}", f"data.image_size={size}", f"data.batch_size={batch}",
                       f"train.compile={'on' if compile_on else 'off'}", f"train.precision={precision}"])
    if cfg.model.queue_size < 4 * batch:
        cfg.model.queue_size = 4 * batch
    return cfg


class Step:
    """One optimiser step of the real training code on a batch of uint8 views already on the device."""

    def __init__(self, cfg: Config, device: torch.device):
        from .methods import build_method, compile_networks
        from .train import DTYPES
        self.cfg, self.device = cfg, device
        self.method = build_method(cfg).to(device).to(memory_format=torch.channels_last)
        if cfg.train.compile == "on":
            compile_networks(self.method)
        self.opt = build_optimizer(self.method, cfg, device)
        self.amp = DTYPES[cfg.train.precision]
        self.use_amp = device.type == "cuda" and self.amp != torch.float32
        self.view_dtype = self.amp if device.type == "cuda" else torch.float32
        self.gen = torch.Generator(device="cpu").manual_seed(0)   # as the trainer: partner/boxes on the host
        self.step = 0

    def __call__(self, a_u8: torch.Tensor, b_u8: torch.Tensor) -> int:
        from .mix import make_views
        views = make_views(a_u8, b_u8, self.cfg, self.gen, self.view_dtype)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.use_amp):
            loss = self.method(**views)["loss"]
        loss.float().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.method.momentum_update(min(1.0, self.step / 1000))
        return a_u8.shape[0]


def synthetic_views(batch: int, size: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g).to(device)
    b = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g).to(device)
    return a, b


def peak_mem_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def bench_model(methods, modes, archs, compiles, batch_for, device, warmup, iters, precision) -> List[dict]:
    rows = []
    for arch, size in archs:
        batch = batch_for(arch)
        a, b = synthetic_views(batch, size, device)
        for method in methods:
            for mode in modes:
                for compile_on in compiles:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    step = Step(recipe_cfg(method, mode, arch, size, batch, compile_on, precision), device)
                    ips = timed(lambda: step(a, b), device, warmup, iters)
                    rows.append({"kind": "model", "method": method, "mode": mode, "arch": arch, "size": size,
                                 "batch": batch, "compile": compile_on, "images_s": ips, "peak_mem_gb": peak_mem_gb(device)})
                    print(f"  model {arch}@{size} {method}/{mode} compile={compile_on}: {ips:,.0f} images/s", flush=True)
                    step = None   # free this model before the next one is built
    return rows


def bench_loaders(paths: Dict[str, str], size: int, batch: int, workers: int, device, batches: int,
                  step_cfg: Config = None) -> List[dict]:
    """Loader-only (and, with `step_cfg`, end-to-end) two-view images/s for each loader kind."""
    from .loaders import build_train_loader
    rows = []
    for kind, path in paths.items():
        cfg = step_cfg or load_config("configs/small/byol_bsim.yaml")
        cfg.data.loader, cfg.data.train, cfg.data.image_size = kind, path, size
        cfg.data.batch_size, cfg.data.workers = batch, workers
        try:
            loader = build_train_loader(cfg, 0, 1, device)
        except Exception as e:  # a missing optional loader must not hide the others
            print(f"  {kind}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        n = min(batches, len(loader))
        step = Step(cfg, device) if step_cfg is not None else None

        def run_epoch():
            images = 0
            for i, (a_u8, b_u8, _) in enumerate(loader.epoch(0)):
                images += step(a_u8, b_u8) if step else a_u8.shape[0]
                if i + 1 >= n:
                    break
            return images

        run_epoch()   # warm-up: workers, JIT, allocator
        _sync(device)
        t0 = time.perf_counter()
        images = run_epoch()
        _sync(device)
        ips = images / (time.perf_counter() - t0)
        label = "end_to_end" if step else "loader"
        rows.append({"kind": label, "loader": kind, "size": size, "batch": batch, "workers": workers,
                     "images_s": ips, "batches": n})
        print(f"  {label} {kind}@{size}: {ips:,.0f} two-view images/s", flush=True)
    return rows


def bench_kernel(tiny: bool, device: torch.device) -> List[dict]:
    try:
        from .cutmix_triton import bench_cutmix
    except ImportError as e:
        print(f"  cutmix: skipped ({e})")
        return []
    if device.type != "cuda":
        print("  cutmix: the Triton kernel needs CUDA (tested on CPU under TRITON_INTERPRET=1); skipped")
        return []
    n, s = (16, 32) if tiny else (256, 224)
    result = bench_cutmix(n=n, h=s, w=s, dtype=torch.bfloat16)
    return [{"kind": "cutmix", **result}]


def table(rows: List[dict]) -> str:
    lines = [f"{'kind':<11} {'what':<42} {'images/s':>12} {'peak GB':>8}"]
    for r in rows:
        if r["kind"] == "cutmix":
            what = "; ".join(f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, float))
            lines.append(f"{'cutmix':<11} {what}")
            continue
        if r["kind"] == "model":
            what = f"{r['method']}/{r['mode']} {r['arch']}@{r['size']} b{r['batch']} {'compiled' if r['compile'] else 'eager'}"
        else:
            what = f"{r['loader']}@{r['size']} b{r['batch']} w{r['workers']}"
            if "ratio_to_model" in r:
                what += f" ({r['ratio_to_model']:.2f}x model-only)"
        lines.append(f"{r['kind']:<11} {what:<42} {r['images_s']:>12,.0f} {r.get('peak_mem_gb', 0):>8.2f}")
    return "\n".join(lines)


def plot(rows: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bars = [(r.get("loader") or f"{r['method']}/{r['mode']}{'+c' if r.get('compile') else ''} {r['arch']}", r["kind"], r["images_s"])
            for r in rows if "images_s" in r]
    if not bars:
        return
    colours = {"loader": "tab:blue", "model": "tab:orange", "end_to_end": "tab:green"}
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(bars) + 1.2))
    ax.barh([f"{k}: {n}" for n, k, _ in bars], [v for *_, v in bars], color=[colours[k] for _, k, _ in bars])
    ax.set_xlabel("two-view images / s")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpus": torch.get_num_threads(), "torch": torch.__version__, "commit": commit,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", default=not cuda, help="small sizes (default without a GPU)")
    p.add_argument("--only", nargs="*", default=["loader", "model", "end_to_end", "cutmix"],
                   choices=["loader", "model", "end_to_end", "cutmix"])
    p.add_argument("--methods", nargs="*", default=["byol", "simclr", "moco", "simsiam"])
    p.add_argument("--modes", nargs="*", default=["sim", "bsim", "wbsim"])
    p.add_argument("--ffcv", default="data_out/cifar10_mini_train.beton", help=".beton for the loader runs")
    p.add_argument("--dali", default="data_out/cifar10_mini_train_dali", help="DALI shard folder")
    p.add_argument("--folder", default="builtin", help="ImageFolder tree for the torch DataLoader baseline")
    p.add_argument("--size", type=int, default=None, help="loader resolution (default 224 on GPU, 32 tiny)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="model-only: eager runs only")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    tiny = args.tiny
    iters = args.iters or (3 if tiny else 30)
    size = args.size or (32 if tiny else 224)
    batch = args.batch or (16 if tiny else 256)
    workers = args.workers if args.workers is not None else (2 if tiny else 16)
    archs = [("resnet18", 32)] if tiny else [("resnet50", 224), ("resnet18", 32)]
    compiles = [False] if (tiny or args.no_compile) else [False, True]
    batch_for = (lambda arch: batch) if tiny else (lambda arch: 256 if arch == "resnet50" else 512)

    rows: List[dict] = []
    print(f"bench on {environment(device)['device']} ({'tiny' if tiny else 'full'} sizes)", flush=True)
    paths = {k: v for k, v in (("ffcv", args.ffcv), ("dali", args.dali), ("torch", args.folder))
             if v == "builtin" or Path(v).exists()}
    if "loader" in args.only:
        rows += bench_loaders(paths, size, batch, workers, device, iters * 4)
    if "model" in args.only:
        rows += bench_model(args.methods, args.modes, archs, compiles, batch_for, device, 2 if tiny else 10, iters,
                            args.precision)
    if "end_to_end" in args.only:
        arch = "resnet18" if size <= 64 else "resnet50"
        cfg = recipe_cfg("byol", "bsim", arch, size, batch, not (tiny or args.no_compile), args.precision)
        e2e = bench_loaders(paths, size, batch, workers, device, iters * 2, step_cfg=cfg)
        model = [r for r in rows if r["kind"] == "model" and r["method"] == "byol" and r["mode"] == "bsim"
                 and r["arch"] == arch and r["size"] == size]
        for r in e2e:
            if model:
                r["ratio_to_model"] = r["images_s"] / max(m["images_s"] for m in model)
        rows += e2e
    if "cutmix" in args.only:
        rows += bench_kernel(tiny, device)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(device), "rows": rows}
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    plot(rows, out / "bench.png")
    print(table(rows))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
