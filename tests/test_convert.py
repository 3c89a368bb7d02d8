"""Converters end to end on the built-in dataset: FFCV and DALI round trips, atomic output, kill, full disk.

Real FFCV and real DALI (CPU only). Small: 200-image subsets of the built-in set.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import read_beton, read_shards_with_dali, tmp_leftovers
from PIL import Image

from bsim_fast import atomic, converted, datasets
from data_prep import common

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data_prep/ holds scripts, not a package
from data_prep import write_dali, write_ffcv  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBSET = 200


@pytest.fixture(scope="module")
def builtin_subset():
    """(source, indices, expected labels) of the 200-image subset the round trips convert."""
    source = common.resolve_source("builtin", "train")
    indices = common.subset_indices(len(source), SUBSET)
    return source, indices, source.labels[indices]


# ---- built-in dataset -------------------------------------------------------------------------------


def test_builtin_root_extracts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BSIM_FAST_CACHE", str(tmp_path / "cache"))
    root = datasets.builtin_root()
    assert root == tmp_path / "cache" / "cifar10_mini"
    for split, per_class in (("train", 500), ("test", 100)):
        source = datasets.scan_image_folder(root / split)
        assert len(source.classes) == 10 and len(source) == 10 * per_class
        assert np.bincount(source.labels).tolist() == [per_class] * 10
    stamp = (root / "train").stat().st_mtime_ns
    assert datasets.builtin_root() == root and (root / "train").stat().st_mtime_ns == stamp  # not redone
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["cifar10_mini"]  # no temp left


def test_builtin_archive_with_path_traversal_is_refused(tmp_path, monkeypatch):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("cifar10_mini/../../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    monkeypatch.setattr(datasets, "BUILTIN_ARCHIVE", evil)
    monkeypatch.setenv("BSIM_FAST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(datasets.SourceError, match="unexpected archive member"):
        datasets.builtin_root()
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "cache" / "cifar10_mini").exists()


def test_default_output_names(tmp_path):
    train = common.resolve_source("builtin", "train")
    test = common.resolve_source(None, "test")
    assert (train.name, test.name) == (common.source_name("builtin"), common.source_name(None, "test"))
    assert write_ffcv.default_output(train.name, None) == REPO_ROOT / "data_out/cifar10_mini_train.beton"
    assert write_ffcv.default_output(test.name, 100) == REPO_ROOT / "data_out/cifar10_mini_test_subset100.beton"
    assert write_dali.default_output(train.name, None) == REPO_ROOT / "data_out/cifar10_mini_train_dali"
    assert len(test) == 1000 and write_ffcv.build_parser().parse_args([]).source == "builtin"
    (tmp_path / "photos").mkdir()
    (tmp_path / "list.txt").write_text("a.jpg\n")
    assert common.source_name(tmp_path / "photos") == "photos" and common.source_name(tmp_path / "list.txt") == "list"


# ---- round trips ------------------------------------------------------------------------------------


def test_ffcv_round_trip_raw_is_lossless(tmp_path, builtin_subset, capsys):
    source, indices, labels = builtin_subset
    out = tmp_path / "train.beton"
    assert (
        write_ffcv.main(["--subset", str(SUBSET), "--workers", "2", "--write-mode", "raw", "--output", str(out)]) == 0
    )
    assert f"wrote {SUBSET} images" in capsys.readouterr().out
    images, got_labels = read_beton(out)
    assert images.shape == (SUBSET, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(got_labels, labels)
    for k in (0, 77, SUBSET - 1):  # raw mode: exactly the decoded source pixels
        expected = datasets.decode_rgb(Path(source.paths[indices[k]]).read_bytes(), 512)
        assert np.array_equal(images[k], expected)
    assert tmp_leftovers(tmp_path) == []
    assert (tmp_path / "train.beton.skipped.tsv").read_text() == "path\treason\n"


def test_ffcv_round_trip_jpg_mode(tmp_path, builtin_subset):
    source, indices, labels = builtin_subset
    out = tmp_path / "jpg.beton"
    assert (
        write_ffcv.main(
            ["--subset", "50", "--workers", "1", "--write-mode", "jpg", "--jpeg-quality", "95", "--output", str(out)]
        )
        == 0
    )
    images, got_labels = read_beton(out)
    subset = common.subset_indices(len(source), 50)
    assert images.shape == (50, 32, 32, 3) and np.array_equal(got_labels, source.labels[subset])
    expected = datasets.decode_rgb(Path(source.paths[subset[3]]).read_bytes(), 512)
    assert np.abs(images[3].astype(int) - expected).mean() < 8  # lossy, but the same picture


def test_dali_round_trip_and_index_files(tmp_path, builtin_subset):
    from wds2idx import IndexCreator  # DALI's own index tool

    source, indices, labels = builtin_subset
    out = tmp_path / "shards"
    assert (
        write_dali.main(
            ["--subset", str(SUBSET), "--workers", "2", "--shard-size", "64", "--order", "source", "--output", str(out)]
        )
        == 0
    )
    meta = converted.check_shards(out, deep=True)
    assert meta["num_samples"] == SUBSET and len(meta["classes"]) == 10
    assert [s["num_samples"] for s in meta["shards"]] == [64, 64, 64, 8]
    for shard in meta["shards"]:  # our index == what DALI's wds2idx makes of the same tar
        reference = tmp_path / "reference.idx"
        with IndexCreator(str(out / shard["tar"]), str(reference), verbose=False) as creator:
            creator.create_index()
        assert (out / shard["index"]).read_text() == reference.read_text()

    images, got_labels, _ = read_shards_with_dali(out)
    assert len(images) == SUBSET and np.array_equal(got_labels, labels)
    assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)

    with tarfile.open(out / "shard-000000.tar") as tar:  # baseline RGB JPEGs are stored byte for byte
        names = tar.getnames()
        assert names[:4] == ["000000000.jpg", "000000000.cls", "000000001.jpg", "000000001.cls"]
        assert tar.extractfile("000000001.jpg").read() == Path(source.paths[indices[1]]).read_bytes()
        assert tar.extractfile("000000001.cls").read() == str(labels[1]).encode()


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 3, 24, 20), dtype=np.uint8)  # NCHW is accepted too
    labels = rng.integers(0, 4, 30)
    np.savez(tmp_path / "arrays.npz", images=images, labels=labels)
    out = tmp_path / "npz_shards"
    assert (
        write_dali.main(
            ["--source", str(tmp_path / "arrays.npz"), "--workers", "1", "--order", "source", "--output", str(out)]
        )
        == 0
    )
    meta = converted.check_shards(out, deep=True)
    assert meta["num_samples"] == 30 and meta["classes"] == ["0", "1", "2", "3"]
    with tarfile.open(out / "shard-000000.tar") as tar:
        got = [int(tar.extractfile(f"{k:09d}.cls").read()) for k in range(30)]
        first = np.asarray(Image.open(tar.extractfile("000000000.jpg")))
    assert got == labels.tolist() and first.shape == (24, 20, 3)

    np.savez(tmp_path / "objects.npz", images=np.array([object()]), labels=np.zeros(1))
    with pytest.raises(datasets.SourceError, match="objects.npz"):  # pickled arrays are never loaded
        common.resolve_source(tmp_path / "objects.npz")


# ---- atomic output: killed, failing, full disk ---------------------------------------------------------


def test_killed_converter_leaves_no_output_and_rerun_completes(tmp_path):
    out = tmp_path / "killed"
    command = [
        sys.executable,
        str(REPO_ROOT / "data_prep" / "write_dali.py"),
        "--workers",
        "1",
        "--shard-size",
        "500",
        "--output",
        str(out),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    temp = tmp_path / f"killed.tmp-{process.pid}"
    deadline = time.monotonic() + 60
    while not (temp / "shard-000000.tar").exists():  # it is writing: kill it mid-way
        assert process.poll() is None and time.monotonic() < deadline, "converter ended before it was killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()

    assert write_dali.main(["--subset", "100", "--workers", "1", "--output", str(out)]) == 0
    assert converted.check_shards(out, deep=True)["num_samples"] == 100
    assert tmp_leftovers(tmp_path) == []  # the dead run's temporary folder was cleaned up


def test_ffcv_failure_mid_write_keeps_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "keep.beton"
    assert write_ffcv.main(["--subset", "40", "--workers", "1", "--output", str(out)]) == 0
    before = out.read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash in the middle of the write")

    monkeypatch.setattr(write_ffcv, "write_beton", crash)
    with pytest.raises(RuntimeError):
        write_ffcv.convert(
            write_ffcv.build_parser().parse_args(["--subset", "40", "--output", str(out), "--overwrite"])
        )
    assert out.read_bytes() == before and tmp_leftovers(tmp_path) == []


def test_ffcv_full_disk_in_writer_worker(tmp_path, monkeypatch, capsys):
    """ENOSPC inside FFCV's forked writer process: a clear error, not a hang; previous output kept."""
    from ffcv.memory_allocator import MemoryAllocator

    out = tmp_path / "full.beton"
    assert write_ffcv.main(["--subset", "40", "--workers", "1", "--output", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()

    def no_space(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MemoryAllocator, "flush_page", no_space)  # inherited by the forked workers
    monkeypatch.setattr(write_ffcv, "writer_count", lambda workers, data_bytes, page_size: workers)  # both write
    assert write_ffcv.main(["--subset", "40", "--workers", "2", "--output", str(out), "--overwrite"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no space left on device" in error and str(out) in error
    assert out.read_bytes() == before and tmp_leftovers(tmp_path) == []


def test_dali_full_disk_keeps_previous_output(tmp_path, monkeypatch, capsys):
    out = tmp_path / "full_shards"
    assert write_dali.main(["--subset", "30", "--workers", "1", "--output", str(out)]) == 0
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    capsys.readouterr()

    real_addfile = tarfile.TarFile.addfile

    def fill_disk(self, tarinfo, fileobj=None):
        if tarinfo.name.startswith("000000010"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_addfile(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", fill_disk)
    assert write_dali.main(["--subset", "30", "--workers", "1", "--output", str(out), "--overwrite"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(
        f"no space left on device while writing {out} (temporary output removed; previous output kept)"
    )
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    assert tmp_leftovers(tmp_path) == []


def test_atomic_output_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "folder"
    for content in ("first", "second"):
        with atomic.atomic_output(final, directory=True) as tmp:
            (tmp / "file.txt").write_text(content)
            assert not (final / "file.txt").exists() or (final / "file.txt").read_text() == "first"
    assert (final / "file.txt").read_text() == "second" and tmp_leftovers(tmp_path) == []
    assert os.listdir(final) == ["file.txt"]


def test_dali_shards_are_shuffled_by_default_with_labels_intact(tmp_path, builtin_subset):
    """DALI reads shards sequentially through a bounded shuffle buffer, so class-sorted shards would make
    single-class batches: the default order is a fixed-seed permutation."""
    source, indices, labels = builtin_subset
    out = tmp_path / "shuffled"
    assert write_dali.main(["--subset", str(SUBSET), "--workers", "1", "--shard-size", "64", "--output", str(out)]) == 0
    shard_labels = []
    for shard in converted.check_shards(out, deep=True)["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            shard_labels += [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    assert sorted(shard_labels) == sorted(labels) and shard_labels != list(labels)
    assert len(set(shard_labels[:64])) == 10  # the first shard already holds every class
    again = tmp_path / "again"
    args = ["--subset", str(SUBSET), "--workers", "1", "--shard-size", "64", "--output", str(again)]
    assert write_dali.main(args) == 0
    assert (again / "shard-000000.tar").read_bytes() == (out / "shard-000000.tar").read_bytes()  # reproducible
