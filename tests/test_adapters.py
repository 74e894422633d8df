"""Model adapters on tiny random models of every supported MoE family."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from moeplan.sensitivity.adapters import (
    SUPPORTED_FAMILIES,
    ExpertKind,
    ScoreFunction,
    TensorRole,
    adapter_for,
    record_routing,
)
from tests.conftest import TINY_MOE_FAMILIES, TINY_MOE_LAYERS, build_tiny_moe, tiny_input_ids

FAMILIES = pytest.mark.parametrize("family", TINY_MOE_FAMILIES)
# families whose softmax router can renormalize the selected weights (Mixtral always does)
NORM_TOPK_OVERRIDE = {"qwen3_moe": True, "qwen2_moe": True, "olmoe": True}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _safetensors_header(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _capture_router_inputs(adapter):
    """Forward pre-hooks on every router: the (T, H) input it saw, per layer."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in adapter.moe_layers()}
    handles = []
    for layer in adapter.moe_layers():

        def hook(mod, args, layer=layer):
            seen[layer].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

        handles.append(adapter.router(layer).register_forward_pre_hook(hook))
    return seen, handles


def _manual_routing(x, weight, *, sigmoid, top_k, norm, scale=1.0, bias=None, n_group=1, topk_group=1):
    """Plain per-token re-implementation of the routers (float64 numpy): (indices, weights) lists."""
    x = x.double().numpy()
    logits = x @ weight.detach().double().numpy().T  # (T, E)
    n_exp = logits.shape[1]
    out_idx, out_w = [], []
    for row in logits:
        if sigmoid:
            scores = 1.0 / (1.0 + np.exp(-row))
        else:
            z = np.exp(row - row.max())
            scores = z / z.sum()
        choice = scores + (bias.double().numpy() if bias is not None else 0.0)
        allowed = np.ones(n_exp, dtype=bool)
        if n_group > 1:
            size = n_exp // n_group
            group_score = [np.sort(choice[g * size : (g + 1) * size])[-2:].sum() for g in range(n_group)]
            best_groups = np.argsort(group_score)[::-1][:topk_group]
            allowed[:] = False
            for g in best_groups:
                allowed[g * size : (g + 1) * size] = True
        masked = np.where(allowed, choice, -np.inf)
        idx = sorted(np.argsort(masked)[::-1][:top_k].tolist())
        w = scores[idx]
        if norm:
            w = w / w.sum()
        out_idx.append(idx)
        out_w.append((w * scale).tolist())
    return out_idx, out_w


def _sorted_rows(indices, weights):
    """Per token: expert ids ascending and their weights in that order."""
    order = indices.argsort(dim=1)
    return indices.gather(1, order), weights.gather(1, order)


def _manual_for(adapter, layer, x, top_k=None):
    spec = adapter.routing_spec(layer)
    return _manual_routing(
        x,
        adapter.router_weight(layer),
        sigmoid=spec.score_function is ScoreFunction.SIGMOID,
        top_k=spec.top_k if top_k is None else top_k,
        norm=spec.norm_topk_prob,
        scale=spec.routed_scaling_factor,
        bias=adapter.e_score_correction_bias(layer),
        n_group=spec.n_group,
        topk_group=spec.topk_group,
    )


# ---- choosing the adapter --------------------------------------------------------------------


def test_adapter_for_rejects_unknown_family():
    fake = nn.Module()
    fake.config = SimpleNamespace(model_type="llama")
    with pytest.raises(ValueError, match="llama") as err:
        adapter_for(fake)
    for family in SUPPORTED_FAMILIES:
        assert family in str(err.value)
    assert set(SUPPORTED_FAMILIES) == set(TINY_MOE_FAMILIES)


# ---- structure -------------------------------------------------------------------------------------


