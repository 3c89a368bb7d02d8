"""The Triton kernels (bsim_fast/kernels) against their PyTorch references, their budgets, and their PTX.

Without a GPU the kernels run under Triton's interpreter. ``TRITON_INTERPRET=1`` must be set before triton
decorates a kernel, i.e. before a kernel module is first imported, and setting it inside the pytest process
would switch every Triton kernel of every test to the interpreter. So the interpreter cases run in ONE
subprocess (this file executed as a script with TRITON_INTERPRET=1 and BSIM_FAST_TRITON=1, which sends CPU
tensors through the dispatchers' Triton path), which builds each case from a seed, compares kernel and
reference itself and reports a JSON line per case; the tests below assert on those reports. On a machine
with CUDA the same cases also run natively (``gpu`` marker). Validation, the PTX compiled for sm_90 and the
dispatch rules need no kernel run, so they are tested in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HAS_CUDA = torch.cuda.is_available()

# ---- cases -----------------------------------------------------------------------------------------------

# name -> (n, h, w, dtype, box kind, partner kind). Tiny sizes: the interpreter runs every program in Python.
CUTMIX_CASES = {
    "fp32_odd_7x5": (5, 7, 5, "float32", "random", "derangement"),
    "bf16_odd_33x17": (4, 33, 17, "bfloat16", "random", "derangement"),
    "fp16_odd_17x33": (3, 17, 33, "float16", "random", "derangement"),
    "fp32_n2": (2, 7, 5, "float32", "random", "derangement"),
    "bf16_rows_of_whole_chunks_16x32": (3, 16, 32, "bfloat16", "random", "derangement"),  # 3W % 8 == 0
    "fp32_rows_of_whole_chunks_8x16": (3, 8, 16, "float32", "random", "derangement"),
    "bf16_borders": (6, 9, 11, "bfloat16", "borders", "derangement"),
    "fp32_borders_aligned_rows": (6, 9, 16, "float32", "borders", "derangement"),
    "fp32_empty_boxes_lam1": (3, 6, 7, "float32", "empty", "derangement"),
    "bf16_full_boxes_lam0": (3, 6, 7, "bfloat16", "full", "derangement"),
    "fp32_large_n32_8x8": (32, 8, 8, "float32", "random", "derangement"),
    "bf16_multi_tile_40x40": (2, 40, 40, "bfloat16", "random", "derangement"),  # 4800 B: 2 tiles per image
    "fp32_partner_not_permutation": (5, 7, 9, "float32", "random", "repeats"),
    "fp32_identity_partner": (3, 5, 4, "float32", "random", "identity"),
    "fp32_sim_no_boxes": (3, 7, 5, "float32", "none", "none"),
    "bf16_sim_no_boxes": (2, 8, 16, "bfloat16", "none", "none"),
    "fp16_int64_boxes_tensor_stats": (4, 6, 5, "float16", "random_int64", "derangement"),
}

# name -> (n, h, w, policy changes over BYOL's t' (or "t1"/"t2": BYOL's own views), input layout)
ONLY = dict(jitter_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
PHOTO_CASES = {
    "brightness_only": (3, 9, 7, dict(ONLY, jitter_p=1.0, brightness=0.4), "nhwc"),
    "contrast_only": (3, 9, 7, dict(ONLY, jitter_p=1.0, contrast=0.4), "nhwc"),
    "saturation_only": (3, 9, 7, dict(ONLY, jitter_p=1.0, saturation=0.9), "nhwc"),
    "hue_only": (3, 9, 7, dict(ONLY, jitter_p=1.0, hue=0.5), "nhwc"),
    "grayscale_only": (3, 9, 7, dict(ONLY, gray_p=1.0), "nhwc"),
    "blur_only": (3, 13, 11, dict(ONLY, blur_p=1.0), "nhwc"),
    "solarize_only": (3, 9, 7, dict(ONLY, solarize_p=1.0), "nhwc"),
    "all_combined": (6, 11, 13, dict(jitter_p=1.0, gray_p=0.3, blur_p=0.5, solarize_p=0.5), "nhwc"),
    "jitter_many_orders_n12": (12, 5, 6, dict(jitter_p=1.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0), "nhwc"),
    "byol_t1_odd_23x17": (4, 23, 17, "t1", "nhwc"),
    "byol_t2_odd_23x17": (4, 23, 17, "t2", "nhwc"),
    "byol_t1_n1": (1, 12, 10, "t1", "nhwc"),
    "byol_t2_n2": (2, 10, 12, "t2", "nhwc"),
    "byol_t1_loader_pair_view": (3, 16, 16, "t1", "pair"),  # views_u8[:, 0] of the loaders' [N, 2, H, W, 3]
    "byol_t2_planar_view": (3, 16, 16, "t2", "planar"),  # the GPU-resident loader's permuted NCHW
    "blur_multi_tile_72x70": (2, 72, 70, dict(ONLY, blur_p=1.0, solarize_p=0.5), "nhwc"),  # 7 taps, 2x2 tiles
    "all_combined_32x32": (4, 32, 32, dict(jitter_p=1.0, gray_p=0.3, blur_p=0.5, solarize_p=0.5), "pair"),
    # 4-byte words in and out: 3 strips of the blur (first, inner, last), planar input, a 3-block window
    "byol_t1_pair_strips_40x72": (3, 40, 72, "t1", "pair"),
    "byol_t1_planar_blur_32x40": (2, 32, 40, dict(ONLY, jitter_p=1.0, brightness=0.4, blur_p=1.0), "planar"),
    "blur_23_taps_window3_40x160": (2, 40, 160, dict(jitter_p=1.0, gray_p=0.3, blur_p=1.0, solarize_p=0.5), "pair"),
}
PHOTO_TAPS = {"blur_23_taps_window3_40x160": 23}  # the blur's taps where not 10% of the side (the 224² kernel)


def make_cutmix_case(name: str, device: str = "cpu"):
    """Seeded inputs for one case: (views_u8, partner, boxes, mean, std, dtype)."""
    from bsim_fast import mix

    n, h, w, dtype, box_kind, partner_kind = CUTMIX_CASES[name]
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
            [[0, 3, 2, 6], [5, h, 1, 4], [2, 7, 0, 3], [1, 4, 6, w], [0, h, 0, w], [0, 1, w - 1, w]], dtype=torch.int32
        )
    elif box_kind == "empty":  # lambda = 1: mixed == plain
        boxes = torch.tensor([[0, 0, 0, 0], [3, 3, 2, 5], [2, 4, 6, 6]], dtype=torch.int32)
    elif box_kind == "full":  # lambda = 0: mixed == plain[partner]
        boxes = torch.tensor([[0, h, 0, w]] * n, dtype=torch.int32)
    else:
        boxes = None
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return move(views), move(partner), move(boxes), move(mean), move(std), DTYPES[dtype]


def compare_cutmix(name: str, device: str) -> dict:
    """The dispatching `mix.cutmix_normalize` (the kernel here) against the reference; a JSON-able report."""
    from bsim_fast import mix

    views, partner, boxes, mean, std, dtype = make_cutmix_case(name, device)
    plain, mixed = mix.cutmix_normalize(views, partner, boxes, mean, std, dtype)
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    ref_plain, ref_mixed = mix.cutmix_normalize_reference(
        cpu(views), cpu(partner), cpu(boxes), cpu(mean), cpu(std), dtype
    )
    n, h, w, _ = views.shape
    want_strides = torch.empty((n, 3, h, w), memory_format=torch.channels_last).stride()
    report = {
        "shape_ok": list(plain.shape) == [n, 3, h, w] and plain.dtype == dtype,
        "channels_last": plain.stride() == want_strides,
        "plain_equal": torch.equal(plain.cpu(), ref_plain),
        "mixed_is_none": mixed is None,
        "ref_mixed_is_none": ref_mixed is None,
    }
    if mixed is not None:
        report.update(
            mixed_shape_ok=mixed.shape == plain.shape and mixed.dtype == dtype,
            mixed_channels_last=mixed.stride() == want_strides,
            mixed_equal=torch.equal(mixed.cpu(), ref_mixed),
        )
    if dtype != torch.float32:  # the rounding: nearest-even from the fp32 value, not truncation
        plain32, _ = mix.cutmix_normalize_reference(
            cpu(views), cpu(partner), cpu(boxes), cpu(mean), cpu(std), torch.float32
        )
        report["rne_of_fp32"] = torch.equal(plain.cpu(), plain32.to(dtype))
        report["truncation_differs"] = (
            not torch.equal(plain.cpu(), (plain32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype))
            if dtype == torch.bfloat16
            else True
        )
    return report


def check_cutmix_report(rep: dict) -> None:
    assert "error" not in rep, rep.get("error")
    assert rep["shape_ok"] and rep["channels_last"], rep
    assert rep["plain_equal"], rep  # bit-identical in every dtype: same fp32 value, same rounding
    assert rep["mixed_is_none"] == rep["ref_mixed_is_none"], rep
    if not rep["mixed_is_none"]:
        assert rep["mixed_shape_ok"] and rep["mixed_channels_last"] and rep["mixed_equal"], rep
    if "rne_of_fp32" in rep:
        assert rep["rne_of_fp32"] and rep["truncation_differs"], rep


def photo_policy(spec):
    from bsim_fast.augment import policy_for
    from bsim_fast.config import Config

    t1, t2 = policy_for(Config())
    if spec == "t1":
        return t1
    if spec == "t2":
        return t2
    return replace(t1, **spec)


def make_photo_case(name: str, device: str = "cpu"):
    n, h, w, spec, layout = PHOTO_CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
    x[:, : max(1, h // 4)] = x[:, : max(1, h // 4), :, :1]  # grey rows: zero chroma for hue and saturation
    x[:, -1, :, 0] = 255
    if layout == "pair":
        x = torch.stack([x, x.flip(1)], dim=1).to(device)[:, 0]
    elif layout == "planar":
        x = x.permute(0, 3, 1, 2).contiguous().to(device).permute(0, 2, 3, 1)
    else:
        x = x.to(device)
    return x, photo_policy(spec), sum(map(ord, name)) + 1


def compare_photometric(name: str, device: str) -> dict:
    """The dispatching `augment.photometric` (the kernels here) against the reference; a JSON-able report."""
    from bsim_fast import augment

    blur_kernel_size = augment.blur_kernel_size  # both paths take the blur's size from it
    if name in PHOTO_TAPS:
        augment.blur_kernel_size = lambda side: PHOTO_TAPS[name]
    try:
        return _compare_photometric(name, device)
    finally:
        augment.blur_kernel_size = blur_kernel_size


def _compare_photometric(name: str, device: str) -> dict:
    from bsim_fast import augment

    x, policy, seed = make_photo_case(name, device)
    out = augment.photometric(x, policy, torch.Generator(device=device).manual_seed(seed))
    again = augment.photometric(x, policy, torch.Generator(device=device).manual_seed(seed))
    ref = (
        augment.photometric_reference(x.cpu(), policy, torch.Generator().manual_seed(seed))
        if device == "cpu"
        else augment.photometric_reference(x, policy, torch.Generator(device=device).manual_seed(seed)).cpu()
    )
    diff = (out.cpu().int() - ref.int()).abs()
    return dict(
        shape_ok=out.shape == x.shape and out.dtype == torch.uint8 and out.is_contiguous(),
        deterministic=torch.equal(out, again),
        max_diff=int(diff.max()),
        frac_diff=float((diff > 0).float().mean()),
        changed=not torch.equal(out.cpu(), x.cpu()),
    )


def compare_tied_order_keys() -> dict:
    """Equal sort keys for the jitter order (possible with 24-bit uniforms): kernel and reference both take
    the stable order, op index breaking ties. The uniforms are written by hand, so the launcher is called
    directly with the reference's own `_transform`."""
    from bsim_fast import augment
    from bsim_fast.kernels import photometric as kernel

    policy = photo_policy(dict(jitter_p=1.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0))
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 256, (4, 6, 5, 3), dtype=torch.uint8, generator=g)
    u = torch.rand(4, kernel.U_COLUMNS, generator=g)
    u[:, kernel.U_ORDER : kernel.U_ORDER + 4] = torch.tensor(
        [[0.5, 0.5, 0.5, 0.5], [0.7, 0.2, 0.7, 0.2], [0.1, 0.9, 0.9, 0.1], [0.3, 0.3, 0.6, 0.3]]
    )
    out = kernel.photometric(x, u, policy, augment.blur_kernel_size(5))
    diff = (out.int() - augment._transform(x, u, policy).int()).abs()
    return dict(max_diff=int(diff.max()), frac_diff=float((diff > 0).float().mean()))


