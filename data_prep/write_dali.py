"""Write tar shards in webdataset layout, with the index files DALI's fn.readers.webdataset takes.

    python data_prep/write_dali.py                          # built-in train -> data_out/cifar10_mini_train_dali/
    python data_prep/write_dali.py --source DIR --output out_dir --shard-size 10000
    python data_prep/write_dali.py --source PHOTOS --no-labels --output photos_dali

Output folder:
    shard-000000.tar ...   members <key>.jpg (RGB baseline JPEG) and <key>.cls (label, ASCII decimal; "-1"
                           in an unlabeled set); key = the sample's zero-padded position in the output, never
                           a name from the data
    shard-000000.idx ...   one index per shard, DALI's wds2idx format (pass as index_paths=)
    meta.json              num_samples, labeled, classes ([] when unlabeled), shards (with sizes, so a
                           truncated shard is detected)

Same sources, options, progress, bad-input policy and atomic output as write_ffcv.py (data_prep/common.py).
A JPEG that is already RGB, baseline, upright and within --max-resolution is stored byte for byte;
everything else is decoded and re-encoded at --jpeg-quality.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import re
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bsim_fast import converted, datasets  # noqa: E402
from data_prep import common  # noqa: E402
from data_prep.common import ConversionError  # noqa: E402

DEFAULT_SHARD_SIZE = 10_000  # ~1 GB of ImageNet-sized JPEGs per shard
KEY_DIGITS = 9
INDEX_VERSION = "v1.2"  # what DALI's wds2idx writes and fn.readers.webdataset reads


def build_parser() -> argparse.ArgumentParser:
    parser = common.build_arg_parser(
        __doc__.strip().splitlines()[0], "the folder of shards to write (default: data_out/<dataset>[_subsetN]_dali)"
    )
    parser.add_argument(
        "--shard-size",
        type=common.int_at_least(1),
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help="samples per tar shard (default: %(default)s)",
    )
    parser.add_argument(
        "--order",
        choices=("shuffled", "source"),
        default="shuffled",
        help="sample order in the shards: shuffled (fixed seed) or as in the source (default: %(default)s)",
    )
    return parser


def default_output(name: str, subset: int | None) -> Path:
    return common.data_out() / f"{name}{f'_subset{subset}' if subset else ''}_dali"


OUR_FILES = re.compile(r"meta\.json|shard-[0-9]{6}\.(tar|idx)")


def looks_like_shards(folder: Path) -> bool:
    """An output --overwrite may replace: a folder holding nothing but what this converter writes."""
    return all(OUR_FILES.fullmatch(entry.name) for entry in folder.iterdir())


class ShardWriter:
    """Appends samples to numbered tar shards and writes each shard's DALI index as it closes."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder = folder
        self.shard_size = shard_size
        self.count = 0
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._index_lines: list[str] = []

    def add(self, jpeg: bytes, label: int) -> None:
        if self._tar is None or len(self._index_lines) == self.shard_size:
            self._close_shard()
            self._open_shard()
        key = f"{self.count:0{KEY_DIGITS}d}"
        components = [
            self._add_member(f"{key}.{ext}", data) for ext, data in (("jpg", jpeg), ("cls", str(label).encode("ascii")))
        ]
        self._index_lines.append(" ".join(components))
        self.count += 1

    def close(self) -> None:
        self._close_shard()

    def _open_shard(self) -> None:
        number = len(self.shards)
        self.shards.append({"tar": f"shard-{number:06d}.tar", "index": f"shard-{number:06d}.idx"})
        # USTAR: every member header is exactly one 512-byte block (our names are short ASCII).
        self._tar = tarfile.open(self.folder / self.shards[-1]["tar"], "w", format=tarfile.USTAR_FORMAT)

    def _add_member(self, name: str, data: bytes) -> str:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # reproducible shards
        header_at = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        data_at = header_at + tarfile.BLOCKSIZE
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        assert self._tar.offset == data_at + padded, "unexpected tar header size"
        return f"{name.rsplit('.', 1)[1]} {data_at} {len(data)} {name}"

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        shard = self.shards[-1]
        index_text = f"{INDEX_VERSION} {len(self._index_lines)}\n" + "\n".join(self._index_lines) + "\n"
        (self.folder / shard["index"]).write_text(index_text, encoding="ascii")
        shard["num_samples"] = len(self._index_lines)
        shard["bytes"] = (self.folder / shard["tar"]).stat().st_size
        self._tar = None
        self._index_lines = []


def _prepare_jpeg(max_resolution: int, quality: int, source: datasets.Source, i: int):
    return common.load_jpeg(source, i, max_resolution, quality)


def convert(args: argparse.Namespace) -> dict:
    output, source = common.output_and_source(
        args, lambda name: default_output(name, args.subset), directory=True, is_ours=looks_like_shards
    )
    indices = common.subset_indices(len(source), args.subset)
    if args.order == "shuffled":
        # DALI reads a shard sequentially through a bounded shuffle buffer: shards in class order would give
        # batches of a few classes (bad for BatchNorm, SimCLR's negatives and BSIM's partners)
        indices = np.random.default_rng(0).permutation(indices)
    prepare = functools.partial(_prepare_jpeg, args.max_resolution, args.jpeg_quality)

    run = common.Conversion(source, output, len(indices), args.strict, desc="converting")
    passed_through = 0
    try:
        with run.install(directory=True) as tmp:
            shards = ShardWriter(tmp, args.shard_size)
            with contextlib.closing(common.map_samples(source, indices, prepare, args.workers)) as results:
                for i, payload, reason in results:
                    run.progress.update(1)
                    if reason is not None:
                        run.skip(i, reason)
                        continue
                    jpeg, untouched = payload
                    shards.add(jpeg, source.label(i))
                    passed_through += untouched
            shards.close()
            if shards.count == 0:
                raise ConversionError(f"no usable images in {args.source} ({len(run.skipped)} skipped)")
            meta = {
                "format": "webdataset",
                "num_samples": shards.count,
                "labeled": source.labeled,
                "classes": source.classes,
                "image_member": "jpg",
                "label_member": "cls",
                "label_encoding": "ascii-decimal",
                "index_format": f"DALI wds2idx {INDEX_VERSION}",
                "max_resolution": args.max_resolution,
                "jpeg_quality": args.jpeg_quality,
                "shards": shards.shards,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            converted.check_shards(tmp)
            run.written = shards.count
            run.extra.update(
                format="dali-webdataset",
                shards=len(shards.shards),
                jpeg_passed_through=passed_through,
                jpeg_reencoded=shards.count - passed_through,
            )
    finally:
        run.close()
    return run.summary


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_cli(convert, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
