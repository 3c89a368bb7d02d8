"""The trainer's records: the views grid and λ's histogram in TensorBoard, run.json, and W&B (offline)."""

import csv
import importlib.metadata
import io
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, tiny_folder
from PIL import Image

from bsim_fast import step as st
from bsim_fast.config import load_config
from bsim_fast.train import IMAGE_ROWS, main, train
from bsim_fast.views import GridLayout

real_make_views = st.make_views
MEAN, STD = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]  # configs/_base/cifar.yaml


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 32 images: 4 batches of 8 an epoch, so with train.accum_steps=2 no epoch ends inside a step
    return tiny_folder(tmp_path_factory.mktemp("data") / "train", per_class=8)


def run(data, out, *extra, recipe="byol_bsim", resume="none"):
    overrides = [f"data.train={data}", "data.val=", f"train.out_dir={out}", "train.tensorboard=true", *extra]
    return train(load_config(f"configs/small/{recipe}.yaml", TINY + overrides), resume=resume)


def events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "histograms": 0}).Reload()


def to_u8(view: torch.Tensor) -> np.ndarray:
    """A normalised [3, S, S] view back to uint8 HWC pixels: x * std + mean, rounded, by hand."""
    pixels = view.float().permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def panel(picture: np.ndarray, layout: GridLayout, row: int, col: int) -> np.ndarray:
    """The view shown in panel (row, col): the centre pixel of each enlarged block (a box outline covers only
    the outer ring of its blocks)."""
    y, x = layout.panel_origin(row, col)
    half = layout.scale // 2
    return picture[y : y + layout.panel, x : x + layout.panel][half :: layout.scale, half :: layout.scale]


def test_views_grid_at_its_steps_and_lam_histogram_at_every_log_line(data, tmp_path, monkeypatch):
    seen = []  # (a_u8, b_u8, views) of every micro-batch the training step made, in order

    def spy(a_u8, b_u8, cfg, gen, dtype, **layout):
        views = real_make_views(a_u8, b_u8, cfg, gen, dtype, **layout)
        seen.append((a_u8.clone(), b_u8.clone(), views))
        return views

    monkeypatch.setattr(st, "make_views", spy)
    # fp32 views on every device (a GPU's bf16 views would differ from the picture's fp32 replay by rounding)
    run(data, tmp_path, "train.max_steps=5", "train.accum_steps=2", "train.image_every_steps=2", "train.precision=fp32")
    assert len(seen) == 10  # two micro-batches a step, none dropped
    found = events(tmp_path)
    images = found.Images("train/views")
    assert [e.step for e in images] == [2, 4]
    for e in images:
        picture = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        a_u8, b_u8, views = seen[2 * e.step - 1]  # the last micro-batch of step e.step
        rows = min(IMAGE_ROWS, a_u8.shape[0])
        layout = GridLayout(rows=rows, cols=4, side=16, scale=6)  # photometric a, b; mixed m', m''
        assert picture.shape[:2] == layout.size
        for row in range(rows):
            expected = [
                a_u8[row].numpy(),
                b_u8[row].numpy(),
                to_u8(views["mixed_a"][row]),
                to_u8(views["mixed_b"][row]),
            ]
            for col, want in enumerate(expected):
                assert np.array_equal(panel(picture, layout, row, col), want), (e.step, row, col)
    histograms = found.Histograms("train/lam_values")
    assert [h.step for h in histograms] == [1, 2, 3, 4, 5]
    for h in histograms:  # λ', λ'' of both micro-batches of the step (train.log_every=1)
        lam = torch.cat([seen[i][2][k] for i in (2 * h.step - 2, 2 * h.step - 1) for k in ("lam_a", "lam_b")])
        value = h.histogram_value
        assert value.num == lam.numel() == 16
        assert value.sum == pytest.approx(lam.double().sum().item(), rel=1e-6)
        assert (value.min, value.max) == pytest.approx((lam.min().item(), lam.max().item()), rel=1e-6)


def test_image_every_steps_0_writes_no_image_and_sim_no_histogram(data, tmp_path):
    run(data, tmp_path / "bsim", "train.max_steps=2", "train.image_every_steps=0")
    tags = events(tmp_path / "bsim").Tags()
    assert tags["images"] == [] and tags["histograms"] == ["train/lam_values"]
    run(data, tmp_path / "sim", "train.max_steps=2", "train.image_every_steps=1", recipe="byol")
    found = events(tmp_path / "sim")
    assert found.Tags()["histograms"] == []  # SIM mixes nothing: no λ
    images = found.Images("train/views")
    assert [e.step for e in images] == [1, 2]
    layout = GridLayout(rows=IMAGE_ROWS, cols=2, side=16, scale=6)  # the photometric views only
    assert all((e.height, e.width) == layout.size for e in images)


