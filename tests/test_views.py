"""`python -m bsim_fast.views`: the PNG's panels are the step's own views, its numbers are the draws'.

The picture is decoded and its panels are compared, pixel for pixel, with what the library makes of the
same batch: `augment.photometric` of the crop panels with the loader's generator, `mix.make_views` of the
photometric panels with training step 0's generator (denormalised here), and the CutMix equation written
out. The λ histogram's mean is the mean of `mix.sample_boxes` draws; the analytic mean is worked by hand.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_folder
from PIL import Image

from bsim_fast import augment, views
from bsim_fast.config import load_config
from bsim_fast.loaders import KINDS, build_train_loader
from bsim_fast.loaders.base import photometric_generator
from bsim_fast.mix import expected_lam, make_views, sample_boxes
from bsim_fast.step import step_generator

REPO = Path(__file__).resolve().parents[1]
SIDE, N, SEED, DRAWS = 16, 4, 3, 3000
SMALL = [f"data.image_size={SIDE}", "data.workers=0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("views") / "set", per_class=4, classes=4)


def decode(png: Path) -> tuple[np.ndarray, dict]:
    with Image.open(png) as im:
        assert im.mode == "RGB"
        return np.asarray(im).copy(), json.loads(im.text[views.PNG_KEY])


def panels(image: np.ndarray, col: int, rows: int, side: int, scale: int) -> np.ndarray:
    """Column `col`'s views [rows, side, side, 3]: each view pixel read at the centre of its block."""
    layout = views.GridLayout(rows=rows, cols=6, side=side, scale=scale)
    out = []
    for row in range(rows):
        y, x = layout.panel_origin(row, col)
        block = image[y : y + side * scale, x : x + side * scale]
        out.append(block[scale // 2 :: scale, scale // 2 :: scale])
    return np.stack(out)


def make_png(tmp_path, recipe, *extra, device="cpu") -> Path:
    out = tmp_path / "sub" / "views.png"
    argv = [recipe, *SMALL, *extra, "--n", str(N), "--seed", str(SEED), "--draws", str(DRAWS), "--out", str(out)]
    argv += ["--device", device]
    assert views.main(argv) == 0
    return out


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]
        ),
    ],
)
def test_panels_are_the_steps_views_and_the_mean_is_the_draws(folder, tmp_path, capsys, device):
    """On a GPU the step's own kernels (photometric, CutMix) make the views; the expectations run there too."""
    recipe = str(REPO / "configs/small/byol_bsim.yaml")
    png = make_png(tmp_path, recipe, "data.loader=torch", "--data", str(folder), device=device)
    image, numbers = decode(png)
    scale = math.ceil(96 / SIDE)  # views are enlarged by a whole factor to at least 96 px: 6 at 16 px
    assert image.shape[:2] == views.GridLayout(rows=N, cols=6, side=SIDE, scale=scale).size
    assert image.shape[0] >= N * SIDE * scale and image.shape[1] >= 6 * SIDE * scale
    crops_a, crops_b, photo_a, photo_b, mixed_a, mixed_b = (panels(image, c, N, SIDE, scale) for c in range(6))

    cfg = load_config(
        recipe, SMALL + ["data.loader=torch", f"data.train={folder}", f"data.batch_size={N}", f"train.seed={SEED}"]
    )
    # the crop panels: batch 0 of epoch 0 of the recipe's loader (torch) with a batch of N
    loader = build_train_loader(cfg, 0, 1, device)
    a_u8, b_u8, _ = next(iter(loader.crops(0, 0)))
    assert np.array_equal(crops_a, a_u8.cpu().numpy()) and np.array_equal(crops_b, b_u8.cpu().numpy())
    # the photometric panels: the recipe's two policies with the generator of (seed, epoch 0, batch 0, rank 0)
    t1, t2 = augment.policy_for(cfg)
    g = photometric_generator(SEED, 0, 0, 0, device)
    on = {k: torch.from_numpy(v).to(device) for k, v in dict(a=crops_a, b=crops_b, pa=photo_a, pb=photo_b).items()}
    assert np.array_equal(photo_a, augment.photometric(on["a"], t1, g).cpu().numpy())
    assert np.array_equal(photo_b, augment.photometric(on["b"], t2, g).cpu().numpy())
    # the mixed panels: make_views of the photometric panels with training step 0's generator, denormalised
    made = make_views(on["pa"], on["pb"], cfg, step_generator(SEED, 0, 0), torch.float32)
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    for key, shown in (("mixed_a", mixed_a), ("mixed_b", mixed_b)):
        expect = (made[key].cpu() * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(shown, expect), key
    assert numbers["partner"] == made["partner"].tolist()
    assert numbers["lam_a"] == made["lam_a"].tolist() and numbers["lam_b"] == made["lam_b"].tolist()
    # the same, from the CutMix equation: inside box_i the partner's view, outside the sample's own;
    # λ_i = 1 - area(box_i) / S²; the box's border ring is drawn in BOX_RGB on the enlarged panel
    for photo, shown, boxes, lam in (
        (photo_a, mixed_a, numbers["boxes_a"], numbers["lam_a"]),
        (photo_b, mixed_b, numbers["boxes_b"], numbers["lam_b"]),
    ):
        for i, (y0, y1, x0, x1) in enumerate(boxes):
            expect = photo[i].copy()
            expect[y0:y1, x0:x1] = photo[numbers["partner"][i]][y0:y1, x0:x1]
            assert np.array_equal(shown[i], expect)
            assert lam[i] == pytest.approx(1 - (y1 - y0) * (x1 - x0) / SIDE**2, abs=1e-6)
    layout = views.GridLayout(rows=N, cols=6, side=SIDE, scale=scale)
    drawn = [(i, b) for i, b in enumerate(numbers["boxes_a"]) if b[1] > b[0] and b[3] > b[2]]
    assert drawn, "no box to check the outline on"
    for i, (y0, y1, x0, x1) in drawn:
        y, x = layout.panel_origin(i, 4)
        assert (image[y + y0 * scale, x + x0 * scale : x + x1 * scale] == views.BOX_RGB).all()
        assert (image[y + y0 * scale : y + y1 * scale, x + x1 * scale - 1] == views.BOX_RGB).all()

    # the histogram's numbers: the mean of DRAWS boxes of mix.sample_boxes at the recipe's size and alpha,
    # seeded by the seed; the analytic mean at alpha = 1 worked by hand (docs/METHOD.md)
    _, lam = sample_boxes(DRAWS, SIDE, SIDE, cfg.bsim.alpha, generator=torch.Generator().manual_seed(SEED))
    assert numbers["lam_mean"] == pytest.approx(float(np.mean(lam.numpy().astype(np.float64))), abs=1e-12)
    assert cfg.bsim.alpha == 1.0 and numbers["lam_analytic"] == pytest.approx(1 - (1 / 2 - 1 / 5 + 1 / 48), abs=1e-12)
    assert numbers["lam_draws"] == DRAWS
    out = capsys.readouterr().out
    assert f"λ mean {numbers['lam_mean']:.4f}" in out and str(png) in out


def test_expected_lam_by_hand_and_against_draws():
    # alpha = 1: s uniform, E[s] = 1/2, E[s^1.5] = 2/5, E[s^2] = 1/3
    assert expected_lam(1.0) == pytest.approx(1 - (1 / 2 - 1 / 5 + 1 / 48), abs=1e-12)
    # alpha = 1/2 (arcsine): E[s] = 1/2, E[s^1.5] = 4 / (3 pi), E[s^2] = 3/8
    assert expected_lam(0.5) == pytest.approx(1 - (1 / 2 - 2 / (3 * math.pi) + 3 / 128), abs=1e-12)
    # the continuous model simulated: a box of side r = sqrt(1 - lam0) with a uniform centre, clipped
    rng = np.random.default_rng(0)
    for alpha in (0.75, 2.0):
        r = np.sqrt(1 - rng.beta(alpha, alpha, 10**6))
        kept = [np.clip(c + r / 2, 0, 1) - np.clip(c - r / 2, 0, 1) for c in rng.random((2, 10**6))]
        assert expected_lam(alpha) == pytest.approx(1 - np.mean(kept[0] * kept[1]), abs=2e-3)
    # real boxes at a large size have nearly continuous sides
    _, lam = sample_boxes(200_000, 2048, 2048, 1.0, generator=torch.Generator().manual_seed(0))
    assert float(lam.double().mean()) == pytest.approx(expected_lam(1.0), abs=2e-3)


def test_grid_without_crops_or_mixing(folder):
    """A training step has only the photometric views; a SIM step has no mixed views: fewer columns."""
    cfg = load_config(REPO / "configs/small/byol.yaml", SMALL)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 256, (3, SIDE, SIDE, 3), dtype=torch.uint8, generator=g) for _ in range(2))
    batch = views.step_views(a, b, cfg, step_generator(0, 0, 0))
    assert batch.mixed_a is None and [c[0] for c in batch.columns()][0].startswith("a = t'(x)")
    image = views.views_grid(batch, np.full(10, 0.5, np.float32), 1.0)
    layout = views.GridLayout(rows=3, cols=2, side=SIDE, scale=6)
    assert image.dtype == np.uint8 and image.shape == (*layout.size, 3)
    y, x = layout.panel_origin(2, 1)
    assert np.array_equal(image[y + 3 : y + 96 : 6, x + 3 : x + 96 : 6], b[2].numpy())


