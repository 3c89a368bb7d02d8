"""The baseline / fallback loader: torchvision ImageFolder + PIL in a torch DataLoader.

Each image is decoded once in a worker and cut into the two geometric views there (RandomResizedCrop +
horizontal flip, torchvision's algorithm); the photometric part runs on the device (augment.py), as for
the other loaders. Every random draw of a sample comes from a generator seeded by (seed, epoch, index),
and the order is `rank_order(seed, epoch)`, so a resumed run sees the same batches and the same crops.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from . import (augment_views, eval_crop_ratio, eval_shard, per_rank_batch, photometric_generator,
               rank_order, resolve_path)
from ..augment import policy_for


def _image_folder(path: str):
    from torchvision.datasets import ImageFolder
    return ImageFolder(path)


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def random_resized_crop_box(height: int, width: int, scale, ratio, rng: np.random.Generator):
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, drawing from `rng`."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TwoViewFolder(Dataset):
    """Item (epoch, index) -> (uint8 [2, S, S, 3] views, label): one decode, two crops, from a generator
    seeded by (seed, epoch, index)."""

    def __init__(self, root: str, size: int, scale, ratio, flip_p: float, seed: int):
        self.folder = _image_folder(root)
        self.size, self.scale, self.ratio, self.flip_p, self.seed = size, scale, ratio, flip_p, seed

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, key):
        epoch, index = key
        path, label = self.folder.samples[index]
        image = _open_rgb(path)
        rng = np.random.default_rng((self.seed, epoch, index))
        views = np.empty((2, self.size, self.size, 3), dtype=np.uint8)
        for v in range(2):
            top, left, h, w = random_resized_crop_box(image.height, image.width, self.scale, self.ratio, rng)
            view = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
            if rng.random() < self.flip_p:
                view = view.transpose(Image.FLIP_LEFT_RIGHT)
            views[v] = np.asarray(view)
        return torch.from_numpy(views), label


class _EpochBatches(Sampler):
    """The batches of the current epoch, set before each pass (the DataLoader and its persistent workers
    stay alive across epochs)."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _dataloader_kwargs(cfg, device: torch.device, persistent: bool) -> dict:
    workers = cfg.data.workers
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda")
    if workers > 0:
        kw.update(persistent_workers=persistent, prefetch_factor=4)
    return kw


class TorchTrainLoader:
    def __init__(self, cfg, rank: int, world_size: int, device):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.root = resolve_path("torch", cfg.data.train)
        self.batch_size = per_rank_batch(cfg, world_size)
        self.seed = cfg.train.seed
        self.policies = policy_for(cfg)
        self.dataset = TwoViewFolder(self.root, cfg.data.image_size, cfg.aug.crop_scale, cfg.aug.crop_ratio,
                                     cfg.aug.flip_p, self.seed)
        self.num_samples = len(self.dataset)
        self._batches = _EpochBatches()
        self._loader = DataLoader(self.dataset, batch_sampler=self._batches,
                                  **_dataloader_kwargs(cfg, self.device, persistent=True))

    def __len__(self) -> int:
        return (self.num_samples // self.world_size) // self.batch_size

    def epoch(self, epoch: int, start_batch: int = 0):
        order = rank_order(self.num_samples, self.seed, epoch, self.rank, self.world_size, self.batch_size,
                           start_batch)
        if len(order) == 0:
            return
        self._batches.batches = [[(epoch, int(i)) for i in order[k:k + self.batch_size]]
                                 for k in range(0, len(order), self.batch_size)]
        for b, (views_u8, labels) in enumerate(self._loader):
            views_u8 = views_u8.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            g = photometric_generator(self.seed, epoch, start_batch + b, self.rank, self.device)
            a_u8, b_u8 = augment_views(views_u8, self.policies, g)
            yield a_u8, b_u8, labels


class _CentreCropFolder(Dataset):
    def __init__(self, root: str, size: int):
        from torchvision.transforms import v2
        self.folder = _image_folder(root)
        self.transform = v2.Compose([v2.Resize(round(size / eval_crop_ratio(size)), antialias=True),
                                     v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, index: int):
        path, label = self.folder.samples[index]
        return torch.from_numpy(np.array(self.transform(_open_rgb(path)), dtype=np.uint8)), label


class TorchEvalLoader:
    """Resize + centre crop, one view, each sample exactly once over the ranks, no drop_last."""

    def __init__(self, cfg, path: str, rank: int, world_size: int, device):
        self.device = torch.device(device)
        dataset = _CentreCropFolder(resolve_path("torch", path), cfg.data.image_size)
        self.indices = eval_shard(len(dataset), rank, world_size)
        self._loader = DataLoader(Subset(dataset, self.indices.tolist()), batch_size=per_rank_batch(cfg, world_size),
                                  shuffle=False, drop_last=False,
                                  **_dataloader_kwargs(cfg, self.device, persistent=False))

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        for x_u8, labels in self._loader:
            yield x_u8.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
