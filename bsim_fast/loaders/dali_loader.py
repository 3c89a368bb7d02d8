"""DALI loaders: webdataset tar shards -> each JPEG decoded once -> two augmented uint8 views on the device.

Graph of the training pipeline (one per rank and epoch):

    readers.webdataset(shards in an epoch-seeded order, sample range of this rank, shuffle buffer)
      ├─ jpg ─ decoders.image(device='mixed' on GPU, 'cpu' otherwise)  ── decoded ONCE
      │          ├─ view(t'):  random_resized_crop → flip → colour jitter (p) → grayscale (p)
      │          │             → gaussian blur (blur_p[0]) → solarize (solarize_p[0])      → a  uint8 NHWC
      │          └─ view(t''): same ops, blur_p[1] / solarize_p[1]                          → b  uint8 NHWC
      └─ cls ─ ASCII digits → int64 with a few arithmetic ops                               → label
    DALIGenericIterator → torch tensors on the training device

Every "with probability p" op is applied to the whole batch with per-sample parameters that are the
identity for the samples whose coin came up 0 (jitter factors 1 and hue 0, a 1-tap blur window, a zero
XOR mask, a zero gray blend weight). That is exact, costs no batch split, and keeps the graph static.

Reproducibility: the pipeline is rebuilt for every epoch with a seed drawn from (train.seed, epoch, rank)
and the shard order drawn from (train.seed, epoch), so the batches of an epoch depend only on those
numbers and `epoch(e, start_batch=k)` yields the same batches as batches k.. of an uninterrupted epoch e
(same shuffle, same augmentation draws on the CPU-side random ops). DALI cannot skip a batch without
running it, so skipping costs the time of the skipped batches once per resume. On the GPU the decoder
splits each batch between the hardware and CUDA decoders by `hw_decoder_load`; the split depends only on
the position in the batch, but the two decoders may differ by a grey level on some pixels, so "same
batches" means same samples and augmentation parameters, and pixels equal to decoder precision.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from bsim_fast import datasets
from bsim_fast.config import AugCfg, Config
from bsim_fast.loaders import REPO_ROOT, _builtin_split, eval_crop_ratio, per_rank_batch

READER_NAME = "shards"
# Where data_prep/write_dali.py puts the built-in set ("builtin" / "builtin:test" in the config).
BUILTIN_SHARDS = "data_out/cifar10_mini_{split}_dali"
# Labels are stored as ASCII decimal text (webdataset convention); the bytes are zero-padded to this width
# before parsing. Wider than any class index plus trailing whitespace.
LABEL_WIDTH = 12
# Shuffle buffer of the reader, in samples (encoded JPEGs held in host memory).
SHUFFLE_BUFFER = 4096


# ---------------------------------------------------------------------------------------------------------
# The shard folder
# ---------------------------------------------------------------------------------------------------------

def resolve_shard_folder(path: str) -> Path:
    """A shard folder from the config: a path, or the built-in set's conventional folder."""
    split = _builtin_split(path)
    if split is None:
        return Path(path)
    folder = BUILTIN_SHARDS.format(split=split)
    for candidate in (Path(folder), REPO_ROOT / folder):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"data path {path!r} with data.loader=dali needs the shards in {folder}: run "
                            f"`python data_prep/write_dali.py --split {split}` (writes {folder})")


class ShardSet:
    """The tar shards of a folder written by data_prep/write_dali.py, validated against meta.json.

    `datasets.check_shards` raises a one-line error naming the file for a missing or truncated shard, a
    bad index, or counts that disagree with meta.json; nothing is read from a shard before that passes.
    """

    def __init__(self, path: str | os.PathLike):
        root = resolve_shard_folder(str(path))
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: DALI shard folder not found")
        meta = datasets.check_shards(root)
        # Names only: nothing read from the data points outside the folder.
        self.root = root
        self.tars: List[Path] = [root / Path(s["tar"]).name for s in meta["shards"]]
        self.indexes: List[Path] = [root / Path(s["index"]).name for s in meta["shards"]]
        self.num_samples = int(meta["num_samples"])
        self.classes = meta.get("classes")
        if not self.tars:
            raise datasets.CorruptOutputError(f"{root / 'meta.json'}: lists no shards")

    def ordered(self, order: Sequence[int]) -> Tuple[List[str], List[str]]:
        return [str(self.tars[i]) for i in order], [str(self.indexes[i]) for i in order]


def rank_range(num_samples: int, rank: int, world_size: int) -> Tuple[int, int]:
    """The sample range [start, end) that DALI's reader gives to shard `rank` of `world_size`."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def _seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from small integers (DALI wants a non-negative int)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def _device_id(device) -> Optional[int]:
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
        paths=paths, index_paths=index_paths, ext=["jpg", "cls"],
        missing_component_behavior="error",      # a sample without its label must not read as class 0
        shard_id=rank, num_shards=world_size, stick_to_shard=True,
        random_shuffle=shuffle, initial_fill=SHUFFLE_BUFFER, seed=seed,
        pad_last_batch=pad_last_batch, name=READER_NAME)


def _parse_label(cls):
    """ASCII decimal bytes (optionally followed by whitespace) -> int64, by Horner's rule over the digits."""
    from nvidia.dali import fn, types

    digits = fn.cast(fn.pad(cls, shape=[LABEL_WIDTH], fill_value=0), dtype=types.INT64)
    label = types.Constant(0, dtype=types.INT64)
    for i in range(LABEL_WIDTH):
        d = digits[i]
        is_digit = (d >= 48) & (d <= 57)          # '0'..'9'; padding and whitespace leave the value as is
        label = label * (1 + 9 * is_digit) + is_digit * (d - 48)
    return label


