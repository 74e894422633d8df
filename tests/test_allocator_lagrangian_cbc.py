"""The Lagrangian with the speed row on random tiny instances (bound <= brute-force optimum <= plan),
the MPS file written for CBC (same optimum as the in-memory model), and CBC stopped at its time
limit on an instance it cannot finish (a valid plan, not optimal, a finite gap)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeplan.allocator.formulation import build_model
from moeplan.allocator.problem import Budget, Problem, Speed
from moeplan.allocator.solvers import Status, _solve_highs, solve, write_mps
from moeplan.sensitivity.synthetic import synthetic_profile, toy_inventory
from tests.test_allocator_solvers import brute_force, tiny


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(["free", "gguf"]), groups=st.booleans(), seed=st.integers(0, 10_000),
       fill=st.floats(0.1, 0.9), read_fill=st.floats(0.1, 0.9))
def test_speed_row_bound_below_brute_force_and_plan_feasible(target, groups, seed, fill, read_fill):
    kinds = ("gate_proj", "down_proj") if (target == "gguf" and not groups) else ("down_proj",)
    p = tiny(target, groups, speed=True, kinds=kinds, seed=seed, fill=fill, read_fill=read_fill)
    opt, _, _ = brute_force(p)
    if not math.isfinite(opt):
        return  # the random budgets admit no plan
    sol = solve(p, "lagrangian")
    assert p.check(sol.assignment) == []
    assert sol.bound <= opt + 1e-9 * max(1.0, abs(opt))
    assert sol.objective >= opt - 1e-9 * max(1.0, abs(opt))


@pytest.mark.parametrize("target,speed", [("free", False), ("free", True), ("gguf", True)])
def test_mps_file_has_the_models_optimum(tmp_path, target, speed):
    import highspy

    kinds = ("gate_proj", "down_proj") if target == "gguf" else ("down_proj",)
    p = tiny(target, False, speed=speed, kinds=kinds)
    form = build_model(p)
    status, values, _, _ = _solve_highs(form, time.perf_counter() + 30, 1, None, 0.0)
    assert status is Status.OPTIMAL
    direct = float(np.dot(form.model.cost, values) + form.model.offset)
    path = tmp_path / "m.mps"
    write_mps(form.model, path)
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    assert h.readModel(str(path)) == highspy.HighsStatus.kOk
    h.setOptionValue("mip_rel_gap", 0.0)
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    # the constant rides on column ONE, fixed at 1
    assert h.getInfo().objective_function_value == pytest.approx(direct, rel=1e-9)
    assert brute_force(p)[0] == pytest.approx(direct, rel=1e-9)


def _medium(speed: bool) -> Problem:
    """Big enough that CBC cannot finish in a few seconds."""
    inv = toy_inventory(n_layers=10, first_dense=1, n_experts=64, n_group=8, topk_group=4, top_k=8, hidden=512,
                        moe_inter=256, vocab=256)
    menu = ["IQ2_XXS", "IQ2_XS", "Q2_K", "Q3_K", "Q4_K", "Q6_K"]
    prof = synthetic_profile(inv, menu, seed=1, target="free")
    p = Problem.build(inv, prof, Budget(10**12, 8, 0, inv.kv_cache_bytes_per_token()), "free", menu)
    lo = p.evaluate(p.minimum()).weight_bytes
    budget = Budget(int(lo * 1.6) + p.budget.kv_cache, 8, 0, inv.kv_cache_bytes_per_token())
    sp = Speed(float(p.read_per_token(p.minimum()) * 1.5), 1.0) if speed else None
    return p.replace(budget=budget, speed=sp)


def test_cbc_returns_at_its_time_limit():
    from moeplan.allocator.solvers import _cbc_binary

    try:
        _cbc_binary()
    except RuntimeError:
        pytest.skip("CBC is not available")
    p = _medium(speed=True)
    limit = 3.0
    t0 = time.perf_counter()
    sol = solve(p, "cbc", time_limit=limit, threads=1, rel_gap=1e-9)
    wall = time.perf_counter() - t0
    assert wall < limit + 15
    assert sol.assignment is not None and p.check(sol.assignment) == []
    assert sol.status is not Status.OPTIMAL
    assert sol.gap is not None and math.isfinite(sol.gap) and sol.gap >= 0
    assert sol.bound <= sol.objective
