"""Evaluation: exact k-NN votes on tiny features, a linear probe that separates separable data, the CLI."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, tiny_folder

from bsim_fast.config import load_config
from bsim_fast.eval import knn_classify, linear_probe
from bsim_fast.train import train


def test_knn_weighted_vote_by_hand():
    train_f = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    train_y = torch.tensor([0, 0, 1, 1])
    test_f = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.4]]), dim=1)
    test_y = torch.tensor([0, 1, 1])
    out = knn_classify(train_f, train_y, test_f, test_y, k=4, t=0.07)
    # third query: class 0 neighbours are closer, so it votes 0 and is wrong; top-5 (both classes) is right
    assert out == {"knn_top1": pytest.approx(200 / 3), "knn_top5": 100.0}
    sims = test_f[2] @ train_f.T
    votes0, votes1 = (sims[:2] / 0.07).exp().sum(), (sims[2:] / 0.07).exp().sum()
    assert votes0 > votes1
    assert knn_classify(train_f, train_y, test_f, test_y, k=1)["knn_top1"] == pytest.approx(200 / 3)


def test_linear_probe_separates_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 4
    y = torch.arange(5).repeat_interleave(40)
    x = centres[y] + torch.randn(200, 16, generator=g)
    out = linear_probe(x[::2], y[::2], x[1::2], y[1::2], epochs=30, batch=32)
    assert out["linear_top1"] > 95 and out["linear_top5"] == 100.0


def test_linear_probe_depends_on_its_inputs_and_seed_only():
    """The same features and seed give the same probe whatever the global RNG holds (it once initialised the
    head from it, so a probe after loading a training checkpoint differed from one after an export)."""
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(16, 32, generator=g), torch.randn(8, 32, generator=g)
    y, yt = torch.arange(4).repeat(4), torch.arange(4).repeat(2)
    results = []
    for global_seed in (1, 2, 3):
        torch.manual_seed(global_seed)
        results.append(linear_probe(x, y, xt, yt, epochs=2))
    assert results[0] == results[1] == results[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tr, va = tiny_folder(root / "train", "train", per_class=4), tiny_folder(root / "val", "test", per_class=2)
    cfg = load_config(
        "configs/small/simclr_bsim.yaml",
        TINY + [f"data.train={tr}", "data.val=", "train.max_steps=1", f"train.out_dir={root / 'run'}"],
    )
    train(cfg, resume="none")
    return root, tr, va


@pytest.fixture(scope="module")
def expected(run_dir):
    """The k-NN (k 5) and the 2-epoch probe of the exported backbone, from the library's parts (features of
    `--train` as the bank / training set, of `--val` as the queries), on the CPU with one thread, as the CLI
    runs in `test_cli_from_export_and_from_checkpoint`."""
    from bsim_fast.eval import extract_features, load_backbone
    from bsim_fast.loaders import build_eval_loader

    root, tr, va = run_dir
    backbone, cfg = load_backbone(root / "run" / "backbone.pt", log=lambda m: None)
    backbone = backbone.to(memory_format=torch.channels_last)
    cfg.data.batch_size, cfg.data.workers, cfg.data.loader = 256, 0, "torch"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (bank, bank_y), (queries, query_y) = (
            extract_features(
                backbone, build_eval_loader(cfg, str(p), 0, 1, torch.device("cpu")), cfg.data.mean, cfg.data.std
            )
            for p in (tr, va)
        )
        return {
            "knn": knn_classify(bank, bank_y, queries, query_y, k=5, t=0.07),
            "linear": linear_probe(bank, bank_y, queries, query_y, epochs=2),
        }
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("task", ["knn", "linear"])
@pytest.mark.parametrize("which", ["backbone.pt", "ckpt_00000001.pt"])
def test_cli_from_export_and_from_checkpoint(run_dir, expected, task, which):
    root, tr, va = run_dir
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bsim_fast.eval",
            task,
            "--checkpoint",
            str(root / "run" / which),
            "--train",
            str(tr),
            "--val",
            str(va),
            "--workers",
            "0",
            "--epochs",
            "2",
            "--k",
            "5",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # the CPU, as `expected`: fp32 features on any machine
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["train_images"] == 16 and result["val_images"] == 8
    # the same backbone from either file, evaluated on --train / --val as asked (k, epochs), to 2 decimals
    for top in ("top1", "top5"):
        assert result[f"{task}_{top}"] == round(expected[task][f"{task}_{top}"], 2)


def test_cli_export_and_bad_paths(run_dir, tmp_path):
    root, tr, va = run_dir
    export = [sys.executable, "-m", "bsim_fast.eval", "export"]
    export += ["--checkpoint", str(root / "run" / "ckpt_00000001.pt"), "--output", str(tmp_path / "b.pt")]
    r = subprocess.run(export, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(export, capture_output=True, text=True)  # the same again
    assert r.returncode == 2 and "--overwrite" in r.stderr and r.stderr.count("\n") == 1  # nothing replaced
    exported = torch.load(tmp_path / "b.pt", weights_only=True)
    original = torch.load(root / "run" / "backbone.pt", weights_only=True)
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in exported)
    for args in (
        ["--checkpoint", str(tmp_path / "missing.pt"), "--train", str(tr), "--val", str(va)],
        ["--checkpoint", str(root / "run" / "backbone.pt"), "--train", str(tmp_path / "nope"), "--val", str(va)],
    ):
        r = subprocess.run([sys.executable, "-m", "bsim_fast.eval", "knn", *args], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def run_eval(*args):
    return subprocess.run([sys.executable, "-m", "bsim_fast.eval", *args], capture_output=True, text=True)


def test_checkpoint_copied_without_its_hash_loads_with_a_warning(run_dir, tmp_path):
    root, tr, va = run_dir
    copy = tmp_path / "ckpt_00000001.pt"
    shutil.copy(root / "run" / "ckpt_00000001.pt", copy)
    r = run_eval("knn", "--checkpoint", str(copy), "--train", str(tr), "--val", str(va), "--workers", "0", "--k", "5")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no .sha256" in warnings[0] and "incomplete" not in r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(len(str(v).split(".")[-1]) <= 2 for k, v in result.items() if k.startswith("knn"))  # rounded


def test_bad_eval_flags_and_code_checkpoints_are_one_line(run_dir, tmp_path):
    root, tr, va = run_dir
    (tmp_path / "code.pt").write_bytes(b"")
    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "code.pt")
    for args, needle in (
        (["--k", "0"], "--k"),
        (["--t", "0"], "--t"),
        (["--checkpoint", str(tmp_path / "code.pt")], "refused for safety"),
    ):
        full = ["knn", "--checkpoint", str(root / "run" / "backbone.pt"), "--train", str(tr), "--val", str(va), *args]
        r = run_eval(*full)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_eval_refuses_unlabeled_sets_before_extracting(run_dir, monkeypatch, capsys):
    root, tr, va = run_dir
    import bsim_fast.eval as ev
    import bsim_fast.loaders as loaders

    real = loaders.build_eval_loader

    def unlabeled_val(cfg, path, *a):  # what a set converted without labels reports (loader.labeled)
        loader = real(cfg, path, *a)
        loader.labeled = path != str(va)
        return loader

    monkeypatch.setattr(loaders, "build_eval_loader", unlabeled_val)
    monkeypatch.setattr(ev, "extract_features", lambda *a, **k: pytest.fail("features extracted"))
    code = ev.main(
        [
            "linear",
            "--checkpoint",
            str(root / "run" / "backbone.pt"),
            "--train",
            str(tr),
            "--val",
            str(va),
            "--workers",
            "0",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--val" in err and "unlabeled" in err


def test_readme_export_snippet_loads_the_cifar_stem_backbone(run_dir, tmp_path, monkeypatch):
    root, _, _ = run_dir
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("exported `backbone.pt`", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "runs/byol_bsim/" in snippet
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root / "run", tmp_path / "runs" / "byol_bsim")
    scope = {}
    exec(snippet, scope)  # the recipe here is CIFAR-stem ResNet-18: conv1 3x3, no max-pool
    m = scope["m"]
    assert isinstance(m.maxpool, torch.nn.Identity) and m.conv1.kernel_size == (3, 3)
    assert m(torch.zeros(2, 3, 16, 16)).shape == (2, 512)


def test_unlabeled_pretraining_then_eval_on_a_labelled_pair(run_dir, tmp_path, capsys):
    """A flat folder (no class sub-folders) is an unlabeled set: training skips its k-NN monitor in one line,
    eval refuses it as --train in one line, and the backbone it gave is evaluated on a labelled pair."""
    import bsim_fast.eval as ev

    root, tr, va = run_dir
    flat = tmp_path / "photos"
    flat.mkdir()
    for f in sorted(tr.rglob("*.jpg")):
        shutil.copy(f, flat / f"{f.parent.name}_{f.name}")
    cfg = load_config(
        "configs/small/simclr_bsim.yaml",
        TINY + [f"data.train={flat}", f"data.val={va}", "train.max_steps=1", f"train.out_dir={tmp_path / 'run'}"],
    )
    result = train(cfg, resume="none")
    out = capsys.readouterr().out
    assert "knn_top1" not in result and sum("[knn]" in line and "unlabeled" in line for line in out.splitlines()) == 1
    backbone = str(tmp_path / "run" / "backbone.pt")
    assert ev.main(["knn", "--checkpoint", backbone, "--train", str(flat), "--val", str(va), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--train {flat}: unlabeled" in err
    assert (
        ev.main(["knn", "--checkpoint", backbone, "--train", str(tr), "--val", str(va), "--workers", "0", "--k", "5"])
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 8 queries, each right or wrong: whole eighths (12.5 %), and top-1 at most top-5
    assert result["val_images"] == 8 and result["knn_top1"] <= result["knn_top5"]
    assert all(result[k] / 12.5 == round(result[k] / 12.5) for k in ("knn_top1", "knn_top5"))


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    """An exported CIFAR-stem backbone (the trained run's) and an ImageNet-stem one (BatchNorm statistics made
    non-trivial, so that eval-mode features depend on every tensor), each in both formats (CLI export)."""
    from bsim_fast.eval import export_backbone
    from bsim_fast.models import build_backbone

    root, _, _ = run_dir
    folder = tmp_path_factory.mktemp("exports")
    (folder / "cifar").mkdir()
    for name in ("backbone.pt", "backbone.json"):
        shutil.copy(root / "run" / name, folder / "cifar" / name)
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18", cifar_stem=False)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    cfg = load_config("configs/byol.yaml", ["model.arch=resnet18"])
    export_backbone(net, cfg, folder / "imagenet" / "backbone.pt")
    for stem in ("cifar", "imagenet"):
        pt, st = folder / stem / "backbone.pt", folder / stem / "backbone.safetensors"
        r = run_eval("export", "--checkpoint", str(pt), "--output", str(st))  # the format from the name
        assert r.returncode == 0, r.stderr
        assert st.read_bytes()[8:9] == b"{"  # a safetensors header (u64 length, then JSON), not a torch zip
    return folder


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_readme_timm_snippet_gives_the_projects_features(exports, stem, suffix, monkeypatch):
    from bsim_fast.eval import load_backbone

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("With timm", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet.count('"runs/byol_bsim/backbone.pt"') == 1 and "timm.create_model" in snippet
    monkeypatch.chdir(exports / stem)
    snippet = snippet.replace("runs/byol_bsim/backbone.pt", f"backbone{suffix}")
    scope = {}
    exec(snippet.replace("runs/byol_bsim/", ""), scope)
    timm_net = scope["m"].eval()
    ours = load_backbone(exports / stem / "backbone.pt")[0].eval()
    from_file = load_backbone(exports / stem / f"backbone{suffix}")[0].eval()
    assert (timm_net.conv1.kernel_size == (3, 3)) == (stem == "cifar")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(x)
        assert want.shape == (3, 512) and want.std() > 0
        torch.testing.assert_close(timm_net(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_file(x), want, rtol=0, atol=0)


def test_export_format_checks_are_one_line(run_dir, tmp_path, monkeypatch, capsys):
    root, _, _ = run_dir
    ckpt = str(root / "run" / "backbone.pt")
    r = run_eval("export", "--checkpoint", ckpt, "--output", str(tmp_path / "b.pt"), "--format", "safetensors")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "*.safetensors" in r.stderr
    (tmp_path / "b.json").write_text("{}")  # another backbone's description beside the output
    r = run_eval("export", "--checkpoint", ckpt, "--output", str(tmp_path / "b.pt"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "b.json" in r.stderr
    assert (tmp_path / "b.json").read_text() == "{}" and not (tmp_path / "b.pt").exists()
    import bsim_fast.eval as ev

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if the package were not installed
    monkeypatch.setitem(sys.modules, "safetensors", None)
    code = ev.main(["export", "--checkpoint", ckpt, "--output", str(tmp_path / "c.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'bsim_fast[safetensors]'" in err
    assert not (tmp_path / "c.safetensors").exists()
