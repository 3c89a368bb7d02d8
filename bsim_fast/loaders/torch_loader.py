"""The baseline / fallback loader: an image folder read by Pillow in torch DataLoader worker processes.

The folder is listed by `datasets.scan_image_folder` and each file decoded by `datasets`' decoder, as the
converters do, so a folder gives the same samples, labels and pixels here as after data_prep/write_ffcv.py
(hidden folders are not classes, a symlink loop is cut, an empty class keeps its index; a folder without
class folders is an unlabeled set). Each image is decoded once in a worker and cut into the two geometric
views there (base.random_resized_crop_params + horizontal flip); the photometric part runs on the device in
the base class, as for the other loaders. Every random draw of a sample comes from a generator seeded by
(seed, epoch, index), and the order is `rank_order(seed, epoch)`, so a resumed run sees the same batches
and the same crops.
"""

from __future__ import annotations

import signal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import datasets
from .base import (
    CROP_ATTEMPTS,
    DatasetError,
    EvalLoader,
    TrainLoader,
    eval_crop_ratio,
    random_resized_crop_params,
    scan_folder,
    seed_sequence,
)

# Every pixel: the converters cap the stored side (--max-resolution), a folder read directly keeps it.
FULL_RESOLUTION = 1 << 30


def _bad_file(reason: str) -> DatasetError:
    # Fail rather than substitute another image: a substitute would train on a set that differs from the one
    # the converters write (they skip the file and list it), silently. The file named in one line can be
    # fixed or removed, and the run resumed from its last checkpoint with the same batches.
    return DatasetError(
        f"{reason} (data.loader=torch decodes while training: replace or remove the file, or "
        f"convert the folder with data_prep/write_ffcv.py, which skips bad files and lists them)"
    )


# aug.interpolation -> Pillow's filter: Pillow is the anchors' resize itself (bsim_fast/loaders/resize.py)
PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def crop_view(image: Image.Image, box, size: int, interpolation: str, flip: bool) -> np.ndarray:
    """uint8 [size, size, 3]: the crop box = (top, left, h, w) of `image` resized by Pillow, mirrored if flip."""
    top, left, h, w = box
    view = image.crop((left, top, left + w, top + h)).resize((size, size), PIL_FILTERS[interpolation])
    return np.asarray(view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else view)


class TwoViewFolder(Dataset):
    """Item (epoch, index) -> (uint8 [2, S, S, 3] views, label, error): one decode, two crops, from a
    generator seeded by (seed, epoch, index), each cut then resized by Pillow (torchvision's RandomResizedCrop
    on a PIL image). A file that does not decode gives zero views and its one-line reason as `error` (an
    exception would reach the main process wrapped in the worker's traceback)."""

    def __init__(
        self,
        source: datasets.FolderSource,
        size: int,
        scale,
        ratio,
        flip_p: float,
        seed: int,
        interpolation: str = "bicubic",
    ):
        self.source = source
        self.size, self.scale, self.ratio, self.flip_p, self.seed = size, scale, ratio, flip_p, seed
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key
        views = np.zeros((2, self.size, self.size, 3), dtype=np.uint8)
        try:
            image = Image.fromarray(self.source.load_rgb(index, FULL_RESOLUTION))
        except datasets.SampleError as exc:
            return torch.from_numpy(views), self.source.label(index), f"{self.source.describe(index)}: {exc}"
        rng = np.random.default_rng(seed_sequence(self.seed, epoch, index))
        for v in range(2):
            box = random_resized_crop_params(
                image.height, image.width, self.scale, self.ratio, rng.random((CROP_ATTEMPTS, 4))
            )
            views[v] = crop_view(image, box, self.size, self.interpolation, flip=rng.random() < self.flip_p)
        return torch.from_numpy(views), self.source.label(index), ""


