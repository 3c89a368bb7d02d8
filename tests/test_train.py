"""The trainer: every recipe in 2 gloo processes, exact resume, export, logging."""

import csv
import json
import math
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from helpers import TINY, tiny_folder

from bsim_fast import step as st
from bsim_fast.checkpoint import CheckpointError, latest_valid
from bsim_fast.config import load_config
from bsim_fast.eval import knn_monitor
from bsim_fast.loaders import build_eval_loader
from bsim_fast.step import make_views as real_make_views
from bsim_fast.train import train

RECIPES = [
    f"{m}{'' if mode == 'sim' else '_' + mode}"
    for m in ("byol", "simclr", "moco", "simsiam")
    for mode in ("sim", "bsim", "wbsim")
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return tiny_folder(root / "train", "train", per_class=6), tiny_folder(root / "val", "test", per_class=3)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all_recipes(rank, world, port, train_dir, out_root, results):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    for recipe in RECIPES:
        cfg = load_config(
            f"configs/small/{recipe}.yaml",
            TINY + [f"data.train={train_dir}", "data.val=", "train.max_steps=2", f"train.out_dir={out_root}/{recipe}"],
        )
        out = train(cfg, resume="none")
        if rank == 0:
            results[recipe] = out["loss"]


def test_every_recipe_runs_in_two_gloo_processes(data, tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_run_all_recipes, args=(2, free_port(), str(data[0]), str(tmp_path), results), nprocs=2)
    assert sorted(results) == sorted(RECIPES)
    for recipe, loss in results.items():
        assert math.isfinite(loss), recipe
        assert (tmp_path / recipe / "backbone.pt").is_file()
        assert latest_valid(tmp_path / recipe)[1]["step"] == 2


def assert_same_optimizer_state(a, b):
    """Equal optimiser states: the same parameters with state, the same entries, equal tensors (a `zip` over the
    two would stop silently at the shorter side)."""
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) > 0
    for index, x in a["state"].items():
        y = b["state"][index]
        assert x.keys() == y.keys(), index
        assert all(torch.equal(x[k], y[k]) for k in x), index
    assert a["param_groups"] == b["param_groups"]


def run(data, out, *extra, resume="auto", callback=None):
    cfg = load_config(
        "configs/small/byol_bsim.yaml",
        TINY
        + [
            f"data.train={data[0]}",
            "data.val=",
            "train.epochs=2",
            "train.ckpt_every_steps=2",
            f"train.out_dir={out}",
            *extra,
        ],
    )
    return train(cfg, resume=resume, callback=callback)


@pytest.mark.parametrize("recipe_extra", [[], ["method.name=moco", "method.mode=wbsim"]])
def test_resumed_run_ends_bitwise_equal(data, tmp_path, recipe_extra):
    # 24 images / batch 8 = 3 steps an epoch, 6 in all; stop at 4 (mid-epoch 2), resume to the end
    run(data, tmp_path / "full", *recipe_extra, resume="none")
    run(data, tmp_path / "cut", *recipe_extra, "train.max_steps=4", resume="none")
    assert latest_valid(tmp_path / "cut")[1]["step"] == 4
    run(data, tmp_path / "cut", *recipe_extra, resume="auto")
    full, cut = latest_valid(tmp_path / "full")[1], latest_valid(tmp_path / "cut")[1]
    assert full["step"] == cut["step"] == 6
    assert full["model"].keys() == cut["model"].keys()
    for k in full["model"]:
        assert torch.equal(full["model"][k], cut["model"][k]), k
    assert_same_optimizer_state(full["optimizer"], cut["optimizer"])


def test_export_loads_into_torchvision_and_knn_is_logged(data, tmp_path, monkeypatch):
    drawn = []  # the mean lambda of each step's mixed views a, as the trainer drew them

    def recording(a_u8, b_u8, cfg, gen, dtype, **layout):
        views = real_make_views(a_u8, b_u8, cfg, gen, dtype, **layout)
        drawn.append(views["lam_a"].mean().item())
        return views

    monkeypatch.setattr(st, "make_views", recording)
    out = run(data, tmp_path, f"data.val={data[1]}", "train.max_steps=3", resume="none")
    sd = torch.load(tmp_path / "backbone.pt", weights_only=True)
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem the recipe asks for
    net.maxpool, net.fc = torch.nn.Identity(), torch.nn.Identity()
    net.load_state_dict(sd)  # strict: every key matches torchvision's names
    # the run's k-NN is that of the exported (final) backbone, loaded back here as torchvision's own network
    cfg = load_config("configs/small/byol_bsim.yaml", TINY + [f"data.train={data[0]}", f"data.val={data[1]}"])
    # on the trainer's device, in its precision (knn_monitor follows train.precision) and memory format
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device, memory_format=torch.channels_last)
    again = knn_monitor(net, cfg, build_eval_loader, 0, 1, device)
    assert (out["knn_top1"], out["knn_top5"]) == (again["knn_top1"], again["knn_top5"])
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["arch"] == "resnet18" and meta["cifar_stem"] is True
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    names = {r["name"] for r in rows if r["kind"] == "train"}
    assert {"loss", "lr", "lam", "img_s"} <= names
    logged = [float(r["value"]) for r in rows if r["kind"] == "knn" and r["name"] == "knn_top1"]
    assert logged == [pytest.approx(out["knn_top1"], abs=1e-4)]  # metrics.csv keeps 4 decimals
    lam = [float(r["value"]) for r in rows if r["name"] == "lam"]
    assert lam == [pytest.approx(v, abs=1e-4) for v in drawn] and len(lam) == 3  # a line per step (log_every 1)


