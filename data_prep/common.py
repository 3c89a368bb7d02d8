"""What the dataset converters (write_ffcv.py, write_dali.py) share.

- turning `--source` into a `Source`: an ImageFolder tree, an unlabeled folder (`--no-labels`), a list file
  (`path[,label]` per line), a `.npz` array set, or the built-in set (`resolve_source`); scanning folders and
  decoding images is bsim_fast/datasets.py's, so the loaders read a folder the same way;
- JPEG bytes for storage (`load_jpeg`: a JPEG that needs no change is kept byte for byte);
- checking the output path before any work (`check_output`: writable, the right kind, `--overwrite`);
- parallel validation with skip / count / `--strict`, progress, and installing the output together with its
  sidecar files `<output>.skipped.tsv` and `<output>.summary.json` (`Conversion`);
- the common command-line flags (`build_arg_parser`) and error handling (`run_cli`).
Outputs are written through bsim_fast/atomic.py.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bsim_fast import cli
from bsim_fast.atomic import DiskFullError, atomic_outputs, disk_bytes
from bsim_fast.datasets import (
    BUILTIN_NAME,
    FILE_SIZE_KEY,
    SPLITS,
    UNLABELED,
    CorruptOutputError,
    FolderSource,
    NoClassFoldersError,
    SampleError,
    Source,
    SourceError,
    builtin_root,
    fit_size,
    open_image,
    rgb_array,
    scan_image_folder,
    short_reason,
)
from bsim_fast.host import available_cores

DEFAULT_MAX_RESOLUTION = 512
DEFAULT_JPEG_QUALITY = 90
# What an FFCV file's name ends in: the trainer reads a file as FFCV by this (bsim_fast.loaders.path_format).
BETON_SUFFIX = ".beton"
# A `--source` file with one of these suffixes is a list of images (`path[,label]` per line).
LIST_SUFFIXES = frozenset({".txt", ".csv", ".lst", ".list"})

# Said after the count of images at the top of a labelled tree, beside its class folders.
UNCLASSED_HINT = "; --no-labels converts every image below it, unlabeled"

# Exit codes of the converters: 2 = the command line, the source or the output path is unusable (found before
# any work), 1 = the run failed.
EXIT_USAGE = 2
EXIT_FAILED = 1


class ConversionError(Exception):
    """The run failed (`--strict` hit a bad file, disk full, ...). One line; exit 1."""


class OutputPathError(Exception):
    """`--output` cannot be written, is of the wrong kind, or exists without `--overwrite`. One line; exit 2."""


# --------------------------------------------------------------------------------------------------
# Sources that only the converters read


@dataclass
class ArraySource(Source):
    """A CIFAR-style array set: uint8 images [N, H, W, 3] (stored NHWC or NCHW) with int labels."""

    path: Path = Path(".")
    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 3), np.uint8))

    def describe(self, i: int) -> str:
        return f"{self.path}[{i}]"

    def load_rgb(self, i: int, max_resolution: int) -> np.ndarray:
        return downscale_rgb(np.ascontiguousarray(self.images[i]), max_resolution)


def source_name(arg: str | os.PathLike | None, split: str = "train") -> str:
    """The name default outputs are called after, known before the source is scanned (a folder: its name;
    a file: its stem). SourceError if the source does not exist."""
    if split not in SPLITS:
        raise SourceError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if arg is None or str(arg) == "builtin":
        return f"{BUILTIN_NAME}_{split}"
    path = Path(arg).expanduser()
    if not path.exists():
        raise SourceError(f"source not found: {path}")
    return (path.resolve().name or "dataset") if path.is_dir() else path.stem


def resolve_source(arg: str | os.PathLike | None, split: str = "train", labeled: bool = True) -> Source:
    """`builtin`/None -> the built-in split; a folder -> ImageFolder tree (or, labeled=False, every image below
    it); a list file -> its entries; a .npz -> array source. labeled=False stores every label as UNLABELED."""
    name = source_name(arg, split)
    if arg is None or str(arg) == "builtin":
        source = scan_image_folder(builtin_root() / split, labeled=labeled)
    else:
        path = Path(arg).expanduser()
        if path.is_dir():
            try:
                source = scan_image_folder(path, labeled=labeled)
            except NoClassFoldersError as exc:
                raise SourceError(f"{exc}; to convert it as an unlabeled collection, add --no-labels") from None
        elif path.suffix.lower() == ".npz":
            source = load_array_source(path, labeled)
        elif path.suffix.lower() in LIST_SUFFIXES:
            source = load_list_source(path, labeled)
        else:
            raise SourceError(
                f"source must be a folder, a list file ({'/'.join(sorted(LIST_SUFFIXES))}: "
                f"path[,label] per line), a .npz file or 'builtin': {path}"
            )
    source.name = name
    return source


def load_array_source(path: Path, labeled: bool = True) -> ArraySource:
    """A .npz with uint8 'images' and int 'labels' ('labels' may be absent when labeled=False)."""
    required = {"images", "labels"} if labeled else {"images"}
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = required - set(data.files)
            if missing:
                raise SourceError(
                    f"{path}: missing array(s) {', '.join(sorted(missing))} (found {', '.join(data.files) or 'none'})"
                )
            images = data["images"]
            labels = data["labels"] if labeled else None
    except SourceError:
        raise
    except Exception as exc:  # not a zip, pickled objects, truncated file, ...
        raise SourceError(f"{path}: cannot read as .npz ({short_reason(exc)})") from exc
    if images.dtype != np.uint8 or images.ndim != 4:
        raise SourceError(
            f"{path}: 'images' must be uint8 [N, H, W, 3] or [N, 3, H, W], got {images.dtype} {list(images.shape)}"
        )
    if images.shape[-1] != 3 and images.shape[1] == 3:
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] != 3:
        raise SourceError(f"{path}: 'images' must have 3 channels, got shape {list(images.shape)}")
    if not labeled:
        return ArraySource(
            name=path.stem,
            classes=[],
            labels=np.full(len(images), UNLABELED, np.int64),
            labeled=False,
            path=path,
            images=images,
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(f"{path}: 'labels' must be int [{images.shape[0]}], got {labels.dtype} {list(labels.shape)}")
    if labels.size and labels.min() < 0:
        raise SourceError(
            f"{path}: 'labels' must be >= 0, found {int(labels.min())} (for an unlabeled set use --no-labels)"
        )
    classes, empty = integer_classes(labels)
    return ArraySource(
        name=path.stem, classes=classes, labels=labels.astype(np.int64), empty_classes=empty, path=path, images=images
    )


def integer_classes(labels: np.ndarray) -> tuple[list[str], list[str]]:
    """Integer labels 0..K-1 name their classes "0".."K-1"; the ones no sample has are reported as empty."""
    num_classes = int(labels.max()) + 1 if labels.size else 0
    present = set(np.unique(labels).tolist())
    classes = [str(k) for k in range(num_classes)]
    return classes, [c for k, c in enumerate(classes) if k not in present]


_INTEGER = re.compile(r"[0-9]+")


def load_list_source(path: Path, labeled: bool = True) -> FolderSource:
    """A list file: one image per line, `path` or `path,label` (CSV: quote a path holding a comma).

    Paths are relative to the list's folder (absolute ones are kept). Labels are class names, indexed in
    sorted order like the sub-folders of an ImageFolder tree, or, when every label is a whole number, those
    numbers themselves. Blank lines, `#` comments and a `path[,label]` header line are skipped. Either every
    line has a label or none does (then the set is unlabeled); labeled=False ignores labels. A malformed line
    is a SourceError naming the file and line; a missing or bad image is skipped at conversion like a bad file.
    """
    base = path.resolve().parent
    try:
        # surrogateescape: a file name that is not UTF-8 still reaches the file system as its own bytes
        text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")  # a BOM: saved by a spreadsheet
    except OSError as exc:
        raise SourceError(f"{path}: cannot read the list ({exc.strerror or exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    paths: list[str] = []
    names: list[str | None] = []
    first_labelled: int | None = None
    first_unlabelled: int | None = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise SourceError(f"{path}:{reader.line_num}: malformed line ({exc})") from None
        line = reader.line_num
        row = [cell.strip() for cell in row]
        if not row or (len(row) == 1 and not row[0]) or row[0].startswith("#"):
            continue
        if not paths and [cell.lower() for cell in row] in (["path"], ["path", "label"]):
            continue  # a header line
        if len(row) > 2:
            raise SourceError(
                f"{path}:{line}: expected `path` or `path,label`, got {len(row)} fields "
                f"(quote a path that holds a comma)"
            )
        if not row[0]:
            raise SourceError(f"{path}:{line}: empty path")
        label = row[1] if len(row) == 2 else None
        if label == "":
            raise SourceError(f"{path}:{line}: empty label (leave out the comma for an unlabeled entry)")
        if label is not None and label.startswith("-") and _INTEGER.fullmatch(label[1:]):
            raise SourceError(f"{path}:{line}: negative label {label} (leave labels out for an unlabeled set)")
        if label is None:
            first_unlabelled = first_unlabelled or line
        else:
            first_labelled = first_labelled or line
        if labeled and first_labelled and first_unlabelled:
            raise SourceError(
                f"{path}:{max(first_labelled, first_unlabelled)}: "
                f"{'no label' if label is None else 'a label'}, but line "
                f"{min(first_labelled, first_unlabelled)} has "
                f"{'one' if label is None else 'none'} (label every line or none; "
                f"--no-labels ignores them)"
            )
        paths.append(os.path.join(base, row[0]))
        names.append(label)
    if not paths:
        raise SourceError(f"{path}: the list names no images")
    common = dict(name=path.stem, root=base, paths=paths, missing_reason="listed file not found")
    if not labeled or first_labelled is None:
        return FolderSource(classes=[], labels=np.full(len(paths), UNLABELED, np.int64), labeled=False, **common)
    if all(_INTEGER.fullmatch(name) for name in names):
        labels = np.asarray([int(name) for name in names], np.int64)
        classes, empty = integer_classes(labels)
        return FolderSource(classes=classes, labels=labels, empty_classes=empty, **common)
    classes = sorted(set(names))
    index = {name: k for k, name in enumerate(classes)}
    return FolderSource(classes=classes, labels=np.asarray([index[name] for name in names], np.int64), **common)


def data_out() -> Path:
    """Where default outputs go: data_out/ in the clone (where the recipes' `builtin` finds the converted set
    from any working folder), or in the working folder when the converters run from an installed package."""
    clone = Path(__file__).resolve().parents[1]
    return clone / "data_out" if (clone / "pyproject.toml").is_file() else Path("data_out")


def subset_indices(n: int, subset: int | None) -> np.ndarray:
    """`--subset N`: N evenly spaced samples (deterministic, and every class keeps its share)."""
    if subset is None or subset >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, subset).round().astype(np.int64))


# --------------------------------------------------------------------------------------------------
# JPEG bytes for storage


def downscale_rgb(rgb: np.ndarray, max_resolution: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    size = fit_size(width, height, max_resolution)
    if size == (width, height):
        return rgb
    image = Image.fromarray(rgb, "RGB").resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, "JPEG", quality=quality)  # baseline, 4:2:0
    return out.getvalue()


def encode_jpeg_for_storage(data: bytes, max_resolution: int, quality: int) -> tuple[bytes, bool]:
    """(JPEG bytes, passed_through). Always fully decodes first, so a corrupt file never gets through.

    Stored byte for byte: a baseline RGB JPEG, upright, within max_resolution (as stored in the file, not as
    decoded at reduced scale); re-encoding it would only lose quality. Everything else is decoded and
    re-encoded at `quality`.
    """
    image = open_image(data, max_resolution)
    rgb = rgb_array(image, max_resolution)
    passthrough = (
        image.format == "JPEG"
        and image.mode == "RGB"
        and max(image.info[FILE_SIZE_KEY]) <= max_resolution
        and not image.info.get("progressive")
        and not image.info.get("progression")
    )
    try:
        passthrough = passthrough and image.getexif().get(0x0112, 1) == 1
    except Exception:
        passthrough = False  # a malformed EXIF block: re-encode what was decoded
    return (data, True) if passthrough else (encode_jpeg(rgb, quality), False)


def load_jpeg(source: Source, i: int, max_resolution: int, quality: int) -> tuple[bytes, bool]:
    """Sample i as (JPEG bytes, passed_through): files through `encode_jpeg_for_storage`, arrays encoded."""
    if isinstance(source, FolderSource):
        return encode_jpeg_for_storage(source.read_bytes(i), max_resolution, quality)
    return encode_jpeg(source.load_rgb(i, max_resolution), quality), False


# --------------------------------------------------------------------------------------------------
# The output path, checked before any work


def sidecar_paths(output: Path) -> tuple[Path, Path]:
    """`<output>.skipped.tsv` (the skipped files) and `<output>.summary.json` (counts, sizes, `labeled`)."""
    return output.with_name(output.name + ".skipped.tsv"), output.with_name(output.name + ".summary.json")


def check_output(output: Path, directory: bool, overwrite: bool, is_ours: Callable[[Path], bool]) -> None:
    """Refuses, in one line, an output that could not be written or should not be replaced: a folder that
    cannot be written to; an existing output of the other kind (a file where a folder goes, or the reverse:
    never replaced, even with --overwrite); an existing one without --overwrite; or one that `is_ours` does
    not recognise as a converter's output. An empty file or folder is replaced without asking."""
    output = Path(output)
    check_output_name(output, directory)
    folder = output.absolute().parent
    while not os.path.lexists(folder):
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(f"cannot write {output}: {folder} is not a folder")
    try:  # os.access ignores read-only mounts for some file systems and is always true for root: really try
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"cannot write to {folder} ({exc.strerror or exc}); choose another --output") from None
    kind = "folder" if directory else "file"
    for sidecar in sidecar_paths(output):
        if sidecar.is_dir():
            raise OutputPathError(f"{sidecar} is a folder; the converter writes a file there")
    if not os.path.lexists(output):
        return
    existing = "folder" if output.is_dir() and not output.is_symlink() else "file"
    if existing != kind:
        raise OutputPathError(
            f"{output} is a {existing}, and this converter writes a {kind}: choose another "
            f"--output (an output is never replaced by one of the other kind)"
        )
    if _is_empty(output):
        return
    if not overwrite:
        raise OutputPathError(f"{output} exists; pass --overwrite to replace it")
    if not is_ours(output):
        raise OutputPathError(
            f"{output} does not look like this converter's output; not replacing it, even with --overwrite"
        )


