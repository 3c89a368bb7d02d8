"""Bad input: odd image modes become RGB, broken files are skipped and listed (or fail with --strict),
every good image arrives with its right label, and truncated outputs give an error naming the file."""

from __future__ import annotations

import errno
import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bsim_fast import converted, datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data_prep/ holds scripts, not a package
from data_prep import common, write_dali, write_ffcv  # noqa: E402

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads a chmod 000 file anyway


def jpeg_bytes(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **save)
    return out.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))


@pytest.fixture(scope="module")
def huge_jpeg() -> bytes:
    """10,000 x 10,000 but ~1 MB: flat grey compresses to almost nothing."""
    return jpeg_bytes(Image.new("L", (10_000, 10_000), 128), quality=10)


def odd_images(huge: bytes) -> dict[str, bytes]:
    """Decodable images in every awkward form, by file name."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 20 high, to be shown rotated: 20 wide x 40 high
    return {
        "gray.jpg": jpeg_bytes(Image.new("L", (16, 12), 90)),
        "cmyk.jpg": jpeg_bytes(Image.new("CMYK", (16, 12), (0, 255, 255, 0))),
        "rgba.png": png_bytes(Image.fromarray(rgba, "RGBA")),
        "palette.png": png_bytes(palette),
        "deep16.png": png_bytes(Image.fromarray(np.full((10, 10), 65535, np.uint16))),
        "tiny.jpg": jpeg_bytes(Image.new("RGB", (1, 1), (10, 20, 30))),
        "huge.jpg": huge,
        "png_named.jpg": png_bytes(noise(12, 12)),
        "exif_rotated.jpg": jpeg_bytes(noise(40, 20), exif=exif.tobytes()),
        "progressive.jpg": jpeg_bytes(noise(20, 20), progressive=True),
        "chat \u00e9\u732b.jpg": jpeg_bytes(noise(20, 20, seed=3)),
    }


@pytest.fixture
def messy_tree(tmp_path, huge_jpeg):
    """An ImageFolder tree with every kind of bad input. Returns (root, good files in order, bad files)."""
    root = tmp_path / "messy"
    good: list[tuple[str, int]] = []  # (relative path, label), in the converters' order
    bad: dict[str, str] = {}  # relative path -> expected words in the reason

    def put(rel: str, data: bytes) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    for k in range(6):  # class 0
        put(f"a_good/{k:02d}.jpg", jpeg_bytes(noise(24, 20, seed=k)))
        good.append((f"a_good/{k:02d}.jpg", 0))
    put("a_good/README.txt", b"not an image extension: ignored, not skipped")
    for name, data in sorted(odd_images(huge_jpeg).items()):  # class 1
        put(f"b_modes/{name}", data)
        good.append((f"b_modes/{name}", 1))

    whole = jpeg_bytes(noise(64, 64, seed=9), quality=95)  # class 2: broken files
    put("c_bad/truncated.jpg", whole[: len(whole) // 2])
    bad["c_bad/truncated.jpg"] = "corrupt or truncated"
    put("c_bad/zero.jpg", b"")
    bad["c_bad/zero.jpg"] = "empty file"
    put("c_bad/text.jpg", b"hello, I am text\n")
    bad["c_bad/text.jpg"] = "not an image"
    os.symlink(root / "c_bad" / "nowhere.jpg", root / "c_bad" / "broken_link.jpg")
    bad["c_bad/broken_link.jpg"] = "broken symlink"
    os.symlink("loop.jpg", root / "c_bad" / "loop.jpg")
    bad["c_bad/loop.jpg"] = "symlink loop"
    os.mkfifo(root / "c_bad" / "fifo.jpg")  # would block a naive read forever
    bad["c_bad/fifo.jpg"] = "not a regular file"
    locked = put("c_bad/unreadable.jpg", jpeg_bytes(noise(8, 8)))
    locked.chmod(0)
    if IS_ROOT:
        good.append(("c_bad/unreadable.jpg", 2))
    else:
        bad["c_bad/unreadable.jpg"] = "permission denied"

    (root / "d_empty").mkdir()  # class 3: empty, keeps its index
    for k in range(2):  # class 4: non-ASCII class name, with a symlink back to itself
        put(f"\u00fcn\u00efcode/{k}.jpg", jpeg_bytes(noise(20, 20, seed=20 + k)))
        good.append((f"\u00fcn\u00efcode/{k}.jpg", 4))
    os.symlink(root / "\u00fcn\u00efcode", root / "\u00fcn\u00efcode" / "again")
    good.sort(key=lambda item: str(root / item[0]))
    yield root, good, bad
    locked.chmod(0o644)


# ---- decoding one sample ----------------------------------------------------------------------------


def test_every_mode_becomes_rgb(huge_jpeg):
    decoded = {name: datasets.decode_rgb(data, 512) for name, data in odd_images(huge_jpeg).items()}
    for name, rgb in decoded.items():
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, name
    assert decoded["huge.jpg"].shape == (512, 512, 3)  # downscaled, not decoded at 100 MP
    assert decoded["tiny.jpg"].shape == (1, 1, 3)
    assert decoded["exif_rotated.jpg"].shape == (40, 20, 3)  # EXIF orientation applied
    assert decoded["rgba.png"][0, 0].tolist() == [255, 0, 0]
    assert decoded["rgba.png"][0, 7].tolist() == [255, 255, 255]  # transparent -> composited on white
    assert decoded["palette.png"][0, 0].tolist() == [10, 200, 10]
    assert decoded["deep16.png"][0, 0].tolist() == [255, 255, 255]  # 16-bit range scaled, not clipped
    assert abs(int(decoded["gray.jpg"][0, 0, 0]) - 90) <= 2
    red, green, blue = decoded["cmyk.jpg"][0, 0].tolist()
    assert red > 200 and green < 60 and blue < 60  # C=0 M=Y=255 is red


def test_jpeg_bytes_pass_through_only_when_lossless(huge_jpeg):
    images = odd_images(huge_jpeg)
    good = jpeg_bytes(noise(20, 20))
    assert common.encode_jpeg_for_storage(good, 512, 90) == (good, True)
    for name in ("gray.jpg", "cmyk.jpg", "huge.jpg", "png_named.jpg", "exif_rotated.jpg", "progressive.jpg"):
        data, passed = common.encode_jpeg_for_storage(images[name], 512, 90)
        assert not passed and Image.open(io.BytesIO(data)).mode == "RGB", name
    assert Image.open(io.BytesIO(common.encode_jpeg_for_storage(images["exif_rotated.jpg"], 512, 90)[0])).size == (
        20,
        40,
    )
    # Exactly twice --max-resolution: libjpeg decodes it at 1/2 scale, so the decoded size is within the limit,
    # but the file is not: it must be re-encoded at 512, not stored at 1024.
    data, passed = common.encode_jpeg_for_storage(jpeg_bytes(noise(1024, 768)), 512, 90)
    assert not passed and Image.open(io.BytesIO(data)).size == (512, 384)


def test_decompression_bomb_is_a_skip_not_a_crash(monkeypatch):
    monkeypatch.setattr(datasets, "MAX_IMAGE_PIXELS", 50 * 50)
    with pytest.raises(datasets.SampleError, match="decompression bomb"):
        datasets.decode_rgb(png_bytes(noise(60, 60)), 512)


def test_permission_denied_reason(monkeypatch, tmp_path):
    """chmod 000 cannot be tested as root, so the error path is checked directly too."""
    path = tmp_path / "x.jpg"
    path.write_bytes(b"x")

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(datasets.SampleError, match="permission denied"):
        datasets.read_file(str(path))


# ---- scanning ---------------------------------------------------------------------------------------


def test_scan_keeps_empty_classes_and_survives_symlink_loops(messy_tree):
    root, good, bad = messy_tree
    source = datasets.scan_image_folder(root)
    assert source.classes == ["a_good", "b_modes", "c_bad", "d_empty", "\u00fcn\u00efcode"]
    assert source.empty_classes == ["d_empty"] and source.ignored == 1
    listed = [os.path.relpath(p, root) for p in source.paths]
    assert len(listed) == len(good) + len(bad) and not any("again" in p for p in listed)


def test_missing_source_is_one_line_and_exit_2(tmp_path, capsys):
    for main in (write_ffcv.main, write_dali.main):
        assert main(["--source", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "source not found" in err[0] and str(tmp_path / "nope") in err[0]
    assert write_dali.main(["--source", str(tmp_path), "--split", "test"]) == 2  # --split is builtin only


# ---- converters on the messy tree -------------------------------------------------------------------


def check_skips(root: Path, output: Path, bad: dict[str, str], stderr: str, summary_line: str) -> None:
    sidecar = output.with_name(output.name + ".skipped.tsv").read_text(encoding="utf-8").splitlines()
    assert sidecar[0] == "path\treason"
    listed = {os.path.relpath(line.split("\t")[0], root): line.split("\t")[1] for line in sidecar[1:]}
    assert set(listed) == set(bad)
    for rel, words in bad.items():
        assert words in listed[rel], (rel, listed[rel])
        assert sum(1 for line in stderr.splitlines() if line.startswith("skipped: ") and rel in line) == 1
    assert f"({len(bad)} skipped" in summary_line


def test_dali_converter_skips_bad_files_and_keeps_every_good_one(messy_tree, tmp_path, capsys):
    root, good, bad = messy_tree
    out = tmp_path / "messy_shards"
    assert (
        write_dali.main(
            ["--source", str(root), "--output", str(out), "--workers", "1", "--shard-size", "7", "--order", "source"]
        )
        == 0
    )
    captured = capsys.readouterr()
    check_skips(root, out, bad, captured.err, captured.out.splitlines()[0])
    assert "empty class folder 'd_empty' keeps its index 3" in captured.err
    meta = converted.check_shards(out, deep=True)
    assert meta["num_samples"] == len(good) and meta["classes"][3] == "d_empty"

    labels, sizes = [], []
    for shard in meta["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".cls"):
                    labels.append(int(data))
                else:
                    image = Image.open(io.BytesIO(data))
                    assert image.format == "JPEG" and image.mode == "RGB"
                    sizes.append(image.size)
    assert labels == [label for _, label in good]
    by_name = dict(zip((rel for rel, _ in good), sizes))
    assert by_name["b_modes/huge.jpg"] == (512, 512) and by_name["b_modes/tiny.jpg"] == (1, 1)
    assert by_name["b_modes/exif_rotated.jpg"] == (20, 40)


def test_ffcv_converter_skips_bad_files_and_keeps_every_good_one(messy_tree, tmp_path, capsys):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    root, good, bad = messy_tree
    out = tmp_path / "messy.beton"
    assert write_ffcv.main(["--source", str(root), "--output", str(out), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    check_skips(root, out, bad, captured.err, captured.out.splitlines()[0])
    assert converted.check_beton(out) == len(good)
    loader = Loader(
        str(out),
        batch_size=8,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": [CenterCropRGBImageDecoder((16, 16), 1.0)], "label": [IntDecoder()]},
    )
    labels = np.concatenate([np.array(batch_labels).reshape(-1) for _, batch_labels in loader])
    assert labels.tolist() == [label for _, label in good]


def test_strict_fails_on_the_first_bad_file(messy_tree, tmp_path, capsys):
    root, good, bad = messy_tree
    for main, out in ((write_dali.main, tmp_path / "strict_shards"), (write_ffcv.main, tmp_path / "s.beton")):
        assert main(["--source", str(root), "--output", str(out), "--workers", "1", "--strict"]) == 1
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.endswith("(--strict)") and any(str(root / rel) + ": " in error for rel in bad)
        assert not out.exists() and not any(".tmp-" in p.name for p in tmp_path.iterdir())


# ---- truncated outputs ------------------------------------------------------------------------------


def test_truncated_beton_names_the_file(tmp_path):
    out = tmp_path / "small.beton"
    assert write_ffcv.main(["--subset", "20", "--workers", "1", "--write-mode", "jpg", "--output", str(out)]) == 0
    data = out.read_bytes()
    assert converted.check_beton(out) == 20
    for cut in (10, len(data) // 2, len(data) - 5):
        broken = tmp_path / f"cut{cut}.beton"
        broken.write_bytes(data[:cut])
        with pytest.raises(datasets.CorruptOutputError, match=f"{broken}: truncated or corrupt"):
            converted.check_beton(broken)
    unfinished = tmp_path / "unfinished.beton"  # header written last: a killed writer leaves it zeroed
    unfinished.write_bytes(bytes(64) + data[64:])
    with pytest.raises(datasets.CorruptOutputError, match="unfinished.beton"):
        converted.check_beton(unfinished)


def test_truncated_shard_names_the_file(tmp_path):
    out = tmp_path / "shards"
    assert write_dali.main(["--subset", "20", "--workers", "1", "--shard-size", "8", "--output", str(out)]) == 0
    shard = out / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(datasets.CorruptOutputError, match=f"{shard}: truncated"):
        converted.check_shards(out)
