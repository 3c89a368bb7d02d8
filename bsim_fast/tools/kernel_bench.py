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
import itertools  # noqa: E402

import torch  # noqa: E402

from bsim_fast import cli  # noqa: E402
from bsim_fast.atomic import write_text_atomic  # noqa: E402
from bsim_fast.tools import harness  # noqa: E402
from bsim_fast.tools.counting import count_launches  # noqa: E402
from bsim_fast.tools.counting import interpreting as _interpreting  # noqa: E402

__all__ = ["bench_kernels", "TARGET_MS"]

TARGET_MS = 2.0  # augmentation + CutMix + normalise of a 256 x 224² two-view batch on an H100
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


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


class KernelCase:
    """The inputs of every kernel row (BYOL's two view policies, one seeded batch, its partner and boxes) and
    the plain device copy of as many bytes that the rows are compared with."""

    def __init__(self, tiny: bool, device: torch.device):
        from bsim_fast import augment, mix
        from bsim_fast.config import Config

        self.device, self.gpu = device, device.type == "cuda"
        self.n, self.size = (16, 32) if tiny else (256, 224)
        if not self.gpu:
            self.n, self.size = 4, 32  # the interpreter runs every program in Python
        self.iters = (50 if not tiny else 20) if self.gpu else 1
        self.dtype = torch.bfloat16
        self.cfg = Config()  # BYOL's view policies (blur 1.0 / 0.1, solarize 0.0 / 0.2) and statistics
        self.cfg.data.image_size, self.cfg.method.mode = self.size, "bsim"
        self.policies = augment.policy_for(self.cfg)
        gen = torch.Generator(device="cpu").manual_seed(0)
        shape = (self.n, 2, self.size, self.size, 3)
        self.pair = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
        self.views = self.pair[:, 0].contiguous()
        self.partner = mix.derangement(self.n, generator=gen)
        self.boxes, self.lam = mix.sample_boxes(self.n, self.size, self.size, 1.0, generator=gen)
        self.partner_d, self.boxes_d = mix.to_device([self.partner, self.boxes], device)
        self.elems = self.n * self.size * self.size * 3
        self.mix_bytes = self.elems * (1 + 2 * self.dtype.itemsize)  # uint8 read once, plain and mixed written once
        self.info = dict(
            kind="kernel",
            device=torch.cuda.get_device_name(device) if self.gpu else "cpu (triton interpreter)",
            n=self.n,
            size=self.size,
            dtype=str(self.dtype).replace("torch.", ""),
            measured_on_gpu=self.gpu,
        )
        src = torch.empty(self.mix_bytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = harness.median_ms(lambda: dst.copy_(src), self.iters, device)
        self.copy_gbps = 2 * src.numel() / copy_ms / 1e6

    def photo_gen(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(1)

    def row(self, name, kernel_fn, reference_fn, min_bytes, count_fn=None, per=1, budget=None, **extra) -> dict:
        """Times of the kernel path and of its reference, bandwidth against the copy, launches and bytes."""
        with _forced_triton():
            ms = harness.median_ms(kernel_fn, self.iters, self.device)
            counts = count_launches(count_fn or kernel_fn)
        with _reference_path():
            iters = self.iters if self.gpu else 1
            ref_ms = harness.median_ms(reference_fn, iters, self.device) if reference_fn else float("nan")
        r = dict(
            self.info,
            name=name,
            ms=ms,
            ref_ms=ref_ms,
            speedup=ref_ms / ms,
            min_bytes=min_bytes // per,
            gbps=min_bytes / ms / 1e6,
            copy_gbps=self.copy_gbps,
            frac_of_copy=min_bytes / ms / 1e6 / self.copy_gbps,
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

    def cutmix_row(self) -> dict:
        from bsim_fast import mix

        c = self
        stats = mix.check_cutmix_inputs(c.views, c.partner, c.boxes, MEAN, STD, c.dtype)  # host work, not counted
        return self.row(
            "cutmix_normalize",
            lambda: mix.cutmix_normalize(c.views, c.partner_d, c.boxes_d, MEAN, STD, c.dtype),
            lambda: mix.cutmix_normalize_reference(c.views, c.partner_d, c.boxes_d, MEAN, STD, c.dtype),
            c.mix_bytes,
            count_fn=lambda: mix._normalize_checked(c.views, c.partner_d, c.boxes_d, *stats, c.dtype),
            mean_box_fraction=float(1 - c.lam.mean()),
        )

    def photometric_rows(self) -> list[dict]:
        from bsim_fast import augment

        pair, gen = self.pair, self.photo_gen
        return [
            self.row(
                f"photometric_t{v + 1}",
                lambda p=policy, v=v: augment.photometric(pair[:, v], p, gen()),
                lambda p=policy, v=v: augment.photometric_reference(pair[:, v], p, gen()),
                2 * self.elems,
                blur_p=policy.blur_p,
                solarize_p=policy.solarize_p,
            )
            for v, policy in enumerate(self.policies)
        ]

    def view_path_row(self, tiny: bool) -> dict:
        """What every step asks of the device outside the model (loader hand-off + make_views), per view."""
        from bsim_fast import augment, mix

        c = self
        stats = mix.check_cutmix_inputs(c.views, c.partner, c.boxes, MEAN, STD, c.dtype)

        def two_views(photometric):
            g = c.photo_gen()
            a = photometric(c.pair[:, 0], c.policies[0], g)
            b = photometric(c.pair[:, 1], c.policies[1], g)
            return mix.make_views(a, b, c.cfg, torch.Generator().manual_seed(2), c.dtype)

        def two_views_on_device():
            # make_views minus its host work (drawing and checking partner and boxes, then ONE host-to-device
            # copy per step, counted below as h2d_copies): the same calls on the device
            g = c.photo_gen()
            a = augment.photometric(c.pair[:, 0], c.policies[0], g)
            b = augment.photometric(c.pair[:, 1], c.policies[1], g)
            mix._normalize_checked(a, c.partner_d, c.boxes_d, *stats, c.dtype)
            mix._normalize_checked(b, c.partner_d, c.boxes_d, *stats, c.dtype)

        return self.row(
            "augment_cutmix_normalize_two_views",
            lambda: two_views(augment.photometric),
            lambda: two_views(augment.photometric_reference),
            2 * c.mix_bytes,
            count_fn=two_views_on_device,
            per=2,
            budget=(6, 3 * 2 * c.mix_bytes),
            h2d_copies_per_step=1,
            target_ms=TARGET_MS if (c.gpu and not tiny) else None,
        )

    def sweep_rows(self) -> list[dict]:
        """Other (BLOCK, num_warps) choices of the CutMix and photometric kernels (a GPU only)."""
        from bsim_fast import augment, mix
        from bsim_fast.kernels import cutmix
        from bsim_fast.kernels import photometric as ph

        c, rows = self, []
        saved = cutmix.BLOCK, cutmix.NUM_WARPS, ph.BLOCK_PIXELS, ph.NUM_WARPS
        try:
            for block, warps in itertools.product((2048, 4096, 8192, 16384), (4, 8, 16)):
                cutmix.BLOCK, cutmix.NUM_WARPS = block, warps
                fn = lambda: mix.cutmix_normalize(c.views, c.partner_d, c.boxes_d, MEAN, STD, c.dtype)  # noqa: E731
                ms = harness.median_ms(fn, c.iters, c.device)
                gbps = c.mix_bytes / ms / 1e6
                name = f"cutmix_normalize[BLOCK={block},warps={warps}]"
                rows.append(dict(c.info, name=name, ms=ms, gbps=gbps, frac_of_copy=gbps / c.copy_gbps))
            cutmix.BLOCK, cutmix.NUM_WARPS = saved[:2]
            for block, warps in itertools.product((256, 512, 1024, 2048), (2, 4, 8)):
                ph.BLOCK_PIXELS, ph.NUM_WARPS = block, warps
                fn = lambda: augment.photometric(c.pair[:, 1], c.policies[1], c.photo_gen())  # noqa: E731
                ms = harness.median_ms(fn, c.iters, c.device)
                name = f"photometric_t2[BLOCK_PIXELS={block},warps={warps}]"
                rows.append(dict(c.info, name=name, ms=ms, gbps=2 * c.elems / ms / 1e6))
        finally:
            cutmix.BLOCK, cutmix.NUM_WARPS, ph.BLOCK_PIXELS, ph.NUM_WARPS = saved
        return rows


def bench_kernels(tiny: bool, device: torch.device, sweep: bool = False) -> list[dict]:
    """One row per kernel (and per (BLOCK, num_warps) with ``sweep``), ``kind="kernel"``: ``ms`` (the
    dispatching call), ``ref_ms`` (the PyTorch reference), ``speedup``, ``gbps`` and ``copy_gbps`` over
    ``min_bytes`` (the uint8 input read once and every output written once), ``frac_of_copy``, and per view
    ``launches`` and ``bytes`` (measured; bytes exact under the interpreter only), against ``budget_launches``
    and ``budget_bytes``. Needs CUDA, or TRITON_INTERPRET=1 set before the kernels were imported."""
    device = torch.device(device)
    if device.type != "cuda" and not _interpreting():
        print("  kernels: no GPU and TRITON_INTERPRET unset; run `python -m bsim_fast.tools.kernel_bench --tiny`")
        return []
    case = KernelCase(tiny, device)
    rows = [case.cutmix_row(), *case.photometric_rows(), case.view_path_row(tiny)]
    if sweep and case.gpu:
        rows += case.sweep_rows()
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
        write_text_atomic(args.json, text + "\n")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
