"""One resize for every loader (bsim_fast/loaders/resize.py): each back end's view of the same image, box and
flip, at 32 and 224 px, against an independent resize; and what the old resize did to small crops.

The reference is torch's `interpolate(mode=..., antialias=True)` in float64 on the cut crop, rounded half up
once: PyTorch's own implementation of Pillow's antialiased filters (Keys' cubic with a = -0.5, the triangle
for bilinear, both stretched by the scale factor where a crop shrinks), written apart from resize.py and
rounded once as resize.py defines its result. Tolerances, in grey levels:
- FFCV's compiled resize and gpu_resident's matmuls compute the same sums in float32: at most 1 (a sum within
  float error of .5), mean under 0.01.
- the torch loader (Pillow, the anchors' own code, which rounds and clips its intermediate image after the
  first pass) and DALI (INTERP_CUBIC / INTERP_LINEAR, its own evaluation of the filters): mean under 0.3,
  99% of values within 1 and 99.8% within 2. Measured on these images: Pillow mean 0.17-0.21, 99.9% within
  1, max 6; DALI mean 0.003-0.07, 99.3% (bicubic at 32 px) to 100% within 1, 99.9% within 2, max 7.
A box off by one pixel or a missing flip moves a view by 2 to 10+ on average (`test_flip_and_box_...`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bsim_fast.datasets import builtin_root
from bsim_fast.loaders import resize
from bsim_fast.loaders.base import CROP_ATTEMPTS, random_resized_crop_params
from bsim_fast.tools.bench_data import procedural_photo

INTERPOLATIONS = ("bicubic", "bilinear")


def photographs(size: int) -> list[np.ndarray]:
    """Images a loader meets at `size`: CIFAR-10 test images (32 px), or 500x375 photo-like ones (224 px)."""
    if size == 32:
        root = builtin_root() / "test"
        files = [sorted(d.iterdir())[0] for d in sorted(root.iterdir())[:4]]
        return [np.asarray(Image.open(f).convert("RGB")) for f in files]
    rng = np.random.default_rng(3)
    return [np.ascontiguousarray(procedural_photo(rng, size)) for size in ((500, 375), (375, 500))]


def boxes(image: np.ndarray, count: int, seed: int) -> list[tuple]:
    """(top, left, h, w, flip): RandomResizedCrop's boxes (scale 0.08-1) and a flip every other box."""
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    return [
        (*random_resized_crop_params(height, width, (0.08, 1.0), (3 / 4, 4 / 3), rng.random((CROP_ATTEMPTS, 4))), k % 2)
        for k in range(count)
    ]


def reference(image: np.ndarray, box, size: int, interpolation: str) -> np.ndarray:
    top, left, h, w, flip = box
    crop = torch.from_numpy(image[top : top + h, left : left + w].copy()).permute(2, 0, 1)[None].double()
    out = F.interpolate(crop, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
    out = (out + 0.5).floor().clamp(0, 255)[0].permute(1, 2, 0)
    return (out.flip(1) if flip else out).numpy().astype(np.int64)


# ---- each back end's resize, called with a given box ----------------------------------------------------


def ffcv_views(image, cases, size, interpolation):
    from ffcv.pipeline.compiler import Compiler

    resize_crop = resize.compiled_resize_crop(Compiler.compile)  # as TwoViewCropDecoder compiles it
    out = []
    for top, left, h, w, flip in cases:
        view = np.empty((size, size, 3), np.uint8)
        resize_crop(image, top, left, h, w, view, resize.filter_code(interpolation), bool(flip))
        out.append(view)
    return out


def torch_views(image, cases, size, interpolation):
    from bsim_fast.loaders.torch_loader import crop_view

    pil = Image.fromarray(image)
    return [crop_view(pil, (t, left, h, w), size, interpolation, bool(f)) for t, left, h, w, f in cases]


def gpu_resident_views(image, cases, size, interpolation):
    from bsim_fast.loaders.gpu_resident import crop_resize

    top, left, h, w, flip = (torch.tensor([[c[k] for c in cases]], dtype=torch.float64) for k in range(5))
    views = crop_resize(
        torch.from_numpy(image.copy())[None], top, left, h, w, flip.bool(), size, resize.filter_code(interpolation)
    )
    return list(views[0].numpy())


def dali_views(image, cases, size, interpolation):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    from bsim_fast.loaders.dali_loader import resize_window

    @pipeline_def(batch_size=len(cases), num_threads=1, device_id=None)
    def pipe():
        images = fn.external_source(source=lambda: [image] * len(cases), layout="HWC")
        anchor = fn.external_source(source=lambda: [np.array(c[:2], np.int32) for c in cases])
        shape = fn.external_source(source=lambda: [np.array(c[2:4], np.int32) for c in cases])
        flip = fn.external_source(source=lambda: [np.array(c[4], np.int32) for c in cases], dtype=types.INT32)
        return resize_window(images, anchor, shape, flip, interpolation, size)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.asarray(out.at(i)) for i in range(len(cases))]


