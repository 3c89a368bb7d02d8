"""The trainer's first contact (issue 24, trainer side), as a user meets it: real processes, signals and folders.
One training per run folder; ranks that end with their launcher; run folders that cannot be written; options
and overrides in any order; signals through scripts/train_8gpu.sh; the first line and the progress line; the
quickstart's account of what it proved."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, project_copy, tiny_folder

from bsim_fast.checkpoint import latest_valid, list_checkpoints
from bsim_fast.config import from_dict
from bsim_fast.eval import knn_monitor
from bsim_fast.loaders import build_eval_loader
from bsim_fast.methods import build_method
from bsim_fast.metrics import Progress, clock
from bsim_fast.runfolder import LOCK_NAME, RunFolderError, RunLock, process_start
from bsim_fast.seeds import seed_everything

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("data") / "train", "train", per_class=6)


def overrides(train_dir, out, *extra):
    return [*TINY, f"data.train={train_dir}", "data.val=", f"train.out_dir={out}", *extra]


def trainer(train_dir, out, *extra):
    return [sys.executable, "-m", "bsim_fast.train", "--config", "small/byol_bsim", *overrides(train_dir, out, *extra)]


def script(*args):
    return ["bash", "scripts/train_8gpu.sh", *args]


def run(args, env=None, timeout=600, cwd=ROOT):
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})}, check=False
    )


def start(args, logs: Path, env=None, **kw) -> subprocess.Popen:
    """A process whose output goes to logs/out.txt and logs/err.txt: files, not pipes, so that a process it
    leaves behind (a rank outliving its launcher) cannot keep the test waiting for the end of a pipe."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "out.txt", "w") as out, open(logs / "err.txt", "w") as err:
        return subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=err, env={**ENV, **(env or {})}, **kw)


def output(logs: Path) -> tuple[str, str]:
    return (logs / "out.txt").read_text(), (logs / "err.txt").read_text()


def one_line(r, *needles) -> str:
    err = r.stderr.strip()
    assert r.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err, (r.returncode, r.stdout, err)
    for needle in needles:
        assert needle in err, err
    return err


