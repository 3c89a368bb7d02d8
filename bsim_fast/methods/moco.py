"""MoCo v2 (Chen et al. 2020b) and its BSIM forms: queries against the keys of an EMA key encoder and a queue
of earlier keys (docs/METHOD.md, "MoCo v2")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsim_fast import losses
from bsim_fast.config import setting
from bsim_fast.dist import broadcast_, concat_all_gather, rank, world
from bsim_fast.methods.base import Method, ema_rate, ema_update, frozen_copy, register
from bsim_fast.models import mlp


@dataclass
class MoCoSettings:
    tau_base: float = setting(0.999, ge=0, le=1)  # key-encoder EMA rate m at the start (MoCo v2: 0.999)
    tau_final: float = setting(0.999, ge=0, le=1)  # ... cosine-scheduled to this (MoCo v2: constant)
    temperature: float = setting(0.2, gt=0)
    shuffle_bn: bool = True  # shuffle the key encoder's batch across ranks (nothing to shuffle in one process)
    # The SIM part. False: MoCo v2 as published, queries of view a against keys of view b, N keys enqueued per
    # rank and step. True: solo-learn's MoCo v2+, both directions, the loss their mean, 2N keys enqueued. The
    # BSIM part has both directions either way (m' against keys of b, m'' against keys of a; docs/METHOD.md).
    symmetric: bool = False


@torch.compiler.disable  # eager under torch.compile: the draw from torch's default RNG, as in an eager run
def shared_permutation(size: int, device: torch.device) -> torch.Tensor:
    """A random permutation drawn on rank 0 and broadcast to every rank."""
    perm = torch.randperm(size, device=device) if rank() == 0 else torch.empty(size, dtype=torch.long, device=device)
    return broadcast_(perm)


@register("moco")
class MoCo(Method):
    Settings = MoCoSettings

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.model
        self.head = mlp(self.feat_dim, m.proj_hidden, m.proj_dim, hidden_bn=False)
        self.key_encoder = frozen_copy(nn.Sequential(self.backbone, self.head))
        self.register_buffer("queue", F.normalize(torch.randn(m.queue_size, m.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.symmetric = self.settings.symmetric

    def encode(self, x):
        q = self.head(self.backbone(x))
        return q, q

    def key_forward(self, x):
        return self.key_encoder(x)

    def view_order(self):
        # MoCo v2's one direction in BSIM / WBSIM: the queries (a, m', m'') follow b, so they are one slice
        if not self.symmetric and self.mode != "sim":
            return ("plain_b", "plain_a", "mixed_a", "mixed_b")
        return super().view_order()

    def targets(self, views, projections):
        with torch.no_grad():
            if self.symmetric:  # a and b in one batch: one shuffle, one pair of collectives, one key forward
                keys = F.normalize(self.encode_keys(self.span(views, "plain_a", "plain_b")).float(), dim=1)
                return keys.chunk(2)
            # MoCo v2's keys of b, batch statistics over b alone as in its SIM loss; the keys of a only for
            # the BSIM part's m'' direction, in a forward (and a shuffle) of their own
            key_b = F.normalize(self.encode_keys(self.span(views, "plain_b")).float(), dim=1)
            if self.mode == "sim":
                return None, key_b
            return F.normalize(self.encode_keys(self.span(views, "plain_a")).float(), dim=1), key_b

    def _shuffles(self) -> bool:
        """ShuffleBN matters only where the key encoder normalises with its own rank's batch statistics:
        not in one process, not in eval mode (running statistics), not under SyncBN (global statistics,
        which a permutation leaves unchanged, so the gathers would be pure cost)."""
        if not (self.settings.shuffle_bn and world() > 1 and self.key_encoder.training):
            return False
        return any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
            for m in self.key_encoder.modules()
        )

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
            return self.key_forward(x)
        n, r = x.shape[0], rank()
        x_all = concat_all_gather(x)
        perm = shared_permutation(x_all.shape[0], x.device)
        # the gather is in plain layout; give the encoder the layout it was handed (channels_last or not)
        layout = (
            torch.channels_last
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        y = self.key_forward(x_all[perm[r * n : (r + 1) * n]].contiguous(memory_format=layout))
        # row j of the gathered outputs encodes image perm[j]; argsort(perm) puts them back in image order
        return concat_all_gather(y)[torch.argsort(perm)[r * n : (r + 1) * n]]

    def pair_loss(self, out, target, partner, lam):
        # the queue as it was before this step's keys: they enter it after the forward (`after_forward`)
        return losses.moco_loss(out, target, self.queue, partner, lam, self.settings.temperature)

    def join_directions(self, terms):
        # the mean of the directions, as solo-learn's MoCo v2+, so that a recipe's lr carries over; the BSIM part
        # of one-direction MoCo v2 is then on the scale of its SIM loss (and equal to it in expectation at lam = 1)
        return sum(terms) / len(terms)

    def after_forward(self, targets) -> None:
        if self.training:  # MoCo v2 (one direction) enqueues b's keys only, even when a's were computed
            keys = torch.cat(targets) if self.symmetric else targets[1]
            self.hold(lambda: self.enqueue(keys))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys of all ranks over the oldest queue entries, wrapping around the end."""
        keys = concat_all_gather(keys.contiguous())[-self.queue.shape[0] :]
        size = self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def momentum_update(self, progress: float) -> None:
        ema_update(
            self.key_encoder,
            [self.backbone, self.head],
            ema_rate(self.settings.tau_base, self.settings.tau_final, progress),
        )
