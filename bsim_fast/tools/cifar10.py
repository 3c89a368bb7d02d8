"""CIFAR-10 for the time-to-accuracy run (`bsim_fast.tools.speedrun`), from whichever form is at hand:

- an image folder holding `train/` and `test/` ImageFolder trees (`train/<class>/<image>`), read as it is;
- the python-version archive `cifar-10-python.tar.gz`, or its extracted `cifar-10-batches-py/` folder (or a
  folder holding either): its batches are pickles, read by `load_pickled_batch`, which only rebuilds numpy
  arrays (nothing read from a data set may run code), and written once, losslessly, as PNG ImageFolder trees
  into the cache (`datasets.cache_dir()`, `BSIM_FAST_CACHE` overrides), named by the batches' sha256;
- downloaded (`download`, torchvision's `download_url`, md5-checked) into a folder when the machine has a network;
  `has_network` tells, in one line, when it has none.

Every problem is a `CifarError`: one line naming the path and what was expected (the speedrun exits 2).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import socket
import tarfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from bsim_fast import datasets
from bsim_fast.atomic import remove_path, remove_stale_temps, temp_name
from bsim_fast.config import ConfigError

ARCHIVE = "cifar-10-python.tar.gz"
BATCHES = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
SIDE = 32
# The full set: 50,000 training and 10,000 test images of 10 classes (the targets are stated for it).
FULL = {"train": 50_000, "test": 10_000}
ACCEPTED = f"a folder with train/ and test/ image folders, {ARCHIVE}, or {BATCHES}/ (or a folder holding one of them)"


class CifarError(ConfigError):
    """CIFAR-10 cannot be found or read; one line naming the path (exit 2)."""


@dataclass
class Cifar10:
    """CIFAR-10 as two ImageFolder trees: `root/train` and `root/test`."""

    root: Path
    origin: str  # where it came from, for the report
    train_images: int
    test_images: int
    classes: list

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def test(self) -> Path:
        return self.root / "test"

    @property
    def is_full(self) -> bool:
        """The whole of CIFAR-10 (not the built-in subset or another set): the targets apply."""
        return (self.train_images, self.test_images, len(self.classes)) == (FULL["train"], FULL["test"], 10)


# ---------------------------------------------------------------------------------------- the pickles
def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as fn
    return fn


# What a pickled numpy array refers to (numpy 1 names its module numpy.core, numpy 2 numpy._core): nothing else.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that rebuilds plain containers and numpy arrays and refuses every other global, so a
    pickle holding code (`os.system`, any `__reduce__`) is an error, never run."""

    where = "pickle"

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise CifarError(
                f"{self.where}: holds a reference to {module}.{name}; only numpy arrays are "
                f"allowed in a CIFAR-10 batch (refused for safety, nothing was run)"
            )
        if name == "_reconstruct":
            return _reconstruct()
        return getattr(np, name)