BACK_ENDS = {"ffcv": ffcv_views, "torch": torch_views, "gpu_resident": gpu_resident_views, "dali": dali_views}
EXACT = {"ffcv", "gpu_resident"}  # the same sums as the reference, in float32


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("kind", sorted(BACK_ENDS))
def test_every_loader_resizes_like_the_reference(kind, interpolation, size):
    if kind == "ffcv":
        pytest.importorskip("ffcv")
    diffs = []
    for seed, image in enumerate(photographs(size)):
        cases = boxes(image, 12 if size == 32 else 4, seed)
        for box, view in zip(cases, BACK_ENDS[kind](image, cases, size, interpolation)):
            assert view.shape == (size, size, 3) and view.dtype == np.uint8
            diffs.append(np.abs(view.astype(np.int64) - reference(image, box, size, interpolation)).ravel())
    diffs = np.concatenate(diffs)
    if kind in EXACT:
        assert diffs.max() <= 1 and diffs.mean() < 0.01, (diffs.max(), diffs.mean())
    else:
        within = ((diffs <= 1).mean(), (diffs <= 2).mean())
        assert diffs.mean() < 0.3 and within[0] > 0.99 and within[1] > 0.998, (diffs.mean(), within)


def test_flip_and_box_are_not_tolerated_away():
    """The tolerance above is far tighter than a wrong box or a missing flip: both move views by tens."""
    image = photographs(32)[0]
    box = (3, 5, 20, 17, 1)
    right = reference(image, box, 32, "bicubic")
    unflipped = reference(image, box[:4] + (0,), 32, "bicubic")
    shifted = reference(image, (4, 5, 20, 17, 1), 32, "bicubic")
    assert np.abs(right - unflipped).mean() > 10 and np.abs(right - shifted).mean() > 2


def _identical_neighbours(view: np.ndarray) -> float:
    """The fraction of horizontally and vertically adjacent pixel pairs whose three channels are all equal."""
    across = (view[:, 1:] == view[:, :-1]).all(-1)
    down = (view[1:] == view[:-1]).all(-1)
    return float((across.sum() + down.sum()) / (across.size + down.size))


def test_small_crops_are_not_blocky():
    """A 9x9 crop enlarged to 32 px. Nearest-neighbour repeats each source pixel 32/9 times, so 1 - 9/32 of
    the pairs along a line are equal (0.72, by hand); OpenCV's INTER_AREA, ffcv's resize before this one,
    leaves about half equal. A cubic or linear filter gives every output pixel its own blend of source pixels,
    so on a noise image no pair is equal but by chance, except where the linear filter reads one pixel only:
    output centres within half a pixel of the crop's edge, (i + 0.5) * 9/32 <= 0.5 for i = 0, 1 at each end,
    one equal pair per end, 2 of the 31 pairs of a line. Every loader: bicubic under 2%, bilinear 2/31 + 2%."""
    from ffcv.libffcv import resize_crop

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    crop = image[4:13, 6:15]
    nearest = np.asarray(Image.fromarray(crop).resize((32, 32), Image.Resampling.NEAREST))
    assert _identical_neighbours(nearest) == pytest.approx(1 - 9 / 32, abs=0.03)
    area = np.empty((32, 32, 3), np.uint8)
    resize_crop(image, 4, 13, 6, 15, area)
    assert _identical_neighbours(area) > 0.4  # measured: 0.48
    for kind, views in BACK_ENDS.items():
        for interpolation in INTERPOLATIONS:
            (view,) = views(image, [(4, 6, 9, 9, 0)], 32, interpolation)
            edges = 2 / 31 if interpolation == "bilinear" else 0.0
            assert _identical_neighbours(view) < edges + 0.02, (kind, interpolation)