@FAMILIES
def test_structure(family):
    model = build_tiny_moe(family)
    a = adapter_for(model)
    assert a.model_type == family
    assert a.moe_layers() == TINY_MOE_LAYERS[family]
    for layer in a.moe_layers():
        assert a.n_experts(layer) == 8
        assert a.top_k(layer) == 2
        assert tuple(a.router_weight(layer).shape) == (8, 64)
        spec = a.routing_spec(layer)
        bias = a.e_score_correction_bias(layer)
        shared = a.shared_expert(layer)
        if family == "deepseek_v3":
            assert spec.score_function is ScoreFunction.SIGMOID
            assert (spec.n_group, spec.topk_group, spec.routed_scaling_factor) == (2, 1, 2.5)
            assert bias is not None and tuple(bias.shape) == (8,)
            assert shared is not None and shared.mlp is model.model.layers[layer].mlp.shared_experts
        else:
            assert spec.score_function is ScoreFunction.SOFTMAX
            assert spec.n_group == 1 and bias is None
        if family == "qwen2_moe":
            mlp = model.model.layers[layer].mlp
            assert shared.mlp is mlp.shared_expert and shared.gate is mlp.shared_expert_gate
        if family in ("qwen3_moe", "mixtral", "olmoe"):
            assert shared is None
    dense = [i for i in range(a.n_layers()) if i not in a.moe_layers()]
    for layer in dense:
        with pytest.raises(ValueError, match="no routed experts"):
            a.expert_weights(layer, 0)
    with pytest.raises(IndexError, match="out of range"):
        a.expert_weights(a.moe_layers()[0], 8)


# ---- expert weights ----------------------------------------------------------------------------


@FAMILIES
def test_expert_weights_are_views_in_linear_orientation(family):
    model = build_tiny_moe(family)
    a = adapter_for(model)
    layer, e = a.moe_layers()[-1], 5
    experts = a.experts_module(layer)
    w = a.expert_weights(layer, e)
    inter = experts.down_proj.shape[-1]
    assert tuple(w["gate"].shape) == tuple(w["up"].shape) == (inter, 64)
    assert tuple(w["down"].shape) == (64, inter)

    # orientation and gate/up order: the expert module's own output for one token routed to e
    x = torch.randn(3, 64)
    with torch.no_grad():
        got = experts(x, torch.full((3, 1), e), torch.ones(3, 1))
    act = experts.act_fn
    want = (act(x @ w[ExpertKind.GATE].T) * (x @ w[ExpertKind.UP].T)) @ w[ExpertKind.DOWN].T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # views alias the fused storage: writes go through both ways
    for kind in ExpertKind:
        fused = experts.down_proj if kind is ExpertKind.DOWN else experts.gate_up_proj
        assert w[kind].untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    w["gate"][0, 0] = 123.0
    w["down"][1, 2] = -7.0
    assert experts.gate_up_proj[e, 0, 0].item() == 123.0
    assert experts.down_proj[e, 1, 2].item() == -7.0
    with torch.no_grad():
        experts.gate_up_proj[e, inter + 3, 4] = 9.0  # row 3 of up
    assert a.expert_weights(layer, e)["up"][3, 4].item() == 9.0

    # set_expert_weights writes in place, other experts untouched
    before_other = experts.gate_up_proj[e - 1].clone()
    ptr = experts.gate_up_proj.data_ptr()
    new = {k: torch.full_like(v, float(i + 1)) for i, (k, v) in enumerate(w.items())}
    a.set_expert_weights(layer, e, {"gate": new[ExpertKind.GATE], "up": new[ExpertKind.UP], "down": new[ExpertKind.DOWN]})
    assert experts.gate_up_proj.data_ptr() == ptr
    assert torch.all(experts.gate_up_proj[e, :inter] == 1.0) and torch.all(experts.gate_up_proj[e, inter:] == 2.0)
    assert torch.all(experts.down_proj[e] == 3.0)
    assert torch.equal(experts.gate_up_proj[e - 1], before_other)
    a.set_expert_weights(layer, e, {ExpertKind.UP: torch.zeros(inter, 64, dtype=torch.float64)})  # cast on copy
    assert torch.all(experts.gate_up_proj[e, inter:] == 0.0)

    before = experts.gate_up_proj[e].clone()
    with pytest.raises(ValueError, match="shape"):
        a.set_expert_weights(layer, e, {"up": torch.full((inter, 64), 5.0), "gate": torch.zeros(64, inter)})
    assert torch.equal(experts.gate_up_proj[e], before)  # nothing written when one value is bad
    with pytest.raises(KeyError, match="w1"):
        a.set_expert_weights(layer, e, {"w1": torch.zeros(inter, 64)})


