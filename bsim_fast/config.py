"""Typed recipes: YAML files validated against dataclasses, with `section.key=value` overrides.

A recipe names its bases (`base: [...]`, relative to the file) and holds only its differences from them
(docs/RECIPES.md). Each field carries its allowed values beside it (`setting(default, ge=0, ...)`); `method:`
holds the name, the mode and the named method's own settings, which the method declares in its module.
Every error is a `ConfigError` whose message is one line naming the file, the key and the value, because
a typo in a recipe must never silently fall back to a default on a multi-day run.

This is the ground floor: it imports nothing of the project but the YAML dialect of recipes (`yaml12.py`).
Names that live in a registry are checked by that registry against `cfg.where(key)` (the file or override that
set the key): the methods register themselves in `METHODS` below (their settings are part of the recipe),
`data.loader` is checked by the loader registry (bsim_fast/loaders/registry.py) and `model.arch` by
bsim_fast/models.py, where each is resolved and in the trainer's check before any work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .yaml12 import DuplicateKeyError
from .yaml12 import load as _yaml


class ConfigError(ValueError):
    """A recipe or an override is wrong; the message is one line."""


MODES = ("sim", "bsim", "wbsim")  # which views the online side sees in each: docs/METHOD.md
INTERPOLATIONS = ("bicubic", "bilinear")  # the crops' resize filters, aug.interpolation (loaders/resize.py)


def setting(
    default: Any,
    *,
    choices: Any = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    ordered: bool = False,
) -> Any:
    """A config field with its allowed values beside it: bounds apply to every element of a tuple, `ordered`
    asks a tuple to be non-decreasing (a range), `choices` is a tuple of names (names that live in a registry
    are checked by the registry instead)."""
    rules = dict(choices=choices, gt=gt, ge=ge, lt=lt, le=le, ordered=ordered)
    return field(default=default, metadata={k: v for k, v in rules.items() if v is not None and v is not False})


class Registry(dict):
    """The names a config key may take, each with what it stands for, filled by the modules that own them;
    `check` refuses any other name in one line naming the file or override that set it."""

    def __init__(self, key: str, owner: str):
        super().__init__()
        self.key, self.owner = key, owner

    def check(self, name: str, where: str) -> None:
        if name not in self:
            known = ", ".join(self) or f"none registered yet: import {self.owner}, whose modules register them"
            raise ConfigError(f"{where}: {self.key} = {name!r} is not one of {known}")


# Filled by `@register` in bsim_fast/methods/base.py as each method's module is imported (importing
# bsim_fast.methods imports them all); config reads it for the named method's settings.
METHODS = Registry("method.name", "bsim_fast.methods")


@dataclass(eq=False)
class MethodCfg:
    """`method:` holds the name, the mode and the named method's own settings, which each method declares
    beside its code (a `Settings` dataclass, e.g. in bsim_fast/methods/moco.py) with defaults and ranges."""

    name: str = "byol"  # a key of METHODS
    mode: str = setting("bsim", choices=MODES)
    _settings: dict = field(default_factory=dict, repr=False)
    # (name, [(key, value, source)], origin): what the recipe set for the method it named. Resolved when the
    # recipe is loaded, or, if no method was registered yet then, on first use (`settings`).
    _given: tuple = field(default_factory=lambda: ("", [], {}), repr=False)

    @property
    def settings(self) -> Any:
        """The named method's settings: its defaults, with what the recipe set, until the caller sets them."""
        if self.name not in self._settings:
            name, given, origin = self._given
            self._settings[self.name] = method_settings(self.name, given if name == self.name else [], origin)
        return self._settings[self.name]

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, MethodCfg)
            and (self.name, self.mode) == (other.name, other.mode)
            and self.settings == other.settings
        )


@dataclass
class BsimCfg:
    alpha: float = setting(1.0, gt=0)  # lambda0 ~ Beta(alpha, alpha) for the CutMix box
    weight: float = setting(1.0, ge=0)  # w in L_SIM + w * L_BSIM (wbsim only)


@dataclass
class ModelCfg:
    """The networks' shapes (what a checkpoint's tensors depend on); method settings live in `method:`."""

    arch: str = "resnet50"  # a torchvision ResNet (models.check_arch)
    cifar_stem: bool = False  # 3x3 stride-1 conv1 and no max-pool, for 32x32 images
    proj_hidden: int = setting(4096, gt=0)
    proj_dim: int = setting(256, gt=0)
    pred_hidden: int = setting(4096, gt=0)  # predictor width, for the methods with one (BYOL, SimSiam)
    sync_bn: bool = True
    queue_size: int = setting(65536, gt=0)  # MoCo's queue of keys (a buffer of the model)


