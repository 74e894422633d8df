"""Profiler on tiny random MoE models: structure, exactness of the gain calibration, file round trip."""

import copy

import numpy as np
import pytest
import torch

from moeplan.sensitivity.compress import Decision, apply_decision, predicted_damage
from moeplan.sensitivity.evaluate import evaluate
from moeplan.sensitivity.profile import Profile
from moeplan.sensitivity.profiler import Profiler

FORMATS = ["Q4_0", "Q8_0", "BF16"]


def _tiny(family):
    from transformers import AutoModelForCausalLM, DeepseekV3Config, Qwen3MoeConfig

    if family == "deepseek_v3":
        cfg = DeepseekV3Config(vocab_size=256, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                               num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                               q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32)
    else:
        cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                             num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def profiled(request):
    model = _tiny(request.param)
    ids = torch.randint(0, 256, (8 * 32,), generator=torch.Generator().manual_seed(0))
    prof = Profiler(model, ids, seq_len=32, formats=FORMATS, calibration_formats=("Q4_0", "Q8_0"),
                    progress=False)
    profile, importance = prof.run("fp-test")
    return model, prof, profile, importance


def test_structure(profiled):
    model, prof, profile, importance = profiled
    assert profile.formats == FORMATS
    for name, d in profile.tensor_damage.items():
        assert set(d) == set(FORMATS)
        assert all(v >= 0 for v in d.values())
        assert name in importance
    total = {f: sum(d[f] for d in profile.tensor_damage.values()) for f in FORMATS}
    assert total["Q4_0"] > total["Q8_0"] > total["BF16"]
    for layer, stats in profile.experts.items():
        assert sum(stats.freq) == pytest.approx(2.0)  # top-k 2: a token uses 2 experts
        used = [kl for kl, f in zip(stats.removal_kl, stats.freq) if f > 0]
        assert all(kl > 0 for kl in used)
        assert profile.topk_cost[layer][2] == 0.0 and profile.topk_cost[layer][1] > 0


@pytest.mark.parametrize("fmt", ["Q4_0", "Q8_0"])
def test_gain_calibration_reproduces_its_own_measurements(profiled, fmt):
    # quantizing exactly one calibration group to either calibration format: predicted == measured,
    # up to the format's joint correction
    model, prof, profile, importance = profiled
    name = next(n for n in profile.tensor_damage if "o_proj" in n)
    d = Decision(formats={name: fmt})
    measured = evaluate(apply_decision(copy.deepcopy(model), d, importance), prof.reference).kld_mean
    rho = profile.meta["joint_correction"]["other"][fmt]
    assert predicted_damage(profile, d) == pytest.approx(rho * measured, rel=1e-6)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q8_0"])
@pytest.mark.parametrize("cls", ["routed_experts", "other"])
def test_joint_correction_predicts_a_uniformly_quantized_class_exactly(profiled, fmt, cls):
    model, prof, profile, importance = profiled
    names = [n for n in profile.tensor_damage if (".experts." in n) == (cls == "routed_experts")]
    d = Decision(formats={n: fmt for n in names})
    measured = evaluate(apply_decision(copy.deepcopy(model), d, importance), prof.reference).kld_mean
    assert measured > 0
    assert predicted_damage(profile, d) == pytest.approx(measured, rel=1e-6)
    assert profile.meta["joint_correction"][cls][fmt] > 0


def test_removal_and_topk_costs_equal_full_forward_measurements(profiled):
    # the profiler reruns only the layers from the changed one on; a whole forward pass agrees
    from moeplan.sensitivity.adapters import adapter_for

    model, prof, profile, importance = profiled
    layer = max(profile.experts)
    m = copy.deepcopy(model)
    ad = adapter_for(m)
    spec = ad.routing_spec(layer)
    if spec.n_group > 1:
        ad.e_score_correction_bias(layer)[1] = -1e9
    else:
        ad.remove_experts(layer, [0, 2, 3])
    assert profile.experts[layer].removal_kl[1] == pytest.approx(evaluate(m, prof.reference).kld_mean, rel=1e-5)
    m = copy.deepcopy(model)
    adapter_for(m).set_top_k(layer, 1)
    assert profile.topk_cost[layer][1] == pytest.approx(evaluate(m, prof.reference).kld_mean, rel=1e-5)


def test_gain_interpolation():
    from moeplan.sensitivity.costs import interpolate_gain as _interpolate_gain

    pts = [(1.0, 2.0), (100.0, 8.0)]
    assert _interpolate_gain(pts, 1.0) == pytest.approx(2.0)
    assert _interpolate_gain(pts, 100.0) == pytest.approx(8.0)
    assert _interpolate_gain(pts, 10.0) == pytest.approx(4.0)  # halfway in log-log
    assert _interpolate_gain(pts, 0.01) == 2.0 and _interpolate_gain(pts, 1e6) == 8.0


def test_prediction_orders_random_plans(profiled):
    model, prof, profile, importance = profiled
    rng = np.random.default_rng(1)
    names = list(profile.tensor_damage)
    pred, meas = [], []
    for i in range(5):
        share = i / 4  # from all-Q8_0 to all-Q4_0
        d = Decision(formats={n: ("Q4_0" if rng.random() < share else "Q8_0") for n in names})
        pred.append(predicted_damage(profile, d))
        meas.append(evaluate(apply_decision(copy.deepcopy(model), d, importance), prof.reference).kld_mean)
    assert np.argsort(pred).tolist() == np.argsort(meas).tolist()


def test_profile_file_round_trip(profiled, tmp_path):
    _, _, profile, _ = profiled
    path = tmp_path / "p.json"
    profile.save(path)
    back = Profile.load(path)
    assert back.tensor_damage == profile.tensor_damage
    assert back.topk_cost == profile.topk_cost
    assert vars(back.experts[min(back.experts)]) == vars(profile.experts[min(profile.experts)])
    path2 = tmp_path / "p2.json"
    back.save(path2)
    assert path.read_bytes() == path2.read_bytes()


def test_profile_rejects_other_model(profiled):
    _, _, profile, _ = profiled

    class Inv:
        fingerprint = "something-else"

    with pytest.raises(ValueError, match="another model"):
        profile.check_against(Inv())
