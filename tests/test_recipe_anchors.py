"""Every recipe's key values against its anchor's, written here with the source of each value (docs/RECIPES.md).

`tests/data/recipe_values.json` records every value as the recipes have it, so a change shows up; this file
says which value is right. The anchors: for configs/small, solo-learn's CIFAR files
(`scripts/pretrain/cifar/<method>.yaml`, the `augmentations/*.yaml` file it names, and the defaults solo-learn
fills in for what a file leaves out: `solo/args/pretrain.py`, `solo/methods/base.py`); for configs/, the
papers (and their official code where the paper leaves a value out). A value that knowingly differs from its
anchor is in DIFFERENCES with the anchor's value and the reason; the test checks that it still differs, so a
recipe brought back to its anchor also removes the entry.

Sources, as cited per value below:
  SOLO      solo-learn, scripts/pretrain/cifar/<method>.yaml (the method's own file)
  SOLO-AUG  its augmentations file: asymmetric.yaml (BYOL), symmetric.yaml (SimCLR), symmetric_weak.yaml (MoCo
            v2+, SimSiam); each is written per crop with crop_size 32
  SOLO-DEF  solo-learn's defaults: solo/args/pretrain.py (lr x batch / 256; SGD and LARS momentum 0.9, LARS
            eta 1e-3, clip_lr and exclude_bias_n_norm off unless given), solo/methods/base.py
            (scheduler.warmup_epochs 10, min_lr 0), solo/data/pretrain_dataloader.py (CIFAR-10 mean
            (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616), in 0..1 units)
  BSIM      Chu, Zhan, Zhang, the BSIM paper: Table 5 (epochs, ResNet-50, two 224 x 224 views), Tables 2-3 (CutMix,
            alpha 1.0)
  BYOL      Grill et al. 2020, Sec. 3.3 (optimisation, tau, projector / predictor) and Table 6 (augmentations)
  SIMCLR    Chen et al. 2020a, Sec. 2.3 (LARS, lr 0.3 x B/256, weight decay 1e-6, batch 4096, 10 warm-up epochs),
            App. B.9 (tau 0.1 at batch 4096), App. A (colour strength 1, blur 0.5), Sec. 4.2 (head 2048 -> 128)
  MOCO      He et al. 2020 (MoCo: K 65536, m 0.999, 128-d output, SGD weight decay 1e-4, momentum 0.9, ShuffleBN) and
            Chen et al. 2020b (MoCo v2: lr 0.03 at batch 256, cosine, tau 0.2, 2048-d MLP head, blur, 200 epochs);
            crops from 20% and no warm-up as facebookresearch/moco's main_moco.py (--aug-plus, --cos)
  SIMSIAM   Chen & He 2021, Sec. 4 "Implementation details" (SGD, lr 0.05 x B/256, batch 512, weight decay 1e-4,
            momentum 0.9, cosine without warm-up, 3-layer 2048-d projector with BN on its output, predictor 2048 ->
            512 -> 2048 at a fixed lr, synchronised BN, MoCo v2's augmentations)
  TV        torchvision's ImageNet statistics, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) in 0..1 units;
            RandomResizedCrop's default aspect ratios (3/4, 4/3), used by every anchor
"""

import glob

import pytest

from bsim_fast.config import load_config, to_dict

