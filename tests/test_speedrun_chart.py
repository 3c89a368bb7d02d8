"""The speedrun chart's y-axis fits the data and each curve's last value is printed at its end; the expected
limits and label heights are worked by hand from the rule in `chart_layout`'s docstring (range widened by 12%
of it each side, at least half a point, clipped to 0..100; labels at least 5% of the axis apart)."""

import pytest

from bsim_fast.tools.speedrun_chart import chart, chart_layout
from bsim_fast.tools.speedrun_report import TARGETS


def result(recipe, values, mode="bsim"):
    curve = [dict(minutes=float(i + 1), knn_top1=v) for i, v in enumerate(values)]
    return dict(recipe=recipe, mode=mode, curve=curve, budget_min=30, steady_images_s=None)


def test_limits_and_labels_by_hand():
    (lo, hi), labels = chart_layout([result("sim", [50.0, 80.0, 90.0]), result("bsim", [52.0, 81.0, 90.4])])
    # range 50..90.4 = 40.4, margin 0.12 * 40.4 = 4.848 -> 45.152 .. 95.248; label gap 0.05 * 50.096 = 2.5048
    assert (lo, hi) == (pytest.approx(45.152), pytest.approx(95.248))
    assert [(r, m, t) for r, m, _, t in labels] == [("sim", 3.0, "90.00"), ("bsim", 3.0, "90.40")]
    assert [y for _, _, y, _ in labels] == [pytest.approx(90.0), pytest.approx(92.5048)]  # pushed up, apart
    # one value: the minimum margin of half a point each side
    assert chart_layout([result("a", [90.0])])[0] == (pytest.approx(89.5), pytest.approx(90.5))
    # clipped at 0 and 100
    assert chart_layout([result("a", [0.2, 1.0])])[0] == (0.0, pytest.approx(1.5))
    assert chart_layout([result("a", [99.0, 99.6])])[0] == (pytest.approx(98.5), 100.0)
    # three ends crowded at the top: 99.4..100 (clipped), gap 0.03; labels 99.9, 99.95, 100.0; the top label
    # needs 100.0 + 0.015 of axis
    (lo, hi), labels = chart_layout([result(r, [v]) for r, v in (("a", 99.9), ("b", 99.95), ("c", 100.0))])
    assert (lo, hi) == (pytest.approx(99.4), pytest.approx(100.015))
    assert [y for _, _, y, _ in labels] == [pytest.approx(99.9), pytest.approx(99.95), pytest.approx(100.0)]
    assert chart_layout([result("a", [])]) == ((0.0, 100.0), [])


def test_the_drawn_chart_uses_them_and_a_point_is_visible():
    results = [result("small/byol", [50.0, 80.0, 90.0], "sim"), result("small/byol_bsim", [52.0, 81.0, 90.4])]
    fig = chart(results, {"device": "cpu"}, TARGETS)
    ax = fig.axes[0]
    (lo, hi), _ = chart_layout(results)
    assert ax.get_ylim() == (pytest.approx(lo), pytest.approx(hi))
    texts = [t.get_text() for t in ax.texts]
    assert "90.00" in texts and "90.40" in texts
    fig.canvas.draw()
    height = ax.get_window_extent().height  # pixels; ~407 at the figure's 100 dpi
    assert height / (hi - lo) > 1.9 * height / 100  # a point is ~8 px tall here, ~4 px on the old 0..100 axis
    levels = sorted(line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--")
    assert levels == [85.0, 90.0]  # the targets' levels inside the axis are drawn