def check_photo_report(rep: dict) -> None:
    assert "error" not in rep, rep.get("error")
    assert rep["shape_ok"] and rep["deterministic"] and rep["changed"], rep
    assert rep["max_diff"] <= 1, rep  # within one grey level of the reference
    assert rep["frac_diff"] <= 0.1, rep  # and few of those: float rounding, fp16 blur products


def view_budget_counts(mode: str, size: int = 32, n: int = 4) -> dict:
    """Launches and device bytes per view of the Triton path, both BYOL views, bf16 (the training dtype)."""
    from bsim_fast import augment, mix
    from bsim_fast.config import Config
    from bsim_fast.tools.counting import count_launches

    cfg = Config()
    policies = augment.policy_for(cfg)
    g = torch.Generator().manual_seed(0)
    pair = torch.randint(0, 256, (n, 2, size, size, 3), dtype=torch.uint8, generator=g)
    partner = mix.derangement(n, generator=g) if mode != "sim" else None
    boxes = mix.sample_boxes(n, size, size, 1.0, generator=g)[0] if mode != "sim" else None
    stats = mix.check_cutmix_inputs(pair[:, 0].contiguous(), partner, boxes, MEAN, STD, torch.bfloat16)

    def step_on_device():  # make_views' device calls (its host draws and checks are not device work)
        gen = torch.Generator().manual_seed(1)
        a = augment.photometric(pair[:, 0], policies[0], gen)
        b = augment.photometric(pair[:, 1], policies[1], gen)
        mix._normalize_checked(a, partner, boxes, *stats, torch.bfloat16)
        mix._normalize_checked(b, partner, boxes, *stats, torch.bfloat16)

    counts = count_launches(step_on_device)
    elems = n * size * size * 3
    outputs = 1 if mode == "sim" else 2
    return dict(
        launches_per_view=counts["launches"] / 2,
        bytes_per_view=counts["bytes"] / 2,
        unique_bytes_per_view=counts["unique_bytes"] / 2,
        triton=counts["triton"],
        aten=counts["aten"],
        budget_bytes_per_view=3 * elems * (1 + outputs * 2),
        exact=counts["bytes_exact"],
    )