CIFAR_COMMON = {
    "model.arch": "resnet18",  # SOLO backbone.name
    "model.cifar_stem": True,  # SOLO-DEF: solo-learn's CIFAR backbone, 3x3 stride-1 conv1 and no max-pool
    "model.sync_bn": True,  # SOLO sync_batchnorm: True
    "data.image_size": 32,  # SOLO-AUG crop_size: 32
    "data.batch_size": 256,  # SOLO optimizer.batch_size (one device)
    "optim.lr_batch": 256,  # SOLO-DEF lr x batch_size x devices / 256
    "optim.momentum": 0.9,  # SOLO-DEF
    "optim.warmup_epochs": 10.0,  # SOLO-DEF scheduler.warmup_epochs
    "optim.min_lr_ratio": 0.0,  # SOLO-DEF scheduler.min_lr 0
    "train.epochs": 1000,  # SOLO max_epochs (see DIFFERENCES)
    "aug.crop_scale": [0.08, 1.0],  # SOLO-AUG crop_min_scale 0.08, crop_max_scale 1.0
    "aug.crop_ratio": [3 / 4, 4 / 3],  # TV
    "aug.flip_p": 0.5,  # SOLO-AUG horizontal_flip.prob
    "aug.jitter_p": 0.8,  # SOLO-AUG color_jitter.prob
    "aug.gray_p": 0.2,  # SOLO-AUG grayscale.prob
    "aug.blur_sigma": [0.1, 2.0],  # solo-learn's GaussianBlur sigma range
    "bsim.alpha": 1.0,  # BSIM Tables 2-3
}
MOCOV2_JITTER = {"aug.brightness": 0.4, "aug.contrast": 0.4, "aug.saturation": 0.4, "aug.hue": 0.1}
SOLO_WEAK = {  # SOLO-AUG symmetric_weak.yaml (MoCo v2+, SimSiam)
    **MOCOV2_JITTER,  # color_jitter
    "aug.blur_p": [0.5, 0.5],  # gaussian_blur.prob
    "aug.solarize_p": [0.0, 0.0],  # solarization.prob
}
SOLO_SGD = {  # mocov2plus.yaml and simsiam.yaml
    "optim.name": "sgd",  # SOLO optimizer.name
    "optim.exclude_bias_norm": False,  # SOLO-DEF: no kwargs, weight decay on every parameter
}
SOLO_LARS = {  # SOLO optimizer.kwargs of byol.yaml and simclr.yaml
    "optim.name": "lars",  # optimizer.name
    "optim.trust_coefficient": 0.02,  # eta
    "optim.clip_lr": True,  # clip_lr
    "optim.exclude_bias_norm": True,  # exclude_bias_n_norm
}

ANCHORS = {
    "configs/small/byol.yaml": {
        **CIFAR_COMMON,
        **SOLO_LARS,
        "optim.lr": 1.0,  # SOLO optimizer.lr
        "optim.weight_decay": 1e-5,  # SOLO optimizer.weight_decay
        "method.tau_base": 0.99,  # SOLO momentum.base_tau
        "method.tau_final": 1.0,  # SOLO momentum.final_tau
        "model.proj_hidden": 4096,  # SOLO method_kwargs.proj_hidden_dim
        "model.proj_dim": 256,  # SOLO method_kwargs.proj_output_dim
        "model.pred_hidden": 4096,  # SOLO method_kwargs.pred_hidden_dim
        "aug.brightness": 0.4,  # SOLO-AUG asymmetric.yaml color_jitter (both crops)
        "aug.contrast": 0.4,
        "aug.saturation": 0.2,
        "aug.hue": 0.1,
        "aug.blur_p": [0.0, 0.0],  # SOLO-AUG asymmetric.yaml gaussian_blur.prob, first and second crop
        "aug.solarize_p": [0.0, 0.2],  # SOLO-AUG asymmetric.yaml solarization.prob, first and second crop
    },
    "configs/small/simclr.yaml": {
        **CIFAR_COMMON,
        **SOLO_LARS,
        "optim.lr": 0.4,  # SOLO optimizer.lr
        "optim.weight_decay": 1e-4,  # SOLO optimizer.weight_decay
        "method.temperature": 0.2,  # SOLO method_kwargs.temperature
        "model.proj_hidden": 2048,  # SOLO method_kwargs.proj_hidden_dim
        "model.proj_dim": 256,  # SOLO method_kwargs.proj_output_dim
        "aug.brightness": 0.8,  # SOLO-AUG symmetric.yaml color_jitter
        "aug.contrast": 0.8,
        "aug.saturation": 0.8,
        "aug.hue": 0.2,
        "aug.blur_p": [0.5, 0.5],  # SOLO-AUG symmetric.yaml gaussian_blur.prob, both crops
        "aug.solarize_p": [0.0, 0.0],  # SOLO-AUG symmetric.yaml solarization.prob
    },
    "configs/small/moco.yaml": {
        **CIFAR_COMMON,
        **SOLO_WEAK,
        **SOLO_SGD,
        "optim.lr": 0.3,  # SOLO optimizer.lr
        "optim.weight_decay": 1e-4,  # SOLO optimizer.weight_decay
        "method.temperature": 0.2,  # SOLO method_kwargs.temperature
        "method.symmetric": True,  # solo-learn's mocov2plus.py: the loss is the mean of both directions
        "method.tau_base": 0.99,  # SOLO momentum.base_tau
        "method.tau_final": 0.999,  # SOLO momentum.final_tau
        "model.queue_size": 32768,  # SOLO method_kwargs.queue_size
        "model.proj_hidden": 2048,  # SOLO method_kwargs.proj_hidden_dim
        "model.proj_dim": 256,  # SOLO method_kwargs.proj_output_dim
    },
    "configs/small/simsiam.yaml": {
        **CIFAR_COMMON,
        **SOLO_WEAK,
        **SOLO_SGD,
        "optim.lr": 0.5,  # SOLO optimizer.lr
        "optim.weight_decay": 1e-5,  # SOLO optimizer.weight_decay
        "optim.fixed_predictor_lr": True,  # solo-learn's simsiam.py: the predictor's parameters have static_lr
        "model.proj_hidden": 2048,  # SOLO method_kwargs.proj_hidden_dim
        "model.proj_dim": 2048,  # SOLO method_kwargs.proj_output_dim
        "model.pred_hidden": 512,  # SOLO method_kwargs.pred_hidden_dim
    },
}

