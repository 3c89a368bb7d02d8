import numpy as np
import pytest
import torch

from bsim_fast import mix

# ---------------------------------------------------------------- derangement


@pytest.mark.parametrize("n", [2, 3, 5, 64])
def test_derangement_is_a_single_cycle_without_fixed_points(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(50):
        p = mix.derangement(n, generator=g)
        assert p.dtype == torch.long and p.shape == (n,)
        assert sorted(p.tolist()) == list(range(n))
        assert not (p == torch.arange(n)).any()
        i, seen = 0, set()  # following partner links visits every index before returning
        while i not in seen:
            seen.add(i)
            i = int(p[i])
        assert len(seen) == n


def test_derangement_of_two_swaps():
    assert mix.derangement(2).tolist() == [1, 0]


@pytest.mark.parametrize("n", [0, 1])
def test_derangement_rejects_fewer_than_two(n):
    with pytest.raises(ValueError, match="n must be >= 2"):
        mix.derangement(n)


def test_derangement_reproducible_from_generator():
    a = mix.derangement(16, generator=torch.Generator().manual_seed(3))
    b = mix.derangement(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- sample_boxes


def test_boxes_are_clipped_half_open_and_lam_is_the_kept_fraction():
    h, w = 7, 11
    boxes, lam = mix.sample_boxes(500, h, w, 1.0, generator=torch.Generator().manual_seed(0))
    assert boxes.dtype == torch.int32 and boxes.shape == (500, 4)
    assert lam.dtype == torch.float32 and lam.shape == (500,)
    y0, y1, x0, x1 = boxes.long().unbind(1)
    assert ((0 <= y0) & (y0 <= y1) & (y1 <= h) & (0 <= x0) & (x0 <= x1) & (x1 <= w)).all()
    area = ((y1 - y0) * (x1 - x0)).numpy()
    assert torch.equal(lam, torch.from_numpy(1.0 - area / (h * w)).float())
    assert (lam < 1).any() and (lam > 0).any()


class ControlledDraws:
    """Stands in for numpy's generator inside `sample_boxes`: the Beta variates lam0 and the box centres are
    the test's own, one per image. Height and width differ, so a centre draw says by its range which it is."""

    def __init__(self, alpha, lam0, cy, cx, height, width):
        self.alpha, self.lam0, self.centre = alpha, lam0, {height: cy, width: cx}

    def beta(self, a, b, size):
        assert a == b == self.alpha and size == len(self.lam0)
        return np.array(self.lam0, dtype=np.float64)

    def integers(self, low, high, size):
        assert low == 0 and size == len(self.lam0)
        return np.array(self.centre[high], dtype=np.int64)


def test_boxes_and_lam_by_hand_for_fixed_draws(monkeypatch):
    """CutMix's box for fixed draws on an 8 x 10 image: sides floor(8 sqrt(1 - lam0)) and floor(10 sqrt(1 -
    lam0)), top-left corner at the centre minus half the side (rounded down), clipped to the image, half-open;
    lambda = 1 - clipped area / 80. Each row worked out by hand:
      lam0 0.5:   sqrt(0.5) = 0.707: sides 5 x 7; centre (4, 5): rows 4-2 = 2 .. 2+5 = 7, cols 5-3 = 2 .. 9;
                  area 35, lambda 1 - 35/80 = 0.5625
      lam0 0.1:   sqrt(0.9) = 0.949: sides 7 x 9; centre (1, 3): rows -2 .. 5 -> 0 .. 5, cols -1 .. 8 -> 0 .. 8
                  (clipped at the top and the left); area 5 * 8 = 40, lambda 0.5
      lam0 0.3:   sqrt(0.7) = 0.837: sides 6 x 8; centre (7, 9): rows 4 .. 10 -> 4 .. 8, cols 5 .. 13 -> 5 .. 10
                  (clipped at the bottom and the right); area 4 * 5 = 20, lambda 0.75
      lam0 0.995: sqrt(0.005) = 0.071: sides 0 x 0; centre (3, 6): the empty box (3, 3, 6, 6), lambda 1
      lam0 0:     sides 8 x 10; centre (4, 5): rows 0 .. 8, cols 0 .. 10, the whole image, lambda 0
      lam0 0.75:  sqrt(0.25) = 0.5: sides 4 x 5; centre (0, 0): rows -2 .. 2 -> 0 .. 2, cols -2 .. 3 -> 0 .. 3;
                  area 6, lambda 1 - 6/80 = 0.925
    """
    alpha = 0.7
    draws = ControlledDraws(
        alpha, lam0=[0.5, 0.1, 0.3, 0.995, 0.0, 0.75], cy=[4, 1, 7, 3, 4, 0], cx=[5, 3, 9, 6, 5, 0], height=8, width=10
    )
    monkeypatch.setattr(mix.np.random, "default_rng", lambda seed: draws)
    boxes, lam = mix.sample_boxes(6, 8, 10, alpha, generator=torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[2, 7, 2, 9], [0, 5, 0, 8], [4, 8, 5, 10], [3, 3, 6, 6], [0, 8, 0, 10], [0, 2, 0, 3]]
    assert torch.equal(lam, torch.tensor([0.5625, 0.5, 0.75, 1.0, 0.0, 0.925]))  # float32, as sample_boxes returns


def test_lam_is_the_share_of_each_mixed_view_that_shows_its_own_image():
    """Through `make_views`: image k is the flat colour 10 k + 5 in view a and 10 k + 7 in view b, so each pixel
    of a mixed view names its source. The share of m'_i showing image i is lam_a[i], the rest shows image
    partner[i] of the same view set; the same for m'' with lam_b, and one partner for both view sets."""
    from bsim_fast.config import Config

    n, side = 6, 12
    colour = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1) * 10
    a_u8 = (colour + 5).expand(n, side, side, 3).contiguous()
    b_u8 = (colour + 7).expand(n, side, side, 3).contiguous()
    cfg = Config()
    cfg.method.mode = "bsim"
    cfg.data.mean, cfg.data.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    views = mix.make_views(a_u8, b_u8, cfg, torch.Generator().manual_seed(5), torch.float32)
    partner = views["partner"]
    for mixed, base, lam in (("mixed_a", 5, views["lam_a"]), ("mixed_b", 7, views["lam_b"])):
        source = (views[mixed][:, 0] - base) / 10  # [n, side, side]: the image each pixel comes from
        own = source == torch.arange(n).view(n, 1, 1)
        assert torch.equal(own.float().mean((1, 2)), lam)
        assert torch.equal(
            torch.where(own, partner.view(n, 1, 1).float(), source), partner.view(n, 1, 1).expand_as(source).float()
        )
    assert not torch.equal(views["lam_a"], views["lam_b"])  # boxes are drawn per view set


def _numpy_cutmix_lam(n, h, w, alpha, seed):
    """The standard CutMix draw, written independently, for distribution comparisons."""
    rng = np.random.default_rng(seed)
    cut = np.sqrt(1 - rng.beta(alpha, alpha, n))
    bh, bw = np.floor(h * cut).astype(int), np.floor(w * cut).astype(int)
    cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
    ya, yb = np.clip(cy - bh // 2, 0, h), np.clip(cy - bh // 2 + bh, 0, h)
    xa, xb = np.clip(cx - bw // 2, 0, w), np.clip(cx - bw // 2 + bw, 0, w)
    return 1 - (yb - ya) * (xb - xa) / (h * w)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_lam_distribution_matches_a_numpy_cutmix(alpha):
    n, h, w = 20000, 32, 32
    _, lam = mix.sample_boxes(n, h, w, alpha, generator=torch.Generator().manual_seed(1))
    ref = _numpy_cutmix_lam(n, h, w, alpha, seed=12345)
    lam = lam.double().numpy()
    assert abs(lam.mean() - ref.mean()) < 0.01
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(lam, q) - np.quantile(ref, q)) < 0.025
    # clipping only shrinks boxes, so E[lam] sits above E[lam0] = 0.5
    assert 0.5 < lam.mean() < 0.8


def test_boxes_reproducible_and_generator_advances():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    b1, l1 = mix.sample_boxes(8, 16, 16, 1.0, generator=g1)
    b2, l2 = mix.sample_boxes(8, 16, 16, 1.0, generator=g2)
    assert torch.equal(b1, b2) and torch.equal(l1, l2)
    b3, _ = mix.sample_boxes(8, 16, 16, 1.0, generator=g1)
    assert not torch.equal(b1, b3)


def test_sample_boxes_rejects_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        mix.sample_boxes(4, 8, 8, 0.0)


# ---------------------------------------------------------------- cutmix_normalize


def _tiny_views():
    # views[i, y, x, c] = 100 i + 10 y + x + c, so (v - mean) / std with mean = (0, 1, 2) is
    # (100 i + 10 y + x) / std[c]: every output pixel names where it came from.
    i, y, x, c = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(5), torch.arange(3), indexing="ij")
    return (100 * i + 10 * y + x + c).to(torch.uint8).contiguous()


MEAN, STD = (0.0, 1.0, 2.0), (1.0, 2.0, 4.0)


def test_reference_exact_values_on_a_2x4x5_example():
    views = _tiny_views()
    partner = torch.tensor([1, 0])
    boxes = torch.tensor([[1, 3, 2, 5], [3, 4, 0, 1]], dtype=torch.int32)
    plain, mixed = mix.cutmix_normalize_reference(views, partner, boxes, MEAN, STD, torch.float32)
    expected_mixed_0 = torch.tensor(
        [[0, 1, 2, 3, 4], [10, 11, 112, 113, 114], [20, 21, 122, 123, 124], [30, 31, 32, 33, 34]], dtype=torch.float32
    )
    expected_mixed_1 = torch.tensor(
        [[100, 101, 102, 103, 104], [110, 111, 112, 113, 114], [120, 121, 122, 123, 124], [30, 131, 132, 133, 134]],
        dtype=torch.float32,
    )
    expected_plain_0 = torch.tensor(
        [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]], dtype=torch.float32
    )
    for c, s in enumerate(STD):
        assert torch.equal(mixed[0, c], expected_mixed_0 / s)
        assert torch.equal(mixed[1, c], expected_mixed_1 / s)
        assert torch.equal(plain[0, c], expected_plain_0 / s)
        assert torch.equal(plain[1, c], (expected_plain_0 + 100) / s)


