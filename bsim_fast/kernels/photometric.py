"""Batched photometric augmentation in three Triton kernels (the PyTorch reference is `bsim_fast.augment`).

Per view and batch, on uint8 views ``x[N, H, W, 3]`` (any strides: the loaders pass a view of their
``[N, 2, H, W, 3]`` batch, the GPU-resident loader a permuted NCHW one) and the per-sample uniforms
``u[N, 13]`` that `augment.photometric` draws from the batch's generator (the reference draws the same ones,
so both paths apply the same parameters; the columns are listed in `augment._draw`):

1. ``_contrast_mean_kernel`` (only when the policy jitters contrast): for each sample that jitters, the ops
   that come before contrast in the sample's own random order, then the sum of the grey levels, one partial
   sum per tile. Contrast blends with the grey mean of the image *at that point of the order*, which a
   pointwise kernel cannot know; this pass computes it exactly (the next kernels add the partial sums in a
   fixed order: deterministic). Programs of samples that do not jitter exit at once.
2. ``_pointwise_kernel``: for the samples that do not blur, colour jitter in the sample's order
   (brightness, contrast around that mean, saturation, hue in HSV), grayscale, solarize, and the one
   rounding to uint8. Each program is one tile of one sample, so the order is a branch per program: a
   sample runs its 4 ops, not all 16 (slot, op) pairs.
3. ``_blur_kernel`` (only when the policy blurs): for the samples that blur, the same pointwise ops on a
   square input tile with a halo of ``k // 2`` reflected pixels (pointwise ops commute with the
   reflection), the separable Gaussian blur (per-sample sigma) as two products with a banded weight matrix
   on the tensor cores, ``out = Wᵀ · (X · W)`` with ``W[j, a] = w[j - a]``, then solarize and round.

Which samples jitter, blur or solarize is read by the kernels from ``u``: programs of the other samples exit
at once, so no host sync decides anything. Every op is evaluated in fp32 on the 0..255 scale, as the
reference does; the blur products take fp16 operands (exact for uint8 input, about three significant
digits for the weights and the intermediate), which keeps every output within one grey level of the
reference (tests/test_kernels.py). Memory per view: the input is read once, twice when contrast jitters
(plus the blur's halo, mostly cache hits), the output written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["photometric", "blur_tile", "BLOCK_PIXELS", "NUM_WARPS", "BLUR_WARPS"]

BLOCK_PIXELS = 1024   # pixels per program of the pointwise kernels: 8 per thread with 4 warps
NUM_WARPS = 4
BLUR_WARPS = {16: 4, 32: 4, 64: 8, 128: 8}   # per blur tile side: a 64-tile's 4096 pixels are 16 per thread

# torchvision's rgb_to_grayscale weights (as augment.GRAY_WEIGHTS)
GRAY_R, GRAY_G, GRAY_B = tl.constexpr(0.2989), tl.constexpr(0.587), tl.constexpr(0.114)
ROUND_MAGIC = tl.constexpr(12582912.0)   # 1.5 * 2**23: (x + M) - M rounds fp32 x in 0..255 to nearest even


# ---- pointwise ops on the three fp32 channels of a block of pixels (0..255) ------------------------------

@triton.jit
def _gray(r, g, b):
    return r * GRAY_R + g * GRAY_G + b * GRAY_B


@triton.jit
def _clamp255(x):
    return tl.minimum(tl.maximum(x, 0.0), 255.0)


@triton.jit
def _blend(r, g, b, o_r, o_g, o_b, f):
    return (_clamp255(r * f + o_r * (1.0 - f)), _clamp255(g * f + o_g * (1.0 - f)),
            _clamp255(b * f + o_b * (1.0 - f)))


@triton.jit
def _brightness(r, g, b, f):
    return _clamp255(r * f), _clamp255(g * f), _clamp255(b * f)


@triton.jit
def _saturation(r, g, b, f):
    y = _gray(r, g, b)
    return _blend(r, g, b, y, y, y, f)


@triton.jit
def _hue(r, g, b, shift):
    # HSV -> RGB keeps max (V) and min, so out = min + chroma * ramp_c(h + shift) (as the reference)
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    chroma = maxc - minc
    safe = tl.where(chroma > 0.0, chroma, 1.0)
    h6 = tl.where(maxc == r, (g - b) / safe, tl.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    t = h6 / 6.0 + shift
    h = (t - tl.floor(t)) * 6.0
    ramp_r = tl.minimum(tl.maximum(tl.abs(h - 3.0) - 1.0, 0.0), 1.0)
    ramp_g = tl.minimum(tl.maximum(2.0 - tl.abs(h - 2.0), 0.0), 1.0)
    ramp_b = tl.minimum(tl.maximum(2.0 - tl.abs(h - 4.0), 0.0), 1.0)
    return minc + chroma * ramp_r, minc + chroma * ramp_g, minc + chroma * ramp_b


@triton.jit
def _solarize(x):
    # threshold at 127.5, so that the decision agrees with the uint8 value the rounding produces
    return tl.where(x >= 127.5, 255.0 - x, x)


@triton.jit
def _to_u8(x):
    # the one rounding of the whole transform, half to even as torch.round
    return ((_clamp255(x) + ROUND_MAGIC) - ROUND_MAGIC).to(tl.uint8)


@triton.jit
def _rank(k, a, b, c, d, J: tl.constexpr):
    """Position of key k (the J-th of a, b, c, d) in a stable ascending sort: the reference's argsort."""
    rank = (a < k).to(tl.int32) + (b < k).to(tl.int32) + (c < k).to(tl.int32) + (d < k).to(tl.int32)
    if J > 0:
        rank += (a == k).to(tl.int32)
    if J > 1:
        rank += (b == k).to(tl.int32)
    if J > 2:
        rank += (c == k).to(tl.int32)
    return rank


