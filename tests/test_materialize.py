"""materialize: plan -> GGUF + safetensors on the shipped reference model, checked end to end."""

import copy
import json

import pytest
import torch

from moeplan.kernels.inventory import MODELS_DIR, build_inventory

MODEL = "tiny-deepseek-v3"
pytestmark = pytest.mark.skipif(not (MODELS_DIR / MODEL / "profile.json").exists(),
                                reason=f"the shipped {MODEL} model and profile are not in this checkout")


@pytest.fixture(scope="module")
def setup():
    from moeplan.allocator import solve
    from moeplan.allocator.plan import make_plan
    from moeplan.allocator.sweep import ProblemFactory
    from moeplan.sensitivity.profile import Profile

    path = MODELS_DIR / MODEL
    inv = build_inventory(path)
    profile = Profile.load(path / "profile.json")
    bf16 = inv.bytes_uniform("BF16")
    factory = ProblemFactory(inv, profile, target="gguf", context=128, reserve=0)
    p = factory(int(0.2 * bf16) + 128 * inv.kv_cache_bytes_per_token())
    sol = solve(p, "lagrangian")
    return path, inv, make_plan(p, sol.assignment, sol.report())


def test_gguf_bytes_equal_the_plan(setup, tmp_path):
    import gguf

    from moeplan.allocator.cli.materialize import materialize

    path, inv, plan = setup
    rep = materialize(str(path), plan, gguf_out=tmp_path / "m.gguf", progress=False)
    # the plan counts every tensor, the writer the tensors it stores: equal to the byte
    assert rep.gguf.total_tensor_bytes == plan.totals.weight_bytes
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert sum(int(t.n_bytes) for t in reader.tensors) == plan.totals.weight_bytes
    n_kept = {len(l.kept) for l in plan.layers}.pop()
    field = reader.get_field("deepseek2.expert_count")
    assert int(field.parts[field.data[0]][0]) == n_kept


def test_hf_checkpoint_loads_and_evaluates_like_the_in_memory_model(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from moeplan.allocator.cli.materialize import load_compressed, materialize
    from moeplan.sensitivity.compress import Decision, apply_decision
    from moeplan.sensitivity.importance import load_importance

    path, inv, plan = setup
    materialize(str(path), plan, hf_out=tmp_path / "hf", progress=False)
    ids = torch.arange(64).unsqueeze(0) % 4000
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    restored = load_compressed(tmp_path / "hf")
    original = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    importance = load_importance(path / "profile.importance.safetensors")
    mem = apply_decision(copy.deepcopy(original), Decision.from_plan(plan), importance)
    with torch.inference_mode():
        want = mem(input_ids=ids).logits
        assert torch.equal(restored(input_ids=ids).logits, want)
        assert torch.equal(loaded(input_ids=ids).logits, want)  # same counts and top-k in every layer
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["moeplan"]["target"] == "gguf"


def test_plan_for_another_model_is_refused_before_writing(setup, tmp_path):
    from moeplan.allocator.plan import Plan
    from moeplan.allocator.cli.materialize import materialize

    path, inv, plan = setup
    other = Plan.from_obj({**plan.model_dump(mode="json"),
                           "model": {**plan.model.model_dump(mode="json"), "fingerprint": "0" * 16}})
    with pytest.raises(ValueError, match="fingerprint"):
        materialize(str(path), other, gguf_out=tmp_path / "x.gguf", hf_out=tmp_path / "hf", progress=False)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "hf").exists()


def test_free_target_plan_cannot_become_gguf(setup, tmp_path):
    from moeplan.allocator.plan import Plan
    from moeplan.allocator.cli.materialize import materialize

    path, inv, plan = setup
    free = Plan.from_obj({**plan.model_dump(mode="json"), "target": "free", "stacked": {}})
    with pytest.raises(ValueError, match="target gguf"):
        materialize(str(path), free, gguf_out=tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_hf_writer_streams_and_prunes_group_limited_experts(setup, tmp_path, monkeypatch):
    # the seed paper's pipeline prunes a quarter of every group (router rows and correction bias
    # sliced); the writer never loads the model, and the checkpoint computes what the in-memory
    # compressed model computes
    from transformers import AutoModelForCausalLM

    from moeplan.allocator import paper_baseline
    from moeplan.allocator.plan import make_plan
    from moeplan.allocator.sweep import ProblemFactory
    from moeplan.allocator.cli.materialize import load_compressed, materialize
    from moeplan.sensitivity.compress import Decision, apply_decision
    from moeplan.sensitivity.profile import Profile
    from moeplan.sensitivity.importance import load_importance

    path, inv, _ = setup
    profile = Profile.load(path / "profile.json")
    p = ProblemFactory(inv, profile, target="gguf", context=0, reserve=0)(int(0.15 * inv.bytes_uniform("BF16")))
    b = paper_baseline(p)
    assert b.feasible
    plan = make_plan(b.problem, b.assignment, {"solver": "paper", "status": "baseline", "wall_s": 0.0})
    assert all(len(l.kept) < l.n_experts for l in plan.layers)
    original = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def refuse(*a, **k):
        raise AssertionError("write_hf loaded the whole model")

    with monkeypatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
        materialize(str(path), plan, hf_out=tmp_path / "hf", progress=False)
    restored = load_compressed(tmp_path / "hf")
    mem = apply_decision(copy.deepcopy(original), Decision.from_plan(plan),
                         load_importance(path / "profile.importance.safetensors"))
    ids = torch.arange(64).unsqueeze(0) % 4000
    with torch.inference_mode():
        assert torch.equal(restored(input_ids=ids).logits, mem(input_ids=ids).logits)
    assert restored.config.n_routed_experts == len(plan.layers[0].kept)