IMAGENET_COMMON = {
    "model.arch": "resnet50",  # BSIM Table 5
    "model.cifar_stem": False,  # torchvision's ResNet-50, as every paper's
    "data.image_size": 224,  # BSIM Tables 4-5: two 224 x 224 views
    "data.mean": [0.485 * 255, 0.456 * 255, 0.406 * 255],  # TV
    "data.std": [0.229 * 255, 0.224 * 255, 0.225 * 255],  # TV
    "optim.lr_batch": 256,  # every paper: lr = base lr x batch / 256
    "optim.momentum": 0.9,  # BYOL, SIMCLR (their LARS), MOCO, SIMSIAM
    "optim.min_lr_ratio": 0.0,  # every paper: cosine decay to 0
    "aug.crop_ratio": [3 / 4, 4 / 3],  # TV
    "aug.flip_p": 0.5,  # every paper's augmentations
    "aug.jitter_p": 0.8,  # BYOL Table 6, SIMCLR App. A, MOCO
    "aug.gray_p": 0.2,  # BYOL Table 6, SIMCLR App. A, MOCO
    "aug.blur_sigma": [0.1, 2.0],  # BYOL Table 6, SIMCLR App. A, MOCO
    "bsim.alpha": 1.0,  # BSIM Tables 2-3
}
MOCOV2_AUG = {
    **MOCOV2_JITTER,  # MOCO v2 (main_moco.py --aug-plus): ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8
    "aug.crop_scale": [0.2, 1.0],  # MOCO main_moco.py RandomResizedCrop(224, scale=(0.2, 1.0))
    "aug.blur_p": [0.5, 0.5],  # MOCO v2: GaussianBlur([0.1, 2.0]) with p 0.5
    "aug.solarize_p": [0.0, 0.0],  # MOCO v2: none
}

