"""DALI loaders: webdataset tar shards -> each JPEG decoded once -> two geometric uint8 views on the device.

Graph of the training pipeline (one per rank and epoch):

    readers.webdataset(shards in an epoch-seeded order, sample range of this rank, shuffle buffer)
      ├─ jpg ─ decoders.image(device='mixed' on GPU, 'cpu' otherwise)  ── decoded ONCE
      │          ├─ view(t'):  random window, cut (slice), resized + flipped in one resize    → a  uint8 NHWC
      │          └─ view(t''): the same, its own draws                                       → b  uint8 NHWC
      └─ cls ─ ASCII decimal (a leading '-' for an unlabeled set's -1) → int64 on the host  → label
    DALIGenericIterator → torch tensors (views on the training device)

The photometric augmentation is not DALI's: the base class hands both views to the same
`augment.photometric` as every other loader (base.py), so the four loaders train on one distribution.

Reproducibility: the pipeline is rebuilt for every epoch with a seed drawn from (train.seed, epoch, rank)
and the shard order drawn from (train.seed, epoch), so the batches of an epoch depend only on those
numbers and `epoch(e, start_batch=k)` yields the same batches as batches k.. of an uninterrupted epoch e
(same shuffle, same crop draws on the CPU-side random ops; the colours come from the base class's
generator of (seed, epoch, batch index, rank)). DALI cannot skip a batch without running it, so skipping
costs the decode time of the skipped batches once per resume. On the GPU the decoder
splits each batch between the hardware and CUDA decoders by `hw_decoder_load`; the split depends only on
the position in the batch, but the two decoders may differ by a grey level on some pixels, so "same
batches" means same samples and augmentation parameters, and pixels equal to decoder precision.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import converted, datasets
from ..config import AugCfg
from .base import DatasetError, EvalLoader, TrainLoader, eval_crop_ratio, mix_seed

READER_NAME = "shards"
# Labels are stored as ASCII decimal text (webdataset convention); the bytes are zero-padded to this width
# before parsing. Wider than any class index plus trailing whitespace.
LABEL_WIDTH = 12
# Shuffle buffer of the reader, in samples (encoded JPEGs held in host memory).
SHUFFLE_BUFFER = 4096


# ---------------------------------------------------------------------------------------------------------
# The shard folder
# ---------------------------------------------------------------------------------------------------------


class ShardSet:
    """The tar shards of a folder written by data_prep/write_dali.py, validated against meta.json.

    `converted.check_shards` raises a one-line error naming the file for a missing or truncated shard, a
    bad index, or counts that disagree with meta.json; nothing is read from a shard before that passes.
    `labeled` is meta.json's "labeled" (false for an unlabeled set, whose `.cls` members hold -1); a
    folder written before that key existed is labeled when it lists classes.
    """

    def __init__(self, path: str | os.PathLike):
        root = Path(path)
        if not root.is_dir():
            raise DatasetError(f"{root}: DALI shard folder not found")
        meta = converted.check_shards(root)
        # Names only: nothing read from the data points outside the folder.
        self.root = root
        self.tars: list[Path] = [root / Path(s["tar"]).name for s in meta["shards"]]
        self.indexes: list[Path] = [root / Path(s["index"]).name for s in meta["shards"]]
        self.num_samples = int(meta["num_samples"])
        self.classes = meta.get("classes")
        self.labeled = bool(meta.get("labeled", self.classes is None or len(self.classes) > 0))
        if not self.tars:
            raise datasets.CorruptOutputError(f"{root / 'meta.json'}: lists no shards")

    def ordered(self, order: Sequence[int]) -> tuple[list[str], list[str]]:
        return [str(self.tars[i]) for i in order], [str(self.indexes[i]) for i in order]


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """The sample range [start, end) that DALI's reader gives to shard `rank` of `world_size`."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def _device_id(device) -> int | None:
    device = torch.device(device)
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    if device.type != "cpu":
        raise ValueError(f"DALI loader: unsupported device {device}")
    return None


# ---------------------------------------------------------------------------------------------------------
# Graph pieces (called inside a `with pipeline:` block)
# ---------------------------------------------------------------------------------------------------------


def _read(shards: ShardSet, order, rank, world_size, shuffle: bool, seed: int, pad_last_batch: bool):
    from nvidia.dali import fn

    paths, index_paths = shards.ordered(order)
    return fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=["jpg", "cls"],
        missing_component_behavior="error",  # a sample without its label must not read as class 0
        shard_id=rank,
        num_shards=world_size,
        stick_to_shard=True,
        random_shuffle=shuffle,
        initial_fill=SHUFFLE_BUFFER,
        seed=seed,
        pad_last_batch=pad_last_batch,
        name=READER_NAME,
    )


