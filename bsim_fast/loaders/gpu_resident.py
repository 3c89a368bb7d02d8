"""GPU-resident loader for small datasets: decode every image once, keep them all on the device, cut both
views there (`data.loader=gpu_resident`).

At 32x32 a ResNet-18 step eats 20-25k images/s on one H100, more than a few CPU cores can crop and feed.
Here the whole set lives on the training device as one uint8 tensor [N, H, W, 3] and each batch is a handful
of batched kernels: gather by index, two random resized crops + flips (two batched matmuls), then the same
photometric policy as every other loader (base.py). No Python loop over samples, no host sync.

What is stored. Sources are the paths the other loaders take: an FFCV .beton (decoded once by ffcv's own
Loader) or an image folder (listed and decoded as the torch loader and the converters do, so a folder gives
the same labels and pixels here as after data_prep/write_ffcv.py); the built-in set is read as its folder.
Labels stay on the host. If every image has one size they are stored as they are.
Otherwise each is resized (shorter side) and centre-cropped to a square of side round(S / eval_crop_ratio(S))
for S = data.image_size (32 at 32 px, 256 at 224 px): the eval centre crop is then taken at stored
resolution, and training crops see only that centre square, the price of one dense tensor.
The set must fit a budget (25% of the free memory of a GPU, 4 GiB on the CPU), checked before decoding.

The crops are `base.random_resized_crop_params` (torchvision's RandomResizedCrop) evaluated for every view
at once: all ten attempts' uniforms are drawn together and the first attempt that fits is kept, which gives
the reference's box for the same uniforms (tests/test_loaders_conformance.py). The resize is every loader's
(`resize.py`: Pillow's filter named by `aug.interpolation`, crop then resize, antialiased where a crop
shrinks): the taps of every view as dense matrices, two batched matmuls (horizontal, vertical), rounded once.

Randomness: the crops and flips of a batch come from `batch_generator(seed, epoch, batch index, rank,
CROP_STREAM)`, the colours from the base class's photometric generator; the order is `rank_order(seed,
epoch)`. A resumed run (start_batch) therefore sees the same batches, crops and colours.
"""

from __future__ import annotations

import math
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import converted, datasets
from ..config import ConfigError
from .base import CROP_ATTEMPTS, DatasetError, EvalLoader, TrainLoader, batch_generator, eval_crop_ratio, scan_folder
from .resize import BILINEAR, dense_taps, filter_code

CPU_BUDGET_BYTES = 4 << 30  # the device is the CPU (tests, debugging): host memory is shared with all else
GPU_BUDGET_FRACTION = 0.25  # of the free memory: the model, activations and optimiser need the rest
CROP_STREAM = 1  # batch_generator stream of the crops (0 is the photometric one)
GIB = 1 << 30


