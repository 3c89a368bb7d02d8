"""Recipes load and validate; every mistake is one line naming the file and the key."""

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bsim_fast.config import MODES, ConfigError, from_dict, load_config, to_dict
from bsim_fast.methods import METHODS

# Recipes are what scripts/train_8gpu.sh lists: every configs/**.yaml except the bases they build on.
RECIPES = sorted(p for p in glob.glob("configs/**/*.yaml", recursive=True) if "/_base/" not in p)
RECIPE_VALUES = json.loads((Path(__file__).parent / "data" / "recipe_values.json").read_text())
NAMES = {f"{m}{'' if mode == 'sim' else '_' + mode}" for m in METHODS for mode in MODES}  # every method x mode


def test_every_method_has_a_recipe_per_mode_at_both_scales():
    top = {p.split("/")[-1][:-5] for p in RECIPES if p.count("/") == 1}
    small = {p.split("/")[-1][:-5] for p in RECIPES if "/small/" in p}
    assert top == NAMES and small == NAMES


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_loads_and_names_itself(path):
    cfg = load_config(path)
    assert cfg.recipe == path.split("/")[-1][:-5]
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_values_are_the_recorded_ones(path):
    """Every value of every recipe, bases resolved, as recorded in tests/data/recipe_values.json. A change
    here is deliberate: update the file and say where the new value comes from (docs/RECIPES.md)."""
    assert to_dict(load_config(path)) == RECIPE_VALUES[path]


def test_recorded_values_cover_every_recipe():
    assert sorted(RECIPE_VALUES) == RECIPES