@triton.jit
def _sample_params(u_ptr, img, jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue):
    """Per-sample jitter decision, factors and op ranks from the sample's uniforms, as the reference
    (columns: 0 jitter?, 1-3 factors, 4 hue, 5-8 order keys; 9 grayscale?, 10 blur?, 11 sigma, 12 solarize?)."""
    row = u_ptr + img * 13
    jitter = tl.load(row + 0) < jitter_p
    fb = b_lo + b_span * tl.load(row + 1)
    fc = c_lo + c_span * tl.load(row + 2)
    fs = s_lo + s_span * tl.load(row + 3)
    shift = (tl.load(row + 4) * 2.0 - 1.0) * hue
    k0 = tl.load(row + 5)
    k1 = tl.load(row + 6)
    k2 = tl.load(row + 7)
    k3 = tl.load(row + 8)
    return (jitter, fb, fc, fs, shift, _rank(k0, k0, k1, k2, k3, 0), _rank(k1, k0, k1, k2, k3, 1),
            _rank(k2, k0, k1, k2, k3, 2), _rank(k3, k0, k1, k2, k3, 3))


@triton.jit
def _jitter(r, g, b, rank_b, rank_c, rank_s, rank_h, fb, fc, fs, shift, cmean, UNTIL_CONTRAST: tl.constexpr,
            HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_S: tl.constexpr, HAS_H: tl.constexpr):
    """The four jitter ops in the sample's order (slot k runs the op whose rank is k); UNTIL_CONTRAST stops
    before contrast (the first pass). Branches are per program (one sample), so each runs only its op."""
    for slot in tl.static_range(4):
        if UNTIL_CONTRAST:
            stop = rank_c <= slot
        else:
            stop = rank_c < 0   # never
        if HAS_B:
            if (rank_b == slot) & (stop == 0):
                r, g, b = _brightness(r, g, b, fb)
        if HAS_C and not UNTIL_CONTRAST:
            if rank_c == slot:
                r, g, b = _blend(r, g, b, cmean, cmean, cmean, fc)
        if HAS_S:
            if (rank_s == slot) & (stop == 0):
                r, g, b = _saturation(r, g, b, fs)
        if HAS_H:
            if (rank_h == slot) & (stop == 0):
                r, g, b = _hue(r, g, b, shift)
    return r, g, b


@triton.jit
def _load_pixels(x_ptr, img, pix, mask, sN, sH, sW, sC, W: tl.constexpr):
    y = pix // W
    off = img.to(tl.int64) * sN + y * sH + (pix - y * W) * sW
    r = tl.load(x_ptr + off, mask=mask, other=0).to(tl.float32)
    g = tl.load(x_ptr + off + sC, mask=mask, other=0).to(tl.float32)
    b = tl.load(x_ptr + off + 2 * sC, mask=mask, other=0).to(tl.float32)
    return r, g, b