ANCHORS |= {
    "configs/byol.yaml": {
        **IMAGENET_COMMON,
        "optim.name": "lars",  # BYOL Sec. 3.3
        "optim.lr": 0.2,  # BYOL Sec. 3.3: 0.2 x BatchSize / 256
        "data.batch_size": 4096,  # BYOL Sec. 3.3
        "optim.weight_decay": 1.5e-6,  # BYOL Sec. 3.3
        "optim.exclude_bias_norm": True,  # BYOL Sec. 3.3: biases and BN excluded from LARS and weight decay
        "optim.trust_coefficient": 1e-3,  # deepmind-research/byol: LARS eta 1e-3
        "optim.clip_lr": False,  # deepmind-research/byol: the trust ratio is not clipped
        "optim.warmup_epochs": 10.0,  # BYOL Sec. 3.3
        "method.tau_base": 0.996,  # BYOL Sec. 3.3: tau_base 0.996, increased to 1
        "method.tau_final": 1.0,
        "model.proj_hidden": 4096,  # BYOL Sec. 3.3: MLP 4096 -> 256, predictor the same
        "model.proj_dim": 256,
        "model.pred_hidden": 4096,
        "model.sync_bn": True,  # BYOL: batch statistics over all devices
        "train.epochs": 300,  # BSIM Table 5: BYOL-BSIM / -WBSIM at 300 epochs (and 200)
        "aug.crop_scale": [0.08, 1.0],  # BYOL Table 6
        "aug.brightness": 0.4,  # BYOL Table 6
        "aug.contrast": 0.4,
        "aug.saturation": 0.2,
        "aug.hue": 0.1,
        "aug.blur_p": [1.0, 0.1],  # BYOL Table 6: T and T'
        "aug.solarize_p": [0.0, 0.2],  # BYOL Table 6: T and T'
    },
    "configs/simclr.yaml": {
        **IMAGENET_COMMON,
        "optim.name": "lars",  # SIMCLR Sec. 2.3
        "optim.lr": 0.3,  # SIMCLR Sec. 2.3: 4.8 = 0.3 x BatchSize / 256
        "data.batch_size": 4096,  # SIMCLR Sec. 2.3
        "optim.weight_decay": 1e-6,  # SIMCLR Sec. 2.3
        "optim.exclude_bias_norm": True,  # google-research/simclr: BN and biases excluded from decay and LARS
        "optim.trust_coefficient": 1e-3,  # google-research/simclr lars_optimizer.py: eeta 0.001
        "optim.clip_lr": False,  # google-research/simclr: the trust ratio is not clipped
        "optim.warmup_epochs": 10.0,  # SIMCLR Sec. 2.3
        "method.temperature": 0.1,  # SIMCLR App. B.9: 0.1 at batch 4096
        "model.proj_hidden": 2048,  # SIMCLR Sec. 4.2: the hidden layer as wide as the representation
        "model.proj_dim": 128,  # SIMCLR Sec. 4.2: 128-d output
        "model.sync_bn": True,  # SIMCLR Sec. 2.3: global BN
        "train.epochs": 200,  # BSIM Table 5
        "aug.crop_scale": [0.08, 1.0],  # SIMCLR App. A
        "aug.brightness": 0.8,  # SIMCLR App. A: colour distortion strength 1
        "aug.contrast": 0.8,
        "aug.saturation": 0.8,
        "aug.hue": 0.2,
        "aug.blur_p": [0.5, 0.5],  # SIMCLR App. A
        "aug.solarize_p": [0.0, 0.0],  # SIMCLR: none
    },
    "configs/moco.yaml": {
        **IMAGENET_COMMON,
        **MOCOV2_AUG,
        "optim.name": "sgd",  # MOCO
        "optim.lr": 0.03,  # MOCO v2: 0.03 at batch 256
        "data.batch_size": 256,  # MOCO v2
        "optim.weight_decay": 1e-4,  # MOCO
        "optim.exclude_bias_norm": False,  # MOCO main_moco.py: weight decay on every parameter
        "optim.warmup_epochs": 0.0,  # MOCO main_moco.py --cos: cosine from the first epoch
        "method.temperature": 0.2,  # MOCO v2
        "method.tau_base": 0.999,  # MOCO m = 0.999, constant
        "method.tau_final": 0.999,
        "method.shuffle_bn": True,  # MOCO ShuffleBN
        "model.sync_bn": False,  # MOCO: per-device BN, shuffled
        "model.queue_size": 65536,  # MOCO K
        "model.proj_hidden": 2048,  # MOCO v2: 2048-d hidden layer
        "model.proj_dim": 128,  # MOCO: 128-d output
        "train.epochs": 200,  # MOCO v2, BSIM Table 5
    },
    "configs/simsiam.yaml": {
        **IMAGENET_COMMON,
        **MOCOV2_AUG,  # SIMSIAM: MoCo v2's augmentations
        "optim.name": "sgd",  # SIMSIAM
        "optim.lr": 0.05,  # SIMSIAM: 0.05 x BatchSize / 256
        "data.batch_size": 512,  # SIMSIAM
        "optim.weight_decay": 1e-4,  # SIMSIAM
        "optim.exclude_bias_norm": False,  # facebookresearch/simsiam: weight decay on every parameter
        "optim.warmup_epochs": 0.0,  # SIMSIAM: cosine, no warm-up
        "optim.fixed_predictor_lr": True,  # SIMSIAM: the predictor's lr is not decayed
        "model.proj_hidden": 2048,  # SIMSIAM: projector 2048-d, 3 layers
        "model.proj_dim": 2048,
        "model.pred_hidden": 512,  # SIMSIAM: predictor bottleneck 512
        "model.sync_bn": True,  # SIMSIAM: BN synchronised across devices
        "train.epochs": 200,  # BSIM Table 5
    },
}

