"""Typed recipes: YAML files validated against dataclasses, with `section.key=value` overrides.

A recipe names its bases (`base: [...]`, relative to the file) and holds only its differences from them
(docs/RECIPES.md). Each field carries its allowed values beside it (`setting(default, ge=0, ...)`); `method:`
holds the name, the mode and the named method's own settings, which the method declares in its module.
Every error is a `ConfigError` whose message is one line naming the file, the key and the value, because
a typo in a recipe must never silently fall back to a default on a multi-day run.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .loaders import KINDS as LOADER_KINDS  # the registry module imports no back end (and not torch)


class ConfigError(ValueError):
    """A recipe or an override is wrong; the message is one line."""


class _Loader(yaml.SafeLoader):
    """yaml.safe_load (no object construction) with YAML 1.2 booleans, so `compile: off` stays the string 'off'."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


# YAML 1.2 floats too: PyYAML reads `1e-5` (no dot) as a string, and recipes are full of such numbers
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _no_duplicate_keys(loader, node, deep=False):
    """A key written twice in one mapping is refused: YAML would silently keep the last one."""
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first on line {seen[key] + 1})"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


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
    asks a tuple to be non-decreasing (a range), `choices` is a tuple or a function returning one (for names
    that live in a registry elsewhere)."""
    rules = dict(choices=choices, gt=gt, ge=ge, lt=lt, le=le, ordered=ordered)
    return field(default=default, metadata={k: v for k, v in rules.items() if v is not None and v is not False})


def choices(section: str, key: str) -> tuple[str, ...]:
    """The allowed values of a key with a fixed set, e.g. `choices("data", "loader")`, from its field's rule."""
    section_cls = {f.name: f.default_factory for f in dataclasses.fields(Config)}[section]
    allowed = {f.name: f.metadata for f in dataclasses.fields(section_cls)}[key]["choices"]
    return tuple(allowed() if callable(allowed) else allowed)


def method_names() -> tuple[str, ...]:
    from .methods import METHODS  # imported when needed: the methods import this module

    return tuple(METHODS)


def arch_names() -> tuple[str, ...]:
    from .models import backbone_names

    return backbone_names()


@dataclass(eq=False)
class MethodCfg:
    """`method:` holds the name, the mode and the named method's own settings, which each method declares
    beside its code (a `Settings` dataclass, e.g. in bsim_fast/methods/moco.py) with defaults and ranges."""

    name: str = setting("byol", choices=method_names)
    mode: str = setting("bsim", choices=MODES)
    _settings: dict = field(default_factory=dict, repr=False)

    @property
    def settings(self) -> Any:
        """The named method's settings: its defaults until a recipe or the caller sets them."""
        if self.name not in self._settings:
            from .methods import METHODS

            if self.name not in METHODS:
                raise ConfigError(f"method.name = {self.name!r} is not one of {', '.join(METHODS)}")
            self._settings[self.name] = METHODS[self.name].Settings()
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

    arch: str = setting("resnet50", choices=arch_names)
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
    loader: str = setting("ffcv", choices=LOADER_KINDS)  # the registry in bsim_fast/loaders/__init__.py
    train: str = "builtin"  # .beton (ffcv), shard folder (dali), ImageFolder (torch); builtin = bundled set
    val: str = ""  # held-out split for the k-NN monitor ("" = none)
    image_size: int = setting(224, ge=8)  # below 8 px a CutMix box is a pixel or two
    batch_size: int = setting(256, gt=0)  # global, over all ranks and accumulation steps
    workers: int = setting(8, ge=0)
    mean: tuple[float, float, float] = setting((123.675, 116.28, 103.53), ge=0, le=255)  # 0..255 units
    std: tuple[float, float, float] = setting((58.395, 57.12, 57.375), gt=0)
    dali_hw_decoder_load: float = setting(0.65, ge=0, le=1)
    gpu_resident: bool = False  # small datasets: keep every decoded image on the GPU


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


@dataclass
class Config:
    method: MethodCfg = field(default_factory=MethodCfg)
    bsim: BsimCfg = field(default_factory=BsimCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    aug: AugCfg = field(default_factory=AugCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)

    @property
    def recipe(self) -> str:
        return self.method.name if self.method.mode == "sim" else f"{self.method.name}_{self.method.mode}"


# keys that moved out of `model:` when each method took its own settings; named in the unknown-key error
MOVED = {
    "model.tau_base": "method.tau_base",
    "model.moco_momentum": "method.tau_base and method.tau_final",
    "model.temperature": "method.temperature",
    "model.shuffle_bn": "method.shuffle_bn",
}


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
    if origin in (tuple, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, found {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list, list):
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
        self.default_source = default_source
        self.origin = {}  # "section.key" -> where it was last set
        self.method_settings = []  # (key, value, where): resolved once the method's name is final

    def apply(self, data: Any, source: str) -> None:
        if data is None:
            return
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, found {type(data).__name__}")
        sections = {f.name for f in dataclasses.fields(self.cfg)}
        for sec_name, sec_val in data.items():
            if sec_name not in sections:
                raise ConfigError(f"{source}: unknown section '{sec_name}' (known: {', '.join(sections)})")
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

    def _where(self, key: str) -> str:
        return self.origin.get(key, self.default_source)

    def finish(self) -> Config:
        method = self.cfg.method
        _check(method, "method", self._where)  # the name first: the settings depend on it
        settings = method.settings
        hints = typing.get_type_hints(type(settings))
        for key, val, source in self.method_settings:
            if key not in hints:
                known = ", ".join(["name", "mode", *hints])
                raise ConfigError(f"{source}: method.{key} is not a setting of {method.name} (known: {known})")
            setattr(settings, key, _coerce(val, hints[key], f"{source}: method.{key}"))
            self.origin[f"method.{key}"] = source
        _check(settings, "method", self._where)
        for f in dataclasses.fields(self.cfg):
            if f.name != "method":
                _check(getattr(self.cfg, f.name), f.name, self._where)
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
            allowed = rules["choices"]() if callable(rules["choices"]) else rules["choices"]
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
    except ConfigError as e:
        raise ConfigError(f"override {text!r}: {e}") from None
    return sec, key, value


def _read_yaml(path: Path, where: str) -> Any:
    try:
        return _yaml(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
    except ConfigError as e:
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
        base = path.parent / name
        if not base.is_file():
            raise ConfigError(f"{path}: base {name!r} not found ({base})")
        layers += _recipe_layers(base, (*chain, resolved))
    return layers + [(data, str(path))]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A recipe (its bases first) and `section.key=value` overrides, checked; every error is one line."""
    builder = _Builder("defaults")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        builder.default_source = str(p)
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

    out = {f.name: section(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    out["method"].update(section(cfg.method.settings))
    return out


def from_dict(data: dict, source: str = "checkpoint") -> Config:
    builder = _Builder(source)
    builder.apply(data, source)
    return builder.finish()
