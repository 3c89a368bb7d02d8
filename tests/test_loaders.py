"""Loader protocol on ~200 built-in images: real FFCV (written by data_prep/write_ffcv.py) and the torch
loader, on CPU. With crop scale = ratio = 1, no flip and photometric off, a view is the stored image itself,
which lets the tests find which sample every yielded view came from."""

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import IDENTITY_AUG

from bsim_fast import datasets
from bsim_fast.config import Config
from bsim_fast.loaders import build_eval_loader, build_train_loader
from bsim_fast.loaders.base import eval_shard, rank_order
from bsim_fast.loaders.registry import DatasetError, resolve_path
from data_prep import common

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 20  # 10 classes -> 200 images
BATCH = 32


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A 200-image ImageFolder tree (links into the built-in train split)."""
    root = tmp_path_factory.mktemp("tree")
    builtin = datasets.builtin_root() / "train"
    for class_dir in sorted(p for p in builtin.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir()
        for f in sorted(class_dir.iterdir())[:PER_CLASS]:
            os.symlink(f, root / class_dir.name / f.name)
    return root


@pytest.fixture(scope="module")
def source_labels(tree):
    return np.asarray(common.resolve_source(str(tree)).labels)


@pytest.fixture(scope="module")
def beton(tree):
    sys.path.insert(0, str(REPO))
    from data_prep import write_ffcv

    out = tree.parent / "tree.beton"
    assert write_ffcv.main(["--source", str(tree), "--output", str(out), "--write-mode", "jpg", "--workers", "1"]) == 0
    return str(out)


def make_cfg(loader, path, identity=False, seed=0):
    cfg = Config()
    cfg.data.loader, cfg.data.train, cfg.data.image_size = loader, path, 32
    cfg.data.batch_size, cfg.data.workers, cfg.train.seed = BATCH, 1, seed
    if identity:  # views = stored images
        cfg.aug = dataclasses.replace(cfg.aug, **IDENTITY_AUG)
    return cfg


def eval_reference(kind, path):
    """Images and labels in file order, read through ranks 0 and 1 of 2; each sample exactly once."""
    cfg = make_cfg(kind, path)
    n = None
    images, labels, seen = {}, {}, []
    for rank in (0, 1):
        xs, ys = zip(*build_eval_loader(cfg, path, rank, 2, "cpu"))
        x, y = torch.cat(xs), torch.cat(ys)
        assert x.dtype == torch.uint8 and x.shape[1:] == (32, 32, 3) and y.dtype == torch.int64
        n = n or 2 * len(x)
        for i, xi, yi in zip(eval_shard(len(x) * 2, rank, 2), x, y):
            images[int(i)], labels[int(i)] = xi, int(yi)
            seen.append(int(i))
    assert sorted(seen) == list(range(len(seen)))  # every sample exactly once over the ranks
    return torch.stack([images[i] for i in sorted(images)]), np.array([labels[i] for i in sorted(labels)])


def index_of(reference):
    table = {bytes(img.numpy()): i for i, img in enumerate(reference)}
    assert len(table) == len(reference)
    return lambda view: table[bytes(view.numpy())]


def same(xs, ys) -> bool:
    """Equal sequences of batches: as many on each side (a bare zip stops at the shorter), equal tensors."""
    xs, ys = list(xs), list(ys)
    return len(xs) == len(ys) and all(torch.equal(p, q) for x, y in zip(xs, ys) for p, q in zip(x, y, strict=True))


def check_train_protocol(loader, labels_of, n):
    assert len(loader) == n // BATCH
    batches = list(loader.epoch(0))
    assert len(batches) * BATCH == len(loader) * BATCH == (n // BATCH) * BATCH
    order = rank_order(n, 0, 0, 0, 1, BATCH)
    for b, (a, v, y) in enumerate(batches):
        assert a.shape == v.shape == (BATCH, 32, 32, 3) and a.dtype == v.dtype == torch.uint8
        assert y.dtype == torch.int64
        assert np.array_equal(y.numpy(), labels_of[order[b * BATCH : (b + 1) * BATCH]])
        assert (a != v).float().mean() > 0.5  # two different augmentations
    assert same(batches, loader.epoch(0))
    tail = list(loader.epoch(0, start_batch=2))
    assert len(tail) == len(batches) - 2 and same(batches[2:], tail)
    other = list(loader.epoch(1))
    assert not torch.equal(torch.cat([x[2] for x in other]), torch.cat([x[2] for x in batches]))
    return batches


def check_ranks(kind, path, reference):
    find = index_of(reference)
    n = len(reference)
    seen = []
    for rank in (0, 1):
        loader = build_train_loader(make_cfg(kind, path, identity=True), rank, 2, "cpu")
        assert len(loader) == (n // 2) // (BATCH // 2)
        for a, v, _ in loader.epoch(3):
            assert torch.equal(a, v)
            seen += [find(img) for img in a]
        assert seen[-(BATCH // 2) :] == list(rank_order(n, 0, 3, rank, 2, BATCH // 2)[-(BATCH // 2) :])
    assert len(set(seen)) == len(seen) == 2 * len(loader) * (BATCH // 2)  # disjoint
    assert len(seen) >= n - 2 * (BATCH // 2)  # covers all but drop_last


def test_rank_order():
    n, bs = 203, 16
    full = rank_order(n, 5, 2, 0, 1, bs)
    assert len(full) == (n // bs) * bs and len(set(full)) == len(full)
    assert np.array_equal(full, rank_order(n, 5, 2, 0, 1, bs))
    assert not np.array_equal(full, rank_order(n, 5, 3, 0, 1, bs))
    assert not np.array_equal(full, rank_order(n, 6, 1, 0, 1, bs))  # seed+epoch collisions avoided
    assert np.array_equal(rank_order(n, 5, 2, 0, 1, bs, start_batch=3), full[3 * bs :])
    parts = [rank_order(n, 5, 2, r, 4, bs) for r in range(4)]
    allp = np.concatenate(parts)
    assert len(set(allp)) == len(allp) and len(allp) == 4 * ((n // 4) // bs) * bs


def test_builtin_paths(monkeypatch, tmp_path):
    assert Path(resolve_path("torch", "builtin")) == datasets.builtin_root() / "train"
    assert Path(resolve_path("torch", "builtin:test")) == datasets.builtin_root() / "test"
    with pytest.raises(DatasetError, match="nothing_here"):
        resolve_path("ffcv", str(tmp_path / "nothing_here.beton"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("bsim_fast.loaders.registry.REPO_ROOT", tmp_path)
    with pytest.raises(DatasetError, match="write_ffcv.py --split test"):
        resolve_path("ffcv", "builtin:test")


def test_ffcv_train_and_eval(beton, source_labels):
    reference, ref_labels = eval_reference("ffcv", beton)
    assert np.array_equal(ref_labels, source_labels)
    loader = build_train_loader(make_cfg("ffcv", beton), 0, 1, "cpu")
    check_train_protocol(loader, source_labels, len(source_labels))
    check_ranks("ffcv", beton, reference)


def test_torch_train_and_eval(tree, source_labels):
    reference, ref_labels = eval_reference("torch", str(tree))
    assert np.array_equal(ref_labels, source_labels)
    loader = build_train_loader(make_cfg("torch", str(tree)), 0, 1, "cpu")
    batches = check_train_protocol(loader, source_labels, len(source_labels))
    fresh = build_train_loader(make_cfg("torch", str(tree)), 0, 1, "cpu")  # a "resumed" process
    assert same(batches, fresh.epoch(0))
    check_ranks("torch", str(tree), reference)


def test_ffcv_bad_file_named(tmp_path):
    bad = tmp_path / "cut.beton"
    bad.write_bytes(b"\0" * 10)
    with pytest.raises(Exception, match="cut.beton"):
        build_train_loader(make_cfg("ffcv", str(bad)), 0, 1, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_loader_copies_on_its_own_stream_ordered_by_an_event():
    """The batch is copied on the loader's stream, and work queued after it on the compute stream sees it whole
    (the compute stream waits for the copy's event), however long the compute stream's earlier work runs."""
    from bsim_fast.loaders.torch_loader import SideStreamCopy

    device = torch.device("cuda")
    to_device = SideStreamCopy(device)
    assert to_device.stream != torch.cuda.current_stream(device)
    host = torch.randint(0, 256, (64, 2, 64, 64, 3), dtype=torch.uint8).pin_memory()
    busy = torch.randn(2048, 2048, device=device)
    for _ in range(20):  # the compute stream is busy while the copy runs on the other stream
        busy = busy @ busy / 2048
    batch = to_device(host)
    assert batch.device.type == "cuda" and torch.equal(batch.sum(dtype=torch.int64).cpu(), host.sum(dtype=torch.int64))
