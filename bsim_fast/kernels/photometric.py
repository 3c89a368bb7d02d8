"""Batched photometric augmentation in three Triton kernels (the PyTorch reference is `bsim_fast.augment`).

On uint8 views ``x[N, H, W, 3]`` (any strides: the loaders pass a view of their ``[N, 2, H, W, 3]`` batch, the
GPU-resident loader a permuted NCHW one) with the per-sample uniforms ``u[N, U_COLUMNS]`` that
`augment.photometric` draws (the reference reads the same columns, named once here: ``U_*``):

1. ``_contrast_mean_kernel`` (when the policy jitters contrast): the ops before contrast in each jittering
   sample's order, then the grey sum of each tile: contrast blends with the grey mean *at that point of the
   order*; the next kernels add the partial sums in a fixed order (deterministic).
2. ``_pointwise_kernel``: for the samples that do not blur, the jitter in the sample's order (a loop over the
   four slots running the op of that rank: the code holds each op once), grayscale, solarize, one rounding.
3. ``_blur_kernel`` (when the policy blurs): a program walks down a strip of an image in blocks of ``RB`` rows.
   A block (``CW`` columns: the strip and its halo) is loaded and coloured once, blurred across by a
   tensor-core product with a banded matrix into which the reflection at the image's left and right edges is
   folded (outer strips need no halo there: 2 strips of 128 columns cover 224), and each output block is the
   vertical blur of the ``WINDOW`` last blocks (Toeplitz products); then solarize, round. Block row ``v`` is
   image row ``reflect(v)``. A pixel is coloured 1.3 times at 224 (64² tiles with their halo: 2.9 times).

The kernels read from ``u`` which samples jitter, blur or solarize (no host sync). Every op is evaluated in fp32
on the 0..255 scale, as the reference; the blur products take fp16 operands (about three significant digits),
which keeps every output within one grey level of the reference (tests/test_kernels.py). The input is read
once (twice when contrast jitters; the strips' overlap mostly hits the cache), the output written once, 4 pixels
at a time as three 4-byte words where the layout allows (``W % 4 == 0``, word-aligned rows, channel-last or
planar: ``LAYOUT``, ``OUT_WORDS``), else byte by byte.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["photometric", "launch_plan", "blur_geometry", "BLOCK_PIXELS", "NUM_WARPS", "U_COLUMNS"]

BLOCK_PIXELS = 1024   # pixels per program of the pointwise kernels: 8 per thread with 4 warps
NUM_WARPS = 4
BLUR_BLOCK = 4096   # most pixels in a block of the blur (RB * CW): 8 per thread with 16 warps, <= 128 registers

# The columns of the per-sample uniforms u[N, U_COLUMNS] (augment._draw): jitter?, its three factors, hue shift,
# the 4 sort keys of the jitter order, grey?, blur? (with sigma), solarize?. tl.constexpr: what kernels can read.
U_JITTER, U_BRIGHTNESS, U_CONTRAST, U_SATURATION, U_HUE = (tl.constexpr(c) for c in range(5))
U_ORDER = tl.constexpr(5)   # 5..8
U_GRAY, U_BLUR, U_SIGMA, U_SOLARIZE, U_COLUMNS = (tl.constexpr(c) for c in range(9, 14))

# input layouts (LAYOUT): any strides, byte by byte; 4 pixels in 3 words, channel-last or planar
BYTES, CHANNEL_LAST_WORDS, PLANAR_WORDS = (tl.constexpr(c) for c in range(3))

# torchvision's rgb_to_grayscale weights (as augment.GRAY_WEIGHTS)
GRAY_R, GRAY_G, GRAY_B = tl.constexpr(0.2989), tl.constexpr(0.587), tl.constexpr(0.114)
ROUND_MAGIC = tl.constexpr(12582912.0)   # 1.5 * 2**23: x + M rounds fp32 x in 0..255 to nearest even


# ---- pointwise ops on the three fp32 channels of a block of pixels (0..255) ------------------------------

@triton.jit
def _gray(r, g, b):
    return r * GRAY_R + g * GRAY_G + b * GRAY_B


@triton.jit
def _blend(x, other, f):
    return tl.minimum(tl.maximum(x * f + other * (1.0 - f), 0.0), 255.0)


@triton.jit
def _hue(r, g, b, shift):
    # HSV -> RGB keeps max (V) and min, so out = min + chroma * ramp_c(h + shift) (as the reference)
    maxc, minc = tl.maximum(tl.maximum(r, g), b), tl.minimum(tl.minimum(r, g), b)
    chroma = maxc - minc
    safe = tl.where(chroma > 0.0, chroma, 1.0)
    # one division: the numerator and the sector offset picked first (x + 0.0 == x: the reference's values)
    num = tl.where(maxc == r, g - b, tl.where(maxc == g, b - r, r - g))
    h6 = num / safe + tl.where(maxc == r, 0.0, tl.where(maxc == g, 2.0, 4.0))
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
def _to_byte(x):
    # the one rounding of the whole transform, half to even as torch.round: the low bits of x + 1.5 * 2**23.
    # x is in 0..255 (every op clamps or blends within it; the blur clamps its sum, whose weights are fp16)
    return (x + ROUND_MAGIC).to(tl.uint32, bitcast=True) & 255


@triton.jit
def _rank(k, a, b, c, d, J: tl.constexpr):
    """Position of key k (the J-th of a, b, c, d) in a stable ascending sort: the reference's argsort."""
    rank = (a < k).to(tl.int32) + (b < k).to(tl.int32) + (c < k).to(tl.int32) + (d < k).to(tl.int32)
    for i in tl.static_range(J):   # an equal key earlier in the list comes first
        rank += ((a, b, c)[i] == k).to(tl.int32)
    return rank