# ----------------------------------------------------------------------------------------------------------
# Interpreter cases (CPU, one subprocess for all of them)
# ----------------------------------------------------------------------------------------------------------


def _subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def interpreter_reports(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("kernels") / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpreter-cases", str(out)],
        cwd=ROOT,
        env=_subprocess_env(TRITON_INTERPRET="1", BSIM_FAST_TRITON="1", CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=900,
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
    reports["__bench_json__"] = json.loads(out.read_text()) if out.exists() else None
    return reports


@pytest.mark.parametrize("name", sorted(CUTMIX_CASES))
def test_interpreter_cutmix_matches_reference(interpreter_reports, name):
    check_cutmix_report(interpreter_reports["cutmix:" + name])


@pytest.mark.parametrize("name", sorted(PHOTO_CASES))
def test_interpreter_photometric_matches_reference(interpreter_reports, name):
    check_photo_report(interpreter_reports["photometric:" + name])


def test_interpreter_tied_order_keys_take_the_stable_order(interpreter_reports):
    rep = interpreter_reports["photometric:tied_order_keys"]
    assert "error" not in rep, rep.get("error")
    assert rep["max_diff"] <= 1 and rep["frac_diff"] <= 0.1, rep


@pytest.mark.parametrize("mode", ["bsim", "sim"])
def test_interpreter_launch_and_byte_budget_per_view(interpreter_reports, mode):
    """Per view and batch, outside the model: <= 6 launches (+ make_views' one host-to-device copy per step,
    half a copy per view) and <= 3x the bytes of (uint8 read once + each output written once in bf16)."""
    rep = interpreter_reports["budget:" + mode]
    assert "error" not in rep, rep.get("error")
    assert rep["exact"]
    assert rep["launches_per_view"] + 0.5 <= 6, rep
    assert rep["triton"].count("_cutmix_normalize_kernel") == 2 and len(rep["aten"]) == 2, rep  # 1 draw/view
    assert rep["bytes_per_view"] <= rep["budget_bytes_per_view"], rep
    assert rep["unique_bytes_per_view"] <= rep["bytes_per_view"], rep


def test_interpreter_bench_rows(interpreter_reports):
    rep = interpreter_reports["__bench__"]
    assert "error" not in rep, rep.get("error")
    rows = interpreter_reports["__bench_json__"]["rows"]
    names = {r["name"] for r in rows}
    assert {"cutmix_normalize", "photometric_t1", "photometric_t2", "augment_cutmix_normalize_two_views"} <= names
    for r in rows:
        assert r["kind"] == "kernel"
        for key in ("ms", "ref_ms", "speedup", "gbps", "copy_gbps", "frac_of_copy", "launches", "bytes"):
            assert r[key] > 0, (r["name"], key)
    step = next(r for r in rows if r["name"] == "augment_cutmix_normalize_two_views")
    assert step["launches"] <= step["budget_launches"] and step["bytes"] <= step["budget_bytes"]


# ----------------------------------------------------------------------------------------------------------
# In-process: dispatch rules, validation before any launch, make_views' transfers, PTX for sm_90
# ----------------------------------------------------------------------------------------------------------


def test_use_triton_rules(monkeypatch):
    from bsim_fast.kernels import use_triton

    monkeypatch.delenv("BSIM_FAST_TRITON", raising=False)
    assert use_triton(torch.device("cuda")) and not use_triton(torch.device("cpu"))
    monkeypatch.setenv("BSIM_FAST_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1") as info:
        use_triton(torch.device("cpu"))
    assert "\n" not in str(info.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.device("cpu"))


def _good(n=4, h=6, w=5):
    from bsim_fast import mix

    gen = torch.Generator().manual_seed(7)
    views = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
    boxes, _ = mix.sample_boxes(n, h, w, 1.0, generator=gen)
    return dict(
        views_u8=views, partner=mix.derangement(n, generator=gen), boxes=boxes, mean=MEAN, std=STD, dtype=torch.bfloat16
    )


def _bad_inputs():
    g = _good()
    n, h, w = 4, 6, 5
    nchw = torch.zeros((n, 3, h, w), dtype=torch.uint8)
    box = lambda y0, y1, x0, x1: torch.tensor([[y0, y1, x0, x1]] * n, dtype=torch.int32)  # noqa: E731
    return g, {
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


@pytest.fixture
def no_launch(monkeypatch):
    """The Triton path selected for CPU tensors, with the kernel launchers replaced by recorders."""
    from bsim_fast.kernels import cutmix, photometric

    launched = []
    monkeypatch.setenv("BSIM_FAST_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cutmix, "cutmix_normalize", lambda *a, **k: launched.append("cutmix") or (None, None))
    monkeypatch.setattr(photometric, "photometric", lambda *a, **k: launched.append("photometric"))
    return launched


@pytest.mark.parametrize("case", sorted(_bad_inputs()[1]))
def test_bad_inputs_raise_before_launch(no_launch, case):
    from bsim_fast import mix

    good, cases = _bad_inputs()
    override, exc, words = cases[case]
    kwargs = {**good, **override}
    with pytest.raises(exc) as info:
        mix.cutmix_normalize(**kwargs)
    msg = str(info.value)
    assert words in msg and "\n" not in msg, msg
    assert no_launch == []
    mix.cutmix_normalize(**good)  # and valid input does reach the launcher
    assert no_launch == ["cutmix"]


def test_photometric_bad_input_raises_before_launch(no_launch):
    from bsim_fast import augment

    with pytest.raises(ValueError, match="uint8"):
        augment.photometric(torch.zeros(2, 8, 8, 3), photo_policy("t1"), torch.Generator())
    assert no_launch == []
    augment.photometric(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), photo_policy("t1"), torch.Generator())
    assert no_launch == ["photometric"]


def test_make_views_one_transfer_and_host_checks(monkeypatch):
    """make_views draws and checks partner/boxes on the host, moves them (and lam) in ONE to_device call and
    runs one normalise per view; the dict keeps its keys; SIM mixes nothing."""
    from bsim_fast import mix
    from bsim_fast.config import Config

    calls = {"to_device": [], "normalize": 0, "checked_on": set()}
    to_device, normalize, check = mix.to_device, mix._normalize_checked, mix.check_cutmix_inputs

    def spy_to_device(tensors, device):
        calls["to_device"].append(len(tensors))
        return to_device(tensors, device)

    def spy_normalize(*a, **k):
        calls["normalize"] += 1
        return normalize(*a, **k)

    def spy_check(views, partner, boxes, *rest):
        calls["checked_on"] |= {t.device.type for t in (partner, boxes) if t is not None}
        return check(views, partner, boxes, *rest)

    monkeypatch.setattr(mix, "to_device", spy_to_device)
    monkeypatch.setattr(mix, "_normalize_checked", spy_normalize)
    monkeypatch.setattr(mix, "check_cutmix_inputs", spy_check)
    cfg = Config()
    cfg.method.mode = "bsim"
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8, generator=g) for _ in range(2))
    views = mix.make_views(a, b, cfg, torch.Generator().manual_seed(1), torch.float32)
    assert set(views) == {"views", "plain_a", "plain_b", "mixed_a", "mixed_b", "partner", "lam_a", "lam_b"}
    # one batch, written by the two launches: each named view is its slice, in the default order
    for i, k in enumerate(("plain_a", "plain_b", "mixed_a", "mixed_b")):
        assert views[k].data_ptr() == views["views"][i * 4].data_ptr() and views[k].shape == (4, 3, 8, 8)
    assert calls["to_device"] == [5] and calls["normalize"] == 2 and calls["checked_on"] == {"cpu"}
    again = mix.make_views(a, b, cfg, torch.Generator().manual_seed(1), torch.float32)
    assert all(torch.equal(views[k], again[k]) for k in views)
    assert torch.equal(views["plain_a"], mix.cutmix_normalize_reference(a, None, None, MEAN, STD, torch.float32)[0])
    cfg.method.mode = "sim"
    assert set(mix.make_views(a, b, cfg, torch.Generator(), torch.float32)) == {"views", "plain_a", "plain_b"}


def test_to_device_on_cpu_is_identity_and_keeps_dtypes():
    from bsim_fast import mix

    tensors = [torch.arange(3), torch.ones(2, 4, dtype=torch.int32), torch.rand(5)]
    moved = mix.to_device(tensors, torch.device("cpu"))
    assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(tensors, moved))


