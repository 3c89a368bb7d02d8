"""DALI loaders on the CPU with real DALI: shards in, (a, b, labels) and (x, labels) out.

Shards come from data_prep/write_dali.py (tiny 16x16 JPEGs, so the file runs in seconds on two slow
cores); labels are unique per sample so that they identify samples.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data_prep/

from helpers import IDENTITY_AUG  # noqa: E402

from bsim_fast.config import Config  # noqa: E402
from bsim_fast.datasets import CorruptOutputError  # noqa: E402
from bsim_fast.loaders.base import DatasetError  # noqa: E402
from bsim_fast.loaders.dali_loader import DaliEvalLoader, DaliTrainLoader, ShardSet  # noqa: E402

SIZE = 16
CPU = torch.device("cpu")


def label_of(i: int) -> int:
    return 100 + i  # several digits, unique per sample: labels identify samples


def write_shards(root: Path, shard_sizes) -> Path:
    """Shards written by the project's converter from an array set of random 16x16 images."""
    from data_prep import write_dali

    n, shard_size = sum(shard_sizes), shard_sizes[0]
    assert [min(shard_size, n - k) for k in range(0, n, shard_size)] == list(shard_sizes)
    root.parent.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    arrays = root.parent / f"{root.name}.npz"
    np.savez(arrays, images=images, labels=np.array([label_of(i) for i in range(n)]))
    argv = [
        "--source",
        str(arrays),
        "--output",
        str(root),
        "--shard-size",
        str(shard_size),
        "--workers",
        "1",
        "--jpeg-quality",
        "95",
    ]
    assert write_dali.main(argv) == 0
    return root


def overwrite_member(root: Path, shard: int, member: str, data: bytes) -> None:
    """Corrupts one member in place (same length), as a bad disk would: meta.json still matches."""
    from bsim_fast.converted import read_wds_index

    index = read_wds_index(root / f"shard-{shard:06d}.idx")
    ((offset, size),) = [(o, n) for sample in index for ext, o, n, name in sample if name == member]
    with open(root / f"shard-{shard:06d}.tar", "r+b") as f:
        f.seek(offset)
        f.write(data[:size].ljust(size, b"\0"))


@pytest.fixture(scope="module")
def shards24(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("dali") / "train", [13, 11])


@pytest.fixture(scope="module")
def shards25(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("dali") / "val", [10, 10, 5])


def make_cfg(path: Path, batch_size: int = 4, **aug) -> Config:
    cfg = Config()
    cfg.data.train = str(path)
    cfg.data.image_size = SIZE
    cfg.data.batch_size = batch_size
    cfg.data.workers = 1
    cfg.aug = dataclasses.replace(cfg.aug, **aug)
    return cfg


# Only the photometric op under test: full-image crops of square images are the identity geometry.
NO_AUG = IDENTITY_AUG


def run_epoch(loader, epoch=0, start_batch=0):
    return [(a.clone(), b.clone(), y.clone()) for a, b, y in loader.epoch(epoch, start_batch)]


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 128, 255 - x, x)


def test_round_trip_shapes_labels_and_views(shards24):
    loader = DaliTrainLoader(make_cfg(shards24), rank=0, world_size=1, device=CPU)
    assert len(loader) == 24 // 4
    batches = run_epoch(loader)
    assert len(batches) == len(loader)
    for a, b, y in batches:
        assert a.shape == b.shape == (4, SIZE, SIZE, 3) and a.dtype == b.dtype == torch.uint8
        assert y.shape == (4,) and y.dtype == torch.int64
        assert a.device.type == "cpu"
    labels = torch.cat([y for _, _, y in batches]).tolist()
    assert sorted(labels) == [label_of(i) for i in range(24)]  # every sample once, ASCII parsed
    a = torch.cat([a for a, _, _ in batches]).float()
    b = torch.cat([b for _, b, _ in batches]).float()
    assert (a - b).abs().mean() > 5  # two independent views


def test_two_ranks_read_disjoint_parts_that_cover_the_set(shards24):
    seen = []
    for rank in (0, 1):
        loader = DaliTrainLoader(make_cfg(shards24, batch_size=4), rank=rank, world_size=2, device=CPU)
        assert loader.batch_size == 2 and len(loader) == 12 // 2
        seen.append({v for _, _, y in run_epoch(loader, epoch=1) for v in y.tolist()})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {label_of(i) for i in range(24)}


def test_eval_reads_every_sample_exactly_once_over_two_ranks(shards25):
    labels = []
    for rank, expected_batches in ((0, [4, 4, 4]), (1, [4, 4, 4, 1])):  # 25 samples: ranks get 12 and 13
        loader = DaliEvalLoader(make_cfg(shards25, batch_size=8), shards25, rank, 2, CPU)
        sizes = []
        for x, y in loader:
            assert x.shape[1:] == (SIZE, SIZE, 3) and x.dtype == torch.uint8 and y.dtype == torch.int64
            sizes.append(len(y))
            labels += y.tolist()
        assert sizes == expected_batches and len(loader) == len(expected_batches)
    assert sorted(labels) == [label_of(i) for i in range(25)]