@triton.jit
def _sample_params(u_ptr, img, jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue):
    """Per-sample jitter decision, factors and op ranks from the sample's uniforms, as the reference."""
    row = u_ptr + img * U_COLUMNS
    jitter = tl.load(row + U_JITTER) < jitter_p
    fb, fc = b_lo + b_span * tl.load(row + U_BRIGHTNESS), c_lo + c_span * tl.load(row + U_CONTRAST)
    fs = s_lo + s_span * tl.load(row + U_SATURATION)
    shift = (tl.load(row + U_HUE) * 2.0 - 1.0) * hue
    k0, k1 = tl.load(row + U_ORDER), tl.load(row + U_ORDER + 1)
    k2, k3 = tl.load(row + U_ORDER + 2), tl.load(row + U_ORDER + 3)
    return (jitter, fb, fc, fs, shift, _rank(k0, k0, k1, k2, k3, 0), _rank(k1, k0, k1, k2, k3, 1),
            _rank(k2, k0, k1, k2, k3, 2), _rank(k3, k0, k1, k2, k3, 3))


@triton.jit
def _jitter(r, g, b, rank_b, rank_c, rank_s, rank_h, fb, fc, fs, shift, cmean, UNTIL_CONTRAST: tl.constexpr,
            HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_S: tl.constexpr, HAS_H: tl.constexpr):
    """The jitter ops in the sample's order: slot k runs the op of rank k (a loop: the code holds each op once;
    UNTIL_CONTRAST: only slots below contrast's rank; a constant trip count, as triton 3.6's interpreter fails
    on a runtime one under numpy 2.4). Brightness needs no clamp at 0: x and the factor are >= 0."""
    for slot in range(0, 4):
        active = slot < rank_c if UNTIL_CONTRAST else slot < 4
        if HAS_B:
            if (rank_b == slot) & active:
                r, g, b = tl.minimum(r * fb, 255.0), tl.minimum(g * fb, 255.0), tl.minimum(b * fb, 255.0)
        if HAS_C and not UNTIL_CONTRAST:
            if rank_c == slot:
                r, g, b = _blend(r, cmean, fc), _blend(g, cmean, fc), _blend(b, cmean, fc)
        if HAS_S:
            if (rank_s == slot) & active:
                y = _gray(r, g, b)
                r, g, b = _blend(r, y, fs), _blend(g, y, fs), _blend(b, y, fs)
        if HAS_H:
            if (rank_h == slot) & active:
                r, g, b = _hue(r, g, b, shift)
    return r, g, b


# ---- pixels in and out, 4 at a time: values [..., 2, 2], pixel 2k + j of a group at [..., k, j] -----------

@triton.jit
def _quad(p0, p1, p2, p3):
    return tl.join(tl.join(p0, p2), tl.join(p1, p3))


