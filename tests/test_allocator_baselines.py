"""Baselines (uniform, the seed paper's pipeline, llama.cpp's mixes), the sweep and the CLI."""

from __future__ import annotations


import numpy as np
import pytest

from moeplan.allocator import cli
from moeplan.allocator.baselines import (LLAMA_DEFAULT, _more_bits, llama_mix, llama_mix_types, paper_baseline,
                                 paper_pipeline, uniform, widen)
from moeplan.allocator.plan import Plan
from moeplan.allocator.problem import Budget, Problem
from moeplan.allocator.solvers import solve
from moeplan.allocator.sweep import PAPER_RATIO, ProblemFactory, budgets_between, sweep, write
from moeplan.kernels.inventory import build_inventory
from moeplan.sensitivity.synthetic import synthetic_profile, toy_inventory

MENU = ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0"]


@pytest.fixture(scope="module")
def toy():
    inv = toy_inventory(n_layers=4, first_dense=1, n_experts=8, n_group=2, topk_group=1, top_k=4)
    prof = synthetic_profile(inv, seed=5)
    return inv, prof


def _problem(inv, prof, target, memory, menu=MENU):
    return Problem.build(inv, prof, Budget(memory, context=8, reserve=0, kv_bytes_per_token=inv.kv_cache_bytes_per_token()),
                         target, menu)


def test_uniform_uses_the_inventory_bytes(toy):
    inv, prof = toy
    for target in ("free", "gguf"):
        p = _problem(inv, prof, target, 10**9)
        for f in ("Q2_K", "Q8_0", "Q5_K"):
            b = uniform(p, f)
            assert b.feasible and b.totals.weight_bytes == inv.bytes_uniform(f, target)
            assert b.totals.kept_experts == p.L * p.E
        assert "Q5_K" in widen(p, ["Q5_K"]).formats and widen(p, ["Q2_K"]) is p


