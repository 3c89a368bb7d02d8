import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bsim_fast import mix
from bsim_fast.config import Config
from bsim_fast.methods import METHODS, build_method
from bsim_fast.methods.byol import BYOL
from bsim_fast.methods.moco import MoCo
from bsim_fast.models import build_backbone, mlp

N, SIZE = 4, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions only lose to thread start-up and contention on a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_cfg(name, mode="bsim", **keys):
    """A tiny network; `keys` set model shapes or the method's own settings, by name."""
    cfg = Config()
    cfg.method.name, cfg.method.mode = name, mode
    m = cfg.model
    m.arch, m.cifar_stem = "resnet18", True
    m.proj_hidden, m.proj_dim, m.pred_hidden, m.queue_size = 16, 8, 16, 10
    for key, value in keys.items():
        setattr(m if hasattr(m, key) else cfg.method.settings, key, value)
    return cfg


def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    a_u8 = torch.randint(0, 256, (N, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)
    b_u8 = torch.randint(0, 256, (N, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)
    partner = mix.derangement(N, generator=g)
    boxes_a, lam_a = mix.sample_boxes(N, SIZE, SIZE, 1.0, generator=g)
    boxes_b, lam_b = mix.sample_boxes(N, SIZE, SIZE, 1.0, generator=g)
    cfg = Config()
    plain_a, mixed_a = mix.cutmix_normalize(a_u8, partner, boxes_a, cfg.data.mean, cfg.data.std, torch.float32)
    plain_b, mixed_b = mix.cutmix_normalize(b_u8, partner, boxes_b, cfg.data.mean, cfg.data.std, torch.float32)
    return dict(
        plain_a=plain_a, plain_b=plain_b, mixed_a=mixed_a, mixed_b=mixed_b, partner=partner, lam_a=lam_a, lam_b=lam_b
    )


# ---------------------------------------------------------------- models


def test_cifar_backbone_and_heads():
    net, feat_dim = build_backbone("resnet18", cifar_stem=True)
    assert feat_dim == 512 and isinstance(net.fc, nn.Identity) and isinstance(net.maxpool, nn.Identity)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 512)
    head = mlp(512, 16, 8, num_layers=3, last_bn=True, last_bn_affine=False)
    kinds = [type(layer).__name__ for layer in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert not head[-1].affine and head[0].bias is None
    assert [type(layer).__name__ for layer in mlp(4, 8, 2, hidden_bn=False)] == ["Linear", "ReLU", "Linear"]
    with pytest.raises(ValueError, match="vgg11"):
        build_backbone("vgg11", cifar_stem=False)


# ---------------------------------------------------------------- every method x mode


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_and_mode_trains(name):
    batch = tiny_batch()
    torch.manual_seed(0)
    method = build_method(tiny_cfg(name))
    for mode in ("sim", "bsim", "wbsim"):
        method.mode = mode  # routing reads the mode at every call
        method.zero_grad(set_to_none=True)
        out = method(**batch)
        assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
        assert ("loss_sim" in out) == (mode != "bsim") and ("loss_bsim" in out) == (mode != "sim")
        if mode == "wbsim":
            assert torch.allclose(out["loss"], out["loss_sim"] + out["loss_bsim"])
        out["loss"].backward()
        grads = [p.grad for p in method.backbone.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        for p in method.parameters():  # frozen (target / key) networks get nothing
            assert p.requires_grad or p.grad is None
        method.momentum_update(0.5)


def test_bsim_needs_mixed_views():
    with pytest.raises(ValueError, match="needs mixed_a"):
        build_method(tiny_cfg("byol", "bsim"))(tiny_batch()["plain_a"], tiny_batch()["plain_b"])


def test_unknown_method_is_an_error():
    cfg = tiny_cfg("byol")
    cfg.method.name = "swav"
    with pytest.raises(ValueError, match="method.name"):
        build_method(cfg)


CASES = [(name, {}) for name in sorted(METHODS)] + [("moco", {"symmetric": True})]


@pytest.mark.parametrize("name,settings", CASES)
def test_bsim_with_lam_one_equals_sim_on_plain_views(name, settings):
    """Feeding the plain views as 'mixed' with lam = 1 must reproduce the SIM loss (eval-mode BN)."""
    batch = tiny_batch()
    torch.manual_seed(0)
    method = build_method(tiny_cfg(name, "sim", **settings)).eval()
    ones = torch.ones(N)
    expected = method(batch["plain_a"], batch["plain_b"])["loss"]
    if not method.symmetric:  # MoCo v2's SIM has one direction, its BSIM both: each reduces to SIM's
        expected = (expected + method(batch["plain_b"], batch["plain_a"])["loss"]) / 2
    method.mode = "bsim"
    got = method(batch["plain_a"], batch["plain_b"], batch["plain_a"], batch["plain_b"], batch["partner"], ones, ones)
    assert torch.allclose(got["loss"], expected, atol=1e-5)


def test_state_dict_covers_target_queue_and_pointer():
    assert any(k.startswith("target.") for k in build_method(tiny_cfg("byol")).state_dict())
    keys = build_method(tiny_cfg("moco")).state_dict()
    assert {"queue", "queue_ptr"} <= set(keys) and any(k.startswith("key_encoder.") for k in keys)


# ---------------------------------------------------------------- BYOL target network


def test_byol_tau_schedule():
    byol = build_method(tiny_cfg("byol", tau_base=0.99))
    assert byol.ema_tau(0.0) == pytest.approx(0.99)
    assert byol.ema_tau(0.5) == pytest.approx(0.995)
    assert byol.ema_tau(1.0) == pytest.approx(1.0)


def test_byol_ema_arithmetic():
    torch.manual_seed(0)
    byol: BYOL = build_method(tiny_cfg("byol", tau_base=0.9))
    online = list(byol.backbone.parameters()) + list(byol.projector.parameters())
    assert len(list(byol.target.parameters())) == len(online)  # every online tensor has its target twin
    assert all(torch.equal(t, o) for t, o in zip(byol.target.parameters(), online, strict=True))
    assert not any(t.requires_grad for t in byol.target.parameters())
    with torch.no_grad():
        for o in online:
            o.add_(torch.randn_like(o))
    before = [t.clone() for t in byol.target.parameters()]
    byol.momentum_update(0.0)
    for t, b, o in zip(byol.target.parameters(), before, online, strict=True):
        assert torch.allclose(t, 0.9 * b + 0.1 * o, atol=1e-6)
    after = [t.clone() for t in byol.target.parameters()]
    byol.momentum_update(1.0)  # tau = 1 at the end of the run: the target stays put
    assert all(torch.equal(t, a) for t, a in zip(byol.target.parameters(), after, strict=True))


# ---------------------------------------------------------------- MoCo queue


def test_moco_enqueue_pointer_and_wrap_around():
    moco: MoCo = build_method(tiny_cfg("moco", queue_size=5, proj_dim=2))
    keys = torch.arange(8, dtype=torch.float32).repeat_interleave(2).view(8, 2)  # row i = (i, i)
    moco.enqueue(keys[:4])
    assert moco.queue_ptr.item() == 4 and torch.equal(moco.queue[:4], keys[:4])
    moco.enqueue(keys[4:8])  # slots 4, 0, 1, 2
    assert moco.queue_ptr.item() == 3
    assert torch.equal(moco.queue, keys[[5, 6, 7, 3, 4]])
    moco.enqueue(torch.cat([keys, keys[:1]]))  # more keys than slots: the newest 5 are kept
    assert moco.queue_ptr.item() == 3  # a whole lap: the pointer comes back to where it was
    assert sorted(moco.queue[:, 0].tolist()) == [0.0, 4.0, 5.0, 6.0, 7.0]


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_forward_enqueues_only_plain_keys(symmetric):
    """MoCo v2 (one direction) enqueues the N keys of view b; the symmetric form the 2N keys of a and b."""
    batch = tiny_batch()
    torch.manual_seed(0)
    moco: MoCo = build_method(tiny_cfg("moco", "wbsim", queue_size=2 * N + 3, symmetric=symmetric))
    start = moco.queue.clone()
    moco(**batch)["loss"].backward()
    plain = [batch["plain_a"], batch["plain_b"]] if symmetric else [batch["plain_b"]]
    with torch.no_grad():
        expected = F.normalize(moco.key_encoder(torch.cat(plain)), dim=1)
    n_keys = len(plain) * N
    assert moco.queue_ptr.item() == n_keys
    assert torch.allclose(moco.queue[:n_keys], expected, atol=1e-5)
    assert torch.equal(moco.queue[n_keys:], start[n_keys:])
    moco.eval()
    moco(**batch)  # evaluation leaves the queue alone
    assert moco.queue_ptr.item() == n_keys


def _info_nce(q, positive, queue, tau):
    """MoCo's InfoNCE of one query (MoCo v2 eq. 1 with the BSIM paper's eq. 3 per positive), unit vectors:
    -log(e^{q.k+/tau} / (e^{q.k+/tau} + sum over the queue of e^{q.n/tau}))."""
    pos = torch.exp(q @ positive / tau)
    return -torch.log(pos / (pos + torch.exp(queue @ q / tau).sum()))


def _moco_direction(queries, keys, queue, tau, partner=None, lam=None):
    """mean_i [lam_i nce(q_i, k_i) + (1 - lam_i) nce(q_i, k_partner[i])], written out per sample."""
    n = len(queries)
    partner = range(n) if partner is None else partner.tolist()
    lam = [1.0] * n if lam is None else lam.tolist()
    terms = [
        lam[i] * _info_nce(queries[i], keys[i], queue, tau)
        + (1 - lam[i]) * _info_nce(queries[i], keys[partner[i]], queue, tau)
        for i in range(n)
    ]
    return sum(terms) / n


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_wbsim_equals_both_directions_by_hand(symmetric):
    """SPEC §2: the BSIM part is m' against the keys of b and m'' against the keys of a, with lam per sample
    and per direction, their mean; the SIM part is MoCo v2's one direction (query a, keys of b) or MoCo v2+'s
    mean of both; WBSIM = SIM + w BSIM. Computed here per sample from the equations, in float64."""
    batch = tiny_batch()
    torch.manual_seed(0)
    moco: MoCo = build_method(tiny_cfg("moco", "wbsim", queue_size=16, symmetric=symmetric)).eval()
    moco.weight = 0.7  # bsim.weight: w != 1 shows that it is applied
    queue = F.normalize(moco.queue.clone().double(), dim=1)
    out = moco(**batch)
    tau, p = moco.settings.temperature, batch["partner"]
    with torch.no_grad():
        views = ("plain_a", "plain_b", "mixed_a", "mixed_b")
        q = {k: F.normalize(moco.head(moco.backbone(batch[k])).double(), dim=1) for k in views}
        key_a, key_b = (F.normalize(moco.key_encoder(batch[k]).double(), dim=1) for k in ("plain_a", "plain_b"))
    sim_ab = _moco_direction(q["plain_a"], key_b, queue, tau)
    sim = (sim_ab + _moco_direction(q["plain_b"], key_a, queue, tau)) / 2 if symmetric else sim_ab
    bsim = (
        _moco_direction(q["mixed_a"], key_b, queue, tau, p, batch["lam_a"])
        + _moco_direction(q["mixed_b"], key_a, queue, tau, p, batch["lam_b"])
    ) / 2
    assert out["loss_sim"].item() == pytest.approx(sim.item(), rel=1e-5)
    assert out["loss_bsim"].item() == pytest.approx(bsim.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((sim + 0.7 * bsim).item(), rel=1e-5)
    moco.mode = "bsim"  # BSIM alone: the same two directions
    assert moco(**batch)["loss"].item() == pytest.approx(bsim.item(), rel=1e-5)


def test_simsiam_targets_are_stop_gradient():
    """The method's backbone gradient equals a hand-written SimSiam with explicit detach on the targets."""
    batch = tiny_batch()
    torch.manual_seed(0)
    simsiam = build_method(tiny_cfg("simsiam", "sim")).eval()
    simsiam(batch["plain_a"], batch["plain_b"])["loss"].backward()
    got = simsiam.backbone.conv1.weight.grad.clone()
    simsiam.zero_grad(set_to_none=True)
    z = simsiam.projector(simsiam.backbone(torch.cat([batch["plain_a"], batch["plain_b"]])))
    p = simsiam.predictor(z)
    (z_a, z_b), (p_a, p_b) = z.chunk(2), p.chunk(2)
    manual = -0.5 * (F.cosine_similarity(p_a, z_b.detach()).mean() + F.cosine_similarity(p_b, z_a.detach()).mean())
    manual.backward()
    assert torch.allclose(got, simsiam.backbone.conv1.weight.grad, atol=1e-6)


# ---------------------------------------------------------------- the registry


def test_a_new_method_registers_itself_and_its_settings():
    """What a fifth method needs from the rest of the package: a class with `@register` and its `Settings`;
    the config then accepts its name and checks its settings with the rules written beside them."""
    from dataclasses import dataclass

    from bsim_fast.config import ConfigError, load_config, setting
    from bsim_fast.methods import Method, register

    @dataclass
    class ToySettings:
        scale: float = setting(1.0, gt=0)

    @register("toy")
    class Toy(Method):
        Settings = ToySettings

    try:
        cfg = load_config(None, ["method.name=toy", "method.mode=bsim"])
        assert cfg.method.name == "toy" and cfg.method.settings == ToySettings(1.0)
        assert load_config(None, ["method.name=toy", "method.scale=2.5"]).method.settings.scale == 2.5
        with pytest.raises(ConfigError, match="method.scale must be > 0"):
            load_config(None, ["method.name=toy", "method.scale=0"])
        assert isinstance(build_method(load_config(None, ["method.name=toy", "model.arch=resnet18"])), Toy)
        with pytest.raises(ValueError, match="registered twice"):
            register("toy")(Toy)
    finally:
        del METHODS["toy"]
