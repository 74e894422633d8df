"""Shared test helpers: tiny random MoE models of every supported family."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

# Property tests draw the same cases in every run (the seed is derived from each test): a CI run cannot
# fail on a case no one has run here. MOEPLAN_HYPOTHESIS=explore draws fresh cases, to look for new ones.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(__import__("os").environ.get("MOEPLAN_HYPOTHESIS", "fixed"))

TINY_MOE_FAMILIES = ("deepseek_v3", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe")

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    intermediate_size=96,  # dense MLPs (and Mixtral / OLMoE experts, which use it)
    num_experts_per_tok=2,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)

# Per family: 8 routed experts and, where the family allows it, one dense layer so that
# moe_layers() is not simply range(n_layers).
_FAMILY = {
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_key_value_heads=4,  # multi-head latent attention: one key/value head per query head
        moe_intermediate_size=32,
        n_group=2,  # two groups of 4 experts, a token may use 1 group
        topk_group=1,
        first_k_dense_replace=1,  # layer 0 dense
        n_shared_experts=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32, head_dim=16, mlp_only_layers=[1], norm_topk_prob=True),
    "qwen2_moe": dict(
        num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[0]
    ),
    "mixtral": dict(num_local_experts=8, intermediate_size=32),
    "olmoe": dict(num_experts=8, intermediate_size=32),
}

TINY_MOE_LAYERS = {"deepseek_v3": [1, 2], "qwen3_moe": [0, 2], "qwen2_moe": [1, 2], "mixtral": [0, 1, 2], "olmoe": [0, 1, 2]}


def build_tiny_moe(family: str, *, seed: int = 0, router_scale: float = 20.0, **overrides):
    """A tiny random CausalLM of ``family`` in float32, eval mode, eager attention.

    Router rows are scaled by ``router_scale`` so that routing decisions have clear margins
    (the default init std of 0.02 makes every expert nearly tied); DeepSeek's correction bias
    is filled with random values so that it takes part in the choice.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **{**_COMMON, **_FAMILY[family], **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is None or not hasattr(layer.mlp, "experts"):
                continue
            gate.weight.mul_(router_scale)
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(0.3 * torch.randn(gate.weight.shape[0], generator=gen))
    return model


def tiny_input_ids(n_tokens: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, n_tokens), generator=gen)


@pytest.fixture
def tiny_moe_builder():
    """Callable ``(family, *, seed=0, router_scale=20.0, **config_overrides) -> model``."""
    return build_tiny_moe


@pytest.fixture
def llama_no_repack(monkeypatch):
    """Weight repacking off in every llama_cpp.Llama() the test makes.

    llama.cpp's CPU backend moves weights into "extra" buffer types at load time (CPU_REPACK, and on
    CPUs with AMX the AMX buffer, on which this build crashes for quantized files). The binaries turn
    it off with -nr / --repack 0 (env LLAMA_ARG_REPACK=0, read by llama.cpp's common argument parser
    only); llama-cpp-python 0.3.36's Llama() has no argument for it and the library reads no
    environment variable, but it builds its model parameters from llama_cpp.llama_cpp.
    llama_model_default_params() at construction, whose use_extra_bufts field is the switch
    (llama_model_params.use_extra_bufts). The fixture returns those defaults with the field False."""
    try:
        import llama_cpp.llama_cpp as lc
    except ImportError:
        return
    defaults = lc.llama_model_default_params

    def no_extra_bufts():
        p = defaults()
        p.use_extra_bufts = False
        return p

    monkeypatch.setattr(lc, "llama_model_default_params", no_extra_bufts)
