"""BYOL (Grill et al. 2020) and its BSIM forms: an online network predicts a slow EMA target network's
projection of the other view (docs/METHOD.md, "BYOL")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from bsim_fast import losses
from bsim_fast.config import setting
from bsim_fast.methods.base import Method, ema_rate, ema_update, frozen_copy, register
from bsim_fast.models import mlp


@dataclass
class BYOLSettings:
    tau_base: float = setting(0.996, ge=0, le=1)  # target EMA rate at the start (BYOL App. A: 0.996)
    tau_final: float = setting(1.0, ge=0, le=1)  # ... cosine-scheduled to this at the end (BYOL: 1)


@register("byol")
class BYOL(Method):
    Settings = BYOLSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        self.projector = mlp(self.feat_dim, m.proj_hidden, m.proj_dim)
        self.predictor = mlp(m.proj_dim, m.pred_hidden, m.proj_dim)
        self.target = frozen_copy(nn.Sequential(self.backbone, self.projector))

    def encode(self, x):
        z = self.projector(self.backbone(x))
        return self.predictor(z), z

    def encode_target(self, x):
        return self.target(x)

    def targets(self, views, projections):
        with torch.no_grad():
            return self.encode_target(self.span(views, "plain_a", "plain_b")).chunk(2)

    def pair_loss(self, out, target, partner, lam):
        return losses.byol_loss(out, target, partner, lam)

    def ema_tau(self, progress: float) -> float:
        return ema_rate(self.settings.tau_base, self.settings.tau_final, progress)

    def momentum_update(self, progress: float) -> None:
        ema_update(self.target, [self.backbone, self.projector], self.ema_tau(progress))
