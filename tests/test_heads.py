"""The SimCLR recipes' projection heads, layer by layer, as their anchors build them (docs/RECIPES.md)."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bsim_fast.config import load_config
from bsim_fast.methods import build_method

REPO = Path(__file__).resolve().parents[1]

# ("Linear", in, out, bias) / ("BN", features, learned scale, learned shift) / ("ReLU",)
ANCHOR_HEADS = {
    # Chen et al. 2020a's code, google-research/simclr (v1) model_util.projection_head, head_proj_mode
    # 'nonlinear' with one hidden layer: linear_layer(width 2048, use_bias=True, use_bn=True) is a dense layer
    # without bias and a BN with centre and scale; ReLU; linear_layer(proj_out_dim 128, use_bias=False,
    # use_bn=True) is a dense layer without bias and a BN with center=False (a scale, no shift).
    "simclr": [
        ("Linear", 2048, 2048, False),
        ("BN", 2048, True, True),
        ("ReLU",),
        ("Linear", 2048, 128, False),
        ("BN", 128, True, False),
    ],
    # solo-learn solo/methods/simclr.py: nn.Sequential(nn.Linear(features_dim, proj_hidden_dim), nn.ReLU(),
    # nn.Linear(proj_hidden_dim, proj_output_dim)); scripts/pretrain/cifar/simclr.yaml: 2048 and 256 on a
    # ResNet-18 (512 features).
    "small/simclr": [("Linear", 512, 2048, True), ("ReLU",), ("Linear", 2048, 256, True)],
}


def describe(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Linear):
        return ("Linear", layer.in_features, layer.out_features, layer.bias is not None)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        learned = [p is not None and p.requires_grad for p in (layer.weight, layer.bias)]
        return ("BN", layer.num_features, *learned)
    return (type(layer).__name__,)


@pytest.mark.parametrize("recipe", sorted(ANCHOR_HEADS))
@pytest.mark.parametrize("mode", ["", "_bsim", "_wbsim"])
def test_simclr_head_is_the_anchors(recipe, mode):
    cfg = load_config(REPO / "configs" / f"{recipe}{mode}.yaml")
    assert [describe(layer) for layer in build_method(cfg).projector] == ANCHOR_HEADS[recipe]


def test_scale_only_output_bn_keeps_a_zero_shift_through_training_and_syncbn():
    """The output BN of the ImageNet head: batch means of the projection stay 0 while its scale learns."""
    cfg = load_config(REPO / "configs/simclr.yaml", ["model.arch=resnet18", "model.proj_hidden=16"])
    head = build_method(cfg).projector
    optimiser = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(32, 512, generator=torch.Generator().manual_seed(0))
    scale_before = head[-1].weight.detach().clone()
    for _ in range(3):
        optimiser.zero_grad()
        z = head(x)
        (z - 3.0).square().mean().backward()  # pulls every output towards 3: a shift would learn it
        optimiser.step()
    assert head[-1].bias.grad is None and torch.equal(head[-1].bias, torch.zeros(128))
    assert not torch.equal(head[-1].weight, scale_before)
    assert head(x).mean(0).abs().max() < 1e-5
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    assert isinstance(synced[-1], nn.SyncBatchNorm) and not synced[-1].bias.requires_grad