def _compiler_available() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def sm90_report():
    """Every kernel compiled for sm_90 once (tools/ptx.py): PTX counts, and ptxas's registers and spills."""
    if not _compiler_available():
        pytest.skip("needs Triton's compiler (not the interpreter)")
    from bsim_fast.tools.ptx import ptx_report

    return {(r["name"], r["side"], r.get("layout")): r for r in ptx_report()}


def test_ptx_for_sm90_vector_accesses_and_rounding(sm90_report):
    """The CutMix kernel compiled for sm_90 (no GPU needed): 8-byte vector loads of the uint8 input and
    16-byte vector stores of bf16, IEEE round-to-nearest-even conversion (cvt.rn.bf16x2), no division, and
    few instructions per element; the blur runs its products on the tensor cores (mma)."""
    mixed = sm90_report["cutmix_normalize", 224, None]
    widths = mixed["global_access_bytes"]
    assert widths.get("ld8B", 0) >= 4 and widths.get("st16B", 0) >= 4, widths  # data: vectors
    assert not any(k in widths for k in ("ld1B", "ld2B", "st1B", "st2B", "st4B", "st8B")), widths
    assert mixed["cvt_rn_bf16"] and mixed["instructions_per_element"] <= 30, mixed
    assert sm90_report["cutmix_normalize_sim", 224, None]["instructions_per_element"] <= 12
    assert sm90_report["photometric_blur", 224, "channel-last"]["mma"] > 0


