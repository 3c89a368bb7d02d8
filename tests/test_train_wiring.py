"""How the trainer wires a step (docs/DESIGN.md, `bsim_fast/train.py`): gradient accumulation equals one larger
batch, the per-step draws (partner, boxes, lambda) change from step to step and come back from (seed, step,
rank), and a short run on a tiny fixed set lowers the loss."""

import csv

import pytest
import torch
from helpers import TINY, tiny_folder

from bsim_fast import step as step_module
from bsim_fast import train as tr
from bsim_fast.config import load_config
from bsim_fast.run import build, start
from bsim_fast.step import make_views as real_make_views


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("data") / "train", "train", per_class=8)  # 32 images, 4 classes


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def started_run(recipe, data, out, *extra):
    """A run set up as `train` does (build, then start from step 0); its `train_step` is what the loop calls."""
    cfg = load_config(
        f"configs/small/{recipe}.yaml", TINY + [f"data.train={data}", "data.val=", f"train.out_dir={out}", *extra]
    )
    run = build(cfg)
    start(run)
    return run


def uint8_views(n, seed, device):
    """Two views of n images as a loader hands them over: uint8 NHWC on the training device."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g).to(device) for _ in range(2)]


# ---------------------------------------------------------------- gradient accumulation


@pytest.fixture
def full_fp32():
    """On a GPU, fp32 convolutions and matmuls in full precision rather than TF32 (10-bit mantissa)."""
    if not torch.cuda.is_available():
        yield
        return
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = conv
    torch.set_float32_matmul_precision(matmul)


def test_accumulated_micro_batches_equal_one_larger_batch(data, tmp_path, full_fp32):
    """k = 2 micro-batches of 4 and one batch of 8 make the same optimiser step. What makes them equal: SimSiam
    in SIM mode (no partners drawn within a micro-batch), BatchNorm in eval mode (no batch statistics: every
    sample's loss is its own), fp32 on the CPU, and plain SGD (LARS's trust ratio would hide a wrongly scaled
    gradient). The loss is a mean over the batch, so the micro-batches' losses must be divided by k."""
    common = ("method.mode=sim", "optim.warmup_epochs=0", "train.precision=fp32", "data.batch_size=8")
    run_one = started_run("simsiam", data, tmp_path / "one", *common, "train.accum_steps=1")
    run_two = started_run("simsiam", data, tmp_path / "two", *common, "train.accum_steps=2")
    one, two = run_one.train_step, run_two.train_step
    assert one.cfg.optim.name == "sgd" and one.base_lr == two.base_lr
    two.method.load_state_dict(one.method.state_dict())
    one.method.eval()
    two.method.eval()
    before = {k: v.clone() for k, v in one.method.state_dict().items()}
    a, b = uint8_views(8, seed=0, device=one.device)
    assert one(a, b) is True
    assert two(a[:4], b[:4]) is False  # the first micro-batch: no optimiser step yet
    assert two(a[4:], b[4:]) is True
    assert one.state.step == two.state.step == 1 and two.state.micro == 0
    after_one, after_two = one.method.state_dict(), two.method.state_dict()
    assert after_one.keys() == after_two.keys() == before.keys()
    moved = {k: after_one[k] - before[k] for k in before if after_one[k].is_floating_point()}
    largest = max(float(d.abs().max()) for d in moved.values())
    assert largest > 1e-4  # a real step was taken, so equal steps are not two zeros
    for k, delta in moved.items():
        diff = float((after_two[k] - before[k] - delta).abs().max())
        assert diff <= 1e-4 * largest, (k, diff, largest)
    for run in (run_one, run_two):
        run.logger.close()


# ---------------------------------------------------------------- per-step draws


def record_draws(monkeypatch):
    """The trainer's own draws: partner, lambdas and the mixed views of every micro-batch, as it made them."""
    seen = []

    def recording(a_u8, b_u8, cfg, gen, dtype, **layout):
        views = real_make_views(a_u8, b_u8, cfg, gen, dtype, **layout)
        seen.append({k: views[k].clone() for k in ("partner", "lam_a", "lam_b", "mixed_a", "mixed_b")})
        return views

    monkeypatch.setattr(step_module, "make_views", recording)
    return seen


def draws_of(data, out, monkeypatch, *extra, rank=0, micro_batches=4):
    seen = record_draws(monkeypatch)
    run = started_run("byol_bsim", data, out, "data.batch_size=16", "train.accum_steps=2", *extra)
    run.train_step.rank = rank  # what the trainer draws from; this process stays the only one
    a, b = uint8_views(8, seed=1, device=run.device)  # the same images every time: only the draws can differ
    for _ in range(micro_batches):
        run.train_step(a, b)
    run.logger.close()
    assert run.state.step == micro_batches // 2 and len(seen) == micro_batches
    return seen


def same_draw(x, y):
    return all(torch.equal(x[k], y[k]) for k in x)


def test_per_step_draws_differ_between_steps_and_come_back_from_seed_step_and_rank(data, tmp_path, monkeypatch):
    first = draws_of(data, tmp_path / "a", monkeypatch)
    # 2 optimiser steps x 2 micro-batches: four different draws (partner, both view sets' boxes and lambdas)
    for i in range(len(first)):
        for j in range(i):
            x, y = first[i], first[j]
            assert not torch.equal(x["lam_a"], y["lam_a"]) and not torch.equal(x["lam_b"], y["lam_b"]), (i, j)
            assert not torch.equal(x["mixed_a"], y["mixed_a"]) and not torch.equal(x["mixed_b"], y["mixed_b"])
    assert len({tuple(d["partner"].tolist()) for d in first}) > 1
    for d in first:  # boxes are drawn per view set
        assert not torch.equal(d["lam_a"], d["lam_b"])
    # a fresh run of the same config (another process, a resumed run) draws the same
    again = draws_of(data, tmp_path / "b", monkeypatch)
    assert all(same_draw(x, y) for x, y in zip(first, again, strict=True))
    # another rank or another seed draws differently at every step
    for other in (
        draws_of(data, tmp_path / "c", monkeypatch, rank=1),
        draws_of(data, tmp_path / "d", monkeypatch, "train.seed=1"),
    ):
        assert not any(same_draw(x, y) for x, y in zip(first, other, strict=True))


# ---------------------------------------------------------------- a short run learns


def test_a_short_run_lowers_the_loss(data, tmp_path):
    """40 steps of BYOL-BSIM (ResNet-18, 16 px, batch 8) on 32 built-in images: the mean loss of the last 10
    steps is at least 0.6 below that of the first 5. Why 0.6 cannot come from noise: the same run with
    optim.lr=0 (views and boxes drawn as usual, nothing learnt) measured a per-step standard deviation of 0.13
    around 3.13, so the difference of the two window means has a standard deviation of about 0.07 (0.6 is over
    8 of them; that run's own difference was 0.004). Runs that learn (seeds 0 and 3) measured drops of 1.35
    and 2.19. Each step's loss is read from metrics.csv (`log_every=1`)."""
    cfg = load_config(
        "configs/small/byol_bsim.yaml",
        TINY
        + [f"data.train={data}", "data.val=", "train.epochs=20", "train.max_steps=40", f"train.out_dir={tmp_path}"],
    )
    result = tr.train(cfg, resume="none")
    with open(tmp_path / "metrics.csv") as f:
        losses = [float(r["value"]) for r in csv.DictReader(f) if r["kind"] == "train" and r["name"] == "loss"]
    assert result["step"] == 40 and len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < first - 0.6, (first, last, losses)