def test_paper_defaults_are_in_the_recipes():
    byol = load_config("configs/byol_bsim.yaml")
    assert (byol.model.arch, byol.optim.name, byol.optim.lr) == ("resnet50", "lars", 0.2)
    assert byol.method.settings.tau_base == 0.996
    assert byol.aug.blur_p == (1.0, 0.1) and byol.aug.solarize_p == (0.0, 0.2)
    moco = load_config("configs/moco_wbsim.yaml")
    assert (moco.optim.name, moco.optim.lr, moco.model.queue_size) == ("sgd", 0.03, 65536)
    assert moco.method.settings.temperature == 0.2
    assert moco.method.mode == "wbsim" and moco.bsim.weight == 1.0


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def error_of(fn):
    with pytest.raises(ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.1\n  lrr: 0.2\n")
    msg = error_of(lambda: load_config(p))
    assert str(p) in msg and "optim.lrr" in msg


def test_unknown_section(tmp_path):
    msg = error_of(lambda: load_config(write(tmp_path, "optimizer: {lr: 1}\n")))
    assert "optimizer" in msg


def test_wrong_type_names_expected_and_found(tmp_path):
    msg = error_of(lambda: load_config(write(tmp_path, "data: {batch_size: big}\n")))
    assert "data.batch_size" in msg and "expected int" in msg and "'big'" in msg
    msg = error_of(lambda: load_config(write(tmp_path, "aug: {crop_scale: 0.5}\n")))
    assert "aug.crop_scale" in msg and "list of 2" in msg


def test_yaml_12_scalars(tmp_path):
    # `1e-5` is a float and `off` a string (YAML 1.1 would read them the other way round)
    cfg = load_config(write(tmp_path, "optim: {weight_decay: 1e-5}\ntrain: {compile: off}\nmodel: {sync_bn: false}\n"))
    assert cfg.optim.weight_decay == 1e-5 and cfg.train.compile == "off" and cfg.model.sync_bn is False
    assert load_config(None, ["optim.lr=2E-3"]).optim.lr == 2e-3


def test_int_accepted_for_float_and_bool_is_not_int(tmp_path):
    assert load_config(write(tmp_path, "optim: {lr: 1}\n")).optim.lr == 1.0
    assert "data.workers" in error_of(lambda: load_config(write(tmp_path, "data: {workers: true}\n")))


BAD_VALUES = [
    ("data.batch_size=0", "data.batch_size", "0"),
    ("data.image_size=-3", "data.image_size", "-3"),
    ("method.mode=bsmi", "method.mode", "bsmi"),
    ("optim.lr=-1", "optim.lr", "-1"),
    ("aug.crop_scale=[0.9,0.1]", "aug.crop_scale", "0.9"),
    ("bsim.alpha=0", "bsim.alpha", "0"),
    # values that used to pass unchecked: a wrong k-NN, a traceback at the first step, or a silent no-op
    ("train.knn_t=0", "train.knn_t", "0"),
    ("data.std=[0,0,0]", "data.std", "0"),
    ("aug.brightness=-1", "aug.brightness", "-1"),
    ("aug.hue=0.9", "aug.hue", "0.9"),
    ("data.image_size=1", "data.image_size", "1"),
    ("optim.min_lr_ratio=5", "optim.min_lr_ratio", "5"),
    ("train.knn_k=0", "train.knn_k", "0"),
    ("aug.crop_ratio=[1.5,0.5]", "aug.crop_ratio", "1.5"),
    ("aug.blur_sigma=[2.0,0.1]", "aug.blur_sigma", "2.0"),
    ("aug.blur_sigma=[0,1]", "aug.blur_sigma", "0"),
    ("aug.saturation=-0.5", "aug.saturation", "-0.5"),
    ("optim.betas=[0.9,1.0]", "optim.betas", "1.0"),
    ("optim.momentum=1.5", "optim.momentum", "1.5"),
    ("optim.lr_batch=0", "optim.lr_batch", "0"),
    ("optim.trust_coefficient=0", "optim.trust_coefficient", "0"),
    ("model.proj_dim=0", "model.proj_dim", "0"),
    ("model.pred_hidden=-4", "model.pred_hidden", "-4"),
    ("model.arch=resnet5", "model.arch", "resnet5"),
    ("method.tau_base=1.5", "method.tau_base", "1.5"),
    ("method.name=swav", "method.name", "swav"),
    ("data.mean=[300,0,0]", "data.mean", "300"),
    ("data.dali_hw_decoder_load=2", "data.dali_hw_decoder_load", "2"),
    ("bsim.weight=-1", "bsim.weight", "-1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints", "0"),
]


@pytest.mark.parametrize("override,key,value", BAD_VALUES)
def test_bad_values_are_one_line_and_exit_2_through_the_trainer(override, key, value, capsys):
    """Through the trainer's entry point (`python -m bsim_fast.train`): exit 2, one line naming the key, the
    value and where it was set, before any work."""
    from bsim_fast.train import main

    try:
        rc = main(["--config", "configs/small/byol_bsim.yaml", override])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err
    assert key in err and value in err and override in err


def test_a_bad_value_in_a_base_file_names_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("aug: {hue: 0.7}\n")
    (tmp_path / "r.yaml").write_text("base: base.yaml\ndata: {image_size: 32}\n")
    msg = error_of(lambda: load_config(tmp_path / "r.yaml"))
    assert msg.startswith(str(tmp_path / "base.yaml")) and "aug.hue must be in [0, 0.5], found 0.7" in msg


def test_duplicate_yaml_keys_are_refused_with_their_lines(tmp_path):
    msg = error_of(lambda: load_config(write(tmp_path, "optim:\n  lr: 0.1\n  lr: 0.2\n")))
    assert str(tmp_path / "r.yaml") in msg and "line 3: duplicate key 'lr' (first on line 2)" in msg
    msg = error_of(lambda: load_config(write(tmp_path, "optim: {lr: 0.1}\ndata: {workers: 1}\noptim: {lr: 2}\n")))
    assert "line 3: duplicate key 'optim'" in msg
    r = subprocess.run(
        [sys.executable, "-m", "bsim_fast.train", "--config", str(tmp_path / "r.yaml")], capture_output=True, text=True
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "duplicate key 'optim'" in r.stderr


def test_overrides_parse_yaml_values():
    cfg = load_config(
        "configs/simclr.yaml",
        ["optim.lr=0.5", "aug.crop_scale=[0.2, 1.0]", "train.compile=off", "data.train=some/path.beton"],
    )
    assert cfg.optim.lr == 0.5 and cfg.aug.crop_scale == (0.2, 1.0) and cfg.train.compile == "off"
    assert cfg.data.train == "some/path.beton"
    assert "section.key=value" in error_of(lambda: load_config(None, ["lr=3"]))
    assert "train.nope" in error_of(lambda: load_config(None, ["train.nope=3"]))


def test_missing_and_invalid_yaml(tmp_path):
    assert "not found" in error_of(lambda: load_config(tmp_path / "none.yaml"))
    assert "invalid YAML" in error_of(lambda: load_config(write(tmp_path, "data: [unclosed\n")))


def test_cli_reports_one_line_and_exit_2(tmp_path):
    p = write(tmp_path, "method: {name: byol}\ntrain: {epochz: 3}\n")  # a recipe names its method
    r = subprocess.run([sys.executable, "-m", "bsim_fast.train", "--config", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.epochz" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- composition (base files)


def test_base_is_relative_to_the_recipe_and_later_layers_win(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "scale.yaml").write_text("data: {image_size: 64, batch_size: 32}\n")
    (tmp_path / "common" / "aug.yaml").write_text("aug: {hue: 0.05}\ndata: {batch_size: 16}\n")
    (tmp_path / "a.yaml").write_text("base: [common/scale.yaml, common/aug.yaml]\ndata: {workers: 3}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ndata: {image_size: 48}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.data.workers, cfg.aug.hue) == (48, 16, 3, 0.05)


def test_base_cycle_and_missing_base_are_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml]\n")
    msg = error_of(lambda: load_config(tmp_path / "a.yaml"))
    assert "cycle" in msg and "a.yaml" in msg and "b.yaml" in msg
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    msg = error_of(lambda: load_config(tmp_path / "c.yaml"))
    assert "c.yaml" in msg and "nowhere.yaml" in msg and "not found" in msg
    (tmp_path / "d.yaml").write_text("base: {a: 1}\n")
    assert "base must be" in error_of(lambda: load_config(tmp_path / "d.yaml"))


def test_error_in_a_base_names_the_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lrr: 1}\n")
    (tmp_path / "r.yaml").write_text("base: base.yaml\n")
    msg = error_of(lambda: load_config(tmp_path / "r.yaml"))
    assert "base.yaml" in msg and "optim.lrr" in msg


def test_the_8gpu_script_lists_recipes_not_bases():
    r = subprocess.run(["bash", "scripts/train_8gpu.sh", "no_such_recipe"], capture_output=True, text=True)
    assert r.returncode == 2
    listed = r.stderr.split("choose one of:")[1].split()
    assert sorted(f"configs/{name}.yaml" for name in listed) == RECIPES


# ---------------------------------------------------------------- method settings (declared by each method)


def test_each_method_has_its_own_settings_and_defaults():
    assert load_config(None, ["method.name=simclr"]).method.settings.temperature == 0.1
    moco = load_config(None, ["method.name=moco", "method.temperature=0.3"])
    assert moco.method.settings.temperature == 0.3 and moco.method.settings.tau_base == 0.999
    assert "method.temperature is not a setting of byol" in error_of(
        lambda: load_config(None, ["method.name=byol", "method.temperature=0.3"])
    )


def test_a_setting_of_another_method_is_refused_after_a_rename(tmp_path):
    p = write(tmp_path, "method: {name: moco, tau_base: 0.99}\n")
    msg = error_of(lambda: load_config(p, ["method.name=simclr"]))
    assert str(p) in msg and "method.tau_base is not a setting of simclr" in msg


def test_moved_keys_name_their_new_place():
    assert "(now method.tau_base)" in error_of(lambda: load_config(None, ["model.tau_base=0.99"]))
    assert "method.temperature" in error_of(lambda: load_config(None, ["model.temperature=0.1"]))


def test_settings_round_trip_through_a_checkpoint_dict():
    cfg = load_config("configs/small/moco_wbsim.yaml", ["method.tau_final=0.9995"])
    assert to_dict(cfg)["method"]["tau_final"] == 0.9995
    assert from_dict(to_dict(cfg)) == cfg and from_dict(to_dict(cfg)) != load_config("configs/small/moco_wbsim.yaml")


def record_recipe_values() -> None:
    """`python tests/test_config.py --record`: rewrite tests/data/recipe_values.json from the recipes, one line
    per section, so that `git diff` shows each changed value (review it against docs/RECIPES.md)."""
    lines = []
    for path in RECIPES:
        values = to_dict(load_config(path))
        sections = [f'  "{s}": {json.dumps(values[s], sort_keys=True)}' for s in sorted(values)]
        lines.append(f' "{path}": {{\n' + ",\n".join(sections) + "\n }")
    (Path(__file__).parent / "data" / "recipe_values.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    record_recipe_values()
