"""What every loader shares: the base classes, the per-epoch order, the seeds, the crop reference.

A back end subclasses `TrainLoader` (and `EvalLoader`) and writes two things: `open(path)`, which reads the
dataset's size and labels, and `crops(epoch, start_batch)`, which yields the geometric views (random resized
crop + flip, uint8 NHWC on the training device) with the labels on the host. The base class owns the rest:
the per-rank batch size, `len()`, the order (`rank_order`, a function of (seed, epoch) only), the checks on
`start_batch`, the worker count, and the photometric hand-off: every back end's views go through the same
`augment.photometric` here (`augment_views`), seeded by (seed, epoch, batch index, rank), so a resumed run
draws the same colours whatever the back end.

`random_resized_crop_params` is the one reference of the crop geometry (torchvision's
`RandomResizedCrop.get_params`) with its random draws passed in: the torch loader calls it, the FFCV decoder
compiles it with numba, the GPU-resident loader evaluates it batched on the device (tested equal to it), and
DALI draws its own windows (tests/test_loaders_conformance.py checks their bounds and distribution).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .. import augment, datasets
from ..host import available_cores
from ..seeds import mix_seed, seed_sequence
from .registry import DatasetError, check_dataset

UNLABELED = datasets.UNLABELED  # the label of every sample of an unlabeled set
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop


# ---- seeds (mixed by seeds.mix_seed) -------------------------------------------------------------------


def batch_generator(seed: int, epoch: int, batch_index: int, rank: int, device, stream: int = 0) -> torch.Generator:
    """A generator on `device` that depends on (seed, epoch, batch index, rank, stream) only. Stream 0 is the
    photometric augmentation; a loader that draws on the device (the GPU-resident crops) uses another."""
    g = torch.Generator(device=device)
    g.manual_seed(
        mix_seed(seed, epoch, batch_index, rank) if stream == 0 else mix_seed(seed, epoch, batch_index, rank, stream)
    )
    return g


def photometric_generator(seed: int, epoch: int, batch_index: int, rank: int, device) -> torch.Generator:
    """The photometric randomness of one batch depends on (seed, epoch, batch index, rank) only."""
    return batch_generator(seed, epoch, batch_index, rank, device)


# ---- order ---------------------------------------------------------------------------------------------


def per_rank_batch(cfg, world_size: int) -> int:
    """Global batch over ranks and accumulation steps (the trainer checks divisibility)."""
    return max(1, cfg.data.batch_size // (world_size * cfg.train.accum_steps))


def rank_order(
    num_samples: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int, start_batch: int = 0
) -> np.ndarray:
    """Sample indices this rank reads in `epoch`, batches [start_batch, len) of it, drop_last.

    One permutation of the whole set per (seed, epoch), dealt round-robin to the ranks (as torch's
    DistributedSampler), each rank's share cut to a whole number of batches. It depends only on the
    arguments, so a resumed run skips batches by slicing this list: nothing is decoded for them.
    (Seeded by the pair (seed, epoch) rather than ffcv's seed + epoch: seed 0 epoch 1 and seed 1 epoch 0
    must not share an order.)"""
    perm = np.random.default_rng(seed_sequence(seed, epoch)).permutation(num_samples)
    share = perm[rank : (num_samples // world_size) * world_size : world_size]
    batches = len(share) // batch_size
    return share[start_batch * batch_size : batches * batch_size]


def eval_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Every sample exactly once over the ranks, no padding (unlike DistributedSampler's drop_last=False)."""
    return np.arange(rank, num_samples, world_size)


def eval_crop_ratio(image_size: int) -> float:
    """Centre crop / shorter side: 224/256 at ImageNet sizes, the whole image for tiny (CIFAR-like) sets."""
    return 224 / 256 if image_size > 64 else 1.0


# ---- the crop reference --------------------------------------------------------------------------------


def random_resized_crop_params(height, width, scale, ratio, uniforms):
    """(top, left, h, w) of torchvision's `RandomResizedCrop.get_params`, its random draws given.

    `uniforms[k]` holds attempt k's four draws in [0, 1): area, log aspect, top, left. Up to ten attempts
    of area ~ U(scale) * height * width and log(aspect) ~ U(log ratio); the first crop that fits is placed
    uniformly (top ~ U{0..height-h}); if none fits, the whole image clamped to the ratio range, centred.
    Plain Python on purpose: numba compiles it unchanged for the FFCV decoder."""
    area = height * width
    log_lo = math.log(ratio[0])
    log_hi = math.log(ratio[1])
    for k in range(CROP_ATTEMPTS):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniforms[k][0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniforms[k][1])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(uniforms[k][2] * (height - h + 1)), int(uniforms[k][3] * (width - w + 1)), h, w
    in_ratio = width / height
    lo, hi = min(ratio[0], ratio[1]), max(ratio[0], ratio[1])
    if in_ratio < lo:
        w = int(width)
        h = round(w / lo)
    elif in_ratio > hi:
        h = int(height)
        w = round(h * hi)
    else:
        w = int(width)
        h = int(height)
    return (int(height) - h) // 2, (int(width) - w) // 2, h, w


# ---- workers -------------------------------------------------------------------------------------------

_told: set = set()


