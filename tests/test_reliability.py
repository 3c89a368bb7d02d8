"""Faults survived and bad flags refused: SIGKILL + resume, SIGTERM, NaN, damaged checkpoints, bad configs,
the 8-GPU script's checks (docs/RELIABILITY.md)."""

import argparse
import csv
import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY, tiny_folder

from bsim_fast.checkpoint import CheckpointError, latest_valid, list_checkpoints
from bsim_fast.dist import cpu_threads, set_cpu_threads

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("data") / "train", "train", per_class=6)


def cmd(train_dir, out, *extra):
    return [
        sys.executable,
        "-m",
        "bsim_fast.train",
        "--config",
        "configs/small/byol_bsim.yaml",
        *TINY,
        f"data.train={train_dir}",
        "data.val=",
        f"train.out_dir={out}",
        *extra,
    ]


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
    proc = subprocess.Popen(
        cmd(train_dir, tmp_path / "cut", *args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def reached():  # the run prunes old checkpoints while we look, so a look can find none
        try:
            state = latest_valid(tmp_path / "cut", log=lambda m: None)[1]
        except CheckpointError:
            return False
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
    # metrics cut back to the resumed step: every step once, the same losses as the uninterrupted run
    losses = [
        {r["step"]: r["value"] for r in csv.DictReader(open(tmp_path / name / "metrics.csv")) if r["name"] == "loss"}
        for name in ("full", "cut")
    ]
    rows = [r["step"] for r in csv.DictReader(open(tmp_path / "cut" / "metrics.csv")) if r["name"] == "loss"]
    assert len(rows) == len(set(rows)) == 6 and losses[0] == losses[1]


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(train_dir, tmp_path):
    proc = subprocess.Popen(
        cmd(train_dir, tmp_path, "train.epochs=50", "train.ckpt_every_steps=1000"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.csv"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 8, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "preempted" in out
    path, state = latest_valid(tmp_path)
    assert state is not None and 1 <= state["step"] < 50 * 3


def test_ctrl_c_is_one_line_not_a_traceback(train_dir, tmp_path):
    proc = subprocess.Popen(
        cmd(train_dir, tmp_path, "train.epochs=50", "train.ckpt_every_steps=1"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: list_checkpoints(tmp_path), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().count("\n") == 0 and "resumes" in err and "Traceback" not in err


def test_nan_loss_stops_with_one_line_and_no_checkpoint(train_dir, tmp_path):
    # a vanishing std turns the inputs into inf, so the very first loss is NaN
    r = subprocess.run(
        cmd(train_dir, tmp_path, "train.ckpt_every_steps=1", "data.std=[1e-38,1e-38,1e-38]"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "non-finite loss" in r.stderr and "Traceback" not in r.stderr
    assert list_checkpoints(tmp_path) == []


def test_nan_loss_skipped_by_option_never_poisons(train_dir, tmp_path):
    r = subprocess.run(
        cmd(train_dir, tmp_path, "train.epochs=1", "train.nan_policy=skip", "data.std=[1e-38,1e-38,1e-38]"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("step skipped") == 3
    state = latest_valid(tmp_path)[1]
    assert state["step"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["data.batch_size=7", "train.accum_steps=2"], "data.batch_size=7"),
        (["data.train=does/not/exist"], "does/not/exist"),
        (["data.batch_size=-8"], "data.batch_size"),
        (["train.bogus=1"], "train.bogus"),
        (["train.epochs=many"], "train.epochs"),
    ],
)
def test_bad_flags_one_line_nonzero_no_traceback(train_dir, tmp_path, extra, needle):
    r = subprocess.run(cmd(train_dir, tmp_path, *extra), env=ENV, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and needle in r.stderr and "Traceback" not in r.stderr


def test_unknown_recipe_for_the_8gpu_script():
    r = subprocess.run(["bash", "scripts/train_8gpu.sh", "byol_bsmi"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "byol_bsmi" in r.stderr and "byol_bsim" in r.stderr


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_every_checkpoint_damaged_refuses_unless_resume_none(train_dir, tmp_path):
    subprocess.run(
        cmd(train_dir, tmp_path, "train.max_steps=2", "train.ckpt_every_steps=1"),
        env=ENV,
        check=True,
        capture_output=True,
    )
    for ckpt in list_checkpoints(tmp_path):
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    r = subprocess.run(cmd(train_dir, tmp_path, "train.max_steps=2"), env=ENV, capture_output=True, text=True)
    one_line_error(r, "none of its 2 checkpoint(s) can be resumed", "sha256 mismatch", "--resume none")
    r = subprocess.run(
        cmd(train_dir, tmp_path, "train.max_steps=1", "--resume", "none"), env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "previous_1" in r.stdout and latest_valid(tmp_path)[1]["step"] == 1
    assert len(list_checkpoints(tmp_path / "previous_1")) == 2  # kept, not deleted


def test_checkpoint_holding_code_is_refused_in_our_words(train_dir, tmp_path):
    torch.save({"step": 1, "payload": argparse.Namespace(x=1)}, tmp_path / "ckpt_00000001.pt")
    data = (tmp_path / "ckpt_00000001.pt").read_bytes()
    (tmp_path / "ckpt_00000001.pt.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    r = subprocess.run(cmd(train_dir, tmp_path, "train.max_steps=2"), env=ENV, capture_output=True, text=True)
    one_line_error(r, "pickled code", "refused for safety")
    assert "weights_only" not in r.stdout + r.stderr and list_checkpoints(tmp_path) == [tmp_path / "ckpt_00000001.pt"]


def test_cpu_thread_count_leaves_room_and_says_so(monkeypatch):
    assert [cpu_threads(2, 1), cpu_threads(16, 1), cpu_threads(16, 8), cpu_threads(1, 1)] == [1, 8, 1, 1]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    lines = []
    try:
        n = set_cpu_threads(1, lines.append)
        assert torch.get_num_threads() == n and len(lines) == 1 and "OMP_NUM_THREADS" in lines[0]
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_cpu_threads(1, lines.append) == torch.get_num_threads() and len(lines) == 1  # the user's choice
    finally:
        torch.set_num_threads(before)


def script(*args, env=None):
    return subprocess.run(
        ["bash", "scripts/train_8gpu.sh", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**ENV, "PYTHON": sys.executable, **(env or {})},
    )


@pytest.mark.parametrize(
    "args,env,needle",
    [
        (["small/byol_bsim", "data.bogus=1"], {}, "data.bogus"),
        (["small/byol_bsim", "data.train=does/not/exist"], {}, "does/not/exist"),
        (["small/byol_bsim", "data.batch_size=6"], {"NPROC": "4"}, "world size 4"),
        (["small/byol_bsim", "--resume", "nowhere.pt"], {}, "nowhere.pt"),
        (["small/byol_bsim"], {"NPROC": "abc"}, "NPROC=abc"),
        (["small/byol_bsim"], {"NNODES": "2"}, "MASTER_ADDR"),
    ],
)
def test_8gpu_script_checks_before_torchrun(args, env, needle, tmp_path):
    """Refused before any training process starts: the script's Python is a logging shim, and the launcher
    (`-m bsim_fast.dist`, which runs torchrun) is never among its calls."""
    calls = tmp_path / "calls.txt"
    shim = tmp_path / "python"
    shim.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    r = script(*args, env={**env, "PYTHON": str(shim)})
    one_line_error(r, needle)
    launched = calls.read_text().splitlines() if calls.exists() else []
    assert not any("bsim_fast.dist" in line for line in launched), launched


def test_8gpu_script_child_error_is_one_line_exit_2(train_dir, tmp_path):
    # passes the checks, then every rank refuses the checkpoint (another batch size): said once, exit 2
    base = [*TINY, f"data.train={train_dir}", "data.val=", f"train.out_dir={tmp_path}"]
    subprocess.run(cmd(train_dir, tmp_path, "train.max_steps=1"), env=ENV, check=True, capture_output=True)
    r = script("small/byol_bsim", *base, "data.batch_size=4", env={"NPROC": "2"})
    one_line_error(r, "data.batch_size 8 -> 4", "world size 1 -> 2")
