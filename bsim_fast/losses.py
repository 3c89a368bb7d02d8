"""BSIM losses (docs/METHOD.md, "Losses"): one function per family, single process, float32 inside.

A mixed view i keeps a fraction lam[i] of its own image and takes 1 - lam[i] from image partner[i], so it
is pulled towards both targets in proportion. `partner=None, lam=None` is SIM: the identity partner with
lam = 1, which reduces every loss to the original method through the same code path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _float32(loss_fn):
    """Run a loss in float32 even inside an autocast region, which would otherwise redo its matmuls in
    half precision: with tau = 0.2, bf16 cosines move the logits by about 1e-2."""

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return loss_fn(*args, **kwargs)

    return wrapper


def _partner_and_lam(
    n: int, partner: torch.Tensor | None, lam: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if partner is None:
        partner = torch.arange(n, device=device)
    if lam is None:
        lam = torch.ones(n, device=device)
    if partner.shape != (n,) or lam.shape != (n,):
        raise ValueError(f"partner and lam must have shape [{n}], found {list(partner.shape)} and {list(lam.shape)}")
    return partner.to(device=device, dtype=torch.long), lam.to(device=device, dtype=torch.float32)


def _cosines(p: torch.Tensor, z: torch.Tensor, partner, lam):
    """cos(p_i, z_i), cos(p_i, z_partner[i]) and lam, with z treated as a constant target."""
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.detach().float(), dim=1)
    partner, lam = _partner_and_lam(p.shape[0], partner, lam, p.device)
    return (p * z).sum(1), (p * z[partner]).sum(1), lam


@_float32
def byol_loss(
    p: torch.Tensor, z: torch.Tensor, partner: torch.Tensor | None = None, lam: torch.Tensor | None = None
) -> torch.Tensor:
    """One direction of BYOL(-BSIM): mean_i lam_i (2 - 2cos(p_i, z_i)) + (1 - lam_i)(2 - 2cos(p_i, z_p[i]))."""
    own, other, lam = _cosines(p, z, partner, lam)
    return (lam * (2 - 2 * own) + (1 - lam) * (2 - 2 * other)).mean()


@_float32
def simsiam_loss(
    p: torch.Tensor, z: torch.Tensor, partner: torch.Tensor | None = None, lam: torch.Tensor | None = None
) -> torch.Tensor:
    """One direction of SimSiam(-BSIM), 0.5 factor included: 0.5 mean_i [lam_i D(p_i, z_i) + ...]."""
    own, other, lam = _cosines(p, z, partner, lam)
    return 0.5 * (lam * -own + (1 - lam) * -other).mean()


@_float32
def moco_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    partner: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    tau: float = 0.2,
) -> torch.Tensor:
    """MoCo(-BSIM) InfoNCE of queries q against keys k and a queue [K, D] of negative keys (normalised here, as
    every input); each positive has its own denominator (docs/METHOD.md, "MoCo v2")."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    queue = F.normalize(queue.detach().float(), dim=1)
    partner, lam = _partner_and_lam(q.shape[0], partner, lam, q.device)
    log_neg = torch.logsumexp(q @ queue.t() / tau, dim=1)

    def nce(pos):  # -log(e^pos / (e^pos + sum_n e^neg_n)), the cross entropy with the positive at index 0
        return torch.logaddexp(pos, log_neg) - pos

    own = (q * k).sum(1) / tau
    other = (q * k[partner]).sum(1) / tau
    return (lam * nce(own) + (1 - lam) * nce(other)).mean()


def _content(partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Row i = lam_i e_i + (1 - lam_i) e_partner[i]: how much of each source image view i shows."""
    n = lam.shape[0]
    content = torch.diag(lam)
    return content.index_put_((torch.arange(n, device=lam.device), partner), 1 - lam, accumulate=True)


@_float32
def simclr_loss(
    zm_a: torch.Tensor,
    zm_b: torch.Tensor,
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    partner: torch.Tensor | None = None,
    lam_a: torch.Tensor | None = None,
    lam_b: torch.Tensor | None = None,
    tau: float = 0.2,
) -> torch.Tensor:
    """Soft-target InfoNCE of the anchors zm_a, zm_b (mixed views) against the candidates z_a, z_b.

    Targets sit on the other augmentation's views of the anchor's source images, weighted by lam; views of
    the same augmentation that share pixels with the anchor leave the denominator; the rest are negatives.
    simclr_loss(z_a, z_b, z_a, z_b) is NT-Xent over the 2N views.
    """
    n = z_a.shape[0]
    partner_a, lam_a = _partner_and_lam(n, partner, lam_a, z_a.device)
    partner_b, lam_b = _partner_and_lam(n, partner, lam_b, z_a.device)
    anchors = F.normalize(torch.cat([zm_a, zm_b]).float(), dim=1)
    candidates = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)
    logits = anchors @ candidates.t() / tau  # rows m', m''; columns a, b
    c_a, c_b = _content(partner_a, lam_a), _content(partner_b, lam_b)
    zero = torch.zeros_like(c_a)
    target = torch.cat([torch.cat([zero, c_a], 1), torch.cat([c_b, zero], 1)])
    shares_pixels = torch.cat([torch.cat([c_a > 0, zero > 0], 1), torch.cat([zero > 0, c_b > 0], 1)])
    log_prob = torch.log_softmax(logits.masked_fill(shares_pixels, float("-inf")), dim=1)
    target = target / target.sum(1, keepdim=True)
    return -(target * log_prob.masked_fill(shares_pixels, 0.0)).sum(1).mean()


__all__ = ["byol_loss", "simsiam_loss", "moco_loss", "simclr_loss"]
