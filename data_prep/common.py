"""What the dataset converters (write_ffcv.py, write_dali.py) share.

- turning a `--source` argument into a `Source` (an ImageFolder tree, a `.npz` array set, or the built-in
  set: `resolve_source`); the image-level work (scanning, decoding, encoding) is bsim_fast/datasets.py's;
- parallel validation with skip / count / `--strict`, the `<output>.skipped.tsv` sidecar, progress and the
  final summary (`Conversion`);
- the common command-line flags (`build_arg_parser`) and error handling (`run_cli`).
Outputs are written through bsim_fast/atomic.py.
"""
from __future__ import annotations

import argparse
import errno
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from bsim_fast.atomic import DiskFullError, write_text_atomic
from bsim_fast.datasets import (BUILTIN_NAME, SPLITS, CorruptOutputError, SampleError, Source, SourceError,
                                builtin_root, downscale_rgb, encode_jpeg, scan_image_folder, short_reason)

DEFAULT_MAX_RESOLUTION = 512
DEFAULT_JPEG_QUALITY = 90

# Exit codes of the converters: 2 = the command line or the source is unusable, 1 = the run failed.
EXIT_USAGE = 2
EXIT_FAILED = 1


class ConversionError(Exception):
    """The run failed (`--strict` hit a bad file, disk full, ...). One line; exit 1."""


@dataclass
class ArraySource(Source):
    """A CIFAR-style array set: uint8 images [N, H, W, 3] (stored NHWC or NCHW) with int labels."""

    path: Path = Path(".")
    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 3), np.uint8))

    def describe(self, i: int) -> str:
        return f"{self.path}[{i}]"

    def load_rgb(self, i: int, max_resolution: int) -> np.ndarray:
        return downscale_rgb(np.ascontiguousarray(self.images[i]), max_resolution)

    def load_jpeg(self, i: int, max_resolution: int, quality: int) -> tuple[bytes, bool]:
        return encode_jpeg(self.load_rgb(i, max_resolution), quality), False


def resolve_source(arg: str | os.PathLike | None, split: str = "train") -> Source:
    """`builtin`/None -> the built-in split; a folder -> ImageFolder tree; a .npz -> array source."""
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if arg is None or str(arg) == "builtin":
        source = scan_image_folder(builtin_root() / split)
        source.name = f"{BUILTIN_NAME}_{split}"
        return source
    path = Path(arg).expanduser()
    if not path.exists():
        raise SourceError(f"source not found: {path}")
    if path.is_dir():
        return scan_image_folder(path)
    if path.suffix.lower() == ".npz":
        return load_array_source(path)
    raise SourceError(f"source must be a folder (ImageFolder tree), a .npz file or 'builtin': {path}")




def load_array_source(path: Path) -> ArraySource:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"images", "labels"} - set(data.files)
            if missing:
                raise SourceError(f"{path}: missing array(s) {', '.join(sorted(missing))} "
                                  f"(found {', '.join(data.files) or 'none'})")
            images, labels = data["images"], data["labels"]
    except SourceError:
        raise
    except Exception as exc:  # not a zip, pickled objects, truncated file, ...
        raise SourceError(f"{path}: cannot read as .npz ({short_reason(exc)})") from exc
    if images.dtype != np.uint8 or images.ndim != 4:
        raise SourceError(f"{path}: 'images' must be uint8 [N, H, W, 3] or [N, 3, H, W], "
                          f"got {images.dtype} {list(images.shape)}")
    if images.shape[-1] != 3 and images.shape[1] == 3:
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] != 3:
        raise SourceError(f"{path}: 'images' must have 3 channels, got shape {list(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(f"{path}: 'labels' must be int [{images.shape[0]}], "
                          f"got {labels.dtype} {list(labels.shape)}")
    if labels.size and labels.min() < 0:
        raise SourceError(f"{path}: 'labels' must be >= 0, found {int(labels.min())}")
    num_classes = int(labels.max()) + 1 if labels.size else 0
    present = set(np.unique(labels).tolist())
    classes = [str(k) for k in range(num_classes)]
    return ArraySource(name=path.stem, classes=classes, labels=labels.astype(np.int64),
                       empty_classes=[c for k, c in enumerate(classes) if k not in present],
                       path=path, images=images)


def subset_indices(n: int, subset: int | None) -> np.ndarray:
    """`--subset N`: N evenly spaced samples (deterministic, and every class keeps its share)."""
    if subset is None or subset >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, subset).round().astype(np.int64))


# --------------------------------------------------------------------------------------------------
# Parallel validation / preparation


# One (source, task) per worker process, set by the pool initializer (inherited, not pickled, under fork).
_worker_state: tuple[Source, Callable] | None = None


def _init_worker(source: Source, task: Callable) -> None:
    global _worker_state
    _worker_state = (source, task)


def _run_task(i: int):
    source, task = _worker_state
    try:
        return i, task(source, i), None
    except SampleError as exc:
        return i, None, str(exc)
    except MemoryError:
        return i, None, "out of memory while decoding"
    except Exception as exc:  # a decoder bug must cost one sample, not the run
        return i, None, f"decoder error ({type(exc).__name__}: {short_reason(exc)})"


