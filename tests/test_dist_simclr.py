"""Two gloo processes must reproduce the single-process loss and gradients on the concatenated batch."""

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bsim_fast import losses, mix
from bsim_fast.config import Config
from bsim_fast.dist import concat_all_gather, gather_with_grad, rank, world
from bsim_fast.methods import build_method

WORLD, N, SIZE, D_IN = 2, 3, 8, 5


def tiny_cfg(name, mode):
    cfg = Config()
    cfg.method.name, cfg.method.mode = name, mode
    cfg.model.arch, cfg.model.cifar_stem = "resnet18", True
    cfg.model.proj_hidden, cfg.model.proj_dim, cfg.model.queue_size = 16, 8, 4 * N + 2
    return cfg


def make_data():
    g = torch.Generator().manual_seed(0)
    total = WORLD * N
    return dict(
        vectors=[torch.randn(total, D_IN, generator=g) for _ in range(4)],  # a, b, m', m''
        images=[torch.randn(total, 3, SIZE, SIZE, generator=g) for _ in range(4)],
        partners=[mix.derangement(N, generator=g) for _ in range(WORLD)],  # each rank mixes locally
        lam_a=torch.rand(total, generator=g),
        lam_b=torch.rand(total, generator=g),
    )


def global_partner(data):
    return torch.cat([p + r * N for r, p in enumerate(data["partners"])])


def _worker(rank_, init_file, out_dir, data):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank_, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        assert rank() == rank_ and world() == WORLD
        mine = slice(rank_ * N, (rank_ + 1) * N)
        partner, lam_a, lam_b = data["partners"][rank_], data["lam_a"][mine], data["lam_b"][mine]
        result = {}

        # 1. gather with gradient under DDP, on a linear encoder (no batch statistics involved)
        torch.manual_seed(0)
        net = nn.Linear(D_IN, 4)
        ddp = DistributedDataParallel(net)  # kept alive: its hooks average the gradients in backward
        z = ddp(torch.cat([v[mine] for v in data["vectors"]]))
        z_a, z_b, zm_a, zm_b = gather_with_grad(z).unflatten(0, (WORLD, 4, N)).transpose(0, 1).flatten(1, 2)
        everyone = concat_all_gather(partner) + torch.arange(WORLD).repeat_interleave(N) * N
        loss = losses.simclr_loss(zm_a, zm_b, z_a, z_b, everyone, concat_all_gather(lam_a), concat_all_gather(lam_b))
        loss.backward()
        result["linear"] = (loss.detach(), net.weight.grad.clone(), net.bias.grad.clone())

        # 2. the SimCLR method itself (eval-mode BN is per sample, so sharding cannot change it)
        torch.manual_seed(0)
        simclr = build_method(tiny_cfg("simclr", "wbsim")).eval()
        a, b, ma, mb = (x[mine] for x in data["images"])
        out = simclr(a, b, ma, mb, partner, lam_a, lam_b)
        out["loss"].backward()
        grad = simclr.projector[0].weight.grad.clone()
        dist.all_reduce(grad)  # what DDP does to parameter gradients: the mean over ranks
        result["simclr"] = (out["loss"].detach(), grad / WORLD)

        # 3. MoCo: keys of both ranks enter the queue, in rank order, identically on every rank
        torch.manual_seed(0)
        cfg = tiny_cfg("moco", "bsim")
        cfg.method.settings.symmetric = True  # keys of a and b (one direction: test_methods.py)
        cfg.method.settings.shuffle_bn = False  # local keys, recomputed below (ShuffleBN: test_shuffle_bn.py)
        moco = build_method(cfg)
        moco(a, b, ma, mb, partner, lam_a, lam_b)
        with torch.no_grad():
            keys = F.normalize(moco.key_encoder(torch.cat([a, b])), dim=1)
        result["moco"] = (moco.queue.clone(), moco.queue_ptr.clone(), keys)
        torch.save(result, f"{out_dir}/rank{rank_}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_simclr_and_moco_match_single_process(tmp_path):
    data = make_data()
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), data), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    partner = global_partner(data)
    torch.set_num_threads(1)

    torch.manual_seed(0)
    net = nn.Linear(D_IN, 4)
    z_a, z_b, zm_a, zm_b = (net(v) for v in data["vectors"])
    loss = losses.simclr_loss(zm_a, zm_b, z_a, z_b, partner, data["lam_a"], data["lam_b"])
    loss.backward()
    for r in ranks:
        got_loss, got_w, got_b = r["linear"]
        assert torch.allclose(got_loss, loss.detach(), atol=1e-6)
        assert torch.allclose(got_w, net.weight.grad, atol=1e-6)
        assert torch.allclose(got_b, net.bias.grad, atol=1e-6)

    torch.manual_seed(0)
    simclr = build_method(tiny_cfg("simclr", "wbsim")).eval()
    out = simclr(*data["images"], partner, data["lam_a"], data["lam_b"])
    out["loss"].backward()
    for r in ranks:
        got_loss, got_grad = r["simclr"]
        assert torch.allclose(got_loss, out["loss"].detach(), atol=1e-5)
        assert torch.allclose(got_grad, simclr.projector[0].weight.grad, atol=1e-5, rtol=1e-4)

    (queue0, ptr0, keys0), (queue1, ptr1, keys1) = ranks[0]["moco"], ranks[1]["moco"]
    assert torch.equal(queue0, queue1) and ptr0.item() == ptr1.item() == 4 * N
    assert torch.allclose(queue0[: 4 * N], torch.cat([keys0, keys1]), atol=1e-5)
