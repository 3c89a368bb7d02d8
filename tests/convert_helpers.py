"""Readers the converter tests check outputs with: real FFCV and a CPU-only DALI pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bsim_fast import converted


def decode_cls(raw: np.ndarray | bytes) -> int:
    """A `.cls` member (ASCII decimal, the webdataset convention) as DALI returns it (uint8 array) -> int."""
    return int(bytes(np.asarray(raw, dtype=np.uint8)).decode("ascii").strip())


def read_beton(path: Path, image_decoder=None):
    """All (images, labels) of a .beton in file order, the last partial batch included."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    converted.check_beton(path)
    loader = Loader(
        str(path),
        batch_size=64,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,  # FFCV's default (True) would drop the last 8 of 200
        pipelines={"image": [image_decoder or SimpleRGBImageDecoder()], "label": [IntDecoder()]},
    )
    images, labels = [], []
    for batch_images, batch_labels in loader:
        images.append(np.array(batch_images))
        labels.append(np.array(batch_labels).reshape(-1))
    return np.concatenate(images), np.concatenate(labels)


def read_shards_with_dali(folder: Path):
    """All (images, labels) of a shard folder through a CPU-only DALI pipeline with our index files."""
    from nvidia.dali import fn, pipeline_def, types

    meta = converted.check_shards(folder)
    tars = [str(folder / s["tar"]) for s in meta["shards"]]
    indexes = [str(folder / s["index"]) for s in meta["shards"]]

    @pipeline_def(batch_size=64, num_threads=1, device_id=None)
    def pipeline():
        jpegs, labels = fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=["jpg", "cls"], missing_component_behavior="error", name="reader"
        )
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), labels

    pipe = pipeline()
    pipe.build()
    total = pipe.epoch_size("reader")
    images, labels = [], []
    while len(images) < total:  # DALI fills the last batch by wrapping around: keep exactly one epoch
        batch_images, batch_labels = pipe.run()
        for k in range(len(batch_images)):
            if len(images) < total:
                images.append(np.array(batch_images.at(k)))
                labels.append(decode_cls(batch_labels.at(k)))
    return images, np.array(labels), meta


def tmp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)