def test_sim_mode_logs_lambda_one(data, tmp_path):
    run(data, tmp_path, "method.mode=sim", "train.max_steps=1", resume="none")
    lam = [float(r["value"]) for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r["name"] == "lam"]
    assert lam == [1.0]


@pytest.fixture(scope="module")
def converted(data, tmp_path_factory):
    """The tiny train folder through both converters (folder → .beton and → DALI shards)."""
    from data_prep import write_dali, write_ffcv

    out = tmp_path_factory.mktemp("converted")
    assert write_ffcv.main(["--source", str(data[0]), "--output", str(out / "t.beton"), "--workers", "1"]) == 0
    assert write_dali.main(["--source", str(data[0]), "--output", str(out / "shards"), "--workers", "1"]) == 0
    return {"ffcv": out / "t.beton", "dali": out / "shards", "torch": data[0]}


@pytest.mark.parametrize(
    "loader,extra",
    [("ffcv", []), ("dali", []), ("ffcv", ["data.gpu_resident=true"]), ("torch", ["train.accum_steps=2"])],
)
def test_training_runs_through_every_loader(converted, tmp_path, loader, extra):
    cfg = load_config(
        "configs/small/byol_bsim.yaml",
        TINY
        + [
            f"data.loader={loader}",
            f"data.train={converted[loader]}",
            "data.val=",
            "train.max_steps=2",
            f"train.out_dir={tmp_path}",
            *extra,
        ],
    )
    out = train(cfg, resume="none")
    assert out["step"] == 2 and math.isfinite(out["loss"])
    assert latest_valid(tmp_path)[1]["step"] == 2


# ---- TrainState: exact resume with skipped steps; the callback --------------------------------------------
def poison(monkeypatch, step, accum=1, seed=0):
    """NaN views for the first batch of optimiser step `step` (rank 0), once: the next batch is fine."""
    target = st.step_generator(seed, step * accum, 0).initial_seed()
    hit = []

    def poisoned(a_u8, b_u8, cfg, gen, dtype, **layout):
        views = real_make_views(a_u8, b_u8, cfg, gen, dtype, **layout)
        if gen.initial_seed() == target and not hit:
            hit.append(step)
            views["plain_a"].fill_(float("nan"))  # a slice of views["views"], the batch the method reads
        return views

    monkeypatch.setattr(st, "make_views", poisoned)
    return hit


@pytest.mark.parametrize("stop_by,accum", [("max_steps", 1), ("callback", 2)])
def test_nan_skipped_step_then_stop_and_resume_ends_bitwise_equal(data, tmp_path, monkeypatch, capsys, stop_by, accum):
    # 24 images / batch 4 = 6 batches an epoch. NaN in step 2's first batch: skipped, so the epoch's batches
    # run one ahead of the steps; the stopped run's checkpoint must say where the loader was, not the step.
    extra = [
        "data.batch_size=4" if accum == 1 else "data.batch_size=8",
        f"train.accum_steps={accum}",
        "train.nan_policy=skip",
        "train.ckpt_every_steps=100",
    ]
    stop_at = 4 if accum == 1 else 2
    hit = poison(monkeypatch, 2 if accum == 1 else 1, accum)
    full = run(data, tmp_path / "full", *extra, resume="none")
    assert hit and "step skipped" in capsys.readouterr().out

    hit = poison(monkeypatch, 2 if accum == 1 else 1, accum)
    seen = []

    def stop_here(state, method):
        seen.append((state.step, state.micro))
        return "enough for now" if state.step == stop_at else None

    if stop_by == "callback":
        cut = run(data, tmp_path / "cut", *extra, resume="none", callback=stop_here)
        assert cut["stopped"] == "enough for now" and seen == [(s, 0) for s in range(1, stop_at + 1)]
        assert not (tmp_path / "cut" / "final.json").exists()
    else:
        cut = run(data, tmp_path / "cut", *extra, f"train.max_steps={stop_at}", resume="none")
    assert hit
    stopped = latest_valid(tmp_path / "cut")[1]
    assert (stopped["step"], stopped["batches_read"], stopped["micro"]) == (stop_at, stop_at * accum + 1, 0)
    cut = run(data, tmp_path / "cut", *extra, resume="auto")
    assert (cut["step"], cut["epoch"]) == (full["step"], full["epoch"])
    a, b = latest_valid(tmp_path / "full")[1], latest_valid(tmp_path / "cut")[1]
    assert [a[k] for k in ("step", "epoch", "batches_read")] == [b[k] for k in ("step", "epoch", "batches_read")]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert_same_optimizer_state(a["optimizer"], b["optimizer"])


