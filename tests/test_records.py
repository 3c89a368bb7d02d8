"""The trainer's records: the views grid and λ's histogram in TensorBoard."""

import io

import numpy as np
import pytest
import torch
from helpers import TINY, tiny_folder
from PIL import Image

from bsim_fast import step as st
from bsim_fast.config import load_config
from bsim_fast.train import IMAGE_ROWS, train
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

    def spy(a_u8, b_u8, cfg, gen, dtype):
        views = real_make_views(a_u8, b_u8, cfg, gen, dtype)
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