# ---- kernel 1: grey sums of the image as contrast sees it ------------------------------------------------

@triton.jit
def _contrast_mean_kernel(
    x_ptr, u_ptr, partial_ptr,  # uint8 views (strided), fp32 [N, 13], fp32 [N, TILES]
    sN, sH, sW, sC,
    jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue,
    HW, TILES,
    W: tl.constexpr, BLOCK: tl.constexpr,
    HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_H: tl.constexpr,
):
    pid = tl.program_id(0)
    img = pid // TILES
    tile = pid - img * TILES
    jitter, fb, fc, fs, shift, rb, rc, rs, rh = _sample_params(u_ptr, img, jitter_p, b_lo, b_span, c_lo,
                                                               c_span, s_lo, s_span, hue)
    if jitter:
        pix = tile * BLOCK + tl.arange(0, BLOCK)
        mask = pix < HW
        r, g, b = _load_pixels(x_ptr, img, pix, mask, sN, sH, sW, sC, W)
        r, g, b = _jitter(r, g, b, rb, rc, rs, rh, fb, fc, fs, shift, 0.0, True, HAS_B, False, HAS_S, HAS_H)
        tl.store(partial_ptr + pid, tl.sum(tl.where(mask, _gray(r, g, b), 0.0), axis=0))


@triton.jit
def _color(r, g, b, img, u_ptr, partial_ptr,
           jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue, gray_p, HW, TILES,
           TILES_P2: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_S: tl.constexpr,
           HAS_H: tl.constexpr, HAS_GRAY: tl.constexpr):
    """Colour jitter in the sample's order, then grayscale: the pointwise part before the blur."""
    jitter, fb, fc, fs, shift, rb, rc, rs, rh = _sample_params(u_ptr, img, jitter_p, b_lo, b_span, c_lo,
                                                               c_span, s_lo, s_span, hue)
    if jitter:
        cmean = 0.0
        if HAS_C:   # the first pass's partial sums, in a fixed order (deterministic)
            t = tl.arange(0, TILES_P2)
            cmean = tl.sum(tl.load(partial_ptr + img * TILES + t, mask=t < TILES, other=0.0), axis=0) / HW
        r, g, b = _jitter(r, g, b, rb, rc, rs, rh, fb, fc, fs, shift, cmean, False, HAS_B, HAS_C, HAS_S, HAS_H)
    if HAS_GRAY:
        if tl.load(u_ptr + img * 13 + 9) < gray_p:
            y = _gray(r, g, b)
            r, g, b = y, y, y
    return r, g, b


# ---- kernel 2: jitter, grayscale, solarize, round: the samples that do not blur -------------------------

