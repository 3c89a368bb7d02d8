"""FFCV loaders: one JPEG decode, two random resized crops, photometric on the device (base.py).

ffcv 1.0.2 cannot feed one field to two pipelines, and decoding twice costs the JPEG decode (the bulk of
the CPU time) twice. `TwoViewCropDecoder` decodes each image once into a scratch buffer and writes both
views from it: uint8 (2, S, S, 3) per sample, compiled by numba like ffcv's own decoders.

Reproducibility. ffcv hands compiled code only the batch's sample indices (numba freezes anything closed
over at compile time), and its decoders draw crops from numba's per-thread np.random, whose state depends
on which worker thread got which sample. Here the crops come from a counter-based hash instead:
splitmix64(seed, epoch, sample index, view, draw number) gives the uniforms that the crop reference
(`base.random_resized_crop_params`, compiled by numba) takes, so a sample's two crops and flips depend on
(seed, epoch, index) only, whatever the thread count, batch composition or start_batch. The epoch reaches
the compiled code in the high bits of each index (`_EPOCH_SHIFT`); the labels are therefore not decoded by
ffcv (its IntDecoder would read the salted index) but gathered from the .beton's metadata in Python, and
stay on the host.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import replace

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.transforms import Squeeze, ToDevice, ToTensor

from .. import converted, datasets
from .base import (
    CROP_ATTEMPTS,
    DatasetError,
    EvalLoader,
    TrainLoader,
    eval_crop_ratio,
    mix_seed,
    random_resized_crop_params,
)
from .resize import compiled_resize_crop, filter_code


def _quiet_numba_finalizer_keyerror() -> None:
    """Drop one known-harmless message. ffcv compiles a numba dispatcher per Loader; when a discarded Loader's
    reference cycle is collected, the collector clears the dispatcher's `overloads` dict before numba's
    weakref finalizer iterates it, which then raises KeyError. That finalizer only releases compiled-code
    references of an object already being freed, so nothing is lost. Every other unraisable error passes."""
    previous = sys.unraisablehook

    def hook(unraisable):
        exc, tb = unraisable.exc_value, unraisable.exc_traceback
        frames = traceback.extract_tb(tb) if tb is not None else []
        if (
            isinstance(exc, KeyError)
            and frames
            and frames[-1].filename.endswith(os.path.join("numba", "core", "dispatcher.py"))
            and frames[-1].name == "finalizer"
        ):
            return
        previous(unraisable)

    sys.unraisablehook = hook


_quiet_numba_finalizer_keyerror()

_EPOCH_SHIFT = np.uint64(40)  # up to 2^40 samples, 2^24 distinct epoch salts
_INDEX_MASK = np.uint64((1 << 40) - 1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x):
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _make_uniform(splitmix):
    def uniform(key, counter):
        """The counter-th uniform in [0, 1) of the stream named by key (53 random bits)."""
        return np.float64(splitmix(key + np.uint64(counter) * _GOLDEN) >> np.uint64(11)) * (1.0 / 9007199254740992.0)

    return uniform


def _make_view_params(uniform, crop_params):
    def view_params(key, height, width, scale, ratio, flip_p, uniforms):
        """Crop box and flip of one view: the crop reference fed with the uniforms of the stream `key`
        (draw 4k + d is attempt k's draw d, draw 40 the flip). `uniforms` is a float64 [10, 4] scratch."""
        for k in range(CROP_ATTEMPTS):
            for d in range(4):
                uniforms[k, d] = uniform(key, 4 * k + d)
        top, left, h, w = crop_params(height, width, scale, ratio, uniforms)
        return top, left, h, w, uniform(key, 4 * CROP_ATTEMPTS) < flip_p

    return view_params


class TwoViewCropDecoder(SimpleRGBImageDecoder):
    """RGBImageField -> uint8 (2, S, S, 3): one decode, two random resized crops with horizontal flips.

    Subclasses SimpleRGBImageDecoder so that ffcv accepts it as the field's decoder. Modelled on ffcv's
    ResizedCropRGBImageDecoder: the full image is decoded into a per-sample scratch buffer (sized for the
    largest image of the file), then each view is cut and resized from it by `resize.resize_crop` with the
    filter `interpolation` names (libffcv's own resize is OpenCV's INTER_AREA only), flipped as it is written."""

    def __init__(
        self,
        output_size: int,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        flip_p: float = 0.5,
        seed: int = 0,
        interpolation: str = "bicubic",
    ):
        super().__init__()
        self.output_size = int(output_size)
        self.scale = np.array(scale, dtype=np.float64)
        self.ratio = np.array(ratio, dtype=np.float64)
        self.flip_p = float(flip_p)
        self.seed_key = np.uint64(mix_seed(seed, bits=64))
        self.filter_code = filter_code(interpolation)

    def declare_state_and_memory(self, previous_state):
        max_width = np.uint64(self.metadata["width"].max())
        max_height = np.uint64(self.metadata["height"].max())
        shape = (2, self.output_size, self.output_size, 3)
        u8 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
            (AllocationQuery(shape, u8), AllocationQuery((max_height * max_width * np.uint64(3),), u8)),
        )

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = compiled_resize_crop(Compiler.compile)
        splitmix = Compiler.compile(_splitmix64)
        view_params = Compiler.compile(
            _make_view_params(Compiler.compile(_make_uniform(splitmix)), Compiler.compile(random_resized_crop_params))
        )
        jpg = IMAGE_MODES["jpg"]
        scale, ratio, flip_p, seed_key, code = self.scale, self.ratio, self.flip_p, self.seed_key, self.filter_code
        index_mask = _INDEX_MASK

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch = my_storage
            for dst_ix in my_range(len(batch_indices)):
                entry = np.uint64(batch_indices[dst_ix])  # (epoch salt << 40) | sample index
                field = metadata[entry & index_mask]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.int64(field["height"])
                width = np.int64(field["width"])
                if field["mode"] == jpg:
                    image = scratch[dst_ix]
                    imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                sample_key = splitmix(seed_key ^ entry)
                uniforms = np.empty((CROP_ATTEMPTS, 4), dtype=np.float64)
                for v in range(2):
                    i, j, h, w, flip = view_params(
                        splitmix(sample_key + np.uint64(v)), height, width, scale, ratio, flip_p, uniforms
                    )
                    resize_crop_c(image, i, j, h, w, destination[dst_ix, v], code, flip)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