def wait_for(pred, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"ended early with exit code {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def has_checkpoint(out: Path) -> bool:
    return out.is_dir() and any(p.name.endswith(".pt.sha256") for p in out.iterdir())


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line holds `text` (zombies, which no longer run, left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def end_all(out: Path) -> None:
    """Ends, by pid, what a failed check may leave running of a training into `out`."""
    for pid in processes_naming(f"train.out_dir={out}"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---- one run per run folder -------------------------------------------------------------------------------
def test_a_busy_folder_is_refused_and_a_killed_runs_lock_is_taken_over(train_dir, tmp_path):
    out = tmp_path / "run"
    first = start(trainer(train_dir, out, "train.epochs=500", "train.ckpt_every_steps=1"), tmp_path / "logs")
    try:
        wait_for(lambda: has_checkpoint(out), first)
        holder = json.loads((out / LOCK_NAME).read_text())
        assert (holder["pid"], holder["host"]) == (first.pid, socket.gethostname())
        for extra in ((), ("--check-only",)):  # refused before any work, --check-only too
            second = run(trainer(train_dir, out, "train.epochs=500", *extra))
            one_line(second, f"train.out_dir={out} is in use", f"pid {first.pid} on host {socket.gethostname()}")
            assert "step " not in second.stdout
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    # killed (kill -9): its lock file stays behind; the same command takes the folder over and resumes
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid
    until = latest_valid(out)[1]["step"] + 2
    again = run(trainer(train_dir, out, "train.epochs=500", f"train.max_steps={until}"))
    assert again.returncode == 0, (again.stdout[-2000:], again.stderr)
    assert f"the training of pid {first.pid}" in again.stdout and "no longer running" in again.stdout
    assert "[resume]" in again.stdout and f"step {until}/{until}" in again.stdout
    assert not (out / LOCK_NAME).exists()  # let go at the end


def lock_file(out: Path, **holder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "started": "2026-01-01 00:00:00", "command": "python -m bsim_fast.train"}
    (out / LOCK_NAME).write_text(json.dumps({**base, **holder}))


def test_a_lock_file_is_judged_by_the_process_it_names(tmp_path):
    """The file alone (no kernel lock held, as on a file system without locks): a live process of this host with
    the start time the file records holds the folder; the same pid with another start time is a reused pid; a
    pid with no process is gone; another host's lock, free in the kernel, was let go."""
    other = subprocess.Popen(["sleep", "60"])
    lines = []
    try:
        started = process_start(other.pid)
        assert started and process_start(os.getpid()) != started
        lock_file(tmp_path / "alive", pid=other.pid, proc_start=started)
        busy = RunLock(tmp_path / "alive").busy()
        assert busy and f"pid {other.pid} on host {socket.gethostname()}" in busy
        with pytest.raises(RunFolderError, match="is in use by another training"):
            RunLock(tmp_path / "alive", log=lines.append).acquire()
        for name, holder, why in [
            ("reused", {"pid": other.pid, "proc_start": started + 1}, "its pid is now another program's"),
            ("gone", {"pid": 2**22 + 1, "proc_start": 5}, "its process is gone"),
            ("elsewhere", {"pid": 7, "host": "another-host"}, "its lock was let go"),
        ]:
            lock_file(tmp_path / name, **holder)
            assert RunLock(tmp_path / name).busy() is None
            lock = RunLock(tmp_path / name, log=lines.append)
            lock.acquire()
            assert why in lines[-1] and "takes the folder over" in lines[-1], lines
            assert json.loads((tmp_path / name / LOCK_NAME).read_text())["pid"] == os.getpid()
            lock.release()
            assert not (tmp_path / name / LOCK_NAME).exists()
    finally:
        other.kill()
        other.wait()


def test_every_rank_refuses_a_busy_folder(train_dir, tmp_path):
    """Rank 0 holds the lock; when it refuses, rank 1 learns it and refuses too: no rank starts, one line."""
    out = tmp_path / "run"
    held = RunLock(out)
    held.acquire()  # this test's process holds the folder, as another training would
    try:
        launcher = [sys.executable, "-m", "bsim_fast.dist", "--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
        r = run([*launcher, "-m", "bsim_fast.train", "--config", "small/byol_bsim", *overrides(train_dir, out)])
        one_line(r, "is in use by another training", f"pid {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, no checkpoint, no metrics
    finally:
        held.release()


# ---- the ranks end with their launcher ---------------------------------------------------------------------
def test_ranks_end_when_the_launchers_process_group_is_killed(train_dir, tmp_path):
    out = tmp_path / "run"
    args = script("small/byol_bsim", *overrides(train_dir, out, "train.epochs=500", "train.ckpt_every_steps=2"))
    launcher = start(args, tmp_path / "logs", env={"NPROC": "2"}, start_new_session=True)  # the script execs it
    try:
        wait_for(lambda: has_checkpoint(out), launcher)
        ranks = [p for p in processes_naming(f"train.out_dir={out}") if p != launcher.pid]
        assert len(ranks) == 2, ranks
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's group: torchrun put the ranks in their own
        launcher.wait()
        deadline = time.monotonic() + 15  # the kernel ends them at once; 15 s leaves room for a loaded machine
        while processes_naming(f"train.out_dir={out}") and time.monotonic() < deadline:
            time.sleep(0.1)
        left = processes_naming(f"train.out_dir={out}")
        assert left == [], f"ranks {left} outlived their launcher"
    finally:
        end_all(out)
    until = latest_valid(out)[1]["step"] + 2
    args = overrides(train_dir, out, "train.epochs=500", f"train.max_steps={until}")
    again = run(script("small/byol_bsim", *args), env={"NPROC": "2"})
    assert again.returncode == 0, (again.stdout[-2000:], again.stderr)
    assert "no longer running" in again.stdout and "[resume]" in again.stdout
    assert f"step {until}/{until}" in again.stdout


# ---- run folders that cannot be one -------------------------------------------------------------------------
def read_only_mount(folder: Path, command: list[str]) -> list[str] | None:
    """`command` run where `folder` is a read-only bind mount of itself (a mount namespace of its own), or None
    where this machine cannot make one (no unshare, no permission)."""
    if shutil.which("unshare") is None:
        return None
    wrap = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"']
    probe = subprocess.run([*wrap, str(folder), "sh", "-c", ': > "$0/x"', str(folder)], capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        return None
    return [*wrap, str(folder), *command]


@pytest.mark.parametrize("case", ["empty", "a file", "below a file", "read-only file system", "no permission"])
def test_a_run_folder_that_cannot_be_written_is_one_line_before_any_work(train_dir, tmp_path, case):
    (tmp_path / "notes.txt").write_text("a file")
    out = {
        "empty": "",
        "a file": tmp_path / "notes.txt",
        "below a file": tmp_path / "notes.txt" / "run",
        "read-only file system": tmp_path / "ro" / "run",
        "no permission": tmp_path / "locked" / "run",
    }[case]
    needle = {
        "empty": "train.out_dir is empty",
        "a file": "is a file, not a folder",
        "below a file": f"{tmp_path / 'notes.txt'} is a file, so no folder can be made below it",
        "read-only file system": "Read-only file system",
        "no permission": "Permission denied",
    }[case]
    wrap = list
    if case == "read-only file system":
        (tmp_path / "ro").mkdir()
        if read_only_mount(tmp_path / "ro", ["true"]) is None:
            pytest.skip("no read-only mount can be made here (needs unshare and mount permission)")
        wrap = lambda cmd: read_only_mount(tmp_path / "ro", cmd)  # noqa: E731
    if case == "no permission":
        if os.geteuid() == 0:
            pytest.skip("root writes in a folder without write permission; the read-only mount covers root")
        (tmp_path / "locked").mkdir(mode=0o555)
    before = sorted(tmp_path.rglob("*"))
    for extra in (("--check-only",), ()):
        one_line(run(wrap(trainer(train_dir, out, "train.max_steps=1", *extra))), needle)
    assert sorted(tmp_path.rglob("*")) == before  # nothing made, nothing left (not even the probe file)


def test_an_empty_data_train_is_one_line(tmp_path):
    for extra in (("--check-only",), ()):
        r = run(trainer("", tmp_path / "run", *extra))
        one_line(r, "data.train is empty: name the dataset")


# ---- options and overrides in any order ---------------------------------------------------------------------
def test_options_and_overrides_in_any_order(train_dir, tmp_path):
    args = overrides(train_dir, tmp_path / "a", "train.max_steps=1")
    r = run([sys.executable, "-m", "bsim_fast.train", "--config", "small/byol_bsim", "--resume", "none", *args])
    assert r.returncode == 0 and "step 1/1" in r.stdout, r.stderr
    r = run(
        [
            sys.executable,
            "-m",
            "bsim_fast.train",
            *args[:3],
            "--config",
            "small/byol_bsim",
            *args[3:],
            "--resume",
            "none",
        ]
    )
    assert r.returncode == 0 and "step 1/1" in r.stdout, r.stderr
    args = overrides(train_dir, tmp_path / "b", "train.max_steps=1")
    r = run(script("--resume", "none", "small/byol_bsim", *args[:4], "--check-only", *args[4:]))
    assert r.returncode == 0, r.stderr
    r = run(script(*args[:4], "--resume", "none", "small/byol_bsim", *args[4:]))
    assert r.returncode == 0 and "step 1/1" in r.stdout, r.stderr


# ---- signals through the script --------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signals_through_the_script_behave_as_documented(train_dir, tmp_path, sig, code):
    """SIGTERM (preemption): a checkpoint, `preempted`, exit 0, nothing on stderr. Ctrl-C (SIGINT to the
    terminal's process group: the launcher alone, the ranks run in sessions of their own): one line, exit 130.
    torchrun passes the signal to each rank's process group, its loader workers included (data.workers=2)."""
    out = tmp_path / "run"
    extra = ("train.epochs=500", "train.ckpt_every_steps=1000", "data.workers=2")
    args = script("small/byol_bsim", *overrides(train_dir, out, *extra))
    launcher = start(args, tmp_path / "logs", env={"NPROC": "2"}, start_new_session=True)
    metrics = out / "metrics.csv"
    try:
        wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 6, launcher)
        os.killpg(launcher.pid, sig)
        launcher.wait(timeout=120)
        left = processes_naming(f"train.out_dir={out}")  # the launcher ends after its ranks
    finally:
        end_all(out)
    stdout, stderr = output(tmp_path / "logs")
    assert launcher.returncode == code, (stdout[-2000:], stderr)
    if sig == signal.SIGTERM:
        assert stderr.strip() == "" and "preempted (SIGTERM): checkpoint written" in stdout
        assert list_checkpoints(out)
    else:
        assert stderr.strip() == "interrupted; the same command resumes from the newest checkpoint"
    assert left == []


# ---- the first line and the progress line --------------------------------------------------------------------
def test_first_line_says_what_it_does_and_progress_has_elapsed_and_time_left(train_dir, tmp_path):
    r = run(trainer(train_dir, tmp_path / "run", "train.epochs=2"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("[train] byol (bsim) into ") and "building the torch loader" in lines[0]
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert "[train] step 1: filling the loader's pipeline; then a line every 1 step(s)" in "\n".join(lines[:first_step])
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 6 and "elapsed " in steps[0] and " left " not in steps[0]
    assert all(" elapsed " in line and " left " in line for line in steps[1:]) and steps[-1].endswith("left 0:00")


def test_progress_times_by_hand():
    """Start at t=100 s; step 1 logged at 160 (start-up behind it: no pace yet), step 3 at 170: 5 s a step from
    step 1 on, 7 steps left of 10 -> 35 s; step 9 at 200: 40 s over 8 steps, 1 left -> 5 s."""
    progress = Progress(total_steps=10, now=100.0)
    assert progress.line(1, 160.0) == "elapsed 1:00"
    assert progress.line(3, 170.0) == "elapsed 1:10 left 0:35"
    assert progress.line(9, 200.0) == "elapsed 1:40 left 0:05"
    assert [clock(41), clock(725), clock(10930)] == ["0:41", "12:05", "3:02:10"]


# ---- the quickstart says what it proved ------------------------------------------------------------------------
@pytest.mark.slow
def test_quickstart_prints_the_untrained_knn_and_what_the_cpu_run_shows(train_dir, tmp_path):
    """The quickstart in a copy of the project, as a new user runs it, all but the install: the copy's install.sh
    links this test's environment (a test installs nothing). Tiny training overrides through QUICK_ARGS."""
    clone = project_copy(tmp_path / "clone")
    venv = Path(sys.executable).parent.parent
    (clone / "scripts" / "install.sh").write_text(f'#!/usr/bin/env bash\nln -sfn "{venv}" "$(dirname "$0")/../.venv"\n')
    val_dir = tiny_folder(tmp_path / "val", "test", per_class=3)
    quick = [*TINY, f"data.train={train_dir}", f"data.val={val_dir}", "train.epochs=1", "train.max_steps=2"]
    r = run(["bash", "scripts/quickstart.sh"], cwd=clone, env={"QUICK_ARGS": " ".join(quick), "PYTHONPATH": str(clone)})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    line = next(line for line in r.stdout.splitlines() if line.startswith("k-NN top-1 on "))
    match = re.fullmatch(
        rf"k-NN top-1 on {re.escape(str(val_dir))}: ([\d.]+)% after 2 steps, ([\d.]+)% untrained", line
    )
    assert match, line
    trained, untrained = map(float, match.groups())
    run_dir = clone / "runs" / "quickstart"
    assert trained == round(json.loads((run_dir / "final.json").read_text())["knn_top1"], 2)
    # the untrained network rebuilt here from the run's seed alone (the run seeds, then builds its method), scored
    # by the monitor the run used: the number the quickstart printed
    cfg = from_dict(json.loads((run_dir / "config.json").read_text()))
    seed_everything(cfg.train.seed)
    backbone = build_method(cfg).backbone
    expected = knn_monitor(backbone, cfg, build_eval_loader, 0, 1, torch.device("cpu"))["knn_top1"]
    assert untrained == round(expected, 2), (untrained, expected)
    assert "This CPU run shows that the pipeline runs end to end" in r.stdout
    assert "2 CPU steps do not learn" in r.stdout and "docs/RESULTS.md" in r.stdout
