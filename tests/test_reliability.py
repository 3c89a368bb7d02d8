"""Faults survived and bad flags refused: SIGKILL + resume, SIGTERM, NaN, bad configs (docs/RELIABILITY.md)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from bsim_fast.checkpoint import latest_valid, list_checkpoints
from helpers import TINY, tiny_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("data") / "train", "train", per_class=6)


def cmd(train_dir, out, *extra):
    return [sys.executable, "-m", "bsim_fast.train", "--config", "configs/small/byol_bsim.yaml", *TINY,
            f"data.train={train_dir}", "data.val=", f"train.out_dir={out}", *extra]


def wait_for(pred, proc, timeout=240):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted(train_dir, tmp_path):
    args = ("train.epochs=2", "train.ckpt_every_steps=1")
    subprocess.run(cmd(train_dir, tmp_path / "full", *args), env=ENV, check=True, capture_output=True)
    kill_after = random.Random().randint(1, 4)
    proc = subprocess.Popen(cmd(train_dir, tmp_path / "cut", *args), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def reached():   # the run prunes old checkpoints while we look, so a look can find none
        state = latest_valid(tmp_path / "cut", log=lambda m: None)[1]
        return state is not None and state["step"] >= kill_after

    wait_for(reached, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run(cmd(train_dir, tmp_path / "cut", *args), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "[resume]" in r.stdout
    full, cut = latest_valid(tmp_path / "full")[1], latest_valid(tmp_path / "cut")[1]
    assert full["step"] == cut["step"] == 6
    for k in full["model"]:
        assert torch.equal(full["model"][k], cut["model"][k]), k
    assert not list((tmp_path / "cut").glob("*.tmp-*"))


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(train_dir, tmp_path):
    proc = subprocess.Popen(cmd(train_dir, tmp_path, "train.epochs=50", "train.ckpt_every_steps=1000"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.csv"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 8, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "preempted" in out
    path, state = latest_valid(tmp_path)
    assert state is not None and 1 <= state["step"] < 50 * 3


def test_nan_loss_stops_with_one_line_and_no_checkpoint(train_dir, tmp_path):
    # a vanishing std turns the inputs into inf, so the very first loss is NaN
    r = subprocess.run(cmd(train_dir, tmp_path, "train.ckpt_every_steps=1", "data.std=[1e-38,1e-38,1e-38]"),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "non-finite loss" in r.stderr and "Traceback" not in r.stderr
    assert list_checkpoints(tmp_path) == []


def test_nan_loss_skipped_by_option_never_poisons(train_dir, tmp_path):
    r = subprocess.run(cmd(train_dir, tmp_path, "train.epochs=1", "train.nan_policy=skip",
                           "data.std=[1e-38,1e-38,1e-38]"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("step skipped") == 3
    state = latest_valid(tmp_path)[1]
    assert state["step"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("extra,needle", [
    (["data.batch_size=7", "train.accum_steps=2"], "data.batch_size=7"),
    (["data.train=does/not/exist"], "does/not/exist"),
    (["data.batch_size=-8"], "data.batch_size"),
    (["train.bogus=1"], "train.bogus"),
    (["train.epochs=many"], "train.epochs"),
])
def test_bad_flags_one_line_nonzero_no_traceback(train_dir, tmp_path, extra, needle):
    r = subprocess.run(cmd(train_dir, tmp_path, *extra), env=ENV, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and needle in r.stderr and "Traceback" not in r.stderr


def test_unknown_recipe_for_the_8gpu_script():
    r = subprocess.run(["bash", "scripts/train_8gpu.sh", "byol_bsmi"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "byol_bsmi" in r.stderr and "byol_bsim" in r.stderr