def check_output_name(output: Path, directory: bool) -> None:
    """The trainer tells an FFCV file from a shard folder by its name (a file ending in .beton), so each
    converter writes only what will be read as its kind; refused in one line otherwise."""
    if not directory and output.suffix != BETON_SUFFIX:
        raise OutputPathError(
            f"--output {output}: an FFCV file must end in {BETON_SUFFIX} (the trainer reads no other name): "
            f"use --output {output}{BETON_SUFFIX}"
        )
    if directory and output.suffix == BETON_SUFFIX:
        raise OutputPathError(
            f"--output {output}: a shard folder named *{BETON_SUFFIX} would be taken for an FFCV file: "
            f"choose a name without {BETON_SUFFIX}"
        )


def _is_empty(path: Path) -> bool:
    try:
        return not any(path.iterdir()) if path.is_dir() and not path.is_symlink() else path.lstat().st_size == 0
    except OSError:
        return False


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


def map_samples(
    source: Source, indices: Sequence[int], task: Callable, workers: int, chunksize: int = 32
) -> Iterator[tuple[int, object, str | None]]:
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


def decoded_size(max_resolution: int, source: Source, i: int) -> tuple[int, int]:
    """Validation: decode sample i and keep only its (height, width) as stored (<= max_resolution)."""
    return source.load_rgb(i, max_resolution).shape[:2]