def test_metrics_and_tensorboard_cut_back_to_the_resumed_step(data, tmp_path):
    # a kill after step 3 was logged but before its checkpoint: the resumed run logs step 3 again
    run(data, tmp_path, "train.max_steps=3", "train.tensorboard=true", resume="none")
    (tmp_path / "ckpt_00000003.pt").unlink()
    (tmp_path / "ckpt_00000003.pt.sha256").unlink()
    run(data, tmp_path, "train.max_steps=4", "train.tensorboard=true", resume="auto")
    rows = [(r["step"], r["kind"], r["name"]) for r in csv.DictReader(open(tmp_path / "metrics.csv"))]
    assert len(rows) == len(set(rows)) and {s for s, _, _ in rows} == {"1", "2", "3", "4"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload().Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4]


def test_progress_line_counts_to_max_steps_and_a_callback_can_run_knn(data, tmp_path, capsys):
    seen = {}

    def knn_at_step_1(state, method):  # what a time-to-accuracy runner does at its wall-clock marks
        if state.step == 1:
            seen.update(knn_monitor(method.backbone, cfg, build_eval_loader, 0, 1, torch.device("cpu")))
            seen["training"] = method.backbone.training

    cfg = load_config("configs/small/byol_bsim.yaml", TINY + [f"data.train={data[0]}", f"data.val={data[1]}"])
    result = run(data, tmp_path, "train.max_steps=2", resume="none", callback=knn_at_step_1)
    assert "step 2/2 " in capsys.readouterr().out  # not 2/6 (the epochs' total)
    assert result["step"] == 2 and seen["training"] is True
    # 12 queries (3 per class): each is right or wrong, so top-1 is a whole number of twelfths, at most top-5's
    assert seen["knn_top1"] <= seen["knn_top5"]
    assert all(abs(seen[k] * 12 / 100 - round(seen[k] * 12 / 100)) < 1e-9 for k in ("knn_top1", "knn_top5"))


# ---- resuming into an out_dir: same config only, explicit overrides ----------------------------------------
@pytest.fixture(scope="module")
def one_step_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_step")
    run(data, out, "train.max_steps=1", resume="none")
    return out


def copy_run(src, dest):
    shutil.copytree(src, dest)
    return dest


@pytest.mark.parametrize(
    "extra,named",
    [
        (["data.batch_size=4"], "data.batch_size 8 -> 4"),
        (["method.name=moco"], "method.name 'byol' -> 'moco'"),
        (["optim.lr=0.5", "train.epochs=3"], "train.epochs 2 -> 3"),
    ],
)
def test_resume_with_a_different_config_is_refused_naming_the_keys(data, one_step_run, tmp_path, extra, named):
    out = copy_run(one_step_run, tmp_path / "run")
    with pytest.raises(CheckpointError) as e:
        run(data, out, *extra, resume="auto")
    msg = str(e.value)
    assert "\n" not in msg and named in msg and "--resume force" in msg
    assert json.loads((out / "config.json").read_text())["data"]["batch_size"] == 8  # nothing rewritten


def test_resume_allows_bookkeeping_changes_and_force(data, one_step_run, tmp_path, capsys):
    out = copy_run(one_step_run, tmp_path / "run")
    result = run(
        data,
        out,
        "train.max_steps=2",
        "train.log_every=2",
        "train.keep_checkpoints=3",
        "train.nan_policy=skip",
        resume="auto",
    )
    assert result["step"] == 2
    out = copy_run(one_step_run, tmp_path / "forced")
    result = run(data, out, "train.max_steps=2", "optim.lr=0.1", resume="force")
    assert result["step"] == 2 and "--resume force: continuing" in capsys.readouterr().out
    out = copy_run(one_step_run, tmp_path / "other_model")
    with pytest.raises(CheckpointError, match="do not fit this model"):  # one line, not torch's key dump
        run(data, out, "model.proj_dim=8", "train.max_steps=2", resume="force")


def test_resume_none_moves_the_earlier_run_aside(data, one_step_run, tmp_path, capsys):
    out = copy_run(one_step_run, tmp_path / "run")
    before = sorted(p.name for p in out.iterdir())
    run(data, out, "train.max_steps=1", resume="none")
    assert "moved to" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "previous_1").iterdir()) == before
    assert latest_valid(out)[1]["step"] == 1 and (out / "metrics.csv").is_file()


def test_knn_monitor_skips_unlabeled_data_in_one_line(data, tmp_path):
    class Unlabeled:  # what the loaders expose for a set converted without labels
        labeled = False

        def __iter__(self):
            raise AssertionError("features must not be extracted")

    cfg = load_config("configs/small/byol_bsim.yaml", TINY + [f"data.train={data[0]}", f"data.val={data[1]}"])
    lines = []
    result = knn_monitor(torch.nn.Identity(), cfg, lambda *a: Unlabeled(), 0, 1, torch.device("cpu"), log=lines.append)
    assert result is None and len(lines) == 1 and "unlabeled" in lines[0] and "data.train" in lines[0]