# (recipe, key) -> (the anchor's value, ours, why): checked to still differ
DIFFERENCES = {
    (f"configs/small/{m}.yaml", "train.epochs"): (1000, 200, "BSIM and SIM compared at equal epochs, docs/RESULTS.md")
    for m in ("byol", "simclr", "moco", "simsiam")
}

CIFAR_STATS = {  # SOLO-DEF, in 0..255 units; the recipes give them to one decimal
    "data.mean": [0.4914 * 255, 0.4822 * 255, 0.4465 * 255],
    "data.std": [0.2470 * 255, 0.2435 * 255, 0.2616 * 255],
}


def flat(path):
    return {
        f"{section}.{key}": value
        for section, values in to_dict(load_config(path)).items()
        for key, value in values.items()
    }


def close(got, want, tol):
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(close(g, w, tol) for g, w in zip(got, want))
    if isinstance(want, float) and not isinstance(got, bool):
        return isinstance(got, int | float) and abs(got - want) <= tol * max(1.0, abs(want))
    return type(got) is type(want) and got == want


@pytest.mark.parametrize("recipe", sorted(ANCHORS))
def test_recipe_values_equal_their_anchors(recipe):
    values = flat(recipe)
    wrong = []
    for key, anchor in ANCHORS[recipe].items():
        assert key in values, f"{recipe}: no key {key}"
        if (recipe, key) in DIFFERENCES:
            anchor_value, ours, why = DIFFERENCES[(recipe, key)]
            assert anchor == anchor_value and values[key] == ours != anchor, (recipe, key, values[key], why)
        elif not close(values[key], anchor, 1e-9):
            wrong.append(f"{key} = {values[key]!r}, anchor {anchor!r}")
    assert not wrong, f"{recipe}: " + "; ".join(wrong)


@pytest.mark.parametrize("recipe", [r for r in sorted(ANCHORS) if "/small/" in r])
def test_cifar_statistics_are_solo_learns_to_one_decimal(recipe):
    values = flat(recipe)
    for key, want in CIFAR_STATS.items():
        assert all(abs(g - w) <= 0.05 for g, w in zip(values[key], want, strict=True)), (key, values[key], want)


RECIPES = sorted(p for p in glob.glob("configs/**/*.yaml", recursive=True) if "/_base/" not in p)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.endswith(("_bsim.yaml", "_wbsim.yaml"))])
def test_bsim_and_wbsim_recipes_differ_from_their_sim_recipe_only_in_mode(recipe):
    """So the anchors above hold for all 24 recipes, and BSIM is compared with SIM at equal settings."""
    sim = recipe.replace("_wbsim.yaml", ".yaml").replace("_bsim.yaml", ".yaml")
    mode = "wbsim" if recipe.endswith("_wbsim.yaml") else "bsim"
    ours, theirs = flat(recipe), flat(sim)
    assert ours.keys() == theirs.keys()
    differ = {k for k in ours if ours[k] != theirs[k]}
    assert differ == {"method.mode", "train.out_dir"} and (theirs["method.mode"], ours["method.mode"]) == ("sim", mode)


def test_every_sim_recipe_has_anchors():
    assert sorted(ANCHORS) == sorted(r for r in RECIPES if not r.endswith(("_bsim.yaml", "_wbsim.yaml")))
