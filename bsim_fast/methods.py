"""BYOL, SimSiam, MoCo v2 and SimCLR as modules that own their networks and turn views into a loss.

View routing (SPEC section 2): the online / query side sees the plain views in SIM, the mixed views in BSIM
and all four in WBSIM, in one concatenated forward; the target / key side sees the plain views only.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsim_fast import losses
from bsim_fast.config import Config
from bsim_fast.dist import broadcast_, concat_all_gather, gather_with_grad, rank, world
from bsim_fast.models import build_backbone, mlp


def _frozen_copy(module: nn.Module) -> nn.Module:
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class Method(nn.Module):
    """Common routing; subclasses say how views are encoded, what the targets are and the pair loss."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.mode = cfg.method.mode
        self.weight = cfg.bsim.weight
        self.backbone, self.feat_dim = build_backbone(cfg.model.arch, cfg.model.cifar_stem)

    def momentum_update(self, progress: float) -> None:
        """Called after every optimiser step; progress in [0, 1] over the run. No-op by default."""

    def _online_views(self, plain_a, plain_b, mixed_a, mixed_b) -> List[torch.Tensor]:
        if self.mode not in ("sim", "bsim", "wbsim"):
            raise ValueError(f"method.mode: {self.mode!r} is not one of sim, bsim, wbsim")
        if self.mode != "sim" and (mixed_a is None or mixed_b is None):
            raise ValueError(f"method.mode={self.mode!r} needs mixed_a and mixed_b, got None")
        return {"sim": [plain_a, plain_b], "bsim": [mixed_a, mixed_b],
                "wbsim": [plain_a, plain_b, mixed_a, mixed_b]}[self.mode]

    def _result(self, loss_sim: Optional[torch.Tensor], loss_bsim: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.mode == "sim":
            return {"loss": loss_sim, "loss_sim": loss_sim.detach()}
        if self.mode == "bsim":
            return {"loss": loss_bsim, "loss_bsim": loss_bsim.detach()}
        return {"loss": loss_sim + self.weight * loss_bsim, "loss_sim": loss_sim.detach(),
                "loss_bsim": loss_bsim.detach()}

    # BYOL, SimSiam and MoCo share one shape: encode the online views, get targets of the plain views,
    # and sum the two symmetric directions (view ' against targets of '', and vice versa).
    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prediction / query, projection) of a batch of online views."""
        raise NotImplementedError

    def targets(self, plain_a, plain_b, projections) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def pair_loss(self, out, target, partner, lam) -> torch.Tensor:
        raise NotImplementedError

    def after_forward(self, target_a, target_b) -> None:
        pass

    def forward(self, plain_a, plain_b, mixed_a=None, mixed_b=None, partner=None, lam_a=None, lam_b=None):
        views = self._online_views(plain_a, plain_b, mixed_a, mixed_b)
        out, proj = self.encode(torch.cat(views))
        out, proj = out.chunk(len(views)), proj.chunk(len(views))
        target_a, target_b = self.targets(plain_a, plain_b, proj)
        loss_sim = loss_bsim = None
        if self.mode != "bsim":
            loss_sim = self.pair_loss(out[0], target_b, None, None) + self.pair_loss(out[1], target_a, None, None)
        if self.mode != "sim":
            loss_bsim = (self.pair_loss(out[-2], target_b, partner, lam_a)
                         + self.pair_loss(out[-1], target_a, partner, lam_b))
        self.after_forward(target_a, target_b)
        return self._result(loss_sim, loss_bsim)


class BYOL(Method):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m = cfg.model
        self.projector = mlp(self.feat_dim, m.proj_hidden, m.proj_dim)
        self.predictor = mlp(m.proj_dim, m.pred_hidden, m.proj_dim)
        self.target = _frozen_copy(nn.Sequential(self.backbone, self.projector))
        self.tau_base = m.tau_base

    def encode(self, x):
        z = self.projector(self.backbone(x))
        return self.predictor(z), z

    def targets(self, plain_a, plain_b, projections):
        with torch.no_grad():
            return self.target(torch.cat([plain_a, plain_b])).chunk(2)

    def pair_loss(self, out, target, partner, lam):
        return losses.byol_loss(out, target, partner, lam)

    def ema_tau(self, progress: float) -> float:
        """Target EMA rate: tau_base at the start, cosine-scheduled to 1 at the end of the run."""
        return 1 - (1 - self.tau_base) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        tau = self.ema_tau(progress)
        online = list(self.backbone.parameters()) + list(self.projector.parameters())
        torch._foreach_lerp_(list(self.target.parameters()), online, 1 - tau)


class SimSiam(Method):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m = cfg.model
        self.projector = mlp(self.feat_dim, m.proj_hidden, m.proj_dim, num_layers=3, last_bn=True,
                             last_bn_affine=False)
        self.predictor = mlp(m.proj_dim, m.pred_hidden, m.proj_dim)

    def encode(self, x):
        z = self.projector(self.backbone(x))
        return self.predictor(z), z

    def targets(self, plain_a, plain_b, projections):
        if self.mode != "bsim":          # the plain views went through the online forward already
            return projections[0], projections[1]
        with torch.no_grad():
            return self.projector(self.backbone(torch.cat([plain_a, plain_b]))).chunk(2)

    def pair_loss(self, out, target, partner, lam):
        return losses.simsiam_loss(out, target, partner, lam)


class MoCo(Method):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m = cfg.model
        self.head = mlp(self.feat_dim, m.proj_hidden, m.proj_dim, hidden_bn=False)
        self.key_encoder = _frozen_copy(nn.Sequential(self.backbone, self.head))
        self.momentum = m.moco_momentum
        self.tau = m.temperature
        self.shuffle_bn = m.shuffle_bn
        self.register_buffer("queue", F.normalize(torch.randn(m.queue_size, m.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def encode(self, x):
        q = self.head(self.backbone(x))
        return q, q

    def targets(self, plain_a, plain_b, projections):
        with torch.no_grad():
            # a and b in one batch: one shuffle, one pair of collectives, one key forward
            keys = F.normalize(self.encode_keys(torch.cat([plain_a, plain_b])).float(), dim=1)
        self._queue_now = self.queue.clone()    # the queue is updated in place before backward
        return keys.chunk(2)

    def _shuffles(self) -> bool:
        """ShuffleBN matters only where the key encoder normalises with its own rank's batch statistics:
        not in one process, not in eval mode (running statistics), not under SyncBN (global statistics,
        which a permutation leaves unchanged, so the gathers would be pure cost)."""
        if not (self.shuffle_bn and world() > 1 and self.key_encoder.training):
            return False
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                   for m in self.key_encoder.modules())

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key encoder on this rank's batch `x`, with MoCo v2's ShuffleBN across ranks.

        Without it the keys' BN statistics come from the very images whose queries they must be told
        apart from, a batch-level leak the model can use to lower the loss instead of learning. So the
        global batch is permuted, each rank encodes one slice of it, and the outputs go back to the ranks
        that own the images. In one process there is nothing to shuffle with: that is MoCo's single-GPU
        path, and the leak stays (a known limitation of it).

        The permutation is drawn on rank 0 from torch's default RNG on x's device and broadcast: the method
        has no step counter to seed a generator from, and the trainer checkpoints every rank's RNG state,
        so a resumed run draws the same permutations. One process draws nothing.
        """
        if not self._shuffles():
            return self.key_encoder(x)
        n, r = x.shape[0], rank()
        x_all = concat_all_gather(x)
        perm = (torch.randperm(x_all.shape[0], device=x.device) if r == 0
                else torch.empty(x_all.shape[0], dtype=torch.long, device=x.device))
        broadcast_(perm)
        # the gather is in plain layout; give the encoder the layout it was handed (channels_last or not)
        layout = (torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                  else torch.contiguous_format)
        y = self.key_encoder(x_all[perm[r * n:(r + 1) * n]].contiguous(memory_format=layout))
        # row j of the gathered outputs encodes image perm[j]; argsort(perm) puts them back in image order
        return concat_all_gather(y)[torch.argsort(perm)[r * n:(r + 1) * n]]

    def pair_loss(self, out, target, partner, lam):
        return losses.moco_loss(out, target, self._queue_now, partner, lam, self.tau)

    def after_forward(self, target_a, target_b) -> None:
        del self._queue_now
        if self.training:
            self.enqueue(torch.cat([target_a, target_b]))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys of all ranks over the oldest queue entries, wrapping around the end."""
        keys = concat_all_gather(keys.contiguous())[-self.queue.shape[0]:]
        size = self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        online = list(self.backbone.parameters()) + list(self.head.parameters())
        torch._foreach_lerp_(list(self.key_encoder.parameters()), online, 1 - self.momentum)


class SimCLR(Method):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m = cfg.model
        self.projector = mlp(self.feat_dim, m.proj_hidden, m.proj_dim)
        self.tau = m.temperature

    def forward(self, plain_a, plain_b, mixed_a=None, mixed_b=None, partner=None, lam_a=None, lam_b=None):
        # The plain views are the candidates in every mode, so they are always encoded, with gradient.
        online = self._online_views(plain_a, plain_b, mixed_a, mixed_b)
        views = online if self.mode == "sim" else [plain_a, plain_b, mixed_a, mixed_b]
        n = plain_a.shape[0]
        z = self.projector(self.backbone(torch.cat(views)))
        # One collective for all views: [world * k * n, D] -> k tensors of [world * n, D] in rank order.
        z = gather_with_grad(z).unflatten(0, (world(), len(views), n)).transpose(0, 1).flatten(1, 2)
        loss_sim = loss_bsim = None
        if self.mode != "bsim":
            loss_sim = losses.simclr_loss(z[0], z[1], z[0], z[1], tau=self.tau)
        if self.mode != "sim":
            device = z.device
            partner = torch.arange(n, device=device) if partner is None else partner.to(device, torch.long)
            lam_a = torch.ones(n, device=device) if lam_a is None else lam_a.to(device, torch.float32)
            lam_b = torch.ones(n, device=device) if lam_b is None else lam_b.to(device, torch.float32)
            # Partners index this rank's images; offset them to index the gathered batch.
            partner = concat_all_gather(partner) + torch.arange(world(), device=device).repeat_interleave(n) * n
            loss_bsim = losses.simclr_loss(z[2], z[3], z[0], z[1], partner, concat_all_gather(lam_a),
                                           concat_all_gather(lam_b), tau=self.tau)
        return self._result(loss_sim, loss_bsim)


METHODS = {"byol": BYOL, "simsiam": SimSiam, "moco": MoCo, "simclr": SimCLR}


def compile_networks(method: nn.Module) -> None:
    """torch.compile each network of a method in place (state_dict keys unchanged). The loss stays eager:
    gathers and queue updates would otherwise break the graphs."""
    for module in method.children():
        if any(True for _ in module.parameters()):
            module.compile()


def build_method(cfg: Config) -> Method:
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"method.name: {name!r} is not one of {', '.join(METHODS)}")
    if cfg.method.mode not in ("sim", "bsim", "wbsim"):
        raise ValueError(f"method.mode: {cfg.method.mode!r} is not one of sim, bsim, wbsim")
    return METHODS[name](cfg)


__all__ = ["Method", "BYOL", "SimSiam", "MoCo", "SimCLR", "build_method"]