def map_samples(source: Source, indices: Sequence[int], task: Callable, workers: int,
                chunksize: int = 32) -> Iterator[tuple[int, object, str | None]]:
    """Yields (index, task(source, index) or None, reason or None) in index order.

    `task` must be a module-level function (it runs in worker processes when workers > 1).
    """
    if workers <= 1 or len(indices) < 2 * chunksize:
        _init_worker(source, task)
        yield from (_run_task(int(i)) for i in indices)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    context = multiprocessing.get_context(method)
    pool = context.Pool(workers, initializer=_init_worker, initargs=(source, task))
    try:
        yield from pool.imap(_run_task, [int(i) for i in indices], chunksize=chunksize)
    finally:
        pool.terminate()  # also on --strict failure or Ctrl-C: no worker outlives the run
        pool.join()


def check_decodes(source: Source, i: int, max_resolution: int) -> None:
    """Validation only: decode and drop (the FFCV writer decodes again in its own workers)."""
    source.load_rgb(i, max_resolution)


# --------------------------------------------------------------------------------------------------
# Bookkeeping of one run: skips, --strict, progress, sidecar, summary


class Conversion:
    """Counts one converter run and reports it the same way for every output format."""

    def __init__(self, source: Source, output: Path, total: int, strict: bool, desc: str):
        from tqdm import tqdm

        self.source = source
        self.output = Path(output)
        self.strict = strict
        self.skipped: list[tuple[str, str]] = []
        self.written = 0
        self.started = time.perf_counter()
        self.progress = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, mininterval=0.5,
                             dynamic_ncols=True)
        for name in source.empty_classes:
            self.note(f"warning: empty class folder {name!r} keeps its index "
                      f"{source.classes.index(name)}")

    def note(self, line: str) -> None:
        self.progress.write(line, file=sys.stderr)

    def skip(self, i: int, reason: str) -> None:
        where = self.source.describe(i)
        if self.strict:
            raise ConversionError(f"{where}: {reason} (--strict)")
        self.skipped.append((where, reason))
        self.note(f"skipped: {where}: {reason}")

    @property
    def sidecar(self) -> Path:
        return self.output.with_name(self.output.name + ".skipped.tsv")

    @property
    def summary_path(self) -> Path:
        return self.output.with_name(self.output.name + ".summary.json")

    def close(self) -> None:
        self.progress.close()

    def finish(self, output_bytes: int, **extra) -> dict:
        """Writes the sidecar (always, so no stale list survives a rerun) and prints the summary."""
        self.close()
        seconds = time.perf_counter() - self.started
        lines = ["path\treason"] + [f"{_tsv(p)}\t{_tsv(r)}" for p, r in self.skipped]
        write_text_atomic(self.sidecar, "\n".join(lines) + "\n")
        summary = {
            "output": str(self.output), "images_written": self.written, "skipped": len(self.skipped),
            "ignored_non_image_files": self.source.ignored, "empty_classes": self.source.empty_classes,
            "num_classes": len(self.source.classes), "bytes": output_bytes,
            "seconds": round(seconds, 3), "images_per_s": round(self.written / max(seconds, 1e-9), 1),
            **extra,
        }
        write_text_atomic(self.summary_path, json.dumps(summary, indent=1) + "\n")
        skipped_note = f", list in {self.sidecar}" if self.skipped else ""
        print(f"wrote {self.written} images to {self.output} ({len(self.skipped)} skipped{skipped_note}; "
              f"{output_bytes / 1e6:.1f} MB, {seconds:.1f} s, {summary['images_per_s']:.0f} images/s)")
        print(json.dumps(summary))
        return summary


def _tsv(text: str) -> str:
    """One TSV cell: tabs/newlines escaped; undecodable file-name bytes shown, never crashing the write."""
    text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------------------------------
# Command line


def default_workers() -> int:
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    return max(1, min(available, 16))


def int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    return parse


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags every converter takes (SPEC §3); each converter adds its own."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", default="builtin", metavar="DIR|builtin|FILE.npz",
                        help="ImageFolder tree (DIR/<class>/<image>), a .npz with uint8 'images' and int "
                             "'labels', or the built-in CIFAR-10 subset")
    parser.add_argument("--split", choices=SPLITS, default=None,
                        help="split of the built-in dataset (default train; only with --source builtin)")
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="output path (default: data_out/<dataset>_<split>...)")
    parser.add_argument("--max-resolution", type=int_at_least(1), default=DEFAULT_MAX_RESOLUTION,
                        metavar="N", help="downscale so the longer side is at most N pixels")
    parser.add_argument("--jpeg-quality", type=int_at_least(1, 100), default=DEFAULT_JPEG_QUALITY,
                        metavar="Q", help="JPEG quality for images that are (re-)encoded")
    parser.add_argument("--workers", type=int_at_least(1), default=default_workers(), metavar="N",
                        help="worker processes for decoding and writing")
    parser.add_argument("--subset", type=int_at_least(1), default=None, metavar="N",
                        help="convert only N evenly spaced samples (for quick tests)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first bad input file instead of skipping it")
    return parser


def source_from_args(args: argparse.Namespace) -> Source:
    builtin = args.source is None or args.source == "builtin"
    if args.split is not None and not builtin:
        raise SourceError("--split selects a split of the built-in dataset; with --source DIR point "
                          "--source at the split's folder instead")
    return resolve_source(None if builtin else args.source, args.split or "train")


def run_cli(convert: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None) -> int:
    """Parses argv, runs `convert`, and turns known failures into one line on stderr + an exit code."""
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        convert(args)
    except SourceError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ConversionError, CorruptOutputError, DiskFullError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            print(f"{prog}: error: no space left on device ({exc.filename or 'output'})", file=sys.stderr)
            return EXIT_FAILED
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output written", file=sys.stderr)
        return 130
    return 0