@pytest.fixture(scope="module")
def converted(folder, tmp_path_factory):
    sys.path.insert(0, str(REPO))
    from data_prep import write_dali, write_ffcv

    root = tmp_path_factory.mktemp("views_converted")
    beton, shards = root / "set.beton", root / "shards"
    assert write_ffcv.main(["--source", str(folder), "--output", str(beton), "--workers", "1"]) == 0
    assert write_dali.main(["--source", str(folder), "--output", str(shards), "--workers", "1"]) == 0
    return {"ffcv": beton, "dali": shards, "torch": folder, "gpu_resident": folder}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_loader_on_the_cpu(kind, converted, tmp_path):
    """The crop panels are that loader's own batch 0 (each back end crops in its own way)."""
    recipe = str(REPO / "configs/small/simclr_wbsim.yaml")
    png = make_png(tmp_path, recipe, f"data.loader={kind}", "--data", str(converted[kind]))
    image, numbers = decode(png)
    assert numbers["loader"] == kind and len(numbers["partner"]) == N
    cfg = load_config(recipe, SMALL + [f"data.loader={kind}", f"data.train={converted[kind]}"])
    cfg.data.batch_size, cfg.train.seed = N, SEED
    crops = build_train_loader(cfg, 0, 1, "cpu").crops(0, 0)
    a_u8, _, _ = next(crops)
    crops.close()
    assert np.array_equal(panels(image, 0, N, SIDE, 6), a_u8.numpy())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bsim_fast.views", *args], capture_output=True, text=True, cwd=REPO)