# ---------------------------------------------------------------------------------------------- run.json
def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def installed(*names: str):
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def test_run_json_keeps_a_record_of_each_start(data, tmp_path):
    run(data, tmp_path, "train.max_steps=2")
    run(data, tmp_path, "train.max_steps=3", "train.image_every_steps=1", resume="auto")  # a logging key: resumable
    starts = json.loads((tmp_path / "run.json").read_text())["starts"]
    assert [(s["step"], s["resume"]) for s in starts] == [(0, "none"), (2, "auto")]
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    expected = {
        "commit": git("rev-parse", "--short", "HEAD") + ("+changes" if dirty else ""),
        "dirty": dirty,
        "torch": torch.__version__,
        "torchvision": installed("torchvision"),
        "triton": installed("triton"),
        "ffcv": installed("ffcv"),
        "dali": installed("nvidia-dali-cuda130", "nvidia-dali-cuda120"),
        "world_size": 1,
    }
    for start in starts:
        assert {k: start[k] for k in expected} == expected
        assert start["device"] and start["time"]
    # a new run moves the record aside with the rest of the earlier run
    run(data, tmp_path, "train.max_steps=1")
    assert len(json.loads((tmp_path / "previous_1" / "run.json").read_text())["starts"]) == 2
    assert [s["resume"] for s in json.loads((tmp_path / "run.json").read_text())["starts"]] == ["none"]


def test_a_run_json_that_is_no_record_is_moved_aside_in_one_line(data, tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "run.json").write_text("notes of mine\n")
    run(data, tmp_path, "train.max_steps=1")
    assert (tmp_path / "run.json.unreadable-1").read_text() == "notes of mine\n"
    assert len(json.loads((tmp_path / "run.json").read_text())["starts"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "run.json" in line]
    assert len(lines) == 1 and "run.json.unreadable-1" in lines[0]


# ---------------------------------------------------------------------------------------------- W&B
@pytest.mark.parametrize(
    "override,said",
    [
        ("train.wandb=a/b", "cannot hold /"),
        ("train.tensorboard=false", "train.tensorboard=false"),
        (None, "wandb package is not installed"),
    ],
)
def test_wandb_settings_are_checked_before_any_work(tmp_path, monkeypatch, capsys, override, said):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, wherever it is
    extra = [override] if override else []
    out = tmp_path / "run"
    rc = main(["--config", "configs/small/byol_bsim.yaml", f"train.out_dir={out}", "train.wandb=proj", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "train.wandb" in err and said in err, err
    assert not out.exists()  # nothing was started


def wandb_records(path):
    """The records of a W&B run file (`run-ID.wandb`): W&B's log of length-prefixed protobuf `Record`s in 32 KiB
    blocks, after a 7-byte file header (":W&B", magic, version); each chunk has a 7-byte header (checksum,
    length, type: 1 whole, 2 first, 3 middle, 4 last), and a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks = path.read_bytes(), 32768, 7, []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_history(run_dir) -> dict:
    """{TensorBoard step: {key: value}} of the history a W&B run folder holds."""
    (path,) = run_dir.glob("run-*.wandb")
    rows = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[row["global_step"]] = row
    return rows


def test_wandb_offline_syncs_the_tensorboard_scalars_and_images_and_resumes_the_same_run(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed: pip install 'bsim_fast[wandb]'")
    for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(data, tmp_path, "train.max_steps=3", "train.image_every_steps=2", "train.wandb=bsim-fast-test")
    record = json.loads((tmp_path / "run.json").read_text())["wandb"]
    assert record["project"] == "bsim-fast-test"
    (first,) = (tmp_path / "wandb").glob(f"offline-run-*-{record['id']}")
    history = wandb_history(first)
    losses = {
        int(r["step"]): float(r["value"])
        for r in csv.DictReader(open(tmp_path / "metrics.csv"))
        if r["kind"] == "train" and r["name"] == "loss"
    }
    assert sorted(history) == sorted(losses) == [1, 2, 3]
    for step, loss in losses.items():
        assert history[step]["train/loss"] == pytest.approx(loss, rel=1e-5)  # metrics.csv keeps 6 digits
    (image,) = history[2]["train/views/filenames"]
    assert (first / "files" / image).is_file()

    run(data, tmp_path, "train.max_steps=4", "train.image_every_steps=2", "train.wandb=bsim-fast-test", resume="auto")
    assert json.loads((tmp_path / "run.json").read_text())["wandb"] == record
    folders = sorted((tmp_path / "wandb").glob(f"offline-run-*-{record['id']}"))
    assert len(folders) == 2  # the same W&B run, continued
    later = wandb_history(next(f for f in folders if f != first))
    assert 4 in later and "train/views/filenames" in later[4]