def test_output_layout_dtype_and_single_cast():
    views = _tiny_views()
    partner, boxes = torch.tensor([1, 0]), torch.tensor([[0, 2, 0, 2], [1, 4, 1, 3]], dtype=torch.int32)
    ref32 = mix.cutmix_normalize(views, partner, boxes, MEAN, STD, torch.float32)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        plain, mixed = mix.cutmix_normalize(views, partner, boxes, MEAN, STD, dtype)
        for out, out32 in zip((plain, mixed), ref32):
            assert out.shape == (2, 3, 4, 5) and out.dtype == dtype
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(out, out32.to(dtype))


def test_empty_and_full_boxes():
    views = _tiny_views()
    partner = torch.tensor([1, 0])
    boxes = torch.tensor([[2, 2, 0, 5], [0, 4, 0, 5]], dtype=torch.int32)
    plain, mixed = mix.cutmix_normalize(views, partner, boxes, MEAN, STD, torch.float32)
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[1], plain[0])


def test_no_boxes_means_sim():
    views = _tiny_views()
    plain, mixed = mix.cutmix_normalize(views, None, None, MEAN, STD, torch.float32)
    assert mixed is None
    assert plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(
        plain,
        mix.cutmix_normalize(
            views, torch.tensor([1, 0]), torch.zeros(2, 4, dtype=torch.int32), MEAN, STD, torch.float32
        )[0],
    )


