"""Batched photometric augmentation on the training device (docs/METHOD.md "Views", docs/DESIGN.md).

The loaders hand over uint8 NHWC views that already carry their geometric augmentation (random resized
crop + flip, done where the image is decoded). Everything photometric happens here, on the whole batch at
once, with per-sample parameters drawn from one `torch.Generator` living on the batch's device:

    colour jitter (p = jitter_p; brightness, contrast, saturation, hue in a random order per sample)
    -> grayscale (gray_p) -> Gaussian blur (blur_p, sigma ~ U(blur_sigma)) -> solarize (solarize_p)

which is the BYOL / SimCLR / MoCo v2 / SimSiam order. The maths follows torchvision's float kernels
(`torchvision.transforms.v2.functional`), evaluated in fp32 on the 0..255 scale (every op is either
scale-free or written for it), with a single round to uint8 at the end instead of one per op.

Two implementations, one result (within one grey level): on CUDA tensors `photometric` runs the Triton
kernels of `bsim_fast.kernels.photometric` (three launches at most, no host sync; also on CPU tensors when
BSIM_FAST_TRITON=1 under TRITON_INTERPRET=1, which is how CI tests them); elsewhere it runs the PyTorch
reference below, which is also their oracle (`photometric_reference`). Both draw the same per-sample
uniforms from the generator first, so a given generator state means the same parameters on either path.

Cost of the random order in the reference: slot k of the jitter applies, to each sample, the op that sample
drew for slot k. On an accelerator every op runs on the whole batch at every slot and `torch.where` keeps
the scheduled samples (no host synchronisation, 4x the arithmetic); on the CPU each op runs only on the
samples that drew it (the same result, a quarter of the work). The kernels branch per sample instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import photometric as photometric_kernels
from .kernels import use_triton
from .kernels.photometric import (
    U_BLUR,
    U_BRIGHTNESS,
    U_COLUMNS,
    U_CONTRAST,
    U_GRAY,
    U_HUE,
    U_JITTER,
    U_ORDER,
    U_SATURATION,
    U_SIGMA,
    U_SOLARIZE,
)

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128  # uint8 units: v >= 128 -> 255 - v


@dataclass(frozen=True)
class ViewPolicy:
    """The photometric distribution of one view (t' or t''); the numbers come from `cfg.aug` (policy_for)."""

    jitter_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    gray_p: float
    blur_p: float
    blur_sigma: tuple[float, float]
    solarize_p: float


def policy_for(cfg) -> tuple[ViewPolicy, ViewPolicy]:
    """(t', t'') from `cfg.aug`. The recipes decide the numbers (BYOL asymmetric: blur 1.0 / 0.1, solarize
    0.0 / 0.2; SimCLR, MoCo v2, SimSiam symmetric); this only reads them."""
    aug = cfg.aug
    common = dict(
        jitter_p=aug.jitter_p,
        brightness=aug.brightness,
        contrast=aug.contrast,
        saturation=aug.saturation,
        hue=aug.hue,
        gray_p=aug.gray_p,
        blur_sigma=tuple(aug.blur_sigma),
    )
    return (
        ViewPolicy(blur_p=aug.blur_p[0], solarize_p=aug.solarize_p[0], **common),
        ViewPolicy(blur_p=aug.blur_p[1], solarize_p=aug.solarize_p[1], **common),
    )


def blur_kernel_size(side: int) -> int:
    """About 10% of the image side, odd, at least 3 (23 at 224 as in BYOL / SimCLR; 3 at 32)."""
    k = max(3, int(0.1 * side))
    return k if k % 2 == 1 else k + 1


# ---- single ops on float [N, 3, H, W] in 0..255; per-sample parameters are float [N] tensors -------------


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (x * f + other * (1.0 - f)).clamp_(0.0, 255.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] -> [N,1,H,W] luma."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(factor)).clamp_(0.0, 255.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn) in HSV space. HSV -> RGB keeps max (V) and min and maps
    the hue through the piecewise-linear ramps, so out = min + chroma * ramp_c(h + shift): the same values
    as torchvision's rgb->hsv->rgb round trip, in fewer kernels."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h6 = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.remainder(h6 / 6.0 + shift.reshape(-1, 1, 1), 1.0) * 6.0  # [N,H,W] in [0, 6)
    ramp_r = ((h - 3.0).abs() - 1.0).clamp_(0.0, 1.0)
    ramp_g = (2.0 - (h - 2.0).abs()).clamp_(0.0, 1.0)
    ramp_b = (2.0 - (h - 4.0).abs()).clamp_(0.0, 1.0)
    ramps = torch.stack((ramp_r, ramp_g, ramp_b), dim=1)
    return minc.unsqueeze(1) + chroma.unsqueeze(1) * ramps


def gaussian_blur(
    x: torch.Tensor, sigma: torch.Tensor, kernel_size: int, apply: torch.Tensor | None = None
) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma, as one grouped conv per axis (reflect padding, as
    torchvision). Samples with apply == False get a delta kernel, which is an exact identity."""
    n, c, hgt, wid = x.shape
    half = (kernel_size - 1) / 2.0
    taps = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.softmax(-((taps[None, :] / sigma[:, None].to(x.dtype)) ** 2) / 2.0, dim=1)  # [N, k]
    if apply is not None:
        delta = torch.zeros_like(kernel)
        delta[:, kernel_size // 2] = 1.0
        kernel = torch.where(apply[:, None], kernel, delta)
    kernel = kernel.repeat_interleave(c, dim=0)  # [N*C, k], one row per plane
    pad = kernel_size // 2
    planes = x.reshape(1, n * c, hgt, wid)
    planes = F.conv2d(F.pad(planes, (pad, pad, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    planes = F.conv2d(F.pad(planes, (0, 0, pad, pad), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return planes.reshape(n, c, hgt, wid)


def solarize(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    # threshold at 127.5 so that the decision agrees with the uint8 value the final round will produce
    hit = _per_sample(apply) & (x >= SOLARIZE_THRESHOLD - 0.5)
    return torch.where(hit, 255.0 - x, x)


# ---- the view transform -------------------------------------------------------------------------------

_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)


def _gather_subsets(device: torch.device) -> bool:
    """CPU: run an op only on the samples that drew it (index select; a host sync costs nothing there).
    Accelerators: run it on the whole batch and select, since `nonzero` would stall the host on the GPU."""
    return device.type == "cpu"


def _apply_to(x: torch.Tensor, mask: torch.Tensor, fn, param: torch.Tensor) -> torch.Tensor:
    """x with fn(., param) applied to the samples in mask (per-sample ops only)."""
    if _gather_subsets(x.device):
        idx = mask.nonzero().squeeze(1)
        if idx.numel():
            x[idx] = fn(x[idx], param[idx])  # x is photometric's own float buffer
        return x
    return torch.where(_per_sample(mask), fn(x, param), x)


def _draw(x_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Validate, then the per-sample uniforms u[N, U_COLUMNS] on the views' device, read by both implementations
    by the column names of `bsim_fast.kernels.photometric` (``U_*``). A fixed block whatever the policy, so a
    generator state always maps to the same parameters (resume-exact when the caller seeds the generator per
    batch)."""
    if not isinstance(x_u8, torch.Tensor) or x_u8.dtype != torch.uint8 or x_u8.dim() != 4 or x_u8.shape[-1] != 3:
        found = f"{x_u8.dtype} {tuple(x_u8.shape)}" if isinstance(x_u8, torch.Tensor) else type(x_u8).__name__
        raise ValueError(f"photometric: expected uint8 [N,H,W,3], got {found}")
    return torch.rand(x_u8.shape[0], U_COLUMNS, generator=generator, device=x_u8.device)


def _is_identity(policy: ViewPolicy) -> bool:
    return policy.jitter_p == 0 and policy.gray_p == 0 and policy.blur_p == 0 and policy.solarize_p == 0


def photometric(x_u8: torch.Tensor, policy: ViewPolicy, generator: torch.Generator) -> torch.Tensor:
    """uint8 [N,H,W,3] (any strides) -> uint8 [N,H,W,3] contiguous, per-sample parameters from `generator`.

    CUDA tensors (and CPU tensors under BSIM_FAST_TRITON=1) run the Triton kernels, others the reference."""
    u = _draw(x_u8, generator)
    if _is_identity(policy):
        return x_u8.contiguous()  # nothing to do; the draw above keeps the generator in step
    if use_triton(x_u8.device):
        _, hgt, wid, _ = x_u8.shape
        return photometric_kernels.photometric(x_u8, u, policy, blur_kernel_size(min(hgt, wid)))
    return _transform(x_u8, u, policy)


def photometric_reference(x_u8: torch.Tensor, policy: ViewPolicy, generator: torch.Generator) -> torch.Tensor:
    """The PyTorch implementation on any device: the oracle of the kernels, same draws as `photometric`."""
    u = _draw(x_u8, generator)
    return x_u8.contiguous() if _is_identity(policy) else _transform(x_u8, u, policy)


def _transform(x_u8: torch.Tensor, u: torch.Tensor, policy: ViewPolicy) -> torch.Tensor:
    _, hgt, wid, _ = x_u8.shape
    col = u.unbind(1)

    def factor(uniform: torch.Tensor, strength: float) -> torch.Tensor:  # torchvision: U(max(0, 1-s), 1+s)
        lo = max(0.0, 1.0 - strength)
        return lo + (1.0 + strength - lo) * uniform

    x = x_u8.permute(0, 3, 1, 2).float().contiguous()  # NCHW planes: channel ops are contiguous

    jitter = col[U_JITTER] < policy.jitter_p
    params = (
        factor(col[U_BRIGHTNESS], policy.brightness),
        factor(col[U_CONTRAST], policy.contrast),
        factor(col[U_SATURATION], policy.saturation),
        (col[U_HUE] * 2.0 - 1.0) * policy.hue,
    )
    order = u[:, U_ORDER : U_ORDER + 4].argsort(dim=1, stable=True)  # per-sample permutation of the 4 ops
    ops = (
        (_BRIGHTNESS, adjust_brightness, policy.brightness),
        (_CONTRAST, adjust_contrast, policy.contrast),
        (_SATURATION, adjust_saturation, policy.saturation),
        (_HUE, adjust_hue, policy.hue),
    )
    if policy.jitter_p > 0:
        for slot in range(4):
            for op, fn, strength in ops:
                if strength > 0:
                    x = _apply_to(x, jitter & (order[:, slot] == op), fn, params[op])

    if policy.gray_p > 0:
        x = torch.where(_per_sample(col[U_GRAY] < policy.gray_p), grayscale(x).expand_as(x), x)
    if policy.blur_p > 0:
        lo, hi = policy.blur_sigma
        sigma = lo + (hi - lo) * col[U_SIGMA]
        x = gaussian_blur(x, sigma, blur_kernel_size(min(hgt, wid)), apply=col[U_BLUR] < policy.blur_p)
    if policy.solarize_p > 0:
        x = solarize(x, col[U_SOLARIZE] < policy.solarize_p)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
