"""The tools' harness (`bsim_fast.tools.harness`), tested once for bench, speedrun and gpu_check: reports are
written atomically and completely (a writer killed at any moment leaves whole files), targets get their status
from hand-worked figures, and the timing loop counts what it timed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bsim_fast.tools import harness

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- reports
def test_report_json_and_markdown_are_written_together_and_a_failed_write_keeps_the_previous(tmp_path):
    harness.write_report(tmp_path, "report", {"rows": [1, 2], "name": "first"}, "# first\n")
    assert json.loads((tmp_path / "report.json").read_text()) == {"rows": [1, 2], "name": "first"}
    assert (tmp_path / "report.md").read_text() == "# first\n"

    # the markdown fails after the JSON's temporary is written: neither file changes, no temporary is left
    with pytest.raises(TypeError):
        harness.write_report(tmp_path, "report", {"name": "second"}, markdown=b"not text")
    assert json.loads((tmp_path / "report.json").read_text())["name"] == "first"
    assert (tmp_path / "report.md").read_text() == "# first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]

    harness.write_report(tmp_path, "bench", {"rows": []})  # JSON alone
    assert json.loads((tmp_path / "bench.json").read_text()) == {"rows": []} and not (tmp_path / "bench.md").exists()


WRITER = """
import sys
from pathlib import Path
from bsim_fast.tools import harness

out, pad = Path(sys.argv[1]), "x" * 300_000
for i in range(10**9):
    harness.write_report(out, "report", {"i": i, "pad": pad}, f"# report {i}\\n{pad}\\nend {i}\\n")
    if i == 0:
        print("first", flush=True)
"""


def test_a_writer_killed_at_any_moment_leaves_complete_reports(tmp_path):
    """SIGKILL while a 300 KB report pair is rewritten in a loop: both files parse whole; the markdown is the
    JSON's or the one before it (the JSON is renamed into place first); the next writer clears the temporaries."""
    for delay in (0.05, 0.2, 0.5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"first"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        report = json.loads((tmp_path / "report.json").read_text())
        md = (tmp_path / "report.md").read_text().splitlines()
        assert len(report["pad"]) == 300_000 and len(md[1]) == 300_000
        assert md[0] == f"# report {md[2].split()[1]}" and int(md[2].split()[1]) in (report["i"], report["i"] - 1)
    harness.write_report(tmp_path, "report", {"i": -1}, "# report -1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_png_is_written_whole(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([0, 1], [1, 0])
    harness.write_png(tmp_path / "chart.png", fig)
    png = (tmp_path / "chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[-8:] == b"IEND\xaeB`\x82"  # signature ... end chunk
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]


# --------------------------------------------------------------------------------------------- targets
def test_targets_status_and_tables_from_hand_worked_rows():
    # (measured, op, bound) worked by hand: 2,250 >= 2,200 holds; 3,000 >= 3,300 does not; 0.022 <= 0.03 holds;
    # 2.4 <= 2.0 does not; equality meets either bound
    assert [harness.meets(v, op, b) for v, op, b in [(2250, ">=", 2200), (3000, ">=", 3300)]] == [True, False]
    assert [harness.meets(v, op, b) for v, op, b in [(0.022, "<=", 0.03), (2.4, "<=", 2.0)]] == [True, False]
    assert harness.meets(3.0, ">=", 3.0) and harness.meets(3.0, "<=", 3.0)
    with pytest.raises(ValueError, match="'>'"):
        harness.meets(1.0, ">", 0.0)
    # met / applicable -> status: a figure from another machine or size is n/a, never pass or miss
    assert harness.judge(True, True) == "pass" and harness.judge(False, True) == "miss"
    assert harness.judge(True, False) == "n/a" and harness.judge(False, False) == "n/a"
    assert harness.judge(None, True) == "not measured" and harness.judge(None, False) == "not measured"

    targets = [
        {"id": "speed", "what": "images/s", "op": ">=", "value": 2200},
        {"id": "launches", "what": "launches per view", "op": "<=", "value": 6},
        {"id": "ffcv", "what": "FFCV images/s", "op": ">=", "value": 3300},
    ]
    measured = {"speed": 2250.0, "launches": 7.0, "ffcv": None}
    evaluated = [
        {
            **t,
            "target": f"{t['op']} {t['value']}",
            "measured": measured[t["id"]],
            "status": harness.judge(
                None if measured[t["id"]] is None else harness.meets(measured[t["id"]], t["op"], t["value"]), True
            ),
        }
        for t in targets
    ]
    assert harness.targets_report_table(evaluated, lambda v: f"{v:,.0f}") == [
        "| id | what | target | measured | status |",
        "|---|---|---|---|---|",
        "| `speed` | images/s | >= 2200 | 2,250 | **pass** |",
        "| `launches` | launches per view | <= 6 | 7 | **miss** |",
        "| `ffcv` | FFCV images/s | >= 3300 | — | **not measured** |",
    ]
    assert harness.targets_doc_table(targets, "what (one H100)", lambda t: f"{t['op']} {t['value']}") == "\n".join(
        [
            "| id | what (one H100) | target |",
            "|---|---|---|",
            "| `speed` | images/s | >= 2200 |",
            "| `launches` | launches per view | <= 6 |",
            "| `ffcv` | FFCV images/s | >= 3300 |",
        ]
    )


# ---------------------------------------------------------------------------------------------- timing
def test_timed_counts_the_items_of_the_timed_calls_only():
    calls = []

    def fn():
        calls.append(len(calls))
        return 3

    per_s, seconds = harness.timed(fn, "cpu", warmup=2, iters=5)
    assert len(calls) == 7 and seconds > 0
    assert per_s * seconds == pytest.approx(5 * 3)  # 5 timed calls of 3 items; the 2 warm-up calls not counted


class FakeLoader:
    """Two batches an epoch, each of 4 'images' whose value is (epoch, batch)."""

    def __init__(self, per_epoch=2):
        self.per_epoch = per_epoch

    def epoch(self, epoch):
        for b in range(self.per_epoch):
            yield torch.full((4, 1), epoch), torch.full((4, 1), b), None


def test_loader_views_continue_across_epochs_and_images_s_feeds_the_step():
    got = [(int(a[0]), int(b[0])) for a, b in harness.loader_views(FakeLoader(), 5)]
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    with pytest.raises(RuntimeError, match="fewer images than one batch"):
        list(harness.loader_views(FakeLoader(per_epoch=0), 1))

    seen = []
    per_s, seconds = harness.images_s(
        harness.loader_views(FakeLoader(), 3), "cpu", 1, 2, lambda a, b: seen.append((int(a[0]), int(b[0])))
    )
    assert seen == [(0, 0), (0, 1), (1, 0)]  # warm-up pair first, then the two timed pairs, in order
    assert per_s * seconds == pytest.approx(2 * 4)


def test_budget_skips_what_would_end_after_the_deadline():
    assert harness.Budget(None).allows(1e9) and harness.Budget(None).left() == float("inf")
    budget = harness.Budget.of(100.0)
    assert budget.allows(50) and not budget.allows(150)
    assert not harness.Budget(time.time() - 1).allows(0)


def test_installed_without_importing(monkeypatch):
    assert harness.installed("json") and harness.installed("xml.etree")
    assert not harness.installed("no_such_package_xyz") and not harness.installed("no_such_package_xyz.sub")
    monkeypatch.setitem(sys.modules, "made_unimportable_xyz", None)  # as a shim blocks ffcv or DALI
    assert not harness.installed("made_unimportable_xyz")
