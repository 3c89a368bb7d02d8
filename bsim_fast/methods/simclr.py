"""SimCLR (Chen et al. 2020a) and its BSIM forms: one soft-target InfoNCE over the views of all ranks
(docs/METHOD.md, "SimCLR")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bsim_fast import losses
from bsim_fast.config import setting
from bsim_fast.dist import concat_all_gather, gather_with_grad, world
from bsim_fast.methods.base import Method, register
from bsim_fast.models import mlp


@dataclass
class SimCLRSettings:
    temperature: float = setting(0.1, gt=0)  # SimCLR's tau for batch 4096 (Chen et al. 2020a, B.9)
    # The projector, Linear-[BN]-ReLU-Linear-[BN] (docs/RECIPES.md, "SimCLR"). The defaults are SimCLR's code
    # (google-research/simclr, `projection_head`): BN after both Linears, the output's with a scale and no
    # shift. solo-learn's CIFAR head (configs/small/simclr.yaml) has neither: Linear-ReLU-Linear with biases.
    proj_hidden_bn: bool = True
    proj_output_bn: bool = True


@register("simclr")
class SimCLR(Method):
    Settings = SimCLRSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        s = self.settings
        self.projector = mlp(
            self.feat_dim,
            m.proj_hidden,
            m.proj_dim,
            hidden_bn=s.proj_hidden_bn,
            last_bn=s.proj_output_bn,
            last_bn_shift=False,
        )

    def encode(self, x):
        return self.projector(self.backbone(x))

    def online_views(self):
        # the plain views are the candidates in every mode, so they are always encoded, with gradient
        return self.view_order()

    def objective(self, views, partner=None, lam_a=None, lam_b=None):
        names, n, tau = self.online_views(), views.shape[0] // len(self.view_order()), self.settings.temperature
        z = self.encode(self.span(views, *names))
        # One collective for all views: [world * k * n, D] -> k tensors of [world * n, D] in rank order.
        z = gather_with_grad(z).unflatten(0, (world(), len(names), n)).transpose(0, 1).flatten(1, 2)
        loss_sim = loss_bsim = None
        if self.mode != "bsim":
            loss_sim = losses.simclr_loss(z[0], z[1], z[0], z[1], tau=tau)
        if self.mode != "sim":
            device = z.device
            partner = torch.arange(n, device=device) if partner is None else partner.to(device, torch.long)
            lam_a = torch.ones(n, device=device) if lam_a is None else lam_a.to(device, torch.float32)
            lam_b = torch.ones(n, device=device) if lam_b is None else lam_b.to(device, torch.float32)
            # Partners index this rank's images; offset them to index the gathered batch.
            partner = concat_all_gather(partner) + torch.arange(world(), device=device).repeat_interleave(n) * n
            loss_bsim = losses.simclr_loss(
                z[2], z[3], z[0], z[1], partner, concat_all_gather(lam_a), concat_all_gather(lam_b), tau=tau
            )
        return self._result(loss_sim, loss_bsim, lam_a), ()
