"""The one resize of every loader's random resized crops: Pillow's, crop then resize.

That is what torchvision's `RandomResizedCrop` does to a PIL image, the anchors' transform (docs/RECIPES.md):
`aug.interpolation` names the filter, `"bicubic"` (Keys' cubic with a = -0.5, support 2: solo-learn's and the
TensorFlow papers' choice) or `"bilinear"` (the triangle, support 1: torchvision's default, MoCo v2's). Where
a crop is shrunk the filter is stretched by the scale factor (antialiasing); where it is enlarged it is used
as it is. Only the crop's own pixels are read (the filter is renormalised at the crop's edges). The filter is
separable: a horizontal pass, then a vertical one, rounded half up and clipped to uint8 once at the end (as
torch's `interpolate(..., antialias=True)` in float). Pillow rounds and clips its intermediate image too, and
the order of its passes depends on its version, so it differs where a first pass overshoots 0..255: by a
grey level or two on photographs, more on noise (measured in docs/RECIPES.md).

Who computes it: the torch loader calls Pillow itself; the FFCV decoder runs `resize_crop` below, plain
Python that numba compiles (ffcv's own resize is OpenCV's INTER_AREA, which enlarges small crops into blocks:
a 9 -> 32 px crop leaves 48% of neighbouring pixel pairs equal, bicubic none); gpu_resident evaluates the
same taps for a whole batch on the device (`dense_taps`); DALI's `INTERP_CUBIC` / `INTERP_LINEAR` with
antialiasing are these filters. tests/test_resize.py checks the four against torch's antialiased
`interpolate`, at 32 and 224 px, each within a stated tolerance.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import INTERPOLATIONS  # aug.interpolation's values; the index is the code compiled code takes

BICUBIC, BILINEAR = INTERPOLATIONS.index("bicubic"), INTERPOLATIONS.index("bilinear")
CUBIC_A = -0.5  # Keys' parameter in Pillow and DALI (OpenCV and torch's non-antialiased bicubic use -0.75)


def filter_code(name: str) -> int:
    return INTERPOLATIONS.index(name)


def filter_support(code: int) -> float:
    """Half-width of the filter at scale 1, in input pixels."""
    return 2.0 if code == BICUBIC else 1.0


def filter_weight(code: int, x: float) -> float:
    """The filter's value at distance x (input pixels at scale 1)."""
    x = abs(x)
    if code == BICUBIC:
        if x < 1.0:
            return ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
        if x < 2.0:
            return (((x - 5.0) * x + 8.0) * x - 4.0) * CUBIC_A
        return 0.0
    return 1.0 - x if x < 1.0 else 0.0


def _make_taps(support, weight):
    def resample_taps(in_size, out_size, code):
        """Pillow's coefficients for `in_size` pixels -> `out_size`: output pixel i reads input pixels
        first[i] .. first[i] + count[i] - 1 with weights[i, :count[i]] (which sum to 1)."""
        scale = in_size / out_size
        stretch = max(scale, 1.0)  # > 1 when shrinking: the filter widens with the step (antialiasing)
        reach = support(code) * stretch
        first = np.empty(out_size, np.int64)
        count = np.empty(out_size, np.int64)
        weights = np.zeros((out_size, int(math.ceil(reach)) * 2 + 1), np.float64)
        for i in range(out_size):
            centre = (i + 0.5) * scale
            lo = max(int(centre - reach + 0.5), 0)
            hi = min(int(centre + reach + 0.5), in_size)
            total = 0.0
            for k in range(hi - lo):
                w = weight(code, (lo + k - centre + 0.5) / stretch)
                weights[i, k] = w
                total += w
            if total != 0.0:
                for k in range(hi - lo):
                    weights[i, k] /= total
            first[i] = lo
            count[i] = hi - lo
        return first, count, weights

    return resample_taps


def round_u8(value: float) -> int:
    """Round half up and clip to 0..255, as Pillow's 8-bit passes."""
    v = math.floor(value + 0.5)
    return 0 if v < 0 else (255 if v > 255 else v)


def _make_resize(taps, to_u8):
    def resize_crop(image, top, left, height, width, out, code, flip):
        """out (uint8 [S, S, 3]) = the crop image[top:top + height, left:left + width] resized to S x S,
        mirrored left-right when `flip`."""
        size = out.shape[0]
        x_first, x_count, x_weights = taps(width, size, code)
        y_first, y_count, y_weights = taps(height, size, code)
        rows = np.empty((height, size, 3), np.float32)  # the horizontal pass, not rounded
        for r in range(height):
            src = image[top + r]
            for j in range(size):
                r0 = r1 = r2 = 0.0
                x = left + x_first[j]
                for k in range(x_count[j]):
                    w = x_weights[j, k]
                    r0 += w * src[x + k, 0]
                    r1 += w * src[x + k, 1]
                    r2 += w * src[x + k, 2]
                col = size - 1 - j if flip else j
                rows[r, col, 0] = r0
                rows[r, col, 1] = r1
                rows[r, col, 2] = r2
        line = np.empty(size * 3, np.float32)  # one output row, accumulated over its input rows
        flat = rows.reshape(height, size * 3)
        for i in range(size):
            line[:] = 0.0
            for k in range(y_count[i]):
                w = np.float32(y_weights[i, k])
                src_row = flat[y_first[i] + k]
                for m in range(size * 3):
                    line[m] += w * src_row[m]
            dst = out[i].reshape(size * 3)
            for m in range(size * 3):
                dst[m] = to_u8(line[m])

    return resize_crop


def compiled_resize_crop(compile):
    """`resize_crop(image, top, left, height, width, out, code, flip)` with its helpers passed through
    `compile` (ffcv's Compiler.compile or numba.njit; the identity gives plain Python)."""
    taps = compile(_make_taps(compile(filter_support), compile(filter_weight)))
    return compile(_make_resize(taps, compile(round_u8)))


def dense_taps(start, length, out_size: int, in_size: int, code: int):
    """The taps of `resample_taps` for a batch of crops as dense matrices, on the crops' device.

    start, length: float64 [n] (the crops' first pixel and extent along one axis of `in_size` pixels) ->
    float32 [n, out_size, in_size], row i holding output pixel i's weights over the whole axis (zero outside
    the crop), so that one batched matmul per pass resizes every crop at once."""
    import torch

    scale = (length / out_size)[:, None, None]
    stretch = scale.clamp(min=1.0)
    reach = filter_support(code) * stretch
    centre = (torch.arange(out_size, device=start.device, dtype=torch.float64)[None, :, None] + 0.5) * scale
    rel = torch.arange(in_size, device=start.device, dtype=torch.float64)[None, None, :] - start[:, None, None]
    lo = (centre - reach + 0.5).trunc().clamp(min=0.0)
    hi = torch.minimum((centre + reach + 0.5).trunc(), length[:, None, None])
    x = ((rel - centre + 0.5) / stretch).abs()
    if code == BICUBIC:
        a = CUBIC_A
        near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
        w = torch.where(x < 1.0, near, torch.where(x < 2.0, far, 0.0))
    else:
        w = (1.0 - x).clamp(min=0.0)
    w = torch.where((rel >= lo) & (rel < hi), w, 0.0)
    total = w.sum(-1, keepdim=True)
    return torch.where(total != 0, w / total, w).float()


__all__ = [
    "BICUBIC",
    "BILINEAR",
    "INTERPOLATIONS",
    "compiled_resize_crop",
    "dense_taps",
    "filter_code",
    "filter_support",
    "filter_weight",
    "round_u8",
]
