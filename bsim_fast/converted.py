"""Validators of converted outputs: a .beton or a DALI shard folder is checked against its own records before
anything reads it, so a truncated or altered file is named in one line (CorruptOutputError) instead of
surfacing as garbage pointers or an opaque reader error. The loaders run them as they open a set; the
converters run them on what they have just written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from .datasets import CorruptOutputError, short_reason


def check_beton(path: str | os.PathLike) -> int:
    """Checks an FFCV .beton for truncation/inconsistency without decoding it; returns num_samples.

    FFCV itself reads a truncated file into garbage pointers or an opaque numpy error; this names the file.
    """
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    path = Path(path)

    def bad(detail: str) -> CorruptOutputError:
        return CorruptOutputError(
            f"{path}: truncated or corrupt .beton ({detail}); rewrite it with data_prep/write_ffcv.py"
        )

    if not path.is_file():
        raise CorruptOutputError(f"{path}: .beton file not found")
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise bad(f"{size} bytes, shorter than the header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise bad(f"format version {int(header['version'])}, expected {CURRENT_VERSION}")
    num_samples = int(header["num_samples"])
    table_at = int(header["alloc_table_ptr"])
    fields_end = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
    if table_at == 0:
        raise bad("writer did not finish: no allocation table")
    if table_at > size or table_at < fields_end:
        raise bad(f"allocation table at byte {table_at}, file has {size} bytes")
    if (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise bad("allocation table cut mid-entry")
    fields = np.fromfile(path, dtype=FieldDescType, count=int(header["num_fields"]), offset=HeaderType.itemsize)
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    if table.size and int((table["ptr"] + table["size"]).max()) > table_at:
        raise bad("a sample's data lies beyond the data region")
    # Fields other than int/float (images, bytes, arrays) store every sample in an allocation.
    if num_samples and any(int(t) not in (0, 1) for t in fields["type_id"]):
        covered = np.unique(table["sample_id"])
        if covered.size != num_samples or int(covered[-1]) != num_samples - 1:
            raise bad(f"allocation table covers {covered.size} of {num_samples} samples")
    return num_samples


def read_wds_index(path: Path) -> list[list[tuple[str, int, int, str]]]:
    """Parses a DALI webdataset index (wds2idx v1.2): per sample a list of (ext, offset, size, name)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError("empty index file")
    version, count = lines[0].split()
    if version != "v1.2":
        raise ValueError(f"unknown index version {version!r}")
    samples = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"malformed index line {line!r}")
        samples.append(
            [(parts[k], int(parts[k + 1]), int(parts[k + 2]), parts[k + 3]) for k in range(0, len(parts), 4)]
        )
    if len(samples) != int(count):
        raise ValueError(f"index announces {count} samples, lists {len(samples)}")
    return samples


def check_shards(folder: str | os.PathLike, deep: bool = False) -> dict:
    """Checks a DALI shard folder against its meta.json and index files; returns meta.json's content.

    Every shard must have the recorded size and every indexed member must lie inside it. With deep=True
    the 512-byte tar header in front of each member is read and its name compared with the index.
    """
    folder = Path(folder)
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptOutputError(
            f"{meta_path}: missing; not a shard folder written by data_prep/write_dali.py"
        ) from None
    except (ValueError, OSError) as exc:
        raise CorruptOutputError(f"{meta_path}: unreadable ({short_reason(exc)})") from None
    total = 0
    for shard in meta.get("shards", []):
        tar_path, idx_path = folder / Path(shard["tar"]).name, folder / Path(shard["index"]).name
        if not tar_path.is_file():
            raise CorruptOutputError(f"{tar_path}: shard missing")
        size = tar_path.stat().st_size
        if size != shard["bytes"]:
            raise CorruptOutputError(
                f"{tar_path}: truncated or altered shard ({size} bytes, "
                f"meta.json records {shard['bytes']}); rewrite with data_prep/write_dali.py"
            )
        try:
            samples = read_wds_index(idx_path)
        except (OSError, ValueError) as exc:
            raise CorruptOutputError(f"{idx_path}: bad index file ({short_reason(exc)})") from None
        if len(samples) != shard["num_samples"]:
            raise CorruptOutputError(f"{idx_path}: {len(samples)} samples, meta.json records {shard['num_samples']}")
        with open(tar_path, "rb") if deep else contextlib.nullcontext() as tar:
            for components in samples:
                for _ext, offset, length, name in components:
                    if offset + length > size:
                        raise CorruptOutputError(
                            f"{tar_path}: member {name} ends at byte {offset + length}, shard has {size}"
                        )
                    if deep:
                        tar.seek(offset - tarfile.BLOCKSIZE)
                        info = tarfile.TarInfo.frombuf(tar.read(tarfile.BLOCKSIZE), "utf-8", "strict")
                        if info.name != name or info.size != length:
                            raise CorruptOutputError(
                                f"{tar_path}: index says {name} ({length} bytes) "
                                f"at {offset}, tar has {info.name} ({info.size})"
                            )
        total += len(samples)
    if total != meta.get("num_samples"):
        raise CorruptOutputError(
            f"{meta_path}: shards hold {total} samples, meta.json records {meta.get('num_samples')}"
        )
    return meta
