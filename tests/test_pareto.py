"""Measured Pareto curves (allocator.cli.pareto), `moeplan sweep --measure` and notebooks/pareto.ipynb."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest

from moeplan.kernels.inventory import MODELS_DIR

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-deepseek-v3"
MODEL_DIR = MODELS_DIR / MODEL
needs_model = pytest.mark.skipif(not ((MODEL_DIR / "model.safetensors").exists() and (MODEL_DIR / "profile.json").exists()),
                                 reason="the shipped tiny-deepseek-v3 checkpoint and profile are not in this checkout")


@pytest.fixture(scope="module")
def shipped():
    """(inventory, profile, evaluator on 256 held-out tokens, BF16 bytes) of the shipped model."""
    from moeplan.allocator.cli.evaluation import Evaluator
    from moeplan.sensitivity.profile import Profile

    ev = Evaluator(MODEL, eval_tokens=256, seq_len=128)
    prof = Profile.load(MODEL_DIR / "profile.json")
    return ev.inventory, prof, ev, ev.inventory.bytes_uniform("BF16")


def _plan(b):
    from moeplan.allocator.plan import make_plan

    return make_plan(b.problem, b.assignment, {"solver": b.name, "status": "baseline", "wall_s": 0.0})


def _factory(inv, prof, target="gguf"):
    from moeplan.allocator.sweep import ProblemFactory

    return ProblemFactory(inv, prof, target, None, 0, 0)


# ---------------------------------------------------------------------------------------------
# measuring

@needs_model
def test_a_plan_that_keeps_the_bf16_weights_measures_zero(shipped):
    from moeplan.allocator.baselines import uniform

    inv, prof, ev, bf16 = shipped
    plan = _plan(uniform(_factory(inv, prof)(2 * bf16), "BF16"))
    assert set(plan.tensors.values()) == {"BF16"} and plan.totals.kept_experts == plan.totals.total_experts
    r = ev(plan)
    assert r.kld_mean < 1e-6 and r.kld_p99 < 1e-5
    assert r.top1_agreement == 1.0
    assert math.isclose(r.perplexity, ev.reference_perplexity, rel_tol=1e-5)
    assert r.n_tokens == ev.n_tokens == 254  # two windows of 128 tokens predict 127 each


@needs_model
def test_measure_fills_every_row_that_has_a_plan_and_only_those(shipped):
    from moeplan.allocator.cli.pareto import MEASURED_COLUMNS, measure
    from moeplan.allocator.sweep import sweep

    inv, prof, ev, bf16 = shipped
    plans: dict = {}
    budgets = [int(0.03 * bf16), int(0.2 * bf16)]  # 3%: nothing fits
    df = sweep(_factory(inv, prof), budgets, uniform_formats=["Q4_K"], plans=plans)
    assert set(plans) == set(df.index[df["status"].isin(["optimal", "feasible", "baseline"])])
    assert (df["status"] == "infeasible").any()
    out = measure(df, plans, evaluator=ev)
    assert "measured_kld" not in df  # the input table is left as it was
    for c in MEASURED_COLUMNS:
        assert c in out
    has = out.index.isin(list(plans))
    m = out[has]
    assert m["measured_kld"].notna().all() and (m["measured_kld"] >= 0).all()
    assert ((m["top1_agreement"] >= 0) & (m["top1_agreement"] <= 1)).all()
    assert (m["perplexity"] > 0).all() and (m["eval_tokens"] == ev.n_tokens).all()
    assert out.loc[~has, list(MEASURED_COLUMNS)].isna().all().all()
    ours = out[out["method"] == "moeplan"].dropna(subset=["weight_bytes"])
    assert len(ours) == 1 and (ours["weight_bytes"] <= ours["weight_budget_bytes"]).all()
    # the plans measured are the table's plans: the sizes agree
    for i, p in plans.items():
        assert p.totals.weight_bytes == out.loc[i, "weight_bytes"]
        assert math.isclose(p.damage.total, out.loc[i, "damage"], rel_tol=1e-9, abs_tol=1e-12)


@needs_model
def test_measure_a_list_of_plans_and_identical_plans_are_evaluated_once(shipped):
    from moeplan.allocator.baselines import uniform
    from moeplan.allocator.cli.pareto import measure

    inv, prof, ev, bf16 = shipped
    p = _factory(inv, prof)(bf16)
    q4 = _plan(uniform(p, "Q4_K"))
    before = ev.evaluations
    out = measure([q4, q4], evaluator=ev)
    assert list(out["method"]) == ["uniform Q4_K", "uniform Q4_K"]
    assert ev.evaluations - before <= 1
    assert out["measured_kld"].iloc[0] == out["measured_kld"].iloc[1] > 0


@needs_model
def test_a_plan_for_another_model_is_refused(shipped):
    from moeplan.allocator.baselines import uniform
    from moeplan.allocator.plan import PlanError

    inv, prof, ev, bf16 = shipped
    plan = _plan(uniform(_factory(inv, prof)(bf16), "Q8_0"))
    other = plan.model_copy(update={"model": plan.model.model_copy(update={"fingerprint": "0" * 16})})
    with pytest.raises(PlanError, match="another model"):
        ev(other)


@pytest.mark.skipif(not (MODELS_DIR / "tiny-qwen3-moe" / "model.safetensors").exists(),
                    reason="the shipped tiny-qwen3-moe checkpoint is not in this checkout")
def test_a_layer_may_keep_fewer_experts_than_the_original_top_k(tmp_path):
    """Free target, no expert groups: layer 0 keeps 3 of 16 experts with top-k 3 (< the original 4);
    measured in memory, and written as safetensors that load back with the same output."""
    from moeplan.allocator.baselines import uniform
    from moeplan.allocator.cli.evaluation import Evaluator
    from moeplan.sensitivity.profile import Profile

    ev = Evaluator("tiny-qwen3-moe", eval_tokens=128)
    prof = Profile.load(MODELS_DIR / "tiny-qwen3-moe" / "profile.json")
    inv = ev.inventory
    b = uniform(_factory(inv, prof, "free")(inv.bytes_uniform("BF16")), "Q8_0")
    a = b.assignment.copy()
    a.keep[0, 3:] = False
    a.expert_fmt[0, 3:] = -1
    a.topk[0] = 3
    assert not b.problem.check(a)
    from moeplan.allocator.plan import make_plan

    plan = make_plan(b.problem, a, {"solver": "test", "status": "baseline", "wall_s": 0.0})
    assert plan.layers[0].kept == [0, 1, 2] and plan.layers[0].top_k == 3 < inv.top_k
    r = ev(plan)
    assert 0 < r.kld_mean < 10 and 0 < r.top1_agreement < 1

    import copy

    import torch

    from moeplan.allocator.cli.materialize import load_compressed, materialize
    from moeplan.sensitivity.compress import Decision, apply_decision

    materialize(str(MODELS_DIR / "tiny-qwen3-moe"), plan, hf_out=tmp_path / "hf", progress=False)
    restored = load_compressed(tmp_path / "hf")
    mem = apply_decision(copy.deepcopy(ev.original), Decision.from_plan(plan), ev.importance)
    ids = torch.arange(48).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(restored(input_ids=ids).logits, mem(input_ids=ids).logits)


def test_measuring_needs_a_checkpoint_with_weights(capsys):
    from moeplan.allocator.cli import main
    from moeplan.allocator.cli.evaluation import Evaluator

    with pytest.raises(ValueError, match="checkpoint with weights"):
        Evaluator("deepseek-v3")  # a bundled config.json, no weights
    assert main(["sweep", "deepseek-v3", "--synthetic-profile", "--budgets", "400GB", "--measure"]) == 2
    assert "--measure needs a checkpoint with weights" in capsys.readouterr().err
    assert main(["sweep", "deepseek-v3", "--synthetic-profile", "--budgets", "400GB", "--eval-text", "x.txt"]) == 2


# ---------------------------------------------------------------------------------------------
# quantization only

@needs_model
@pytest.mark.parametrize("target", ["gguf", "free"])
def test_quantization_only_never_prunes_nor_changes_top_k(shipped, target):
    from moeplan.allocator.cli.pareto import quantization_only_factory, quantization_only_sweep, smallest_unpruned
    from moeplan.allocator.sweep import sweep

    inv, prof, _, bf16 = shipped
    qf = quantization_only_factory(inv, prof, target)
    assert qf(bf16).topk_values.tolist() == [inv.top_k]
    floor = smallest_unpruned(qf(bf16))
    budgets = [int(f * bf16) for f in (0.077, 0.12, 0.16, 0.25, 0.35)]
    plans: dict = {}
    df = quantization_only_sweep(qf, budgets, plans)
    assert len(df) == len(budgets)
    below = df[df["weight_budget_bytes"] < floor]
    assert len(below) >= 1 and (below["status"] == "infeasible").all()
    assert (below["min_memory_bytes"] == floor).all()
    assert len(plans) == len(budgets) - len(below) >= 3
    for i, plan in plans.items():
        assert plan.totals.kept_experts == plan.totals.total_experts
        assert all(len(l.kept) == l.n_experts and l.top_k == inv.top_k for l in plan.layers)
        assert plan.damage.pruning == 0 and plan.damage.top_k == 0
        assert plan.totals.weight_bytes <= df.loc[i, "weight_budget_bytes"]
    # a restriction of moeplan's problem: never better than moeplan's proven bound at the same budget,
    # and at the smallest budget it fits, moeplan itself does prune or lower top-k
    full = sweep(_factory(inv, prof, target), budgets, baselines=False)
    for b in budgets:
        q = df[(df["memory_bytes"] == b) & df["damage"].notna()] if "damage" in df else df.iloc[:0]
        f = full[full["memory_bytes"] == b]
        if len(q):
            assert float(q["damage"].iloc[0]) >= float(f["bound"].iloc[0]) - 1e-12
    smallest_full = full[full["status"] != "infeasible"].iloc[0]
    assert smallest_full["weight_budget_bytes"] < floor  # feasible only with pruning
    assert smallest_full["kept_experts"] < len(inv.moe_layers) * len(inv.experts_in_layer(inv.moe_layers[0]))


def test_quantization_only_profile_keeps_the_tensor_damage():
    from moeplan.allocator.cli.pareto import REMOVAL_FORBIDDEN, quantization_only_profile
    from moeplan.kernels.inventory import build_inventory
    from moeplan.sensitivity.synthetic import synthetic_profile

    inv = build_inventory("deepseek-v3")
    prof = synthetic_profile(inv, ["Q2_K", "Q4_K"], seed=0)
    q = quantization_only_profile(prof, inv)
    assert q.tensor_damage is prof.tensor_damage or q.tensor_damage == prof.tensor_damage
    assert all(set(v) == {inv.top_k} for v in q.topk_cost.values()) and set(q.topk_cost) == set(inv.moe_layers)
    assert all(min(s.removal_kl) == REMOVAL_FORBIDDEN for s in q.experts.values())
    assert all(min(s.removal_kl) < REMOVAL_FORBIDDEN / 10 for s in prof.experts.values())  # the original is intact


# ---------------------------------------------------------------------------------------------
# the goal table (no model needed)

def _table():
    rows = [
        # method, status, budget, weight bytes, measured
        ("moeplan (free)", "feasible", 100, 99, 0.010),
        ("moeplan (gguf)", "feasible", 100, 98, 0.020),
        ("moeplan (free)", "feasible", 200, 199, 0.001),
        ("moeplan (gguf)", "feasible", 200, 190, 0.002),
        ("moeplan (free)", "infeasible", 50, None, None),
        ("paper pipeline (2509.25689)", "baseline", 100, 97, 0.030),
        ("paper pipeline (2509.25689)", "baseline", 200, 195, 0.025),
        ("uniform Q2_K", "baseline", None, 120, 0.005),  # too big for 100, best at 200
        ("uniform Q4_K", "baseline", None, 201, 0.0001),  # fits no budget
        ("llama.cpp Q2_K", "baseline", None, 90, 0.040),
        ("uniform IQ1_M", "baseline", None, 60, None),  # not measured: ignored
    ]
    df = pd.DataFrame(rows, columns=["method", "status", "weight_budget_bytes", "weight_bytes", "measured_kld"])
    df["bf16_bytes"] = 1000
    return df


def test_goal_table_compares_with_the_best_baseline_that_fits():
    from moeplan.allocator.cli.pareto import goal_markdown, goal_table

    g = goal_table(_table()).set_index("weight_budget_bytes")
    assert list(g.index) == [50, 100, 200]
    assert pd.isna(g.loc[50, "best_baseline"]) and math.isnan(g.loc[50, "ratio moeplan (free)"])
    assert g.loc[100, "best_baseline"] == "paper pipeline (2509.25689)" and g.loc[100, "best_baseline_kld"] == 0.030
    assert g.loc[200, "best_baseline"] == "uniform Q2_K" and g.loc[200, "best_baseline_bytes"] == 120
    assert g.loc[100, "ratio moeplan (free)"] == pytest.approx(1 / 3)
    assert g.loc[100, "ratio moeplan (gguf)"] == pytest.approx(2 / 3)
    assert g.loc[200, "ratio moeplan (gguf)"] == pytest.approx(0.4)
    assert g.loc[200, "ratio moeplan (free)"] == pytest.approx(0.2)
    assert bool(g.loc[100, "meets moeplan (gguf)"]) and bool(g.loc[200, "meets moeplan (free)"])
    md = goal_markdown(goal_table(_table(), ratio=0.5))
    assert "moeplan (gguf): ratio <= 0.5 at 1 of 2 budgets" in md and "not met at: 10.0%" in md
    assert "none fits" in md and "No baseline fits 1 budget(s) (5.0% of BF16)" in md


def test_goal_table_needs_measured_columns():
    from moeplan.allocator.cli.pareto import goal_table

    with pytest.raises(ValueError, match="measure it first"):
        goal_table(_table().drop(columns=["measured_kld"]))


# ---------------------------------------------------------------------------------------------
# files, command line and notebook

@needs_model
def test_sweep_measure_command_writes_measured_columns_and_plot(tmp_path, shipped):
    from moeplan.allocator.cli import main

    inv, prof, _, bf16 = shipped
    csv, png = tmp_path / "s.csv", tmp_path / "s.png"
    rc = main(["sweep", MODEL, "--profile", str(MODEL_DIR / "profile.json"), "--target", "gguf", "--context", "0",
               "--reserve", "0", "--budgets", f"{int(0.25 * bf16)}", "--no-baselines", "--measure",
               "--eval-tokens", "256", "--out-csv", str(csv), "--out-png", str(png)])
    assert rc == 0
    df = pd.read_csv(csv)
    assert {"measured_kld", "kld_p99", "perplexity", "top1_agreement", "damage"} <= set(df.columns)
    assert len(df) == 1 and df["measured_kld"].iloc[0] > 0 and df["eval_tokens"].iloc[0] == 254
    assert png.stat().st_size > 10_000


@needs_model
def test_notebook_runs_and_shows_the_table_the_plot_and_the_goal(monkeypatch):
    """notebooks/pareto.ipynb, with a smaller parameter cell (2 budgets, 2 uniform formats, 256 tokens)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    nb = nbformat.read(ROOT / "notebooks" / "pareto.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    params[0].source = ('MODEL = "tiny-deepseek-v3"\nFRACTIONS = [103 / 1342, 0.25]\nEVAL_TOKENS = 256\n'
                        'UNIFORM = ["Q2_K", "Q4_K"]\n')
    # the kernel imports this checkout's packages
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "measured_kld" in html and "moeplan (gguf)" in html and "uniform Q4_K" in html
    assert any("image/png" in o.get("data", {}) for o in outputs)
    md = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "best baseline <= budget" in md and "moeplan (free): ratio <= 0.7 at" in md
    text = "".join(o.get("text", "") for o in outputs)
    assert "plans measured on 254 tokens" in text