def _decode(jpegs, on_gpu: bool, hw_decoder_load: float):
    from nvidia.dali import fn, types

    if on_gpu:
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)


def _coin(p: float, dtype):
    from nvidia.dali import fn

    return fn.random.coin_flip(probability=float(p), dtype=dtype)


def _jitter_factor(on, strength: float):
    """Per-sample factor ~ U[max(0, 1-s), 1+s] where `on`, exactly 1 elsewhere (torchvision's ColorJitter)."""
    from nvidia.dali import fn

    if strength <= 0:
        return 1.0
    return 1.0 + on * (fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength]) - 1.0)


def _view(images, aug: AugCfg, size: int, blur_p: float, solarize_p: float, on_gpu: bool):
    """One augmented view (BYOL's t' or t'') of a batch of decoded HWC uint8 images, uint8 HWC out."""
    from nvidia.dali import fn, math as dmath, types

    # Per-sample switches are drawn on the CPU; the pixel arithmetic that uses them runs where the images are.
    to_dev = (lambda node: node.gpu()) if on_gpu else (lambda node: node)

    x = fn.random_resized_crop(images, size=[size, size], random_area=list(aug.crop_scale),
                               random_aspect_ratio=list(aug.crop_ratio), antialias=True)
    if aug.flip_p > 0:
        x = fn.flip(x, horizontal=_coin(aug.flip_p, types.INT32))

    if aug.jitter_p > 0:
        # One colour_twist applies brightness, contrast, saturation and hue together in a fixed order
        # (torchvision shuffles the order per sample); factors of 1 and hue 0 leave pixels unchanged.
        on = _coin(aug.jitter_p, types.INT32)
        hue_deg = 360.0 * aug.hue                # torchvision's hue is a fraction of the colour wheel
        hue = on * fn.random.uniform(range=[-hue_deg, hue_deg]) if aug.hue > 0 else 0.0
        x = fn.color_twist(x, brightness=_jitter_factor(on, aug.brightness),
                           contrast=_jitter_factor(on, aug.contrast),
                           saturation=_jitter_factor(on, aug.saturation), hue=hue)

    if aug.gray_p > 0:
        # x + g*(y - x) in uint8 wraps around modulo 256, so it is exactly y where g = 1 and x where g = 0;
        # the one-channel luma broadcasts over the three colour channels.
        gray = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
        x = x + to_dev(_coin(aug.gray_p, types.UINT8)) * (gray - x)

    if blur_p > 0:
        # A 1-tap window is the identity; samples that blur get DALI's own window for their sigma.
        lo, hi = aug.blur_sigma
        on = _coin(blur_p, types.INT32)
        if hi > lo:
            sigma = fn.random.uniform(range=[lo, hi])
            window = fn.cast(1.0 + on * 2.0 * dmath.ceil(3.0 * sigma), dtype=types.INT32)
        else:
            sigma = float(lo)
            window = fn.cast(1.0 + on * 2.0 * math.ceil(3.0 * lo), dtype=types.INT32)
        x = fn.gaussian_blur(x, sigma=sigma, window_size=window)

    if solarize_p > 0:
        # Solarize at 128: 255 - v == v ^ 0xFF for uint8, so XOR with a mask that is 0xFF where it applies.
        on = to_dev(_coin(solarize_p, types.UINT8))
        x = x ^ ((x >= 128) * on * types.Constant(255, dtype=types.UINT8))
    return x


# ---------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------

def _iterate(pipe, outputs: List[str], policy) -> Iterator[dict]:
    """Runs a built pipeline through DALI's PyTorch iterator (torch tensors on the pipeline's device)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    it = DALIGenericIterator([pipe], outputs, reader_name=READER_NAME, last_batch_policy=policy,
                             auto_reset=False, prepare_first_batch=False)
    for batch in it:
        yield batch[0]


def _first_bad_jpeg(shards: ShardSet) -> Optional[str]:
    """`shard.tar: member` of the first .jpg whose bytes do not start with SOI and end with EOI, or None.

    Run only after the pipeline failed, to name the culprit: DALI's decoder error does not carry the
    sample's origin. Reads four bytes per image through the index offsets, so even a large set is quick.
    """
    for tar, idx in zip(shards.tars, shards.indexes):
        with open(tar, "rb") as data:
            for components in datasets.read_wds_index(idx):
                for ext, offset, size, name in components:
                    if ext != "jpg":
                        continue
                    data.seek(offset)
                    head = data.read(2)
                    data.seek(offset + max(2, size - 2))
                    if size < 4 or head != b"\xff\xd8" or data.read(2) != b"\xff\xd9":
                        return f"{tar}: {name}"
    return None


def _pipeline_error(shards: ShardSet, err: Exception) -> RuntimeError:
    """One line: the bad shard member when it can be found, else the folder, and DALI's own reason."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    reason = next((lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "encountered:"), None)
    reason = reason or next((ln for ln in lines if not ln.startswith("Critical error")), type(err).__name__)
    culprit = _first_bad_jpeg(shards) if "decoder" in str(err) else None
    if culprit:
        return RuntimeError(f"{culprit}: not a valid JPEG (DALI: {reason})")
    return RuntimeError(f"{shards.root}: DALI pipeline failed while reading the shards: {reason}")


