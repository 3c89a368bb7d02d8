import math

import pytest
import torch
import torch.nn.functional as F

from bsim_fast import losses, mix

R = 1 / math.sqrt(2)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _nt_xent(z_a, z_b, tau):
    """SimCLR's NT-Xent over 2N views, written directly from the paper."""
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    n2 = z.shape[0]
    sim = (z @ z.t() / tau).masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
    positive = torch.arange(n2).roll(n2 // 2)
    return F.cross_entropy(sim, positive)


def _moco_v2(q, k, queue, tau):
    """MoCo's loss: logits [l_pos, l_neg] / tau, cross entropy with the positive at index 0."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / tau
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


# ---------------------------------------------------------------- values by hand

P2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
Z2 = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # unnormalised on purpose: cos uses directions only
PARTNER = torch.tensor([1, 0])
LAM = torch.tensor([0.25, 0.5])


def test_byol_by_hand():
    # cos(p0, z0) = 1, cos(p1, z1) = R, cos(p0, z1) = R, cos(p1, z0) = 0
    assert losses.byol_loss(P2, Z2).item() == pytest.approx((0 + (2 - 2 * R)) / 2)
    bsim = (0.25 * 0 + 0.75 * (2 - 2 * R) + 0.5 * (2 - 2 * R) + 0.5 * 2) / 2
    assert losses.byol_loss(P2, Z2, PARTNER, LAM).item() == pytest.approx(bsim)


def test_simsiam_by_hand():
    assert losses.simsiam_loss(P2, Z2).item() == pytest.approx(0.5 * (-1 - R) / 2)
    bsim = 0.5 * ((0.25 * -1 + 0.75 * -R) + (0.5 * -R + 0.5 * 0)) / 2
    assert losses.simsiam_loss(P2, Z2, PARTNER, LAM).item() == pytest.approx(bsim)


def test_moco_by_hand():
    q = k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue = torch.tensor([[-1.0, 0.0]])
    lam = torch.tensor([0.75, 0.0])
    tau = 0.5
    row0 = 0.75 * (math.log(math.e**2 + math.e**-2) - 2) + 0.25 * math.log(1 + math.e**-2)
    row1 = math.log(2.0)  # lam = 0: only the partner key counts, q1 . k0 = 0 and q1 . queue = 0
    assert losses.moco_loss(q, k, queue, PARTNER, lam, tau).item() == pytest.approx((row0 + row1) / 2)
    sim = (math.log(math.e**2 + math.e**-2) - 2 + math.log(math.e**2 + 1) - 2) / 2
    assert losses.moco_loss(q, k, queue, tau=tau).item() == pytest.approx(sim)


def test_moco_normalises_the_queue_it_is_given():
    """Inputs need not be normalised, the queue included: a queue of length-3 keys gives the same loss."""
    q = k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    sim = (math.log(math.e**2 + math.e**-2) - 2 + math.log(math.e**2 + 1) - 2) / 2  # as above
    assert losses.moco_loss(q, k, torch.tensor([[-3.0, 0.0]]), tau=tau).item() == pytest.approx(sim)
    queue = _rand(7, 2, seed=9)
    assert torch.allclose(losses.moco_loss(q, 4 * k, 5 * queue, tau=tau), losses.moco_loss(q, k, queue, tau=tau))


def test_simclr_by_hand():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = losses.simclr_loss(e, e, e, e, PARTNER, torch.tensor([0.5, 1.0]), torch.ones(2), tau=1.0)
    # m'_0 (lam 0.5): half on b_0, half on b_1, both a_0 and a_1 leave the denominator
    row_m0 = math.log(math.e + 1) - 0.5
    # m'_1 (lam 1): target b_1, a_1 leaves; m''_0 and m''_1 likewise against the a views
    row_rest = math.log(math.e + 2) - 1
    assert got.item() == pytest.approx((row_m0 + 3 * row_rest) / 4)


# ---------------------------------------------------------------- SIM invariants on random tensors

N, D = 6, 5


@pytest.fixture
def views():
    return dict(
        p=_rand(N, D, seed=1),
        z=_rand(N, D, seed=2),
        q=_rand(N, D, seed=3),
        k=_rand(N, D, seed=4),
        queue=F.normalize(_rand(11, D, seed=5), dim=1),
        partner=mix.derangement(N, torch.Generator().manual_seed(6)),
    )


@pytest.mark.parametrize("loss", [losses.byol_loss, losses.simsiam_loss])
def test_pairwise_losses_lam_one_and_lam_zero_are_sim(views, loss):
    p, z, partner = views["p"], views["z"], views["partner"]
    sim = loss(p, z)
    assert torch.allclose(loss(p, z, partner, torch.ones(N)), sim, atol=1e-6)
    # lam = 0 and the mixed view is the partner's view: every prediction is again against its own target
    assert torch.allclose(loss(p[partner], z, partner, torch.zeros(N)), sim, atol=1e-6)


def test_byol_is_the_original(views):
    p, z = views["p"], views["z"]
    original = (2 - 2 * F.cosine_similarity(p, z)).mean()
    assert torch.allclose(losses.byol_loss(p, z), original, atol=1e-6)
    assert torch.allclose(losses.simsiam_loss(p, z), -0.5 * F.cosine_similarity(p, z).mean(), atol=1e-6)


def test_moco_is_the_original_and_lam_invariants(views):
    q, k, queue, partner = views["q"], views["k"], views["queue"], views["partner"]
    sim = losses.moco_loss(q, k, queue, tau=0.2)
    assert torch.allclose(sim, _moco_v2(q, k, queue, 0.2), atol=1e-5)
    assert torch.allclose(losses.moco_loss(q, k, queue, partner, torch.ones(N)), sim, atol=1e-6)
    assert torch.allclose(losses.moco_loss(q[partner], k, queue, partner, torch.zeros(N)), sim, atol=1e-5)


def test_simclr_is_nt_xent_and_lam_invariants(views):
    z_a, z_b, partner = views["p"], views["z"], views["partner"]
    reference = _nt_xent(z_a, z_b, 0.2)
    assert torch.allclose(losses.simclr_loss(z_a, z_b, z_a, z_b), reference, atol=1e-5)
    ones, zeros = torch.ones(N), torch.zeros(N)
    assert torch.allclose(losses.simclr_loss(z_a, z_b, z_a, z_b, partner, ones, ones), reference, atol=1e-5)
    assert torch.allclose(
        losses.simclr_loss(z_a[partner], z_b[partner], z_a, z_b, partner, zeros, zeros), reference, atol=1e-5
    )


def test_losses_are_linear_in_lam(views):
    """A mixed view's loss is the lam-weighted sum of its two SIM-style terms (per-sample, so use N = 1 rows)."""
    p, z, partner = views["p"], views["z"], views["partner"]
    lam = torch.rand(N, generator=torch.Generator().manual_seed(9))
    for loss in (losses.byol_loss, losses.simsiam_loss):
        own = torch.stack([loss(p[i : i + 1], z[i : i + 1]) for i in range(N)])
        other = torch.stack([loss(p[i : i + 1], z[partner[i] : partner[i] + 1]) for i in range(N)])
        assert torch.allclose(loss(p, z, partner, lam), (lam * own + (1 - lam) * other).mean(), atol=1e-6)


# ---------------------------------------------------------------- gradients and precision


def test_targets_and_keys_get_no_gradient(views):
    for loss, args in [(losses.byol_loss, ()), (losses.simsiam_loss, ()), (losses.moco_loss, ("queue",))]:
        p = views["p"].clone().requires_grad_()
        z = views["z"].clone().requires_grad_()
        queue = views["queue"].clone().requires_grad_()
        extra = [queue] if args else []
        loss(p, z, *extra, views["partner"], torch.full((N,), 0.3)).backward()
        assert p.grad is not None and p.grad.abs().sum() > 0
        assert z.grad is None and queue.grad is None


def test_simclr_gradient_reaches_every_view(views):
    zs = [views[k].clone().requires_grad_() for k in ("p", "z", "q", "k")]
    losses.simclr_loss(*zs, views["partner"], torch.full((N,), 0.4), torch.full((N,), 0.7)).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in zs)


