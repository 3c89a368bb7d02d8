"""Write an FFCV .beton (fields `image`: RGBImageField, `label`: IntField; label -1 for an unlabeled set).

    python data_prep/write_ffcv.py                      # built-in train split -> data_out/cifar10_mini_train.beton
    python data_prep/write_ffcv.py --split test         # -> data_out/cifar10_mini_test.beton
    python data_prep/write_ffcv.py --source DIR --output out.beton --write-mode jpg --max-resolution 256
    python data_prep/write_ffcv.py --source PHOTOS --no-labels --output photos.beton

FFCV's DatasetWriter needs an indexable dataset whose items never fail (a failing item leaves its
progress loop waiting forever), so every sample is decoded once in parallel first and only the good ones
are handed to the writer, which decodes them again in its own workers. A worker that still fails
(a file changed in between, a full disk) is reported and stops the run instead of hanging it.

A .beton holds only images and labels; whether the set is labelled is in `<output>.summary.json`
("labeled") and in the labels themselves (all -1: `bsim_fast.datasets.labeled_from_labels`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import multiprocessing
import os
import queue
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bsim_fast import atomic, converted, datasets  # noqa: E402
from data_prep import common  # noqa: E402
from data_prep.common import ConversionError  # noqa: E402

WRITE_MODES = ("smart", "jpg", "raw", "proportion")
# 'smart' stores an image raw while raw is small (fast to load, lossless) and as JPEG above this many bytes.
DEFAULT_SMART_THRESHOLD = 256 * 256 * 3
MIN_PAGE_SIZE = 1 << 21  # FFCV's smallest page (2 MiB); pages are powers of two
# Each writer process fills pages of its own and ends on a partly filled one that is written whole, so a
# .beton carries up to one page of padding per writer (8 writers made the built-in train split 27.4 MB instead
# of 19.0 MB; README "Your own images"): writers are limited to one per this many pages of data, which keeps
# that padding under ~1/16 of the data.
PAGES_PER_WRITER = 16
# Only to size the number of writers: a JPEG at quality ~90 is roughly this fraction of the raw pixels.
JPEG_FRACTION_OF_RAW = 1 / 8


def build_parser() -> argparse.ArgumentParser:
    parser = common.build_arg_parser(
        __doc__.strip().splitlines()[0], "the .beton to write (default: data_out/<dataset>[_subsetN].beton)"
    )
    parser.add_argument(
        "--write-mode",
        choices=WRITE_MODES,
        default="smart",
        help="how images are stored: raw pixels, JPEG, a random 'proportion' as JPEG, "
        "or 'smart' (raw while raw is below --smart-threshold bytes) (default: %(default)s)",
    )
    parser.add_argument(
        "--compress-probability",
        type=float,
        default=0.5,
        metavar="P",
        help="with --write-mode proportion: probability that an image is stored as JPEG (default: %(default)s)",
    )
    parser.add_argument(
        "--smart-threshold",
        type=int,
        default=DEFAULT_SMART_THRESHOLD,
        metavar="BYTES",
        help="with --write-mode smart: raw size above which an image is stored as JPEG (default: %(default)s)",
    )
    return parser


def default_output(name: str, subset: int | None) -> Path:
    return common.data_out() / f"{name}{f'_subset{subset}' if subset else ''}.beton"


def looks_like_beton(path: Path) -> bool:
    """An output --overwrite may replace: a file starting with an FFCV header of this version (every output is
    named *.beton, so the name says nothing; outputs are installed whole, so ours always has its header)."""
    from ffcv.types import CURRENT_VERSION, HeaderType

    try:
        header = np.fromfile(path, dtype=HeaderType, count=1)
    except (OSError, ValueError):
        return False
    return header.size == 1 and int(header[0]["version"]) == CURRENT_VERSION


class ValidatedSamples:
    """The indexable dataset FFCV's writer reads: only samples that already decoded once."""

    def __init__(self, source: datasets.Source, indices: Sequence[int], max_resolution: int):
        self.source = source
        self.indices = list(indices)
        self.max_resolution = max_resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            image = self.source.load_rgb(i, self.max_resolution)
        except datasets.SampleError as exc:
            raise ConversionError(
                f"{common.one_line(self.source.describe(i))}: {exc} (changed during the conversion)"
            ) from None
        return image, self.source.label(i)


