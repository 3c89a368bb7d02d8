"""Benchmarks and static checks of the Triton kernels: each against its PyTorch reference and a plain device
copy of as many bytes, the launches and device bytes of the whole view path, and the PTX compiled for sm_90.

    python -m bsim_fast.tools.kernel_bench [--tiny] [--sweep] [--json PATH]

On a GPU: N=256 at 224² in bf16 (``--tiny``: 16 at 32²), timed with CUDA events, L2 flushed before every run.
Without one it switches itself to Triton's interpreter (tiny sizes; the times are then meaningless, the
counts are exact). `bench_kernels` returns one row per kernel and configuration, `kind="kernel"`.

Counting (`count_launches`): a TorchDispatchMode sees every aten op (allocations and views launch nothing,
every other op counts as a launch), a hook on Triton's launcher counts kernel launches, and under the
interpreter every load and store of a kernel is recorded, so ``bytes`` is the number of distinct device bytes
each launch reads plus writes (what DRAM must move at best; a re-read that hits L2, such as the blur's halo,
counts once).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    import torch as _torch

    if not _torch.cuda.is_available():
        # Before any kernel module is imported: @triton.jit reads the flag when it decorates a kernel.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("BSIM_FAST_TRITON", "1")

import contextlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bsim_fast import cli  # noqa: E402
from bsim_fast.tools.counting import count_launches  # noqa: E402
from bsim_fast.tools.counting import interpreting as _interpreting  # noqa: E402

__all__ = ["bench_kernels", "TARGET_MS"]

TARGET_MS = 2.0  # augmentation + CutMix + normalise of a 256 x 224² two-view batch on an H100
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

# ---- timing ----------------------------------------------------------------------------------------------


def _time_ms(fn, iters: int, device: torch.device) -> float:
    """Median time of ``fn`` in ms: CUDA events with L2 flushed before every run (the way a fresh batch
    arrives); wall time under the interpreter."""
    fn()  # warm-up: compilation, allocator
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # larger than any L2
        for _ in range(iters):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def _forced_triton():
    """The dispatchers' Triton path for CPU tensors (the interpreter) while timing/counting."""
    saved = os.environ.get("BSIM_FAST_TRITON")
    os.environ["BSIM_FAST_TRITON"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("BSIM_FAST_TRITON", None)
        else:
            os.environ["BSIM_FAST_TRITON"] = saved


@contextlib.contextmanager
def _reference_path():
    saved = os.environ.pop("BSIM_FAST_TRITON", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["BSIM_FAST_TRITON"] = saved


def bench_kernels(tiny: bool, device: torch.device, sweep: bool = False) -> list[dict]:
    """One row per kernel (and per (BLOCK, num_warps) with ``sweep``), ``kind="kernel"``: ``ms`` (the
    dispatching call), ``ref_ms`` (the PyTorch reference), ``speedup``, ``gbps`` and ``copy_gbps`` over
    ``min_bytes`` (the uint8 input read once and every output written once), ``frac_of_copy``, and per view
    ``launches`` and ``bytes`` (measured; bytes exact under the interpreter only), against ``budget_launches``
    and ``budget_bytes``. Needs CUDA, or TRITON_INTERPRET=1 set before the kernels were imported."""
    from bsim_fast import augment, mix
    from bsim_fast.config import Config

    device = torch.device(device)
    if device.type != "cuda" and not _interpreting():
        print("  kernels: no GPU and TRITON_INTERPRET unset; run `python -m bsim_fast.tools.kernel_bench --tiny`")
        return []
    gpu = device.type == "cuda"
    n, size = (16, 32) if tiny else (256, 224)
    if not gpu:
        n, size = 4, 32  # the interpreter runs every program in Python
    iters = (50 if not tiny else 20) if gpu else 1
    dtype = torch.bfloat16
    cfg = Config()  # BYOL's view policies (blur 1.0 / 0.1, solarize 0.0 / 0.2) and statistics
    cfg.data.image_size, cfg.method.mode = size, "bsim"
    policies = augment.policy_for(cfg)
    gen = torch.Generator(device="cpu").manual_seed(0)
    pair = torch.randint(0, 256, (n, 2, size, size, 3), dtype=torch.uint8, generator=gen).to(device)
    views = pair[:, 0].contiguous()
    partner = mix.derangement(n, generator=gen)
    boxes, lam = mix.sample_boxes(n, size, size, 1.0, generator=gen)
    partner_d, boxes_d = mix.to_device([partner, boxes], device)
    elems = n * size * size * 3
    esize = torch.empty((), dtype=dtype).element_size()
    info = dict(
        kind="kernel",
        device=torch.cuda.get_device_name(device) if gpu else "cpu (triton interpreter)",
        n=n,
        size=size,
        dtype=str(dtype).replace("torch.", ""),
        measured_on_gpu=gpu,
    )

    src = torch.empty(elems * (1 + 2 * esize) // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src), iters, device)
    copy_gbps = 2 * src.numel() / copy_ms / 1e6

    def photo_gen():
        return torch.Generator(device=device).manual_seed(1)

    def row(name, kernel_fn, reference_fn, min_bytes, count_fn=None, per=1, budget=None, **extra):
        with _forced_triton():
            ms = _time_ms(kernel_fn, iters, device)
            counts = count_launches(count_fn or kernel_fn)
        with _reference_path():
            ref_ms = _time_ms(reference_fn, iters if gpu else 1, device) if reference_fn else float("nan")
        r = dict(
            info,
            name=name,
            ms=ms,
            ref_ms=ref_ms,
            speedup=ref_ms / ms,
            min_bytes=min_bytes // per,
            gbps=min_bytes / ms / 1e6,
            copy_gbps=copy_gbps,
            frac_of_copy=min_bytes / ms / 1e6 / copy_gbps,
            launches=counts["launches"] / per,
            triton_launches=len(counts["triton"]) / per,
            aten_ops=counts["aten"],
            bytes=counts["bytes"] / per,
            unique_bytes=counts["unique_bytes"] / per,
            bytes_exact=counts["bytes_exact"],
            **extra,
        )
        if budget:
            r.update(budget_launches=budget[0], budget_bytes=budget[1] // per)
        return r

    rows = []
    mix_bytes = elems * (1 + 2 * esize)  # uint8 read once, plain and mixed written once
    stats = mix.check_cutmix_inputs(views, partner, boxes, MEAN, STD, dtype)  # host work, not counted
    rows.append(
        row(
            "cutmix_normalize",
            lambda: mix.cutmix_normalize(views, partner_d, boxes_d, MEAN, STD, dtype),
            lambda: mix.cutmix_normalize_reference(views, partner_d, boxes_d, MEAN, STD, dtype),
            mix_bytes,
            count_fn=lambda: mix._normalize_checked(views, partner_d, boxes_d, *stats, dtype),
            mean_box_fraction=float(1 - lam.mean()),
        )
    )
    for v, policy in enumerate(policies):
        rows.append(
            row(
                f"photometric_t{v + 1}",
                lambda p=policy, v=v: augment.photometric(pair[:, v], p, photo_gen()),
                lambda p=policy, v=v: augment.photometric_reference(pair[:, v], p, photo_gen()),
                2 * elems,
                blur_p=policy.blur_p,
                solarize_p=policy.solarize_p,
            )
        )

    def two_views():  # what every step asks of the device outside the model (loader hand-off + make_views)
        g = photo_gen()
        a = augment.photometric(pair[:, 0], policies[0], g)
        b = augment.photometric(pair[:, 1], policies[1], g)
        return mix.make_views(a, b, cfg, torch.Generator().manual_seed(2), dtype)

    def two_views_on_device():
        # make_views minus its host work (drawing and checking partner and boxes, then ONE host-to-device
        # copy per step, counted below as h2d_copies): the same calls on the device
        g = photo_gen()
        a = augment.photometric(pair[:, 0], policies[0], g)
        b = augment.photometric(pair[:, 1], policies[1], g)
        mix._normalize_checked(a, partner_d, boxes_d, *stats, dtype)
        mix._normalize_checked(b, partner_d, boxes_d, *stats, dtype)

    def two_views_reference():
        g = photo_gen()
        a = augment.photometric_reference(pair[:, 0], policies[0], g)
        b = augment.photometric_reference(pair[:, 1], policies[1], g)
        return mix.make_views(a, b, cfg, torch.Generator().manual_seed(2), dtype)

    step = row(
        "augment_cutmix_normalize_two_views",
        two_views,
        two_views_reference,
        2 * mix_bytes,
        count_fn=two_views_on_device,
        per=2,
        budget=(6, 3 * 2 * mix_bytes),
        h2d_copies_per_step=1,
        target_ms=TARGET_MS if (gpu and not tiny) else None,
    )
    rows.append(step)

    if sweep and gpu:
        from bsim_fast.kernels import cutmix
        from bsim_fast.kernels import photometric as ph

        saved = cutmix.BLOCK, cutmix.NUM_WARPS, ph.BLOCK_PIXELS, ph.NUM_WARPS
        try:
            for block in (2048, 4096, 8192, 16384):
                for warps in (4, 8, 16):
                    cutmix.BLOCK, cutmix.NUM_WARPS = block, warps
                    ms = _time_ms(
                        lambda: mix.cutmix_normalize(views, partner_d, boxes_d, MEAN, STD, dtype), iters, device
                    )
                    rows.append(
                        dict(
                            info,
                            name=f"cutmix_normalize[BLOCK={block},warps={warps}]",
                            ms=ms,
                            gbps=mix_bytes / ms / 1e6,
                            frac_of_copy=mix_bytes / ms / 1e6 / copy_gbps,
                        )
                    )
            cutmix.BLOCK, cutmix.NUM_WARPS = saved[:2]
            for block in (256, 512, 1024, 2048):
                for warps in (2, 4, 8):
                    ph.BLOCK_PIXELS, ph.NUM_WARPS = block, warps
                    ms = _time_ms(lambda: augment.photometric(pair[:, 1], policies[1], photo_gen()), iters, device)
                    rows.append(
                        dict(
                            info,
                            name=f"photometric_t2[BLOCK_PIXELS={block},warps={warps}]",
                            ms=ms,
                            gbps=2 * elems / ms / 1e6,
                        )
                    )
        finally:
            cutmix.BLOCK, cutmix.NUM_WARPS, ph.BLOCK_PIXELS, ph.NUM_WARPS = saved
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        f"{'kernel':<44}{'ms':>9}{'ref ms':>9}{'x ref':>7}{'GB/s':>8}{'% copy':>7}{'launch/view':>12}{'bytes/view':>12}"
    ]
    for r in rows:

        def f(key, fmt, scale=1.0, r=r):
            v = r.get(key)
            return format(scale * v, fmt) if isinstance(v, (int, float)) and v == v else "-"

        lines.append(
            f"{r['name']:<44}{f('ms', '9.3f')}{f('ref_ms', '9.3f')}{f('speedup', '7.1f')}"
            f"{f('gbps', '8.0f')}{f('frac_of_copy', '7.0%')}{f('launches', '12.1f')}{f('bytes', '12.0f')}"
        )
    return "\n".join(lines)


def _main(argv=None) -> int:
    import json

    parser = cli.ArgumentParser(description="Benchmark the Triton kernels against their references.")
    parser.add_argument("--tiny", action="store_true", help="16 x 32² instead of 256 x 224² (on a GPU)")
    parser.add_argument("--sweep", action="store_true", help="also time other (BLOCK, num_warps) choices")
    parser.add_argument("--ptx", action="store_true", help="also compile for sm_90 and report the PTX")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = bench_kernels(args.tiny, device, sweep=args.sweep)
    result = {"rows": rows}
    if args.ptx:
        if _interpreting():  # the compiler needs the kernels decorated without the interpreter
            import subprocess

            env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BSIM_FAST_TRITON")}
            code = "import json; from bsim_fast.tools.ptx import ptx_report; print(json.dumps(ptx_report()))"
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            result["ptx_sm90"] = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            from bsim_fast.tools.ptx import ptx_report

            result["ptx_sm90"] = ptx_report()
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
