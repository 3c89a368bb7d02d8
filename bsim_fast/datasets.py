"""The datasets the loaders read, and the checks that name a bad file in one line.

- the built-in dataset (`builtin_root`: a CIFAR-10 subset shipped with the package);
- image folders (`scan_image_folder`): an ImageFolder tree (class = sub-folder) or, with `labeled=False`, an
  unlabeled collection (every image below the folder, label `UNLABELED`); the converters and the torch /
  GPU-resident loaders list a folder through this one function, so a folder gives the same samples and
  labels whatever reads it;
- robust decoding of one image file to RGB uint8 (every Pillow mode becomes RGB; corrupt or non-image files
  raise `SampleError` with a one-line reason);
- validators of the converters' outputs (`check_beton`, `check_shards`), called before a loader reads, so a
  truncated file gives an error naming it instead of garbage, and `labeled_from_labels` for the label column.

The converters' own plumbing (array and list sources, JPEG encoding for storage, parallel validation, the
command line) is in data_prep/common.py.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BUILTIN_ARCHIVE = Path(__file__).resolve().parent / "data" / "cifar10_mini.tar.gz"
BUILTIN_NAME = "cifar10_mini"
SPLITS = ("train", "test")

# Larger than any photo a vision data set holds (ImageNet's largest is ~ 40 MP), small enough that a
# crafted "decompression bomb" is skipped before it is decoded. Checked from the header, before decoding.
MAX_IMAGE_PIXELS = 150_000_000
# torchvision's ImageFolder extensions; other files in a class folder (README, .DS_Store) are ignored.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"})
# The label every sample of an unlabeled collection carries (FFCV IntField -1, DALI `.cls` member "-1").
UNLABELED = -1


class SourceError(Exception):
    """The source as a whole is unusable (missing path, bad array file). One line; exit 2."""


class NoClassFoldersError(SourceError):
    """A labelled scan found no class sub-folders; the caller adds how to read the folder unlabeled."""


class SampleError(Exception):
    """One sample cannot be used; the message is the reason (the caller adds the file name)."""


class CorruptOutputError(Exception):
    """A written .beton or shard folder is truncated or inconsistent. The message names the file."""


# --------------------------------------------------------------------------------------------------
# The built-in dataset


def cache_dir() -> Path:
    env = os.environ.get("BSIM_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bsim_fast"


def builtin_root() -> Path:
    """The built-in CIFAR-10 subset as ImageFolder trees: returns the folder holding train/ and test/.

    Extracted once from the bundled tar.gz into the cache. Extraction goes to a temporary folder beside
    the final one and is renamed into place, so a killed extraction never leaves a half tree under the
    final name, and concurrent first calls are safe (the loser of the rename race uses the winner's tree).
    """
    final = cache_dir() / BUILTIN_NAME
    if all((final / split).is_dir() for split in SPLITS):
        return final
    if not BUILTIN_ARCHIVE.is_file():
        raise SourceError(f"built-in dataset archive missing: {BUILTIN_ARCHIVE}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{BUILTIN_NAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with tarfile.open(BUILTIN_ARCHIVE, "r:gz") as archive:
            members = [_checked_member(m) for m in archive.getmembers()]
            # filter="data" also refuses absolute paths, "..", links and device files: nothing read from an
            # archive decides where anything is written outside the cache
            archive.extractall(tmp, members=members, filter="data")
        try:
            os.replace(tmp / BUILTIN_NAME, final)
        except OSError:
            if not all((final / split).is_dir() for split in SPLITS):
                raise  # not a lost race: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _checked_member(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """Only plain files and folders under cifar10_mini/ may come out of the bundled archive."""
    parts = Path(member.name).parts
    inside = parts and parts[0] == BUILTIN_NAME and ".." not in parts and not Path(member.name).is_absolute()
    if not inside or not (member.isfile() or member.isdir()):
        raise SourceError(f"{BUILTIN_ARCHIVE}: unexpected archive member {member.name!r}")
    return member


# --------------------------------------------------------------------------------------------------
# Sources


# Folders that operating systems, file managers and NAS boxes add beside photos (thumbnails, metadata, recycle
# bins): never a class, never read, like a hidden (dot) folder. Compared case-insensitively (Windows, SMB shares).
SYSTEM_FOLDERS = frozenset(
    name.casefold()
    for name in (
        "@eaDir",  # Synology thumbnails and metadata, one in every folder
        "#recycle",
        "#snapshot",
        "@Recycle",  # QNAP
        "@Recently-Snapshot",
        "__MACOSX",  # left by unpacking a zip made on a Mac
        "$RECYCLE.BIN",
        "System Volume Information",
        "lost+found",
    )
)
EXAMPLES = 3  # names shown of each kind of file left out


def passed_over(name: str) -> bool:
    """A hidden entry (a leading dot: .thumbnails, .DS_Store, ._IMG.jpg) or a system folder: not listed."""
    return name.startswith(".") or name.casefold() in SYSTEM_FOLDERS


@dataclass
class LeftOut:
    """What a folder scan passed over, counted, with a few names of each kind for the lines that report it."""

    root: str
    hidden_files: int = 0
    folders: dict[str, int] = field(default_factory=dict)  # hidden or system folder name -> how many
    counts: dict[str, int] = field(default_factory=lambda: {"non_images": 0, "unclassed": 0})
    examples: dict[str, list[str]] = field(default_factory=lambda: {"non_images": [], "unclassed": []})

    def add(self, kind: str, path: str) -> None:
        """`kind`: non_images (a file of another extension) or unclassed (an image beside the class folders)."""
        self.counts[kind] += 1
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(os.path.relpath(path, self.root))

    def add_passed_over(self, name: str, is_folder: bool) -> None:
        if is_folder:
            self.folders[name] = self.folders.get(name, 0) + 1
        else:
            self.hidden_files += 1

    def lines(self, unclassed_hint: str = "") -> list[str]:
        """One line per kind left out, naming it (hidden files alone are only counted in the summary)."""
        out = []
        if self.folders:
            named = ", ".join(name if k == 1 else f"{name} ({k}x)" for name, k in sorted(self.folders.items()))
            out.append(f"passed over hidden and system folders in {self.root} (not classes, not read): {named}")
        for kind, verb, what in (
            ("unclassed", "left out", f"image(s) at the top of {self.root}, in no class folder"),
            ("non_images", "ignored", "file(s) that are not images by their extension"),
        ):
            if self.counts[kind]:
                shown = ", ".join(self.examples[kind]) + (", ..." if self.counts[kind] > EXAMPLES else "")
                hint = unclassed_hint if kind == "unclassed" else ""
                out.append(f"{verb} {self.counts[kind]} {what} (e.g. {shown}){hint}")
        return out


@dataclass
class Source:
    """An indexable set of images with labels (`UNLABELED` for every sample of an unlabeled set).

    `name` is used for default output names; `classes` is empty when `labeled` is false.
    """

    name: str
    classes: list[str]
    labels: np.ndarray  # int64 [N]
    empty_classes: list[str] = field(default_factory=list)
    left_out: LeftOut = field(default_factory=lambda: LeftOut(""))  # what a folder scan passed over
    labeled: bool = True

    @property
    def ignored(self) -> int:
        """Files left out by their extension (not images; not counted as bad input)."""
        return self.left_out.counts["non_images"]

    @property
    def hidden(self) -> int:
        """Hidden files and hidden or system folders, not listed (a folder counts once; it is not entered)."""
        return self.left_out.hidden_files + sum(self.left_out.folders.values())

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def describe(self, i: int) -> str:
        raise NotImplementedError

    def load_rgb(self, i: int, max_resolution: int) -> np.ndarray:
        raise NotImplementedError


@dataclass
class FolderSource(Source):
    """Image files by path: an ImageFolder tree (class = sorted sub-folder names, label = position in that
    list), an unlabeled folder, or the entries of a list file (data_prep/common.py)."""

    root: Path = Path(".")
    paths: list[str] = field(default_factory=list)
    missing_reason: str = "file disappeared"  # a listed path that does not exist (scanned: it vanished since)

    def describe(self, i: int) -> str:
        return self.paths[i]

    def read_bytes(self, i: int) -> bytes:
        return read_file(self.paths[i], self.missing_reason)

    def load_rgb(self, i: int, max_resolution: int) -> np.ndarray:
        return decode_rgb(self.read_bytes(i), max_resolution)


def class_folders(root: Path) -> list[str]:
    """The class folders of an ImageFolder tree: its sub-folders, sorted, hidden and system ones excluded."""
    return sorted(e.name for e in os.scandir(root) if not passed_over(e.name) and _is_dir(e.path))


def scan_image_folder(root: Path, labeled: bool = True) -> FolderSource:
    """Lists an image folder without opening any image.

    labeled=True: an ImageFolder tree, root/<class>/.../<image>; raises NoClassFoldersError when root has no
    class sub-folders; images at the top of root, beside the class folders, belong to no class and are left
    out (counted in `left_out`, never called "not images"). labeled=False: every image below root, at any
    depth, sorted by path, label `UNLABELED`. Symlinked folders are followed once each (a symlink loop is cut,
    not followed forever); symlinked files are listed and a broken one is later skipped as bad input. Hidden
    entries (a leading dot) and system folders (`SYSTEM_FOLDERS`: @eaDir, __MACOSX, ...) are not listed, at
    any depth; files of other extensions are counted. `left_out.lines()` says what was passed over.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"source not found or not a folder: {root}")
    name = root.resolve().name or "dataset"
    left_out = LeftOut(str(root))
    if not labeled:
        paths = _list_image_files(root, left_out)
        if not paths:
            raise SourceError(f"no image files in {root} (looked at every folder below it)")
        return FolderSource(
            name=name,
            classes=[],
            labels=np.full(len(paths), UNLABELED, np.int64),
            left_out=left_out,
            labeled=False,
            root=root,
            paths=paths,
        )
    classes = class_folders(root)
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if passed_over(entry.name):
            left_out.add_passed_over(entry.name, _is_dir(entry.path))
        elif not _is_dir(entry.path):
            left_out.add("unclassed" if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES else "non_images", entry.path)
    if not classes:
        passed = f"; passed over {', '.join(sorted(left_out.folders))}" if left_out.folders else ""
        raise NoClassFoldersError(f"no class folders in {root} (expected {root}/<class>/<image>{passed})")
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for index, class_name in enumerate(classes):
        files = _list_image_files(root / class_name, left_out)
        if not files:
            empty.append(class_name)
        paths.extend(files)
        labels.extend([index] * len(files))
    if not paths:
        raise SourceError(f"no image files in {root} ({len(classes)} class folders, all empty)")
    return FolderSource(
        name=name,
        classes=classes,
        labels=np.asarray(labels, np.int64),
        empty_classes=empty,
        left_out=left_out,
        root=root,
        paths=paths,
    )