@triton.jit
def _pointwise_kernel(
    x_ptr, u_ptr, partial_ptr, out_ptr,  # out: uint8 [N, H, W, 3] contiguous
    sN, sH, sW, sC,
    jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue, gray_p, blur_p, solarize_p,
    HW, TILES,
    W: tl.constexpr, BLOCK: tl.constexpr, TILES_P2: tl.constexpr,
    HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_S: tl.constexpr, HAS_H: tl.constexpr,
    HAS_GRAY: tl.constexpr, HAS_BLUR: tl.constexpr, HAS_SOLARIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    img = pid // TILES
    tile = pid - img * TILES
    row = u_ptr + img * 13
    blur = False
    if HAS_BLUR:
        blur = tl.load(row + 10) < blur_p
    if not blur:   # a sample that blurs is kernel 3's
        pix = tile * BLOCK + tl.arange(0, BLOCK)
        mask = pix < HW
        r, g, b = _load_pixels(x_ptr, img, pix, mask, sN, sH, sW, sC, W)
        r, g, b = _color(r, g, b, img, u_ptr, partial_ptr, jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span,
                         hue, gray_p, HW, TILES, TILES_P2, HAS_B, HAS_C, HAS_S, HAS_H, HAS_GRAY)
        if HAS_SOLARIZE:
            if tl.load(row + 12) < solarize_p:
                r, g, b = _solarize(r), _solarize(g), _solarize(b)
        dst = out_ptr + img.to(tl.int64) * (3 * HW) + pix * 3
        tl.store(dst, _to_u8(r), mask=mask)
        tl.store(dst + 1, _to_u8(g), mask=mask)
        tl.store(dst + 2, _to_u8(b), mask=mask)


# ---- kernel 3: the samples that blur: jitter, grayscale, Gaussian blur, solarize, round -----------------

@triton.jit
def _reflect(i, n):
    i = tl.where(i < 0, -i, i)
    i = tl.where(i > n - 1, 2 * (n - 1) - i, i)
    return tl.minimum(tl.maximum(i, 0), n - 1)   # only a side of 1 pixel needs this (the reference refuses it)


@triton.jit
def _blur_kernel(
    x_ptr, u_ptr, partial_ptr, out_ptr,
    sN, sH, sW, sC,
    jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue, gray_p, blur_p, sigma_lo, sigma_span, solarize_p,
    TILES, TILES_X, BLUR_TILES,
    H: tl.constexpr, W: tl.constexpr, KSIZE: tl.constexpr, KSIZE_P2: tl.constexpr, T: tl.constexpr,
    TILES_P2: tl.constexpr,
    HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_S: tl.constexpr, HAS_H: tl.constexpr,
    HAS_GRAY: tl.constexpr, HAS_SOLARIZE: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    OT: tl.constexpr = T - 2 * PAD   # output pixels per tile side; the rest is the halo
    pid = tl.program_id(0)
    img = pid // BLUR_TILES
    tile = pid - img * BLUR_TILES
    row = u_ptr + img * 13
    if tl.load(row + 10) < blur_p:
        ty = tile // TILES_X
        tx = tile - ty * TILES_X
        # the input tile with its reflected halo, coloured as kernel 2 colours (pointwise ops commute with
        # the reflection)
        i = tl.arange(0, T)
        rows = _reflect(ty * OT - PAD + i, H)
        cols = _reflect(tx * OT - PAD + i, W)
        # only the pixels that some stored output needs (the last tile of a row or column is partly outside)
        need = ((i < tl.minimum(H - ty * OT, OT) + 2 * PAD)[:, None]
                & (i < tl.minimum(W - tx * OT, OT) + 2 * PAD)[None, :])
        src = x_ptr + img.to(tl.int64) * sN + rows[:, None] * sH + cols[None, :] * sW
        r = tl.load(src, mask=need, other=0).to(tl.float32)
        g = tl.load(src + sC, mask=need, other=0).to(tl.float32)
        b = tl.load(src + 2 * sC, mask=need, other=0).to(tl.float32)
        r, g, b = _color(r, g, b, img, u_ptr, partial_ptr, jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span,
                         hue, gray_p, H * W, TILES, TILES_P2, HAS_B, HAS_C, HAS_S, HAS_H, HAS_GRAY)

        # normalised Gaussian taps w[t] = exp(-((t - PAD) / sigma)^2 / 2) / sum, as the band of a matrix
        sigma = sigma_lo + sigma_span * tl.load(row + 11)
        taps = tl.arange(0, KSIZE_P2)
        z = (taps - PAD).to(tl.float32) / sigma
        total = tl.sum(tl.where(taps < KSIZE, tl.exp(-0.5 * z * z), 0.0), axis=0)
        d = tl.arange(0, T)[:, None] - tl.arange(0, T)[None, :]
        zd = (d - PAD).to(tl.float32) / sigma
        band = tl.where((d >= 0) & (d < KSIZE), tl.exp(-0.5 * zd * zd) / total, 0.0).to(tl.float16)
        band_t = tl.trans(band)

        out_r = ty * OT + tl.arange(0, T)
        out_c = tx * OT + tl.arange(0, T)
        keep = ((tl.arange(0, T) < OT) & (out_r < H))[:, None] & ((tl.arange(0, T) < OT) & (out_c < W))[None, :]
        dst = out_ptr + img.to(tl.int64) * (3 * H * W) + (out_r[:, None] * W + out_c[None, :]) * 3
        solarize = False
        if HAS_SOLARIZE:
            solarize = tl.load(row + 12) < solarize_p
        for c in tl.static_range(3):
            if c == 0:
                x = r
            elif c == 1:
                x = g
            else:
                x = b
            across = tl.dot(x.to(tl.float16), band, out_dtype=tl.float32)                # [rows, out cols]
            blurred = tl.dot(band_t, across.to(tl.float16), out_dtype=tl.float32)      # [out rows, out cols]
            if solarize:
                blurred = _solarize(blurred)
            tl.store(dst + c, _to_u8(blurred), mask=keep)


# ---- launcher --------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def blur_tile(kernel_size: int, side: int) -> int:
    """Input tile side of the blur: a power of two (a tensor-core operand) with room for the halo of
    2 * (kernel_size // 2) pixels: the whole image and its halo when that fits in 64, else 64 (128 for
    kernels over 25 taps). A 224 image (23 taps) takes 6 x 6 tiles of 42 output pixels."""
    halo = 2 * (kernel_size // 2)
    if side + halo <= 64:
        return max(16, _next_pow2(side + halo))
    return 64 if halo <= 24 else 128


def photometric(views_u8: torch.Tensor, u: torch.Tensor, policy, kernel_size: int) -> torch.Tensor:
    """Launch on already-validated tensors on one device (CUDA, or CPU under the interpreter).

    ``views_u8`` uint8 [N, H, W, 3], any strides; ``u`` fp32 [N, 13] contiguous, the reference's uniforms;
    ``policy`` has the fields of `augment.ViewPolicy` (jitter_p, brightness, contrast, saturation, hue,
    gray_p, blur_p, blur_sigma, solarize_p); ``kernel_size`` the blur's (odd). Returns uint8 [N, H, W, 3]
    contiguous. Launches 1 to 3 kernels, decided by the policy alone (no host sync).
    """
    n, h, w, _ = views_u8.shape
    device = views_u8.device
    out = torch.empty((n, h, w, 3), dtype=torch.uint8, device=device)
    if out.numel() == 0:
        return out
    hw = h * w
    tiles = triton.cdiv(hw, BLOCK_PIXELS)
    jit = policy.jitter_p > 0
    has_b, has_c = jit and policy.brightness > 0, jit and policy.contrast > 0
    has_s, has_h = jit and policy.saturation > 0, jit and policy.hue > 0

    def factor(strength):   # torchvision: U(max(0, 1 - s), 1 + s) = lo + span * u
        lo = max(0.0, 1.0 - strength)
        return lo, 1.0 + strength - lo

    jitter_args = (policy.jitter_p, *factor(policy.brightness), *factor(policy.contrast),
                   *factor(policy.saturation), policy.hue)
    strides = views_u8.stride()
    partial = torch.empty((n, tiles), dtype=torch.float32, device=device) if has_c else out
    if has_c:
        _contrast_mean_kernel[(n * tiles,)](
            views_u8, u, partial, *strides, *jitter_args, hw, tiles,
            W=w, BLOCK=BLOCK_PIXELS, HAS_B=has_b, HAS_S=has_s, HAS_H=has_h, num_warps=NUM_WARPS)
    flags = dict(TILES_P2=_next_pow2(tiles), HAS_B=has_b, HAS_C=has_c, HAS_S=has_s, HAS_H=has_h,
                 HAS_GRAY=policy.gray_p > 0, HAS_SOLARIZE=policy.solarize_p > 0)
    blur = policy.blur_p > 0
    _pointwise_kernel[(n * tiles,)](
        views_u8, u, partial, out, *strides, *jitter_args, policy.gray_p, policy.blur_p, policy.solarize_p,
        hw, tiles, W=w, BLOCK=BLOCK_PIXELS, HAS_BLUR=blur, num_warps=NUM_WARPS, **flags)
    if blur:
        t = blur_tile(kernel_size, max(h, w))
        out_tile = t - 2 * (kernel_size // 2)
        tiles_y, tiles_x = triton.cdiv(h, out_tile), triton.cdiv(w, out_tile)
        lo, hi = policy.blur_sigma
        _blur_kernel[(n * tiles_y * tiles_x,)](
            views_u8, u, partial, out, *strides, *jitter_args, policy.gray_p, policy.blur_p, lo, hi - lo,
            policy.solarize_p, tiles, tiles_x, tiles_y * tiles_x,
            H=h, W=w, KSIZE=kernel_size, KSIZE_P2=_next_pow2(kernel_size), T=t, num_warps=BLUR_WARPS[t], **flags)
    return out
