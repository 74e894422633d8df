"""kernels.gguf_layout: the one owner of DeepSeek's kv_b split and of the GGUF tensor order."""

import numpy as np
import pytest
import torch

from moeplan.kernels.gguf_layout import KvBSplit, tensor_order_key
from moeplan.kernels.inventory import Role, TensorInfo
from moeplan.sensitivity.compress import quantize_dequantize_kv_b

# MLA with fewer key/value heads named in the config than attention heads: transformers' kv_b_proj still
# has one (nope + v) block per attention head, and llama.cpp's loader wants n_head of them
CONFIG = {"num_attention_heads": 4, "num_key_value_heads": 1, "qk_nope_head_dim": 32, "v_head_dim": 16,
          "kv_lora_rank": 64, "qk_rope_head_dim": 16}
KV_B = TensorInfo("model.layers.1.self_attn.kv_b_proj.weight", (4 * (32 + 16), 64), Role.ATTENTION, 1, kind="kv_b_proj")


def test_the_split_has_one_block_per_attention_head():
    split = KvBSplit.of(CONFIG)
    assert (split.k_b_shape, split.v_b_shape, split.kv_b_shape) == ((4, 64, 32), (4, 16, 64), KV_B.shape)
    # the inventory's byte model stores what the writer stores: every weight once, in llama.cpp's shapes
    shapes = KV_B.storage_shapes("gguf", CONFIG)
    assert shapes == [(4, 64, 32), (4, 16, 64)]
    assert sum(int(np.prod(s)) for s in shapes) == KV_B.numel
    assert KV_B.nbytes("F16", "gguf", CONFIG) == 2 * KV_B.numel


def test_split_and_join_are_inverse_for_torch_and_numpy():
    split = KvBSplit.of(CONFIG)
    w = torch.randn(KV_B.shape)
    k_b, v_b = split.split(w)
    assert k_b.is_contiguous() and v_b.is_contiguous()
    kv = w.view(4, 48, 64)
    assert torch.equal(k_b, kv[:, :32, :].transpose(1, 2)) and torch.equal(v_b, kv[:, 32:, :])
    assert torch.equal(split.join(k_b, v_b), w)
    k_n, v_n = split.split(w.numpy())
    assert np.array_equal(split.join(k_n, v_n), w.numpy()) and k_n.flags.c_contiguous


def test_compression_in_memory_splits_by_attention_heads():
    w = torch.randn(KV_B.shape)
    out = quantize_dequantize_kv_b(w, "F32", CONFIG, None)
    assert torch.equal(out, w)
    q = quantize_dequantize_kv_b(w, "Q8_0", CONFIG, np.ones(64, np.float32))
    assert q.shape == w.shape and 0 < float((q - w).abs().max()) < 0.1


@pytest.mark.parametrize("names", [
    ["output.weight", "blk.10.attn_q.weight", "blk.2.ffn_up_exps.weight", "token_embd.weight", "blk.2.attn_k_b.weight",
     "output_norm.weight"],
])
def test_tensor_order(names):
    assert sorted(names, key=tensor_order_key) == [
        "token_embd.weight", "blk.2.attn_k_b.weight", "blk.2.ffn_up_exps.weight", "blk.10.attn_q.weight",
        "output.weight", "output_norm.weight"]



def test_names_come_from_gguf_py_tensor_name_map():
    from moeplan.kernels.gguf_layout import gguf_name, gguf_names

    assert gguf_names("model.layers.3.mlp.experts.7.down_proj.weight", "deepseek_v3") == ["blk.3.ffn_down_exps.weight"]
    assert gguf_names("model.layers.12.self_attn.kv_b_proj.weight") == ["blk.12.attn_k_b.weight", "blk.12.attn_v_b.weight"]
    assert gguf_names("model.layers.1.mlp.gate.e_score_correction_bias", "deepseek_v3") == ["blk.1.exp_probs_b.bias"]
    assert gguf_names("model.layers.0.mlp.down_proj.weight", "qwen3_moe") == ["blk.0.ffn_down.weight"]
    assert gguf_names("model.embed_tokens.weight") == ["token_embd.weight"] and gguf_names("lm_head.weight") == ["output.weight"]
    assert gguf_name("model.layers.61.mlp.experts.gate_proj.weight", "deepseek2") == "blk.61.ffn_gate_exps.weight"
    assert gguf_name("model.layers.2.self_attn.q_a_proj.weight", "qwen3moe") is None  # no MLA in qwen3moe
    with pytest.raises(ValueError, match="no GGUF name known"):
        gguf_names("model.layers.0.mlp.no_such.weight")
