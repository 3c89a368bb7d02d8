"""Optimisers and the learning-rate schedule.

LARS is timm's `Lars`, which computes the same update as solo-learn's LARS (the anchor of the CIFAR recipes,
docs/RECIPES.md): trust ratio `eta * |w| / (|g| + wd * |w| + eps)` (`optim.trust_coefficient`), clipped to at
most 1 relative to the scheduled lr when `optim.clip_lr` (timm's `trust_clip`), applied to (g + wd * w),
then SGD momentum. Which tensors it adapts is set per group: every group but the excluded biases and norm
weights (timm's `always_adapt`), as solo-learn's `exclude_bias_n_norm`; the excluded ones get neither weight
decay nor adaptation. (The one difference: for a tensor whose weight or gradient is all zero, timm applies
weight decay with ratio 1 where solo-learn leaves the gradient as it is.) SGD and AdamW use PyTorch's fused
CUDA implementations when the parameters live on a GPU: that is what apex's FusedSGD/FusedAdam gave.
"""

from __future__ import annotations

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
    from timm.optim import Lars

    return Lars(
        groups,
        lr=lr,
        momentum=cfg.optim.momentum,
        trust_coeff=cfg.optim.trust_coefficient,
        trust_clip=cfg.optim.clip_lr,
    )


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