class ResidentSet:
    """Every image of a dataset on the device: images uint8 [N, H, W, 3]; labels int64 [N] on the host."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels


# Train and eval loaders of one path (the k-NN monitor reads the train set) share one copy while either lives.
_resident = weakref.WeakValueDictionary()


def stored_side(image_size: int) -> int:
    """The square side that images of mixed sizes are stored at: the shorter side of the eval resize."""
    return round(image_size / eval_crop_ratio(image_size))


def check_budget(name: str, shape: tuple, device: torch.device) -> None:
    """Refuse, in one line, a set that would crowd out training (before anything is decoded)."""
    nbytes = math.prod(shape)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        budget = int(free * GPU_BUDGET_FRACTION)
        limit = f"{GPU_BUDGET_FRACTION:.0%} of the {free / GIB:.1f} GiB free on {device}"
    else:
        budget, limit = CPU_BUDGET_BYTES, f"the {CPU_BUDGET_BYTES / GIB:g} GiB allowed on {device}"
    if nbytes > budget:
        n, h, w, _ = shape
        raise ConfigError(
            f"data.loader=gpu_resident: {name} is {n} images of {h}x{w} = {nbytes / GIB:.2f} GiB decoded, "
            f"more than {limit}; set data.loader to ffcv, dali or torch"
        )


def _read_beton(path: str, side: int, workers: int, device: torch.device) -> ResidentSet:
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import ToTensor

    from . import ffcv_loader  # (also quiets a harmless numba message when a Loader is freed)

    converted.check_beton(path)  # names a truncated file instead of reading garbage
    reader = Reader(path)
    names = list(reader.handlers)
    for field in ("image", "label"):
        if field not in names:
            raise DatasetError(
                f"{path}: .beton has fields {names}, expected '{field}' (write it with data_prep/write_ffcv.py)"
            )
    meta = reader.metadata[f"f{names.index('image')}"]
    sizes = set(zip(meta["height"].tolist(), meta["width"].tolist()))
    uniform = len(sizes) == 1
    height, width = next(iter(sizes)) if uniform else (side, side)
    check_budget(path, (len(meta), height, width, 3), device)
    decoder = SimpleRGBImageDecoder() if uniform else CenterCropRGBImageDecoder((side, side), ratio=1.0)
    with ffcv_loader.keep_torch_threads():
        loader = Loader(
            path,
            batch_size=512,
            num_workers=workers,
            order=OrderOption.SEQUENTIAL,
            drop_last=False,
            os_cache=True,
            pipelines={"image": [decoder, ToTensor()], "label": None},
        )
        batches = iter(loader)
    images = torch.empty((len(meta), height, width, 3), dtype=torch.uint8, device=device)
    start = 0
    for (batch,) in batches:  # SEQUENTIAL, no drop: file order, every sample once
        images[start : start + len(batch)].copy_(batch)
        start += len(batch)
    labels = np.ascontiguousarray(reader.metadata[f"f{names.index('label')}"]).astype(np.int64)
    return ResidentSet(images, torch.from_numpy(labels))


def _header_size(path: str) -> tuple:
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header only
            return image.size[::-1]
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable image ({exc})") from None


def _read_folder(root: str, side: int, workers: int, device: torch.device, rank: int) -> ResidentSet:
    from PIL import Image, ImageOps

    source = scan_folder(root, rank)
    with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while it reads and decodes
        sizes = set(pool.map(_header_size, source.paths))
    height, width = next(iter(sizes)) if len(sizes) == 1 else (side, side)
    check_budget(root, (len(source), height, width, 3), device)
    images = np.empty((len(source), height, width, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        try:
            rgb = source.load_rgb(i, max_resolution=1 << 30)  # every pixel (converters cap at 512)
        except datasets.SampleError as exc:
            raise DatasetError(f"{source.describe(i)}: {exc}") from None
        if rgb.shape[:2] != (height, width):  # mixed sizes (or an EXIF rotation): resize, centre crop
            rgb = np.asarray(ImageOps.fit(Image.fromarray(rgb), (width, height), Image.Resampling.BILINEAR))
        images[i] = rgb

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(decode, range(len(source))))
    return ResidentSet(torch.from_numpy(images).to(device), torch.from_numpy(source.labels))


def load_resident(path: str, image_size: int, workers: int, device: torch.device, rank: int) -> ResidentSet:
    """The decoded set at `path` (a .beton or an image folder, already resolved)."""
    side = stored_side(image_size)
    key = (os.path.realpath(path), os.stat(path).st_mtime_ns, side, str(device))
    data = _resident.get(key)
    if data is None:
        if os.path.isdir(path):
            data = _read_folder(path, side, max(1, workers), device, rank)
        else:
            data = _read_beton(path, side, max(1, workers), device)
        _resident[key] = data
    return data


# ---- geometry on the device ----------------------------------------------------------------------------


def boxes_from_uniforms(uniforms: torch.Tensor, height: int, width: int, scale, ratio):
    """`base.random_resized_crop_params` for n crops at once: uniforms float64 [n, 10, 4] (attempt k's draws:
    area, log aspect, top, left) -> (top, left, h, w), float64 [n] each, the reference's box for each row."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = height * width * (scale[0] + (scale[1] - scale[0]) * uniforms[..., 0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniforms[..., 1])
    w = torch.sqrt(area * aspect).round()  # round half to even, as Python's round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first attempt that fits (0 if none)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    position = uniforms.gather(1, first[..., None].expand(-1, 1, 4))[:, 0, 2:]
    # none fits in ten attempts: the whole image, clamped to the ratio range, centred
    lo, hi = min(ratio), max(ratio)
    if width / height < lo:
        fallback_w, fallback_h = width, round(width / lo)
    elif width / height > hi:
        fallback_w, fallback_h = round(height * hi), height
    else:
        fallback_w, fallback_h = width, height
    top = torch.where(found, (position[:, 0] * (height - h + 1)).floor(), float((height - fallback_h) // 2))
    left = torch.where(found, (position[:, 1] * (width - w + 1)).floor(), float((width - fallback_w) // 2))
    return top, left, torch.where(found, h, float(fallback_h)), torch.where(found, w, float(fallback_w))


def random_resized_boxes(n: int, height: int, width: int, scale, ratio, generator: torch.Generator):
    """(top, left, h, w), float64 [n] each: n crops of torchvision's RandomResizedCrop, drawn on the device."""
    uniforms = torch.rand(n, CROP_ATTEMPTS, 4, generator=generator, device=generator.device, dtype=torch.float64)
    return boxes_from_uniforms(uniforms, height, width, scale, ratio)


def crop_resize(images_u8: torch.Tensor, top, left, h, w, flip, size: int, code: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] and V boxes per image ([B, V] each, float64; flip bool) -> uint8 [B, V, size, size, 3],
    each box cut and resized with the filter `code` (resize.py), mirrored where flip.

    Two batched matmuls in float32 (PyTorch's default full-precision matmul; TF32, which would cost a grey
    level, is never turned on here). The result is a permuted view of a [B, V, 3, S, S] tensor: photometric()
    reads channel planes and returns a contiguous copy, so an NHWC copy here would be wasted."""
    b, height, width, _ = images_u8.shape
    views = top.shape[1]
    rows_taps = dense_taps(top.flatten(), h.flatten(), size, height, code).view(b, views, size, height)
    cols_taps = dense_taps(left.flatten(), w.flatten(), size, width, code).view(b, views, size, width)
    cols_taps = torch.where(flip[..., None, None], cols_taps.flip(2), cols_taps)  # mirror after the crop
    x = images_u8.permute(0, 3, 1, 2).float()[:, None]  # [B, 1, 3, H, W]
    rows = torch.matmul(x, cols_taps.transpose(-1, -2)[:, :, None])  # horizontal pass: [B, V, 3, H, S]
    out = torch.matmul(rows_taps[:, :, None], rows)  # vertical pass: [B, V, 3, S, S]
    out = out.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)  # rounded half up, as resize.round_u8
    return out.permute(0, 1, 3, 4, 2)


# ---- the loaders ---------------------------------------------------------------------------------------


class GpuResidentTrainLoader(TrainLoader):
    """Two augmented views per image, cut on the device from the resident set (see the module docstring)."""

    kind = "gpu_resident"

    def open(self, path: str):
        self.data = load_resident(path, self.cfg.data.image_size, self.workers, self.device, self.rank)
        return len(self.data.labels), datasets.labeled_from_labels(self.data.labels.numpy(), path)

    def crops(self, epoch: int, start_batch: int):
        order = self.order(epoch, start_batch)
        order_on_device = torch.from_numpy(order).to(self.device)  # one copy per epoch
        aug, size, bs = self.cfg.aug, self.cfg.data.image_size, self.batch_size
        code = filter_code(aug.interpolation)
        _, height, width, _ = self.data.images.shape
        for b in range(len(order) // bs):
            g = batch_generator(self.seed, epoch, start_batch + b, self.rank, self.device, CROP_STREAM)
            top, left, h, w = (
                t.view(bs, 2) for t in random_resized_boxes(2 * bs, height, width, aug.crop_scale, aug.crop_ratio, g)
            )
            flip = torch.rand(bs, 2, generator=g, device=self.device) < aug.flip_p
            views_u8 = crop_resize(
                self.data.images[order_on_device[b * bs : (b + 1) * bs]], top, left, h, w, flip, size, code
            )
            yield views_u8[:, 0], views_u8[:, 1], self.data.labels[torch.from_numpy(order[b * bs : (b + 1) * bs])]


class GpuResidentEvalLoader(EvalLoader):
    """One centre-cropped view per sample (as the other eval loaders), each sample exactly once over the
    ranks, no drop_last."""

    kind = "gpu_resident"

    def open(self, path: str):
        self.data = load_resident(path, self.size, self.workers, self.device, self.rank)
        return len(self.data.labels), datasets.labeled_from_labels(self.data.labels.numpy(), path)

    def batches(self):
        _, height, width, _ = self.data.images.shape
        crop = round(min(height, width) * eval_crop_ratio(self.size))
        top, left = round((height - crop) / 2), round((width - crop) / 2)  # torchvision's CenterCrop
        indices = torch.from_numpy(self.indices)
        on_device = indices.to(self.device)
        for k in range(0, len(indices), self.batch_size):
            idx = on_device[k : k + self.batch_size]
            x = self.data.images[idx]
            if crop == self.size:  # the usual case: a plain slice, no resampling
                x = x[:, top : top + crop, left : left + crop].contiguous()
            else:
                box = [torch.full((len(idx), 1), float(v), device=self.device) for v in (top, left, crop, crop)]
                flip = torch.zeros((len(idx), 1), dtype=torch.bool, device=self.device)
                x = crop_resize(x, *box, flip, self.size, BILINEAR)[:, 0]  # torchvision's Resize, as the torch loader
            yield x, self.data.labels[indices[k : k + self.batch_size]]