@triton.jit
def _unquad(x):
    even, odd = tl.split(x)
    p0, p2 = tl.split(even)
    p1, p3 = tl.split(odd)
    return p0, p1, p2, p3


@triton.jit
def _byte_of(w0, w1, w2, K: tl.constexpr):
    """Byte K (0..11, little-endian) of the words w0, w1, w2, as fp32."""
    return (((w0, w1, w2)[K // 4] >> (8 * (K % 4))) & 255).to(tl.float32)


@triton.jit
def _channel_of(w0, w1, w2, C: tl.constexpr, LAYOUT: tl.constexpr):
    """Channel C of the 4 pixels held by the words: bytes C, 3 + C, 6 + C, 9 + C channel-last; word C planar."""
    STEP: tl.constexpr = 3 if LAYOUT == CHANNEL_LAST_WORDS else 1
    K: tl.constexpr = C if LAYOUT == CHANNEL_LAST_WORDS else 4 * C
    return _quad(_byte_of(w0, w1, w2, K), _byte_of(w0, w1, w2, K + STEP), _byte_of(w0, w1, w2, K + 2 * STEP),
                 _byte_of(w0, w1, w2, K + 3 * STEP))


@triton.jit
def _load_rgb(x_ptr, group_off, group_mask, pixel_off, pixel_mask, sC, LAYOUT: tl.constexpr):
    """fp32 r, g, b [..., 2, 2] of the groups of 4 pixels at byte offsets group_off [...] (words: three 4-byte
    loads per group) or of the pixels at pixel_off [..., 2, 2] (bytes: any strides)."""
    if LAYOUT == BYTES:
        r = tl.load(x_ptr + pixel_off, mask=pixel_mask, other=0).to(tl.float32)
        g = tl.load(x_ptr + pixel_off + sC, mask=pixel_mask, other=0).to(tl.float32)
        b = tl.load(x_ptr + pixel_off + 2 * sC, mask=pixel_mask, other=0).to(tl.float32)
    else:
        words = x_ptr.to(tl.pointer_type(tl.uint32)) + (group_off >> 2)
        step = 1 if LAYOUT == CHANNEL_LAST_WORDS else sC >> 2
        w0 = tl.load(words, mask=group_mask, other=0)
        w1 = tl.load(words + step, mask=group_mask, other=0)
        w2 = tl.load(words + 2 * step, mask=group_mask, other=0)
        r, g = _channel_of(w0, w1, w2, 0, LAYOUT), _channel_of(w0, w1, w2, 1, LAYOUT)
        b = _channel_of(w0, w1, w2, 2, LAYOUT)
    return r, g, b


@triton.jit
def _store_rgb(out_ptr, group_off, group_mask, pixel_mask, r, g, b, OUT_WORDS: tl.constexpr):
    """Round r, g, b [..., 2, 2] to uint8 into the contiguous channel-last output, whose groups start at byte
    group_off: three 4-byte stores per group, or a byte per value."""
    r, g, b = _to_byte(r), _to_byte(g), _to_byte(b)
    if OUT_WORDS:
        r0, r1, r2, r3 = _unquad(r)
        g0, g1, g2, g3 = _unquad(g)
        b0, b1, b2, b3 = _unquad(b)
        words = out_ptr.to(tl.pointer_type(tl.uint32)) + (group_off >> 2)
        tl.store(words, r0 | (g0 << 8) | (b0 << 16) | (r1 << 24), mask=group_mask)
        tl.store(words + 1, g1 | (b1 << 8) | (r2 << 16) | (g2 << 24), mask=group_mask)
        tl.store(words + 2, b2 | (r3 << 8) | (g3 << 16) | (b3 << 24), mask=group_mask)
    else:
        dst = out_ptr + tl.expand_dims(group_off, (-2, -1)) + 3 * _quad_index()
        tl.store(dst, r.to(tl.uint8), mask=pixel_mask)
        tl.store(dst + 1, g.to(tl.uint8), mask=pixel_mask)
        tl.store(dst + 2, b.to(tl.uint8), mask=pixel_mask)


@triton.jit
def _quad_index():
    """[2, 2]: the index 2k + j of each pixel in its group."""
    return 2 * tl.arange(0, 2)[:, None] + tl.arange(0, 2)[None, :]


# ---- the colour: jitter in the sample's order, then grayscale ----------------------------------------------

@triton.jit
def _colour_params(u_ptr, img, partial_ptr, jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue, gray_p, HW,
                   TILES, TILES_P2: tl.constexpr, HAS_C: tl.constexpr, HAS_GRAY: tl.constexpr):
    """A sample's colour parameters, once per program: jitter, factors, ranks, contrast mean, grey."""
    jitter, fb, fc, fs, shift, rb, rc, rs, rh = _sample_params(u_ptr, img, jitter_p, b_lo, b_span, c_lo, c_span,
                                                               s_lo, s_span, hue)
    cmean = 0.0
    if HAS_C:   # the first pass's partial sums (written for the samples that jitter), in a fixed order
        t = tl.arange(0, TILES_P2)
        tiles = tl.where(jitter, TILES, 0)
        cmean = tl.sum(tl.load(partial_ptr + img * TILES + t, mask=t < tiles, other=0.0), axis=0) / HW
    grey = tl.load(u_ptr + img * U_COLUMNS + U_GRAY) < gray_p if HAS_GRAY else False
    return jitter, fb, fc, fs, shift, rb, rc, rs, rh, cmean, grey


@triton.jit
def _colour(r, g, b, jitter, fb, fc, fs, shift, rb, rc, rs, rh, cmean, grey, HAS_B: tl.constexpr,
            HAS_C: tl.constexpr, HAS_S: tl.constexpr, HAS_H: tl.constexpr, HAS_GRAY: tl.constexpr):
    if jitter:
        r, g, b = _jitter(r, g, b, rb, rc, rs, rh, fb, fc, fs, shift, cmean, False, HAS_B, HAS_C, HAS_S, HAS_H)
    if HAS_GRAY:
        if grey:
            y = _gray(r, g, b)
            r, g, b = y, y, y
    return r, g, b


@triton.jit
def _tile_offsets(img, tile, HW, sN, sH, sW, W: tl.constexpr, BLOCK: tl.constexpr):
    """A pointwise program's BLOCK / 4 groups of 4 pixels: byte offsets and masks of the groups and the pixels."""
    first = tile * BLOCK + 4 * tl.arange(0, BLOCK // 4)
    pix = first[:, None, None] + _quad_index()
    y = pix // W
    pixel_off = img.to(tl.int64) * sN + y * sH + (pix - y * W) * sW
    gy = first // W
    group_off = img.to(tl.int64) * sN + gy * sH + (first - gy * W) * sW
    return first, group_off, first < HW, pixel_off, pix < HW


# ---- kernel 1: grey sums of the image as contrast sees it ------------------------------------------------

@triton.jit
def _contrast_mean_kernel(
    x_ptr, u_ptr, partial_ptr,  # uint8 views (strided), fp32 [N, U_COLUMNS], fp32 [N, TILES]
    sN, sH, sW, sC, jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue, HW, TILES,
    W: tl.constexpr, BLOCK: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_H: tl.constexpr,
    LAYOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    img, tile = pid // TILES, pid % TILES
    jitter, fb, fc, fs, shift, rb, rc, rs, rh = _sample_params(u_ptr, img, jitter_p, b_lo, b_span, c_lo,
                                                               c_span, s_lo, s_span, hue)
    if jitter:
        _, group_off, group_mask, pixel_off, mask = _tile_offsets(img, tile, HW, sN, sH, sW, W, BLOCK)
        r, g, b = _load_rgb(x_ptr, group_off, group_mask, pixel_off, mask, sC, LAYOUT)
        r, g, b = _jitter(r, g, b, rb, rc, rs, rh, fb, fc, fs, shift, 0.0, True, HAS_B, False, HAS_S, HAS_H)
        grey = tl.sum(tl.sum(tl.where(mask, _gray(r, g, b), 0.0), axis=2), axis=1)
        tl.store(partial_ptr + pid, tl.sum(grey, axis=0))


# ---- kernel 2: jitter, grayscale, solarize, round: the samples that do not blur -------------------------

@triton.jit
def _pointwise_kernel(
    x_ptr, u_ptr, partial_ptr, out_ptr,  # out: uint8 [N, H, W, 3] contiguous
    sN, sH, sW, sC, jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue, gray_p, blur_p, solarize_p, HW, TILES,
    W: tl.constexpr, BLOCK: tl.constexpr, TILES_P2: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr,
    HAS_S: tl.constexpr, HAS_H: tl.constexpr, HAS_GRAY: tl.constexpr, HAS_BLUR: tl.constexpr,
    HAS_SOLARIZE: tl.constexpr, LAYOUT: tl.constexpr, OUT_WORDS: tl.constexpr,
):
    pid = tl.program_id(0)
    img, tile = pid // TILES, pid % TILES
    row = u_ptr + img * U_COLUMNS
    blur = tl.load(row + U_BLUR) < blur_p if HAS_BLUR else False
    if not blur:   # a sample that blurs is kernel 3's
        first, group_off, group_mask, pixel_off, mask = _tile_offsets(img, tile, HW, sN, sH, sW, W, BLOCK)
        r, g, b = _load_rgb(x_ptr, group_off, group_mask, pixel_off, mask, sC, LAYOUT)
        params = _colour_params(u_ptr, img, partial_ptr, jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue,
                                gray_p, HW, TILES, TILES_P2, HAS_C, HAS_GRAY)
        r, g, b = _colour(r, g, b, *params, HAS_B, HAS_C, HAS_S, HAS_H, HAS_GRAY)
        if HAS_SOLARIZE:
            if tl.load(row + U_SOLARIZE) < solarize_p:
                r, g, b = _solarize(r), _solarize(g), _solarize(b)
        _store_rgb(out_ptr, img.to(tl.int64) * (3 * HW) + 3 * first, group_mask, mask, r, g, b, OUT_WORDS)


# ---- kernel 3: the samples that blur: colour, separable Gaussian blur, solarize, round -----------------

@triton.jit
def _tap(t, sigma, inv_total, KSIZE: tl.constexpr):
    """Normalised Gaussian weight of tap t (0 outside 0..KSIZE-1): exp(-((t - PAD) / sigma)^2 / 2) / sum."""
    z = (t - KSIZE // 2).to(tl.float32) / sigma
    return tl.where((t >= 0) & (t < KSIZE), tl.exp(-0.5 * z * z) * inv_total, 0.0)


@triton.jit
def _bands(x0, xs, sigma, W: tl.constexpr, KSIZE: tl.constexpr, KSIZE_P2: tl.constexpr, CW: tl.constexpr,
           RB: tl.constexpr):
    """The blur's fp16 matrices: across [CW, CW], input column j of the strip (image column xs + j) to output
    column a (image column x0 + a), the reflection at the image's edges folded in; down0..2 [RB, RB]: row i
    of the oldest..newest block of the window to output row a (Toeplitz)."""
    inv_total = 1.0 / tl.sum(_tap(tl.arange(0, KSIZE_P2), sigma, 1.0, KSIZE), axis=0)
    src = xs + tl.arange(0, CW)[:, None]
    dst = x0 + tl.arange(0, CW)[None, :] - KSIZE // 2   # tap t reads image column dst + t before reflection
    across = _tap(src - dst, sigma, inv_total, KSIZE)
    across += tl.where(src > 0, _tap(-src - dst, sigma, inv_total, KSIZE), 0.0)   # reflected at the left
    across += tl.where(src < W - 1, _tap(2 * (W - 1) - src - dst, sigma, inv_total, KSIZE), 0.0)   # right
    across = tl.where(src < W, across, 0.0).to(tl.float16)
    d = tl.arange(0, RB)[None, :] - tl.arange(0, RB)[:, None]
    down0 = _tap(d, sigma, inv_total, KSIZE).to(tl.float16)
    down1 = _tap(RB + d, sigma, inv_total, KSIZE).to(tl.float16)
    down2 = _tap(2 * RB + d, sigma, inv_total, KSIZE).to(tl.float16)
    return across, down0, down1, down2


@triton.jit
def _down(p2, p1, h, down0, down1, down2, WINDOW: tl.constexpr):
    """One channel's vertical blur from the window's blocks, oldest first (p2 only when WINDOW == 3)."""
    if WINDOW == 3:
        acc = tl.dot(down1, p1, acc=tl.dot(down0, p2, out_dtype=tl.float32), out_dtype=tl.float32)
        return tl.dot(down2, h, acc=acc, out_dtype=tl.float32)
    else:
        return tl.dot(down1, h, acc=tl.dot(down0, p1, out_dtype=tl.float32), out_dtype=tl.float32)


@triton.jit
def _store_block(out_ptr, img, y0, x0, x1, o_r, o_g, o_b, solarize, H: tl.constexpr, W: tl.constexpr,
                 CW: tl.constexpr, RB: tl.constexpr, OUT_WORDS: tl.constexpr):
    """Solarize, round and store output rows y0 .. y0 + RB - 1, columns x0 .. x1 - 1 of the strip."""
    o_r, o_g, o_b = tl.minimum(o_r, 255.0), tl.minimum(o_g, 255.0), tl.minimum(o_b, 255.0)   # sums of x >= 0
    if solarize:
        o_r, o_g, o_b = _solarize(o_r), _solarize(o_g), _solarize(o_b)
    y, x = y0 + tl.arange(0, RB)[:, None], x0 + 4 * tl.arange(0, CW // 4)[None, :]   # x: a group's first
    px = x[:, :, None, None] + _quad_index()
    _store_rgb(out_ptr, img.to(tl.int64) * (3 * H * W) + (y * W + x) * 3, (y < H) & (x < x1),
               (y < H)[:, :, None, None] & (px < x1), tl.reshape(o_r, (RB, CW // 4, 2, 2)),
               tl.reshape(o_g, (RB, CW // 4, 2, 2)), tl.reshape(o_b, (RB, CW // 4, 2, 2)), OUT_WORDS)


@triton.jit
def _blur_kernel(
    x_ptr, u_ptr, partial_ptr, out_ptr, sN, sH, sW, sC,
    jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue, gray_p, blur_p, sigma_lo, sigma_span, solarize_p,
    TILES, STRIPS, H: tl.constexpr, W: tl.constexpr, KSIZE: tl.constexpr, KSIZE_P2: tl.constexpr,
    CW: tl.constexpr, CO_EDGE: tl.constexpr, CO: tl.constexpr, RB: tl.constexpr, WINDOW: tl.constexpr,
    TILES_P2: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_S: tl.constexpr, HAS_H: tl.constexpr,
    HAS_GRAY: tl.constexpr, HAS_SOLARIZE: tl.constexpr, LAYOUT: tl.constexpr, OUT_WORDS: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    pid = tl.program_id(0)
    img, strip = pid // STRIPS, pid % STRIPS
    row = u_ptr + img * U_COLUMNS
    if tl.load(row + U_BLUR) < blur_p:
        x0 = tl.where(strip == 0, 0, CO_EDGE + (strip - 1) * CO)   # the strip's output columns x0 .. x1 - 1
        x1 = tl.minimum(CO_EDGE + strip * CO, W)
        xs = tl.maximum(x0 - (PAD + 3) // 4 * 4, 0)   # its first input column: a whole group of 4
        sigma = sigma_lo + sigma_span * tl.load(row + U_SIGMA)
        across, down0, down1, down2 = _bands(x0, xs, sigma, W, KSIZE, KSIZE_P2, CW, RB)
        params = _colour_params(u_ptr, img, partial_ptr, jitter_p, b_lo, b_span, c_lo, c_span, s_lo, s_span, hue,
                                gray_p, H * W, TILES, TILES_P2, HAS_C, HAS_GRAY)
        solarize = tl.load(row + U_SOLARIZE) < solarize_p if HAS_SOLARIZE else False
        col = xs + 4 * tl.arange(0, CW // 4)[None, :]   # the first column of each group
        pcol = col[:, :, None, None] + _quad_index()
        p1_r = tl.zeros((RB, CW), dtype=tl.float16)
        p1_g, p1_b, p2_r, p2_g, p2_b = p1_r, p1_r, p1_r, p1_r, p1_r
        for blk in range(0, (H + RB - 1) // RB + WINDOW - 1):
            v = blk * RB - PAD + tl.arange(0, RB)[:, None]   # block rows; row v is image row reflect(v)
            y = tl.where(v < 0, -v, v)
            y = tl.where(y > H - 1, 2 * (H - 1) - y, y)   # clamped below: rows past H + PAD, and H == 1
            src = img.to(tl.int64) * sN + tl.minimum(tl.maximum(y, 0), H - 1) * sH
            need = v < H + PAD
            r, g, b = _load_rgb(x_ptr, src + col * sW, need & (col < W), src[:, :, None, None] + pcol * sW,
                                need[:, :, None, None] & (pcol < W), sC, LAYOUT)
            r, g, b = _colour(r, g, b, *params, HAS_B, HAS_C, HAS_S, HAS_H, HAS_GRAY)
            h_r = tl.dot(tl.reshape(r, (RB, CW)).to(tl.float16), across, out_dtype=tl.float32).to(tl.float16)
            h_g = tl.dot(tl.reshape(g, (RB, CW)).to(tl.float16), across, out_dtype=tl.float32).to(tl.float16)
            h_b = tl.dot(tl.reshape(b, (RB, CW)).to(tl.float16), across, out_dtype=tl.float32).to(tl.float16)
            if blk >= WINDOW - 1:   # the output block whose window ends here
                _store_block(out_ptr, img, (blk - WINDOW + 1) * RB, x0, x1,
                             _down(p2_r, p1_r, h_r, down0, down1, down2, WINDOW),
                             _down(p2_g, p1_g, h_g, down0, down1, down2, WINDOW),
                             _down(p2_b, p1_b, h_b, down0, down1, down2, WINDOW), solarize, H, W, CW, RB, OUT_WORDS)
            if WINDOW == 3:
                p2_r, p2_g, p2_b = p1_r, p1_g, p1_b
            p1_r, p1_g, p1_b = h_r, h_g, h_b


# ---- launcher --------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def blur_geometry(kernel_size: int, height: int, width: int) -> dict:
    """The blur's strips and blocks. A strip reads CW input columns (a power of two) from a group of 4 on: PAD
    halo columns on each inner side, none at the image's edges (folded into the matrix): the first strip writes
    CO_EDGE columns, the next ones CO (multiples of 4), the last the rest (<= CW - PAD rounded up to 4). RB >=
    PAD rows per block: an output block's vertical halo lies in the WINDOW <= 3 blocks that end with it. Of the
    (RB, CW) with RB * CW <= BLUR_BLOCK, the one colouring the fewest pixels (ties: smaller window, fewer
    strips). At 224 (23 taps): 2 strips of 128 (116 and 108 columns), RB 32."""
    pad = kernel_size // 2
    halo = (pad + 3) // 4 * 4
    best = None
    for limit, widths in ((BLUR_BLOCK, (16, 32, 64, 128)), (None, (256,))):   # wider: spills, still right
        for rows in (16, 32, 64):
            window = 1 + -(-2 * pad // rows)
            for cw in widths:
                edge, middle = ((cw - pad) // 4 * 4, (cw - pad - halo) // 4 * 4) if width > cw else (width, width)
                if rows < pad or (limit and rows * cw > limit) or middle <= 0:
                    continue
                strips = 1 if width <= cw else 2 + max(0, -(-(width - edge - (cw - halo)) // middle))
                cost = (strips * cw * rows * (-(-height // rows) + window - 1), window, strips)
                if best is None or cost < best[0]:
                    best = cost, dict(CW=cw, CO_EDGE=edge, CO=middle, RB=rows, WINDOW=window, strips=strips)
        if best is not None:
            break
    if best is None:
        raise ValueError(f"photometric: a blur of {kernel_size} taps is wider than the kernel's blocks (<= 129)")
    geometry = best[1]
    return dict(geometry, warps=max(4, min(16, geometry["RB"] * geometry["CW"] // 256)))


def _layout(views_u8: torch.Tensor) -> int:
    """How the kernels may read the views: 4 pixels in three aligned words when rows hold whole groups."""
    s_n, s_h, s_w, s_c = views_u8.stride()
    if views_u8.shape[2] % 4 or views_u8.data_ptr() % 4 or s_n % 4 or s_h % 4:
        return int(BYTES)
    if s_w == 3 and s_c == 1:
        return int(CHANNEL_LAST_WORDS)
    return int(PLANAR_WORDS) if s_w == 1 and s_c % 4 == 0 else int(BYTES)


def launch_plan(views_u8: torch.Tensor, u: torch.Tensor, out: torch.Tensor, partial: torch.Tensor, policy,
                kernel_size: int) -> list[tuple]:
    """One view's launches as (name, kernel, grid, arguments, constexprs, options), from the policy and shapes
    alone (no host sync): `photometric` runs them, tools/ptx.py compiles them for sm_90."""
    n, h, w, _ = views_u8.shape
    tiles = triton.cdiv(h * w, BLOCK_PIXELS)
    jit = policy.jitter_p > 0
    flags = dict(HAS_B=jit and policy.brightness > 0, HAS_S=jit and policy.saturation > 0,
                 HAS_H=jit and policy.hue > 0, LAYOUT=_layout(views_u8))
    args = dict(x_ptr=views_u8, u_ptr=u, partial_ptr=partial, jitter_p=policy.jitter_p, hue=policy.hue,
                **dict(zip(("sN", "sH", "sW", "sC"), views_u8.stride())))
    for op, strength in (("b", policy.brightness), ("c", policy.contrast), ("s", policy.saturation)):
        lo = max(0.0, 1.0 - strength)   # torchvision: U(max(0, 1 - s), 1 + s) = lo + span * u
        args.update({f"{op}_lo": lo, f"{op}_span": 1.0 + strength - lo})
    plan, pointwise = [], dict(num_warps=NUM_WARPS)
    if jit and policy.contrast > 0:
        plan.append(("photometric_contrast_mean", _contrast_mean_kernel, (n * tiles,),
                     dict(args, HW=h * w, TILES=tiles), dict(flags, W=w, BLOCK=BLOCK_PIXELS), pointwise))
    flags.update(TILES_P2=_next_pow2(tiles), HAS_C=jit and policy.contrast > 0, HAS_GRAY=policy.gray_p > 0,
                 HAS_SOLARIZE=policy.solarize_p > 0, OUT_WORDS=w % 4 == 0)
    args.update(out_ptr=out, gray_p=policy.gray_p, blur_p=policy.blur_p, solarize_p=policy.solarize_p)
    plan.append(("photometric_pointwise", _pointwise_kernel, (n * tiles,), dict(args, HW=h * w, TILES=tiles),
                 dict(flags, W=w, BLOCK=BLOCK_PIXELS, HAS_BLUR=policy.blur_p > 0), pointwise))
    if policy.blur_p > 0:
        geo = blur_geometry(kernel_size, h, w)
        lo, hi = policy.blur_sigma
        sizes = {k: geo[k] for k in ("CW", "CO_EDGE", "CO", "RB", "WINDOW")}
        # num_stages=1: a block's loads are used at once; pipelining would route them through shared memory
        plan.append(("photometric_blur", _blur_kernel, (n * geo["strips"],),
                     dict(args, sigma_lo=lo, sigma_span=hi - lo, TILES=tiles, STRIPS=geo["strips"]),
                     dict(flags, H=h, W=w, KSIZE=kernel_size, KSIZE_P2=_next_pow2(kernel_size), **sizes),
                     dict(num_warps=geo["warps"], num_stages=1)))
    return plan


def photometric(views_u8: torch.Tensor, u: torch.Tensor, policy, kernel_size: int) -> torch.Tensor:
    """Launch on already-validated tensors on one device (CUDA, or CPU under the interpreter): ``views_u8``
    uint8 [N, H, W, 3], any strides; ``u`` fp32 [N, U_COLUMNS] contiguous, the reference's uniforms; ``policy``
    with the fields of `augment.ViewPolicy`; ``kernel_size`` the blur's (odd). Returns uint8 [N, H, W, 3]
    contiguous, after 1 to 3 launches decided by the policy alone (no host sync)."""
    n, h, w, _ = views_u8.shape
    out = torch.empty((n, h, w, 3), dtype=torch.uint8, device=views_u8.device)
    if out.numel() == 0:
        return out
    partial = out   # the contrast pass's grey sums, when there is one
    if policy.jitter_p > 0 and policy.contrast > 0:
        partial = torch.empty((n, triton.cdiv(h * w, BLOCK_PIXELS)), dtype=torch.float32, device=out.device)
    for _, kernel, grid, args, constexprs, options in launch_plan(views_u8, u, out, partial, policy, kernel_size):
        kernel[grid](**args, **constexprs, **options)
    return out
