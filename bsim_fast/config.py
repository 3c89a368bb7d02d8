"""Typed recipes: YAML files validated against dataclasses, with `section.key=value` overrides.

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
from typing import Any, List, Optional, Tuple

import yaml

from .loaders import KINDS as LOADER_KINDS   # the registry module imports no back end (and not torch)


class ConfigError(ValueError):
    """A recipe or an override is wrong; the message is one line."""


class _Loader(yaml.SafeLoader):
    """yaml.safe_load (no object construction) with YAML 1.2 booleans, so `compile: off` stays the string 'off'."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


# YAML 1.2 floats too: PyYAML reads `1e-5` (no dot) as a string, and recipes are full of such numbers
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class MethodCfg:
    name: str = "byol"            # byol | simsiam | moco | simclr
    mode: str = "bsim"            # sim | bsim | wbsim


@dataclass
class BsimCfg:
    alpha: float = 1.0            # Beta(alpha, alpha) for the CutMix box
    weight: float = 1.0           # w in L_SIM + w * L_BSIM (wbsim only)


@dataclass
class ModelCfg:
    arch: str = "resnet50"        # any torchvision resnet
    cifar_stem: bool = False      # 3x3 stride-1 conv1 and no max-pool, for 32x32 images
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096       # BYOL / SimSiam predictor (SimSiam: 512 in the paper)
    sync_bn: bool = True
    tau_base: float = 0.996       # BYOL target EMA, scheduled to 1 with a cosine
    moco_momentum: float = 0.999
    queue_size: int = 65536
    temperature: float = 0.2      # MoCo v2 / SimCLR
    shuffle_bn: bool = True       # MoCo: shuffle the key encoder's batch across ranks (off in one process)


@dataclass
class AugCfg:
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: Tuple[float, float] = (1.0, 0.1)      # per view: (t', t'')
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_p: Tuple[float, float] = (0.0, 0.2)


@dataclass
class DataCfg:
    loader: str = "ffcv"          # ffcv | dali | torch
    train: str = "builtin"        # .beton (ffcv), shard folder (dali), ImageFolder (torch); builtin = bundled set
    val: str = ""                 # held-out split for the k-NN monitor ("" = none)
    image_size: int = 224
    batch_size: int = 256         # global, over all ranks and accumulation steps
    workers: int = 8
    mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)   # 0..255 units
    std: Tuple[float, float, float] = (58.395, 57.12, 57.375)
    dali_hw_decoder_load: float = 0.65
    gpu_resident: bool = False    # small datasets: keep every decoded image on the GPU


@dataclass
class OptimCfg:
    name: str = "lars"            # lars | sgd | adamw
    lr: float = 0.2               # base learning rate for a batch of `lr_batch`
    lr_batch: int = 256           # lr is scaled by batch_size / lr_batch
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.0
    exclude_bias_norm: bool = True   # biases and norm weights: no weight decay, no LARS adaptation
    fixed_predictor_lr: bool = False  # SimSiam: predictor keeps the base lr


@dataclass
class TrainCfg:
    epochs: int = 300
    max_steps: int = 0            # > 0: stop after this many optimiser steps (smoke runs)
    precision: str = "bf16"       # bf16 | fp16 | fp32
    channels_last: bool = True
    compile: str = "auto"         # auto (on with CUDA) | on | off
    accum_steps: int = 1
    seed: int = 0
    out_dir: str = "runs/default"
    ckpt_every_steps: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    knn_every_epochs: int = 10
    knn_k: int = 200
    knn_t: float = 0.07
    nan_policy: str = "stop"      # stop | skip
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


