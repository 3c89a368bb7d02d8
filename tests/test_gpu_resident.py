"""The GPU-resident loader on CPU: the loader protocol (as tests/test_loaders.py) on 40 built-in images read
from an ImageFolder and from a .beton, the crop geometry against torchvision, mixed sizes, the size budget."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import IDENTITY_AUG, tiny_folder
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from bsim_fast import datasets
from bsim_fast.config import Config, ConfigError
from bsim_fast.loaders import build_eval_loader, build_train_loader, gpu_resident
from bsim_fast.loaders.base import rank_order
from bsim_fast.loaders.gpu_resident import (
    GpuResidentEvalLoader,
    GpuResidentTrainLoader,
    crop_resize,
    random_resized_boxes,
)
from bsim_fast.loaders.resize import filter_code

REPO = Path(__file__).resolve().parents[1]
BATCH = 8
N = 40  # 10 images of 4 classes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_folder(tmp_path_factory.mktemp("resident") / "train", per_class=10))


@pytest.fixture(scope="module")
def beton(folder):
    sys.path.insert(0, str(REPO))
    from data_prep import write_ffcv

    out = Path(folder).parent / "train.beton"
    assert write_ffcv.main(["--source", folder, "--output", str(out), "--write-mode", "raw", "--workers", "1"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def labels(folder):
    return datasets.scan_image_folder(Path(folder)).labels


def make_cfg(path, identity=False, flip_p=None, seed=0):
    cfg = Config()
    cfg.data.loader, cfg.data.train, cfg.data.image_size = "gpu_resident", path, 32
    cfg.data.batch_size, cfg.data.workers, cfg.train.seed = BATCH, 1, seed
    if identity:  # views = stored images
        cfg.aug = dataclasses.replace(cfg.aug, **IDENTITY_AUG)
    if flip_p is not None:
        cfg.aug = dataclasses.replace(cfg.aug, flip_p=flip_p)
    return cfg


def same(xs, ys):
    xs, ys = list(xs), list(ys)
    return len(xs) == len(ys) and all(torch.equal(p, q) for x, y in zip(xs, ys) for p, q in zip(x, y))


@pytest.mark.parametrize("kind", ["torch", "ffcv"])
def test_train_protocol(kind, folder, beton, labels):
    path = folder if kind == "torch" else beton
    loader = build_train_loader(make_cfg(path), 0, 1, "cpu")
    assert isinstance(loader, GpuResidentTrainLoader) and len(loader) == N // BATCH
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader)
    order = rank_order(N, 0, 0, 0, 1, BATCH)
    for b, (a, v, y) in enumerate(batches):
        assert a.shape == v.shape == (BATCH, 32, 32, 3) and a.dtype == v.dtype == torch.uint8
        assert a.is_contiguous() and v.is_contiguous() and y.dtype == torch.int64
        assert np.array_equal(y.numpy(), labels[order[b * BATCH : (b + 1) * BATCH]])
        assert (a != v).float().mean() > 0.5  # two different augmentations
    assert same(batches, loader.epoch(0))  # seeded: the epoch repeats
    assert same(batches[2:], loader.epoch(0, start_batch=2))  # resume = the tail
    assert not torch.equal(torch.cat([x[0] for x in loader.epoch(1)]), torch.cat([x[0] for x in batches]))


def test_beton_and_folder_hold_the_same_images(folder, beton, labels):
    from_folder = build_eval_loader(make_cfg(folder), folder, 0, 1, "cpu").data
    from_beton = build_eval_loader(make_cfg(beton), beton, 0, 1, "cpu").data
    assert from_folder.images.shape == (N, 32, 32, 3)
    assert torch.equal(from_folder.images, from_beton.images)  # raw .beton: the same pixels
    assert np.array_equal(from_beton.labels.numpy(), labels)


def test_identity_flip_and_ranks(folder):
    stored = GpuResidentEvalLoader(make_cfg(folder), folder, 0, 1, "cpu").data.images
    seen = []
    for rank in (0, 1):
        loader = build_train_loader(make_cfg(folder, identity=True), rank, 2, "cpu")
        assert len(loader) == (N // 2) // (BATCH // 2)
        order = rank_order(N, 0, 3, rank, 2, BATCH // 2)
        views = list(loader.epoch(3))
        for b, (a, v, _) in enumerate(views):
            idx = order[b * (BATCH // 2) : (b + 1) * (BATCH // 2)]
            assert torch.equal(a, stored[idx]) and torch.equal(v, stored[idx])  # identity crops
        seen += order.tolist()
    assert len(set(seen)) == len(seen) == N  # disjoint, covering (N % batch = 0)
    mirrored = build_train_loader(make_cfg(folder, identity=True, flip_p=1.0), 0, 1, "cpu")
    a, v, _ = next(iter(mirrored.epoch(0)))
    idx = rank_order(N, 0, 0, 0, 1, BATCH)[:BATCH]
    assert torch.equal(a, stored[idx].flip(2)) and torch.equal(v, a)  # flip_p = 1: the mirror image


def test_eval_every_sample_once(folder, labels):
    cfg = make_cfg(folder)
    cfg.data.batch_size = 12  # 20 per rank: 6, 6, 6, 2 (no drop)
    stored = GpuResidentEvalLoader(cfg, folder, 0, 1, "cpu").data.images
    images, ys = {}, {}
    for rank in (0, 1):
        loader = build_eval_loader(cfg, folder, rank, 2, "cpu")
        batches = list(loader)
        assert len(loader) == len(batches) == 4 and len(batches[-1][0]) == 2
        for i, x, y in zip(range(rank, N, 2), torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])):
            assert i not in images
            images[i], ys[i] = x, int(y)
    assert sorted(images) == list(range(N))
    assert torch.equal(torch.stack([images[i] for i in range(N)]), stored)  # 32 px: the centre crop is all
    assert [ys[i] for i in range(N)] == labels.tolist()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_crops_match_torchvision(interpolation):
    """Box sampling within torchvision's bounds, and each view = torchvision's antialiased resized_crop (+ flip)
    with the filter asked for, in float64, rounded half up and clipped (tests/test_resize.py has all loaders)."""
    image = torch.randint(0, 256, (4, 30, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    top, left, h, w = (t.view(4, 2) for t in random_resized_boxes(8, 30, 40, (0.08, 1.0), (3 / 4, 4 / 3), g))
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 30) & (left + w <= 40)).all())
    flip = torch.tensor([[False, True]] * 4)
    views = crop_resize(image, top, left, h, w, flip, 24, filter_code(interpolation))
    diffs = []
    for i in range(4):
        for v in range(2):
            ref = TF.resized_crop(
                image[i].permute(2, 0, 1).double(),
                int(top[i, v]),
                int(left[i, v]),
                int(h[i, v]),
                int(w[i, v]),
                [24, 24],
                TF.InterpolationMode(interpolation),
                antialias=True,
            )
            ref = (ref.flip(-1) if flip[i, v] else ref).add(0.5).floor().clamp(0, 255).permute(1, 2, 0)
            diffs.append((ref - views[i, v].double()).abs())
    diffs = torch.stack(diffs)
    assert diffs.max() <= 1 and (diffs > 0).float().mean() < 0.01  # off by one only at .5 (float32)
    # ten misses (the crop can never fit): the whole image clamped to the ratio range, centred
    top, left, h, w = random_resized_boxes(16, 30, 40, (1.0, 1.0), (1.0, 1.0), g)
    assert set(zip(top.tolist(), left.tolist(), h.tolist(), w.tolist())) == {(0.0, 5.0, 30.0, 30.0)}
    # many crops: area and aspect within the ranges asked for
    top, left, h, w = random_resized_boxes(4000, 30, 40, (0.2, 0.6), (0.5, 2.0), g)
    assert float((h * w).min()) > 0.15 * 1200 and float((h * w).max()) < 0.65 * 1200
    assert float((w / h).min()) > 0.4 and float((w / h).max()) < 2.5


def test_mixed_sizes_are_centre_cropped(tmp_path):
    rng = np.random.default_rng(0)
    for k, (wd, ht) in enumerate([(40, 30), (32, 32), (20, 50), (64, 48)]):
        (tmp_path / f"c{k % 2}").mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (ht, wd, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"c{k % 2}" / f"{k}.png")
    cfg = make_cfg(str(tmp_path))
    cfg.data.image_size, cfg.data.batch_size = 16, 2
    loader = build_train_loader(cfg, 0, 1, "cpu")
    assert loader.data.images.shape == (4, 16, 16, 3)  # round(16 / 1.0) square
    a, v, _ = next(iter(loader.epoch(0)))
    assert a.shape == v.shape == (2, 16, 16, 3)
    x, y = next(iter(build_eval_loader(cfg, str(tmp_path), 0, 1, "cpu")))
    assert x.shape == (2, 16, 16, 3) and y.tolist() == [0, 0]
    sys.path.insert(0, str(REPO))
    from data_prep import write_ffcv

    out = tmp_path / "mixed.beton"
    assert (
        write_ffcv.main(["--source", str(tmp_path), "--output", str(out), "--write-mode", "raw", "--workers", "1"]) == 0
    )
    data = build_eval_loader(cfg, str(out), 0, 1, "cpu").data  # the GPU-resident loader reads a .beton too
    assert data.images.shape == (4, 16, 16, 3) and data.labels.tolist() == [0, 0, 1, 1]


def test_refuses_a_set_over_budget(folder, monkeypatch):
    monkeypatch.setattr(gpu_resident, "CPU_BUDGET_BYTES", 100_000)
    monkeypatch.setattr(gpu_resident, "_resident", type(gpu_resident._resident)())  # nothing cached
    with pytest.raises(ConfigError) as err:
        build_train_loader(make_cfg(folder), 0, 1, "cpu")
    message = str(err.value)
    assert "\n" not in message and folder in message and "40 images of 32x32" in message
    assert "set data.loader to ffcv, dali or torch" in message
