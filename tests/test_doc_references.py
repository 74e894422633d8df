"""Every document a module of ours names (README.md, DATA.md, results/pareto.md, ...) is in the repository."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError:
        out = None
    if out is None or out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_named_documents_exist():
    files = _tracked()
    names = {Path(f).name for f in files} | set(files)
    missing = []
    for f in files:
        if f.endswith(".py") and f.split("/")[0] in ("kernels", "sensitivity", "allocator", "benchmarks"):
            for doc in re.findall(r"\b[\w./-]+\.md\b", (ROOT / f).read_text(encoding="utf-8")):
                if doc not in names and Path(doc).name not in names:
                    missing.append(f"{f}: {doc}")
    assert not missing, "documents named but not in the repository:\n" + "\n".join(missing)
