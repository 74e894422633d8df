"""The direction of imports (ARCHITECTURE.md): kernels -> sensitivity -> allocator -> allocator.cli.

Every import of one of moeplan's own modules is read from the source with `ast`, at module level and
inside functions alike (a function-local import is an arrow all the same, it only runs later). The
graph must have no circle, and no arrow may point to a higher layer:

    0 moeplan.kernels        formats, C kernels, checkpoint I/O, inventory, GGUF layout and writer
    1 moeplan.sensitivity    adapters, calibration data, profiler, evaluation, compression in memory
    2 moeplan.allocator      problem, program, solvers, plan, sweep
    3 moeplan.allocator.cli  the pipeline and the command line: materialize, measure, demo, commands

Nothing imports the command line's package from below, and the command line lists its commands itself.
A function-local import of our own modules is there only to defer a heavy dependency (torch,
transformers, pandas, a solver, ...) that the imported module loads at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"moeplan.kernels": "kernels", "moeplan.sensitivity": "sensitivity", "moeplan.allocator": "allocator"}
# highest layer first: a module belongs to the first prefix it starts with
LAYERS = (("moeplan.allocator.cli", 3), ("moeplan.allocator", 2), ("moeplan.sensitivity", 1), ("moeplan.kernels", 0))
EXTENSIONS = {"moeplan.kernels._C"}  # built by setup.py; imports nothing of ours
# third-party packages that cost seconds or hundreds of MB to import, or are optional
HEAVY = {"torch", "transformers", "pandas", "matplotlib", "ortools", "pulp", "highspy", "gguf", "safetensors", "scipy",
         "tqdm", "llama_cpp", "tokenizers"}
# function-local imports of light modules that stay so, and why
LAZY = {
    ("moeplan.kernels", "moeplan.kernels.api"): "PEP 562 __getattr__: the format table imports without the C extension",
    ("moeplan.kernels.iq_grids", "moeplan.kernels.formats"): "kernels/iq_grids.py is the C kernels' side (not ours)",
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules of ours that one import statement loads (`from pkg import sub` loads pkg.sub)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            up = here[: len(here) - node.level + 1]
            base = ".".join(up + ([node.module] if node.module else []))
        names = []
        for a in node.names:
            sub = f"{base}.{a.name}"
            names.append(sub if sub in MODULES or sub in EXTENSIONS else base)
    return [n for n in names if n.startswith("moeplan.") and n not in EXTENSIONS]


def _edges() -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import of our own modules, module-level and function-local."""
    edges = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, path, node):
                    if target not in MODULES:
                        raise AssertionError(f"{path}:{node.lineno} imports {target}, which is not a module of ours")
                    if target != module:
                        edges.append((module, target, node.lineno))
    return edges


def _function_local(tree: ast.Module) -> set[int]:
    """ids of the import statements inside a function body."""
    out = set()
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out |= {id(n) for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return out


def _loads_heavy() -> dict[str, set[str]]:
    """module -> the HEAVY packages that importing it loads (its module-level imports, transitively)."""
    direct: dict[str, set[str]] = {}
    own: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        local = _function_local(tree)
        direct[module], own[module] = set(), set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in local:
                continue
            top = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if not node.level else []
            direct[module] |= {t.split(".")[0] for t in top} & HEAVY
            own[module] |= set(_targets(module, path, node)) - {module}
    out: dict[str, set[str]] = {}

    def heavy(m: str, seen: frozenset = frozenset()) -> set[str]:
        if m not in out:
            found = set(direct[m])
            for n in own[m] - seen:
                found |= heavy(n, seen | {m})
            out[m] = found
        return out[m]

    return {m: heavy(m) for m in MODULES}


def layer(module: str) -> int:
    return next(rank for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + "."))


def test_the_graph_is_read():
    edges = _edges()
    assert len(MODULES) > 30 and len(edges) > 100
    # both kinds of import are seen: a module-level one and a function-local one
    assert ("moeplan.sensitivity.profiler", "moeplan.kernels.formats") in {(a, b) for a, b, _ in edges}
    assert layer("moeplan.allocator.cli.materialize") == 3 and layer("moeplan.allocator.plan") == 2


def test_no_upward_import():
    upward = sorted({f"{MODULES[a].relative_to(ROOT)}:{line} imports {b} (layer {layer(a)} -> {layer(b)})"
                     for a, b, line in _edges() if layer(b) > layer(a)})
    assert not upward, "imports run kernels -> sensitivity -> allocator -> allocator.cli only:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _ in _edges():
        graph[a].add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) < 3))
def test_nothing_below_names_the_command_line(module):
    """No string either: a module loaded by name (importlib) would be an arrow the graph cannot see."""
    text = MODULES[module].read_text(encoding="utf-8")
    assert "allocator.cli" not in text.replace("python -m moeplan.allocator.cli", ""), module


def test_function_local_imports_defer_a_heavy_dependency():
    heavy = _loads_heavy()
    assert "torch" in heavy["moeplan.sensitivity.evaluate"] and "torch" not in heavy["moeplan.kernels.inventory"]
    assert not heavy["moeplan.kernels.formats"]
    light = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        local = _function_local(tree)
        for node in ast.walk(tree):
            if id(node) in local:
                for target in _targets(module, path, node):
                    if target != module and not heavy[target] and (module, target) not in LAZY:
                        light.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not light, ("function-local imports of modules that load nothing heavy (import them at the top):\n"
                       + "\n".join(sorted(set(light))))


def test_every_package_is_installed():
    """A subpackage (allocator/cli/) that pyproject.toml does not list would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == {m for m, p in MODULES.items() if p.name == "__init__.py"}
