"""The training step against a plain eager step written out here, two steps from the same state (CPU).

The reference is the step as it was before issue 23, in its plainest form: each view normalised into a tensor
of its own (`cutmix_normalize_reference`), the online views concatenated, the target / key network on the
concatenated plain views, the losses of `bsim_fast.losses` added by direction as docs/METHOD.md says, MoCo's
keys enqueued by hand, timm's own LARS (its tensor-by-tensor update) or torch's SGD, and the EMA as a lerp.
`step.TrainStep` instead writes the views into one batch that the networks read slices of, computes the loss
and the log record in one function (`Method.objective`), holds MoCo's enqueue until after the backward, and
steps LARS in multi-tensor operations. Same views, losses, gradients, buffers: bitwise. The parameters: bitwise
after the first step; after the second within float rounding for LARS (its momentum update is one fused
multiply-add, buf + r·d, where timm rounds r·d first), bitwise for SGD.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.optim import Lars

from bsim_fast import losses, mix
from bsim_fast.config import load_config
from bsim_fast.methods.base import ema_rate
from bsim_fast.optim import lr_at, param_groups, scaled_lr
from bsim_fast.step import TrainStep, step_generator

N, SIZE, STEPS_PER_EPOCH = 4, 16, 10
CASES = [("byol", m, {}) for m in ("sim", "bsim", "wbsim")] + [("simclr", m, {}) for m in ("sim", "bsim", "wbsim")]
CASES += [("moco", "wbsim", {"symmetric": False}), ("moco", "wbsim", {"symmetric": True}), ("moco", "sim", {})]


def config(name, mode, settings):
    overrides = ["model.arch=resnet18", "model.proj_hidden=32", "model.proj_dim=16", "model.pred_hidden=16"]
    overrides += ["model.queue_size=24", f"data.image_size={SIZE}", f"data.batch_size={N}", "train.compile=off"]
    overrides += [f"method.{k}={str(v).lower()}" for k, v in settings.items()]
    # the scheduled lr from the first step, and LARS's trust ratios unclipped, so that they move the weights
    overrides += ["optim.warmup_epochs=0", "optim.clip_lr=false"]
    return load_config(f"configs/small/{name}{'' if mode == 'sim' else '_' + mode}.yaml", overrides)


def reference_views(a_u8, b_u8, cfg, gen):
    """Each view a tensor of its own, as the step made them before; the draws as make_views draws them."""
    mean, std = cfg.data.mean, cfg.data.std
    if cfg.method.mode == "sim":
        return {"plain_a": mix.cutmix_normalize_reference(a_u8, None, None, mean, std, torch.float32)[0],
                "plain_b": mix.cutmix_normalize_reference(b_u8, None, None, mean, std, torch.float32)[0]}  # fmt: skip
    partner, boxes_a, lam_a, boxes_b, lam_b = mix.draw_mixing(N, SIZE, SIZE, cfg.bsim.alpha, gen)
    plain_a, mixed_a = mix.cutmix_normalize_reference(a_u8, partner, boxes_a, mean, std, torch.float32)
    plain_b, mixed_b = mix.cutmix_normalize_reference(b_u8, partner, boxes_b, mean, std, torch.float32)
    return dict(plain_a=plain_a, plain_b=plain_b, mixed_a=mixed_a, mixed_b=mixed_b, partner=partner, lam_a=lam_a,
                lam_b=lam_b)  # fmt: skip


def online_views(v, mode, both_plain=True):
    plain = [v["plain_a"], v["plain_b"]] if both_plain else [v["plain_a"]]
    return (plain if mode != "bsim" else []) + ([v["mixed_a"], v["mixed_b"]] if mode != "sim" else [])


def simclr_loss(method, mode, v):
    """(SIM, BSIM) of SimCLR: NT-Xent of the plain views; the mixed views as anchors against them."""
    views = [v["plain_a"], v["plain_b"]] + ([v["mixed_a"], v["mixed_b"]] if mode != "sim" else [])
    z = method.projector(method.backbone(torch.cat(views))).chunk(len(views))
    tau = method.settings.temperature
    sim = None if mode == "bsim" else losses.simclr_loss(z[0], z[1], z[0], z[1], tau=tau)
    if mode == "sim":
        return sim, None
    return sim, losses.simclr_loss(z[2], z[3], z[0], z[1], v["partner"], v["lam_a"], v["lam_b"], tau=tau)


def reference_loss(method, cfg, v):
    """(SIM loss or None, BSIM loss or None, MoCo's keys to enqueue) of docs/METHOD.md, direction by direction."""
    mode, name = cfg.method.mode, cfg.method.name
    if name == "simclr":
        return (*simclr_loss(method, mode, v), None)
    symmetric = name == "byol" or method.settings.symmetric  # the SIM part's directions
    online = online_views(v, mode, both_plain=symmetric)
    keys = None
    if name == "byol":
        q = method.predictor(method.projector(method.backbone(torch.cat(online)))).chunk(len(online))
        with torch.no_grad():
            t_a, t_b = method.target(torch.cat([v["plain_a"], v["plain_b"]])).chunk(2)

        def pair(out, target, partner=None, lam=None):
            return losses.byol_loss(out, target, partner, lam)

    else:  # MoCo: the keys, normalised; the queue as it was before this step
        q = method.head(method.backbone(torch.cat(online))).chunk(len(online))
        with torch.no_grad():
            if symmetric:
                t_a, t_b = F.normalize(method.key_encoder(torch.cat([v["plain_a"], v["plain_b"]])), dim=1).chunk(2)
            else:  # a forward of its own for each view, as MoCo v2's keys of b
                t_b = F.normalize(method.key_encoder(v["plain_b"]), dim=1)
                t_a = None if mode == "sim" else F.normalize(method.key_encoder(v["plain_a"]), dim=1)
        queue = method.queue.clone()
        keys = torch.cat([t_a, t_b]) if symmetric else t_b

        def pair(out, target, partner=None, lam=None):
            return losses.moco_loss(out, target, queue, partner, lam, method.settings.temperature)

    k = 0 if mode == "bsim" else (2 if symmetric else 1)  # online: a (and b), then m', m''
    sim = [pair(q[0], t_b), pair(q[1], t_a)] if k == 2 else [pair(q[0], t_b)] if k == 1 else []
    bsim = []
    if mode != "sim":  # m' against the targets of b, m'' against those of a
        bsim = [pair(q[k], t_b, v["partner"], v["lam_a"]), pair(q[k + 1], t_a, v["partner"], v["lam_b"])]
    join = sum if name == "byol" else (lambda terms: sum(terms) / len(terms))  # BYOL adds, MoCo averages
    return (join(sim) if sim else None), (join(bsim) if bsim else None), keys


def reference_step(method, optimizer, cfg, a_u8, b_u8, index, total):
    v = reference_views(a_u8, b_u8, cfg, step_generator(cfg.train.seed, index, 0))
    sim, bsim, keys = reference_loss(method, cfg, v)
    loss = sim if bsim is None else bsim if sim is None else sim + cfg.bsim.weight * bsim
    loss.backward()
    if keys is not None:  # MoCo's enqueue, wrapping around
        size = method.queue.shape[0]
        ptr = int(method.queue_ptr)
        with torch.no_grad():
            method.queue[(ptr + torch.arange(len(keys))) % size] = keys
            method.queue_ptr.fill_((ptr + len(keys)) % size)
    lr = lr_at(index, total, int(cfg.optim.warmup_epochs * STEPS_PER_EPOCH), scaled_lr(cfg), cfg.optim.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    s = method.settings
    if cfg.method.name != "simclr":  # target <- rate target + (1 - rate) online
        target = method.target if cfg.method.name == "byol" else method.key_encoder
        online = [method.backbone, method.projector if cfg.method.name == "byol" else method.head]
        rate = ema_rate(s.tau_base, s.tau_final, (index + 1) / total)
        with torch.no_grad():
            for t, o in zip(target.parameters(), [p for m in online for p in m.parameters()], strict=True):
                t.lerp_(o, 1 - rate)
    return loss.detach(), v.get("lam_a", torch.ones(1)).mean()


@pytest.mark.parametrize("name,mode,settings", CASES, ids=[f"{n}-{m}-{s}" for n, m, s in CASES])
def test_step_equals_the_plain_eager_step(name, mode, settings):
    torch.manual_seed(0)
    cfg = config(name, mode, settings)
    step = TrainStep(cfg, "cpu", STEPS_PER_EPOCH, log=None)
    ref = copy.deepcopy(step.method)
    ref.hold_updates = False
    groups = param_groups(ref, cfg)
    if cfg.optim.name == "lars":
        o = cfg.optim
        optimizer = Lars(groups, lr=1.0, momentum=o.momentum, trust_coeff=o.trust_coefficient, trust_clip=o.clip_lr)
        for group in optimizer.param_groups:
            group["foreach"] = False  # timm's update tensor by tensor (newer timm has a foreach form too)
    else:
        optimizer = torch.optim.SGD(groups, lr=1.0, momentum=cfg.optim.momentum)
    g = torch.Generator().manual_seed(1)
    for index in range(2):
        a_u8, b_u8 = (torch.randint(0, 256, (N, SIZE, SIZE, 3), dtype=torch.uint8, generator=g) for _ in range(2))
        assert step(a_u8, b_u8)
        loss, lam = reference_step(ref, optimizer, cfg, a_u8, b_u8, index, step.total_steps)
        assert torch.equal(step.sums, torch.stack([loss, lam, torch.zeros(()), torch.ones(())]))  # the loss: bitwise
        step.sums.zero_()
        fused = cfg.optim.name == "lars" and index > 0
        for (key, got), want in zip(step.method.state_dict().items(), ref.state_dict().values(), strict=True):
            if fused and got.is_floating_point():
                torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-8, msg=key)
            else:
                assert torch.equal(got, want), (index, key)
        ours, theirs = step.optimizer.state_dict()["state"], optimizer.state_dict()["state"]
        for i in theirs:
            buf, want = ours[i]["momentum_buffer"], theirs[i]["momentum_buffer"]
            assert torch.equal(buf, want) if not fused else torch.allclose(buf, want, rtol=2e-6, atol=1e-8), (index, i)