def test_bad_input_is_one_line_before_work(folder, tmp_path):
    recipe = "configs/small/byol_bsim.yaml"
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"mine")
    good = ["data.loader=torch", "--data", str(folder)]
    for args, words in (
        ([recipe, *good, "--out", str(taken)], "--overwrite"),
        ([recipe, *good, "--n", "1", "--out", str(tmp_path / "a.png")], "--n 1"),
        ([recipe, *good, "--out", str(tmp_path / "a.jpg")], ".png"),
        ([recipe, *good, "--draws", "0", "--out", str(tmp_path / "a.png")], "--draws"),
        ([recipe, *good, "data.batch_size=4", "--out", str(tmp_path / "a.png")], "set by --n"),
        ([recipe, "data.loader=torch", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "a.png")], "nope"),
        ([recipe, "data.loader=ffcv", "--data", str(folder), "--out", str(tmp_path / "a.png")], "data.loader=torch"),
        (["configs/small/nope.yaml", "--out", str(tmp_path / "a.png")], "nope.yaml"),
        ([recipe, *good, "--n", "40", "--device", "cpu", "--out", str(tmp_path / "a.png")], "16 images"),
        ([recipe, *good, "--device", "tpu", "--out", str(tmp_path / "a.png")], "--device tpu"),
        ([recipe, *good, "--device", "cuda:7", "--out", str(tmp_path / "a.png")], "--device cuda:7"),
    ):
        r = run_cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, (args, r.stderr)
    assert taken.read_bytes() == b"mine" and not (tmp_path / "a.png").exists()
