"""The YAML dialect of recipes: `yaml.safe_load` (no object construction) with YAML 1.2 booleans and floats and
no duplicate keys. Part of the ground floor with `config.py`: it imports nothing of the project.

    load("compile: off\\nlr: 1e-5")  # {'compile': 'off', 'lr': 1e-05}; PyYAML alone: False and '1e-5'
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    """A key written twice in one mapping (YAML would silently keep the last one); the message is one line."""


class Loader(yaml.SafeLoader):
    """yaml.safe_load with YAML 1.2 booleans, so `compile: off` stays the string 'off'."""


Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.2 floats too: PyYAML reads `1e-5` (no dot) as a string, and recipes are full of such numbers
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _no_duplicate_keys(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise DuplicateKeyError(
                f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first on line {seen[key] + 1})"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def load(text: str) -> Any:
    """`text` read in the recipes' dialect; yaml.YAMLError or DuplicateKeyError when it is not valid."""
    return yaml.load(text, Loader=Loader)