PHOTOMETRIC_ROWS = [
    (name, side, layout)
    for side, layout in ((224, "channel-last"), (32, "channel-last"), (32, "planar"))
    for name in ("photometric_contrast_mean", "photometric_pointwise", "photometric_blur")
] + [("photometric_blur", 512, "channel-last")]


def test_sm90_photometric_instructions_and_access_widths(sm90_report):
    """Issue 23's budgets: the blur at 224² runs <= 300 PTX instructions per output pixel on a sample's path
    (every op on; the count is tools/ptx.py's path_instructions), and every photometric kernel moves its
    pixels as 4-byte words in the loaders' layout and the GPU-resident one (no 1- or 2-byte global access)."""
    assert set(PHOTOMETRIC_ROWS) <= set(sm90_report)
    assert sm90_report["photometric_blur", 224, "channel-last"]["instructions_per_output_pixel"] <= 300
    for key in PHOTOMETRIC_ROWS:
        widths = sm90_report[key]["global_access_bytes"]
        assert not {"ld1B", "ld2B", "st1B", "st2B", "cp.async"} & set(widths), (key, widths)
        assert widths.get("ld4B", 0) >= 3 and widths.get("st4B", 0) >= 1, (key, widths)
    for key in [k for k in PHOTOMETRIC_ROWS if k[0] != "photometric_contrast_mean"]:  # it stores one sum
        assert sm90_report[key]["global_access_bytes"]["st4B"] >= 3, key  # a group: 3 words


