"""Fused CutMix + normalisation as one Triton kernel (SPEC §1, issue #4).

The loader hands over uint8 NHWC views ``x[N, H, W, 3]``. Training wants, in the training dtype and
channels_last memory (``[N, 3, H, W]`` logical, NHWC physical):

* ``plain[i] = (x[i] - mean) / std``
* ``mixed[i] = plain[partner[i]]`` inside ``box[i] = (y0, y1, x0, x1)`` (half-open), ``plain[i]`` outside.

Design (why it looks like this):

* **Read once.** The partner is a derangement, i.e. a permutation, so every image ``j`` is the partner of
  exactly one image ``i = partner^{-1}[j]``. The program that owns a tile of image ``j`` loads that tile once
  and writes three things from it: ``plain[j]``, ``mixed[j]`` outside ``box[j]`` and ``mixed[i]`` inside
  ``box[i]``. Every input byte is read exactly once and every output byte written exactly once, so the
  kernel moves the minimum ``N·H·W·3·(1 + 2·sizeof(dtype))`` bytes. The inverse permutation is a tiny
  sort in the wrapper. The alternative (the program for ``i`` also loads the partner's pixels inside ``box[i]``)
  reads ``1 + box fraction`` times the input; it is kept as the fallback for a partner that is not a
  permutation (still valid input for the reference). The choice is a flag computed on the device and
  branched on inside the kernel, so it costs no host synchronisation.
* **Flat tiles.** An image is ``H·W·3`` contiguous bytes, so a program takes ``BLOCK`` consecutive bytes of
  one image, whatever the image shape: consecutive lanes touch consecutive bytes (coalesced), and the
  channel is ``offset % 3``. The row is ``offset // (3W)`` with ``3W`` a compile-time constant (a
  multiply-high instead of an integer division per element; training uses one or two resolutions, so one
  or two compilations).
* **Block size.** ``BLOCK = 4096`` elements, 8 warps: 4 KB in and 16 KB (bf16) or 32 KB (fp32) out per
  program, 16 elements per thread (about 130 registers on sm_90, so two programs per SM), and a 224×224
  image (150 528 bytes) splits into 36.75 tiles, so the ragged last tile wastes < 1 %.
  ``bench_cutmix(sweep=True)`` times the other (BLOCK, num_warps) pairs to re-check the choice.
* **Layout.** The box masks vary per element, so the mixed stores cannot be vectors; the store offsets
  carry ``max_contiguous(…, 1)`` so Triton gives each thread one element with consecutive lanes, i.e. every
  warp-wide load or store touches whole 32-byte sectors, instead of scalar stores with gaps between lanes.
* **Offsets.** Within an image offsets are int32 (``H·W·3 < 2^31`` is checked); the image base is int64
  because ``N·H·W·3`` exceeds 2^31 for large batches.
* **Exact fp32.** The PyTorch reference in ``bsim_fast.mix`` computes ``(float(x) - mean) / std`` in fp32;
  the kernel applies the same ops, the division as IEEE round-to-nearest ``div_rn`` (Triton's ``/`` is an
  approximate division), so fp32 outputs are bit-identical and bf16/fp16 outputs are the same fp32 value
  rounded to nearest-even. The division costs a few more ALU ops than a multiply by ``1 / std``, hidden
  behind memory traffic in this bandwidth-bound kernel.

On a machine without a GPU the kernel runs under Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before this module is imported (the tests do this in a subprocess; ``python -m bsim_fast.cutmix_triton``
sets it itself when no GPU is present).
"""

from __future__ import annotations

import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    # Must happen before triton decorates the kernel below: @triton.jit reads the flag at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["cutmix_normalize_triton", "bench_cutmix", "INTERPRET"]

#: True when the kernel was decorated under Triton's CPU interpreter (it then takes CPU tensors).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _normalize(x, mean, std):
    # IEEE round-to-nearest division, the op the PyTorch reference applies ((x - mean) / std in fp32):
    # bit-identical fp32 output. (`/` on fp32 in Triton lowers to an approximate division.)
    return tl.math.div_rn(x.to(tl.float32) - mean, std)


