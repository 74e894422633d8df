"""The problem: size parsing, the budget split, exact bytes, candidate filters, the feasibility
definition, the smallest plan; and the synthetic profile generator."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan.allocator.problem import (Assignment, Budget, InfeasibleBudget, Problem, Speed, lower_hull, pareto,
                               pareto_mask, parse_size)
from moeplan.kernels.inventory import Role
from moeplan.sensitivity.profile import Profile
from moeplan.sensitivity.synthetic import (RMSE_GAUSSIAN, SYNTHETIC_FORMATS, relative_error, synthetic_profile,
                                   toy_inventory)


# ---------------------------------------------------------------------------------------------
# sizes and the budget split

@pytest.mark.parametrize("text, value", [
    ("128GB", 128 * 10**9), ("128 GB", 128 * 10**9), ("128GiB", 128 * 2**30), ("1.5TB", 1_500_000_000_000),
    ("512MiB", 512 * 2**20), ("64kb", 64_000), ("500000000", 500_000_000), (123, 123), ("2e9", 2_000_000_000),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["128G", "lots", "-5GB", "12 parsecs", ""])
def test_parse_size_rejects_with_a_hint(bad):
    with pytest.raises(ValueError, match="unit|size"):
        parse_size(bad)


def test_budget_split_arithmetic():
    inv = toy_inventory()
    b = Budget.of("128GB", inv, context=4096, reserve="2GB")
    assert b.kv_bytes_per_token == inv.kv_cache_bytes_per_token() == 3 * (32 + 32) * 2
    assert b.kv_cache == 4096 * b.kv_bytes_per_token
    assert b.weights == 128 * 10**9 - b.kv_cache - 2 * 10**9
    text = b.split()
    assert "device memory" in text and "KV cache" in text and "weight budget" in text
    j = b.to_json()
    assert j["weight_budget_bytes"] == j["memory_bytes"] - j["kv_cache_bytes"] - j["reserve_bytes"]


def test_deepseek_budget_split():
    from moeplan.kernels.inventory import build_inventory

    inv = build_inventory("deepseek-v3")
    b = Budget.of("128GB", inv, context=4096, reserve="2GB")
    # MLA: 61 layers x (512 + 64) values x 2 bytes per token of context
    assert b.kv_cache == 4096 * 61 * 576 * 2
    assert b.weights == 128_000_000_000 - 4096 * 70_272 - 2_000_000_000


def test_budget_rejects_nonsense():
    with pytest.raises(ValueError, match="positive"):
        Budget(0)
    with pytest.raises(ValueError, match="positive"):
        Speed.of(0, 10)
    assert Speed.of(800, 20).max_read == 40 * 10**9


# ---------------------------------------------------------------------------------------------
# the problem's data

@pytest.fixture(scope="module")
def toy():
    inv = toy_inventory(n_layers=3, first_dense=1, n_experts=6, n_group=2, topk_group=1, top_k=2)
    prof = synthetic_profile(inv, seed=1)
    return inv, prof


def test_bytes_are_exact_per_format(toy):
    inv, prof = toy
    menu = ["Q2_K", "Q4_K", "Q8_0", "BF16"]
    for target in ("free", "gguf"):
        p = Problem.build(inv, prof, Budget.of("1GB", inv, reserve=0), target, menu)
        for it in p.items:
            t = inv[it.name]
            for f, fmt in enumerate(menu):
                assert p.item_bytes[it.index, f] == t.nbytes(fmt, target, inv.config)
                assert p.item_damage[it.index, f] == prof.tensor_damage[it.name][fmt]
        for li, lay in enumerate(p.layers):
            for e in range(p.E):
                for j, name in enumerate(lay.tensor_names[e]):
                    t = inv[name]
                    assert (p.exp_bytes[li, j] == [t.nbytes(f, target, inv.config) for f in menu]).all()
                    assert (p.exp_damage[li, e, j] == [prof.tensor_damage[name][f] for f in menu]).all()
        # every tensor is somewhere: items, experts, routers with their experts, or fixed
        a = Assignment(np.full(len(p.items), 3), np.ones((p.L, p.E), bool), np.full((p.L, p.E, p.J), 3),
                       np.full(p.L, 2))
        assert p.evaluate(a).weight_bytes == inv.bytes_uniform("BF16", target)
        assert p.evaluate(a).params == inv.params()


def test_router_rows_go_with_their_experts(toy):
    inv, prof = toy
    p = Problem.build(inv, prof, Budget.of("1GB", inv, reserve=0), "free", ["Q4_K"])
    router = sum(t.nbytes("F32") for t in inv if t.role is Role.ROUTER and t.layer in {l.layer for l in p.layers})
    assert int(p.router_bytes.sum()) * p.E == router
    a = p.minimum()
    pruned = int((~a.keep).sum(1) @ p.router_bytes)
    assert pruned > 0
    full = Assignment(a.item_fmt, np.ones_like(a.keep), np.zeros_like(a.expert_fmt), a.topk)
    diff = p.evaluate(full).bytes_by_role["router"] - p.evaluate(a).bytes_by_role["router"]
    assert diff == pruned


def test_gguf_fallback_reaches_the_bytes():
    # rows of 128 (DeepSeek's attn_k_b in GGUF): Q4_K (256-blocks) is stored as Q5_0
    from moeplan.kernels.inventory import build_inventory

    inv = build_inventory("deepseek-v3")
    t = inv["model.layers.3.self_attn.kv_b_proj.weight"]
    assert t.nbytes("Q4_K", "gguf", inv.config) != t.nbytes("Q4_K", "free", inv.config)
    assert t.stored_format("Q4_K", "gguf", inv.config) == ["Q5_0", "Q4_K"]


def test_menu_errors_name_the_problem(toy):
    inv, prof = toy
    b = Budget.of("1GB", inv, reserve=0)
    with pytest.raises(ValueError, match="unknown format"):
        Problem.build(inv, prof, b, "free", "Q2_K,Q9_Z")
    with pytest.raises(ValueError, match="twice"):
        Problem.build(inv, prof, b, "free", "Q2_K,q2_k")
    small = synthetic_profile(inv, ["Q2_K"], seed=1)
    with pytest.raises(ValueError, match=r"no damage for formats \['Q8_0'\]"):
        Problem.build(inv, small, b, "free", "Q2_K,Q8_0")
    other = synthetic_profile(toy_inventory(n_experts=4), ["Q2_K"])
    with pytest.raises(ValueError, match="fingerprint"):
        Problem.build(inv, other, b, "free", "Q2_K")


def test_check_names_each_violation(toy):
    inv, prof = toy
    p = Problem.build(inv, prof, Budget.of("1GB", inv, reserve=0), "gguf", ["Q2_K", "Q8_0"])
    a = p.minimum()
    assert p.check(a) == []
    b = a.copy()
    b.keep[0, 0] = not b.keep[0, 0]
    b.expert_fmt[0, 0] = 0 if b.keep[0, 0] else -1
    assert any(v.startswith("groups") for v in p.check(b))
    c = a.copy()
    kept = np.flatnonzero(c.keep[0])
    c.expert_fmt[0, kept[0], 0] = 1
    assert any(v.startswith("gguf_uniform") for v in p.check(c))
    d = a.copy()
    d.topk[0] = 1
    d.topk[1] = 2
    assert any(v.startswith("gguf_topk") for v in p.check(d))
    tight = p.replace(budget=Budget(p.evaluate(a).weight_bytes + p.budget.kv_cache + p.budget.reserve - 1,
                                    p.budget.context, p.budget.reserve, p.budget.kv_bytes_per_token))
    assert any(v.startswith("memory") for v in tight.check(a))


def test_minimum_is_the_smallest_plan_and_infeasible_budgets_say_so(toy):
    inv, prof = toy
    for target in ("free", "gguf"):
        p = Problem.build(inv, prof, Budget.of("1GB", inv, reserve=0), target, ["Q2_K", "Q8_0"])
        small = p.evaluate(p.minimum())
        # per group: at least 2 kept (group-limited routing), top-k 1 -> 2 per group
        assert small.kept_experts == p.L * 2 * p.n_group
        over = p.budget.kv_cache + p.budget.reserve
        tight = p.replace(budget=Budget(small.weight_bytes + over - 1, p.budget.context, p.budget.reserve,
                                        p.budget.kv_bytes_per_token))
        with pytest.raises(InfeasibleBudget, match="smallest feasible plan") as err:
            tight.check_feasible()
        assert err.value.min_memory == small.weight_bytes + over
        p.replace(budget=Budget(small.weight_bytes + over, p.budget.context, p.budget.reserve,
                                p.budget.kv_bytes_per_token)).check_feasible()
        slow = p.replace(speed=Speed(bandwidth=float(small.read_per_token - 1), tokens_per_s=1.0))
        with pytest.raises(InfeasibleBudget, match="tokens/s"):
            slow.check_feasible()


# ---------------------------------------------------------------------------------------------
# candidate filters

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.floats(0, 10, allow_nan=False)), min_size=1, max_size=8))
def test_pareto_and_hull(points):
    b = np.array([x for x, _ in points])
    c = np.array([y for _, y in points])
    ok, dom = pareto(b, c)
    assert ok.any()
    for i in range(len(b)):
        g = dom[i]
        assert ok[g] and b[g] <= b[i] and c[g] <= c[i]
        if ok[i]:  # nothing strictly better
            assert not any((b[j] <= b[i] and c[j] <= c[i] and (b[j] < b[i] or c[j] < c[i])) for j in range(len(b)))
    hull = lower_hull(b, c)
    assert all(ok[h] or any(ok[j] and b[j] == b[h] and c[j] == c[h] for j in range(len(b))) for h in hull)
    # every price picks a hull point: min c + lam b is attained on the hull
    for lam in (0.0, 0.01, 0.1, 1.0, 10.0):
        assert min(c[h] + lam * b[h] for h in hull) == pytest.approx(min(c + lam * b))
    assert pareto_mask(b, c).tolist() == ok.tolist()


# ---------------------------------------------------------------------------------------------
# the synthetic profile

def test_synthetic_profile_is_labelled_and_realistic():
    inv = toy_inventory(n_layers=4, first_dense=1, n_experts=16, n_group=4, topk_group=2, top_k=4)
    prof = synthetic_profile(inv, seed=7)
    assert prof.synthetic and prof.meta["synthetic"] is True and "SYNTHETIC" in prof.meta["label"]
    assert prof.formats == list(SYNTHETIC_FORMATS)
    for layer, s in prof.experts.items():
        assert sum(s.freq) == pytest.approx(inv.top_k)
        assert max(s.freq) <= 1.0
        assert s.paper_importance == pytest.approx([0.5 * f + 0.5 * m for f, m in zip(s.freq, s.mean_score)])
        # removal cost follows frequency (rank correlation clearly positive)
        rf = np.argsort(np.argsort(s.freq))
        rr = np.argsort(np.argsort(s.removal_kl))
        assert np.corrcoef(rf, rr)[0, 1] > 0.3
        ks = sorted(prof.topk_cost[layer])
        cost = [prof.topk_cost[layer][k] for k in ks]
        assert ks == list(range(1, inv.top_k + 1)) and cost[-1] == 0.0
        assert all(a > b for a, b in zip(cost, cost[1:]))  # decreasing
        assert all(cost[i - 1] - cost[i] >= cost[i] - cost[i + 1] for i in range(1, len(cost) - 1))  # convex
    # damage follows the reference error ranking for a Gaussian-like tensor (up to the tail weight)
    name = "model.layers.0.mlp.down_proj.weight"
    d = prof.tensor_damage[name]
    assert d["Q2_K"] > d["Q3_K"] > d["Q4_K"] > d["Q5_K"] > d["Q6_K"] > d["Q8_0"] > d["F16"]
    # routed experts are less sensitive per parameter than attention
    att = np.mean([prof.tensor_damage[t.name]["Q4_K"] / t.numel for t in inv if t.role is Role.ATTENTION])
    exp = np.mean([prof.tensor_damage[t.name]["Q4_K"] / t.numel for t in inv if t.role is Role.ROUTED_EXPERT])
    assert att > 4 * exp
    again = synthetic_profile(inv, seed=7)
    assert again.tensor_damage == prof.tensor_damage


def test_synthetic_damage_uses_the_stored_format():
    # rows of 128 values: no 256-block format fits, so Q2_K and Q3_K are stored as Q4_0 (same damage)
    inv = toy_inventory(hidden=128, moe_inter=128, dense_inter=128)
    prof = synthetic_profile(inv, ["Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_0"])
    t = "model.layers.1.mlp.experts.0.down_proj.weight"
    d = prof.tensor_damage[t]
    assert d["Q2_K"] == d["Q3_K"] == d["Q4_0"]
    assert d["Q4_K"] == d["Q5_0"]
    assert relative_error("Q2_K") == pytest.approx(RMSE_GAUSSIAN["Q2_K"] ** 2)


def test_synthetic_profile_saves_and_loads(tmp_path):
    inv = toy_inventory()
    prof = synthetic_profile(inv, ["Q2_K", "Q4_K"])
    prof.save(tmp_path / "p.json")
    back = Profile.load(tmp_path / "p.json")
    assert back.synthetic and back.meta["label"] == prof.meta["label"]
    assert back.tensor_damage == prof.tensor_damage
    with pytest.raises(ValueError, match="unknown format"):
        synthetic_profile(inv, ["Q2_K", "Q4_1_X"])


@pytest.mark.parametrize("k", [0, 99])
def test_evaluate_refuses_a_top_k_that_is_not_an_option(k):
    """A top-k without a cost is an error naming the layer, not the cost of a neighbouring top-k."""
    inv = toy_inventory(n_layers=2, first_dense=0, n_experts=4, top_k=2, hidden=256, moe_inter=256, vocab=32,
                        attention=False, shared_expert=False)
    p = Problem.build(inv, synthetic_profile(inv, ["Q4_K", "Q8_0"]), Budget(10**12, 0, 0), "free", ["Q4_K", "Q8_0"])
    a = p.minimum()
    p.evaluate(a)
    a.topk[1] = k
    with pytest.raises(ValueError, match=rf"layer {p.layers[1].layer} has top-k {k}, which is not an option"):
        p.evaluate(a)
    assert any(msg.startswith("topk_choice") for msg in p.check(a))
