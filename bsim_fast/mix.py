"""Spurious-positive views: partner permutation, CutMix boxes, and the fused normalize + CutMix step.

`cutmix_normalize` turns the loader's uint8 NHWC views into the normalized plain views and their mixed
counterparts in one call. On CUDA it runs the Triton kernel; on CPU it runs `cutmix_normalize_reference`,
which is also the oracle the kernel is tested against, so it favours obviousness over speed.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import functools

import numpy as np
import torch

Stats = Union[Sequence[float], torch.Tensor]
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _rng_device(generator: Optional[torch.Generator], device) -> torch.device:
    # Random draws must happen on the generator's own device; results then move to `device`.
    if generator is not None:
        return generator.device
    return torch.device("cpu")


def derangement(n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """A random permutation with no fixed point: one cycle through a shuffled order of 0..n-1."""
    if n < 2:
        raise ValueError(f"derangement: n must be >= 2 (a single image has no partner), found n={n}")
    order = torch.randperm(n, generator=generator, device=_rng_device(generator, device))
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)          # partner[order[k]] = order[k + 1]
    return partner.to(device) if device is not None else partner


def sample_boxes(n: int, height: int, width: int, alpha: float,
                 generator: Optional[torch.Generator] = None, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Standard CutMix boxes, one per sample.

    Returns boxes IntTensor[n, 4] as (y0, y1, x0, x1), half-open and clipped to the image, and
    lam FloatTensor[n] = 1 - clipped area / (height * width), the fraction of the image that stays.
    The draw happens on the host (one value is read from `generator`, a sync if it lives on a GPU).
    """
    if n < 1 or height < 1 or width < 1:
        raise ValueError(f"sample_boxes: n, height, width must be >= 1, found {n}, {height}, {width}")
    if not alpha > 0:
        raise ValueError(f"sample_boxes: alpha must be > 0, found {alpha!r}")
    # torch's Beta sampler ignores generators, so one seed is drawn from `generator` (advancing it, so a
    # resumed run continues the same stream) and numpy draws the Beta variates and box centres from it.
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=_rng_device(generator, device)).item()
    rng = np.random.default_rng(seed)
    lam0 = rng.beta(alpha, alpha, size=n)
    cut = np.sqrt(1.0 - lam0)
    h = np.floor(height * cut).astype(np.int64)
    w = np.floor(width * cut).astype(np.int64)
    cy = rng.integers(0, height, size=n)
    cx = rng.integers(0, width, size=n)
    y0 = np.clip(cy - h // 2, 0, height)
    y1 = np.clip(cy - h // 2 + h, 0, height)
    x0 = np.clip(cx - w // 2, 0, width)
    x1 = np.clip(cx - w // 2 + w, 0, width)
    boxes = torch.from_numpy(np.stack([y0, y1, x0, x1], axis=1)).to(torch.int32)
    lam = torch.from_numpy(1.0 - (y1 - y0) * (x1 - x0) / float(height * width)).to(torch.float32)
    if device is not None:
        boxes, lam = boxes.to(device), lam.to(device)
    return boxes, lam


@functools.lru_cache(maxsize=64)
def _stats_on(values: Tuple[float, float, float], device: torch.device) -> torch.Tensor:
    # A fresh host-to-device copy per call would block the launch queue: recipes pass the same few tuples.
    return torch.tensor(values, dtype=torch.float32, device=device)


def _stat_tensor(value: Stats, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.device != device:
            raise ValueError(f"cutmix_normalize: {name} is on {value.device} but views_u8 is on {device}")
        values = value.detach().to(torch.float32).flatten()
        host = values.tolist() if values.numel() == 3 else []
    else:
        try:
            host = [float(v) for v in value]
        except (TypeError, ValueError):
            raise TypeError(f"cutmix_normalize: {name} must be 3 numbers, found {value!r}") from None
        values = None
    if len(host) != 3:
        count = len(host) if values is None else values.numel()
        raise ValueError(f"cutmix_normalize: {name} must have 3 values (one per channel), found {count}")
    if name == "std" and not all(v > 0 for v in host):
        raise ValueError(f"cutmix_normalize: std must be > 0, found {host}")
    return values if values is not None else _stats_on(tuple(host), device)


def check_cutmix_inputs(views_u8: torch.Tensor, partner: Optional[torch.Tensor], boxes: Optional[torch.Tensor],
                        mean: Stats, std: Stats, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate the arguments of `cutmix_normalize` (both implementations call this).

    Returns (mean, std) as float32 tensors of 3 values on the views' device. Raises TypeError/ValueError
    with a one-line message naming the argument. With `boxes=None` the partner is not used or checked.
    `partner` and `boxes` may live on the views' device or on the host (they are then moved by the caller).
    """
    if not isinstance(views_u8, torch.Tensor):
        raise TypeError(f"cutmix_normalize: views_u8 must be a tensor, found {type(views_u8).__name__}")
    if views_u8.dtype != torch.uint8:
        raise TypeError(f"cutmix_normalize: views_u8 must be uint8, found {views_u8.dtype}")
    if views_u8.dim() != 4 or views_u8.shape[-1] != 3:
        raise ValueError(f"cutmix_normalize: views_u8 must be [N, H, W, 3], found {list(views_u8.shape)}")
    if not views_u8.is_contiguous():
        raise ValueError(f"cutmix_normalize: views_u8 must be a contiguous NHWC tensor, found strides "
                         f"{views_u8.stride()}")
    if dtype not in OUT_DTYPES:
        raise TypeError(f"cutmix_normalize: dtype must be one of bfloat16, float16, float32, found {dtype}")
    device = views_u8.device
    n, height, width, _ = views_u8.shape
    mean_t = _stat_tensor(mean, "mean", device)
    std_t = _stat_tensor(std, "std", device)
    if boxes is None:
        return mean_t, std_t
    for name, t in (("partner", partner), ("boxes", boxes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cutmix_normalize: {name} must be a tensor, found {type(t).__name__}")
        if t.device != device and t.device.type != "cpu":
            raise ValueError(f"cutmix_normalize: {name} is on {t.device} but views_u8 is on {device}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cutmix_normalize: {name} must be int32 or int64, found {t.dtype}")
    if partner.shape != (n,):
        raise ValueError(f"cutmix_normalize: partner must have shape [{n}], found {list(partner.shape)}")
    if boxes.shape != (n, 4):
        raise ValueError(f"cutmix_normalize: boxes must have shape [{n}, 4], found {list(boxes.shape)}")
    # One host round trip for all value checks: an out-of-range index would make the kernel read someone
    # else's memory, which is worse than a stall. Partner and boxes drawn on the host (as the trainer does)
    # are checked there for free; on the GPU the check costs one sync.
    y0, y1, x0, x1 = boxes.unbind(1)
    bad_partner = ((partner < 0) | (partner >= n)).any()
    outside = (y0 < 0) | (y0 > y1) | (y1 > height) | (x0 < 0) | (x0 > x1) | (x1 > width)
    bad_partner, bad_boxes = torch.stack([bad_partner, outside.any()]).tolist()
    if bad_partner:
        raise ValueError(f"cutmix_normalize: partner values must be in [0, {n}), found min "
                         f"{int(partner.min())} max {int(partner.max())}")
    if bad_boxes:
        i = int(outside.nonzero()[0])
        raise ValueError(f"cutmix_normalize: boxes[{i}] = {boxes[i].tolist()} is not a (y0, y1, x0, x1) box "
                         f"inside a {height}x{width} image")
    return mean_t, std_t


def cutmix_normalize_reference(views_u8: torch.Tensor, partner: Optional[torch.Tensor],
                               boxes: Optional[torch.Tensor], mean: Stats, std: Stats,
                               dtype: torch.dtype = torch.bfloat16) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pure-PyTorch normalize + CutMix: float32 throughout, one cast at the end."""
    mean_t, std_t = check_cutmix_inputs(views_u8, partner, boxes, mean, std, dtype)
    x = views_u8.permute(0, 3, 1, 2).to(torch.float32)
    plain = (x - mean_t.view(1, 3, 1, 1)) / std_t.view(1, 3, 1, 1)
    mixed = None
    if boxes is not None:
        _, _, height, width = plain.shape
        b = boxes.to(x.device).long()
        partner = partner.to(x.device)
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        in_rows = (rows[None] >= b[:, 0:1]) & (rows[None] < b[:, 1:2])     # [N, H]
        in_cols = (cols[None] >= b[:, 2:3]) & (cols[None] < b[:, 3:4])     # [N, W]
        inside = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]      # [N, 1, H, W]
        mixed = torch.where(inside, plain[partner.long()], plain)
        mixed = mixed.to(dtype).contiguous(memory_format=torch.channels_last)
    plain = plain.to(dtype).contiguous(memory_format=torch.channels_last)
    return plain, mixed


def cutmix_normalize(views_u8: torch.Tensor, partner: Optional[torch.Tensor], boxes: Optional[torch.Tensor],
                     mean: Stats, std: Stats,
                     dtype: torch.dtype = torch.bfloat16) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Normalized plain views and their CutMix-ed versions, [N, 3, H, W] in `dtype`, channels_last.

    mixed[i] is plain[i] outside boxes[i] and plain[partner[i]] inside it. `boxes=None` (SIM) returns
    (plain, None) without doing any mixing work.
    """
    if isinstance(views_u8, torch.Tensor) and views_u8.is_cuda:
        from bsim_fast.cutmix_triton import cutmix_normalize_triton
        return cutmix_normalize_triton(views_u8, partner, boxes, mean, std, dtype)
    return cutmix_normalize_reference(views_u8, partner, boxes, mean, std, dtype)


__all__ = ["derangement", "sample_boxes", "check_cutmix_inputs", "cutmix_normalize",
           "cutmix_normalize_reference"]
