"""Every solver against brute-force enumeration on tiny problems, and every constraint family of
the integer program shown to matter (dropping it changes the optimum).

One base class (SolverContract) holds the tests; each backend subclasses it (PuLP's
solver_common.py style). Exact backends must return the enumerated optimum; the Lagrangian must
return a feasible plan with bound <= optimum <= its objective.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moeplan.allocator.formulation import FAMILIES, build_model
from moeplan.allocator.problem import Assignment, Budget, InfeasibleBudget, Problem, Speed
from moeplan.allocator.solvers import Status, _solve_highs, solve
from moeplan.sensitivity.synthetic import synthetic_profile, toy_inventory

# ---------------------------------------------------------------------------------------------
# tiny instances


def tiny(target: str, groups: bool, speed: bool = False, kinds=("down_proj",), n_experts=None,
         formats=("Q4_K", "Q8_0"), fill: float = 0.55, read_fill: float = 0.5, seed: int = 3,
         topk_group: int = 1, top_k: int = 2) -> Problem:
    """A two-MoE-layer model (embedding, head, experts only) with a memory budget `fill` of the way
    from the smallest to the largest plan, and optionally a speed row `read_fill` of the way."""
    E = n_experts or (6 if groups else 4)
    inv = toy_inventory(n_layers=2, first_dense=0, n_experts=E, n_group=2 if groups else 1, topk_group=topk_group,
                        top_k=top_k, hidden=256, moe_inter=256, vocab=32, kinds=kinds, attention=False,
                        shared_expert=False)
    prof = synthetic_profile(inv, list(formats), seed=seed)
    # make pruning and smaller top-k worth considering at these tiny sizes
    for st in prof.experts.values():
        st.removal_kl = [0.02 * x / max(st.removal_kl) for x in st.removal_kl]
    big = Budget(10**12, context=4, reserve=0, kv_bytes_per_token=inv.kv_cache_bytes_per_token())
    p = Problem.build(inv, prof, big, target, list(formats))
    lo = p.evaluate(p.minimum()).weight_bytes
    hi = p.evaluate(_largest(p)).weight_bytes
    budget = Budget(int(lo + fill * (hi - lo)) + big.kv_cache, context=4, reserve=0,
                    kv_bytes_per_token=big.kv_bytes_per_token)
    sp = None
    if speed:
        rlo = p.read_per_token(p.minimum())
        rhi = p.read_per_token(_largest(p))
        sp = Speed(bandwidth=float(int(rlo + read_fill * (rhi - rlo))), tokens_per_s=1.0)
    return p.replace(budget=budget, speed=sp)


def _largest(p: Problem) -> Assignment:
    f = int(np.argmax(p.item_bytes.sum(0))) if len(p.items) else 0
    fe = p.exp_bytes.argmax(-1)  # (L, J)
    return Assignment(np.full(len(p.items), f), np.ones((p.L, p.E), bool),
                      np.broadcast_to(fe[:, None, :], (p.L, p.E, p.J)).copy(),
                      np.full(p.L, max(p.global_topk_options())))


# ---------------------------------------------------------------------------------------------
# brute force: every plan, scored from the problem's raw arrays


def _layer_configs(p: Problem, li: int, m_fixed=None, k_fixed=None):
    """Every valid configuration of one MoE layer: (bytes, damage, read, keep, fmt (E, J), k)."""
    lay = p.layers[li]
    E, J, F = p.E, p.J, p.F
    G = p.n_group if p.n_group > 1 else 1
    size = E // G
    gguf = p.target.value == "gguf"
    out = []
    ks = [k_fixed] if k_fixed is not None else list(lay.topk_options)
    for keep in itertools.product([False, True], repeat=E):
        keep = np.array(keep)
        per = keep.reshape(G, size).sum(1)
        if G > 1 and (len(set(per.tolist())) != 1 or per[0] < 2):
            continue
        m = int(per[0]) if G > 1 else int(keep.sum())
        if m_fixed is not None and m != m_fixed:
            continue
        kept = np.flatnonzero(keep)
        if gguf:
            fmt_choices = [np.broadcast_to(np.array(c), (len(kept), J)) for c in itertools.product(range(F), repeat=J)]
        else:
            fmt_choices = [np.array(c).reshape(len(kept), J)
                           for c in itertools.product(range(F), repeat=len(kept) * J)]
        for fm in fmt_choices:
            eb = np.array([sum(p.exp_bytes[li, j, fm[x, j]] for j in range(J)) for x in range(len(kept))])
            dmg = sum(p.exp_damage[li, e, j, fm[x, j]] for x, e in enumerate(kept) for j in range(J))
            dmg += p.removal[li, ~keep].sum()
            nbytes = int(eb.sum()) + len(kept) * int(p.router_bytes[li])
            for k in ks:
                if k > len(kept) or (G > 1 and k > p.topk_group * m):
                    continue
                d = dmg + p.topk_cost[li, p.topk_index(k)]
                read = len(kept) * int(p.router_bytes[li]) + k * int(eb.max() if len(kept) else 0)
                full = np.full((E, J), -1)
                full[kept] = fm
                out.append((nbytes, d, read, keep, full, k))
    return out


def brute_force(p: Problem):
    """(optimal damage, optimal assignment, smallest feasible bytes) by enumerating every plan."""
    n = len(p.items)
    item_cfg = []
    for fs in itertools.product(range(p.F), repeat=n):
        fs = np.array(fs, dtype=np.int64)
        item_cfg.append((int(p.item_bytes[np.arange(n), fs].sum()), float(p.item_damage[np.arange(n), fs].sum()),
                         int(p.item_read[np.arange(n), fs].sum()), fs))
    if p.target.value == "gguf":
        groups = []
        G = p.n_group if p.n_group > 1 else 1
        for k in p.global_topk_options():
            for m in range(1, p.E // G + 1):
                groups.append([_layer_configs(p, li, m, k) for li in range(p.L)])
    else:
        groups = [[_layer_configs(p, li) for li in range(p.L)]]
    W = p.budget.weights - p.fixed_bytes
    R = (p.speed.max_read - p.fixed_read) if p.speed is not None else math.inf
    best, best_a, min_bytes = math.inf, None, math.inf
    for layer_cfgs in groups:
        if any(len(c) == 0 for c in layer_cfgs):
            continue
        parts = [item_cfg] + layer_cfgs
        B = np.zeros(())
        D = np.zeros(())
        Rd = np.zeros(())
        for cfg in parts:
            b = np.array([c[0] for c in cfg], dtype=np.float64)
            d = np.array([c[1] for c in cfg])
            r = np.array([c[2] for c in cfg], dtype=np.float64)
            B = B[..., None] + b
            D = D[..., None] + d
            Rd = Rd[..., None] + r
        min_bytes = min(min_bytes, B.min())
        ok = (B <= W) & (Rd <= R)
        if not ok.any():
            continue
        Dm = np.where(ok, D, np.inf)
        idx = np.unravel_index(int(Dm.argmin()), Dm.shape)
        if Dm[idx] < best:
            best = float(Dm[idx])
            cfgs = [parts[x][i] for x, i in enumerate(idx)]
            best_a = Assignment(cfgs[0][3], np.stack([c[3] for c in cfgs[1:]]), np.stack([c[4] for c in cfgs[1:]]),
                                np.array([c[5] for c in cfgs[1:]], dtype=np.int64))
    return best, best_a, int(min_bytes) + p.fixed_bytes


CASES = {
    "free": dict(target="free", groups=False),
    "free_groups": dict(target="free", groups=True),
    "gguf": dict(target="gguf", groups=False, kinds=("gate_proj", "down_proj")),
    "gguf_groups": dict(target="gguf", groups=True),
    # Q3_K and IQ3_S have the same bytes and IQ3_S the lower error: a stacked format dominated for every expert
    "gguf_dominated": dict(target="gguf", groups=False, formats=("Q3_K", "IQ3_S", "Q8_0")),
}
_BRUTE: dict = {}


def case(name: str, speed: bool):
    key = (name, speed)
    if key not in _BRUTE:
        p = tiny(speed=speed, **CASES[name])
        _BRUTE[key] = (p, *brute_force(p))
    return _BRUTE[key]


def test_brute_force_agrees_with_the_problems_accounting():
    for name in CASES:
        for speed in (False, True):
            p, opt, a, _ = case(name, speed)
            assert a is not None, (name, speed)
            assert p.check(a) == [], (name, speed)
            assert p.objective(a) == pytest.approx(opt, rel=1e-12, abs=1e-15)


def test_instances_bind():
    """The tiny instances are not trivial: the budget (and the speed row) cut the optimum."""
    for name in CASES:
        p, opt, _, _ = case(name, False)
        free_opt = brute_force(p.replace(budget=Budget(10**12, 4, 0, p.budget.kv_bytes_per_token)))[0]
        assert free_opt < opt - 1e-9, name
        ps, opt_s, _, _ = case(name, True)
        assert opt_s > opt + 1e-9, name


# ---------------------------------------------------------------------------------------------
# the contract every backend meets


class SolverContract:
    solver = ""
    exact = True

    def _solve(self, p, **kw):
        return solve(p, self.solver, time_limit=30, threads=1, **kw)

    @pytest.mark.parametrize("speed", [False, True], ids=["memory", "memory+speed"])
    @pytest.mark.parametrize("name", list(CASES))
    def test_true_optimum(self, name, speed):
        p, opt, _, _ = case(name, speed)
        sol = self._solve(p)
        assert sol.assignment is not None
        assert p.check(sol.assignment) == []
        assert sol.objective == pytest.approx(p.objective(sol.assignment), rel=1e-12)
        # Lagrangian bound <= optimum <= plan, for every backend
        assert sol.bound <= opt + 1e-9 * max(1.0, opt)
        assert sol.objective >= opt - 1e-9 * max(1.0, opt)
        if self.exact:
            assert sol.status is Status.OPTIMAL
            assert sol.objective == pytest.approx(opt, rel=1e-7)
        else:
            assert sol.gap == pytest.approx((sol.objective - sol.bound) / sol.objective)

    def test_targets_respected(self):
        p, _, _, _ = case("gguf_groups", False)
        a = self._solve(p).assignment
        kept = a.keep.sum(1)
        assert len(set(kept.tolist())) == 1 and len(set(a.topk.tolist())) == 1
        per_group = a.keep.reshape(p.L, p.n_group, -1).sum(2)
        assert (per_group == per_group[0, 0]).all() and per_group[0, 0] >= 2
        for li in range(p.L):
            for j in range(p.J):
                assert len(set(a.expert_fmt[li, a.keep[li], j].tolist())) == 1
        assert (a.topk <= p.topk_group * per_group[:, 0]).all()

    def test_infeasible_budget_reports_the_smallest_size(self):
        p, _, _, min_bytes = case("free_groups", False)
        small = Budget(min_bytes - 1, context=4, reserve=0, kv_bytes_per_token=p.budget.kv_bytes_per_token)
        small = Budget(small.memory + small.kv_cache, 4, 0, p.budget.kv_bytes_per_token)
        with pytest.raises(InfeasibleBudget) as err:
            self._solve(p.replace(budget=small))
        assert err.value.min_weight_bytes == min_bytes
        assert err.value.min_memory == min_bytes + small.kv_cache
        exact = Budget(min_bytes + small.kv_cache, 4, 0, p.budget.kv_bytes_per_token)
        sol = self._solve(p.replace(budget=exact))
        assert sol.totals.weight_bytes == min_bytes

    def test_unconstrained_budget_is_solved_exactly(self):
        p, _, _, _ = case("free", False)
        roomy = p.replace(budget=Budget(10**12, 4, 0, p.budget.kv_bytes_per_token))
        opt = brute_force(roomy)[0]
        sol = self._solve(roomy)
        assert sol.objective == pytest.approx(opt, rel=1e-9)
        assert sol.gap <= 1.01e-6  # solvers stop at a relative gap of 1e-6 by default


class TestLagrangian(SolverContract):
    solver = "lagrangian"
    exact = False


class TestHiGHS(SolverContract):
    solver = "highs"


class TestCBC(SolverContract):
    solver = "cbc"

    @classmethod
    def setup_class(cls):
        from moeplan.allocator.solvers import _cbc_binary

        try:
            _cbc_binary()
        except RuntimeError:
            pytest.skip("CBC is not available")


class TestCPSAT(SolverContract):
    solver = "cpsat"


# ---------------------------------------------------------------------------------------------
# each constraint family matters


def _optimum(form):
    status, values, bound, log = _solve_highs(form, 30, 1, None, 0.0)
    assert status is Status.OPTIMAL, log
    mdl = form.model
    return float(np.dot(mdl.cost, values) + mdl.offset), values


FAMILY_CASES = {
    "one_format": ("free", False),
    "expert_format": ("free", False),
    "stacked_format": ("gguf", False),
    "gguf_uniform": ("gguf", False),
    "count_link": ("gguf", False),
    "topk_choice": ("free_prune", False),
    "keep_ge_topk": ("free_prune", False),
    "kept_count": ("free_groups", False),
    "group_reach": ("free_groups_k3", False),
    "memory": ("free", False),
    "speed": ("free", True),
    "speed_cap": ("free", True),
    "speed_split": ("free", True),
    "speed_link": ("gguf", True),
}


def _family_problem(name: str, speed: bool) -> Problem:
    if name == "free_prune":
        p = tiny("free", False, speed)
        p.removal[:] = 1e-6  # pruning almost free: only the constraints keep experts
        return p
    if name == "free_groups_k3":
        # top-k 3 with groups of 3 and a token in one group: reach (k <= 1 x m) binds at m = 2
        p = tiny("free", True, speed, top_k=3, fill=0.3)
        p.removal[:] = 1e-6  # pruning almost free: only the constraints keep experts
        return p
    return case(name, speed)[0]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "group_reach"] + ["group_reach"])
def test_every_constraint_family_matters(family):
    assert family in FAMILY_CASES, f"no test instance for constraint family {family}"
    p = _family_problem(*FAMILY_CASES[family])
    full = build_model(p)
    assert family in set(full.model.row_family), f"{family} has no rows in its test instance"
    with_all, values = _optimum(full)
    assert with_all == pytest.approx(p.objective(full.to_assignment(values)), rel=1e-9)
    dropped = build_model(p, drop=[family])
    without, values = _optimum(dropped)
    # the relaxation is strictly better on this instance: the family cuts off its optimum ...
    assert without < with_all - 1e-9 * max(1.0, abs(with_all)), family
    # ... and that optimum breaks the rule the family states (where a plan can express it)
    a = dropped.to_assignment(values)
    if family in ("memory", "speed", "speed_cap", "speed_split", "speed_link", "kept_count", "group_reach",
                  "keep_ge_topk", "gguf_uniform", "stacked_format"):
        assert p.check(a), family


def test_both_gguf_linkings_are_exact():
    for name in ("gguf", "gguf_groups", "gguf_dominated"):
        for speed in (False, True):
            p, opt, _, _ = case(name, speed)
            for linking in ("count", "expert"):
                form = build_model(p, gguf_linking=linking)
                v, values = _optimum(form)
                assert v == pytest.approx(opt, rel=1e-9), (name, speed, linking)
                assert p.check(form.to_assignment(values)) == []
    p = case("gguf", False)[0]
    assert "gguf_uniform" in build_model(p, gguf_linking="expert").model.row_family
    with pytest.raises(ValueError, match="gguf_linking"):
        build_model(p, gguf_linking="magic")


def test_dominated_candidates_do_not_change_the_optimum():
    for name in CASES:
        p, opt, _, _ = case(name, True)
        v_pruned, _ = _optimum(build_model(p))
        v_all, _ = _optimum(build_model(p, prune_dominated=False))
        assert v_pruned == pytest.approx(v_all, rel=1e-9) == pytest.approx(opt, rel=1e-9)


def test_hint_from_a_plan_is_feasible_for_the_model():
    p, opt, a, _ = case("gguf_groups", True)
    form = build_model(p)
    x = form.values_of(a)
    start, idx, val = form.model.csr()
    act = np.add.reduceat(val * x[idx], start[:-1]) if len(idx) else np.zeros(0)
    lo, hi = np.array(form.model.row_lo), np.array(form.model.row_hi)
    assert ((act >= lo - 1e-6) & (act <= hi + 1e-6)).all()
    assert float(np.dot(form.model.cost, x) + form.model.offset) == pytest.approx(opt, rel=1e-9)


def test_model_dump(tmp_path):
    p, _, _, _ = case("free", True)
    for ext in ("lp", "mps"):
        path = tmp_path / f"m.{ext}"
        sol = solve(p, "lagrangian", dump_model=path)
        text = path.read_text()
        assert "keep" in text and "x" in text and sol.status in (Status.OPTIMAL, Status.FEASIBLE)
    with pytest.raises(ValueError, match=".lp or .mps"):
        solve(p, "lagrangian", dump_model=tmp_path / "m.txt")


def test_bad_solver_arguments():
    p, _, _, _ = case("free", False)
    with pytest.raises(ValueError, match="unknown solver"):
        solve(p, "gurobi")
    with pytest.raises(ValueError, match="time_limit"):
        solve(p, "highs", time_limit=0)


# ---------------------------------------------------------------------------------------------
# the Lagrangian's time limit


@pytest.mark.parametrize("target,speed", [("free", False), ("free", True), ("gguf", False), ("gguf", True)])
def test_lagrangian_stops_at_its_time_limit(target, speed):
    """A time limit that has passed before the first price search ends stops the searches after the
    first plan: fewer evaluations, still a feasible plan and a proven bound (before: reported, not used)."""
    p = tiny(target, groups=True, speed=speed, kinds=("gate_proj", "down_proj"), formats=("Q2_K", "Q4_K", "Q8_0"))
    full = solve(p, "lagrangian")
    short = solve(p, "lagrangian", time_limit=1e-9)
    assert short.report()["time_limit_s"] == 1e-9
    assert short.log.get("time_limit_reached") and not full.log.get("time_limit_reached")
    assert short.log["evaluations"] < full.log["evaluations"]
    assert not p.check(short.assignment) and short.bound <= full.objective + 1e-12 <= short.objective + 1e-12