@dataclass
class AugCfg:
    crop_scale: tuple[float, float] = setting((0.08, 1.0), gt=0, le=1, ordered=True)
    crop_ratio: tuple[float, float] = setting((3 / 4, 4 / 3), gt=0, ordered=True)
    # the crops' resize filter in every loader (bsim_fast/loaders/resize.py): solo-learn's and the TensorFlow
    # papers' bicubic, or torchvision's default bilinear (MoCo v2, SimSiam)
    interpolation: str = setting("bicubic", choices=INTERPOLATIONS)
    flip_p: float = setting(0.5, ge=0, le=1)
    jitter_p: float = setting(0.8, ge=0, le=1)
    brightness: float = setting(0.4, ge=0)  # torchvision's ColorJitter ranges
    contrast: float = setting(0.4, ge=0)
    saturation: float = setting(0.2, ge=0)
    hue: float = setting(0.1, ge=0, le=0.5)
    gray_p: float = setting(0.2, ge=0, le=1)
    blur_p: tuple[float, float] = setting((1.0, 0.1), ge=0, le=1)  # per view: (t', t'')
    blur_sigma: tuple[float, float] = setting((0.1, 2.0), gt=0, ordered=True)
    solarize_p: tuple[float, float] = setting((0.0, 0.2), ge=0, le=1)


@dataclass
class DataCfg:
    loader: str = "ffcv"  # a kind of the loader registry (bsim_fast/loaders/registry.py)
    train: str = "builtin"  # .beton (ffcv), shard folder (dali), ImageFolder (torch); builtin = bundled set
    val: str = ""  # held-out split for the k-NN monitor ("" = none)
    image_size: int = setting(224, ge=8)  # below 8 px a CutMix box is a pixel or two
    batch_size: int = setting(256, gt=0)  # global, over all ranks and accumulation steps
    workers: int = setting(8, ge=0)
    mean: tuple[float, float, float] = setting((123.675, 116.28, 103.53), ge=0, le=255)  # 0..255 units
    std: tuple[float, float, float] = setting((58.395, 57.12, 57.375), gt=0)
    dali_hw_decoder_load: float = setting(0.65, ge=0, le=1)


@dataclass
class OptimCfg:
    name: str = setting("lars", choices=("lars", "sgd", "adamw"))
    lr: float = setting(0.2, ge=0)  # base learning rate for a batch of `lr_batch`
    lr_batch: int = setting(256, gt=0)  # lr is scaled by batch_size / lr_batch
    weight_decay: float = setting(1.5e-6, ge=0)
    momentum: float = setting(0.9, ge=0, lt=1)
    betas: tuple[float, float] = setting((0.9, 0.999), ge=0, lt=1)
    warmup_epochs: float = setting(10.0, ge=0)
    min_lr_ratio: float = setting(0.0, ge=0, le=1)
    exclude_bias_norm: bool = True  # biases and norm weights: no weight decay, no LARS adaptation
    fixed_predictor_lr: bool = False  # SimSiam: predictor keeps the base lr
    trust_coefficient: float = setting(0.001, gt=0)  # LARS: eta in eta * |w| / (|g| + wd |w|)
    clip_lr: bool = False  # LARS: the adapted lr never exceeds the scheduled one (LARC clipping)


@dataclass
class TrainCfg:
    epochs: int = setting(300, gt=0)
    max_steps: int = setting(0, ge=0)  # > 0: stop after this many optimiser steps (smoke runs)
    precision: str = setting("bf16", choices=("bf16", "fp16", "fp32"))
    channels_last: bool = True
    compile: str = setting("auto", choices=("auto", "on", "off"))  # auto: on with CUDA
    accum_steps: int = setting(1, gt=0)
    seed: int = 0
    out_dir: str = "runs/default"
    ckpt_every_steps: int = setting(500, gt=0)
    keep_checkpoints: int = setting(2, gt=0)
    log_every: int = setting(20, gt=0)
    knn_every_epochs: int = setting(10, ge=0)
    knn_k: int = setting(200, gt=0)
    knn_t: float = setting(0.07, gt=0)
    nan_policy: str = setting("stop", choices=("stop", "skip"))
    tensorboard: bool = True
    image_every_steps: int = setting(0, ge=0)  # > 0: the views grid to TensorBoard at these steps (0 = off)
    wandb: str = ""  # a W&B project that syncs the TensorBoard logs (empty = off; records.check_wandb)


