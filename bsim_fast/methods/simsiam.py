"""SimSiam (Chen & He 2021) and its BSIM forms: the targets are the same network's projections under
stop-gradient (docs/METHOD.md, "SimSiam")."""

from __future__ import annotations

import torch

from bsim_fast import losses
from bsim_fast.methods.base import Method, register
from bsim_fast.models import mlp


@register("simsiam")
class SimSiam(Method):
    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        self.projector = mlp(self.feat_dim, m.proj_hidden, m.proj_dim, num_layers=3, last_bn=True, last_bn_affine=False)
        self.predictor = mlp(m.proj_dim, m.pred_hidden, m.proj_dim)

    def encode(self, x):
        z = self.projector(self.backbone(x))
        return self.predictor(z), z

    def encode_target(self, x):
        return self.projector(self.backbone(x))

    def targets(self, views, projections):
        if self.mode != "bsim":  # the plain views went through the online forward already
            return projections[0], projections[1]
        with torch.no_grad():  # BSIM: the online side saw only mixed views
            return self.encode_target(self.span(views, "plain_a", "plain_b")).chunk(2)

    def pair_loss(self, out, target, partner, lam):
        return losses.simsiam_loss(out, target, partner, lam)
