"""One owner per concept (ARCHITECTURE.md), read from the source with `ast`.

- No two modules of the package define a class of the same name, or a module-level table
  (UPPER_CASE name) of the same name: a second `Totals` or `MODELS_DIR` is a second definition of one
  thing, or two things a reader cannot tell apart.
- Outputs are written through kernels/outputs.py (checked before any work, complete or absent, never
  through a planted link), in the package and in benchmarks/ alike: no hand-made temp-and-rename
  (os.replace, os.rename, Path.rename / Path.replace, tempfile.mkstemp, NamedTemporaryFile(delete=False))
  anywhere else.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ("kernels", "sensitivity", "allocator")
OUTPUTS = ROOT / "kernels" / "outputs.py"
# names every module of a kind defines, by design: a command module's entries, which
# allocator/cli/__init__.py gathers into the command line's own COMMANDS
PROTOCOL = {"COMMAND", "COMMANDS"}


def _files(folders) -> list[Path]:
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _defined(kind: str) -> dict[str, list[str]]:
    """name -> where: the module-level classes (kind 'class') or UPPER_CASE tables (kind 'table')."""
    found = defaultdict(list)
    for path in _files(PACKAGE):
        for node in _tree(path).body:
            names = []
            if kind == "class" and isinstance(node, ast.ClassDef):
                names = [node.name]
            elif kind == "table" and isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()]
            for n in names:
                found[n].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_source_is_read():
    classes, tables = _defined("class"), _defined("table")
    assert "Plan" in classes and "PlanTotals" in classes and "Totals" in classes
    assert "MODELS_DIR" in tables and "FORMATS" in tables


def test_no_two_classes_share_a_name():
    twins = {n: w for n, w in _defined("class").items() if len(w) > 1}
    assert not twins, "classes defined twice (rename one, or import the other):\n" + \
        "\n".join(f"{n}: {', '.join(w)}" for n, w in sorted(twins.items()))


def test_no_two_tables_share_a_name():
    twins = {n: w for n, w in _defined("table").items() if len(w) > 1 and n not in PROTOCOL}
    assert not twins, "module-level tables defined twice (import the owner's):\n" + \
        "\n".join(f"{n}: {', '.join(w)}" for n, w in sorted(twins.items()))


def _atomic_variants(path: Path) -> list[str]:
    out = []
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        bad = (owner == "os" and name in ("replace", "rename", "renames")
               or name in ("mkstemp", "mktemp")
               # Path.rename(target) / Path.replace(target): one argument (str.replace takes two)
               or name in ("rename", "replace") and owner != "os" and len(node.args) == 1 and not node.keywords
               or name == "NamedTemporaryFile" and any(k.arg == "delete" for k in node.keywords))
        if bad:
            out.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:80]}")
    return out


def test_outputs_are_written_by_the_one_helper():
    files = [p for p in _files((*PACKAGE, "benchmarks")) if p != OUTPUTS]
    assert len(files) > 40
    found = [v for p in files for v in _atomic_variants(p)]
    assert not found, "write outputs with kernels.outputs (output_file, output_dir, write_text):\n" + "\n".join(found)
    # the check sees what it looks for
    assert _atomic_variants(OUTPUTS)
