"""LARS against solo-learn's update rule written out by hand, the parameter groups, and the lr schedule."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from bsim_fast.config import load_config
from bsim_fast.optim import build_optimizer, lr_at, param_groups, set_lr


def lars_reference(w, g, lr, wd, eta, clip, eps=1e-8):
    """solo-learn's LARS (solo/utils/lars.py) for one adapted tensor on its first step (the momentum buffer
    starts as the update): ratio = eta |w| / (|g| + wd |w| + eps), with clip_lr ratio = min(ratio / lr, 1);
    w <- w - lr * ratio * (g + wd w)."""
    w_norm, g_norm = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in g))
    ratio = eta * w_norm / (g_norm + wd * w_norm + eps)
    if clip:
        ratio = min(ratio / lr, 1.0)
    return [wi - lr * ratio * (gi + wd * wi) for wi, gi in zip(w, g)]


def one_lars_step(lr, clip, exclude=True, wd=0.1, eta=0.02):
    cfg = load_config(
        None,
        [
            "optim.name=lars",
            f"optim.lr={lr}",
            "data.batch_size=256",
            f"optim.weight_decay={wd}",
            f"optim.trust_coefficient={eta}",
            f"optim.clip_lr={str(clip).lower()}",
            f"optim.exclude_bias_norm={str(exclude).lower()}",
        ],
    )
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]]))  # |w| = 5
        layer.bias.fill_(2.0)
    layer.weight.grad = torch.tensor([[0.6, 0.8]])  # |g| = 1
    layer.bias.grad = torch.tensor([0.5])
    optimizer = build_optimizer(layer, cfg, torch.device("cpu"))
    optimizer.step()
    return layer.weight.detach().flatten().tolist(), layer.bias.item()


@pytest.mark.parametrize("lr,clip", [(0.5, False), (0.5, True), (0.05, True)])
def test_one_lars_step_moves_the_weight_as_solo_learn(lr, clip):
    weight, bias = one_lars_step(lr, clip)
    assert weight == pytest.approx(lars_reference([3.0, 4.0], [0.6, 0.8], lr, 0.1, 0.02, clip), rel=1e-6)
    assert bias == pytest.approx(2.0 - lr * 0.5)  # excluded: neither weight decay nor adaptation


def test_lars_by_hand_numbers():
    # ratio = 0.02 * 5 / (1 + 0.1 * 5) = 1/15; g + wd w = (0.9, 1.2)
    assert one_lars_step(0.5, False)[0] == pytest.approx([3 - 0.5 * 0.9 / 15, 4 - 0.5 * 1.2 / 15])
    # clipped: min((1/15) / 0.5, 1) = 2/15, against the scheduled lr
    assert one_lars_step(0.5, True)[0] == pytest.approx([3 - 0.5 * 0.9 * 2 / 15, 4 - 0.5 * 1.2 * 2 / 15])
    # a small lr: the clip caps the ratio at 1, a plain SGD step with weight decay
    assert one_lars_step(0.05, True)[0] == pytest.approx([3 - 0.05 * 0.9, 4 - 0.05 * 1.2])


def test_lars_without_exclusion_adapts_the_bias_too():
    _, bias = one_lars_step(0.5, False, exclude=False)
    ratio = 0.02 * 2.0 / (0.5 + 0.1 * 2.0 + 1e-8)
    assert bias == pytest.approx(2.0 - 0.5 * ratio * (0.5 + 0.1 * 2.0))


@pytest.mark.parametrize(
    "recipe,decays_norms",
    [
        ("configs/moco.yaml", True),
        ("configs/simsiam.yaml", True),
        ("configs/small/moco.yaml", True),
        ("configs/byol.yaml", False),
        ("configs/small/simclr.yaml", False),
    ],
)
def test_weight_decay_reaches_biases_and_norms_only_where_the_anchor_does(recipe, decays_norms):
    """MoCo v2's and SimSiam's code (and solo-learn's SGD recipes) decay every parameter; BYOL and SimCLR
    exclude biases and norm weights from weight decay and LARS adaptation."""
    cfg = load_config(recipe)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = param_groups(net, cfg)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(net[0].weight)] == cfg.optim.weight_decay > 0
    assert (decay_of[id(net[1].weight)] > 0) == (decay_of[id(net[0].bias)] > 0) == decays_norms


def test_fixed_predictor_lr_keeps_the_base_lr():
    cfg = load_config("configs/small/simsiam.yaml")
    net = nn.ModuleDict({"backbone": nn.Linear(2, 2), "predictor": nn.Linear(2, 2)})
    optimizer = build_optimizer(net, cfg, torch.device("cpu"))
    set_lr(optimizer, 0.01, 0.5)
    by_param = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert by_param[id(net["predictor"].weight)] == 0.5 and by_param[id(net["backbone"].weight)] == 0.01


def test_lr_schedule_warmup_then_cosine_to_min_ratio():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.2) == pytest.approx(0.2)


def lars_pair(clip, exclude, layers=2):
    """Two identical nets, one stepped by build_optimizer's LARS, one by timm's own LARS, tensor by tensor."""
    from timm.optim import Lars

    cfg = load_config(
        None,
        [
            "optim.name=lars",
            "optim.lr=1.2",
            "optim.weight_decay=0.01",
            "optim.trust_coefficient=0.02",
            f"optim.clip_lr={str(clip).lower()}",
            f"optim.exclude_bias_norm={str(exclude).lower()}",
        ],
    )
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU())])
    twin = copy.deepcopy(net)
    ours = build_optimizer(net, cfg, torch.device("cpu"))
    o = cfg.optim
    timms = Lars(
        param_groups(twin, cfg), lr=o.lr, momentum=o.momentum, trust_coeff=o.trust_coefficient, trust_clip=clip
    )
    for group in timms.param_groups:
        group["foreach"] = False
    return net, twin, ours, timms


@pytest.mark.parametrize("clip,exclude", [(True, True), (False, False)])
def test_lars_steps_as_timms_lars(clip, exclude):
    """Four steps of LARS (multi-tensor operations) against timm's own, tensor-by-tensor LARS from the same start:
    the first step bitwise (momentum buffers start as r d), the later ones within float rounding (buf + r d is one
    fused multiply-add here, where timm rounds r d first)."""
    net, twin, ours, timms = lars_pair(clip, exclude)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(8, 6, generator=g)
        for model, optimizer in ((net, ours), (twin, timms)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q) if step == 0 else torch.allclose(p, q, rtol=1e-6, atol=1e-7), step
    assert ours.state_dict()["state"].keys() == timms.state_dict()["state"].keys()  # a checkpoint of either loads


def test_lars_step_launches_do_not_grow_with_the_number_of_tensors():
    """One operation per group or per bucket, not per tensor: 2 and 6 layers launch the same operations."""
    from bsim_fast.tools.counting import count_launches

    names = []
    for layers in (2, 6):
        net, _, optimizer, _ = lars_pair(True, True, layers)
        for _ in range(2):  # the second step: momentum buffers exist
            optimizer.zero_grad()
            net(torch.randn(8, 6)).square().mean().backward()
            names.append(count_launches(optimizer.step)["aten"])
    assert names[1] == names[3] and len(names[1]) <= 20, names
