"""Thin helpers over torch.distributed that degrade to the identity in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sends each rank the gradient of its own rows.

    Every rank computes the same loss on the gathered tensor and DDP then averages parameter gradients
    over ranks, so the gradient of each rank's rows is summed over ranks here (all_reduce, which every
    backend has, gloo included); the average then equals the single-process gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks (same shape on each) along dim 0, keeping the autograd graph."""
    if world() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks (same shape on each) along dim 0, without gradient."""
    if world() == 1:
        return x
    x = x.contiguous()       # before empty_like, so the receive buffers have the layout that is sent
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


@torch.no_grad()
def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `x` on every rank with rank `src`'s `x` (in place; `x` must be contiguous); returns `x`."""
    if world() > 1:
        dist.broadcast(x, src)
    return x


__all__ = ["is_dist", "rank", "world", "gather_with_grad", "concat_all_gather", "broadcast_"]
