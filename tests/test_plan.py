"""The plan file: byte-identical round trip, field-naming rejection of malformed plans, the model
fingerprint, the shipped schema, llama-quantize export."""

from __future__ import annotations

import json
import re

import pytest

from moeplan.allocator.plan import (SCHEMA_PATH, Plan, PlanError, assignment_from_plan, make_plan, schema_text,
                            validate_json_schema)
from moeplan.allocator.problem import Budget, Problem
from moeplan.allocator.solvers import solve
from moeplan.sensitivity.synthetic import synthetic_profile, toy_inventory


@pytest.fixture(scope="module")
def solved():
    inv = toy_inventory(n_layers=3, first_dense=1, n_experts=6, n_group=2, topk_group=1, top_k=2)
    prof = synthetic_profile(inv, ["Q2_K", "Q4_K", "Q8_0"], seed=2)
    out = {}
    for target in ("free", "gguf"):
        p = Problem.build(inv, prof, Budget(10**6, context=8, reserve=0, kv_bytes_per_token=inv.kv_cache_bytes_per_token()),
                          target, ["Q2_K", "Q4_K", "Q8_0"])
        sol = solve(p, "highs", time_limit=20, threads=1)
        out[target] = (inv, p, sol, make_plan(p, sol.assignment, sol.report()))
    return out


@pytest.mark.parametrize("target", ["free", "gguf"])
def test_round_trip_is_byte_identical(solved, tmp_path, target):
    inv, p, sol, plan = solved[target]
    path = tmp_path / "plan.json"
    plan.save(path)
    first = path.read_bytes()
    back = Plan.load(path, inventory=inv)
    back.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == first
    assert first.endswith(b"\n")
    # and the plan means the same assignment
    a = assignment_from_plan(p, back)
    assert p.objective(a) == pytest.approx(sol.objective, rel=1e-12)
    assert back.damage.total == pytest.approx(sol.objective, rel=1e-12)
    assert back.totals.weight_bytes == sol.totals.weight_bytes <= back.budget.weight_budget_bytes
    assert back.profile.synthetic and back.damage.synthetic


def test_plan_contents(solved):
    inv, p, sol, plan = solved["gguf"]
    assert plan.target == "gguf" and plan.model.fingerprint == inv.fingerprint
    assert {l.layer for l in plan.layers} == {1, 2}
    kept = {len(l.kept) for l in plan.layers}
    assert len(kept) == 1 and len({l.top_k for l in plan.layers}) == 1
    assert set(plan.stacked) == {f"blk.{l}.ffn_{k}_exps.weight" for l in (1, 2) for k in ("gate", "up", "down")}
    for name, f in plan.stacked.items():
        layer = int(name.split(".")[1])
        kind = name.split(".")[2].split("_")[1] + "_proj"
        lp = next(l for l in plan.layers if l.layer == layer)
        assert all(plan.tensors[f"model.layers.{layer}.mlp.experts.{e}.{kind}.weight"] == f for e in lp.kept)
    pruned = [f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(6)
              if e not in plan.layers[0].kept]
    assert all(n not in plan.tensors for n in pruned)
    assert plan.solver.solver == "highs" and plan.solver.status == "optimal"


def _obj(solved, target="gguf"):
    return json.loads(solved[target][3].to_json_text())


@pytest.mark.parametrize("edit, field", [
    (lambda o: o.pop("budget"), "budget"),
    (lambda o: o["budget"].update(memory_bytes="lots"), "budget.memory_bytes"),
    (lambda o: o["budget"].update(reserve_bytes=o["budget"]["reserve_bytes"] + 1), "budget"),
    (lambda o: o.update(colour="blue"), "colour"),
    (lambda o: o["layers"][0].update(kept=[3, 1]), "layers.0"),
    (lambda o: o["layers"][0].update(top_k=99), "layers.0"),
    (lambda o: o["damage"].update(total=o["damage"]["total"] + 1), "damage"),
    (lambda o: o["tensors"].update({"model.embed_tokens.weight": "Q9_Z"}), "tensors"),
    (lambda o: o.update(target="onnx"), "target"),
    (lambda o: o["layers"][1].update(top_k=1), "(plan)"),
    (lambda o: o["totals"].update(kept_experts=1), "(plan)"),
    (lambda o: o["solver"].update(status="great"), "solver.status"),
])
def test_malformed_plans_are_rejected_naming_the_field(solved, edit, field):
    obj = _obj(solved)
    if field == "(plan)" and obj["layers"][1]["top_k"] == 1:
        obj["layers"][1]["top_k"] = 2
    edit(obj)
    with pytest.raises(PlanError) as err:
        Plan.from_obj(obj, "plan.json")
    assert f"field '{field}" in str(err.value)


