"""The fused CutMix + normalise Triton kernel against its PyTorch reference (issue #4).

Without a GPU the kernel runs under Triton's interpreter. ``TRITON_INTERPRET=1`` must be set before triton
decorates the kernel, i.e. before ``bsim_fast.cutmix_triton`` is first imported, and setting it inside the
pytest process would switch every Triton kernel of every test to the interpreter. So the interpreter
cases run in ONE subprocess (this file executed as a script with the variable set), which builds each
case from a seed, compares kernel and reference itself and reports a JSON line per case; the tests below
assert on those reports. On a machine with CUDA the same cases also run natively (``gpu`` marker).
Validation needs no kernel at all, so the bad-input tests run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HAS_CUDA = torch.cuda.is_available()

# name -> (n, h, w, dtype, box kind, partner kind). Tiny sizes: the interpreter runs every program in Python.
CASES = {
    "fp32_odd_7x5": (5, 7, 5, "float32", "random", "derangement"),
    "bf16_odd_33x17": (4, 33, 17, "bfloat16", "random", "derangement"),
    "fp16_odd_17x33": (3, 17, 33, "float16", "random", "derangement"),
    "fp32_n2": (2, 7, 5, "float32", "random", "derangement"),
    "bf16_borders": (6, 9, 11, "bfloat16", "borders", "derangement"),
    "fp32_borders": (6, 9, 11, "float32", "borders", "derangement"),
    "fp32_empty_boxes_lam1": (3, 6, 7, "float32", "empty", "derangement"),
    "bf16_full_boxes_lam0": (3, 6, 7, "bfloat16", "full", "derangement"),
    "fp32_large_n64_8x8": (64, 8, 8, "float32", "random", "derangement"),
    "bf16_multi_tile_40x40": (2, 40, 40, "bfloat16", "random", "derangement"),  # 4800 B: 2 tiles per image
    "fp32_partner_not_permutation": (5, 7, 9, "float32", "random", "repeats"),
    "fp32_identity_partner": (3, 5, 4, "float32", "random", "identity"),  # a permutation with fixed points
    "fp32_sim_no_boxes": (3, 7, 5, "float32", "none", "none"),
    "fp16_int64_boxes_tensor_stats": (4, 6, 5, "float16", "random_int64", "derangement"),
}


def make_case(name: str, device: str = "cpu"):
    """Seeded inputs for one case: (views_u8, partner, boxes, mean, std, dtype)."""
    from bsim_fast import mix

    n, h, w, dtype, box_kind, partner_kind = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    views = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
    if partner_kind == "derangement":
        partner = mix.derangement(n, generator=gen)
    elif partner_kind == "repeats":  # valid for the reference, not a permutation, with a fixed point
        partner = torch.tensor([1, 0, 0, 3, 1][:n], dtype=torch.int64)
    elif partner_kind == "identity":
        partner = torch.arange(n)
    else:
        partner = None
    mean, std = MEAN, STD
    if box_kind in ("random", "random_int64"):
        boxes, _ = mix.sample_boxes(n, h, w, 1.0, generator=gen)
        if box_kind == "random_int64":
            boxes = boxes.long()
            mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD)
    elif box_kind == "borders":  # each box touches a different border (or all of them)
        boxes = torch.tensor(
            [[0, 3, 2, 6], [5, h, 1, 4], [2, 7, 0, 3], [1, 4, 6, w], [0, h, 0, w], [0, 1, w - 1, w]],
            dtype=torch.int32,
        )
    elif box_kind == "empty":  # lambda = 1: mixed == plain
        boxes = torch.tensor([[0, 0, 0, 0], [3, 3, 2, 5], [2, 4, 6, 6]], dtype=torch.int32)
    elif box_kind == "full":  # lambda = 0: mixed == plain[partner]
        boxes = torch.tensor([[0, h, 0, w]] * n, dtype=torch.int32)
    else:
        boxes = None
    move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
    return move(views), move(partner), move(boxes), move(mean), move(std), DTYPES[dtype]


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference in units of the last place of ``want``'s dtype (0.0 when bit-identical)."""
    if got.dtype == torch.float32:
        return 0.0 if torch.equal(got, want) else float("inf")
    mant = {torch.bfloat16: 8, torch.float16: 11}[want.dtype]
    g, r = got.float(), want.float()
    _, exp = torch.frexp(r)
    ulp = torch.ldexp(torch.ones_like(r), (exp - mant).clamp(min=-24))
    return float(((g - r).abs() / ulp).max()) if g.numel() else 0.0