@dataclass
class Config:
    method: MethodCfg = field(default_factory=MethodCfg)
    bsim: BsimCfg = field(default_factory=BsimCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    aug: AugCfg = field(default_factory=AugCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    # "section.key" -> the file or override that set it ("*": where the unset keys' defaults were taken)
    _origin: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def recipe(self) -> str:
        return self.method.name if self.method.mode == "sim" else f"{self.method.name}_{self.method.mode}"

    def where(self, key: str) -> str:
        """The file or override that set `key` ("section.key"), for a one-line error about its value."""
        return where_in(self._origin, key)


def where_in(origin: dict, key: str) -> str:
    return origin.get(key) or origin.get("*", "config")


def method_settings(name: str, given: list, origin: dict) -> Any:
    """The `Settings` of method `name` with the values a recipe gave ((key, value, source) each), checked
    against the rules beside them; every error names the file or override."""
    METHODS.check(name, where_in(origin, "method.name"))
    settings = METHODS[name].Settings()
    hints = typing.get_type_hints(type(settings))
    for key, val, source in given:
        if key not in hints:
            known = ", ".join(["name", "mode", *hints])
            raise ConfigError(f"{source}: method.{key} is not a setting of {name} (known: {known})")
        setattr(settings, key, _coerce(val, hints[key], f"{source}: method.{key}"))
        origin[f"method.{key}"] = source
    _check(settings, "method", lambda key: where_in(origin, key))
    return settings


def sections(cfg: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg) if not f.name.startswith("_")]


# keys that moved; named in the unknown-key error (model.* when each method took its own settings)
MOVED = {
    "model.tau_base": "method.tau_base",
    "model.moco_momentum": "method.tau_base and method.tau_final",
    "model.temperature": "method.temperature",
    "model.shuffle_bn": "method.shuffle_bn",
}


def upgrade(data: dict, source: str = "checkpoint") -> dict:
    """A config mapping (a recipe layer, a checkpoint's config) in today's keys: `data.gpu_resident: true`, the
    old switch for the GPU-resident loader, is read as `data.loader: gpu_resident` (false: the key is dropped)."""
    section = data.get("data") if isinstance(data, dict) else None
    if not (isinstance(section, dict) and "gpu_resident" in section):
        return data
    on = _coerce(section["gpu_resident"], bool, f"{source}: data.gpu_resident")
    section = {k: v for k, v in section.items() if k != "gpu_resident"} | ({"loader": "gpu_resident"} if on else {})
    return {**data, "data": section}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, found {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, found {value!r}")
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, found {type(value).__name__} {value!r}")


class _Builder:
    """Applies layers (bases, recipe, overrides, or a checkpoint's dict) to a Config, remembering which layer
    set each key so that a bad value is reported against the file or override it came from."""

    def __init__(self, default_source: str):
        self.cfg = Config()
        self.origin = self.cfg._origin  # "section.key" -> where it was last set
        self.origin["*"] = default_source
        self.method_settings = []  # (key, value, where): resolved once the method's name is final

    def apply(self, data: Any, source: str) -> None:
        if data is None:
            return
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, found {type(data).__name__}")
        known = sections(self.cfg)
        for sec_name, sec_val in upgrade(data, source).items():
            if sec_name not in known:
                raise ConfigError(f"{source}: unknown section '{sec_name}' (known: {', '.join(known)})")
            if not isinstance(sec_val, dict):
                raise ConfigError(f"{source}: section '{sec_name}' must be a mapping, found {sec_val!r}")
            section = getattr(self.cfg, sec_name)
            hints = {k: tp for k, tp in typing.get_type_hints(type(section)).items() if not k.startswith("_")}
            for key, val in sec_val.items():
                if sec_name == "method" and key not in hints:
                    self.method_settings.append((key, val, source))
                    continue
                if key not in hints:
                    moved = MOVED.get(f"{sec_name}.{key}")
                    raise ConfigError(
                        f"{source}: unknown key '{sec_name}.{key}'" + (f" (now {moved})" if moved else "")
                    )
                setattr(section, key, _coerce(val, hints[key], f"{source}: {sec_name}.{key}"))
                self.origin[f"{sec_name}.{key}"] = source

    def finish(self) -> Config:
        method = self.cfg.method
        _check(method, "method", self.cfg.where)
        method._given = (method.name, self.method_settings, self.origin)
        if METHODS:  # the methods are registered (every entry point imports them): checked now, before any work
            method.settings  # noqa: B018 - resolving the settings checks them
        for name in sections(self.cfg):
            if name != "method":
                _check(getattr(self.cfg, name), name, self.cfg.where)
        return self.cfg


def _describe(rules: dict) -> str:
    lo, hi = ("ge", "gt"), ("le", "lt")
    low = next(((k, rules[k]) for k in lo if k in rules), None)
    high = next(((k, rules[k]) for k in hi if k in rules), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == 'le' else ')'}"
    k, v = low or high
    return f"{dict(ge='>=', gt='>', le='<=', lt='<')[k]} {v:g}"


def _check(section: Any, prefix: str, where) -> None:
    """Every field against the rules `setting(...)` put beside it; the message names the key, the value and
    the file or override that set it."""
    tests = dict(gt=lambda v, b: v > b, ge=lambda v, b: v >= b, lt=lambda v, b: v < b, le=lambda v, b: v <= b)
    for f in dataclasses.fields(section):
        rules = f.metadata
        if not rules:
            continue
        key = f"{prefix}.{f.name}"
        value = getattr(section, f.name)
        if "choices" in rules:
            allowed = rules["choices"]
            if value not in allowed:
                raise ConfigError(f"{where(key)}: {key} = {value!r} is not one of {', '.join(allowed)}")
        values = value if isinstance(value, tuple) else (value,)
        bounds = {k: b for k, b in rules.items() if k in tests}
        if not all(tests[k](v, b) for v in values for k, b in bounds.items()):
            what = "every element " if isinstance(value, tuple) else ""
            raise ConfigError(
                f"{where(key)}: {key} must have {what}{_describe(bounds)}, found {value!r}"
                if what
                else f"{where(key)}: {key} must be {_describe(bounds)}, found {value!r}"
            )
        if rules.get("ordered") and list(values) != sorted(values):
            raise ConfigError(f"{where(key)}: {key} must be (low, high) with low <= high, found {value!r}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value parsed as YAML, so 0.1 is a float and [1,2] a list)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    sec, key = path.strip().split(".", 1)
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except DuplicateKeyError as e:
        raise ConfigError(f"override {text!r}: {e}") from None
    return sec, key, value


def _read_yaml(path: Path, where: str) -> Any:
    try:
        return _yaml(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
    except DuplicateKeyError as e:
        raise ConfigError(f"{where}: {e}") from None


def _recipe_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """A recipe as (mapping, file) layers, its bases first: `base: FILE` or `base: [FILE, ...]`, each path
    relative to the file that names it. Later layers override earlier ones key by key, so a recipe holds only
    its differences from its bases."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(resolved) :], resolved))
        raise ConfigError(f"{path}: base files form a cycle: {cycle}")
    data = _read_yaml(path, str(path))
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, found {type(data).__name__}")
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base must be a file name or a list of file names, found {bases!r}")
    layers = []
    for name in bases:
        layers += _recipe_layers(_base_path(path, name), (*chain, resolved))
    return layers + [(data, str(path))]


def _base_path(recipe: Path, name: str) -> Path:
    """A base `recipe` names: beside it, or, for a copy of a shipped recipe kept elsewhere, the shipped file of
    that name (`../_base/cifar.yaml` -> configs/_base/cifar.yaml); a name that two shipped files answer to
    (`byol.yaml`: in configs/ and in configs/small/) is refused, naming both, never guessed."""
    beside = recipe.parent / name
    relative = [part for part in Path(name).parts if part != ".."]
    root = recipes_root()
    shipped = [d.joinpath(*relative) for d in (root, *sorted(root.glob("*/")))] if relative else []
    shipped = [f for f in shipped if f.is_file()]
    if beside.is_file() or not shipped:
        if not beside.is_file():
            raise ConfigError(f"{recipe}: base {name!r} not found ({beside})")
        return beside
    if len(shipped) > 1:
        named = ", ".join(f.relative_to(root).as_posix() for f in shipped)
        raise ConfigError(f"{recipe}: base {name!r} is not beside it and names several shipped files ({named})")
    return shipped[0]


BASES = "_base"  # the folder of fragments (a scale, an augmentation policy) that recipes build on


def recipes_root() -> Path:
    """The shipped recipes: bsim_fast/configs/ in an installed package, configs/ beside the package in a clone."""
    here = Path(__file__).resolve().parent
    return here / "configs" if (here / "configs").is_dir() else here.parent / "configs"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A recipe (its bases first) and `section.key=value` overrides, checked; every error is one line."""
    builder = _Builder("defaults")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        builder.origin["*"] = str(p)
        for data, where in _recipe_layers(p):
            builder.apply(data, where)
    for text in overrides or []:
        sec, key, value = parse_override(text)
        builder.apply({sec: {key: value}}, f"override {text!r}")
    return builder.finish()


def to_dict(cfg: Config) -> dict:
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, tuple) else v

    def section(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.name.startswith("_")}

    out = {name: section(getattr(cfg, name)) for name in sections(cfg)}
    out["method"].update(section(cfg.method.settings))
    return out


def from_dict(data: dict, source: str = "checkpoint") -> Config:
    builder = _Builder(source)
    builder.apply(data, source)
    return builder.finish()
