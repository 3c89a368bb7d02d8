"""Recipes by name or by path: what every entry point that takes a recipe calls (`bsim_fast.train --config`,
scripts/train_8gpu.sh through it, the speedrun's `--recipe`, the benchmark).

    recipe_path("small/byol")               # configs/small/byol.yaml (bsim_fast/configs/ when installed)
    recipe_path("configs/small/byol.yaml")  # a file: as given, or one's own copy anywhere
    recipe_path("_base/cifar")              # ConfigError: a fragment that recipes build on, not a recipe
"""

from __future__ import annotations

from pathlib import Path

from .config import BASES, ConfigError, _recipe_layers, recipes_root


def known_recipes() -> list[str]:
    """The shipped recipes by name (`byol_bsim`, `small/byol`), fragments left out."""
    root = recipes_root()
    names = (p.relative_to(root) for p in root.rglob("*.yaml"))
    return sorted(n.with_suffix("").as_posix() for n in names if BASES not in n.parts)


def recipe_path(name: str | Path) -> Path:
    """The recipe file `name` stands for: an existing file as given, else a shipped recipe of that name (with or
    without `.yaml`). A fragment (a file in a `_base/` folder, or one that names no method even through its
    bases: it would train the default method) is refused. Every error is one line (ConfigError) that lists
    the shipped recipes."""
    text = str(name)
    given = Path(text).expanduser()
    stem = text[: -len(given.suffix)] if given.suffix in (".yaml", ".yml") else text
    shipped = recipes_root() / f"{stem}.yaml"
    choose = f"choose one of: {' '.join(known_recipes())}"
    if given.is_file():
        path = given
    elif shipped.is_file() and not given.is_absolute():
        path = shipped
    else:
        raise ConfigError(f"{text}: no such recipe (a name as in configs/, or a .yaml file); {choose}")
    in_bases = path.resolve().parent.name == BASES
    layers = [data for data, _ in _recipe_layers(path)]
    if in_bases or not any(isinstance(data.get("method"), dict) and "name" in data["method"] for data in layers):
        why = f"a file in a {BASES}/ folder" if in_bases else "it names no method.name, not even in its bases"
        raise ConfigError(f"{text}: a fragment that recipes build on, not a recipe ({why}); {choose}")
    return path