def compare_case(name: str, device: str) -> dict:
    """Run kernel and reference on one case; a JSON-able report."""
    from bsim_fast import mix
    from bsim_fast.cutmix_triton import cutmix_normalize_triton

    views, partner, boxes, mean, std, dtype = make_case(name, device)
    plain, mixed = cutmix_normalize_triton(views, partner, boxes, mean, std, dtype)
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    ref_plain, ref_mixed = mix.cutmix_normalize_reference(
        cpu(views), cpu(partner), cpu(boxes), cpu(mean), cpu(std), dtype
    )
    n, h, w, _ = views.shape
    want_strides = torch.empty((n, 3, h, w), memory_format=torch.channels_last).stride()
    report = {
        "shape_ok": list(plain.shape) == [n, 3, h, w] and plain.dtype == dtype,
        "channels_last": plain.stride() == want_strides,
        "plain_ulps": _ulps(plain.cpu(), ref_plain),
        "mixed_is_none": mixed is None,
        "ref_mixed_is_none": ref_mixed is None,
    }
    if mixed is not None:
        report.update(
            mixed_shape_ok=mixed.shape == plain.shape and mixed.dtype == dtype,
            mixed_channels_last=mixed.stride() == want_strides,
            mixed_ulps=_ulps(mixed.cpu(), ref_mixed),
        )
    return report


def _check_report(name: str, rep: dict) -> None:
    dtype = CASES[name][3]
    tol = 0.0 if dtype == "float32" else 1.0  # exact in fp32, one ulp in bf16/fp16
    assert rep["shape_ok"] and rep["channels_last"], rep
    assert rep["plain_ulps"] <= tol, rep
    assert rep["mixed_is_none"] == rep["ref_mixed_is_none"], rep
    if not rep["mixed_is_none"]:
        assert rep["mixed_shape_ok"] and rep["mixed_channels_last"], rep
        assert rep["mixed_ulps"] <= tol, rep


# ----------------------------------------------------------------------------------------------------------
# Interpreter cases (CPU, one subprocess for all of them)
# ----------------------------------------------------------------------------------------------------------