# --------------------------------------------------------------------------------------------------
# Bookkeeping of one run: skips, --strict, progress, sidecars, summary


def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


class Conversion:
    """Counts one converter run and reports it the same way for every output format.

    The converter writes inside `with run.install(directory) as tmp:`, sets `written` and `extra` there,
    and the output and both sidecar files are renamed into place together when the block ends.
    """

    def __init__(self, source: Source, output: Path, total: int, strict: bool, desc: str):
        self.source = source
        self.output = Path(output)
        self.strict = strict
        self.skipped: list[tuple[str, str]] = []
        self.written = 0
        self.extra: dict = {}
        self.summary: dict = {}
        self.started = time.perf_counter()
        self.progress = progress_bar(total, desc)
        for name in source.empty_classes:
            self.note(f"warning: empty class folder {name!r} keeps its index {source.classes.index(name)}")
        for line in source.left_out.lines(UNCLASSED_HINT):
            self.note(line)

    def note(self, line: str) -> None:
        self.progress.write(line, file=sys.stderr)

    def skip(self, i: int, reason: str) -> None:
        where = one_line(self.source.describe(i))
        if self.strict:
            raise ConversionError(f"{where}: {one_line(reason)} (--strict)")
        self.skipped.append((where, one_line(reason)))
        self.note(f"skipped: {where}: {one_line(reason)}")

    @property
    def sidecar(self) -> Path:
        return sidecar_paths(self.output)[0]

    @property
    def summary_path(self) -> Path:
        return sidecar_paths(self.output)[1]

    def close(self) -> None:
        self.progress.close()

    @contextlib.contextmanager
    def install(self, directory: bool = False) -> Iterator[Path]:
        """Yields the output's temporary. When the block ends, the sidecar (always written, so no stale list
        survives a rerun) and the summary are written beside it, and all three are renamed into place; if
        anything fails before that (a full disk included), the previous output and its sidecars stay."""
        with atomic_outputs((self.output, directory), (self.sidecar, False), (self.summary_path, False)) as temps:
            tmp, sidecar_tmp, summary_tmp = temps
            yield tmp
            self.close()
            lines = ["path\treason"] + [f"{path}\t{reason}" for path, reason in self.skipped]
            write_sidecar(sidecar_tmp, "\n".join(lines) + "\n")
            self.summary = self._summary(disk_bytes(tmp))
            write_sidecar(summary_tmp, json.dumps(self.summary, indent=1) + "\n")
        self._print_summary()

    def _summary(self, output_bytes: int) -> dict:
        seconds = time.perf_counter() - self.started
        return {
            "output": str(self.output),
            "images_written": self.written,
            "skipped": len(self.skipped),
            "ignored_non_image_files": self.source.ignored,
            "ignored_hidden": self.source.hidden,
            "passed_over_folders": self.source.left_out.folders,
            "unclassed_images": self.source.left_out.counts["unclassed"],
            "labeled": self.source.labeled,
            "empty_classes": self.source.empty_classes,
            "num_classes": len(self.source.classes),
            "bytes": output_bytes,
            "seconds": round(seconds, 3),
            "images_per_s": round(self.written / max(seconds, 1e-9), 1),
            **self.extra,
        }

    def _print_summary(self) -> None:
        s = self.summary
        skipped_note = f", list in {self.sidecar}" if self.skipped else ""
        ignored = s["ignored_non_image_files"] + s["ignored_hidden"]
        ignored_note = f"; {ignored} ignored (not images, or hidden)" if ignored else ""
        if s["unclassed_images"]:
            ignored_note += f"; {s['unclassed_images']} images in no class folder left out (--no-labels takes them)"
        unlabeled_note = "" if s["labeled"] else " unlabeled"
        print(
            f"wrote {self.written}{unlabeled_note} images to {self.output} ({len(self.skipped)} skipped"
            f"{skipped_note}{ignored_note}; {s['bytes'] / 1e6:.1f} MB, {s['seconds']:.1f} s, "
            f"{s['images_per_s']:.0f} images/s)"
        )
        print(json.dumps(s))


