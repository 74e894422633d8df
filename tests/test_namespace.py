"""moeplan is importable as `moeplan.*` only: no bare `kernels`, `allocator` or `sensitivity` of ours,
wherever Python starts (a checkout's root puts its folders on sys.path), with or without Hugging
Face's `kernels` package (which transformers >= 5.25 requires) installed."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in a subprocess started in `cwd` with `python -c`, which puts cwd first on sys.path.
_PROBE = r"""
import importlib, json, os
out = {}
for name in ("kernels", "allocator", "sensitivity"):
    try:
        m = importlib.import_module(name)
        out[name] = os.path.realpath(getattr(m, "__file__", None) or "namespace")
    except ModuleNotFoundError as e:
        out[name] = "missing: " + str(e)
from moeplan import kernels
out["moeplan.kernels"] = os.path.realpath(kernels.__file__)
out["has_quantize"] = hasattr(kernels, "quantize")
print(json.dumps(out))
"""


def _probe(cwd: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("where", ["checkout root", "elsewhere"])
def test_bare_names_are_never_moeplans(where, tmp_path):
    found = _probe(ROOT if where == "checkout root" else tmp_path)
    assert found["has_quantize"] and found["moeplan.kernels"].endswith("__init__.py")
    for name in ("allocator", "sensitivity"):
        assert found[name].startswith("missing"), found
    if _hub_kernels_installed():
        # the name belongs to Hugging Face's package, even from the checkout's root
        assert not found["kernels"].startswith(str(ROOT)) and not found["kernels"].startswith("missing"), found
    else:
        assert found["kernels"].startswith("missing"), found


def test_transformers_sees_the_right_kernels_package_from_the_checkout_root():
    # transformers imports `kernels` when Hugging Face's distribution is installed (its hub-kernel
    # integration runs when a model module is imported); from the checkout's root that import must
    # not reach moeplan's kernels/ folder.
    code = ("import transformers.activations, transformers.utils.import_utils as u; "
            "print(u.is_kernels_available())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(_hub_kernels_installed())


def test_installed_distribution_has_one_top_level_name():
    dist = importlib.metadata.distribution("moeplan")
    assert (dist.read_text("top_level.txt") or "").split() == ["moeplan"]
    (script,) = [e for e in dist.entry_points if e.group == "console_scripts" and e.name == "moeplan"]
    assert script.value == "moeplan.allocator.cli:main"