def test_sm90_photometric_registers_and_spills(sm90_report):
    """ptxas for sm_90 (Triton's bundled one): every photometric kernel at 32², 224² (and the blur at 512²,
    51 taps) fits in 128 registers per thread with no spill to local memory."""
    from bsim_fast.tools.ptx import ptxas_path

    if ptxas_path() is None:
        pytest.skip("no ptxas (Triton's bundled one, or TRITON_PTXAS_PATH): registers cannot be counted")
    for key in PHOTOMETRIC_ROWS:
        row = sm90_report[key]
        assert row["registers"] <= 128 and row["spill_stores"] == 0 and row["spill_loads"] == 0, (key, row)


# A hand-written kernel body: an entry block (3 instructions), a loop whose header (3) and latch (2) run on
# every iteration around a conditional block (2), and an exit (1); the inner variant nests a 2-instruction
# self-loop inside the conditional block.
LOOP_PTX = """
.version 8.0
.target sm_90a
.visible .entry k(
)
{
\tmov.u32 \t%r1, 0;
\tsetp.eq.u32 \t%p1, %r2, 0;
\t@%p1 bra \t$L__BB0_4;
$L__BB0_1:
\tadd.s32 \t%r1, %r1, 1;
\tsetp.ne.u32 \t%p2, %r3, 0;
\t@%p2 bra \t$L__BB0_3;
// %bb.2:
\tmul.lo.s32 \t%r4, %r4, 3;
INNER\tadd.s32 \t%r4, %r4, 1;
$L__BB0_3:
\tsetp.lt.u32 \t%p3, %r1, 8;
\t@%p3 bra \t$L__BB0_1;
$L__BB0_4:
\tret;
}
"""
INNER_LOOP = "$L__BB0_5:\n\tadd.s32 \t%r5, %r5, 1;\n\t@%p4 bra \t$L__BB0_5;\n"