def _parse_label(cls):
    """ASCII decimal bytes, optionally signed and followed by whitespace -> int64 (on the host), by Horner's
    rule over the digits; a '-' anywhere negates (an unlabeled set stores "-1")."""
    from nvidia.dali import fn, types

    digits = fn.cast(fn.pad(cls, shape=[LABEL_WIDTH], fill_value=0), dtype=types.INT64)
    label = types.Constant(0, dtype=types.INT64)
    minus = types.Constant(0, dtype=types.INT64)
    for i in range(LABEL_WIDTH):
        d = digits[i]
        is_digit = (d >= 48) & (d <= 57)  # '0'..'9'; padding and whitespace leave the value as is
        label = label * (1 + 9 * is_digit) + is_digit * (d - 48)
        minus = minus + (d == 45)  # '-'
    return label * (1 - 2 * minus)


def _decode(jpegs, on_gpu: bool, hw_decoder_load: float):
    from nvidia.dali import fn, types

    if on_gpu:
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)


# aug.interpolation -> DALI's filter: with antialiasing, Pillow's bicubic and bilinear (bsim_fast/loaders/resize.py)
DALI_FILTERS = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR"}


def _crop_view(jpegs, images, aug: AugCfg, size: int):
    """One geometric view of a batch of decoded HWC uint8 images: a random resized crop, mirrored with
    probability flip_p. The window is cut first (`fn.slice`), so that the resize reads only its pixels, as
    every loader's crop-then-resize (a resize of a region of the whole image would read a few pixels beyond
    its edges); the resize's region is then the whole cut, its x ends swapped when flipped, so the flip costs
    no pass of its own. Returns (view, anchor, shape, flip): the window drawn (anchor [y, x], shape [h, w],
    int) and the flip (0/1), which tests read back.

    The window comes from DALI's own generator (`fn.random_crop_generator`, the one behind
    `fn.random_resized_crop`): area ~ U(scale), log aspect ~ U(log ratio), ten attempts, position uniform,
    as torchvision; it differs from `base.random_resized_crop_params` in also rejecting an attempt whose
    rounded aspect falls outside the range, and in its fallback (clamped to the ratio range and to the largest
    area, not the whole image)."""
    from nvidia.dali import fn, types

    anchor, shape = fn.random_crop_generator(
        fn.peek_image_shape(jpegs), random_area=list(aug.crop_scale), random_aspect_ratio=list(aug.crop_ratio)
    )
    flip = fn.random.coin_flip(probability=float(aug.flip_p), dtype=types.INT32)
    return resize_window(images, anchor, shape, flip, aug.interpolation, size), anchor, shape, flip


def resize_window(images, anchor, shape, flip, interpolation: str, size: int):
    """The window (anchor [y, x], shape [h, w]) of each image cut, resized to size x size with the filter
    `interpolation` names, mirrored where flip is 1 (see `_crop_view`)."""
    from nvidia.dali import fn, types

    window = fn.slice(images, anchor, shape, axes=[0, 1], normalized_anchor=False, normalized_shape=False)
    mirror = fn.cast(fn.stack(0 * flip, flip), dtype=types.FLOAT)  # [y, x]: x start and end swap when flipped
    return fn.resize(
        window,
        roi_start=mirror,
        roi_end=1.0 - mirror,
        roi_relative=True,
        size=[size, size],
        antialias=True,
        interp_type=getattr(types, DALI_FILTERS[interpolation]),
    )


# ---------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------


def _iterate(pipe, outputs: list[str], policy) -> Iterator[dict]:
    """Runs a built pipeline through DALI's PyTorch iterator (torch tensors on the pipeline's device)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    it = DALIGenericIterator(
        [pipe], outputs, reader_name=READER_NAME, last_batch_policy=policy, auto_reset=False, prepare_first_batch=False
    )
    for batch in it:
        yield batch[0]


def _first_bad_jpeg(shards: ShardSet) -> str | None:
    """`shard.tar: member` of the first .jpg whose bytes do not start with SOI and end with EOI, or None.

    Run only after the pipeline failed, to name the culprit: DALI's decoder error does not carry the
    sample's origin. Reads four bytes per image through the index offsets, so even a large set is quick.
    """
    for tar, idx in zip(shards.tars, shards.indexes):
        with open(tar, "rb") as data:
            for components in converted.read_wds_index(idx):
                for ext, offset, size, name in components:
                    if ext != "jpg":
                        continue
                    data.seek(offset)
                    head = data.read(2)
                    data.seek(offset + max(2, size - 2))
                    if size < 4 or head != b"\xff\xd8" or data.read(2) != b"\xff\xd9":
                        return f"{tar}: {name}"
    return None


def _pipeline_error(shards: ShardSet, err: Exception) -> Exception:
    """One line: the bad shard member when it can be found, else the folder, and DALI's own reason."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    reason = next((lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "encountered:"), None)
    reason = reason or next((ln for ln in lines if not ln.startswith("Critical error")), type(err).__name__)
    culprit = _first_bad_jpeg(shards)  # the header peek or the decoder may be the op that failed
    if culprit:
        return DatasetError(f"{culprit}: not a valid JPEG (DALI: {reason})")
    return RuntimeError(f"{shards.root}: DALI pipeline failed while reading the shards: {reason}")


