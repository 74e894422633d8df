"""The model families the GGUF writer knows, as llama.cpp's architectures: DeepseekV3 ("deepseek2") and
Qwen3Moe ("qwen3moe"). Per family: its MoE layers, the checks that the checkpoint is expressible in
llama.cpp's architecture, and the metadata keys (following llama.cpp's converter, convert_hf_to_gguf.py,
and loader, llama-model.cpp)."""


from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping


def routed_expert_count(config: Mapping) -> int:
    for key in ("n_routed_experts", "num_local_experts", "num_experts"):
        if config.get(key):
            return int(config[key])
    raise ValueError("config.json names no routed expert count (n_routed_experts / num_local_experts / num_experts)")


def _rope(config: Mapping) -> dict:
    """rope parameters from a transformers 5 config (rope_parameters) or an older one (rope_theta, rope_scaling)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default")) or "default"
    return rope


@dataclass(frozen=True)
class Architecture:
    model_type: str
    arch_name: str  # GGUF general.architecture
    moe_layers: Callable[[Mapping], list[int]]
    validate: Callable[[Mapping], None]
    metadata: Callable[[Any, Mapping, int, int], None]  # (writer, config, expert count, top-k)
    n_group: Callable[[Mapping], int]
    topk_group: Callable[[Mapping], int]


def _ds_moe_layers(c: Mapping) -> list[int]:
    return list(range(int(c.get("first_k_dense_replace") or 0), int(c["num_hidden_layers"])))


def _ds_validate(c: Mapping) -> None:
    problems = []
    if c.get("attention_bias"):
        problems.append("attention_bias=true (llama.cpp's deepseek2 loads no attention biases)")
    if int(c.get("moe_layer_freq", 1) or 1) != 1:
        problems.append(f"moe_layer_freq={c['moe_layer_freq']} (llama.cpp's deepseek2 has MoE in every layer after the dense ones)")
    if c.get("scoring_func", "sigmoid") != "sigmoid":
        problems.append(f"scoring_func={c['scoring_func']!r} (DeepSeek-V3 routing is sigmoid)")
    if c.get("topk_method", "noaux_tc") not in ("noaux_tc",):
        problems.append(f"topk_method={c['topk_method']!r} (llama.cpp implements noaux_tc group-limited routing)")
    if c.get("q_lora_rank") is None:
        problems.append("q_lora_rank is null: llama.cpp treats only the DeepSeek-V2-Lite layer counts as q-lora-free")
    if not c.get("n_shared_experts"):
        problems.append("n_shared_experts=0 (llama.cpp's deepseek2 requires the shared expert tensors)")
    rope = _rope(c)
    if rope["rope_type"] == "yarn":
        m, m_all = rope.get("mscale", 1.0), rope.get("mscale_all_dim", 0.0)
        if m_all and m != m_all:
            problems.append(f"yarn mscale={m} differs from mscale_all_dim={m_all} (llama.cpp assumes them equal)")
    elif rope["rope_type"] not in ("default", "linear"):
        problems.append(f"rope_type {rope['rope_type']!r} (supported: default, linear, yarn)")
    if problems:
        raise ValueError("this DeepseekV3 checkpoint cannot be expressed as llama.cpp's deepseek2: " + "; ".join(problems))
    n_group = int(c.get("n_group") or 1)
    if n_group > 1:
        topk_group = int(c.get("topk_group") or 1)
        if not 0 < topk_group < n_group:
            raise ValueError(f"topk_group={topk_group} must be in 1..n_group-1={n_group - 1} (llama.cpp asserts n_group_used < n_expert_groups)")


def _add_rope_scaling(w, rope: Mapping) -> None:
    import gguf

    kind = rope["rope_type"]
    if kind == "linear" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))


def _ds_metadata(w, c: Mapping, n_expert: int, top_k: int) -> None:
    import gguf

    rope = _rope(c)
    kv_lora, rope_dim = int(c["kv_lora_rank"]), int(c["qk_rope_head_dim"])
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_context_length(int(c["max_position_embeddings"]))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(int(c["num_attention_heads"]))
    w.add_head_count_kv(1)  # MLA runs as multi-query attention over the compressed latent
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    w.add_expert_count(n_expert)
    w.add_expert_used_count(top_k)
    w.add_expert_group_count(int(c.get("n_group") or 1))
    w.add_expert_group_used_count(int(c.get("topk_group") or 1))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(int(c.get("first_k_dense_replace") or 0))
    w.add_vocab_size(int(c["vocab_size"]))
    w.add_q_lora_rank(int(c["q_lora_rank"]))
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length(kv_lora + rope_dim)
    w.add_value_length(kv_lora)
    w.add_key_length_mla(int(c["qk_nope_head_dim"]) + rope_dim)
    w.add_value_length_mla(int(c["v_head_dim"]))
    w.add_expert_feed_forward_length(int(c["moe_intermediate_size"]))
    w.add_expert_shared_count(int(c["n_shared_experts"]))
    w.add_expert_weights_scale(float(c.get("routed_scaling_factor", 1.0)))
    if c.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope_dim)
    _add_rope_scaling(w, rope)
    if rope["rope_type"] == "yarn" and rope.get("mscale_all_dim"):
        # llama.cpp divides this key by 0.1 when it reads it for deepseek2 (as its converter writes it)
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))


def _qwen_moe_layers(c: Mapping) -> list[int]:
    return list(range(int(c["num_hidden_layers"])))


def _qwen_validate(c: Mapping) -> None:
    problems = []
    if c.get("mlp_only_layers"):
        problems.append(f"mlp_only_layers={c['mlp_only_layers']} (llama.cpp's qwen3moe has MoE in every layer)")
    if int(c.get("decoder_sparse_step", 1) or 1) != 1:
        problems.append(f"decoder_sparse_step={c['decoder_sparse_step']} (llama.cpp's qwen3moe has MoE in every layer)")
    if not c.get("norm_topk_prob", False):
        problems.append("norm_topk_prob=false (llama.cpp's qwen3moe always renormalizes the top-k routing weights)")
    if c.get("use_sliding_window"):
        problems.append("use_sliding_window=true (not supported by llama.cpp's qwen3moe)")
    if c.get("attention_bias"):
        problems.append("attention_bias=true (llama.cpp's qwen3moe loads no output-projection bias)")
    rope = _rope(c)
    if rope["rope_type"] not in ("default", "linear", "yarn"):
        problems.append(f"rope_type {rope['rope_type']!r} (supported: default, linear, yarn)")
    if problems:
        raise ValueError("this Qwen3Moe checkpoint cannot be expressed as llama.cpp's qwen3moe: " + "; ".join(problems))


def _qwen_metadata(w, c: Mapping, n_expert: int, top_k: int) -> None:
    rope = _rope(c)
    head_dim = int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_context_length(int(c["max_position_embeddings"]))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(int(c["num_attention_heads"]))
    w.add_head_count_kv(int(c.get("num_key_value_heads") or c["num_attention_heads"]))
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    w.add_expert_count(n_expert)
    w.add_expert_used_count(top_k)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_expert_feed_forward_length(int(c["moe_intermediate_size"]))
    _add_rope_scaling(w, rope)


GGUF_FAMILIES: dict[str, Architecture] = {
    "deepseek_v3": Architecture("deepseek_v3", "deepseek2", _ds_moe_layers, _ds_validate, _ds_metadata,
                           lambda c: int(c.get("n_group") or 1), lambda c: int(c.get("topk_group") or 1)),
    "qwen3_moe": Architecture("qwen3_moe", "qwen3moe", _qwen_moe_layers, _qwen_validate, _qwen_metadata,
                         lambda c: 1, lambda c: 1),
}


def family_of(config: Mapping) -> Architecture:
    mt = config.get("model_type")
    if mt not in GGUF_FAMILIES:
        raise ValueError(f"model_type {mt!r} has no GGUF writer; supported: {', '.join(GGUF_FAMILIES)}")
    return GGUF_FAMILIES[mt]
