"""What every method shares: the registry, the view routing of SIM / BSIM / WBSIM, and compilation.

View routing (docs/METHOD.md, "View routing"): the online / query side sees the plain views in SIM, the mixed
views in BSIM and both in WBSIM, in one concatenated forward; the target / key side sees the plain views only.
A method says how views are encoded, what the targets are and what the loss of one direction is; `forward`
does the rest.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn as nn

from bsim_fast.config import METHODS, MODES
from bsim_fast.models import build_backbone, check_arch

if TYPE_CHECKING:
    from bsim_fast.config import Config


def register(name: str):
    """Class decorator: make a Method buildable as `method.name: <name>`."""

    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].__module__}, {cls.__module__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


@dataclass
class NoSettings:
    """For a method without settings of its own."""


def frozen_copy(module: nn.Module) -> nn.Module:
    """A target / key network: a copy that no optimiser step touches (it moves by `ema_update` only)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def ema_rate(base: float, final: float, progress: float) -> float:
    """EMA rate at `progress` in [0, 1] of the run: `base` at the start, cosine to `final` at the end (BYOL's
    schedule; base == final is a constant rate, as MoCo v2's)."""
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: list[nn.Module], rate: float) -> None:
    """target <- rate * target + (1 - rate) * online, parameter by parameter, in one foreach kernel."""
    params = [p for m in online for p in m.parameters()]
    torch._foreach_lerp_(list(target.parameters()), params, 1 - rate)


class Method(nn.Module):
    """Subclasses set `Settings` (their own config keys under `method:`), `networks` (the forwards that
    `compile_networks` compiles) and implement `encode`, `targets` and `pair_loss`, or `forward` itself."""

    name: ClassVar[str]
    Settings: ClassVar[type] = NoSettings
    networks: ClassVar[tuple[str, ...]] = ("encode",)
    # The SIM part's directions: both (a against b's targets, b against a's), or a against b's only if False.
    # The BSIM part always has both: each mixture against the targets of the other view (SPEC §2).
    symmetric: bool = True

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.method.mode not in MODES:
            raise ValueError(f"method.mode: {cfg.method.mode!r} is not one of {', '.join(MODES)}")
        self.settings = cfg.method.settings
        self.mode = cfg.method.mode
        self.weight = cfg.bsim.weight
        check_arch(cfg.model.arch, cfg.where("model.arch"))
        self.backbone, self.feat_dim = build_backbone(cfg.model.arch, cfg.model.cifar_stem)

    def momentum_update(self, progress: float) -> None:
        """Called after every optimiser step; progress in [0, 1] over the run. No-op by default."""

    def _check_views(self, mixed_a, mixed_b) -> None:
        if self.mode not in MODES:
            raise ValueError(f"method.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode != "sim" and (mixed_a is None or mixed_b is None):
            raise ValueError(f"method.mode={self.mode!r} needs mixed_a and mixed_b, got None")

    def _result(self, loss_sim: torch.Tensor | None, loss_bsim: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.mode == "sim":
            return {"loss": loss_sim, "loss_sim": loss_sim.detach()}
        if self.mode == "bsim":
            return {"loss": loss_bsim, "loss_bsim": loss_bsim.detach()}
        return {
            "loss": loss_sim + self.weight * loss_bsim,
            "loss_sim": loss_sim.detach(),
            "loss_bsim": loss_bsim.detach(),
        }

    # BYOL, SimSiam and MoCo share one shape: encode the online views, get targets of the plain views, and
    # add the directions (view ' against the targets of '', and, when symmetric, '' against those of ').
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction / query, projection) of a batch of online views."""
        raise NotImplementedError

    def targets(self, plain_a, plain_b, projections) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(targets of a, targets of b); the targets of a may be None when the method runs one direction."""
        raise NotImplementedError

    def pair_loss(self, out, target, partner, lam) -> torch.Tensor:
        raise NotImplementedError

    def join_directions(self, terms: list[torch.Tensor]) -> torch.Tensor:
        """One part's loss (SIM or BSIM) from its directions' losses: their sum by default (BYOL's symmetrised
        loss; SimSiam's 0.5 per direction is inside its loss)."""
        return sum(terms)

    def after_forward(self, targets) -> None:
        pass

    def forward(self, plain_a, plain_b, mixed_a=None, mixed_b=None, partner=None, lam_a=None, lam_b=None):
        self._check_views(mixed_a, mixed_b)
        k = 2 if self.symmetric else 1  # SIM direction i: plain view i against the targets of view 1 - i
        plain = [] if self.mode == "bsim" else [plain_a, plain_b][:k]
        mixed = [] if self.mode == "sim" else [mixed_a, mixed_b]  # BSIM direction i: mixture i, both always
        views = plain + mixed
        out, proj = self.encode(torch.cat(views))
        out, proj = out.chunk(len(views)), proj.chunk(len(views))
        targets = self.targets(plain_a, plain_b, proj)
        loss_sim = loss_bsim = None
        if plain:
            loss_sim = self.join_directions([self.pair_loss(out[i], targets[1 - i], None, None) for i in range(k)])
        if mixed:
            m, lam = len(plain), (lam_a, lam_b)
            loss_bsim = self.join_directions(
                [self.pair_loss(out[m + i], targets[1 - i], partner, lam[i]) for i in range(2)]
            )
        self.after_forward(targets)
        return self._result(loss_sim, loss_bsim)


def compile_networks(method: Method, **options) -> None:
    """torch.compile each network forward the method lists in `networks`, once each, in place.

    One compiled function per network (online encode, target / key encode) gives each its own code object and
    so its own cache entry: one compile per network and mode, no recompiles. (Compiling child modules with
    `module.compile()` put them all on nn.Module's one `_call_impl` frame, which recompiled for every module
    until torch's recompile limit, then ran eager.) The loss stays eager: gathers and queue updates sit between
    the networks. State-dict keys are unchanged. `options` go to torch.compile (tests pass a CPU backend).
    """
    for name in method.networks:
        setattr(method, name, torch.compile(getattr(method, name), **options))


def build_method(cfg: Config) -> Method:
    METHODS.check(cfg.method.name, cfg.where("method.name"))
    return METHODS[cfg.method.name](cfg)


__all__ = [
    "METHODS",
    "Method",
    "NoSettings",
    "build_method",
    "compile_networks",
    "ema_rate",
    "ema_update",
    "frozen_copy",
    "register",
]