@contextlib.contextmanager
def keep_torch_threads():
    """ffcv's Loader (construction and iteration) sets torch's intra-op threads of the calling thread to its
    worker count (`Compiler.set_num_threads`), silently overriding the trainer's choice: on a small busy
    machine 2 threads instead of 1 made the CPU photometric step 15x slower. Put the count back."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _to_device(device: torch.device) -> list:
    """ToDevice for an accelerator (pinned buffers, async copy); on CPU it would only add a copy."""
    return [] if device.type == "cpu" else [ToDevice(device, non_blocking=True)]


def _field_index(reader, name: str, path: str) -> int:
    names = list(reader.handlers)
    if name not in names:
        raise DatasetError(
            f"{path}: .beton has fields {names}, expected '{name}' (write it with data_prep/write_ffcv.py)"
        )
    return names.index(name)


def _labels(path: str) -> np.ndarray:
    """The label of every sample, from the .beton's metadata (no decoding)."""
    from ffcv.reader import Reader

    reader = Reader(path)
    _field_index(reader, "image", path)
    return np.ascontiguousarray(reader.metadata[f"f{_field_index(reader, 'label', path)}"]).astype(np.int64)


class FfcvTrainLoader(TrainLoader):
    """Two augmented views per image from a .beton; see the module docstring for what is reproducible."""

    kind = "ffcv"

    def open(self, path: str):
        cfg = self.cfg
        converted.check_beton(path)  # names the file if it is truncated, instead of ffcv's garbage pointers
        self.labels = _labels(path)
        aug = cfg.aug
        decoder = TwoViewCropDecoder(
            cfg.data.image_size, aug.crop_scale, aug.crop_ratio, aug.flip_p, self.seed, aug.interpolation
        )
        # The order given to ffcv here is never used: crops() hands EpochIterator its own (rank_order).
        with keep_torch_threads():
            self._loader = Loader(
                path,
                batch_size=self.batch_size,
                num_workers=max(1, self.workers),
                order=OrderOption.SEQUENTIAL,
                os_cache=True,
                drop_last=True,
                seed=self.seed,
                pipelines={"image": [decoder, ToTensor()] + _to_device(self.device), "label": None},
            )
        return len(self.labels), datasets.labeled_from_labels(self.labels, path)

    def crops(self, epoch: int, start_batch: int):
        order = self.order(epoch, start_batch)
        if len(order) == 0:
            return
        salted = order.astype(np.uint64) | (np.uint64(epoch & 0xFFFFFF) << _EPOCH_SHIFT)
        batches = EpochIterator(self._loader, salted)
        try:
            for b, (views_u8,) in enumerate(batches):
                labels = torch.from_numpy(self.labels[order[b * self.batch_size : (b + 1) * self.batch_size]])
                yield views_u8[:, 0], views_u8[:, 1], labels
        finally:
            batches.close()


class FfcvEvalLoader(EvalLoader):
    """One centre-cropped view per sample, in file order, each sample exactly once over the ranks."""

    kind = "ffcv"

    def open(self, path: str):
        num_samples = converted.check_beton(path)
        self._loader = None
        return num_samples, datasets.labeled_from_labels(_labels(path), path)

    def batches(self):
        size = self.size
        with keep_torch_threads():
            if self._loader is None:  # built at the first pass (it needs self.indices), reused by the next
                self._loader = Loader(
                    self.path,
                    batch_size=self.batch_size,
                    num_workers=max(1, self.workers),
                    order=OrderOption.SEQUENTIAL,
                    os_cache=True,
                    drop_last=False,
                    indices=self.indices,
                    pipelines={
                        "image": [CenterCropRGBImageDecoder((size, size), eval_crop_ratio(size)), ToTensor()]
                        + _to_device(self.device),
                        "label": [IntDecoder(), ToTensor(), Squeeze()],
                    },
                )
            batches = iter(self._loader)
        # ffcv reuses its output buffers a few batches later: hand out tensors the caller may keep
        for x_u8, labels in batches:
            yield x_u8.clone(), labels.reshape(-1).long().clone()