CHOICES = {
    ("method", "name"): ("byol", "simsiam", "moco", "simclr"),
    ("method", "mode"): ("sim", "bsim", "wbsim"),
    ("data", "loader"): LOADER_KINDS,     # the loader registry, bsim_fast/loaders/__init__.py
    ("optim", "name"): ("lars", "sgd", "adamw"),
    ("train", "precision"): ("bf16", "fp16", "fp32"),
    ("train", "compile"): ("auto", "on", "off"),
    ("train", "nan_policy"): ("stop", "skip"),
}
POSITIVE = {("data", "image_size"), ("data", "batch_size"), ("train", "epochs"), ("train", "accum_steps"),
            ("train", "ckpt_every_steps"), ("train", "log_every"), ("model", "proj_dim"),
            ("model", "proj_hidden"), ("model", "pred_hidden"), ("model", "queue_size"),
            ("train", "keep_checkpoints"), ("train", "knn_k")}
NON_NEGATIVE = {("data", "workers"), ("train", "max_steps"), ("train", "knn_every_epochs"),
                ("optim", "lr"), ("optim", "weight_decay"), ("optim", "warmup_epochs"), ("bsim", "weight")}


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
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, found {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list, List):
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


def _apply(cfg: Config, data: Any, source: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, found {type(data).__name__}")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for sec_name, sec_val in data.items():
        if sec_name not in sections:
            raise ConfigError(f"{source}: unknown section '{sec_name}' (known: {', '.join(sections)})")
        if not isinstance(sec_val, dict):
            raise ConfigError(f"{source}: section '{sec_name}' must be a mapping, found {sec_val!r}")
        section = getattr(cfg, sec_name)
        hints = typing.get_type_hints(type(section))
        for key, val in sec_val.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key '{sec_name}.{key}'")
            setattr(section, key, _coerce(val, hints[key], f"{source}: {sec_name}.{key}"))


def _validate(cfg: Config, source: str) -> None:
    for (sec, key), allowed in CHOICES.items():
        val = getattr(getattr(cfg, sec), key)
        if val not in allowed:
            raise ConfigError(f"{source}: {sec}.{key} = {val!r} is not one of {', '.join(allowed)}")
    for sec, key in POSITIVE:
        val = getattr(getattr(cfg, sec), key)
        if val <= 0:
            raise ConfigError(f"{source}: {sec}.{key} must be > 0, found {val!r}")
    for sec, key in NON_NEGATIVE:
        val = getattr(getattr(cfg, sec), key)
        if val < 0:
            raise ConfigError(f"{source}: {sec}.{key} must be >= 0, found {val!r}")
    lo, hi = cfg.aug.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"{source}: aug.crop_scale must satisfy 0 < lo <= hi <= 1, found {cfg.aug.crop_scale!r}")
    if cfg.bsim.alpha <= 0:
        raise ConfigError(f"{source}: bsim.alpha must be > 0, found {cfg.bsim.alpha!r}")
    for name in ("flip_p", "jitter_p", "gray_p"):
        if not 0 <= getattr(cfg.aug, name) <= 1:
            raise ConfigError(f"{source}: aug.{name} must be in [0, 1], found {getattr(cfg.aug, name)!r}")
    for name in ("blur_p", "solarize_p"):
        if not all(0 <= p <= 1 for p in getattr(cfg.aug, name)):
            raise ConfigError(f"{source}: aug.{name} must be in [0, 1], found {getattr(cfg.aug, name)!r}")


def parse_override(text: str) -> Tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value parsed as YAML, so 0.1 is a float and [1,2] a list)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    sec, key = path.strip().split(".", 1)
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return sec, key, value


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> Config:
    cfg = Config()
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = _yaml(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
        _apply(cfg, data, source)
    for text in overrides or []:
        sec, key, value = parse_override(text)
        _apply(cfg, {sec: {key: value}}, f"override {text!r}")
    _validate(cfg, source if not overrides else f"{source} (with overrides)")
    return cfg


def to_dict(cfg: Config) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return {f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
            for f in dataclasses.fields(cfg)}


def from_dict(data: dict, source: str = "checkpoint") -> Config:
    cfg = Config()
    _apply(cfg, data, source)
    _validate(cfg, source)
    return cfg
