"""The converters' output path and messages: checked before any work, never overwritten without --overwrite
nor replaced by another kind, sidecars installed with the output, one-line messages that say what happened,
labelled progress, FFCV writer workers that never outlive a failure, and a .beton size independent of
--workers."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import read_beton, tmp_leftovers
from PIL import Image

from bsim_fast import atomic
from data_prep import common, write_dali, write_ffcv

REPO_ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
CONVERTERS = [(write_ffcv.main, "out.beton"), (write_dali.main, "out_dali")]


def no_work(monkeypatch) -> None:
    """Fails the test if the converter scans the source or decodes anything."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the converter started work before refusing its output path")

    monkeypatch.setattr(common, "resolve_source", forbidden)
    monkeypatch.setattr(common, "map_samples", forbidden)


def one_error_line(capsys) -> str:
    """The error line, after any progress bars; nothing else printed (no traceback)."""
    err = [
        line
        for line in capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
        if line.strip() and not line.startswith(("validating:", "writing:", "converting:"))
    ]
    assert len(err) == 1, err
    return err[0]


# ---- the output path, before any work -----------------------------------------------------------------


def test_output_of_the_wrong_kind_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    folder, file = tmp_path / "a_folder.beton", tmp_path / "a_file"
    folder.mkdir()
    (folder / "something").write_text("x")
    file.write_text("x")
    no_work(monkeypatch)
    for args in ([], ["--overwrite"]):
        assert write_ffcv.main(["--output", str(folder), *args]) == 2
        assert f"{folder} is a folder, and this converter writes a file" in one_error_line(capsys)
        assert write_dali.main(["--output", str(file), *args]) == 2
        assert f"{file} is a file, and this converter writes a folder" in one_error_line(capsys)
    assert (folder / "something").read_text() == "x" and file.read_text() == "x"


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "plain_file").write_text("x")
    no_work(monkeypatch)
    for main, name in CONVERTERS:
        assert main(["--output", str(tmp_path / "plain_file" / "sub" / name)]) == 2
        assert f"{tmp_path / 'plain_file'} is not a folder" in one_error_line(capsys)

    locked = tmp_path / "locked"
    locked.mkdir()
    if IS_ROOT:  # root writes into a chmod 555 folder anyway: make the write test itself fail

        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    locked.chmod(0o555)
    try:
        for main, name in CONVERTERS:
            assert main(["--output", str(locked / "new" / name)]) == 2
            assert f"cannot write to {locked} (Permission denied)" in one_error_line(capsys)
    finally:
        locked.chmod(0o755)


def test_existing_output_needs_overwrite_and_only_ours_is_replaced(tmp_path, capsys):
    beton, shards = tmp_path / "x.beton", tmp_path / "shards"
    base = ["--subset", "20", "--workers", "1"]
    assert write_ffcv.main([*base, "--output", str(beton)]) == 0
    assert write_dali.main([*base, "--output", str(shards)]) == 0
    capsys.readouterr()
    before = beton.read_bytes()
    assert write_ffcv.main([*base, "--output", str(beton)]) == 2
    assert one_error_line(capsys).endswith(f"{beton} exists; pass --overwrite to replace it")
    assert write_dali.main([*base, "--output", str(shards)]) == 2
    assert one_error_line(capsys).endswith(f"{shards} exists; pass --overwrite to replace it")
    assert beton.read_bytes() == before
    assert write_ffcv.main([*base, "--subset", "30", "--output", str(beton), "--overwrite"]) == 0
    assert write_dali.main([*base, "--output", str(shards), "--overwrite"]) == 0
    assert len(read_beton(beton)[1]) == 30

    photos = tmp_path / "photos"  # a folder the converter did not write: never replaced
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    notes = tmp_path / "notes.beton"  # named like an output, but not one: no FFCV header
    notes.write_text("precious")
    capsys.readouterr()
    assert write_dali.main([*base, "--output", str(photos), "--overwrite"]) == 2
    assert "does not look like this converter's output" in one_error_line(capsys)
    assert write_ffcv.main([*base, "--output", str(notes), "--overwrite"]) == 2
    assert "does not look like this converter's output" in one_error_line(capsys)
    assert (photos / "holiday.jpg").read_bytes() == b"precious" and notes.read_text() == "precious"

    empty_folder, empty_file = tmp_path / "empty", tmp_path / "empty.beton"  # nothing to lose: no flag needed
    empty_folder.mkdir()
    empty_file.touch()
    assert write_dali.main([*base, "--output", str(empty_folder)]) == 0
    assert write_ffcv.main([*base, "--output", str(empty_file)]) == 0
    assert write_ffcv.main([*base, "--output", str(empty_file), "--overwrite"]) == 0  # an FFCV header: ours
    assert tmp_leftovers(tmp_path) == []