def test_paper_pipeline(toy):
    inv, prof = toy
    for target in ("free", "gguf"):
        lo = _problem(inv, prof, target, 10**9)
        b = paper_baseline(lo)
        assert b.feasible
        a = b.assignment
        # 75% of each group kept, by I_e = 0.5 f + 0.5 s; top-k scaled by 0.75 (4 -> 3)
        assert (a.keep.reshape(lo.L, lo.n_group, -1).sum(2) == 3).all()
        assert (a.topk == 3).all()
        for li, lay in enumerate(lo.layers):
            imp = np.array(prof.experts[lay.layer].paper_importance).reshape(lo.n_group, -1)
            kept = a.keep[li].reshape(lo.n_group, -1)
            for g in range(lo.n_group):
                assert imp[g][kept[g]].min() >= imp[g][~kept[g]].max()
        # more budget never hurts the greedy; too little has no plan
        last = b.objective
        small = lo.evaluate(b.assignment).weight_bytes
        for mem in (small * 11 // 10, small * 13 // 10, small * 2):
            bb = paper_baseline(_problem(inv, prof, target, mem))
            assert bb.feasible and bb.totals.weight_bytes <= mem and bb.objective <= last + 1e-15
            last = bb.objective
        minimal = lo.evaluate(lo.minimum()).weight_bytes
        with pytest.raises(ValueError, match="no plan"):
            paper_pipeline(_problem(inv, prof, target, minimal))


def test_the_joint_optimum_beats_the_pipeline(toy):
    inv, prof = toy
    for target in ("free", "gguf"):
        for mem in (1_300_000, 2_000_000, 3_500_000):
            p = _problem(inv, prof, target, mem)
            b = paper_baseline(p)
            if not b.feasible:
                continue
            opt = solve(p, "highs", time_limit=30, threads=1, hint=b.assignment)
            assert opt.objective <= b.objective + 1e-12


def test_llama_mix_rules_on_deepseek():
    inv = build_inventory("deepseek-v3")
    t2 = llama_mix_types(inv, "Q2_K")
    t3 = llama_mix_types(inv, "Q3_K_M")
    t4 = llama_mix_types(inv, "Q4_K_M")
    assert t2["output.weight"] == t3["output.weight"] == t4["output.weight"] == "Q6_K"
    assert t2["token_embd.weight"] == "Q2_K" and t4["token_embd.weight"] == "Q4_K"
    assert t2["blk.10.attn_output.weight"] == "Q3_K" and t3["blk.10.attn_output.weight"] == "Q4_K"
    assert t4["blk.10.attn_output.weight"] == "Q4_K"
    assert t2["blk.30.ffn_down_exps.weight"] == "Q3_K" and t2["blk.30.ffn_gate_exps.weight"] == "Q2_K"
    # Q3_K_M: ffn_down in Q5_K in the first 61 / 16 = 3 layers, Q4_K after
    assert t3["blk.2.ffn_down.weight"] == "Q5_K" and t3["blk.3.ffn_down_exps.weight"] == "Q4_K"
    # Q4_K_M: ffn_down in Q6_K where use_more_bits(i, 61): i < 7, i >= 53, (i - 7) % 3 == 2
    assert [i for i in range(61) if t4[f"blk.{i}.ffn_down{'_exps' if i >= 3 else ''}.weight"] == "Q6_K"] == \
        [i for i in range(61) if _more_bits(i, 61)]
    assert [i for i in range(20) if _more_bits(i, 61)] == [0, 1, 2, 3, 4, 5, 6, 9, 12, 15, 18]
    # DeepSeek's split attn_k_b / attn_v_b match no attn_v rule: the preset's base type
    assert t4["blk.5.attn_k_b.weight"] == t4["blk.5.attn_v_b.weight"] == "Q4_K"
    assert t4["blk.5.ffn_up_shexp.weight"] == "Q4_K" and t4["blk.5.ffn_down_shexp.weight"] == "Q6_K"


def test_llama_mix_plans(toy):
    inv, prof = toy
    p = _problem(inv, prof, "gguf", 10**9)
    sizes = []
    for preset in LLAMA_DEFAULT:
        b = llama_mix(p, preset)
        assert b.feasible and b.totals.kept_experts == p.L * p.E
        sizes.append(b.totals.weight_bytes)
    assert sizes == sorted(sizes)  # Q2_K < Q3_K_M < Q4_K_M
    with pytest.raises(ValueError, match="unknown llama.cpp preset"):
        llama_mix(p, "Q9_K_Z")


def test_sweep_table_and_plot(toy, tmp_path):
    inv, prof = toy
    factory = ProblemFactory(inv, prof, "free", MENU, context=8, reserve=0)
    budgets = budgets_between(1_200_000, 4_000_000, 6)
    df = sweep(factory, budgets, uniform_formats=["Q4_K"])
    ours = df[df.method == "moeplan"]
    assert len(ours) == 6 and (ours.status.isin(["optimal", "feasible"])).all()
    d = ours.damage.to_numpy()
    assert (np.diff(d) <= 1e-12).all()  # more memory, less damage
    assert (ours.weight_bytes <= ours.weight_budget_bytes).all()
    paper = df[df.method.str.startswith("paper")]
    both = ours.merge(paper, on="memory_bytes", suffixes=("", "_paper"))
    feas = both[both.status_paper == "baseline"]
    assert len(feas) and (feas.bound <= feas.damage_paper + 1e-12).all()
    assert {"llama.cpp Q2_K", "uniform Q4_K"} <= set(df.method)
    write(df, tmp_path / "s.csv", tmp_path / "s.png", inv.bytes_uniform("BF16"), "toy")
    assert (tmp_path / "s.csv").read_text().startswith("# SYNTHETIC")
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert 0.076 < PAPER_RATIO < 0.077


# ---------------------------------------------------------------------------------------------
# the CLI, on a saved toy inventory


@pytest.fixture(scope="module")
def inv_file(tmp_path_factory, toy):
    path = tmp_path_factory.mktemp("cli") / "toy.json"
    toy[0].save(path)
    return path


def test_cli_help():
    for argv in (["--help"], ["solve", "--help"], ["sweep", "--help"], ["inventory", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0


def test_cli_inventory(inv_file, capsys):
    assert cli.main(["inventory", str(inv_file)]) == 0
    out = capsys.readouterr().out
    assert "routed_expert" in out and "MoE layers 3" in out


def test_cli_solve(inv_file, tmp_path, capsys):
    plan, args = tmp_path / "plan.json", tmp_path / "q.txt"
    rc = cli.main(["solve", str(inv_file), "--synthetic-profile", "--memory", "2000000", "--reserve", "0",
                   "--context", "8", "--target", "gguf", "--formats", "Q2_K,Q4_K,Q8_0", "--out", str(plan),
                   "--llama-quantize-args", str(args), "--dump-model", str(tmp_path / "m.lp")])
    # this budget prunes experts: the plan is written, the llama-quantize arguments are refused
    assert rc == 2
    captured = capsys.readouterr()
    assert "SYNTHETIC" in captured.out and "gap" in captured.out and "routed_expert" in captured.out
    p = Plan.load(plan)
    assert p.target == "gguf" and p.totals.weight_bytes <= 2000000
    assert any(len(l.kept) < l.n_experts for l in p.layers)
    assert "removes experts" in captured.err and "moeplan materialize" in captured.err
    assert not args.exists()
    assert (tmp_path / "m.lp").stat().st_size > 0
    # a budget that keeps every expert: the arguments are written
    rc = cli.main(["solve", str(inv_file), "--synthetic-profile", "--memory", "1GB", "--reserve", "0",
                   "--context", "8", "--target", "gguf", "--formats", "Q2_K,Q4_K,Q8_0", "--out", str(plan),
                   "--llama-quantize-args", str(args)])
    assert rc == 0
    assert all(len(l.kept) == l.n_experts for l in Plan.load(plan).layers)
    assert "--override-kv deepseek2.expert_count=int:8" in args.read_text()


def test_cli_solve_infeasible(inv_file, capsys):
    rc = cli.main(["solve", str(inv_file), "--synthetic-profile", "--memory", "1000", "--reserve", "0"])
    assert rc == 2
    assert "smallest feasible plan" in capsys.readouterr().err


def test_cli_bad_input(inv_file, capsys):
    for extra, words in ((["--formats", "Q9"], "--formats: unknown format 'Q9'"),
                         (["--memory", "12 parsecs"], "unknown size unit"),
                         (["--bandwidth", "100"], "--bandwidth and --tokens-per-s go together")):
        argv = ["solve", str(inv_file), "--synthetic-profile", "--memory", "1GB", *extra]
        assert cli.main(argv) == 2
        assert words in capsys.readouterr().err


def test_cli_sweep(inv_file, tmp_path, capsys):
    rc = cli.main(["sweep", str(inv_file), "--synthetic-profile", "--from", "1200000", "--to", "4000000",
                   "--steps", "4", "--reserve", "0", "--context", "8", "--out-csv", str(tmp_path / "s.csv"),
                   "--out-png", str(tmp_path / "s.png")])
    assert rc == 0
    assert (tmp_path / "s.png").exists() and "moeplan" in (tmp_path / "s.csv").read_text()


def test_cli_register_a_command(capsys):
    seen = {}
    cli.register(cli.Command("demo-test", "a test command", lambda ap: ap.add_argument("--x", type=int),
                             lambda args: seen.setdefault("x", args.x) and 0))
    try:
        assert cli.main(["demo-test", "--x", "7"]) == 0 and seen["x"] == 7
    finally:
        cli.COMMANDS[:] = [c for c in cli.COMMANDS if c.name != "demo-test"]
