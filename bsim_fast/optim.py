"""Optimisers and the learning-rate schedule.

LARS is timm's `Lars`, which computes the same update as solo-learn's LARS (the anchor of the CIFAR recipes,
docs/RECIPES.md): trust ratio `eta * |w| / (|g| + wd * |w| + eps)` (`optim.trust_coefficient`), clipped to at
most 1 relative to the scheduled lr when `optim.clip_lr` (timm's `trust_clip`), applied to (g + wd * w),
then SGD momentum. Which tensors it adapts is set per group: every group but the excluded biases and norm
weights (timm's `always_adapt`), as solo-learn's `exclude_bias_n_norm`; the excluded ones get neither weight
decay nor adaptation. (The one difference: for a tensor whose weight or gradient is all zero, timm applies
weight decay with ratio 1 where solo-learn leaves the gradient as it is.) Its step is `Lars.step` below: timm's
update in multi-tensor operations, about 17 launches a step for any number of parameters. SGD and AdamW use
PyTorch's fused CUDA implementations when the parameters live on a GPU: that is what apex's FusedSGD/FusedAdam
gave.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .config import Config


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Split parameters so biases and norm weights get no weight decay and no LARS adaptation (when
    `optim.exclude_bias_norm`), and SimSiam's predictor can keep a fixed learning rate."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = cfg.optim.exclude_bias_norm and p.ndim <= 1
        fixed = cfg.optim.fixed_predictor_lr and "predictor" in name
        key = (no_decay, fixed)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else cfg.optim.weight_decay,
                "fixed_lr": fixed,
                "always_adapt": not no_decay,
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    lr = scaled_lr(cfg)
    fused = device.type == "cuda"
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, fused=fused or None)
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.optim.betas, fused=fused or None)
    return lars_type()(
        groups,
        lr=lr,
        momentum=cfg.optim.momentum,
        trust_coeff=cfg.optim.trust_coefficient,
        trust_clip=cfg.optim.clip_lr,
    )


@functools.cache
def lars_type() -> type:
    """timm's `Lars` with `LarsStep`'s step (timm is imported here, on first use: it takes seconds)."""
    from timm.optim import Lars

    return type("Lars", (LarsStep, Lars), {"__module__": __name__})


class LarsStep:
    """The step of timm's LARS (whose constructor, settings and state, `momentum_buffer` per parameter, are
    kept) in multi-tensor operations over all parameters, so the number of launches does not grow with the
    number of tensors: one norm of every adapted weight and gradient, their trust ratios r as one vector per
    group, one weight decay per group, then buf = m buf + r d in one `_foreach_mul_` and one
    `_foreach_addcmul_` (r a list of 0-dim tensors, the form torch's ASGD uses; where torch has no multi-tensor
    kernel for it, it runs tensor by tensor), one parameter update per learning rate. timm's own step launches
    ~11 operations per tensor (about 1,800 a step for a ResNet-50), its foreach step (timm >= 1.0.31) about 20
    per group. The operations are timm's on the same values, so on the CPU (where multi-tensor operations run
    tensor by tensor) the update is bitwise timm's with dampening 0 (every recipe); on a GPU the norms are
    reduced in another order and r d may be rounded inside the fused multiply-add (float rounding)."""

    param_groups: list[dict]
    state: dict

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        adapted = [ps for g, ps in groups if ps and (g["weight_decay"] != 0 or g["always_adapt"])]
        weights = [p for ps in adapted for p in ps]
        norms = torch._foreach_norm(weights + [p.grad for p in weights])
        vector, start, count = (torch.stack(norms) if norms else None), 0, len(weights)
        items = []  # (parameter, its update d, its trust ratio r (0-dim) or None, its group)
        for group, params in groups:
            grads, ratios = [p.grad for p in params], [None] * len(params)
            if params and (group["weight_decay"] != 0 or group["always_adapt"]):
                w, g = vector[start : start + len(params)], vector[count + start : count + start + len(params)]
                start += len(params)
                ratios = list(self._trust_ratio(w, g, group).unbind(0))
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])  # p.grad left as it is
            items += [(p, d, r, group) for p, d, r in zip(params, grads, ratios)]
        for (momentum, dampening, nesterov), same in _buckets(items, _sgd_key).items():
            steps = self._momentum(same, momentum, dampening, nesterov)
            for lr, idx in _buckets(range(len(same)), lambda i, same=same: same[i][3]["lr"]).items():
                torch._foreach_add_([same[i][0] for i in idx], [steps[i] for i in idx], alpha=-lr)
        return loss

    @staticmethod
    def _trust_ratio(w: torch.Tensor, g: torch.Tensor, group: dict) -> torch.Tensor:
        """timm's `_lars_trust_ratio` on the vectors of a group's weight and gradient norms."""
        ratio = group["trust_coeff"] * w / (g + w * group["weight_decay"] + group["eps"])
        ratio = torch.where(torch.minimum(w, g) > 0, ratio, 1.0)  # 1 where either norm is 0 (or NaN)
        return torch.clamp(ratio / group["lr"], max=1.0) if group["trust_clip"] else ratio

    def _momentum(self, items: list, momentum: float, dampening: float, nesterov: bool) -> list[torch.Tensor]:
        """What p moves by, times lr, as timm: buf = m buf + (1 - dampening) r d (r d itself the first time),
        the step buf, or r d + m buf with nesterov (r d without momentum)."""
        bufs = [self.state[p].get("momentum_buffer") for p, *_ in items] if momentum != 0 else []
        if bufs and not nesterov and all(b is not None for b in bufs):  # every step but the first
            torch._foreach_mul_(bufs, momentum)
            for scaled, idx in _buckets(range(len(items)), lambda i: items[i][2] is not None).items():
                d, b = [items[i][1] for i in idx], [bufs[i] for i in idx]
                if scaled:
                    torch._foreach_addcmul_(b, d, [items[i][2] for i in idx], value=1.0 - dampening)
                else:
                    torch._foreach_add_(b, d, alpha=1.0 - dampening)
            return bufs
        steps = [d if r is None else d * r for _, d, r, _ in items]  # r d, tensor by tensor: first step only
        if momentum == 0:
            return steps
        for i, (p, *_) in enumerate(items):
            if bufs[i] is None:
                bufs[i] = self.state[p]["momentum_buffer"] = torch.clone(steps[i]).detach()
            else:
                bufs[i].mul_(momentum).add_(steps[i], alpha=1.0 - dampening)
        return torch._foreach_add(steps, bufs, alpha=momentum) if nesterov else bufs


def _sgd_key(item) -> tuple:
    group = item[3]
    return group["momentum"], group["dampening"], group["nesterov"]


def _buckets(items, key) -> dict:
    """items grouped by key(item), in order: one multi-tensor operation per bucket."""
    out: dict = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


def scaled_lr(cfg: Config) -> float:
    return cfg.optim.lr * cfg.data.batch_size / cfg.optim.lr_batch


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float) -> float:
    """Linear warm-up from 0, then a half cosine down to min_ratio * base_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr if group.get("fixed_lr") else lr