# ---- page size and writer count, from the validated images ----------------------------------------


def page_size_for(largest_raw_bytes: int) -> int:
    """FFCV needs every sample to fit one page (a power of two >= 2 MiB). Twice the largest image's raw size
    also holds a JPEG that came out bigger than the pixels (noise at high quality)."""
    need = max(MIN_PAGE_SIZE, 2 * largest_raw_bytes)
    return 1 << (need - 1).bit_length()


def estimated_bytes(raw_bytes: np.ndarray, write_mode: str, smart_threshold: int, compress_probability: float) -> int:
    """What the images will take in the .beton, roughly (exact for raw, a guess for JPEG)."""
    raw = raw_bytes.astype(np.float64)
    jpeg = raw * JPEG_FRACTION_OF_RAW
    stored = {
        "raw": raw,
        "jpg": jpeg,
        "smart": np.where(raw > smart_threshold, jpeg, raw),
        "proportion": compress_probability * jpeg + (1 - compress_probability) * raw,
    }[write_mode]
    return int(stored.sum())


def writer_count(workers: int, data_bytes: int, page_size: int) -> int:
    return max(1, min(workers, data_bytes // (page_size * PAGES_PER_WRITER)))


# ---- FFCV's writer, driven from here -----------------------------------------------------------------


def _die_with_parent() -> None:
    """A killed converter must not leave FFCV workers spinning on its queues (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _guarded_worker_job(*args) -> None:
    from ffcv.writer import worker_job_indexed_dataset

    *ffcv_args, failures = args
    _die_with_parent()
    try:
        worker_job_indexed_dataset(*ffcv_args)
    except BaseException as exc:  # noqa: BLE001 - report anything, the parent decides
        no_space = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        failures.put(("enospc" if no_space else "error", datasets.short_reason(exc)))
        os._exit(1)  # the parent prints the one-line error; no worker traceback on the terminal


def write_beton(
    path: Path, dataset: ValidatedSamples, fields: dict, workers: int, page_size: int, final_name: Path
) -> None:
    """What ffcv's DatasetWriter.from_indexed_dataset does (ffcv 1.0.2: prepare, worker processes, finalize),
    with the loop here: a labelled progress bar, and a worker that fails or dies stops the run with one line
    instead of leaving the others spinning. Every worker is stopped before this returns or raises, so none can
    write (or re-create) `path` after the caller has removed it."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter

    n = len(dataset)
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=workers)
    writer.num_samples = n
    context = multiprocessing.get_context("fork")  # workers inherit the dataset instead of pickling it
    todo = context.Queue()
    for chunk in chunks(list(enumerate(range(n))), max(1, min(100, -(-n // workers)))):
        todo.put(chunk)
    for _ in range(workers):
        todo.put(None)  # one stop token per worker
    allocation_tables = context.Queue()
    failures = context.SimpleQueue()
    done = context.Value(ctypes.c_uint64, 0)
    processes: list = []
    progress = common.progress_bar(n, "writing")
    try:
        writer.prepare()  # the header, field descriptors and the shared per-sample metadata
        allocator = MemoryAllocator(str(path), writer.data_region_start, page_size)
        worker_args = (
            todo,
            writer.metadata_sm,
            writer.metadata_type,
            fields,
            allocator,
            done,
            allocation_tables,
            dataset,
            failures,
        )
        processes = [context.Process(target=_guarded_worker_job, args=worker_args, daemon=True) for _ in range(workers)]
        for process in processes:
            process.start()
        tables: list = []
        while len(tables) < workers:
            _raise_if_a_worker_failed(processes, failures, final_name)
            with contextlib.suppress(queue.Empty):
                tables.append(allocation_tables.get(timeout=0.1))
            progress.update(done.value - progress.n)
        for process in processes:
            process.join()
        progress.update(done.value - progress.n)
        writer.finalize([entry for table in tables for entry in table])  # per-sample metadata, allocation table
    finally:
        progress.close()
        for process in processes:
            _stop(process)
        # After a failure the queue's feeder thread may still hold chunks no worker will read; without this,
        # Python would wait for it at exit and the converter would hang after printing its error.
        todo.cancel_join_thread()
        shared = getattr(writer, "metadata_sm", None)
        if shared is not None and not isinstance(shared, int):
            with contextlib.suppress(Exception):
                shared.close()
                shared.unlink()


def _raise_if_a_worker_failed(processes: list, failures, final_name: Path) -> None:
    dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
    if not failures.empty():  # a worker reports before it exits, so a dead reporter's message is here
        kind, text = failures.get()
        if kind == "enospc":
            raise atomic.DiskFullError(final_name)
        raise ConversionError(f"writing {final_name} failed in an FFCV worker: {text}")
    if dead:
        how = f"exit code {dead[0]}" if dead[0] > 0 else f"killed by signal {-dead[0]}"
        hint = "; out of memory?" if dead[0] == -signal.SIGKILL else ""
        raise ConversionError(f"writing {final_name} failed: an FFCV writer process died ({how}{hint})")


def _stop(process) -> None:
    if process.pid is None:  # never started
        return
    if process.is_alive():
        process.terminate()
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
    process.join()


# ---- the converter ---------------------------------------------------------------------------------


def convert(args: argparse.Namespace) -> dict:
    output, source = common.output_and_source(
        args, lambda name: default_output(name, args.subset), directory=False, is_ours=looks_like_beton
    )
    indices = common.subset_indices(len(source), args.subset)
    check = functools.partial(common.decoded_size, args.max_resolution)
    # Slow import (numba compiles at import): after the source is known to exist, before the clock starts.
    from ffcv.fields import IntField, RGBImageField

    run = common.Conversion(source, output, len(indices), args.strict, desc="validating")
    good: list[int] = []
    sizes: list[tuple[int, int]] = []
    try:
        with contextlib.closing(common.map_samples(source, indices, check, args.workers)) as results:
            for i, size, reason in results:
                run.progress.update(1)
                if reason is None:
                    good.append(i)
                    sizes.append(size)
                else:
                    run.skip(i, reason)
    finally:
        run.close()
    if not good:
        raise ConversionError(f"no usable images in {args.source} ({len(run.skipped)} skipped)")

    raw_bytes = np.prod(np.asarray(sizes, np.int64), axis=1) * 3
    page_size = page_size_for(int(raw_bytes.max()))
    writers = writer_count(
        args.workers,
        estimated_bytes(raw_bytes, args.write_mode, args.smart_threshold, args.compress_probability),
        page_size,
    )
    fields = {
        "image": RGBImageField(
            write_mode=args.write_mode,
            max_resolution=args.max_resolution,
            smart_threshold=args.smart_threshold,
            jpeg_quality=args.jpeg_quality,
            compress_probability=args.compress_probability,
        ),
        "label": IntField(),
    }
    dataset = ValidatedSamples(source, good, args.max_resolution)
    with run.install() as tmp:
        write_beton(tmp, dataset, fields, writers, page_size, output)
        converted.check_beton(tmp)
        run.written = len(good)
        run.extra.update(
            format="ffcv",
            write_mode=args.write_mode,
            classes=source.classes,
            page_size=page_size,
            writer_processes=writers,
        )
    return run.summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return common.run_cli(convert, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
