"""`moeplan solve`'s format menu: the profile's measured menu by default with --profile (IQ formats
included), the fixed Q2_K..Q8_0 menu with --synthetic-profile, --formats when given."""

from __future__ import annotations

from pathlib import Path


from moeplan.allocator import cli
from moeplan.allocator.plan import Plan
from moeplan.kernels.inventory import build_inventory
from moeplan.sensitivity.profile import Profile

MODEL = Path(__file__).resolve().parent.parent / "sensitivity" / "models" / "tiny-deepseek-v3"


def _solve(tmp_path, *extra) -> Plan:
    bf16 = build_inventory(MODEL).bytes_uniform("BF16")
    out = tmp_path / "plan.json"
    rc = cli.main(["solve", str(MODEL), "--memory", str(int(0.15 * bf16)), "--reserve", "0", "--context", "0",
                   "--target", "gguf", "--out", str(out), *extra])
    assert rc == 0
    return Plan.load(out)


def test_profile_menu_is_the_default(tmp_path):
    prof = Profile.load(MODEL / "profile.json")
    assert any(f.startswith("IQ") for f in prof.formats)
    plan = _solve(tmp_path, "--profile", str(MODEL / "profile.json"))
    assert plan.formats == list(prof.formats)
    # at 15% of BF16 the profile's own menu needs no pruning (Q2_K..Q8_0 alone would prune)
    assert all(len(l.kept) == l.n_experts for l in plan.layers)
    assert any(f.startswith("IQ") for f in plan.stacked.values())


def test_formats_given_win(tmp_path):
    plan = _solve(tmp_path, "--profile", str(MODEL / "profile.json"), "--formats", "Q2_K,Q4_K,Q8_0")
    assert plan.formats == ["Q2_K", "Q4_K", "Q8_0"]


def test_synthetic_profile_keeps_the_fixed_menu(tmp_path):
    plan = _solve(tmp_path, "--synthetic-profile")
    assert plan.formats == cli.SYNTHETIC_DEFAULT_FORMATS.split(",")