def loader_workers(cfg, rank: int = 0) -> int:
    """`data.workers` capped to the cores available to each rank of this node (torchrun's LOCAL_WORLD_SIZE
    ranks share the node's cores), with one line saying so. Asking numba (FFCV) or DALI for more threads
    than there are cores is an error there, and oversubscription only slows the decode down."""
    requested = cfg.data.workers
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cap = max(1, available_cores() // ranks_here)
    if requested <= cap:
        return requested
    if rank == 0 and (requested, cap) not in _told:
        _told.add((requested, cap))
        per = f" for each of {ranks_here} ranks" if ranks_here > 1 else ""
        print(f"[loaders] data.workers={requested}: {cap} CPU core(s) available{per}; using {cap} workers", flush=True)
    return cap


# ---- paths ---------------------------------------------------------------------------------------------


def scan_folder(root: str, rank: int = 0) -> datasets.FolderSource:
    """An image folder as every loader lists it (datasets.scan_image_folder: the converters' rules for
    hidden entries, symlink loops and empty classes, so a folder gives the same labels whatever reads it).
    A folder without class sub-folders is an unlabeled set: every image, label -1."""
    labeled = bool(datasets.class_folders(Path(root)))
    try:
        source = datasets.scan_image_folder(Path(root), labeled=labeled)
    except datasets.SourceError as exc:
        raise DatasetError(str(exc)) from None
    if rank == 0 and not labeled:
        print(f"[loaders] {root}: no class folders, read as an unlabeled set of {len(source)} images", flush=True)
    for line in source.left_out.lines() if rank == 0 else ():
        print(f"[loaders] {line}", flush=True)
    if rank == 0 and source.empty_classes:
        print(
            f"[loaders] {root}: empty class folder(s) {', '.join(source.empty_classes)} keep their label indices",
            flush=True,
        )
    return source


# ---- the base classes ----------------------------------------------------------------------------------


def augment_views(a_u8: torch.Tensor, b_u8: torch.Tensor, policies, generator: torch.Generator):
    """Both geometric views (uint8 [N, S, S, 3] on the device) -> photometrically augmented, each with its
    view's policy: the one photometric implementation of every loader (augment.photometric)."""
    return augment.photometric(a_u8, policies[0], generator), augment.photometric(b_u8, policies[1], generator)


def _open_dataset(loader, cfg, path: str, key: str, rank: int, world_size: int, device) -> None:
    """What every loader sets up the same way: rank, device, per-rank batch, workers, the checked path, and
    the back end's `open` (number of samples, labeled)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    loader.cfg, loader.rank, loader.world_size = cfg, rank, world_size
    loader.device = torch.device(device)
    loader.batch_size = per_rank_batch(cfg, world_size)
    loader.workers = loader_workers(cfg, rank)
    loader.path = check_dataset(loader.kind, path, key)  # the one check of a dataset path
    loader.num_samples, loader.labeled = loader.open(loader.path)


class TrainLoader:
    """`len(loader)` batches per epoch on this rank; `loader.epoch(e, start_batch=k)` yields batches k.. of
    epoch e as (a_u8, b_u8, labels): uint8 [N, S, S, 3] views on the training device, photometrically
    augmented, and int64 [N] labels on the host (the training step does not read them: no copy per batch).

    Subclasses set `kind` and implement `open` and `crops`."""

    kind = ""

    def __init__(self, cfg, rank: int, world_size: int, device):
        self.seed = cfg.train.seed
        self.policies = augment.policy_for(cfg)
        _open_dataset(self, cfg, cfg.data.train, "data.train", rank, world_size, device)

    def open(self, path: str) -> tuple[int, bool]:
        """Read the dataset's header; return (number of samples, whether it is labeled)."""
        raise NotImplementedError

    def crops(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches start_batch.. of `epoch`: (a_u8, b_u8, labels), geometric views only."""
        raise NotImplementedError

    def __len__(self) -> int:
        return (self.num_samples // self.world_size) // self.batch_size  # as rank_order cuts it

    def order(self, epoch: int, start_batch: int = 0) -> np.ndarray:
        """The sample indices of batches start_batch.. of `epoch` on this rank."""
        return rank_order(self.num_samples, self.seed, epoch, self.rank, self.world_size, self.batch_size, start_batch)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Exactly len(self) - start_batch batches (see the class docstring); raises here, not at the first
        batch, for a start_batch outside [0, len]."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch = {start_batch} is not in [0, {len(self)}]")
        return self._augmented(epoch, start_batch)

    def augment(self, a_u8: torch.Tensor, b_u8: torch.Tensor, epoch: int, batch_index: int):
        """Batch `batch_index` of `epoch` from `crops` -> the photometric views `epoch` yields for it."""
        g = photometric_generator(self.seed, epoch, batch_index, self.rank, self.device)
        return augment_views(a_u8, b_u8, self.policies, g)

    def _augmented(self, epoch: int, start_batch: int):
        batch_index = start_batch
        for a_u8, b_u8, labels in self.crops(epoch, start_batch):
            a_u8, b_u8 = self.augment(a_u8, b_u8, epoch, batch_index)
            yield a_u8, b_u8, labels
            batch_index += 1


class EvalLoader:
    """One centre-cropped view per sample, no drop_last, each sample exactly once over the ranks:
    `for x_u8, labels in loader`, x_u8 uint8 [N, S, S, 3] on the device, labels int64 [N] on the host.

    Subclasses set `kind` and implement `open` and `batches`; `shard` says which samples this rank reads."""

    kind = ""

    def __init__(self, cfg, path: str, rank: int, world_size: int, device):
        self.size = cfg.data.image_size
        _open_dataset(self, cfg, path, "data path", rank, world_size, device)
        self.indices = self.shard()

    def open(self, path: str) -> tuple[int, bool]:
        raise NotImplementedError

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def shard(self) -> np.ndarray:
        """The sample indices this rank reads, in file order."""
        return eval_shard(self.num_samples, self.rank, self.world_size)

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        return self.batches()
