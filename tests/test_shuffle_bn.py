"""MoCo v2's ShuffleBN: the key encoder's batch statistics come from a random slice of the global batch."""

import copy
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from bsim_fast.config import Config
from bsim_fast.methods import build_method

WORLD, N, SIZE = 2, 3, 8
RANK_SEED = 100  # rank r seeds its default RNG with RANK_SEED + r right before the keys


def tiny_cfg(shuffle_bn, mode="bsim"):
    cfg = Config()
    cfg.method.name, cfg.method.mode = "moco", mode
    m = cfg.model
    m.arch, m.cifar_stem = "resnet18", True
    m.proj_hidden, m.proj_dim, m.queue_size = 16, 8, 4 * N * WORLD
    cfg.method.settings.shuffle_bn = shuffle_bn
    cfg.method.settings.symmetric = True  # keys of a and b in one shuffled batch
    return cfg


def fresh_moco(shuffle_bn, mode="bsim"):
    torch.manual_seed(0)  # same weights in every process
    return build_method(tiny_cfg(shuffle_bn, mode))  # train mode: BN normalises with batch statistics


def make_views():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(WORLD * N, 3, SIZE, SIZE, generator=g) for _ in range(2)]  # a, b of all ranks


def _worker(rank_, init_file, out_dir, views):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank_, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        a, b = (v[rank_ * N : (rank_ + 1) * N] for v in views)
        result = {}
        for shuffle_bn in (True, False):
            moco = fresh_moco(shuffle_bn)
            # different seeds per rank: only rank 0's permutation may be used, on both ranks
            torch.manual_seed(RANK_SEED + rank_)
            k_a, k_b = moco.targets(torch.cat([a, b, a, b]), None)  # the step's batch a, b, m', m'' (m' = a here)
            result[shuffle_bn] = (k_a, k_b, moco.key_encoder[0].bn1.running_mean.clone())
        # under SyncBN the statistics are global already: no shuffle (and no collective) is wanted
        moco = fresh_moco(True)
        result["shuffles"] = moco._shuffles()
        result["shuffles_sync_bn"] = nn.SyncBatchNorm.convert_sync_batchnorm(moco)._shuffles()
        result["shuffles_eval"] = fresh_moco(True).eval()._shuffles()
        torch.save(result, f"{out_dir}/rank{rank_}.pt")
    finally:
        dist.destroy_process_group()


def encode_slices(encoder, batches):
    """Keys (unnormalised) and first-BN running means of a fresh copy of `encoder` per batch."""
    keys, means = [], []
    for x in batches:
        e = copy.deepcopy(encoder)
        with torch.no_grad():
            keys.append(e(x))
        means.append(e[0].bn1.running_mean)
    return keys, means


def test_shuffle_bn_two_processes_match_per_slice_reference(tmp_path):
    views = make_views()
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), views), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    torch.set_num_threads(1)
    encoder = fresh_moco(True).key_encoder
    # each rank's key batch is cat(a, b); all_gather lays the ranks out in rank order
    local = [torch.cat([v[r * N : (r + 1) * N] for v in views]) for r in range(WORLD)]
    x_all = torch.cat(local)
    torch.manual_seed(RANK_SEED)  # rank 0's seed: the one permutation every rank must use
    perm = torch.randperm(x_all.shape[0])
    assert sorted(perm[: 2 * N].tolist()) != list(range(2 * N))  # the slices really cross ranks

    # ShuffleBN: rank r encodes slice r of the shuffled batch, then every key returns to its image's rank
    keys, means = encode_slices(encoder, x_all[perm].chunk(WORLD))
    keys = F.normalize(torch.cat(keys)[torch.argsort(perm)], dim=1).chunk(WORLD)
    # without it: each rank encodes its own batch
    plain_keys, plain_means = encode_slices(encoder, local)
    plain_keys = [F.normalize(k, dim=1) for k in plain_keys]

    for r, got in enumerate(ranks):
        assert got["shuffles"] and not got["shuffles_sync_bn"] and not got["shuffles_eval"]
        k_a, k_b, running_mean = got[True]
        assert torch.allclose(torch.cat([k_a, k_b]), keys[r], rtol=0, atol=1e-6)
        assert torch.allclose(running_mean, means[r], rtol=0, atol=1e-6)  # stats of the shuffled slice
        assert not torch.allclose(keys[r], plain_keys[r], atol=1e-3)  # ...which differ from local ones
        k_a, k_b, running_mean = got[False]
        assert torch.allclose(torch.cat([k_a, k_b]), plain_keys[r], rtol=0, atol=1e-6)
        assert torch.allclose(running_mean, plain_means[r], rtol=0, atol=1e-6)


def test_shuffle_bn_is_a_no_op_in_one_process():
    torch.set_num_threads(1)
    a, b = (v[:N] for v in make_views())
    ma, mb = (v[N : 2 * N] for v in make_views())
    partner, lam = torch.tensor([1, 2, 0]), torch.tensor([0.7, 0.4, 0.9])
    results = []
    for shuffle_bn in (True, False):
        moco = fresh_moco(shuffle_bn, "wbsim")
        rng = torch.get_rng_state()
        out = moco(a, b, ma, mb, partner, lam, lam)
        assert torch.equal(torch.get_rng_state(), rng)  # draws nothing: single-process runs are unchanged
        results.append((out["loss"].detach(), moco.queue.clone(), moco.key_encoder.state_dict()))
    (loss1, queue1, sd1), (loss0, queue0, sd0) = results
    assert torch.equal(loss1, loss0) and torch.equal(queue1, queue0)
    assert all(torch.equal(sd1[k], sd0[k]) for k in sd1)