class _EpochBatches(Sampler):
    """The batches of the current epoch, set before each pass (the DataLoader and its persistent workers
    stay alive across epochs)."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """A worker ignores SIGTERM and SIGINT. They reach it with its trainer (Ctrl-C to the terminal's process
    group, torchrun's signal to a rank's group, a scheduler's to every process), and a worker killed by one
    turns the trainer's checkpoint-then-exit into a DataLoader traceback. The trainer ends its workers itself,
    and a worker whose trainer is gone ends too (torch's workers watch their parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _dataloader_kwargs(workers: int, device: torch.device, persistent: bool) -> dict:
    kw = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kw.update(persistent_workers=persistent, prefetch_factor=4, worker_init_fn=_leave_signals_to_the_trainer)
    return kw


class SideStreamCopy:
    """Host-to-device copies of the training batches on a CUDA stream of their own: the copy of the next batch
    (77 MB per step at 224² and batch 256) runs while the compute stream still works on the step before,
    where on the compute stream it would wait for that step and the step after it for the copy. The compute
    stream waits for the copy's event before the batch's first use, and `record_stream` tells the caching
    allocator that the batch is used there, so its memory is not handed out again before the compute stream is
    done with it. Off CUDA a plain `.to(device)`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, host: torch.Tensor) -> torch.Tensor:
        if self.stream is None:
            return host.to(self.device)
        with torch.cuda.stream(self.stream):
            batch = host.to(self.device, non_blocking=True)  # pinned by the DataLoader: asynchronous
            copied = torch.cuda.Event()
            copied.record(self.stream)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        batch.record_stream(compute)
        return batch


def _raise_first_error(errors) -> None:
    bad = next((e for e in errors if e), None)
    if bad:
        raise _bad_file(bad)


class TorchTrainLoader(TrainLoader):
    kind = "torch"

    def open(self, path: str):
        data, aug = self.cfg.data, self.cfg.aug
        self.source = scan_folder(path, self.rank)
        self.dataset = TwoViewFolder(
            self.source, data.image_size, aug.crop_scale, aug.crop_ratio, aug.flip_p, self.seed, aug.interpolation
        )
        self._batches = _EpochBatches()
        self._loader = DataLoader(
            self.dataset, batch_sampler=self._batches, **_dataloader_kwargs(self.workers, self.device, persistent=True)
        )
        self._to_device = SideStreamCopy(self.device)
        return len(self.source), datasets.labeled_from_labels(self.source.labels, path)

    def crops(self, epoch: int, start_batch: int):
        order = self.order(epoch, start_batch)
        if len(order) == 0:
            return
        self._batches.batches = [
            [(epoch, int(i)) for i in order[k : k + self.batch_size]] for k in range(0, len(order), self.batch_size)
        ]
        for views_u8, labels, errors in self._loader:
            _raise_first_error(errors)
            views_u8 = self._to_device(views_u8)
            yield views_u8[:, 0], views_u8[:, 1], labels


class _CentreCropFolder(Dataset):
    def __init__(self, source: datasets.FolderSource, size: int):
        from torchvision.transforms import v2

        self.source = source
        self.transform = v2.Compose(
            [v2.Resize(round(size / eval_crop_ratio(size)), antialias=True), v2.CenterCrop(size)]
        )
        self.size = size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image = Image.fromarray(self.source.load_rgb(index, FULL_RESOLUTION))
        except datasets.SampleError as exc:
            empty = torch.zeros((self.size, self.size, 3), dtype=torch.uint8)
            return empty, self.source.label(index), f"{self.source.describe(index)}: {exc}"
        x = torch.from_numpy(np.array(self.transform(image), dtype=np.uint8))
        return x, self.source.label(index), ""


class TorchEvalLoader(EvalLoader):
    """Resize + centre crop, one view, each sample exactly once over the ranks, no drop_last."""

    kind = "torch"

    def open(self, path: str):
        self.source = scan_folder(path, self.rank)
        return len(self.source), datasets.labeled_from_labels(self.source.labels, path)

    def batches(self):
        dataset = torch.utils.data.Subset(_CentreCropFolder(self.source, self.size), self.indices.tolist())
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=False,
            **_dataloader_kwargs(self.workers, self.device, persistent=False),
        )
        for x_u8, labels, errors in loader:
            _raise_first_error(errors)
            yield x_u8.to(self.device, non_blocking=True), labels