def _is_dir(path: str) -> bool:
    try:
        return os.path.isdir(path)
    except OSError:
        return False


def _list_image_files(folder: Path, left_out: LeftOut) -> list[str]:
    """Image files below `folder` (recursive, sorted); what is passed over is counted in `left_out`."""
    files: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:  # reached again through a symlink: a loop or a duplicate
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        for d in sorted(dirnames):
            if passed_over(d):
                left_out.add_passed_over(d, is_folder=True)
        dirnames[:] = sorted(d for d in dirnames if not passed_over(d))
        for name in sorted(filenames):
            if passed_over(name):
                left_out.add_passed_over(name, is_folder=False)
            elif Path(name).suffix.lower() in IMAGE_SUFFIXES:
                files.append(os.path.join(dirpath, name))
            else:
                left_out.add("non_images", os.path.join(dirpath, name))
    files.sort()
    return files


def labeled_from_labels(labels: np.ndarray, where: str) -> bool:
    """Whether a converted set's label column is labelled (all >= 0) or unlabeled (all `UNLABELED`).

    A mix, or another negative value, is not something the converters write: CorruptOutputError naming `where`.
    """
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() >= 0:
        return True
    if (labels == UNLABELED).all():
        return False
    raise CorruptOutputError(
        f"{where}: labels mix unlabeled ({UNLABELED}) and labelled samples "
        f"(min {int(labels.min())}); rewrite it with data_prep/"
    )