def _subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def interpreter_reports() -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpreter-cases"],
        cwd=ROOT,
        env=_subprocess_env(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    reports = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            rec = json.loads(line[5:])
            reports[rec.pop("name")] = rec
    if proc.returncode != 0 or not reports:
        pytest.fail(
            f"interpreter subprocess failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return reports


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreter_matches_reference(interpreter_reports, name):
    rep = interpreter_reports[name]
    assert "error" not in rep, rep.get("error")
    _check_report(name, rep)


def test_interpreter_bench_smoke(interpreter_reports):
    rep = interpreter_reports["__bench__"]
    assert "error" not in rep, rep.get("error")
    for key in ("kernel_ms", "kernel_gbps", "reference_ms", "copy_ms", "copy_gbps", "speedup_vs_reference",
                "fraction_of_copy_bandwidth", "bytes_moved"):
        assert key in rep and rep[key] > 0, key
    assert rep["bytes_moved"] == 2 * 8 * 8 * 3 * (1 + 2 * 2)  # uint8 in, two bf16 outputs


def test_cli_smoke_without_gpu():
    """`python -m bsim_fast.cutmix_triton` switches itself to the interpreter when there is no GPU."""
    env = _subprocess_env(CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bsim_fast.cutmix_triton", "--n", "2", "--size", "4", "--iters", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"kernel_gbps"' in proc.stdout and "speedup vs reference" in proc.stdout


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: clear errors before any launch (no kernel needed)
# ----------------------------------------------------------------------------------------------------------


def _good(n=4, h=6, w=5):
    from bsim_fast import mix

    gen = torch.Generator().manual_seed(7)
    views = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
    boxes, _ = mix.sample_boxes(n, h, w, 1.0, generator=gen)
    return dict(views_u8=views, partner=mix.derangement(n, generator=gen), boxes=boxes, mean=MEAN, std=STD,
                dtype=torch.bfloat16)


def _bad_inputs():
    g = _good()
    n, h, w = 4, 6, 5
    nchw = torch.zeros((n, 3, h, w), dtype=torch.uint8)
    box = lambda y0, y1, x0, x1: torch.tensor([[y0, y1, x0, x1]] * n, dtype=torch.int32)  # noqa: E731
    cases = {
        "float views": (dict(views_u8=g["views_u8"].float()), TypeError, "uint8"),
        "NCHW views": (dict(views_u8=nchw), ValueError, "[N, H, W, 3]"),
        "non-contiguous NHWC": (dict(views_u8=nchw.permute(0, 2, 3, 1)), ValueError, "contiguous"),
        "int8 output dtype": (dict(dtype=torch.int8), TypeError, "dtype"),
        "float64 output dtype": (dict(dtype=torch.float64), TypeError, "dtype"),
        "short partner": (dict(partner=g["partner"][:-1]), ValueError, "partner"),
        "short boxes": (dict(boxes=g["boxes"][:-1]), ValueError, "boxes"),
        "boxes with 3 columns": (dict(boxes=g["boxes"][:, :3]), ValueError, "boxes"),
        "float partner": (dict(partner=g["partner"].float()), TypeError, "partner"),
        "partner too large": (dict(partner=torch.tensor([1, 2, 3, 4])), ValueError, "partner"),
        "partner negative": (dict(partner=torch.tensor([1, -1, 3, 0])), ValueError, "partner"),
        "box past bottom": (dict(boxes=box(0, h + 1, 0, 1)), ValueError, "boxes"),
        "box past right": (dict(boxes=box(0, 1, 0, w + 1)), ValueError, "boxes"),
        "negative box": (dict(boxes=box(-1, 1, 0, 1)), ValueError, "boxes"),
        "inverted box": (dict(boxes=box(3, 2, 0, 1)), ValueError, "boxes"),
        "two-channel mean": (dict(mean=(1.0, 2.0)), ValueError, "mean"),
        "zero std": (dict(std=(1.0, 0.0, 1.0)), ValueError, "std"),
    }
    return g, cases


@pytest.mark.parametrize("case", sorted(_bad_inputs()[1]))
def test_bad_inputs_raise_before_launch(monkeypatch, case):
    import bsim_fast.cutmix_triton as ct

    def no_launch(*_a, **_k):  # the kernel must never see invalid input
        raise AssertionError("kernel launched with invalid input")

    monkeypatch.setattr(ct, "_launch", no_launch)
    good, cases = _bad_inputs()
    override, exc, words = cases[case]
    kwargs = {**good, **override}
    if HAS_CUDA:
        kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(exc, match=None) as info:
        ct.cutmix_normalize_triton(**kwargs)
    msg = str(info.value)
    assert words in msg and "\n" not in msg, msg


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-tensor error of a build without the interpreter")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    import bsim_fast.cutmix_triton as ct

    if ct.INTERPRET:
        pytest.skip("this process runs the interpreter")
    monkeypatch.setattr(ct, "_launch", lambda *_: (_ for _ in ()).throw(AssertionError("launched")))
    with pytest.raises(ValueError, match="CUDA"):
        ct.cutmix_normalize_triton(**_good())


# ----------------------------------------------------------------------------------------------------------
# Native GPU runs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_matches_reference(name):
    _check_report(name, compare_case(name, "cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_imagenet_batch_and_dispatch(dtype):
    """N=256 at 224x224 through mix.cutmix_normalize (which must dispatch CUDA tensors to the kernel)."""
    from bsim_fast import mix

    gen = torch.Generator().manual_seed(3)
    n, h, w = 256, 224, 224
    views = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
    partner = mix.derangement(n, generator=gen)
    boxes, _ = mix.sample_boxes(n, h, w, 1.0, generator=gen)
    plain, mixed = mix.cutmix_normalize(views.cuda(), partner.cuda(), boxes.cuda(), MEAN, STD, DTYPES[dtype])
    ref_plain, ref_mixed = mix.cutmix_normalize_reference(views, partner, boxes, MEAN, STD, DTYPES[dtype])
    tol = 0.0 if dtype == "float32" else 1.0
    assert plain.is_cuda and plain.is_contiguous(memory_format=torch.channels_last)
    assert _ulps(plain.cpu(), ref_plain) <= tol and _ulps(mixed.cpu(), ref_mixed) <= tol


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_offsets_beyond_int32():
    """N·H·W·3 > 2**31: the last images (int64 base offsets) are still right, in-box content included."""
    from bsim_fast import mix
    from bsim_fast.cutmix_triton import cutmix_normalize_triton

    n, h, w = 14300, 224, 224  # 2.15e9 input bytes
    free, _ = torch.cuda.mem_get_info()
    if free < n * h * w * 3 * 5 * 1.2:
        pytest.skip("not enough GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(5)
    views = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, device="cuda", generator=gen)
    partner = torch.arange(n, device="cuda").roll(1)  # image i mixes with i-1: last images cross 2**31
    boxes = torch.tensor([[10, 200, 20, 180]] * n, dtype=torch.int32, device="cuda")
    plain, mixed = cutmix_normalize_triton(views, partner, boxes, MEAN, STD, torch.bfloat16)
    last = torch.arange(n - 3, n, device="cuda")
    sub_views = torch.cat([views[last - 1], views[last]])  # partners first, then the images
    sub_partner = torch.tensor([3, 4, 5, 0, 1, 2], device="cuda")  # images 3..5 mix with 0..2
    ref_plain, ref_mixed = mix.cutmix_normalize_reference(
        sub_views, sub_partner, boxes[:6], MEAN, STD, torch.bfloat16
    )
    assert _ulps(plain[last].cpu(), ref_plain[3:].cpu()) <= 1.0
    assert _ulps(mixed[last].cpu(), ref_mixed[3:].cpu()) <= 1.0


# ----------------------------------------------------------------------------------------------------------
# Subprocess entry point: every interpreter case, one JSON line each
# ----------------------------------------------------------------------------------------------------------


def _run_interpreter_cases() -> int:
    import time

    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    for name in sorted(CASES):
        t0 = time.perf_counter()
        try:
            rep = compare_case(name, "cpu")
        except Exception as exc:  # reported, and failed, by the parent test
            rep = {"error": f"{type(exc).__name__}: {exc}"}
        rep.update(name=name, seconds=round(time.perf_counter() - t0, 3))
        print("CASE " + json.dumps(rep), flush=True)
    try:
        from bsim_fast.cutmix_triton import bench_cutmix

        rep = bench_cutmix(n=2, h=8, w=8, dtype=torch.bfloat16, iters=1)
        rep = {k: v for k, v in rep.items() if isinstance(v, (int, float))}
    except Exception as exc:
        rep = {"error": f"{type(exc).__name__}: {exc}"}
    rep["name"] = "__bench__"
    print("CASE " + json.dumps(rep), flush=True)
    return 0


if __name__ == "__main__" and "--interpreter-cases" in sys.argv:
    sys.path.insert(0, str(ROOT))
    sys.exit(_run_interpreter_cases())