def test_path_instructions_counts_loops_by_hand():
    """path_instructions on hand-made control flow, against counts worked by hand: every instruction once
    outside loops; a loop's header and latch times its runs, its conditional block as many times as given;
    a nested loop's blocks times both; a loop deeper than the runs given is refused."""
    from bsim_fast.tools.ptx import path_instructions, ptx_stats

    flat = LOOP_PTX.replace("INNER", "")
    assert ptx_stats(flat)["instructions"] == 11
    assert path_instructions(flat, [(8, 5)]) == 3 + 8 * 3 + 5 * 2 + 8 * 2 + 1
    assert path_instructions(flat, [(1, 1)]) == 11
    nested = LOOP_PTX.replace("INNER", INNER_LOOP)  # splits the conditional block: 1 + [2-instruction loop] + 1
    assert path_instructions(nested, [(8, 5), (4, 1)]) == 3 + 8 * 3 + 5 * 1 + 5 * 4 * 2 + 5 * 1 + 8 * 2 + 1
    with pytest.raises(ValueError, match="depth 2"):
        path_instructions(nested, [(8, 5)])


# ----------------------------------------------------------------------------------------------------------
# Native GPU runs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(CUTMIX_CASES))
def test_gpu_cutmix_matches_reference(name):
    check_cutmix_report(compare_cutmix(name, "cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(PHOTO_CASES))
def test_gpu_photometric_matches_reference(name):
    check_photo_report(compare_photometric(name, "cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_imagenet_batch_views_and_launches():
    """256 x 224² through the loader hand-off and make_views on CUDA: the references' results, and at most 6
    launches per view (counted on the GPU; make_views' host work excluded by device)."""
    from bsim_fast import augment, mix
    from bsim_fast.config import Config
    from bsim_fast.tools.counting import count_launches

    cfg = Config()
    cfg.method.mode = "bsim"
    policies = augment.policy_for(cfg)
    n, s = 256, 224
    pair = torch.randint(0, 256, (n, 2, s, s, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)).cuda()
    out = [augment.photometric(pair[:, v], policies[v], torch.Generator("cuda").manual_seed(v)) for v in (0, 1)]
    ref = [
        augment.photometric_reference(pair[:, v], policies[v], torch.Generator("cuda").manual_seed(v)) for v in (0, 1)
    ]
    for o, r in zip(out, ref):
        diff = (o.int() - r.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.1
    views = mix.make_views(out[0], out[1], cfg, torch.Generator().manual_seed(4), torch.bfloat16)
    ref_plain, _ = mix.cutmix_normalize_reference(out[0], None, None, MEAN, STD, torch.bfloat16)
    assert torch.equal(views["plain_a"], ref_plain) and views["partner"].is_cuda and views["lam_a"].is_cuda
    partner, boxes = views["partner"], mix.sample_boxes(n, s, s, 1.0, generator=torch.Generator().manual_seed(5))[0]
    stats = mix.check_cutmix_inputs(out[0], partner.cpu(), boxes, MEAN, STD, torch.bfloat16)
    boxes = boxes.cuda()

    def on_device():
        g = torch.Generator("cuda").manual_seed(0)
        a = augment.photometric(pair[:, 0], policies[0], g)
        b = augment.photometric(pair[:, 1], policies[1], g)
        mix._normalize_checked(a, partner, boxes, *stats, torch.bfloat16)
        mix._normalize_checked(b, partner, boxes, *stats, torch.bfloat16)

    assert count_launches(on_device)["launches"] / 2 + 0.5 <= 6


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_offsets_beyond_int32():
    """N·H·W·3 > 2**31: the last images (int64 base offsets) are still right, in-box content included."""
    from bsim_fast import mix

    n, h, w = 14300, 224, 224  # 2.15e9 input bytes
    free, _ = torch.cuda.mem_get_info()
    if free < n * h * w * 3 * 5 * 1.2:
        pytest.skip("not enough GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(5)
    views = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, device="cuda", generator=gen)
    partner = torch.arange(n, device="cuda").roll(1)  # image i mixes with i-1: last images cross 2**31
    boxes = torch.tensor([[10, 200, 20, 180]] * n, dtype=torch.int32, device="cuda")
    plain, mixed = mix.cutmix_normalize(views, partner, boxes, MEAN, STD, torch.bfloat16)
    last = torch.arange(n - 3, n, device="cuda")
    sub_views = torch.cat([views[last - 1], views[last]])  # partners first, then the images
    sub_partner = torch.tensor([3, 4, 5, 0, 1, 2], device="cuda")  # images 3..5 mix with 0..2
    ref_plain, ref_mixed = mix.cutmix_normalize_reference(sub_views, sub_partner, boxes[:6], MEAN, STD, torch.bfloat16)
    assert torch.equal(plain[last], ref_plain[3:]) and torch.equal(mixed[last], ref_mixed[3:])


# ----------------------------------------------------------------------------------------------------------
# Subprocess entry point: every interpreter case, one JSON line each
# ----------------------------------------------------------------------------------------------------------


def _run_interpreter_cases(bench_json: str) -> int:
    import time

    assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("BSIM_FAST_TRITON") == "1"
    torch.manual_seed(0)
    jobs = [(f"cutmix:{name}", lambda name=name: compare_cutmix(name, "cpu")) for name in sorted(CUTMIX_CASES)]
    jobs += [
        (f"photometric:{name}", lambda name=name: compare_photometric(name, "cpu")) for name in sorted(PHOTO_CASES)
    ]
    jobs.append(("photometric:tied_order_keys", compare_tied_order_keys))
    jobs += [(f"budget:{mode}", lambda mode=mode: view_budget_counts(mode)) for mode in ("bsim", "sim")]

    def bench():
        from bsim_fast.tools import kernel_bench

        kernel_bench._main(["--tiny", "--json", bench_json])
        return {}

    jobs.append(("__bench__", bench))
    for name, job in jobs:
        t0 = time.perf_counter()
        try:
            rep = job()
        except Exception as exc:  # reported, and failed, by the parent test
            rep = {"error": f"{type(exc).__name__}: {exc}"}
        rep.update(name=name, seconds=round(time.perf_counter() - t0, 3))
        print("CASE " + json.dumps(rep), flush=True)
    return 0


if __name__ == "__main__" and "--interpreter-cases" in sys.argv:
    sys.path.insert(0, str(ROOT))
    sys.exit(_run_interpreter_cases(sys.argv[sys.argv.index("--interpreter-cases") + 1]))