# ---- checkpoint names ----------------------------------------------------------------------------


@FAMILIES
def test_tensor_names_match_save_pretrained_and_round_trip(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_moe(family)
    a = adapter_for(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    header = _safetensors_header(path)
    refs = list(a.tensors())

    names = [r.name for r in refs]
    assert len(names) == len(set(names))
    assert set(names) == set(header)
    n_routed = sum(r.role is TensorRole.ROUTED_EXPERT for r in refs)
    assert n_routed == 3 * 8 * len(a.moe_layers())
    linear = list(a.linear_tensors())
    assert all(len(r.shape) == 2 for r in linear)
    assert {r.name for r in linear} == {k for k, v in header.items() if len(v["shape"]) == 2}

    # every tensor's value equals what is on disk, per expert for the fused storage
    with safe_open(path, "pt") as f:
        for r in refs:
            assert list(r.shape) == header[r.name]["shape"], r.name
            assert torch.equal(r.get(), f.get_tensor(r.name)), r.name
        for layer in a.moe_layers():
            for e in range(8):
                views = a.expert_weights(layer, e)
                for kind in ExpertKind:
                    assert torch.equal(views[kind], f.get_tensor(a.expert_tensor_name(layer, e, kind)))

    # roles
    by_name = {r.name: r for r in refs}
    assert by_name["model.embed_tokens.weight"].role is TensorRole.EMBEDDING
    assert by_name["lm_head.weight"].role is TensorRole.HEAD
    assert by_name["model.norm.weight"].role is TensorRole.NORM
    assert by_name["model.layers.0.input_layernorm.weight"].role is TensorRole.NORM
    assert by_name["model.layers.0.self_attn.o_proj.weight"].role is TensorRole.ATTENTION
    mlp = "block_sparse_moe" if family == "mixtral" else "mlp"
    moe = a.moe_layers()[0]
    router = by_name[f"model.layers.{moe}.{mlp}.gate.weight"]
    assert router.role is TensorRole.ROUTER and router.layer == moe
    kinds = {"gate": "w1", "up": "w3", "down": "w2"} if family == "mixtral" else {k: f"{k}_proj" for k in ("gate", "up", "down")}
    for kind, ck in kinds.items():
        r = by_name[f"model.layers.{moe}.{mlp}.experts.7.{ck}.weight"]
        assert (r.role, r.layer, r.expert, r.kind) == (TensorRole.ROUTED_EXPERT, moe, 7, ExpertKind(kind))
    dense = [i for i in range(a.n_layers()) if i not in a.moe_layers()]
    if dense:
        assert by_name[f"model.layers.{dense[0]}.mlp.down_proj.weight"].role is TensorRole.DENSE_MLP
    if family == "deepseek_v3":
        assert by_name[f"model.layers.{moe}.mlp.gate.e_score_correction_bias"].role is TensorRole.ROUTER
        assert by_name[f"model.layers.{moe}.mlp.shared_experts.up_proj.weight"].role is TensorRole.SHARED_EXPERT
        assert by_name["model.layers.0.self_attn.kv_a_layernorm.weight"].role is TensorRole.NORM
    if family == "qwen2_moe":
        assert by_name[f"model.layers.{moe}.mlp.shared_expert_gate.weight"].role is TensorRole.SHARED_EXPERT
        assert by_name["model.layers.0.self_attn.q_proj.bias"].role is TensorRole.ATTENTION
    if family in ("qwen3_moe", "olmoe"):
        assert by_name["model.layers.0.self_attn.q_norm.weight"].role is TensorRole.NORM

    # loading direction: transformers' conversion puts every disk tensor where the adapter says
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    b = adapter_for(loaded)
    for layer in a.moe_layers():
        for e in range(8):
            for kind in ExpertKind:
                assert torch.equal(a.expert_weights(layer, e)[kind], b.expert_weights(layer, e)[kind])

    # setters through the checkpoint-named refs write the live storage
    ref = by_name[f"model.layers.{moe}.{mlp}.experts.3.{kinds['down']}.weight"]
    ref.set(torch.ones(ref.shape))
    assert torch.all(a.experts_module(moe).down_proj[3] == 1.0)


def test_tied_embeddings_appear_once(tmp_path):
    model = build_tiny_moe("qwen2_moe", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    header = _safetensors_header(tmp_path / "model.safetensors")
    names = {r.name for r in adapter_for(model).tensors()}
    assert "lm_head.weight" not in header
    assert names == set(header)


# ---- routing hooks ---------------------------------------------------------------------------------


@FAMILIES
def test_record_routing_sees_every_tokens_top_k(family):
    model = build_tiny_moe(family)
    a = adapter_for(model)
    ids = tiny_input_ids(n_tokens=12, batch=2)
    seen, handles = _capture_router_inputs(a)
    blocks_out: dict[int, torch.Tensor] = {}
    for layer in a.moe_layers():
        handles.append(
            a.moe_block(layer).register_forward_hook(
                lambda mod, args, out, layer=layer: blocks_out.__setitem__(layer, (args[0].detach(), out.detach()))
            )
        )
    try:
        with record_routing(model) as rec:
            _logits(model, ids)
    finally:
        for h in handles:
            h.remove()

    n_tok = ids.numel()
    group_mattered = bias_mattered = False
    for layer in a.moe_layers():
        r = rec.routing(layer)
        x = torch.cat(seen[layer])
        assert tuple(r.indices.shape) == tuple(r.weights.shape) == (n_tok, 2)
        assert tuple(r.logits.shape) == (n_tok, 8)
        torch.testing.assert_close(r.logits, x @ a.router_weight(layer).detach().T, rtol=1e-5, atol=1e-5)
        want_idx, want_w = _manual_for(a, layer, x)
        got_idx, got_w = _sorted_rows(r.indices, r.weights)
        assert got_idx.tolist() == want_idx
        np.testing.assert_allclose(got_w.numpy(), np.array(want_w), rtol=1e-5, atol=1e-6)
        # the adapter's own selection rule agrees as well
        ri, rw = _sorted_rows(*reversed(a.route(layer, r.logits)))
        assert torch.equal(ri, got_idx)
        torch.testing.assert_close(rw, got_w, rtol=1e-5, atol=1e-6)
        # scores: the full softmax / sigmoid
        if a.score_function is ScoreFunction.SOFTMAX:
            torch.testing.assert_close(r.scores.sum(-1), torch.ones(n_tok))
        else:
            torch.testing.assert_close(r.scores, torch.sigmoid(r.logits))
        assert r.counts(8).sum().item() == 2 * n_tok

        # the recorded (indices, weights) are what the block computed with: rebuild its output
        block_in, block_out = blocks_out[layer]
        xb = block_in.reshape(-1, 64)
        act = a.experts_module(layer).act_fn
        rebuilt = torch.zeros_like(xb)
        for t in range(n_tok):
            for slot in range(2):
                w = a.expert_weights(layer, int(r.indices[t, slot]))
                y = (act(xb[t] @ w["gate"].T) * (xb[t] @ w["up"].T)) @ w["down"].T
                rebuilt[t] += r.weights[t, slot] * y
        shared = a.shared_expert(layer)
        if shared is not None:
            s = shared.mlp(xb)
            rebuilt += torch.sigmoid(shared.gate(xb)) * s if shared.gate is not None else s
        torch.testing.assert_close(rebuilt, block_out.reshape(-1, 64), rtol=1e-4, atol=1e-5)

        if family == "deepseek_v3":
            w_router, bias = a.router_weight(layer), a.e_score_correction_bias(layer)
            free_idx, _ = _manual_routing(x, w_router, sigmoid=True, top_k=2, norm=True, bias=bias)
            no_bias_idx, _ = _manual_routing(x, w_router, sigmoid=True, top_k=2, norm=True, n_group=2, topk_group=1)
            group_mattered |= free_idx != want_idx
            bias_mattered |= no_bias_idx != want_idx
    if family == "deepseek_v3":
        # the test input exercises both the group limit and the correction bias
        assert group_mattered and bias_mattered

    # hooks are gone after the block
    with record_routing(model) as rec2:
        pass
    _logits(model, ids)
    with pytest.raises(ValueError, match="no forward pass"):
        rec2.routing(a.moe_layers()[0])


@FAMILIES
def test_record_routing_expert_input_statistics(family):
    model = build_tiny_moe(family)
    a = adapter_for(model)
    ids = tiny_input_ids(n_tokens=10, batch=2, seed=3)
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in a.moe_layers()}
    handles = [
        a.experts_module(layer).register_forward_pre_hook(
            lambda mod, args, layer=layer: inputs[layer].append(args[0].detach().clone())
        )
        for layer in a.moe_layers()
    ]
    try:
        with record_routing(model, importance="gate_up_down", keep_logits=False) as rec:
            _logits(model, ids)
            _logits(model, ids[:, :4])  # a second call accumulates
    finally:
        for h in handles:
            h.remove()
    for layer in a.moe_layers():
        x = torch.cat(inputs[layer]).double()
        idx = rec.routing(layer).indices
        assert rec.routing(layer).logits is None
        st = rec.stats(layer)
        inter = a.experts_module(layer).down_proj.shape[-1]
        act = a.experts_module(layer).act_fn
        for e in range(8):
            rows = (idx == e).any(dim=1)
            assert st.tokens[e].item() == rows.sum().item()
            xe = x[rows]
            torch.testing.assert_close(st.sum_sq_in[e], (xe * xe).sum(0), rtol=1e-5, atol=1e-6)
            w = {k: v.double() for k, v in a.expert_weights(layer, e).items()}
            mid = act(xe @ w["gate"].T) * (xe @ w["up"].T)
            torch.testing.assert_close(st.sum_sq_mid[e], (mid * mid).sum(0), rtol=1e-4, atol=1e-7)
            if rows.any():
                torch.testing.assert_close(st.mean_sq_in()[e], (xe * xe).mean(0), rtol=1e-5, atol=1e-6)
        assert tuple(st.mean_sq_mid().shape) == (8, inter)

    with record_routing(model) as rec:
        _logits(model, ids)
    with pytest.raises(ValueError, match="importance"):
        rec.stats(a.moe_layers()[0])
    with pytest.raises(ValueError, match="importance"):
        with record_routing(model, importance="all"):
            pass


@FAMILIES
def test_record_routing_of_some_layers_keeps_the_experts_inputs(family):
    """layers=[l] hooks layer l only; inputs=True keeps the experts' inputs exactly as they were
    passed (dtype kept), which the layer-streaming profiler re-runs the experts on."""
    model = build_tiny_moe(family)
    a = adapter_for(model)
    ids = tiny_input_ids(n_tokens=10, batch=2, seed=4)
    layer = a.moe_layers()[-1]
    got: list = []
    hook = a.experts_module(layer).register_forward_pre_hook(
        lambda mod, args, kwargs: got.append(tuple(list(args) + [kwargs[k] for k in
                                                ("hidden_states", "top_k_index", "top_k_weights")[len(args):]])),
        with_kwargs=True)
    try:
        with record_routing(model, layers=[layer], inputs=True) as rec:
            _logits(model, ids)
            _logits(model, ids[:, :3])
    finally:
        hook.remove()
    assert rec.layers() == [layer]
    x, idx, w = rec.expert_inputs(layer)
    for got_t, rec_t in zip(zip(*got), (x, idx, w)):
        want = torch.cat([g.reshape(-1, g.shape[-1]) for g in got_t])
        assert want.dtype == rec_t.dtype and torch.equal(want, rec_t)
    assert torch.equal(rec.routing(layer).indices, idx.long())
    if len(a.moe_layers()) > 1:
        with pytest.raises(ValueError, match="no routed experts"):
            rec.routing(a.moe_layers()[0])  # not hooked
    with pytest.raises(ValueError, match="no routed experts"):
        record_routing(model, layers=[99])
    with record_routing(model) as plain:
        _logits(model, ids)
    with pytest.raises(ValueError, match="inputs=True"):
        plain.expert_inputs(layer)


def test_record_routing_refuses_a_router_it_cannot_read():
    """A router that does not return (logits, weights, indices) is named, not misread."""
    model = build_tiny_moe("qwen3_moe")
    a = adapter_for(model)
    layer = a.moe_layers()[0]
    hook = a.router(layer).register_forward_hook(lambda mod, args, out: out[0])  # logits only
    try:
        with record_routing(model, layers=[layer]):
            with pytest.raises(ValueError, match=f"layer {layer}: the router returns Tensor"):
                _logits(model, tiny_input_ids(n_tokens=4, batch=1))
    finally:
        hook.remove()


# ---- per-layer top-k -------------------------------------------------------------------------------


@FAMILIES
def test_set_top_k_is_per_layer(family):
    model = build_tiny_moe(family)
    a = adapter_for(model)
    ids = tiny_input_ids()
    base = _logits(model, ids)
    first, last = a.moe_layers()[0], a.moe_layers()[-1]

    for k in (1, 3):
        a.set_top_k(last, k)
        seen, handles = _capture_router_inputs(a)
        try:
            with record_routing(model) as rec:
                out = _logits(model, ids)
        finally:
            for h in handles:
                h.remove()
        assert rec.routing(last).indices.shape[1] == k
        assert rec.routing(first).indices.shape[1] == 2
        assert a.top_k(last) == k and a.top_k(first) == 2
        assert model.config.num_experts_per_tok == 2  # layers disagree: config keeps the old value
        want_idx, want_w = _manual_for(a, last, torch.cat(seen[last]))
        got_idx, got_w = _sorted_rows(rec.routing(last).indices, rec.routing(last).weights)
        assert got_idx.tolist() == want_idx
        np.testing.assert_allclose(got_w.numpy(), np.array(want_w), rtol=1e-5, atol=1e-6)
        assert torch.isfinite(out).all()
        assert (out - base).abs().max().item() > 1e-4

    for layer in a.moe_layers():
        a.set_top_k(layer, 3)
    assert model.config.num_experts_per_tok == 3
    for layer in a.moe_layers():
        a.set_top_k(layer, 2)
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=1e-6)

    for bad in (0, -1, 9, 2.0):
        with pytest.raises(ValueError, match="top-k"):
            a.set_top_k(last, bad)
    if family == "deepseek_v3":
        with pytest.raises(ValueError, match="topk_group=1 groups of 4"):
            a.set_top_k(last, 5)  # one group of 4 experts is all a token can reach
    with pytest.raises(ValueError, match="no routed experts"):
        a.set_top_k(a.n_layers() + 5, 1)


# ---- pruning -----------------------------------------------------------------------------------------


def _unused_experts_case(family, impl):
    """A model and input on which some experts are never selected, with exact removal expected."""
    overrides = {"norm_topk_prob": True} if family in NORM_TOPK_OVERRIDE else {}
    model = build_tiny_moe(family, **overrides)
    model.set_experts_implementation(impl)
    a = adapter_for(model)
    if family == "deepseek_v3":
        # experts 3 and 7 (one per group) can never win: their choice score is pushed far down,
        # which also keeps them out of every group's best two
        for layer in a.moe_layers():
            a.e_score_correction_bias(layer)[[3, 7]] = -10.0
    ids = tiny_input_ids(n_tokens=6, batch=1, seed=1)
    return model, a, ids


@FAMILIES
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_remove_unused_experts_keeps_logits(family, impl):
    model, a, ids = _unused_experts_case(family, impl)
    with record_routing(model) as rec:
        base = _logits(model, ids)
    kept: dict[int, list[int]] = {}
    for layer in a.moe_layers():
        used = set(rec.routing(layer).indices.flatten().tolist())
        unused = [e for e in range(8) if e not in used]
        assert unused, f"layer {layer}: every expert is used on the test input; the case needs an unused one"
        if family == "deepseek_v3":
            assert {3, 7} <= set(unused)
            unused = [3, 7]  # one per group, so the groups stay equal
        kept[layer] = a.remove_experts(layer, [e for e in range(8) if e not in unused])
        assert a.n_experts(layer) == len(kept[layer])
    with record_routing(model) as rec_after:
        after = _logits(model, ids)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, base, rtol=0, atol=1e-5)
    for layer in a.moe_layers():
        new_idx = rec_after.routing(layer).indices
        assert new_idx.max().item() < len(kept[layer])
        old_ids = torch.tensor(kept[layer])[new_idx]  # back to the original numbering
        assert torch.equal(old_ids.sort(1).values, rec.routing(layer).indices.sort(1).values)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_remove_experts_renormalizes_softmax_without_norm_topk(family):
    model = build_tiny_moe(family)  # norm_topk_prob=False: weights are raw softmax probabilities
    a = adapter_for(model)
    layer = a.moe_layers()[0]
    ids = tiny_input_ids(n_tokens=6, batch=1, seed=1)
    with record_routing(model) as rec:
        _logits(model, ids)
    before = rec.routing(layer)
    unused = sorted(set(range(8)) - set(before.indices.flatten().tolist()))
    assert unused
    keep = a.remove_experts(layer, [e for e in range(8) if e not in unused])
    with record_routing(model) as rec:
        out = _logits(model, ids)
    after = rec.routing(layer)
    assert torch.isfinite(out).all()
    removed_mass = before.scores[:, unused].sum(-1, keepdim=True)
    old_idx, old_w = _sorted_rows(before.indices, before.weights)
    new_idx, new_w = _sorted_rows(torch.tensor(keep)[after.indices], after.weights)
    assert torch.equal(new_idx, old_idx)
    torch.testing.assert_close(new_w, old_w / (1 - removed_mass), rtol=1e-5, atol=1e-6)