def _call(**over):
    args = dict(
        views_u8=_tiny_views(),
        partner=torch.tensor([1, 0]),
        boxes=torch.tensor([[0, 2, 0, 2], [1, 4, 1, 3]], dtype=torch.int32),
        mean=MEAN,
        std=STD,
        dtype=torch.float32,
    )
    args.update(over)
    return mix.cutmix_normalize(**args)


@pytest.mark.parametrize(
    "over, error, words",
    [
        (dict(views_u8=_tiny_views().float()), TypeError, "views_u8 must be uint8"),
        (dict(views_u8=torch.zeros(2, 4, 5, 4, dtype=torch.uint8)), ValueError, r"views_u8 must be \[N, H, W, 3\]"),
        (dict(views_u8=torch.zeros(2, 3, 4, 5, dtype=torch.uint8).permute(0, 2, 3, 1)), ValueError, "contiguous"),
        (dict(partner=torch.tensor([1, 0, 0])), ValueError, r"partner must have shape \[2\]"),
        (dict(partner=torch.tensor([1.0, 0.0])), TypeError, "partner must be int32 or int64"),
        (dict(partner=torch.tensor([2, 0])), ValueError, r"partner values must be in \[0, 2\)"),
        (dict(boxes=torch.tensor([[0, 2, 0, 2]], dtype=torch.int32)), ValueError, r"boxes must have shape \[2, 4\]"),
        (dict(boxes=torch.tensor([[0, 5, 0, 2], [0, 1, 0, 1]], dtype=torch.int32)), ValueError, r"boxes\[0\]"),
        (dict(boxes=torch.tensor([[0, 1, 0, 1], [0, 1, 3, 2]], dtype=torch.int32)), ValueError, r"boxes\[1\]"),
        (dict(mean=(1.0, 2.0)), ValueError, "mean must have 3 values"),
        (dict(std=(1.0, 0.0, 1.0)), ValueError, "std must be > 0"),
        (dict(dtype=torch.int8), TypeError, "dtype must be one of"),
        (dict(partner=torch.tensor([1, 0], device="meta")), ValueError, "partner is on meta"),
        (dict(mean=torch.zeros(3, device="meta")), ValueError, "mean is on meta"),
    ],
)
def test_bad_inputs_raise_one_line_errors(over, error, words):
    with pytest.raises(error, match=words) as info:
        _call(**over)
    assert "\n" not in str(info.value)