# --------------------------------------------------------------------------------------------------
# Decoding one sample


def read_file(path: str, missing_reason: str = "file disappeared") -> bytes:
    """The file's bytes, or SampleError with a reason a user understands."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device named *.jpg would block the read
            raise SampleError("not a regular file")
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SampleError("broken symlink" if os.path.islink(path) else missing_reason) from None
    except PermissionError:
        raise SampleError("permission denied") from None
    except IsADirectoryError:
        raise SampleError("is a directory, not a file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SampleError("symlink loop") from None
        raise SampleError(f"cannot read ({exc.strerror or exc})") from None
    if not data:
        raise SampleError("empty file (0 bytes)")
    return data


def short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# `open_image` keeps the size stored in the file here, in `image.info`.
FILE_SIZE_KEY = "bsim_fast_file_size"


def open_image(data: bytes, max_resolution: int) -> Image.Image:
    """Opens, bomb-checks and fully decodes (so truncation is caught here), JPEGs at reduced scale.

    `image.info[FILE_SIZE_KEY]` is the (width, height) stored in the file, before any reduced-scale decoding.
    """
    with warnings.catch_warnings():
        # Pillow's own bomb warning fires at 89 MP; our limit (checked below) is the one that applies.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise SampleError("not an image (unrecognised content)") from None
        except Image.DecompressionBombError as exc:
            raise SampleError(f"too many pixels, possible decompression bomb ({short_reason(exc)})") from None
        except Exception as exc:
            raise SampleError(f"unreadable image header ({short_reason(exc)})") from None
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise SampleError(f"too many pixels ({width}x{height} > {MAX_IMAGE_PIXELS}), possible decompression bomb")
        if width < 1 or height < 1:
            raise SampleError(f"empty image ({width}x{height})")
        image.info[FILE_SIZE_KEY] = (width, height)  # `image.size` after draft() is the reduced size
        if image.format == "JPEG" and max(width, height) > max_resolution:
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly: a huge JPEG never exists at full size.
            image.draft(image.mode if image.mode in ("RGB", "L") else None, (max_resolution, max_resolution))
        try:
            image.load()
        except Exception as exc:
            raise SampleError(f"corrupt or truncated image data ({short_reason(exc)})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Every Pillow mode -> RGB.

    Transparency is composited on white rather than dropped: the colour stored under fully transparent
    pixels is arbitrary (often black, sometimes leftover content) and was never meant to be seen, while
    white is what a viewer shows and what a labeller saw.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(image)), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, P, CMYK (Adobe-inverted handled by Pillow), YCbCr, ...
    except Exception as exc:
        raise SampleError(f"unsupported image mode {mode} ({short_reason(exc)})") from None


def _high_depth_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit (and 32-bit int / float) grey levels -> 8 bit, keeping the full range (not clipping it)."""
    values = values.astype(np.float64)
    top = values.max() if values.size else 0.0
    if values.dtype.kind == "f" and top <= 1.0:
        scale = 255.0  # float images in [0, 1]
    elif top <= 255:
        scale = 1.0
    else:
        scale = 255.0 / 65535.0 if top <= 65535 else 255.0 / top
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def fit_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """Size with the longer side <= max_resolution, aspect kept, never below 1 pixel."""
    longer = max(width, height)
    if longer <= max_resolution:
        return width, height
    scale = max_resolution / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_rgb(data: bytes, max_resolution: int) -> np.ndarray:
    """Image file bytes -> RGB uint8 [H, W, 3], upright (EXIF), longer side <= max_resolution."""
    return rgb_array(open_image(data, max_resolution), max_resolution)


def rgb_array(image: Image.Image, max_resolution: int) -> np.ndarray:
    """An image from `open_image` -> RGB uint8 [H, W, 3], upright (EXIF), longer side <= max_resolution.

    `image` itself is left as it was (its mode, size and EXIF still say what the file held).
    """
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:
        upright = image  # a malformed EXIF block must not cost a decodable image: keep the stored orientation
    rgb = to_rgb(upright)
    size = fit_size(*rgb.size, max_resolution)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