@FAMILIES
def test_remove_experts_slices_everything_and_saves(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_moe(family)
    a = adapter_for(model)
    ids = tiny_input_ids()
    keep = [0, 2, 3, 5, 6, 7]  # DeepSeek: groups {0..3} and {4..7} keep three each
    first = a.moe_layers()[0]
    old_router = a.router_weight(first).detach().clone()
    old_views = {e: {k: v.clone() for k, v in a.expert_weights(first, e).items()} for e in keep}
    old_bias = a.e_score_correction_bias(first)
    old_bias = old_bias.clone() if old_bias is not None else None
    count_attr = a.expert_count_attr

    assert a.remove_experts(first, list(reversed(keep))) == keep
    assert a.n_experts(first) == 6
    assert a.router(first).num_experts == a.experts_module(first).num_experts == 6
    assert torch.equal(a.router_weight(first), old_router[keep])
    for new_e, old_e in enumerate(keep):
        for kind in ExpertKind:
            assert torch.equal(a.expert_weights(first, new_e)[kind], old_views[old_e][kind])
    if old_bias is not None:
        assert torch.equal(a.e_score_correction_bias(first), old_bias[keep])
    assert getattr(model.config, count_attr) == 8  # other layers still have 8

    with record_routing(model) as rec:
        out = _logits(model, ids)
    assert torch.isfinite(out).all()
    assert rec.routing(first).indices.max().item() < 6
    assert rec.routing(first).logits.shape[1] == 6
    assert len([r for r in a.tensors() if r.layer == first and r.role is TensorRole.ROUTED_EXPERT]) == 18

    for layer in a.moe_layers()[1:]:
        a.remove_experts(layer, keep)
    assert getattr(model.config, count_attr) == 6
    model.save_pretrained(tmp_path)
    header = _safetensors_header(tmp_path / "model.safetensors")
    assert {r.name for r in a.tensors()} == set(header)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert adapter_for(loaded).n_experts(first) == 6
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-5)


