"""Checkpoints: atomic, verified, damaged ones skipped with one line; schedule arithmetic."""

import errno
import math

import pytest
import torch

from bsim_fast import checkpoint as ck
from bsim_fast.optim import lr_at


def state(v):
    return {"w": torch.full((4,), float(v)), "step": v}


def test_save_keeps_newest_and_loads_weights_only(tmp_path):
    for s in (1, 2, 3):
        ck.save_checkpoint(state(s), tmp_path, s, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    path, st = ck.latest_valid(tmp_path)
    assert path.name == "ckpt_00000003.pt" and st["step"] == 3 and torch.equal(st["w"], torch.full((4,), 3.0))
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_hash"])
def test_damaged_newest_falls_back_with_one_line(tmp_path, damage):
    for s in (1, 2):
        ck.save_checkpoint(state(s), tmp_path, s, keep=3)
    newest = tmp_path / "ckpt_00000002.pt"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        newest.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        (tmp_path / "ckpt_00000002.pt.sha256").unlink()
    lines = []
    path, st = ck.latest_valid(tmp_path, log=lines.append)
    assert path.name == "ckpt_00000001.pt" and st["step"] == 1
    assert len(lines) == 1 and "ckpt_00000002.pt" in lines[0]


def test_full_disk_keeps_previous_output(tmp_path, monkeypatch):
    ck.save_checkpoint(state(1), tmp_path, 1, keep=3)
    real_open = open

    class FullDisk:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", FullDisk)
    with pytest.raises(ck.CheckpointError, match="no space left"):
        ck.save_checkpoint(state(2), tmp_path, 2, keep=3)
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt_00000001.pt"]
    assert not list(tmp_path.glob("*.tmp-*"))
    assert ck.latest_valid(tmp_path)[1]["step"] == 1


def test_no_checkpoint_is_none(tmp_path):
    assert ck.latest_valid(tmp_path / "missing") == (None, None)


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(32, 100, 10, 2.0, 0.0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 22 / 90)))


def test_missing_hash_says_what_is_true_and_can_be_loaded_on_request(tmp_path):
    path = ck.save_checkpoint(state(1), tmp_path, 1, keep=2)
    path.with_name(path.name + ".sha256").unlink()
    with pytest.raises(ck.CheckpointError, match="no .sha256 beside it") as e:
        ck.load_checkpoint(path)
    assert "incomplete" not in str(e.value) and "copied without it" in str(e.value)
    lines = []
    assert ck.load_checkpoint(path, require_hash=False, log=lines.append)["step"] == 1
    assert len(lines) == 1 and "unverified" in lines[0]


def test_pickled_code_is_refused_in_our_words(tmp_path):
    import argparse

    ck.save_checkpoint({"step": 1, "payload": argparse.Namespace(x=1)}, tmp_path, 1, keep=2)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_checkpoint(tmp_path / "ckpt_00000001.pt")
    assert "refused for safety" in str(e.value) and "weights_only" not in str(e.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ck.CheckpointError, match="not a readable PyTorch checkpoint"):
        ck.torch_load(tmp_path / "junk.pt")


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    for s in (1, 2):
        ck.save_checkpoint(state(s), tmp_path, s, keep=3)
        (tmp_path / f"ckpt_0000000{s}.pt").write_bytes(b"damaged")
    lines = []
    with pytest.raises(ck.CheckpointError, match="none of its 2 checkpoint") as e:
        ck.latest_valid(tmp_path, log=lines.append)
    assert len(lines) == 2 and "\n" not in str(e.value) and "--resume none" in str(e.value)
