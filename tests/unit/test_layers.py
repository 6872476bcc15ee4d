"""The import graph of harness/, analysis/ and interventions/: no cycles, and each layer imports only those below it."""

import ast
import sys

import pytest

from harness.paths import PROJECT_ROOT

PACKAGES = ("harness", "analysis", "interventions")


def module_name(path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(), str(path))
        for package in PACKAGES
        for path in sorted((PROJECT_ROOT / package).rglob("*.py"))
    }


MODULES = project_modules()


def imported(name: str, tree: ast.Module) -> set[str]:
    """Every module `name` imports, at the top or inside a function; `from a import b` names `a.b` if it is a module."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return found


def _is_package(name: str) -> bool:
    return (PROJECT_ROOT / name.replace(".", "/") / "__init__.py").exists()


GRAPH = {name: {m for m in imported(name, tree) if m in MODULES and m != name} for name, tree in MODULES.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return components


def imports_of(prefix: str) -> dict[str, set[str]]:
    return {
        name: imported(name, tree) for name, tree in MODULES.items() if name == prefix or name.startswith(prefix + ".")
    }


def violations(lower: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{name} imports {target}"
        for name, targets in imports_of(lower).items()
        for target in targets
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    )


def test_the_graph_covers_the_project():
    assert {"harness.trial.trainer", "harness.study.run", "analysis.compare", "interventions"} <= MODULES.keys()
    assert (
        "harness.trial.model" in GRAPH["harness.trial.step"] and "harness.trial.step" in GRAPH["harness.trial.trainer"]
    )


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = import_cycles(GRAPH)
    assert not cycles, f"{len(cycles)} import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


UPPER = ("harness.study", "harness.commands", "harness.__main__", "analysis")


@pytest.mark.parametrize("lower", ["harness.trial", "harness.data", "harness.tracking", "harness.config"])
def test_lower_layers_import_no_study_command_or_analysis(lower):
    assert violations(lower, UPPER) == []


def test_the_study_imports_no_command():
    assert violations("harness.study", ("harness.commands", "harness.__main__")) == []


def test_the_model_imports_only_torch_the_standard_library_and_the_schema():
    allowed_roots = set(sys.stdlib_module_names) | {"torch"}
    outside = sorted(
        target
        for target in imported("harness.trial.model", MODULES["harness.trial.model"])
        if target.split(".")[0] not in allowed_roots and target != "harness.config.schema"
    )
    assert outside == []


def test_the_model_imports_no_hydra():
    """The schema the model imports is Hydra-free, so building a model never loads Hydra or OmegaConf."""
    reached, frontier = set(), ["harness.trial.model"]
    while frontier:
        name = frontier.pop()
        if name in reached:
            continue
        reached.add(name)
        frontier.extend(GRAPH.get(name, ()))
    hydra = sorted(
        f"{name} imports {target}"
        for name in reached
        for target in imported(name, MODULES[name])
        if target.split(".")[0] in ("hydra", "omegaconf")
    )
    assert hydra == []