def _dense(first, count, weights, length: int) -> np.ndarray:
    out = np.zeros((len(first), length))
    for i in range(len(first)):
        out[i, first[i] : first[i] + count[i]] = weights[i, : count[i]]
    return out


def test_taps_are_pillows_coefficients_and_dense_taps_the_same():
    """resample_taps against numbers worked by hand, and dense_taps (gpu_resident's) against resample_taps
    for crops placed inside a longer axis."""
    taps = resize._make_taps(resize.filter_support, resize.filter_weight)
    # Enlarging 2 -> 4 with the triangle: output centres at 0.25, 0.75, 1.25, 1.75 input px, pixel centres at
    # 0.5 and 1.5; weights 1 - distance, renormalised over the crop's own pixels (at the edges: one pixel).
    assert _dense(*taps(2, 4, resize.BILINEAR), 2).tolist() == [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]
    # Shrinking 4 -> 2 with the triangle stretched 2x: centre 1.0, pixels at distances 0.5, 0.5, 1.5 (scaled
    # 0.25, 0.25, 0.75 -> weights 0.75, 0.75, 0.25 over pixels 0, 1, 2), renormalised by 1.75.
    assert np.allclose(_dense(*taps(4, 2, resize.BILINEAR), 4)[0], np.array([0.75, 0.75, 0.25, 0]) / 1.75)
    # Keys' cubic (a = -0.5) enlarging 4 -> 8, output 3 (centre 1.75): distances 1.25, 0.25, 0.75, 1.75 to
    # pixels 0..3, weights -0.0703125, 0.8671875, 0.2265625, -0.0234375 (sum 1)
    assert np.allclose(_dense(*taps(4, 8, resize.BICUBIC), 4)[3], [-0.0703125, 0.8671875, 0.2265625, -0.0234375])
    for code in (resize.BICUBIC, resize.BILINEAR):
        assert np.array_equal(_dense(*taps(7, 7, code), 7), np.eye(7))  # equal sizes: the identity
        for length, out in ((5, 32), (32, 32), (80, 32), (13, 7)):
            start, axis = 3, length + 9
            got = resize.dense_taps(
                torch.tensor([float(start)], dtype=torch.float64),
                torch.tensor([float(length)], dtype=torch.float64),
                out,
                axis,
                code,
            )[0].double()
            expected = np.zeros((out, axis))
            expected[:, start : start + length] = _dense(*taps(length, out, code), length)
            assert torch.allclose(got, torch.from_numpy(expected), atol=1e-7)
            assert np.allclose(expected.sum(1), 1.0)


# Each recipe's filter as its anchor resizes its crops (docs/RECIPES.md, "Resize").
ANCHOR_INTERPOLATION = {
    "byol": "bicubic",  # deepmind-research byol dataset.py: tf.image.resize(..., ResizeMethod.BICUBIC)
    "simclr": "bicubic",  # google-research/simclr data_util.crop_and_resize: tf.image.resize(..., BICUBIC)
    "moco": "bilinear",  # facebookresearch/moco main_moco.py: transforms.RandomResizedCrop(224, ...), default
    "simsiam": "bilinear",  # facebookresearch/simsiam main_simsiam.py: the same transform as MoCo v2
}  # solo-learn (every configs/small recipe): RandomResizedCrop(..., interpolation=InterpolationMode.BICUBIC)


@pytest.mark.parametrize("method", sorted(ANCHOR_INTERPOLATION))
def test_recipes_resize_as_their_anchors(method):
    from pathlib import Path

    from bsim_fast.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    for mode in ("", "_bsim", "_wbsim"):
        assert load_config(configs / f"{method}{mode}.yaml").aug.interpolation == ANCHOR_INTERPOLATION[method]
        assert load_config(configs / "small" / f"{method}{mode}.yaml").aug.interpolation == "bicubic"


def test_an_unknown_interpolation_is_one_line():
    from bsim_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, ["aug.interpolation=area"])
    assert (
        str(err.value)
        == "override 'aug.interpolation=area': aug.interpolation = 'area' is not one of bicubic, bilinear"
    )
