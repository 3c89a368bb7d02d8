"""Spurious-positive views: partner permutation, CutMix boxes, the fused normalise + CutMix step, and the
step's view set (`make_views`).

`cutmix_normalize` turns the loader's uint8 NHWC views into the normalised plain views and their mixed
counterparts in one call. It validates its arguments, then runs the Triton kernel
(`bsim_fast.kernels.cutmix`) on CUDA tensors, and on CPU tensors when BSIM_FAST_TRITON=1 under
TRITON_INTERPRET=1; elsewhere `cutmix_normalize_reference`, which is also the kernel's oracle, so it favours
obviousness over speed. Both compute ``(x - mean) * (1 / std)`` in fp32, with 1/std rounded to fp32 once:
fp32 outputs are bit-identical between them (and within one fp32 ulp of ``(x - mean) / std``), bf16/fp16
outputs are that fp32 value rounded to nearest-even.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .kernels import use_triton

if TYPE_CHECKING:
    from .config import Config

Stats = Sequence[float] | torch.Tensor
Floats3 = tuple[float, float, float]
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _rng_device(generator: torch.Generator | None, device) -> torch.device:
    # Random draws must happen on the generator's own device; results then move to `device`.
    if generator is not None:
        return generator.device
    return torch.device("cpu")


def derangement(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A random permutation with no fixed point: one cycle through a shuffled order of 0..n-1."""
    if n < 2:
        raise ValueError(f"derangement: n must be >= 2 (a single image has no partner), found n={n}")
    order = torch.randperm(n, generator=generator, device=_rng_device(generator, device))
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)  # partner[order[k]] = order[k + 1]
    return partner.to(device) if device is not None else partner