def test_half_precision_inputs_give_float32_losses(views):
    p, z, k, queue = (views[n].to(torch.bfloat16) for n in ("p", "z", "k", "queue"))
    for value in (
        losses.byol_loss(p, z),
        losses.simsiam_loss(p, z),
        losses.moco_loss(p, k, queue),
        losses.simclr_loss(p, z, p, z),
    ):
        assert value.dtype == torch.float32 and torch.isfinite(value)


def test_finite_for_two_samples_and_extreme_lam():
    z = _rand(2, 3)
    partner = torch.tensor([1, 0])
    for lam in (torch.zeros(2), torch.ones(2), torch.tensor([0.0, 1.0])):
        assert torch.isfinite(losses.simclr_loss(z, z.flip(0), z, z.flip(0), partner, lam, lam))


def test_losses_stay_float32_under_autocast(views):
    p, z, k, queue, partner = views["p"], views["z"], views["k"], views["queue"], views["partner"]
    lam = torch.full((N,), 0.6)
    calls = [
        lambda: losses.byol_loss(p, z, partner, lam),
        lambda: losses.moco_loss(p, k, queue, partner, lam),
        lambda: losses.simclr_loss(p, z, k, queue[:N], partner, lam, lam),
    ]
    exact = [call() for call in calls]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = [call() for call in calls]
    for want, got in zip(exact, under_autocast):
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)