def test_remove_experts_deepseek_groups_must_stay_equal():
    model = build_tiny_moe("deepseek_v3")
    a = adapter_for(model)
    layer = a.moe_layers()[0]
    with pytest.raises(ValueError, match=r"group 0 \(experts 0\.\.3\): 3, group 1 \(experts 4\.\.7\): 2"):
        a.remove_experts(layer, [0, 1, 2, 4, 5])
    with pytest.raises(ValueError, match="at least 2"):
        a.remove_experts(layer, [0, 4])
    assert a.n_experts(layer) == 8  # nothing changed on failure
    a.set_top_k(layer, 4)
    with pytest.raises(ValueError, match="fewer than top-k 4"):
        a.remove_experts(layer, [0, 1, 2, 4, 5, 6])  # 3 per group, a token reaches one group
    a.set_top_k(layer, 3)
    a.remove_experts(layer, [0, 1, 2, 4, 5, 6])
    assert a.n_experts(layer) == 6
    assert torch.isfinite(_logits(model, tiny_input_ids())).all()


@FAMILIES
def test_remove_experts_rejects_bad_keep_lists(family):
    a = adapter_for(build_tiny_moe(family))
    layer = a.moe_layers()[0]
    if family != "deepseek_v3":  # (DeepSeek's group rules are tested separately)
        with pytest.raises(ValueError, match="fewer than top-k 2"):
            a.remove_experts(layer, [1])
    with pytest.raises(ValueError, match="out of range"):
        a.remove_experts(layer, [0, 1, 8])
    with pytest.raises(ValueError, match="twice"):
        a.remove_experts(layer, [0, 1, 1])
    with pytest.raises(TypeError, match="sequence of expert indices"):
        a.remove_experts(layer, ["a", "b"])
    with pytest.raises(ValueError, match="no routed experts"):
        a.remove_experts(a.n_layers(), [0, 1])
    assert a.n_experts(layer) == 8


@pytest.mark.slow
def test_full_deepseek_v3_on_meta_device():
    """The real DeepSeek-V3 configuration, built without memory: checkpoint names, shapes, size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v3"))
    a = adapter_for(model)
    assert a.moe_layers() == list(range(3, 61))
    spec = a.routing_spec(3)
    assert (spec.n_experts, spec.top_k, spec.n_group, spec.topk_group) == (256, 8, 8, 4)
    refs = {r.name: r for r in a.tensors()}
    gate = refs["model.layers.3.mlp.experts.17.gate_proj.weight"]
    assert (gate.shape, gate.role, gate.expert, gate.kind) == ((2048, 7168), TensorRole.ROUTED_EXPERT, 17, ExpertKind.GATE)
    assert refs["model.layers.60.mlp.experts.255.down_proj.weight"].shape == (7168, 2048)
    assert refs["model.layers.3.mlp.gate.e_score_correction_bias"].shape == (256,)
    assert sum(r.role is TensorRole.ROUTED_EXPERT for r in refs.values()) == 58 * 256 * 3
    n_params = sum(int(np.prod(r.shape)) for r in refs.values())
    assert 670e9 < n_params < 672e9  # the 671B of the main model (the MTP layer 61 is not built)