def test_epochs_are_clean_reproducible_and_resumable(shards24):
    loader = DaliTrainLoader(make_cfg(shards24), rank=0, world_size=1, device=CPU)
    first, again, second = run_epoch(loader, 0), run_epoch(loader, 0), run_epoch(loader, 1)
    assert len(first) == len(again) == len(second) == len(loader)
    for (a0, b0, y0), (a1, b1, y1) in zip(first, again):  # order and draws: (seed, epoch) only
        assert torch.equal(y0, y1) and torch.equal(a0, a1) and torch.equal(b0, b1)
    assert [y.tolist() for *_, y in first] != [y.tolist() for *_, y in second]
    resumed = run_epoch(loader, 0, start_batch=2)
    assert len(resumed) == len(loader) - 2
    for (a0, b0, y0), (a1, b1, y1) in zip(first[2:], resumed):
        assert torch.equal(y0, y1) and torch.equal(a0, a1) and torch.equal(b0, b1)
    assert run_epoch(loader, 0, start_batch=len(loader)) == []
    with pytest.raises(ValueError, match="start_batch"):
        loader.epoch(0, start_batch=len(loader) + 1)  # raised at the call, not at the first batch


def test_views_are_identical_with_every_augmentation_off(shards24):
    loader = DaliTrainLoader(make_cfg(shards24, **NO_AUG), rank=0, world_size=1, device=CPU)
    for a, b, _ in loader.epoch(0):
        assert torch.equal(a, b)


def test_solarize_is_applied_per_view_and_per_sample(shards24):
    always = DaliTrainLoader(make_cfg(shards24, **{**NO_AUG, "solarize_p": (0.0, 1.0)}), 0, 1, CPU)
    for a, b, _ in always.epoch(0):
        assert torch.equal(b, solarize(a)) and not torch.equal(a, b)
    half = DaliTrainLoader(make_cfg(shards24, **{**NO_AUG, "solarize_p": (0.5, 0.0)}), 0, 1, CPU)
    outcomes = []
    for a, b, _ in half.epoch(0):
        for ai, bi in zip(a, b):
            assert torch.equal(ai, bi) or torch.equal(ai, solarize(bi))
            outcomes.append(torch.equal(ai, bi))
    assert any(outcomes) and not all(outcomes)


def test_grayscale_gives_equal_channels(shards24):
    loader = DaliTrainLoader(make_cfg(shards24, **{**NO_AUG, "gray_p": 1.0}), 0, 1, CPU)
    plain = DaliTrainLoader(make_cfg(shards24, **NO_AUG), 0, 1, CPU)
    batches, plain_batches = list(loader.epoch(0)), list(plain.epoch(0))
    assert len(batches) == len(plain_batches) == len(loader) > 0
    for (a, b, y), (p, _, yp) in zip(batches, plain_batches):
        assert torch.equal(y, yp)
        for v in (a, b):
            assert torch.equal(v[..., 0], v[..., 1]) and torch.equal(v[..., 0], v[..., 2])
        luma = (p.double() @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)).round()
        assert (a[..., 0].double() - luma).abs().max() <= 1


def test_blur_and_jitter_change_pixels(shards24):
    def roughness(x):  # mean absolute horizontal gradient
        return (x[:, :, 1:].float() - x[:, :, :-1].float()).abs().mean()

    blur = DaliTrainLoader(make_cfg(shards24, **{**NO_AUG, "blur_p": (1.0, 0.0), "blur_sigma": (1.0, 2.0)}), 0, 1, CPU)
    for a, b, _ in blur.epoch(0):
        assert roughness(a) < 0.7 * roughness(b)
    jitter = DaliTrainLoader(make_cfg(shards24, **{**NO_AUG, "jitter_p": 1.0}), 0, 1, CPU)
    for a, b, _ in jitter.epoch(0):
        assert (a.float() - b.float()).abs().mean() > 1


def test_truncated_or_inconsistent_shard_folders_are_named(tmp_path):
    root = write_shards(tmp_path / "cut", [5, 5])
    tar = root / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(CorruptOutputError, match=r"shard-000001\.tar: truncated"):
        DaliTrainLoader(make_cfg(root), 0, 1, CPU)
    (root / "shard-000000.idx").unlink()
    with pytest.raises(CorruptOutputError, match=r"shard-000000\.idx: bad index"):
        DaliEvalLoader(make_cfg(root), root, 0, 1, CPU)
    root = write_shards(tmp_path / "count", [4, 4])
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "num_samples": 9}))
    with pytest.raises(CorruptOutputError, match="meta.json: shards hold 8 samples"):
        ShardSet(root)


def test_corrupt_jpeg_fails_naming_shard_and_member(tmp_path):
    root = write_shards(tmp_path / "badjpg", [4, 4])
    overwrite_member(root, 1, "000000005.jpg", b"\xff\xd8 not a jpeg")
    loader = DaliTrainLoader(make_cfg(root), 0, 1, CPU)
    with pytest.raises(DatasetError, match=r"shard-000001\.tar: 000000005\.jpg: not a valid JPEG"):
        run_epoch(loader)
