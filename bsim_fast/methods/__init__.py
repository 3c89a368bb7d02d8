"""Self-supervised methods, one module each, registered by name (`@register("byol")` in the module).

Every module of this package is imported here, so a new method file registers itself: the config's
`method.name` choices and `build_method` read the one registry, `METHODS`.
"""

import importlib
import pkgutil

from .base import METHODS, Method, build_method, compile_networks, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "build_method", "compile_networks", "register"]