class DaliTrainLoader:
    """Two augmented views per image from DALI tar shards; see the module docstring for the graph."""

    def __init__(self, cfg: Config, rank: int, world_size: int, device):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.device_id = _device_id(self.device)
        self.shards = ShardSet(cfg.data.train)
        self.batch_size = per_rank_batch(cfg, world_size)
        # Every rank runs the same number of steps: the smallest rank range sets the epoch length.
        smallest = self.shards.num_samples // world_size
        self._len = smallest // self.batch_size
        if self._len == 0:
            raise ValueError(f"{self.shards.root}: {smallest} samples per rank is less than one batch "
                             f"of {self.batch_size}")

    def __len__(self) -> int:
        return self._len

    def _build(self, epoch: int):
        from nvidia.dali import Pipeline

        cfg = self.cfg
        seed = _seed(cfg.train.seed, epoch, self.rank)
        # Same shard order on every rank (depends on seed and epoch only), so rank ranges stay disjoint.
        order = np.random.default_rng(_seed(cfg.train.seed, epoch)).permutation(len(self.shards.tars))
        on_gpu = self.device_id is not None
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, cfg.data.workers),
                        device_id=self.device_id, seed=seed)
        with pipe:
            jpegs, cls = _read(self.shards, order, self.rank, self.world_size, shuffle=True,
                               seed=seed, pad_last_batch=False)
            images = _decode(jpegs, on_gpu, cfg.data.dali_hw_decoder_load)
            aug, size = cfg.aug, cfg.data.image_size
            a = _view(images, aug, size, aug.blur_p[0], aug.solarize_p[0], on_gpu)
            b = _view(images, aug, size, aug.blur_p[1], aug.solarize_p[1], on_gpu)
            label = _parse_label(cls)
            pipe.set_outputs(a, b, label.gpu() if on_gpu else label)
        pipe.build()
        return pipe

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Exactly len(self) - start_batch batches of (a_u8, b_u8, labels) for `epoch`, on the device.

        Batches start_batch.. are those an uninterrupted call would yield from that point (see the module
        docstring); the skipped batches still run through the pipeline, DALI cannot skip unread.
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch = {start_batch} is not in [0, {len(self)}]")
        return self._batches(epoch, start_batch)

    def _batches(self, epoch: int, start_batch: int):
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


class DaliEvalLoader:
    """One centre-cropped view per image; across ranks every sample exactly once (no drop, no padding)."""

    def __init__(self, cfg: Config, path, rank: int, world_size: int, device):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device_id = _device_id(device)
        self.shards = ShardSet(path)
        self.batch_size = per_rank_batch(cfg, world_size)
        start, end = rank_range(self.shards.num_samples, rank, world_size)
        self.num_samples = end - start             # this rank's share

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def _build(self):
        from nvidia.dali import Pipeline, fn

        on_gpu = self.device_id is not None
        size = self.cfg.data.image_size
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, self.cfg.data.workers),
                        device_id=self.device_id, seed=_seed(self.cfg.train.seed, self.rank))
        with pipe:
            # pad_last_batch repeats the last sample to fill the final batch; the iterator's PARTIAL policy
            # trims those copies again, so each rank returns exactly its range.
            jpegs, cls = _read(self.shards, range(len(self.shards.tars)), self.rank, self.world_size,
                               shuffle=False, seed=0, pad_last_batch=True)
            images = _decode(jpegs, on_gpu, self.cfg.data.dali_hw_decoder_load)
            x = fn.resize(images, resize_shorter=round(size / eval_crop_ratio(size)), antialias=True)
            x = fn.crop(x, crop=[size, size])
            label = _parse_label(cls)
            pipe.set_outputs(x, label.gpu() if on_gpu else label)
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import LastBatchPolicy

        pipe = self._build()
        batches = _iterate(pipe, ["x", "label"], LastBatchPolicy.PARTIAL)
        seen = 0
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
                keep = min(out["label"].shape[0], self.num_samples - seen)
                if keep > 0:
                    seen += keep
                    yield out["x"][:keep], out["label"][:keep]
        finally:
            batches.close()
            del pipe
        if seen != self.num_samples:     # a DALI change in padding semantics must not go unnoticed
            raise RuntimeError(f"{self.shards.root}: rank {self.rank} read {seen} samples, expected {self.num_samples}")