# ---- disk full around the sidecar files ----------------------------------------------------------------


def test_disk_full_while_writing_a_sidecar_keeps_the_previous_output(tmp_path, monkeypatch, capsys):
    out = tmp_path / "shards"
    assert write_dali.main(["--subset", "30", "--workers", "1", "--output", str(out)]) == 0
    sidecars = [tmp_path / "shards.skipped.tsv", tmp_path / "shards.summary.json"]
    before = {p.name: p.read_bytes() for p in [*out.iterdir(), *sidecars]}
    capsys.readouterr()
    real_write = common.write_sidecar

    def full_at_summary(path, text):
        if ".summary.json" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, text)

    monkeypatch.setattr(common, "write_sidecar", full_at_summary)
    assert write_dali.main(["--subset", "40", "--workers", "1", "--output", str(out), "--overwrite"]) == 1
    assert one_error_line(capsys).endswith(
        f"no space left on device while writing {out} (temporary output removed; previous output kept)"
    )
    assert {p.name: p.read_bytes() for p in [*out.iterdir(), *sidecars]} == before
    assert json.loads(sidecars[1].read_text())["images_written"] == 30 and tmp_leftovers(tmp_path) == []


def test_disk_full_after_a_rename_says_what_was_installed(tmp_path, monkeypatch):
    finals = [tmp_path / "data.bin", tmp_path / "data.bin.summary.json"]
    for final in finals:
        final.write_text("old")
    real_replace = os.replace
    calls = []

    def full_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_on_second)
    with pytest.raises(atomic.DiskFullError) as caught:
        with atomic.atomic_outputs((finals[0], False), (finals[1], False)) as temps:
            for tmp in temps:
                tmp.write_text("new")
    assert str(caught.value) == (
        f"no space left on device while installing {finals[0]}: {finals[0]} already "
        f"replaced by the new version, the rest not (rerun once there is space)"
    )
    assert [f.read_text() for f in finals] == ["new", "old"] and tmp_leftovers(tmp_path) == []


