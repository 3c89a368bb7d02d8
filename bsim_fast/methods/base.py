"""What every method shares: the registry, the view routing of SIM / BSIM / WBSIM, and compilation.

View routing (docs/METHOD.md, "View routing"): the online / query side sees the plain views in SIM, the mixed
views in BSIM and both in WBSIM, in one forward; the target / key side sees the plain views only. The views
arrive as one batch in `view_order()` (`mix.make_views` writes them so), so each forward reads a slice of it.
A method says how views are encoded, what the targets are and what the loss of one direction is; `objective`
does the rest, and is what `compile_networks` compiles.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn as nn

from bsim_fast.config import METHODS, MODES
from bsim_fast.mix import view_order
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
    """Subclasses set `Settings` (their own config keys under `method:`) and implement `encode`, `targets`
    and `pair_loss`, or `objective` itself; `compile_networks` compiles `objective` (networks and loss)."""

    name: ClassVar[str]
    Settings: ClassVar[type] = NoSettings
    # The SIM part's directions: both (a against b's targets, b against a's), or a against b's only if False.
    # The BSIM part always has both: each mixture against the targets of the other view (SPEC §2).
    symmetric: bool = True
    # Updates of state that a forward computes but that wait for `apply_held_updates` (MoCo's enqueue) while
    # `hold_updates` is set: the training step sets it, so that a skipped step changes nothing and the
    # compiled backward never reads a buffer that was overwritten after its forward.
    hold_updates: bool = False

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.method.mode not in MODES:
            raise ValueError(f"method.mode: {cfg.method.mode!r} is not one of {', '.join(MODES)}")
        self.settings = cfg.method.settings
        self.mode = cfg.method.mode
        self.weight = cfg.bsim.weight
        check_arch(cfg.model.arch, cfg.where("model.arch"))
        self.backbone, self.feat_dim = build_backbone(cfg.model.arch, cfg.model.cifar_stem)
        self._held: list[Callable[[], None]] = []

    def momentum_update(self, progress: float) -> None:
        """Called after every optimiser step; progress in [0, 1] over the run. No-op by default."""

    # ---- the views: one batch, each network reads a slice of it
    def view_order(self) -> tuple[str, ...]:
        """The order of the views in the step's one batch (`mix.make_views(..., order=)` writes them so):
        what each forward reads (`online_views`, the targets' plain views) is then one slice, no copy."""
        return view_order(self.mode)

    def online_views(self) -> tuple[str, ...]:
        """What the online / query network sees, in this order: the SIM part's plain views (a, or a and b),
        then the BSIM part's mixtures (m', m''). Consecutive in `view_order()`."""
        plain = () if self.mode == "bsim" else ("plain_a", "plain_b")[: 2 if self.symmetric else 1]
        return plain + (() if self.mode == "sim" else ("mixed_a", "mixed_b"))

    def span(self, views: torch.Tensor, *names: str) -> torch.Tensor:
        """The rows of `views` (the step's batch in `view_order()`) that hold `names`: a slice, no copy."""
        order = self.view_order()
        first = order.index(names[0])
        if order[first : first + len(names)] != names:
            raise ValueError(f"{type(self).__name__}: views {names} are not consecutive in {order}")
        n = views.shape[0] // len(order)
        return views[first * n : (first + len(names)) * n]

    def _batch(self, named: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """For callers that hand the views one by one: the step's batch, by one copy."""
        if self.mode != "sim" and (named["mixed_a"] is None or named["mixed_b"] is None):
            raise ValueError(f"method.mode={self.mode!r} needs mixed_a and mixed_b, got None")
        return torch.cat([named[k] for k in self.view_order()])

    # BYOL, SimSiam and MoCo share one shape: encode the online views, get targets of the plain views, and
    # add the directions (view ' against the targets of '', and, when symmetric, '' against those of ').
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction / query, projection) of a batch of online views."""
        raise NotImplementedError

    def targets(self, views, projections) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(targets of a, targets of b) from the step's batch `views` (`span` reads its plain views); the
        targets of a may be None when the method runs one direction."""
        raise NotImplementedError

    def pair_loss(self, out, target, partner, lam) -> torch.Tensor:
        raise NotImplementedError

    def join_directions(self, terms: list[torch.Tensor]) -> torch.Tensor:
        """One part's loss (SIM or BSIM) from its directions' losses: their sum by default (BYOL's symmetrised
        loss; SimSiam's 0.5 per direction is inside its loss)."""
        return sum(terms)

    def after_forward(self, targets) -> None:
        """State updates from the targets (MoCo's enqueue), outside `objective`; `hold` them while
        `hold_updates` is set."""

    def hold(self, update: Callable[[], None]) -> None:
        if self.hold_updates:
            self._held.append(update)
        else:
            update()

    def apply_held_updates(self) -> None:
        held, self._held = self._held, []
        for update in held:
            update()

    def drop_held_updates(self) -> None:
        self._held = []

    def objective(self, views, partner=None, lam_a=None, lam_b=None):
        """(result, targets) from the step's batch: the networks and the loss, compiled as one graph per mode
        (`compile_networks`). `result` as `forward` returns it."""
        online = self.online_views()
        out, proj = self.encode(self.span(views, *online))
        out, proj = out.chunk(len(online)), proj.chunk(len(online))
        targets = self.targets(views, proj)
        k = sum(name.startswith("plain") for name in online)  # SIM direction i: plain view i vs targets 1 - i
        loss_sim = loss_bsim = None
        if k:
            loss_sim = self.join_directions([self.pair_loss(out[i], targets[1 - i], None, None) for i in range(k)])
        if self.mode != "sim":  # BSIM direction i: mixture i against the targets of view 1 - i, both always
            lam = (lam_a, lam_b)
            loss_bsim = self.join_directions(
                [self.pair_loss(out[k + i], targets[1 - i], partner, lam[i]) for i in range(2)]
            )
        # detached: a target with gradient (SimSiam's) as an output would make the backward fill it a zero gradient
        return self._result(loss_sim, loss_bsim, lam_a), tuple(t if t is None else t.detach() for t in targets)

    def _result(self, loss_sim, loss_bsim, lam_a) -> dict[str, torch.Tensor]:
        """`loss` and detached `loss_sim` / `loss_bsim`, and `record`: what this micro-batch adds to the
        training step's running log sums, [loss (0 if not finite), mean λ' (1 in SIM), 1 if the loss is not
        finite, 1], made here so that the step adds it in one operation."""
        if self.mode == "sim":
            loss, result = loss_sim, {"loss_sim": loss_sim.detach()}
        elif self.mode == "bsim":
            loss, result = loss_bsim, {"loss_bsim": loss_bsim.detach()}
        else:
            loss = loss_sim + self.weight * loss_bsim
            result = {"loss_sim": loss_sim.detach(), "loss_bsim": loss_bsim.detach()}
        value = loss.detach().float()
        lam = value.new_ones(()) if lam_a is None else lam_a.float().mean()
        nonfinite = (~torch.isfinite(value)).float()
        record = torch.stack([value.nan_to_num(0.0), lam, nonfinite, torch.ones_like(value)])
        return {"loss": loss, **result, "record": record}

    def forward(
        self, plain_a=None, plain_b=None, mixed_a=None, mixed_b=None, partner=None, lam_a=None, lam_b=None, views=None
    ):
        """The loss of one batch: `views` (the step's batch in `view_order()`, `mix.make_views`) or the views
        one by one (then copied into one batch). Returns `loss`, detached `loss_sim` / `loss_bsim` and
        `record` (`_result`)."""
        if views is None:
            views = self._batch(dict(plain_a=plain_a, plain_b=plain_b, mixed_a=mixed_a, mixed_b=mixed_b))
        elif views.shape[0] % len(self.view_order()):
            raise ValueError(f"views: {views.shape[0]} rows are not {len(self.view_order())} views of one batch")
        result, targets = self.objective(views, partner, lam_a, lam_b)
        self.after_forward(targets)
        return result


def compile_networks(method: Method, **options) -> None:
    """torch.compile the method's `objective` (its networks and its loss), in place: one graph per mode, no
    graph break in one process, no recompile after the first step (`tests/test_compile.py`).

    Over several processes the collectives between the networks (SimCLR's gather, MoCo's ShuffleBN and
    enqueue) run eagerly: they are `torch.compiler.disable`d in `dist.py`, where dynamo splits the graph.
    State-dict keys are unchanged. `options` go to torch.compile (tests pass a CPU backend).
    """
    method.objective = torch.compile(method.objective, **options)


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
