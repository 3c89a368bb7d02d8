"""The package's shape: no import cycle, kernels and config import nothing of the project, the house's size
limits, one training step."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bsim_fast"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def type_checking_only(tree: ast.Module) -> set:
    """Import nodes under `if TYPE_CHECKING:`: annotations only, never run."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    return skipped


def imports_of(module: str) -> set:
    """Project modules `module` imports anywhere (top level or inside a function), as Python resolves them:
    `from pkg import name` is pkg.name when that is a module, else pkg."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skipped = type_checking_only(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def cycle_from(start: str) -> list | None:
    """A path start -> ... -> start through GRAPH, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in GRAPH[node]:
            if dep == start:
                return path + [start]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, path + [dep]))
    return None


def test_import_graph_is_read_as_python_resolves_it():
    assert GRAPH["bsim_fast.train"] >= {"bsim_fast.step", "bsim_fast.resume", "bsim_fast.run"}
    assert "bsim_fast.loaders.registry" in GRAPH["bsim_fast.loaders.base"]  # from .registry import ...
    assert "bsim_fast.datasets" in GRAPH["bsim_fast.loaders.base"]  # from .. import augment, datasets
    assert "bsim_fast" not in GRAPH["bsim_fast.loaders.base"]


def test_no_import_cycle():
    cycles = [" -> ".join(c) for m in MODULES if (c := cycle_from(m))]
    assert not cycles, cycles[0]


def test_ground_floor_and_kernels_import_nothing_of_the_project():
    for module in ("bsim_fast.yaml12", "bsim_fast.atomic", "bsim_fast.host", "bsim_fast.seeds"):
        assert GRAPH[module] == set(), module
    assert GRAPH["bsim_fast.config"] == {"bsim_fast.yaml12"}  # the recipes' YAML dialect, itself ground floor
    kernels = [m for m in MODULES if m.startswith("bsim_fast.kernels")]
    assert len(kernels) >= 3
    for module in kernels:
        assert GRAPH[module] <= {"bsim_fast.kernels"} - {module}, (module, GRAPH[module])


def over_limits(path: Path) -> list:
    rel = path.relative_to(PACKAGE).as_posix()
    text = path.read_text()
    found = [rel] if len(text.splitlines()) > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                found.append(f"{rel}::{node.name}")
    return found


def test_house_numbers():
    """No module over the limits, the library's and the tools' alike: no exceptions."""
    found = sorted(name for p in MODULES.values() for name in over_limits(p))
    assert not found, found


def test_one_training_step():
    """`.backward()` is called for training by step.TrainStep alone (eval's linear probe trains its own
    classifier): the benchmark and the speedrun time that step, not a copy of it."""
    callers = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward":
                callers.add(module)
    assert callers == {"bsim_fast.step", "bsim_fast.eval"}