def load_pickled_batch(data: bytes, where: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch (a pickled dict: `data` uint8 [N, 3072] channel planes, `labels` N ints) ->
    images uint8 [N, 32, 32, 3] and labels int64 [N], checked."""
    batch = _unpickle(data, where)
    if not isinstance(batch, dict):
        raise CifarError(f"{where}: not a CIFAR-10 batch (a {type(batch).__name__}, expected a dict)")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    pixels, labels = batch.get("data"), batch.get("labels")
    if not (
        isinstance(pixels, np.ndarray)
        and pixels.dtype == np.uint8
        and pixels.ndim == 2
        and pixels.shape[1] == 3 * SIDE * SIDE
    ):
        got = f"{pixels.dtype} {list(pixels.shape)}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise CifarError(f"{where}: 'data' is {got}, expected uint8 [N, {3 * SIDE * SIDE}]")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(pixels):
        raise CifarError(f"{where}: 'labels' must hold one class index per image ({len(pixels)})")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise CifarError(f"{where}: 'labels' holds values that are not class indices") from None
    if labels.size and not (0 <= labels.min() and labels.max() < num_classes):
        raise CifarError(f"{where}: labels outside 0..{num_classes - 1}")
    images = pixels.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # channel planes -> HWC
    return np.ascontiguousarray(images), labels


def load_class_names(data: bytes, where: str) -> list:
    meta = _unpickle(data, where)
    names = meta.get("label_names", meta.get(b"label_names")) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names:
        raise CifarError(f"{where}: no 'label_names' list")
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    if not all(isinstance(n, str) and n and "/" not in n and not n.startswith(".") for n in names):
        raise CifarError(f"{where}: class names must be plain names, found {names!r}")
    return names


def _unpickle(data: bytes, where: str):
    unpickler = _ArraysOnly(io.BytesIO(data), encoding="latin1")  # Python 2 pickles, as the originals
    unpickler.where = where
    try:
        return unpickler.load()
    except CifarError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or not a pickle: one line, whatever the cause
        raise CifarError(
            f"{where}: not a readable CIFAR-10 batch ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None


# ------------------------------------------------------------------------------------- the python version
def find_python_version(path: Path) -> Path | None:
    """The archive or batches folder at or directly inside `path`, or None."""
    for candidate in (path, path / BATCHES, path / ARCHIVE):
        if candidate.is_file() and candidate.name.endswith((".tar.gz", ".tgz", ".tar")):
            return candidate
        if candidate.is_dir() and (candidate / TEST_BATCH).is_file():
            return candidate
    return None


def _members(source: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the batch files, from the folder or read straight out of the archive (nothing is
    extracted to disk)."""
    names = (META, *TRAIN_BATCHES, TEST_BATCH)
    if source.is_dir():
        for name in names:
            f = source / name
            if not f.is_file():
                raise CifarError(f"{f}: missing (a {BATCHES} folder holds {', '.join(names)})")
            yield name, f.read_bytes()
        return
    wanted, found = {f"{BATCHES}/{name}": name for name in names}, {}
    try:
        with tarfile.open(source) as archive:
            for member in archive:  # one pass: a gzip stream re-reads from its start for every seek back
                name = wanted.get(member.name)
                if name is None:
                    continue
                if not member.isfile():
                    raise CifarError(f"{source}: {member.name} is not a regular file")
                found[name] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CifarError(f"{source}: not a readable tar archive ({exc})") from None
    missing = [name for name in names if name not in found]
    if missing:
        raise CifarError(f"{source}: no {BATCHES}/{missing[0]} inside; not the python version of CIFAR-10 ({ARCHIVE})")
    for name in names:
        yield name, found[name]


def read_python_version(source: Path) -> tuple[dict, list, str]:
    """{"train": (images, labels), "test": (...)}, class names, and the sha256 of the batch files."""
    digest = hashlib.sha256()
    classes, parts = None, {"train": [], "test": []}
    for name, data in _members(source):
        digest.update(data)
        where = f"{source}:{name}" if source.is_file() else str(source / name)
        if name == META:
            classes = load_class_names(data, where)
        else:
            parts["test" if name == TEST_BATCH else "train"].append(load_pickled_batch(data, where, len(classes)))
    splits = {k: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v])) for k, v in parts.items()}
    return splits, classes, digest.hexdigest()


def write_image_folders(splits: dict, classes: list, final: Path, workers: int = 8) -> None:
    """train/ and test/ ImageFolder trees of lossless PNG files under `final`, written into a temporary folder
    beside it and renamed into place whole (a killed run leaves no half tree under the final name; the next
    run removes its temporary). Every class folder exists in both splits, so the labels are the batches'.

    Flushed with one `os.sync()` before the rename rather than `atomic.atomic_output`'s fsync per file:
    60,000 fsync calls took a minute on a small machine, one sync well under a second (it flushes the whole
    machine's pending writes, which a busy machine pays for)."""
    from PIL import Image

    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = temp_name(final)
    remove_path(tmp)
    try:
        jobs = []
        for split, (images, labels) in splits.items():
            for c in classes:
                (tmp / split / c).mkdir(parents=True)
            jobs += [(tmp / split / classes[label] / f"{i:05d}.png", images[i]) for i, label in enumerate(labels)]

        def write(job) -> None:
            path, rgb = job
            Image.fromarray(rgb).save(path, compress_level=1)  # zlib releases the GIL: threads help

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(write, jobs, chunksize=256))
        os.sync()
        try:
            os.replace(tmp, final)
        except OSError:
            if not ((final / "train").is_dir() and (final / "test").is_dir()):
                raise  # not another run that converted the same batches first: a real failure
    finally:
        remove_path(tmp)


