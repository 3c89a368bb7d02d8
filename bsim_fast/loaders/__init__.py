"""Loaders: one protocol, four back ends: ffcv, dali, torch, and gpu_resident for small sets (DESIGN.md).

    loader = build_train_loader(cfg, rank, world_size, device)
    len(loader)                                                   # batches per epoch on this rank
    for a_u8, b_u8, labels in loader.epoch(epoch, start_batch=0)  # uint8 [N,S,S,3] x2, int64 [N], on device
    for x_u8, labels in build_eval_loader(cfg, path, rank, world_size, device)   # centre crop, every sample once

The back ends are imported lazily so that each works without the others installed. What they share lives
here: the per-rank batch size, the per-epoch order (`rank_order`), the photometric seeding
(`photometric_generator`), the path resolution for the built-in set, and `loader_throughput`.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

BUILTIN = "builtin"
# Where data_prep/write_ffcv.py puts the built-in set by default (configs/small name the same files).
BUILTIN_BETON = "data_out/cifar10_mini_{split}.beton"
REPO_ROOT = Path(__file__).resolve().parents[2]


def per_rank_batch(cfg, world_size: int) -> int:
    """Global batch over ranks and accumulation steps (the trainer checks divisibility)."""
    return max(1, cfg.data.batch_size // (world_size * cfg.train.accum_steps))


def _mix64(*values: int) -> int:
    """A 63-bit seed from a tuple of ints (SeedSequence hashing: nearby tuples give unrelated seeds)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(
        1, np.uint64)[0] >> np.uint64(1))


def rank_order(num_samples: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
               start_batch: int = 0) -> np.ndarray:
    """Sample indices this rank reads in `epoch`, batches [start_batch, len) of it, drop_last.

    One permutation of the whole set per (seed, epoch), dealt round-robin to the ranks (as torch's
    DistributedSampler), each rank's share cut to a whole number of batches. It depends only on the
    arguments, so a resumed run skips batches by slicing this list: nothing is decoded for them.
    (np.random.default_rng((seed, epoch)) rather than ffcv's default_rng(seed + epoch): seed 0 epoch 1 and
    seed 1 epoch 0 must not share an order.)"""
    perm = np.random.default_rng((seed, epoch)).permutation(num_samples)
    share = perm[rank:(num_samples // world_size) * world_size:world_size]
    batches = len(share) // batch_size
    return share[start_batch * batch_size:batches * batch_size]


def eval_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Every sample exactly once over the ranks, no padding (unlike DistributedSampler's drop_last=False)."""
    return np.arange(rank, num_samples, world_size)


def photometric_generator(seed: int, epoch: int, batch_index: int, rank: int,
                          device: torch.device) -> torch.Generator:
    """The photometric randomness of one batch depends on (seed, epoch, batch index, rank) only."""
    g = torch.Generator(device=device)
    g.manual_seed(_mix64(seed, epoch, batch_index, rank))
    return g


def augment_views(views_u8: torch.Tensor, policies, generator: torch.Generator):
    """[N, 2, S, S, 3] uint8 on the device -> (a_u8, b_u8), each with its view's photometric policy."""
    from ..augment import photometric
    return (photometric(views_u8[:, 0], policies[0], generator),
            photometric(views_u8[:, 1], policies[1], generator))


def eval_crop_ratio(image_size: int) -> float:
    """Centre crop / shorter side: 224/256 at ImageNet sizes, the whole image for tiny (CIFAR-like) sets."""
    return 224 / 256 if image_size > 64 else 1.0


def _builtin_split(path: str) -> str | None:
    """'builtin' -> 'train', 'builtin:test' -> 'test', anything else -> None."""
    if path == BUILTIN:
        return "train"
    if path.startswith(BUILTIN + ":"):
        split = path.split(":", 1)[1]
        if split not in ("train", "test"):
            raise ValueError(f"data path {path!r}: the built-in set has splits 'train' and 'test'")
        return split
    return None


def resolve_path(kind: str, path: str) -> str:
    """The dataset path a back end opens. For the built-in set: the ImageFolder tree (torch), or the
    converted file at its conventional place (ffcv/dali). Converting on the fly is not done here: under
    DDP every rank (and every node) would race to write the same file, and a conversion is a step a user
    should see; the error says the exact command instead."""
    split = _builtin_split(path)
    if split is None:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: dataset not found (data.loader={kind})")
        return path
    if kind == "torch":
        from .. import datasets
        return str(datasets.builtin_root() / split)
    if kind == "ffcv":
        beton = BUILTIN_BETON.format(split=split)
        for candidate in (Path(beton), REPO_ROOT / beton):
            if candidate.is_file():
                return str(candidate)
        raise FileNotFoundError(
            f"data path {path!r} with data.loader=ffcv needs the converted set {beton}: run "
            f"`python data_prep/write_ffcv.py --split {split}` (writes {beton}), "
            f"or set data.loader=torch to read the built-in images directly")
    return path   # dali resolves its own default shard folder


def build_train_loader(cfg, rank: int, world_size: int, device):
    kind = cfg.data.loader
    device = torch.device(device)
    if cfg.data.gpu_resident:   # reads the .beton or the folder that data.loader names
        from .gpu_resident import GpuResidentTrainLoader
        return GpuResidentTrainLoader(cfg, rank, world_size, device)
    if kind == "ffcv":
        from .ffcv_loader import FfcvTrainLoader
        return FfcvTrainLoader(cfg, rank, world_size, device)
    if kind == "torch":
        from .torch_loader import TorchTrainLoader
        return TorchTrainLoader(cfg, rank, world_size, device)
    if kind == "dali":
        from .dali_loader import DaliTrainLoader
        return DaliTrainLoader(cfg, rank, world_size, device)
    raise ValueError(f"data.loader = {kind!r} is not one of ffcv, dali, torch")


def build_eval_loader(cfg, path: str, rank: int, world_size: int, device):
    kind = cfg.data.loader
    device = torch.device(device)
    if cfg.data.gpu_resident:
        from .gpu_resident import GpuResidentEvalLoader
        return GpuResidentEvalLoader(cfg, path, rank, world_size, device)
    if kind == "ffcv":
        from .ffcv_loader import FfcvEvalLoader
        return FfcvEvalLoader(cfg, path, rank, world_size, device)
    if kind == "torch":
        from .torch_loader import TorchEvalLoader
        return TorchEvalLoader(cfg, path, rank, world_size, device)
    if kind == "dali":
        from .dali_loader import DaliEvalLoader
        return DaliEvalLoader(cfg, path, rank, world_size, device)
    raise ValueError(f"data.loader = {kind!r} is not one of ffcv, dali, torch")


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def loader_throughput(loader, batches: int, epoch: int = 0) -> float:
    """Two-view images per second (source images, each delivered as two augmented views) over `batches`
    batches after one warm-up batch (which pays for compilation, worker start-up and the first reads).

    Works for the train protocol (`loader.epoch`) and, counting one view, for eval loaders (iterables).
    Raises if the epoch has fewer than batches + 1 batches."""
    it = iter(loader.epoch(epoch)) if hasattr(loader, "epoch") else iter(loader)
    first = next(it)
    _sync(first[0])
    images, t0, last = 0, time.perf_counter(), first
    for _ in range(batches):
        last = next(it)
        images += last[0].shape[0]
    _sync(last[0])
    seconds = time.perf_counter() - t0
    close = getattr(it, "close", None)
    if close is not None:
        close()
    return images / seconds
