"""The trainer: every recipe in 2 gloo processes, exact resume, export, logging."""
import csv
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torchvision

from bsim_fast.config import load_config
from bsim_fast.checkpoint import latest_valid
from bsim_fast.train import train
from helpers import TINY, tiny_folder

RECIPES = [f"{m}{'' if mode == 'sim' else '_' + mode}" for m in ("byol", "simclr", "moco", "simsiam")
           for mode in ("sim", "bsim", "wbsim")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return tiny_folder(root / "train", "train", per_class=6), tiny_folder(root / "val", "test", per_class=3)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all_recipes(rank, world, port, train_dir, out_root, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for recipe in RECIPES:
        cfg = load_config(f"configs/small/{recipe}.yaml",
                          TINY + [f"data.train={train_dir}", "data.val=", "train.max_steps=2",
                                  f"train.out_dir={out_root}/{recipe}"])
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


def run(data, out, *extra, resume="auto"):
    cfg = load_config("configs/small/byol_bsim.yaml",
                      TINY + [f"data.train={data[0]}", "data.val=", "train.epochs=2", "train.ckpt_every_steps=2",
                              f"train.out_dir={out}", *extra])
    return train(cfg, resume=resume)


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
    for a, b in zip(full["optimizer"]["state"].values(), cut["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_loads_into_torchvision_and_knn_is_logged(data, tmp_path):
    out = run(data, tmp_path, f"data.val={data[1]}", "train.max_steps=3", resume="none")
    assert 0 <= out["knn_top1"] <= 100
    sd = torch.load(tmp_path / "backbone.pt", weights_only=True)
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)     # the CIFAR stem the recipe asks for
    net.maxpool, net.fc = torch.nn.Identity(), torch.nn.Identity()
    net.load_state_dict(sd)   # strict: every key matches torchvision's names
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["arch"] == "resnet18" and meta["cifar_stem"] is True
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    names = {r["name"] for r in rows if r["kind"] == "train"}
    assert {"loss", "lr", "lam", "img_s"} <= names
    assert [r for r in rows if r["kind"] == "knn" and r["name"] == "knn_top1"]
    lam = [float(r["value"]) for r in rows if r["name"] == "lam"]
    assert all(0 < v < 1 for v in lam)   # BSIM: a mean of actual kept fractions


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


@pytest.mark.parametrize("loader,extra", [("ffcv", []), ("dali", []), ("ffcv", ["data.gpu_resident=true"]),
                                          ("torch", ["train.accum_steps=2"])])
def test_training_runs_through_every_loader(converted, tmp_path, loader, extra):
    cfg = load_config("configs/small/byol_bsim.yaml",
                      TINY + [f"data.loader={loader}", f"data.train={converted[loader]}", "data.val=",
                              "train.max_steps=2", f"train.out_dir={tmp_path}", *extra])
    out = train(cfg, resume="none")
    assert out["step"] == 2 and math.isfinite(out["loss"])
    assert latest_valid(tmp_path)[1]["step"] == 2
