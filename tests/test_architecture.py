"""The layers, read from the source: which package may import which, and no import circle anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedsim", "clients", "server", "attacks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every first-party module `path` imports, at module level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def sources(package: str) -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted((ROOT / package).rglob("*.py"))}


def layer(module: str) -> str:
    if module == "fedsim.app" or module.startswith("fedsim.app.") or module == "fedsim.__main__":
        return "app"
    return module.split(".")[0]


GRAPH = {name: deps for package in PACKAGES for name, deps in sources(package).items()}
MODULES = set(GRAPH)


def first_party(deps: set[str]) -> set[str]:
    return {d for d in deps if d in MODULES}


FORBIDDEN = {
    # the core (config, datasets, shards, models, captures, files, scoring) imports nothing above it
    "fedsim": {"clients", "server", "attacks", "app"},
    # the FL side: clients and server neither see each other nor the attacks
    "clients": {"server", "attacks", "app"},
    "server": {"clients", "attacks", "app"},
    # the attacks read captures and models, never Flower's side of the seam
    "attacks": {"clients", "server", "app"},
}


@pytest.mark.parametrize("lower", sorted(FORBIDDEN))
def test_layers_import_only_downwards(lower: str) -> None:
    wrong = sorted(
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        if layer(name) == lower
        for dep in first_party(deps)
        if layer(dep) in FORBIDDEN[lower]
    )
    assert not wrong, wrong


@pytest.mark.parametrize("package", ["attacks", "fedsim"])
def test_attacks_and_the_core_do_not_import_flower_or_ray(package: str) -> None:
    wrong = sorted(
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        if layer(name) == package
        for dep in deps
        if dep.split(".")[0] in ("flwr", "ray")
    )
    assert not wrong, wrong


def test_no_import_circle() -> None:
    edges = {
        name: {d for d in first_party(deps) if d != name and not name.startswith(d + ".")}
        for name, deps in GRAPH.items()
    }
    # a package's __init__ re-exporting its modules is not a circle; a module reaching back into its importer is
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                circles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not circles, circles
