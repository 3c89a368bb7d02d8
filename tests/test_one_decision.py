"""Decisions made in one place and followed everywhere: the registries check their own names (config.py imports
none of them), `data.gpu_resident` is read as `data.loader=gpu_resident`, and `eval` follows the checkpoint
(its `train.precision`, and the loader that reads each path)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny_folder

from bsim_fast import eval as ev
from bsim_fast import loaders
from bsim_fast.config import ConfigError, from_dict, load_config, to_dict
from bsim_fast.resume import config_differences
from bsim_fast.train import main, train

REPO = Path(__file__).resolve().parents[1]


def test_a_bad_loader_name_is_one_line_naming_the_override(capsys):
    rc = main(["--config", "configs/small/byol_bsim.yaml", "data.loader=fcv", "--check-only"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (
        "error: override 'data.loader=fcv': data.loader = 'fcv' is not one of ffcv, dali, torch, gpu_resident"
    )


def test_config_loads_without_the_registries():
    """config.py imports nothing of the project: a recipe loads in a process that never imported the methods
    (nor torch), its method settings are resolved once the methods register, and a bad setting still names
    its file there."""
    code = (
        "import sys\n"
        "from bsim_fast.config import ConfigError, load_config\n"
        "cfg = load_config('configs/small/moco.yaml', ['method.temperature=0.3'])\n"
        "bad = load_config('configs/small/moco.yaml', ['method.temperature=-1'])\n"
        "print(sorted(m for m in ('torch', 'bsim_fast.methods', 'bsim_fast.loaders') if m in sys.modules))\n"
        "import bsim_fast.methods\n"
        "print(cfg.method.settings.temperature)\n"
        "try:\n"
        "    bad.method.settings\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.splitlines() == [
        "[]",
        "0.3",
        "override 'method.temperature=-1': method.temperature must be > 0, found -1.0",
    ]


def test_gpu_resident_switch_is_read_as_the_loader(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("base: " + str(REPO / "configs/small/byol.yaml") + "\ndata: {loader: ffcv, gpu_resident: true}\n")
    cfg = load_config(recipe)
    assert cfg.data.loader == "gpu_resident" and cfg.where("data.loader") == str(recipe)
    assert load_config(recipe, ["data.gpu_resident=false"]).data.loader == "gpu_resident"  # false: no change
    with pytest.raises(ConfigError, match="data.gpu_resident: expected bool"):
        load_config(recipe, ["data.gpu_resident=3"])
    # a checkpoint written before: its config loads, and resuming it under today's keys is no config change
    saved = to_dict(load_config("configs/small/byol.yaml"))
    saved["data"] |= {"loader": "ffcv", "gpu_resident": True}
    assert from_dict(saved).data.loader == "gpu_resident"
    assert config_differences(saved, load_config("configs/small/byol.yaml", ["data.loader=gpu_resident"])) == []


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    folder = tiny_folder(root / "train", "train", per_class=4)
    cfg = load_config(
        "configs/small/byol_bsim.yaml",
        TINY
        + [
            "data.loader=gpu_resident",
            f"data.train={folder}",
            "data.val=",
            "train.precision=fp16",
            "train.max_steps=1",
            f"train.out_dir={root / 'run'}",
        ],
    )
    train(cfg, resume="none")
    return root / "run", folder


@pytest.mark.parametrize("which", ["backbone.pt", "ckpt_00000001.pt"])
def test_eval_follows_the_checkpoint(fp16_run, which, monkeypatch, capsys):
    """A run trained in fp16 on the GPU-resident loader: eval computes features in fp16 (what the run trained
    in) and reads each path with the loader that reads it (a folder: torch), not the run's loader."""
    run, folder = fp16_run
    assert json.loads((run / "backbone.json").read_text())["precision"] == "fp16"
    kinds, precisions = [], []
    build = loaders.build_eval_loader

    def recording_loader(cfg, path, rank, world, device, kind=None):
        kinds.append(kind or cfg.data.loader)
        return build(cfg, path, rank, world, device, kind=kind)

    def recording_features(backbone, loader, mean, std, precision=None):
        precisions.append(precision)
        return torch.nn.functional.normalize(torch.ones(len(loader.indices), 4), dim=1), torch.zeros(
            len(loader.indices), dtype=torch.long
        )

    monkeypatch.setattr(loaders, "build_eval_loader", recording_loader)
    monkeypatch.setattr(ev, "extract_features", recording_features)
    assert ev.main(["knn", "--checkpoint", str(run / which), "--train", str(folder), "--val", str(folder)]) == 0
    assert kinds == ["torch", "torch"]
    assert [(p.amp_dtype, p.device_type) for p in precisions] == [(torch.float16, "cpu")] * 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["knn_top1"] == 100.0


def test_one_atomic_write_names_the_file_it_writes(tmp_path, monkeypatch, capsys):
    """metrics.csv, config.json, exports and reports go through atomic.write_*_atomic: a full disk keeps the
    previous file and names the file being written (not "checkpoint"); the trainer says it in one line, exit 2."""
    import errno

    from bsim_fast import atomic
    from bsim_fast import train as train_module

    target = tmp_path / "metrics.csv"
    atomic.write_text_atomic(target, "step,kind,name,value\n")
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(atomic.DiskFullError) as err:
        atomic.write_text_atomic(target, "new")
    monkeypatch.undo()
    assert str(err.value) == (
        f"no space left on device while writing {target} (temporary output removed; previous output kept)"
    )
    assert target.read_text() == "step,kind,name,value\n" and sorted(tmp_path.iterdir()) == [target]

    def disk_full_run(cfg, resume):
        raise atomic.DiskFullError(tmp_path / "run" / "config.json")

    monkeypatch.setattr(train_module, "train", disk_full_run)
    assert main(["--config", "configs/small/byol_bsim.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "while writing" in err and "config.json" in err