@triton.jit
def _cutmix_normalize_kernel(
    x_ptr,  # uint8 [N, H, W, 3], contiguous
    plain_ptr,  # out dtype, [N, 3, H, W] channels_last == [N, H, W, 3] physically
    mixed_ptr,  # same as plain_ptr (unused when HAS_MIX is False)
    boxes_ptr,  # int32 [N, 4]: (y0, y1, x0, x1), half-open
    partner_ptr,  # int64 [N]: mixed[i] takes partner[i]'s pixels inside box[i]
    inverse_ptr,  # int64 [N]: inverse[j] = i with partner[i] == j (meaningful when the flag says permutation)
    is_perm_ptr,  # int32 [1]: 1 when partner is a permutation (computed on the device: no host sync)
    stats_ptr,  # fp32 [6]: mean[0:3], std[0:3]
    tiles_per_image,
    HW3,  # elements per image = H * W * 3 (int32-safe, checked by the wrapper)
    W3: tl.constexpr,  # elements per image row = W * 3
    HAS_MIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    out_dtype = plain_ptr.dtype.element_ty
    pid = tl.program_id(0)
    img = pid // tiles_per_image
    tile = pid - img * tiles_per_image
    offs = tile * BLOCK + tl.arange(0, BLOCK)  # int32 offset inside the image
    inb = offs < HW3
    base = img.to(tl.int64) * HW3  # int64: N * H * W * 3 may exceed 2**31

    # Per-channel constants as 6 scalar loads + selects: cheaper than a gathered load per element.
    m0 = tl.load(stats_ptr + 0)
    m1 = tl.load(stats_ptr + 1)
    m2 = tl.load(stats_ptr + 2)
    s0 = tl.load(stats_ptr + 3)
    s1 = tl.load(stats_ptr + 4)
    s2 = tl.load(stats_ptr + 5)
    chan = offs % 3
    mean = tl.where(chan == 0, m0, tl.where(chan == 1, m1, m2))
    std = tl.where(chan == 0, s0, tl.where(chan == 1, s1, s2))

    x = tl.load(x_ptr + base + offs, mask=inb, other=0)
    v = _normalize(x, mean, std).to(out_dtype)
    tl.store(plain_ptr + base + offs, v, mask=inb)

    if HAS_MIX:
        row = offs // W3
        col3 = offs - row * W3  # column * 3 + channel
        y0 = tl.load(boxes_ptr + img * 4 + 0)
        y1 = tl.load(boxes_ptr + img * 4 + 1)
        x0 = tl.load(boxes_ptr + img * 4 + 2)
        x1 = tl.load(boxes_ptr + img * 4 + 3)
        in_own = (row >= y0) & (row < y1) & (col3 >= x0 * 3) & (col3 < x1 * 3)
        # The box masks below vary per element, so these stores cannot be vectors. Left alone, Triton keeps
        # the 8-elements-per-thread layout of the vector path and issues scalar stores with 16-byte gaps
        # between lanes (16 partial-sector writes per warp instruction). Hiding the contiguity makes it
        # lay the tile out one element per thread, consecutive lanes on consecutive bytes: every warp-wide
        # access (the loads and the plain store too) then covers whole 32-byte sectors.
        soffs = tl.max_contiguous(offs, 1)
        if tl.load(is_perm_ptr) != 0:
            # Read once: mixed[img] outside its own box comes from this very tile ...
            tl.store(mixed_ptr + base + soffs, v, mask=inb & (in_own == 0))
            # ... and this tile is the partner content of image `src` inside box[src].
            src = tl.load(inverse_ptr + img)
            sy0 = tl.load(boxes_ptr + src * 4 + 0)
            sy1 = tl.load(boxes_ptr + src * 4 + 1)
            sx0 = tl.load(boxes_ptr + src * 4 + 2)
            sx1 = tl.load(boxes_ptr + src * 4 + 3)
            in_src = (row >= sy0) & (row < sy1) & (col3 >= sx0 * 3) & (col3 < sx1 * 3)
            tl.store(mixed_ptr + src * HW3 + soffs, v, mask=inb & in_src)
        else:
            # Fallback (partner not a permutation): also read the partner's pixels inside the box.
            p = tl.load(partner_ptr + img)
            xp = tl.load(x_ptr + p * HW3 + soffs, mask=inb & in_own, other=0)
            vp = _normalize(xp, mean, std).to(out_dtype)
            tl.store(mixed_ptr + base + offs, tl.where(in_own, vp, v), mask=inb)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _prepare(views_u8, partner, boxes, mean, std, dtype):
    """Validate, allocate the outputs and build the kernel's arguments (no host sync beyond validation's)."""
    # Validation is shared with the reference (one set of messages); imported here because mix.py imports
    # this module lazily for CUDA tensors. It raises before anything is launched, so the kernel never reads
    # out of bounds, and returns mean/std as the fp32 tensors the reference itself uses.
    from bsim_fast.mix import check_cutmix_inputs

    mean_t, std_t = check_cutmix_inputs(views_u8, partner, boxes, mean, std, dtype)
    device = views_u8.device
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"cutmix_normalize_triton: needs CUDA tensors, found device {device} "
            "(bsim_fast.mix.cutmix_normalize runs the PyTorch reference on CPU)"
        )
    n, h, w, _ = views_u8.shape
    hw3 = h * w * 3
    if hw3 >= 2**31:
        raise ValueError(f"cutmix_normalize_triton: an image of {h}x{w}x3 = {hw3} bytes exceeds int32 offsets")
    plain = torch.empty((n, 3, h, w), dtype=dtype, device=device, memory_format=torch.channels_last)
    mixed = None if boxes is None else torch.empty_like(plain, memory_format=torch.channels_last)
    if plain.numel() == 0:
        return plain, mixed, None
    tiles = triton.cdiv(hw3, BLOCK)
    if n * tiles >= 2**31:
        raise ValueError(f"cutmix_normalize_triton: a grid of {n} x {tiles} programs is too large")
    stats = torch.cat([mean_t, std_t]).contiguous()
    if boxes is None:
        dummy = torch.zeros(4, dtype=torch.int64, device=device)  # never read: HAS_MIX is False
        boxes_d, partner_d, inverse, is_perm, mixed_arg = dummy, dummy, dummy, dummy, plain
    else:
        # host-drawn partner/boxes (already validated on the host) travel without blocking
        boxes_d = _to_device(boxes.to(torch.int32).contiguous(), device)
        partner_d = _to_device(partner.to(torch.int64).contiguous(), device)
        # Decide read-once vs fallback on the device (a host `.item()` would stall the launch queue): partner
        # (range-checked by validation) is a permutation iff sorted it is 0..n-1, and then the sort's indices
        # are the inverse permutation. A sort, unlike a scatter, is deterministic and never syncs.
        ordered, inverse = torch.sort(partner_d, stable=True)
        is_perm = (ordered == torch.arange(n, dtype=torch.int64, device=device)).all().to(torch.int32).reshape(1)
        mixed_arg = mixed
    args = (views_u8, plain, mixed_arg, boxes_d, partner_d, inverse, is_perm, stats, tiles, hw3)
    meta = dict(W3=w * 3, HAS_MIX=boxes is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return plain, mixed, (n * tiles, args, meta)


def _launch(launch) -> None:
    grid, args, meta = launch
    _cutmix_normalize_kernel[(grid,)](*args, **meta)


def cutmix_normalize_triton(views_u8, partner, boxes, mean, std, dtype=torch.bfloat16):
    """Triton path of ``bsim_fast.mix.cutmix_normalize``: same signature, same results.

    ``views_u8`` uint8 [N, H, W, 3] contiguous; ``partner`` int [N]; ``boxes`` int [N, 4] as (y0, y1, x0, x1)
    half-open, or None (SIM: only ``plain`` is computed, ``mixed`` is None); ``mean``/``std`` 3 floats in
    0..255 units. Returns ``(plain, mixed)``, each [N, 3, H, W] in ``dtype`` with channels_last strides.
    One kernel launch; invalid input raises before it.
    """
    plain, mixed, launch = _prepare(views_u8, partner, boxes, mean, std, dtype)
    if launch is not None:
        _launch(launch)
    return plain, mixed


# --------------------------------------------------------------------------------------------------------
# Benchmark: the kernel against its PyTorch reference and against a plain device copy of the same bytes.
# --------------------------------------------------------------------------------------------------------


def _time_ms(fn, iters: int, device: torch.device) -> float:
    """Median time of ``fn`` over ``iters`` runs, in ms: CUDA events on the GPU, with L2 cleared before every
    run so the input is not served from cache (the way the loader's fresh batch arrives); wall time under
    the interpreter."""
    import statistics
    import time

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


def bench_cutmix(n=256, h=224, w=224, dtype=torch.bfloat16, iters=50, sweep=False, seed=0) -> dict:
    """Time the fused kernel, the PyTorch reference and a plain device copy of as many bytes.

    ``bytes_moved`` counts what the kernel must move at minimum: N·H·W·3 uint8 read plus two outputs
    written. ``copy_*`` is ``dst.copy_(src)`` of a uint8 buffer of half that size (so it reads and writes the
    same total), the practical bandwidth ceiling. ``sweep=True`` also times other (BLOCK, num_warps) pairs
    to re-check the defaults on new hardware. Without a GPU the kernel runs under the interpreter (tiny
    sizes only: a smoke test, not a measurement).
    """
    from bsim_fast import mix

    global BLOCK, NUM_WARPS
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError("bench_cutmix needs a GPU, or TRITON_INTERPRET=1 set before import")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    views = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen).to(device)
    partner = mix.derangement(n, generator=gen).to(device)
    boxes, lam = mix.sample_boxes(n, h, w, 1.0, generator=gen)
    boxes = boxes.to(device)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

    esize = torch.empty((), dtype=dtype).element_size()
    elems = n * h * w * 3
    bytes_moved = elems * (1 + 2 * esize)

    def kernel():
        return cutmix_normalize_triton(views, partner, boxes, mean, std, dtype)

    def reference():
        return mix.cutmix_normalize_reference(views, partner, boxes, mean, std, dtype)

    src = torch.empty(bytes_moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    kernel_ms = _time_ms(kernel, iters, device)
    # The kernel alone (validation and argument preparation done once, outside the timed region).
    launch = _prepare(views, partner, boxes, mean, std, dtype)[2]
    launch_ms = _time_ms(lambda: _launch(launch), iters, device)
    ref_ms = _time_ms(reference, iters if device.type == "cuda" else max(1, iters // 3), device)
    copy_ms = _time_ms(lambda: dst.copy_(src), iters, device)
    gbps = bytes_moved / kernel_ms / 1e6
    launch_gbps = bytes_moved / launch_ms / 1e6
    copy_gbps = 2 * src.numel() / copy_ms / 1e6
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (triton interpreter)",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "n": n,
        "h": h,
        "w": w,
        "dtype": str(dtype).replace("torch.", ""),
        "block": BLOCK,
        "num_warps": NUM_WARPS,
        "mean_box_fraction": float(1 - lam.float().mean()),
        "bytes_moved": bytes_moved,
        "kernel_ms": kernel_ms,
        "kernel_gbps": gbps,
        "kernel_only_ms": launch_ms,
        "kernel_only_gbps": launch_gbps,
        "reference_ms": ref_ms,
        "copy_ms": copy_ms,
        "copy_gbps": copy_gbps,
        "speedup_vs_reference": ref_ms / kernel_ms,
        "fraction_of_copy_bandwidth": gbps / copy_gbps,
        "kernel_only_fraction_of_copy_bandwidth": launch_gbps / copy_gbps,
    }
    if sweep and device.type == "cuda":
        saved = BLOCK, NUM_WARPS
        result["sweep"] = []
        try:
            for block in (1024, 2048, 4096, 8192, 16384):
                for warps in (4, 8, 16):
                    BLOCK, NUM_WARPS = block, warps
                    launch = _prepare(views, partner, boxes, mean, std, dtype)[2]
                    ms = _time_ms(lambda: _launch(launch), iters, device)
                    result["sweep"].append(
                        {"block": block, "num_warps": warps, "ms": ms, "gbps": bytes_moved / ms / 1e6}
                    )
        finally:
            BLOCK, NUM_WARPS = saved
    return result


def _main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Benchmark the fused CutMix + normalise Triton kernel.")
    gpu = torch.cuda.is_available()
    parser.add_argument("--n", type=int, default=256 if gpu else 4)
    parser.add_argument("--size", type=int, default=224 if gpu else 16, help="square image side")
    parser.add_argument("--height", type=int, default=None, help="overrides --size")
    parser.add_argument("--width", type=int, default=None, help="overrides --size")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--iters", type=int, default=50 if gpu else 3)
    parser.add_argument("--sweep", action="store_true", help="also time other BLOCK / num_warps choices")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    h = args.height or args.size
    w = args.width or args.size
    res = bench_cutmix(args.n, h, w, getattr(torch, args.dtype), args.iters, sweep=args.sweep)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print()
    print(f"{'':<22}{'ms':>10}{'GB/s':>10}")
    print(f"{'triton (full call)':<22}{res['kernel_ms']:>10.4f}{res['kernel_gbps']:>10.1f}")
    print(f"{'triton (kernel only)':<22}{res['kernel_only_ms']:>10.4f}{res['kernel_only_gbps']:>10.1f}")
    ref_gbps = res["bytes_moved"] / res["reference_ms"] / 1e6
    print(f"{'pytorch reference':<22}{res['reference_ms']:>10.4f}{ref_gbps:>10.1f}")
    print(f"{'device copy':<22}{res['copy_ms']:>10.4f}{res['copy_gbps']:>10.1f}")
    print(
        f"speedup vs reference {res['speedup_vs_reference']:.2f}x, "
        f"{100 * res['fraction_of_copy_bandwidth']:.1f}% of copy bandwidth "
        f"({100 * res['kernel_only_fraction_of_copy_bandwidth']:.1f}% kernel only)"
    )
    for row in res.get("sweep", []):
        print(f"  BLOCK={row['block']:<6} warps={row['num_warps']:<3} {row['ms']:.4f} ms  {row['gbps']:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
