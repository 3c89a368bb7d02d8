"""Write an FFCV .beton (fields `image`: RGBImageField, `label`: IntField).

    python data_prep/write_ffcv.py                      # built-in train split -> data_out/cifar10_mini_train.beton
    python data_prep/write_ffcv.py --split test         # -> data_out/cifar10_mini_test.beton
    python data_prep/write_ffcv.py --source DIR --output out.beton --write-mode jpg --max-resolution 256

FFCV's DatasetWriter needs an indexable dataset whose items never fail (a failing item leaves its
progress loop waiting forever), so every sample is decoded once in parallel first and only the good ones
are handed to the writer, which decodes them again in its own workers. A worker that still fails
(a file changed in between, a full disk) is reported and stops the run instead of hanging it.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bsim_fast import atomic, datasets  # noqa: E402
from data_prep import common  # noqa: E402
from data_prep.common import ConversionError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
WRITE_MODES = ("smart", "jpg", "raw", "proportion")
# 'smart' stores an image raw while raw is small (fast to load, lossless) and as JPEG above this many bytes.
DEFAULT_SMART_THRESHOLD = 256 * 256 * 3


def build_parser() -> argparse.ArgumentParser:
    parser = common.build_arg_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--write-mode", choices=WRITE_MODES, default="smart",
                        help="how images are stored: raw pixels, JPEG, a random 'proportion' as JPEG, "
                             "or 'smart' (raw while raw is below --smart-threshold bytes)")
    parser.add_argument("--compress-probability", type=float, default=0.5, metavar="P",
                        help="with --write-mode proportion: probability that an image is stored as JPEG")
    parser.add_argument("--smart-threshold", type=int, default=DEFAULT_SMART_THRESHOLD, metavar="BYTES",
                        help="with --write-mode smart: raw size above which an image is stored as JPEG")
    return parser


def default_output(source: datasets.Source, subset: int | None, suffix: str) -> Path:
    name = source.name + (f"_subset{subset}" if subset else "")
    return REPO_ROOT / "data_out" / f"{name}{suffix}"


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
            raise ConversionError(f"{self.source.describe(i)}: {exc} (changed during the conversion)") from None
        return image, self.source.label(i)


def page_size_for(max_resolution: int) -> int:
    """FFCV needs every sample to fit one page (a power of two >= 2 MiB); a raw image is H*W*3 bytes."""
    need = max(2 << 20, 2 * max_resolution * max_resolution * 3)
    return 1 << (need - 1).bit_length()


# ---- FFCV writer workers that report failure instead of hanging the parent ------------------------


class _WorkerFailed(BaseException):
    """Raised in the main thread by the watchdog's signal. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` inside FFCV or tqdm can swallow it."""


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
        failures.put(("enospc" if no_space else "error", f"{datasets.short_reason(exc)}"))
        os._exit(1)  # the parent prints the one-line error; no worker traceback on the terminal


def write_beton(path: Path, dataset: ValidatedSamples, fields: dict, workers: int, page_size: int,
                final_name: Path) -> None:
    """DatasetWriter.from_indexed_dataset, with a watchdog that turns a dead worker into an error."""
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter

    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=workers)
    context = multiprocessing.get_context("fork")
    failures = context.SimpleQueue()
    failure: list[tuple[str, str]] = []
    main_thread = threading.main_thread()

    acknowledged = threading.Event()

    def watch() -> None:
        message = failures.get()
        if message is not None:
            failure.append(message)
            # Wakes the parent wherever it waits; repeated until it has reacted, in case the first
            # signal arrived where the exception could not take effect.
            while not acknowledged.is_set():
                signal.pthread_kill(main_thread.ident, signal.SIGUSR1)
                acknowledged.wait(0.5)

    def on_failure(signum, frame):
        raise _WorkerFailed()

    previous_handler = signal.signal(signal.SIGUSR1, on_failure)
    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    n = len(dataset)
    chunksize = max(1, min(100, -(-n // workers)))
    worker_failed = False
    try:
        # The public from_indexed_dataset() would run FFCV's own worker function; _write_common is what it
        # calls, with ours wrapped around FFCV's (ffcv 1.0.2).
        writer._write_common(n, chunks(list(enumerate(range(n))), chunksize), _guarded_worker_job,
                             (dataset, failures))
    except _WorkerFailed:
        worker_failed = True
    except BaseException:
        _stop_workers(writer)
        raise
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a late repeat must not hit code after us
        acknowledged.set()
        if not failure:
            failures.put(None)
        watchdog.join(timeout=5)
        signal.signal(signal.SIGUSR1, previous_handler)
    if worker_failed or failure:  # raised out here so FFCV's progress bar is closed before the error line prints
        _stop_workers(writer)
        kind, text = failure[0]
        if kind == "enospc":
            raise ConversionError(f"no space left on device while writing {final_name} "
                                  f"(temporary output removed; previous output kept)")
        raise ConversionError(f"writing {final_name} failed in an FFCV worker: {text}")


def _stop_workers(writer) -> None:
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=5)
    shared = getattr(writer, "metadata_sm", None)
    if shared is not None and not isinstance(shared, int):
        with contextlib.suppress(Exception):
            shared.close()
            shared.unlink()


# ---- the converter ---------------------------------------------------------------------------------


def convert(args: argparse.Namespace) -> dict:
    source = common.source_from_args(args)
    output = Path(args.output) if args.output else default_output(source, args.subset, ".beton")
    indices = common.subset_indices(len(source), args.subset)
    check = functools.partial(_check_sample, args.max_resolution)
    # Slow import (numba compiles at import): after the source is known to exist, before the clock starts.
    from ffcv.fields import IntField, RGBImageField

    run = common.Conversion(source, output, len(indices), args.strict, desc="validating")
    good: list[int] = []
    try:
        with contextlib.closing(common.map_samples(source, indices, check, args.workers)) as results:
            for i, _, reason in results:
                run.progress.update(1)
                if reason is None:
                    good.append(i)
                else:
                    run.skip(i, reason)
    finally:
        run.close()
    if not good:
        raise ConversionError(f"no usable images in {args.source} ({len(run.skipped)} skipped)")

    fields = {
        "image": RGBImageField(write_mode=args.write_mode, max_resolution=args.max_resolution,
                               smart_threshold=args.smart_threshold, jpeg_quality=args.jpeg_quality,
                               compress_probability=args.compress_probability),
        "label": IntField(),
    }
    dataset = ValidatedSamples(source, good, args.max_resolution)
    with atomic.atomic_output(output) as tmp:
        write_beton(tmp, dataset, fields, args.workers, page_size_for(args.max_resolution), output)
        datasets.check_beton(tmp)
    run.written = len(good)
    return run.finish(atomic.disk_bytes(output), format="ffcv", write_mode=args.write_mode,
                      classes=source.classes)


def _check_sample(max_resolution: int, source: datasets.Source, i: int) -> None:
    common.check_decodes(source, i, max_resolution)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return common.run_cli(convert, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