def sample_boxes(
    n: int, height: int, width: int, alpha: float, generator: torch.Generator | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
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


def expected_lam(alpha: float) -> float:
    """E[λ] of `sample_boxes` for continuous box sides (docs/METHOD.md, "Partner, boxes and λ").

    With s = 1 - λ0 ~ Beta(α, α) and relative side r = sqrt(s), a box centred uniformly keeps on average
    r - r²/4 of each side inside the image, independently per axis, so
    E[λ] = 1 - E[(r - r²/4)²] = 1 - (E[s] - E[s^1.5]/2 + E[s²]/16), with E[s^k] = B(α + k, α) / B(α, α).
    0.679 at α = 1; the integer (floored) sides of real boxes raise the measured mean a little."""
    if not alpha > 0:
        raise ValueError(f"expected_lam: alpha must be > 0, found {alpha!r}")

    def moment(k: float) -> float:
        lg = math.lgamma
        return math.exp(lg(alpha + k) + lg(2 * alpha) - lg(alpha) - lg(2 * alpha + k))

    return 1.0 - (moment(1.0) - moment(1.5) / 2 + moment(2.0) / 16)


def _host_stats(value: Stats, name: str, device: torch.device) -> Floats3:
    """3 per-channel values as Python floats rounded to fp32 (a tensor on a GPU costs one host sync)."""
    if isinstance(value, torch.Tensor):
        if value.device != device:
            raise ValueError(f"cutmix_normalize: {name} is on {value.device} but views_u8 is on {device}")
        host = value.detach().to(torch.float32).flatten().tolist()
    else:
        try:
            host = [float(v) for v in value]
        except (TypeError, ValueError):
            raise TypeError(f"cutmix_normalize: {name} must be 3 numbers, found {value!r}") from None
    if len(host) != 3:
        raise ValueError(f"cutmix_normalize: {name} must have 3 values (one per channel), found {len(host)}")
    if name == "std" and not all(v > 0 for v in host):
        raise ValueError(f"cutmix_normalize: std must be > 0, found {host}")
    return tuple(float(np.float32(v)) for v in host)


@functools.lru_cache(maxsize=64)
def _stats_on(values: Floats3, device: torch.device) -> torch.Tensor:
    # A fresh host-to-device copy per call would block the launch queue: recipes pass the same few tuples.
    return torch.tensor(values, dtype=torch.float32, device=device)


def check_cutmix_inputs(
    views_u8: torch.Tensor,
    partner: torch.Tensor | None,
    boxes: torch.Tensor | None,
    mean: Stats,
    std: Stats,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the arguments of `cutmix_normalize` (both implementations call this).

    Returns (mean, inv_std): 3 Python floats each, fp32 values, inv_std = 1/std computed in fp32 (what both
    implementations multiply by). Raises TypeError/ValueError
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
        raise ValueError(
            f"cutmix_normalize: views_u8 must be a contiguous NHWC tensor, found strides {views_u8.stride()}"
        )
    if dtype not in OUT_DTYPES:
        raise TypeError(f"cutmix_normalize: dtype must be one of bfloat16, float16, float32, found {dtype}")
    device = views_u8.device
    n, height, width, _ = views_u8.shape
    mean_f = _host_stats(mean, "mean", device)
    inv_f = tuple(float(np.float32(1.0) / np.float32(v)) for v in _host_stats(std, "std", device))
    if boxes is None:
        return mean_f, inv_f
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
        raise ValueError(
            f"cutmix_normalize: partner values must be in [0, {n}), found min "
            f"{int(partner.min())} max {int(partner.max())}"
        )
    if bad_boxes:
        i = int(outside.nonzero()[0])
        raise ValueError(
            f"cutmix_normalize: boxes[{i}] = {boxes[i].tolist()} is not a (y0, y1, x0, x1) box "
            f"inside a {height}x{width} image"
        )
    return mean_f, inv_f


def cutmix_normalize_reference(
    views_u8: torch.Tensor,
    partner: torch.Tensor | None,
    boxes: torch.Tensor | None,
    mean: Stats,
    std: Stats,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure-PyTorch normalise + CutMix: float32 throughout, one cast at the end."""
    mean_f, inv_f = check_cutmix_inputs(views_u8, partner, boxes, mean, std, dtype)
    return _reference(views_u8, partner, boxes, mean_f, inv_f, dtype)


def _reference(views_u8, partner, boxes, mean: Floats3, inv_std: Floats3, dtype):
    x = views_u8.permute(0, 3, 1, 2).to(torch.float32)
    mean_t, inv_t = _stats_on(mean, x.device), _stats_on(inv_std, x.device)
    plain = (x - mean_t.view(1, 3, 1, 1)) * inv_t.view(1, 3, 1, 1)
    mixed = None
    if boxes is not None:
        _, _, height, width = plain.shape
        b = boxes.to(x.device).long()
        partner = partner.to(x.device)
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        in_rows = (rows[None] >= b[:, 0:1]) & (rows[None] < b[:, 1:2])  # [N, H]
        in_cols = (cols[None] >= b[:, 2:3]) & (cols[None] < b[:, 3:4])  # [N, W]
        inside = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [N, 1, H, W]
        mixed = torch.where(inside, plain[partner.long()], plain)
        mixed = mixed.to(dtype).contiguous(memory_format=torch.channels_last)
    plain = plain.to(dtype).contiguous(memory_format=torch.channels_last)
    return plain, mixed


def cutmix_normalize(
    views_u8: torch.Tensor,
    partner: torch.Tensor | None,
    boxes: torch.Tensor | None,
    mean: Stats,
    std: Stats,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalised plain views and their CutMix-ed versions, [N, 3, H, W] in `dtype`, channels_last.

    mixed[i] is plain[i] outside boxes[i] and plain[partner[i]] inside it. `boxes=None` (SIM) returns
    (plain, None) without doing any mixing work. `partner` and `boxes` may be host tensors (then they reach
    the views' device in one copy) or device tensors (then validating their values costs one host sync).
    """
    mean_f, inv_f = check_cutmix_inputs(views_u8, partner, boxes, mean, std, dtype)
    return _normalize_checked(views_u8, partner, boxes, mean_f, inv_f, dtype)


def _normalize_checked(views_u8, partner, boxes, mean: Floats3, inv_std: Floats3, dtype, out=None):
    """`cutmix_normalize` after validation: the kernel or the reference. `out = (plain, mixed)`: write into
    these ([N, 3, H, W] channels_last tensors of `dtype`; mixed None without boxes) and return them."""
    device = views_u8.device
    if not use_triton(device):
        made = _reference(views_u8, partner, boxes, mean, inv_std, dtype)
        if out is None:
            return made
        for target, value in zip(out, made):
            if target is not None:
                target.copy_(value)
        return out
    from .kernels import cutmix as kernel

    n, height, width, _ = views_u8.shape
    why = kernel.check_shape(n, height, width)
    if why:
        raise ValueError(f"cutmix_normalize: {why}")
    if boxes is not None:
        partner, boxes = to_device([partner, boxes], device)
    return kernel.cutmix_normalize(views_u8, partner, boxes, mean, inv_std, dtype, out=out)


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The tensors on `device`, host ones through ONE host-to-device copy: packed into one pinned staging
    buffer and copied with non_blocking=True, so the host does not wait (the caching host allocator keeps
    the buffer until the copy has run). Tensors already there pass through; off CUDA this is `.to(device)`."""
    device = torch.device(device)
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    moving = [i for i, t in enumerate(tensors) if t.device != device]
    if not moving:
        return list(tensors)
    spans, total = [], 0
    for i in moving:
        nbytes = tensors[i].numel() * tensors[i].element_size()
        spans.append((total, nbytes))
        total += -(-nbytes // 16) * 16  # 16-byte aligned segments: any dtype can view them
    stage = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    for i, (start, nbytes) in zip(moving, spans):
        stage[start : start + nbytes].view(tensors[i].dtype).copy_(tensors[i].reshape(-1))
    on_device = stage.to(device, non_blocking=True)
    out = list(tensors)
    for i, (start, nbytes) in zip(moving, spans):
        out[i] = on_device[start : start + nbytes].view(tensors[i].dtype).view(tensors[i].shape)
    return out


def draw_mixing(n: int, height: int, width: int, alpha: float, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """What `make_views` draws from `gen`, in its order: (partner, boxes_a, lam_a, boxes_b, lam_b). One
    partner for both views, boxes per sample and per view. A generator in the same state gives the same
    draws, which is how `bsim_fast.views` outlines the boxes of the views `make_views` made."""
    partner = derangement(n, generator=gen)
    boxes_a, lam_a = sample_boxes(n, height, width, alpha, generator=gen)
    boxes_b, lam_b = sample_boxes(n, height, width, alpha, generator=gen)
    return partner, boxes_a, lam_a, boxes_b, lam_b


VIEW_NAMES = ("plain_a", "plain_b", "mixed_a", "mixed_b")


def view_order(mode: str) -> tuple[str, ...]:
    """The views of a step in `mode`, in the order `make_views` lays them out unless a method asks otherwise."""
    return VIEW_NAMES[:2] if mode == "sim" else VIEW_NAMES


def make_views(
    a_u8: torch.Tensor,
    b_u8: torch.Tensor,
    cfg: Config,
    gen: torch.Generator,
    dtype: torch.dtype,
    order: Sequence[str] | None = None,
) -> dict:
    """The step's views, written once into one batch: `views`, [V*N, 3, S, S] in `dtype`, channels_last, the
    named views in `order` (`view_order(mode)` by default; a method's `view_order()` in the training step),
    so that every network reads a slice of it and no view is copied after the kernel (docs/DESIGN.md).
    Also `plain_a`, `plain_b` and, in BSIM/WBSIM, `mixed_a`, `mixed_b` (those slices), `partner`, `lam_a`,
    `lam_b`.

    One partner for both views, boxes drawn per sample and per view (one generator, `gen`, draws all of
    it on its device, the host for the trainer). Partner, boxes and lam are validated on the host and reach
    the views' device in one non-blocking copy: no host sync. Two kernel launches on CUDA.
    """
    n, h, w, _ = a_u8.shape
    mean, std = cfg.data.mean, cfg.data.std
    order = tuple(view_order(cfg.method.mode) if order is None else order)
    if sorted(order) != sorted(view_order(cfg.method.mode)):
        raise ValueError(f"make_views: order {order} does not name the views of mode {cfg.method.mode!r}")
    views = torch.empty((len(order) * n, 3, h, w), dtype=dtype, device=a_u8.device, memory_format=torch.channels_last)
    out = {name: views[i * n : (i + 1) * n] for i, name in enumerate(order)}
    if cfg.method.mode == "sim":
        mean_f, inv_f = check_cutmix_inputs(a_u8, None, None, mean, std, dtype)
        check_cutmix_inputs(b_u8, None, None, mean, std, dtype)
        _normalize_checked(a_u8, None, None, mean_f, inv_f, dtype, out=(out["plain_a"], None))
        _normalize_checked(b_u8, None, None, mean_f, inv_f, dtype, out=(out["plain_b"], None))
        return dict(views=views, **out)
    partner, boxes_a, lam_a, boxes_b, lam_b = draw_mixing(n, h, w, cfg.bsim.alpha, gen)
    mean_f, inv_f = check_cutmix_inputs(a_u8, partner, boxes_a, mean, std, dtype)
    check_cutmix_inputs(b_u8, partner, boxes_b, mean, std, dtype)
    partner, boxes_a, boxes_b, lam_a, lam_b = to_device([partner, boxes_a, boxes_b, lam_a, lam_b], a_u8.device)
    _normalize_checked(a_u8, partner, boxes_a, mean_f, inv_f, dtype, out=(out["plain_a"], out["mixed_a"]))
    _normalize_checked(b_u8, partner, boxes_b, mean_f, inv_f, dtype, out=(out["plain_b"], out["mixed_b"]))
    return dict(views=views, **out, partner=partner, lam_a=lam_a, lam_b=lam_b)


__all__ = [
    "derangement",
    "sample_boxes",
    "expected_lam",
    "check_cutmix_inputs",
    "cutmix_normalize",
    "cutmix_normalize_reference",
    "to_device",
    "draw_mixing",
    "make_views",
    "view_order",
    "VIEW_NAMES",
]
