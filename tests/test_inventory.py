"""Inventory: DeepSeek-V3 parameter counts, exact bytes, safetensors headers vs meta device."""


import numpy as np
import pytest
import torch

from moeplan import kernels
from moeplan.kernels import formats
from moeplan.kernels.inventory import Inventory, Role, Target, build_inventory, classify


@pytest.fixture(scope="module")
def ds_v3():
    return build_inventory("deepseek-v3")


def test_deepseek_v3_parameter_counts(ds_v3):
    # DeepSeek-V3: 671B parameters, of which routed experts 653.9B; keeping 75% of the routed
    # experts leaves 507.5B (the 508B of arXiv 2509.25689).
    assert round(ds_v3.params() / 1e9, 1) == 671.0
    assert round(ds_v3.routed_params() / 1e9, 1) == 653.9
    assert round(ds_v3.params_keeping(0.75) / 1e9, 1) == 507.5
    assert len(ds_v3.moe_layers) == 58 and ds_v3.moe_layers[0] == 3
    assert all(len(ds_v3.experts_in_layer(l)) == 256 for l in ds_v3.moe_layers)
    assert ds_v3.top_k == 8 and ds_v3.n_group == 8 and ds_v3.topk_group == 4


def test_deepseek_v3_bf16_size_and_kv_cache(ds_v3):
    # the paper's BF16 size: 1342 GB
    assert round(ds_v3.bytes_uniform("BF16") / 1e9) == 1342
    # MLA caches the 512-wide latent and the 64-wide rope key per layer: 61 * 576 * 2 bytes
    assert ds_v3.kv_cache_bytes_per_token() == 61 * 576 * 2


def test_gguf_target_splits_kv_b(ds_v3):
    t = ds_v3["model.layers.3.self_attn.kv_b_proj.weight"]
    assert t.shape == (32768, 512)
    # k_b rows are qk_nope_head_dim = 128 values: Q4_K falls back to Q5_0; v_b rows are 512: Q4_K fits
    assert t.stored_format("Q4_K", Target.GGUF, ds_v3.config) == ["Q5_0", "Q4_K"]
    assert t.nbytes("Q4_K", Target.GGUF, ds_v3.config) == 128 * 512 * (128 // 32) * 22 + 128 * 128 * 2 * 144
    assert t.nbytes("Q4_K", Target.FREE) == 32768 * 2 * 144


def test_roles(ds_v3):
    s = ds_v3.summary()
    assert s["embedding"] == s["head"] == 129280 * 7168
    assert ds_v3["model.layers.0.mlp.gate_proj.weight"].role is Role.DENSE_MLP
    assert ds_v3["model.layers.5.mlp.shared_experts.down_proj.weight"].role is Role.SHARED_EXPERT
    assert ds_v3["model.layers.5.mlp.gate.weight"].role is Role.ROUTER
    assert not ds_v3["model.layers.5.mlp.gate.weight"].quantizable
    e = ds_v3["model.layers.60.mlp.experts.255.down_proj.weight"]
    assert (e.role, e.layer, e.expert, e.kind, e.shape) == (Role.ROUTED_EXPERT, 60, 255, "down_proj", (7168, 2048))


def test_classify_checkpoint_names():
    t = classify("model.layers.7.block_sparse_moe.experts.3.w2.weight", (4096, 14336))
    assert (t.role, t.layer, t.expert, t.kind) == (Role.ROUTED_EXPERT, 7, 3, "down_proj")
    assert classify("model.layers.1.mlp.shared_expert_gate.weight", (1, 64)).role is Role.ROUTER
    assert classify("model.layers.1.post_attention_layernorm.weight", (64,)).role is Role.NORM


def test_roundtrip_and_fingerprint(ds_v3, tmp_path):
    p = tmp_path / "inv.json"
    ds_v3.save(p)
    back = Inventory.load(p)
    assert back.fingerprint == ds_v3.fingerprint and len(back) == len(ds_v3)
    assert back.tensors[:50] == ds_v3.tensors[:50]


def _tiny_checkpoint(tmp_path, seed=0):
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = DeepseekV3Config(vocab_size=320, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=64,
                           kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    return model


def test_headers_equal_meta_device_and_bytes_equal_kernels(tmp_path):
    _tiny_checkpoint(tmp_path)
    from_headers = build_inventory(tmp_path)
    from_config = build_inventory(tmp_path / "config.json")
    assert {t.name: t.shape for t in from_headers} == {t.name: t.shape for t in from_config}
    assert from_headers.params() == from_config.params()
    assert from_headers.fingerprint != from_config.fingerprint  # the checkpoint's content is part of it
    # inventory bytes equal the bytes the kernels actually produce, for every quantizable tensor
    from safetensors import safe_open

    expert_shapes = {}
    avail = set(kernels.available_formats())
    with safe_open(str(next(tmp_path.glob("*.safetensors"))), "pt") as f:
        names = set(f.keys())
        for t in from_headers:
            if not t.quantizable or t.name not in names:
                expert_shapes[t.name] = t.shape
                continue
            w = f.get_tensor(t.name).float().contiguous()
            for fmt in avail & {"F16", "BF16", "Q8_0", "Q4_K", "Q6_K"}:
                actual = formats.resolve(fmt, w.shape[-1]).name
                if actual not in avail:
                    continue
                assert kernels.quantize(w, actual).nbytes == t.nbytes(fmt), (t.name, fmt)


def test_unknown_model_errors_clearly():
    with pytest.raises(FileNotFoundError, match="bundled name"):
        build_inventory("no-such-model")


def test_fp8_block_scales_are_not_quantizable_tensors():
    t = classify("model.layers.3.mlp.experts.7.down_proj.weight_scale_inv", (56, 16))
    assert t.role is Role.OTHER and not t.quantizable


def test_side_files_are_not_shards(tmp_path):
    _tiny_checkpoint(tmp_path)
    before = build_inventory(tmp_path)
    from safetensors.numpy import save_file

    save_file({"x": np.ones(4, np.float32)}, str(tmp_path / "profile.importance.safetensors"))
    after = build_inventory(tmp_path)
    assert after.fingerprint == before.fingerprint and len(after) == len(before)
