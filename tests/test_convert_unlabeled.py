"""Unlabeled collections and list files as converter sources: real FFCV and DALI round trips, labels -1 and
`"labeled": false` for an unlabeled set, labels preserved from a list, and the bad-input policy for lists."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import read_beton, read_shards_with_dali, tmp_leftovers
from PIL import Image

from bsim_fast import datasets
from data_prep import common, write_dali, write_ffcv


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour gradients (what JPEG is made for: a re-encoded copy stays close), one per seed."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 37 * seed % 256)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def put_image(path: Path, seed: int, fmt: str = "JPEG", size: tuple[int, int] = (20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()
    picture(*size, seed=seed).save(out, fmt)
    path.write_bytes(out.getvalue())
    return path


@pytest.fixture
def photos(tmp_path):
    """A camera roll: folders by year (not classes), images at every depth, hidden entries, a non-image
    file and a symlink back to the root. Returns (root, the images in the converters' order)."""
    root = tmp_path / "photos"
    images = [
        put_image(root / "2021" / "a.jpg", 1),
        put_image(root / "2021" / "b.png", 2, "PNG"),
        put_image(root / "2021" / "trip" / "c.jpg", 3),
        put_image(root / "2022" / "d.jpg", 4),
        put_image(root / "top.jpg", 5),
    ]
    put_image(root / ".hidden.jpg", 6)
    put_image(root / "2022" / ".thumbs" / "d_small.jpg", 7)
    (root / "notes.txt").write_text("not an image")
    os.symlink(root, root / "2022" / "again")  # a loop: cut, not followed
    return root, [str(p) for p in images]


# ---- scanning ---------------------------------------------------------------------------------------


def test_unlabeled_scan_lists_every_image_once_sorted(photos):
    root, images = photos
    source = datasets.scan_image_folder(root, labeled=False)
    assert source.paths == images and not source.labeled and source.classes == []
    assert source.labels.dtype == np.int64 and source.labels.tolist() == [datasets.UNLABELED] * len(images)
    assert (source.ignored, source.hidden) == (1, 2)  # notes.txt; .hidden.jpg and .thumbs/
    assert source.name == "photos" and source.load_rgb(0, 512).shape == (16, 20, 3)


def test_labeled_scan_counts_hidden_entries(tmp_path):
    put_image(tmp_path / "cat" / "1.jpg", 1)
    put_image(tmp_path / "cat" / ".1.jpg", 2)  # hidden file: not listed, counted
    put_image(tmp_path / ".cache" / "x.jpg", 3)  # hidden folder: not a class, counted once
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0")
    source = datasets.scan_image_folder(tmp_path)
    assert source.classes == ["cat"] and len(source) == 1 and source.labeled
    assert (source.ignored, source.hidden) == (0, 3)


def test_labeled_from_labels():
    assert datasets.labeled_from_labels(np.array([0, 3, 1]), "x") is True
    assert datasets.labeled_from_labels(np.array([], np.int64), "x") is True
    assert datasets.labeled_from_labels(np.full(4, -1), "x") is False
    for mixed in ([-1, 0], [-2, -2]):
        with pytest.raises(datasets.CorruptOutputError, match="data.beton: labels mix"):
            datasets.labeled_from_labels(np.array(mixed), "data.beton")


def test_flat_folder_without_the_flag_says_how_to_convert_it(tmp_path, capsys):
    flat = tmp_path / "flat"
    for k in range(3):
        put_image(flat / f"{k}.jpg", k)
    for main, out in ((write_ffcv.main, tmp_path / "flat.beton"), (write_dali.main, tmp_path / "flat_dali")):
        assert main(["--source", str(flat), "--output", str(out), "--workers", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"no class folders in {flat}" in err[0] and "add --no-labels" in err[0]
        assert main(["--source", str(flat), "--output", str(out), "--workers", "1", "--no-labels"]) == 0
        assert "wrote 3 unlabeled images" in capsys.readouterr().out


# ---- round trips ------------------------------------------------------------------------------------


def test_ffcv_unlabeled_round_trip(photos, tmp_path, capsys):
    root, images = photos
    out = tmp_path / "photos.beton"
    assert (
        write_ffcv.main(
            ["--source", str(root), "--no-labels", "--write-mode", "raw", "--workers", "1", "--output", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"wrote 5 unlabeled images to {out} (0 skipped; 3 ignored")
    got, labels = read_beton(out)
    assert labels.tolist() == [-1] * 5 and datasets.labeled_from_labels(labels, str(out)) is False
    for k, path in enumerate(images):
        assert np.array_equal(got[k], datasets.decode_rgb(Path(path).read_bytes(), 512)), path
    summary = json.loads((tmp_path / "photos.beton.summary.json").read_text())
    assert summary == json.loads(printed[1])
    assert summary["labeled"] is False and summary["classes"] == [] and summary["num_classes"] == 0
    assert (summary["ignored_non_image_files"], summary["ignored_hidden"]) == (1, 2)
    assert tmp_leftovers(tmp_path) == []


def test_dali_unlabeled_round_trip(photos, tmp_path):
    root, images = photos
    out = tmp_path / "photos_dali"
    assert (
        write_dali.main(
            ["--source", str(root), "--no-labels", "--order", "source", "--workers", "1", "--output", str(out)]
        )
        == 0
    )
    got, labels, meta = read_shards_with_dali(out)
    assert meta["labeled"] is False and meta["classes"] == [] and meta["num_samples"] == 5
    assert labels.tolist() == [-1] * 5
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert tar.extractfile("000000000.cls").read() == b"-1"
        assert tar.extractfile("000000000.jpg").read() == Path(images[0]).read_bytes()  # stored as is
    for k, path in enumerate(images):
        expected = datasets.decode_rgb(Path(path).read_bytes(), 512).astype(int)
        assert got[k].shape == expected.shape and np.abs(got[k] - expected).mean() < 3, path  # b.png: lossy
    assert json.loads((tmp_path / "photos_dali.summary.json").read_text())["labeled"] is False


def test_builtin_and_npz_sources_unlabeled(tmp_path):
    out = tmp_path / "builtin.beton"
    assert write_ffcv.main(["--no-labels", "--subset", "20", "--workers", "1", "--output", str(out)]) == 0
    assert read_beton(out)[1].tolist() == [-1] * 20
    np.savez(tmp_path / "images_only.npz", images=np.zeros((6, 8, 8, 3), np.uint8))  # no 'labels' needed
    source = common.resolve_source(tmp_path / "images_only.npz", labeled=False)
    assert len(source) == 6 and not source.labeled and source.labels.tolist() == [-1] * 6
    with pytest.raises(datasets.SourceError, match="missing array"):
        common.resolve_source(tmp_path / "images_only.npz")


# ---- list files -------------------------------------------------------------------------------------


@pytest.fixture
def listed(tmp_path):
    """A list with class-name labels, a comment, a header, a blank line, a quoted path holding a comma, an
    absolute path, a missing file and a corrupt one. Returns (list, good (path, label) in order, bad)."""
    data = tmp_path / "data"
    elsewhere = put_image(tmp_path / "elsewhere" / "e.jpg", 5)
    for name, seed in (("a.jpg", 1), ("b.jpg", 2), ("with,comma.jpg", 3)):
        put_image(data / "img" / name, seed)
    (data / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    lines = [
        "# my validation images",
        "path,label",
        "img/a.jpg,dog",
        "img/b.jpg, cat",
        "",
        '"img/with,comma.jpg",dog',
        "img/missing.jpg,cat",
        "img/corrupt.jpg,bird",
        f"{elsewhere},bird",
    ]
    (data / "val.csv").write_text("\n".join(lines) + "\n")
    good = [
        (data / "img" / "a.jpg", 2),
        (data / "img" / "b.jpg", 1),
        (data / "img" / "with,comma.jpg", 2),
        (elsewhere, 0),
    ]  # classes sorted: bird, cat, dog
    bad = {
        str(data / "img" / "missing.jpg"): "listed file not found",
        str(data / "img" / "corrupt.jpg"): "not an image",
    }
    return data / "val.csv", good, bad


def sidecar_rows(output: Path) -> dict[str, str]:
    lines = output.with_name(output.name + ".skipped.tsv").read_text().splitlines()
    assert lines[0] == "path\treason"
    return dict(line.split("\t") for line in lines[1:])


def test_list_file_keeps_labels_and_skips_missing_and_bad_entries(listed, tmp_path, capsys):
    lst, good, bad = listed
    source = common.resolve_source(lst)
    assert source.classes == ["bird", "cat", "dog"] and source.labeled and len(source) == 6

    beton, shards = tmp_path / "val.beton", tmp_path / "val_dali"
    assert write_ffcv.main(["--source", str(lst), "--write-mode", "raw", "--workers", "1", "--output", str(beton)]) == 0
    assert write_dali.main(["--source", str(lst), "--order", "source", "--workers", "1", "--output", str(shards)]) == 0
    err = capsys.readouterr().err
    images, labels = read_beton(beton)
    assert labels.tolist() == [label for _, label in good]
    assert np.array_equal(images[2], datasets.decode_rgb(good[2][0].read_bytes(), 512))
    _, dali_labels, meta = read_shards_with_dali(shards)
    assert dali_labels.tolist() == [label for _, label in good] and meta["classes"] == ["bird", "cat", "dog"]
    for output in (beton, shards):
        rows = sidecar_rows(output)
        assert set(rows) == set(bad) and all(words in rows[path] for path, words in bad.items())
    for path in bad:  # one `skipped:` line per entry and converter
        assert sum(1 for line in err.splitlines() if line.startswith(f"skipped: {path}: ")) == 2

    assert (
        write_ffcv.main(
            ["--source", str(lst), "--workers", "1", "--strict", "--output", str(tmp_path / "strict.beton")]
        )
        == 1
    )
    assert "missing.jpg: listed file not found (--strict)" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "strict.beton").exists()


def test_list_file_integer_labels_unlabeled_lists_and_no_labels(tmp_path):
    for k in range(4):
        put_image(tmp_path / f"{k}.jpg", k)
    (tmp_path / "ints.txt").write_text("0.jpg,3\n1.jpg,0\n2.jpg,10\n3.jpg,3\n")
    source = common.resolve_source(tmp_path / "ints.txt")
    assert source.labels.tolist() == [3, 0, 10, 3] and len(source.classes) == 11  # the numbers themselves
    assert "1" in source.empty_classes and "3" not in source.empty_classes
    ignored = common.resolve_source(tmp_path / "ints.txt", labeled=False)
    assert not ignored.labeled and ignored.labels.tolist() == [-1] * 4
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbfpath,label\r\n0.jpg,b\r\n1.jpg,a\r\n")  # BOM, CRLF
    assert common.resolve_source(tmp_path / "excel.csv").labels.tolist() == [1, 0]
    (tmp_path / "plain.lst").write_text("0.jpg\n1.jpg\n")  # no labels at all: an unlabeled set
    out = tmp_path / "plain.beton"
    assert write_ffcv.main(["--source", str(tmp_path / "plain.lst"), "--workers", "1", "--output", str(out)]) == 0
    assert read_beton(out)[1].tolist() == [-1, -1]


def test_imagenet_style_flat_val_folder_gets_the_train_trees_labels(tmp_path):
    """A flat validation folder plus a list of class names indexes the classes as the train tree does."""
    synsets = ["n01440764", "n01443537", "n01484850"]
    for k, synset in enumerate(synsets):
        put_image(tmp_path / "train" / synset / "t.JPEG", k)
    rows = []
    for k, synset in enumerate([synsets[2], synsets[0], synsets[1], synsets[2]]):
        put_image(tmp_path / "val" / f"ILSVRC2012_val_{k:08d}.JPEG", 10 + k)
        rows.append(f"val/ILSVRC2012_val_{k:08d}.JPEG,{synset}")
    (tmp_path / "val_labels.csv").write_text("\n".join(rows) + "\n")
    train = datasets.scan_image_folder(tmp_path / "train")
    val = common.resolve_source(tmp_path / "val_labels.csv")
    assert val.classes == train.classes and val.labels.tolist() == [2, 0, 1, 2]


@pytest.mark.parametrize(
    "text, where, words",
    [
        ("a.jpg,1\nb.jpg,2,extra\n", ":2:", "got 3 fields"),
        ("a.jpg,cat\nb.jpg\n", ":2:", "no label, but line 1 has one"),
        ("a.jpg\nb.jpg,cat\n", ":2:", "a label, but line 1 has none"),
        ("# header comment\na.jpg,-1\n", ":2:", "negative label -1"),
        ("a.jpg,\n", ":1:", "empty label"),
        (",cat\n", ":1:", "empty path"),
        ('"a.jpg,1\n', ":", "malformed line"),
        ("# nothing\n\npath,label\n", "", "names no images"),
    ],
)
def test_malformed_list_is_one_line_naming_file_and_line(tmp_path, capsys, text, where, words):
    lst = tmp_path / "bad.txt"
    lst.write_text(text)
    for main, out in ((write_ffcv.main, tmp_path / "x.beton"), (write_dali.main, tmp_path / "x_dali")):
        assert main(["--source", str(lst), "--output", str(out), "--workers", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{lst}{where}" in err[0] and words in err[0], err
        assert not out.exists()