def test_not_a_plan(tmp_path, solved):
    with pytest.raises(PlanError, match="not JSON"):
        Plan.from_json_text("{", "x.json")
    obj = _obj(solved)
    obj["version"] = 99
    with pytest.raises(PlanError, match="field 'version'.*re-run"):
        Plan.from_obj(obj)
    obj = _obj(solved)
    obj["format"] = "recipe"
    with pytest.raises(PlanError, match="field 'format'"):
        Plan.from_obj(obj)


def test_a_plan_refuses_another_model(solved, tmp_path):
    inv, p, sol, plan = solved["free"]
    plan.save(tmp_path / "plan.json")
    other = toy_inventory(n_layers=3, first_dense=1, n_experts=8, n_group=2, topk_group=1, top_k=2)
    with pytest.raises(PlanError, match="model.fingerprint.*another model"):
        Plan.load(tmp_path / "plan.json", inventory=other)


def test_shipped_schema_is_the_models(solved):
    assert SCHEMA_PATH.read_text() == schema_text(), "run `python -m moeplan.allocator.plan --write-schema`"
    obj = _obj(solved)
    assert validate_json_schema(obj) == []
    obj["budget"]["memory_bytes"] = "lots"
    del obj["damage"]
    errors = validate_json_schema(obj)
    assert any("budget.memory_bytes" in e for e in errors) and any("damage" in e for e in errors)


def _unpruned(plan: Plan) -> Plan:
    """`plan` with every expert kept (the stacked formats stand for all of them)."""
    obj = json.loads(plan.to_json_text())
    for l in obj["layers"]:
        l["kept"] = list(range(l["n_experts"]))
    obj["totals"]["kept_experts"] = sum(l["n_experts"] for l in obj["layers"])
    return Plan.from_obj(obj)


def test_llama_quantize_arguments(solved):
    inv, p, sol, pruned = solved["gguf"]
    plan = _unpruned(pruned)
    text = plan.llama_quantize_args()
    lines = [l for l in text.splitlines() if not l.startswith("#")]
    tt = [l for l in lines if l.startswith("--tensor-type ")]
    pats = {}
    for l in tt:
        m = re.fullmatch(r"--tensor-type \^(.+)\$=([A-Z0-9_]+)", l)
        assert m, l
        pats[m.group(1).replace("\\", "")] = m.group(2)
    # every quantizable GGUF tensor once; kv_b is split in two; experts appear as stacked tensors
    assert pats["token_embd.weight"] == plan.tensors["model.embed_tokens.weight"]
    assert pats["output.weight"] == plan.tensors["lm_head.weight"]
    assert pats["blk.2.ffn_down_exps.weight"] == plan.stacked["blk.2.ffn_down_exps.weight"]
    assert not any("experts" in k for k in pats)
    kept = len(plan.layers[0].kept)
    assert f"--override-kv deepseek2.expert_count=int:{kept}" in lines
    assert f"--override-kv deepseek2.expert_used_count=int:{plan.layers[0].top_k}" in lines
    assert "SYNTHETIC" in text


def test_llama_quantize_arguments_refuse_a_plan_that_prunes(solved):
    # llama-quantize keeps every expert tensor: with expert_count overridden its file would not load
    # (check_tensor_dims: blk.1.ffn_gate_inp.weight wrong shape), so a pruning plan is refused
    inv, p, sol, plan = solved["gguf"]
    assert any(len(l.kept) < l.n_experts for l in plan.layers), "the fixture's gguf plan should prune"
    with pytest.raises(PlanError, match=r"removes experts \(layer \d+ keeps \d+ of 6\).*moeplan materialize") as exc:
        plan.llama_quantize_args()
    assert "\n" not in str(exc.value)


def test_free_plans_with_mixed_expert_formats_have_no_gguf_form(solved):
    inv, p, sol, plan = solved["free"]
    obj = json.loads(plan.to_json_text())
    names = [n for n in obj["tensors"] if ".experts." in n and n.startswith("model.layers.1.")]
    obj["tensors"][names[0]] = "Q8_0" if obj["tensors"][names[0]] != "Q8_0" else "Q2_K"
    with pytest.raises(PlanError, match="target gguf"):
        Plan.from_obj(obj).llama_quantize_args()
