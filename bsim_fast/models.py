"""Backbones (torchvision ResNets without the classifier) and the MLP heads the methods put on them."""

from __future__ import annotations

import torch.nn as nn
import torchvision

from .config import ConfigError


def backbone_names() -> tuple[str, ...]:
    """The torchvision ResNets `model.arch` may name (resnet18 ... resnet152, wide_resnet50_2, ...)."""
    return tuple(n for n in torchvision.models.list_models(module=torchvision.models) if "resnet" in n)


def check_arch(arch: str, where: str = "model.arch") -> None:
    """One line naming `where` (the file or override that set model.arch) when `arch` is no torchvision ResNet."""
    if arch not in backbone_names():
        raise ConfigError(f"{where}: model.arch = {arch!r} is not one of {', '.join(backbone_names())}")


def build_backbone(arch: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet returning pooled features, and their width.

    cifar_stem: a 3x3 stride-1 first conv and no max-pool, so 32x32 inputs keep their resolution.
    """
    check_arch(arch)
    net = getattr(torchvision.models, arch)(weights=None)
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net, feat_dim


class ScaleOnlyBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm with a learned scale and no shift (TensorFlow's `center=False`: SimCLR's output layer).

    The shift stays a parameter, fixed at zero: without a gradient no optimiser touches it, and
    SyncBatchNorm's conversion, which copies `weight` and `bias` as they are, keeps it so."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.bias.requires_grad_(False)


def mlp(
    in_dim: int,
    hidden: int,
    out_dim: int,
    num_layers: int = 2,
    last_bn: bool = False,
    last_bn_affine: bool = True,
    hidden_bn: bool = True,
    last_bn_shift: bool = True,
) -> nn.Sequential:
    """Linear-BN-ReLU x (num_layers - 1), then Linear (+ BN if last_bn).

    A Linear followed by BN has no bias (BN's shift makes it redundant). hidden_bn=False gives the
    MoCo v2 head (Linear-ReLU-Linear). The last BN has a scale and a shift, neither (last_bn_affine=False)
    or a scale only (last_bn_shift=False).
    """
    if num_layers < 1:
        raise ValueError(f"mlp: num_layers must be >= 1, found {num_layers}")
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        bn = last_bn if last else hidden_bn
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not bn))
        if bn and last and last_bn_affine and not last_bn_shift:
            layers.append(ScaleOnlyBatchNorm1d(dims[i + 1]))
        elif bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=last_bn_affine if last else True))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


__all__ = ["ScaleOnlyBatchNorm1d", "backbone_names", "build_backbone", "check_arch", "mlp"]