class DaliTrainLoader(TrainLoader):
    """Two geometric views per image from DALI tar shards (see the module docstring for the graph); the
    base class adds the photometric augmentation."""

    kind = "dali"

    def open(self, path: str):
        self.device_id = _device_id(self.device)
        self.shards = ShardSet(path)
        return self.shards.num_samples, self.shards.labeled

    def _build(self, epoch: int, windows: bool = False):
        """The pipeline of `epoch`; windows=True adds each view's crop window and flip to the outputs."""
        from nvidia.dali import Pipeline

        cfg = self.cfg
        seed = mix_seed(cfg.train.seed, epoch, self.rank, bits=31)
        # Same shard order on every rank (depends on seed and epoch only), so rank ranges stay disjoint.
        order = np.random.default_rng(mix_seed(cfg.train.seed, epoch)).permutation(len(self.shards.tars))
        on_gpu = self.device_id is not None
        pipe = Pipeline(
            batch_size=self.batch_size, num_threads=max(1, self.workers), device_id=self.device_id, seed=seed
        )
        with pipe:
            jpegs, cls = _read(
                self.shards, order, self.rank, self.world_size, shuffle=True, seed=seed, pad_last_batch=False
            )
            images = _decode(jpegs, on_gpu, cfg.data.dali_hw_decoder_load)
            a, *window_a = _crop_view(jpegs, images, cfg.aug, cfg.data.image_size)
            b, *window_b = _crop_view(jpegs, images, cfg.aug, cfg.data.image_size)
            outputs = [a, b, _parse_label(cls)]  # the label stays on the host: training does not read it
            pipe.set_outputs(*(outputs + window_a + window_b + [images] if windows else outputs))
        pipe.build()
        return pipe

    def crops(self, epoch: int, start_batch: int):
        """Batches start_batch.. of the epoch; the skipped ones still run through the pipeline (DALI cannot
        skip unread)."""
        from nvidia.dali.plugin.pytorch import LastBatchPolicy

        if start_batch == len(self):
            return
        pipe = self._build(epoch)
        batches = _iterate(pipe, ["a", "b", "label"], LastBatchPolicy.DROP)
        try:
            for index in range(len(self)):
                try:
                    out = next(batches)
                except (RuntimeError, StopIteration) as err:
                    raise _pipeline_error(self.shards, err) from err
                if index >= start_batch:
                    yield out["a"], out["b"], out["label"]
        finally:
            batches.close()
            del pipe


class DaliEvalLoader(EvalLoader):
    """One centre-cropped view per image; across ranks every sample exactly once (no drop, no padding)."""

    kind = "dali"

    def open(self, path: str):
        self.device_id = _device_id(self.device)
        self.shards = ShardSet(path)
        return self.shards.num_samples, self.shards.labeled

    def shard(self) -> np.ndarray:
        """DALI's reader gives each rank a contiguous range of the file order."""
        return np.arange(*rank_range(self.num_samples, self.rank, self.world_size))

    def _build(self):
        from nvidia.dali import Pipeline, fn

        on_gpu = self.device_id is not None
        size = self.size
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=max(1, self.workers),
            device_id=self.device_id,
            seed=mix_seed(self.cfg.train.seed, self.rank, bits=31),
        )
        with pipe:
            # pad_last_batch repeats the last sample to fill the final batch; the iterator's PARTIAL policy
            # trims those copies again, so each rank returns exactly its range.
            jpegs, cls = _read(
                self.shards,
                range(len(self.shards.tars)),
                self.rank,
                self.world_size,
                shuffle=False,
                seed=0,
                pad_last_batch=True,
            )
            images = _decode(jpegs, on_gpu, self.cfg.data.dali_hw_decoder_load)
            x = fn.resize(images, resize_shorter=round(size / eval_crop_ratio(size)), antialias=True)
            x = fn.crop(x, crop=[size, size])
            pipe.set_outputs(x, _parse_label(cls))
        pipe.build()
        return pipe

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import LastBatchPolicy

        pipe = self._build()
        batches = _iterate(pipe, ["x", "label"], LastBatchPolicy.PARTIAL)
        seen, mine = 0, len(self.indices)
        try:
            while True:
                try:
                    out = next(batches)
                except StopIteration:
                    break
                except RuntimeError as err:
                    raise _pipeline_error(self.shards, err) from err
                # The iterator sizes every rank's epoch by the largest rank range, so the smaller ranks see
                # an extra empty (or padded) batch at the end: keep only this rank's own samples.
                keep = min(out["label"].shape[0], mine - seen)
                if keep > 0:
                    seen += keep
                    yield out["x"][:keep], out["label"][:keep]
        finally:
            batches.close()
            del pipe
        if seen != mine:  # a DALI change in padding semantics must not go unnoticed
            raise RuntimeError(f"{self.shards.root}: rank {self.rank} read {seen} samples, expected {mine}")