def test_a_folder_that_cannot_be_installed_is_put_back(tmp_path, monkeypatch):
    final = tmp_path / "shards"
    final.mkdir()
    (final / "meta.json").write_text("previous")
    real_replace = os.replace

    def fail_second(src, dst):  # first: the old folder aside; second: the new one into place -> fails
        if Path(src).name.startswith("shards.tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="Input/output"):
        with atomic.atomic_output(final, directory=True) as tmp:
            (tmp / "meta.json").write_text("new")
    assert (final / "meta.json").read_text() == "previous" and tmp_leftovers(tmp_path) == []


# ---- messages and progress ---------------------------------------------------------------------------


def test_skipped_lines_escape_tabs_and_newlines_in_file_names(tmp_path, capsys):
    root = tmp_path / "tree"
    (root / "cls").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "cls" / "fine.jpg")
    odd = "bad\tname\nsecond line\r.jpg"
    (root / "cls" / odd).write_bytes(b"not an image")
    out = tmp_path / "odd.beton"
    assert write_ffcv.main(["--source", str(root), "--output", str(out), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    escaped = "bad\\tname\\nsecond line\\r.jpg"
    skipped = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped: {root / 'cls' / escaped}: not an image")
    rows = (tmp_path / "odd.beton.skipped.tsv").read_text().split("\n")
    assert rows[1].split("\t") == [str(root / "cls" / escaped), "not an image (unrecognised content)"]
    assert write_dali.main(["--source", str(root), "--output", str(tmp_path / "s"), "--strict"]) == 1
    assert one_error_line(capsys).endswith(f"{root / 'cls' / escaped}: not an image (unrecognised content) (--strict)")


def test_ffcv_progress_bars_are_labelled(tmp_path, capsys):
    assert write_ffcv.main(["--subset", "40", "--workers", "1", "--output", str(tmp_path / "p.beton")]) == 0
    frames = [f for f in capsys.readouterr().err.replace("\r", "\n").splitlines() if "img" in f and "|" in f]
    assert {f.split(":")[0] for f in frames} == {"validating", "writing"}


def test_help_texts_show_no_empty_defaults():
    for parser in (write_ffcv.build_parser(), write_dali.build_parser()):
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text
        assert "(default: 512)" in text and "--no-labels" in text and "--overwrite" in text


# ---- FFCV writer workers ---------------------------------------------------------------------------


def test_beton_size_does_not_depend_on_workers(tmp_path):
    sizes = {}
    for workers in (1, 4):
        out = tmp_path / f"w{workers}.beton"
        assert (
            write_ffcv.main(["--subset", "300", "--workers", str(workers), "--write-mode", "raw", "--output", str(out)])
            == 0
        )
        sizes[workers] = out.read_bytes()
        summary = json.loads((tmp_path / f"w{workers}.beton.summary.json").read_text())
        assert summary["writer_processes"] == 1 and summary["page_size"] == 2 << 20
    assert sizes[1] == sizes[4]  # the same bytes: one writer for 0.9 MB of pixels


def test_page_size_and_writer_count_follow_the_data():
    mib = 1 << 20
    assert write_ffcv.page_size_for(32 * 32 * 3) == 2 * mib  # FFCV's smallest page
    assert write_ffcv.page_size_for(512 * 384 * 3) == 2 * mib
    assert write_ffcv.page_size_for(1024 * 1024 * 3) == 8 * mib  # twice the largest image, rounded up
    raw = np.full(5000, 32 * 32 * 3)  # the built-in train split
    assert write_ffcv.estimated_bytes(raw, "raw", 196608, 0.5) == 5000 * 3072
    assert write_ffcv.estimated_bytes(raw, "jpg", 196608, 0.5) == 5000 * 3072 // 8
    assert write_ffcv.estimated_bytes(raw, "smart", 1000, 0.5) == 5000 * 3072 // 8  # above the threshold
    assert write_ffcv.writer_count(8, 5000 * 3072, 2 * mib) == 1  # 7.3 pages: one writer
    assert write_ffcv.writer_count(8, 100 * 2 * mib, 2 * mib) == 6  # one writer per 16 pages
    assert write_ffcv.writer_count(8, 140 << 30, 2 * mib) == 8  # ImageNet-sized: all of them


def fail_in_writer(monkeypatch, action) -> None:
    """Sample 0 fails inside FFCV's writer process (after validation passed); every requested worker writes."""
    real_getitem = write_ffcv.ValidatedSamples.__getitem__

    def getitem(self, k):
        if k == 0:
            action()
        return real_getitem(self, k)

    monkeypatch.setattr(write_ffcv.ValidatedSamples, "__getitem__", getitem)  # inherited by the forked workers
    monkeypatch.setattr(write_ffcv, "writer_count", lambda workers, data_bytes, page_size: workers)


def test_failing_writer_while_others_still_start_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """A worker fails while the parent is still starting the others (a loaded machine): every worker is
    stopped before the temporary is removed, so none re-creates it afterwards."""

    def no_space():
        raise OSError(errno.ENOSPC, "No space left on device")

    fail_in_writer(monkeypatch, no_space)
    real_start = multiprocessing.context.ForkProcess.start

    def slow_start(self):
        real_start(self)
        time.sleep(0.4)

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", slow_start)
    out = tmp_path / "race.beton"
    assert write_ffcv.main(["--subset", "60", "--workers", "3", "--output", str(out)]) == 1
    assert one_error_line(capsys).endswith(
        f"no space left on device while writing {out} (temporary output removed; previous output kept)"
    )
    assert multiprocessing.active_children() == []
    time.sleep(1.0)  # a worker still running would re-create <out>.tmp-<pid> by now
    assert tmp_leftovers(tmp_path) == [] and not out.exists()


def test_killed_writer_process_is_one_line_not_a_hang(tmp_path, monkeypatch, capsys):
    fail_in_writer(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGKILL))  # as the OOM killer would
    out = tmp_path / "killed.beton"
    assert write_ffcv.main(["--subset", "40", "--workers", "2", "--output", str(out)]) == 1
    assert one_error_line(capsys).endswith(
        f"writing {out} failed: an FFCV writer process died (killed by signal 9; out of memory?)"
    )
    assert multiprocessing.active_children() == [] and tmp_leftovers(tmp_path) == []


FAILING_WRITE = """
import errno, sys
import numpy as np
from ffcv.fields import IntField, RGBImageField
from data_prep import write_ffcv

class Failing:  # 50,000 samples: ~500 chunks queued, more than a pipe holds
    def __len__(self):
        return 50_000
    def __getitem__(self, k):
        if k == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return np.zeros((2, 2, 3), np.uint8), 0

fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
try:
    write_ffcv.write_beton(sys.argv[1], Failing(), fields, 1, 2 << 20, sys.argv[1])
except Exception as exc:
    print("raised", type(exc).__name__, flush=True)
"""


def test_failed_write_of_a_large_set_does_not_hang_at_exit(tmp_path):
    """The chunks no worker will read must not keep the converter from exiting after its error line."""
    child = subprocess.Popen(
        [sys.executable, "-c", FAILING_WRITE, str(tmp_path / "big.beton")],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "raised DiskFullError"  # after the (slow) ffcv import
        assert child.wait(timeout=60) == 0  # it hung here, joining the queue's feeder thread
    finally:
        child.kill()
        child.wait()
