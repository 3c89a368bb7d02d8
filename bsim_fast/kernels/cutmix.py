"""Fused normalise + CutMix: uint8 NHWC views -> normalised plain and mixed views, one kernel launch.

The loader hands over uint8 views ``x[N, H, W, 3]``. Training wants, in the training dtype and channels_last
memory (``[N, 3, H, W]`` logical, NHWC physical, so the same flat order as ``x``):

* ``plain[i] = (x[i] - mean) * inv_std`` (per channel; ``inv_std = 1 / std`` rounded to fp32 once),
* ``mixed[i] = plain[partner[i]]`` inside ``box[i] = (y0, y1, x0, x1)`` (half-open), ``plain[i]`` outside.

Design (why it looks like this):

* **Vector chunks.** A program takes ``BLOCK`` consecutive bytes of one image as a ``[CHUNKS, VEC]`` tile of
  chunks of ``VEC`` bytes, each thread owning whole chunks: ``VEC`` = 8 for bf16/fp16 output (an 8-byte
  uint8 load and a 16-byte store per chunk), 4 for fp32 (4-byte load, 16-byte store), so loads and stores
  share one register layout (no shuffle through shared memory). Triton can only prove the vectors when
  ``H * W * 3`` is a multiple of 16 (every W that is a multiple of 16, such as 224 or 32: it specialises
  integer arguments divisible by 16); other shapes compile to scalar accesses, correct and slower. The
  channel of byte k of a chunk is ``(start + k) % 3``: the (mean, 1/std) triple is rotated once per chunk
  and picked by ``k % 3``, a compile-time constant, so there is no per-byte channel arithmetic.
* **The box is a select, not a store mask.** A store mask that varies inside a chunk would split the vector
  stores, so ``mixed`` is stored whole: ``where(inside box, partner value, own value)``. The partner's bytes
  are loaded for the chunks that touch the box only (a per-chunk mask, constant over the chunk, so still
  one vector load): the kernel reads ``1 + box fraction`` times the input instead of exactly once (the mean
  box fraction is 0.32 at 224² with alpha = 1: 1.32 E + 4 E written in bf16, 6% over the 5 E minimum), for
  full-width vector stores. Any partner works (no permutation needed), nothing is prepared before the launch.
* **Per-row box test.** When a row holds whole chunks (``3 W`` a multiple of ``VEC``) the chunk's row, the
  row half of the box test and the box's column bounds relative to the chunk are computed once per chunk;
  per byte there remain two compares against its compile-time lane.
* **Multiply, do not divide.** ``(x - mean) * inv_std`` in fp32: the subtraction and the product are single
  IEEE operations on every path (no fused multiply-add can form), so fp32 outputs are bit-identical to the
  PyTorch reference, which computes the same expression (``bsim_fast.mix.cutmix_normalize_reference``).
  It differs from ``(x - mean) / std`` by at most one fp32 ulp.
* **Rounding.** bf16 and fp16 outputs are that fp32 value rounded to nearest-even, on every path: the GPU
  cast is ``cvt.rn`` (tests/test_kernels.py checks the PTX for it); Triton's interpreter
  truncates fp32 -> bf16, so under the interpreter the kernel rounds with integer operations instead.
* **Offsets.** Within an image offsets are int32 (``H * W * 3 < 2**31`` is the caller's check, see
  ``check_shape``); image bases are int64 (``N * H * W * 3`` exceeds 2**31 for large batches).

Measured without a GPU (PTX for sm_90, docs/BENCHMARKS.md "Kernels"): 23 PTX instructions per element with
CutMix, 9 without (the scalar-access kernel this replaces: ~79 with a division each).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["cutmix_normalize", "check_shape", "vec_for", "INTERPRET", "BLOCK", "NUM_WARPS"]

#: True when the kernels were decorated under Triton's CPU interpreter (they then take CPU tensors).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

BLOCK = 4096      # input bytes per program
NUM_WARPS = 8


@triton.jit
def round_to(v, out_ty: tl.constexpr, INT_RNE: tl.constexpr):
    """fp32 -> out_ty, round to nearest even. INT_RNE: bf16 by integer ops (the interpreter's cast truncates)."""
    if INT_RNE and out_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(out_ty)


@triton.jit
def _rotate3(c0, a, b, c):
    """(a, b, c)[(c0 + k) % 3] for k = 0, 1, 2, per chunk (c0 in 0..2)."""
    r0 = tl.where(c0 == 0, a, tl.where(c0 == 1, b, c))
    r1 = tl.where(c0 == 0, b, tl.where(c0 == 1, c, a))
    r2 = tl.where(c0 == 0, c, tl.where(c0 == 1, a, b))
    return r0, r1, r2


@triton.jit
def _cutmix_normalize_kernel(
    x_ptr,  # uint8 [N, H, W, 3], contiguous
    plain_ptr,  # out dtype, [N, 3, H, W] channels_last == [N, H, W, 3] physically
    mixed_ptr,  # same as plain_ptr (not used when HAS_MIX is False)
    boxes_ptr,  # int32/int64 [N, 4]: (y0, y1, x0, x1), half-open
    partner_ptr,  # int32/int64 [N]: mixed[i] takes partner[i]'s pixels inside box[i]
    m0, m1, m2, s0, s1, s2,  # fp32: mean and 1/std per channel
    HW3,  # elements per image = H * W * 3 (int32; divisible by 16 -> vector accesses)
    tiles_per_image,
    W3: tl.constexpr,  # elements per image row = W * 3
    HAS_MIX: tl.constexpr,
    INT_RNE: tl.constexpr,
    CHUNKS: tl.constexpr,
    VEC: tl.constexpr,
):
    out_ty = plain_ptr.dtype.element_ty
    pid = tl.program_id(0)
    img = pid // tiles_per_image
    tile = pid - img * tiles_per_image
    start = (tile * CHUNKS + tl.arange(0, CHUNKS)) * VEC  # [C] first byte of each chunk in the image
    lane = tl.arange(0, VEC)[None, :]  # [1, V] byte inside the chunk (a constant per register)
    offs = start[:, None] + lane  # [C, V] int32 offset inside the image
    inb = offs < HW3
    base = img.to(tl.int64) * HW3

    # Channel of byte k of a chunk = (start + k) % 3: the three (mean, 1/std) pairs rotated once per chunk,
    # then picked by k % 3, which is known at compile time, so no per-byte channel arithmetic.
    c0 = start % 3
    ma, mb, mc = _rotate3(c0, m0, m1, m2)
    sa, sb, sc = _rotate3(c0, s0, s1, s2)
    k3 = lane % 3
    mean = tl.where(k3 == 0, ma[:, None], tl.where(k3 == 1, mb[:, None], mc[:, None]))
    inv = tl.where(k3 == 0, sa[:, None], tl.where(k3 == 1, sb[:, None], sc[:, None]))

    x = tl.load(x_ptr + base + offs, mask=inb, other=0)
    v = (x.to(tl.float32) - mean) * inv
    tl.store(plain_ptr + base + offs, round_to(v, out_ty, INT_RNE), mask=inb)

    if HAS_MIX:
        y0 = tl.load(boxes_ptr + img * 4 + 0).to(tl.int32)
        y1 = tl.load(boxes_ptr + img * 4 + 1).to(tl.int32)
        x0 = tl.load(boxes_ptr + img * 4 + 2).to(tl.int32) * 3
        x1 = tl.load(boxes_ptr + img * 4 + 3).to(tl.int32) * 3
        if W3 % VEC == 0:
            # a chunk lies in one row: the row test, and the box's column bounds relative to the chunk, once
            # per chunk; per byte two compares against its compile-time lane
            row = start // W3
            col = start - row * W3
            in_rows = (row >= y0) & (row < y1)
            inside = in_rows[:, None] & (lane >= (x0 - col)[:, None]) & (lane < (x1 - col)[:, None])
            touch = (in_rows & (col < x1) & (col + VEC > x0))[:, None]
        else:
            row = offs // W3
            col = offs - row * W3
            inside = (row >= y0) & (row < y1) & (col >= x0) & (col < x1)
            touch = tl.max(inside.to(tl.int32), axis=1)[:, None] != 0
        # the partner's chunk is read only where the chunk touches the box (a mask constant over the chunk)
        src = tl.load(partner_ptr + img).to(tl.int64)
        xp = tl.load(x_ptr + src * HW3 + offs, mask=inb & touch, other=0)
        vp = (xp.to(tl.float32) - mean) * inv
        tl.store(mixed_ptr + base + offs, round_to(tl.where(inside, vp, v), out_ty, INT_RNE), mask=inb)


def vec_for(dtype: torch.dtype) -> int:
    """Bytes of input per chunk: one 16-byte vector store of output per chunk (8 for bf16/fp16, 4 for fp32),
    so loads and stores share one register layout and need no shuffle through shared memory."""
    return max(4, 16 // torch.empty((), dtype=dtype).element_size())


def check_shape(n: int, height: int, width: int) -> str | None:
    """None when the kernel can index a batch of this shape, else why not (the caller raises)."""
    hw3 = height * width * 3
    if hw3 >= 2**31:
        return f"an image of {height}x{width}x3 = {hw3} bytes exceeds the kernel's int32 offsets"
    if n * triton.cdiv(hw3, BLOCK) >= 2**31:
        return f"a grid of {n} images x {triton.cdiv(hw3, BLOCK)} tiles is too large"
    return None


def cutmix_normalize(views_u8: torch.Tensor, partner: torch.Tensor | None, boxes: torch.Tensor | None,
                     mean: tuple, inv_std: tuple, dtype: torch.dtype, out: tuple | None = None):
    """Launch on already-validated tensors, all on one device (CUDA, or CPU under the interpreter).

    ``views_u8`` uint8 [N, H, W, 3] contiguous; ``partner`` int [N] with values in [0, N); ``boxes`` int [N, 4]
    inside the image, or None (SIM: only ``plain``); ``mean`` and ``inv_std`` 3 floats each (0..255 units,
    ``inv_std`` already 1/std rounded to fp32); ``check_shape`` passed. Returns ``(plain, mixed)``, each
    [N, 3, H, W] in ``dtype`` with channels_last strides (``mixed`` None without boxes). One launch.
    ``out = (plain, mixed)`` writes into those tensors instead (each [N, 3, H, W] in ``dtype``, channels_last
    and dense, e.g. slices of the one batch the networks read; ``mixed`` None without boxes).
    """
    n, h, w, _ = views_u8.shape
    device = views_u8.device
    if out is None:
        plain = torch.empty((n, 3, h, w), dtype=dtype, device=device, memory_format=torch.channels_last)
        mixed = None if boxes is None else torch.empty_like(plain, memory_format=torch.channels_last)
    else:
        plain, mixed = out
    if plain.numel() == 0:
        return plain, mixed
    hw3 = h * w * 3
    vec = vec_for(dtype)
    tiles = triton.cdiv(hw3, BLOCK)
    has_mix = boxes is not None
    if not has_mix:  # never read: HAS_MIX is False
        boxes, partner = views_u8, views_u8
    _cutmix_normalize_kernel[(n * tiles,)](
        views_u8, plain, mixed if has_mix else plain, boxes, partner, *mean, *inv_std, hw3, tiles,
        W3=w * 3, HAS_MIX=has_mix, INT_RNE=INTERPRET, CHUNKS=BLOCK // vec, VEC=vec, num_warps=NUM_WARPS)
    return plain, mixed