def write_sidecar(path: Path, text: str) -> None:
    """One sidecar file's text, into its temporary (fsynced and renamed with the output by `atomic_outputs`)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def one_line(text: str) -> str:
    """Text for one line of the console or one cell of the .tsv: backslash, tab, CR and newline escaped
    (so a file name holding them cannot split the line), undecodable file-name bytes shown as \\xNN."""
    text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------------------------------
# Command line


def default_workers() -> int:
    return max(1, min(available_cores(), 16))


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


def build_arg_parser(description: str, output_help: str) -> argparse.ArgumentParser:
    """The flags every converter takes; each converter adds its own. Defaults are written in the help texts
    where there is one to show (not `(default: None)`)."""
    parser = cli.ArgumentParser(description=description)
    parser.add_argument(
        "--source",
        default="builtin",
        metavar="DIR|LIST|FILE.npz|builtin",
        help="ImageFolder tree (DIR/<class>/<image>); with --no-labels any folder of images; a "
        "list file (.txt/.csv/.lst/.list: `path[,label]` per line, paths relative to the "
        "list's folder); a .npz with uint8 'images' and int 'labels'; or the built-in "
        "CIFAR-10 subset (default: %(default)s)",
    )
    parser.add_argument(
        "--no-labels",
        dest="labeled",
        action="store_false",
        help="an unlabeled collection: every image below --source at any depth (sub-folders "
        'are not classes), label -1, output marked "labeled": false; labels in a list '
        "file or .npz are ignored",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default=None,
        help="split of the built-in dataset (only with --source builtin; train if not given)",
    )
    parser.add_argument("--output", default=None, metavar="PATH", help=output_help)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (only one a converter wrote; never a file by a folder or the reverse)",
    )
    parser.add_argument(
        "--max-resolution",
        type=int_at_least(1),
        default=DEFAULT_MAX_RESOLUTION,
        metavar="N",
        help="downscale so the longer side is at most N pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--jpeg-quality",
        type=int_at_least(1, 100),
        default=DEFAULT_JPEG_QUALITY,
        metavar="Q",
        help="JPEG quality for images that are (re-)encoded (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int_at_least(1),
        default=default_workers(),
        metavar="N",
        help="worker processes for decoding and writing (default: %(default)s, the cores available, at most 16)",
    )
    parser.add_argument(
        "--subset",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="convert only N evenly spaced samples (for quick tests; all if not given)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first bad input file instead of skipping and listing it"
    )
    return parser


def output_and_source(
    args: argparse.Namespace, default_output: Callable[[str], Path], directory: bool, is_ours: Callable[[Path], bool]
) -> tuple[Path, Source]:
    """The output path, checked before any work (`check_output`), then the source, scanned."""
    builtin = args.source is None or args.source == "builtin"
    if args.split is not None and not builtin:
        raise SourceError(
            "--split selects a split of the built-in dataset; with --source DIR point "
            "--source at the split's folder instead"
        )
    arg = None if builtin else args.source
    split = args.split or "train"
    name = source_name(arg, split)  # a missing source is said first
    output = Path(args.output) if args.output else default_output(name)
    check_output(output, directory, args.overwrite, is_ours)
    return output, resolve_source(arg, split, labeled=args.labeled)


def run_cli(
    convert: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> int:
    """Parses argv, runs `convert`, and turns known failures into one line on stderr + an exit code."""
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        convert(args)
    except (SourceError, OutputPathError) as exc:
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