# ----------------------------------------------------------------------------------------- download
def download_host() -> tuple[str, int]:
    from torchvision.datasets import CIFAR10

    url = urlparse(CIFAR10.url)
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


def has_network(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def download(folder: Path, log: Callable[[str], None] = print) -> Path:
    """cifar-10-python.tar.gz into `folder` with torchvision's downloader (md5-checked); `find` has checked
    that the machine has a network."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_url

    log(f"[cifar10] downloading {CIFAR10.url} into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        download_url(CIFAR10.url, str(folder), CIFAR10.filename, CIFAR10.tgz_md5)
    except Exception as exc:  # noqa: BLE001 - network or checksum failure: one line
        raise CifarError(f"--download: {CIFAR10.url} failed ({type(exc).__name__}: {exc})") from None
    return folder / CIFAR10.filename


# ------------------------------------------------------------------------------------------ locate
def _count(folder: Path) -> tuple[int, list]:
    try:
        source = datasets.scan_image_folder(folder)
    except datasets.SourceError as exc:
        raise CifarError(f"{exc}") from None
    return len(source), source.classes


def from_image_folders(root: Path, origin: str) -> Cifar10:
    n_train, classes = _count(root / "train")
    n_test, test_classes = _count(root / "test")
    if test_classes != classes:
        raise CifarError(
            f"{root}: train/ and test/ have different class folders ({len(classes)} and "
            f"{len(test_classes)}: {', '.join(sorted(set(classes) ^ set(test_classes))[:5])})"
        )
    return Cifar10(root, origin, n_train, n_test, classes)


@dataclass
class Found:
    """What `find` saw at --data, before any work: `folders` (train/ + test/), `python` (the archive or the
    batches folder at `path`), `builtin`, or `download` (nothing there yet; `path` is the folder to fetch into)."""

    kind: str
    path: Path


def find(data: str, download_missing: bool = False, flag: str = "--data") -> Found:
    """Where CIFAR-10 is at `data` and in which form (module docstring); one line naming `flag` (the option
    that gave `data`) when it is not there. Reads no image and writes nothing: the speedrun and the acceptance
    run call it with their other argument checks."""
    if data == "builtin":
        return Found("builtin", Path(data))
    path = Path(data)
    if path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir():
        return Found("folders", path)
    source = find_python_version(path) if path.exists() else None
    if source is not None:
        return Found("python", source)
    if not download_missing:
        what = "not found" if not path.exists() else "holds no CIFAR-10"
        fetch = " (--download fetches it into a folder when the machine has a network)" if flag == "--data" else ""
        raise CifarError(f"{flag} {data}: {what}; expected {ACCEPTED}{fetch}")
    if path.exists() and not path.is_dir():
        raise CifarError(f"--data {data}: a file that is not {ARCHIVE}; --download needs a folder")
    host, port = download_host()
    if not has_network(host, port):
        raise CifarError(
            f"--data {data}: holds no CIFAR-10 and --download has no network ({host}:{port} "
            f"unreachable); copy {ARCHIVE} or train/ and test/ image folders there instead"
        )
    return Found("download", path)


def prepare(found: Found, cache: Path | None = None, workers: int = 8, log: Callable[[str], None] = print) -> Cifar10:
    """CIFAR-10 as train/ and test/ image folders: as found, or downloaded, or the python version converted
    once to PNG folders in `cache` (found there by its sha256 the next time)."""
    if found.kind == "builtin":
        return from_image_folders(datasets.builtin_root(), "the built-in CIFAR-10 subset (bsim_fast/data)")
    if found.kind == "folders":
        return from_image_folders(found.path, f"image folders {found.path}/train, {found.path}/test")
    source = download(found.path, log) if found.kind == "download" else found.path
    log(f"[cifar10] reading {source} (pickled batches, numpy arrays only)")
    splits, classes, sha = read_python_version(source)
    final = (cache or datasets.cache_dir()) / f"cifar10-python-{sha[:16]}"
    if not ((final / "train").is_dir() and (final / "test").is_dir()):
        log(f"[cifar10] writing {sum(len(v[1]) for v in splits.values())} PNG files to {final} (once)")
        write_image_folders(splits, classes, final, workers)
    return from_image_folders(final, f"python version {source} (as PNG in {final})")
