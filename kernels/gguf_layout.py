"""llama.cpp's GGUF layout of a checkpoint: tensor names, DeepSeek's kv_b split, tensor order.

- gguf_names: checkpoint tensor names -> the names llama.cpp's GGUF files use (blk.N.ffn_down_exps, ...),
  for the plan's llama-quantize arguments, llama.cpp's per-tensor type rules (which match on these
  names) and reading llama-imatrix files. Routed experts map to their layer's stacked tensor; DeepSeek's
  kv_b_proj is stored split as attn_k_b and attn_v_b (llama.cpp's MLA layout).
- KvBSplit: that split's shapes and the split itself (the inventory's byte counts, the in-memory
  compression, the GGUF writer and its reader all use it).
- tensor_order_key: the order of the tensors in a file moeplan writes (and of llama-quantize arguments).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

# model_type -> GGUF architecture name (the prefix of the metadata keys, e.g. deepseek2.expert_count)
GGUF_ARCH = {"deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2", "qwen3_moe": "qwen3moe",
             "qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe"}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")
_IN_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
        "model.norm.weight": "output_norm.weight"}


def gguf_names(name: str) -> list[str]:
    """The GGUF tensor(s) a checkpoint tensor is stored as (two for DeepSeek's kv_b_proj; a routed
    expert's tensor maps to its layer's stacked tensor). Unknown names raise."""
    if name in _TOP:
        return [_TOP[name]]
    m = _LAYER.match(name)
    if m:
        layer, rest = m.group(1), m.group(2)
        e = _EXPERT.match(rest)
        if e:
            return [f"blk.{layer}.ffn_{e.group(1).removesuffix('_proj')}_exps.weight"]
        if rest == "self_attn.kv_b_proj.weight":
            return [f"blk.{layer}.attn_k_b.weight", f"blk.{layer}.attn_v_b.weight"]
        if rest in _IN_LAYER:
            return [f"blk.{layer}.{_IN_LAYER[rest]}"]
    raise ValueError(f"no GGUF name known for tensor {name!r}")


def stacked_name(layer: int, kind: str) -> str:
    """GGUF name of a layer's stacked routed-expert tensor of `kind` (gate_proj / up_proj / down_proj)."""
    return f"blk.{layer}.ffn_{kind.removesuffix('_proj')}_exps.weight"


def gguf_arch(model_type: str) -> str:
    try:
        return GGUF_ARCH[model_type]
    except KeyError:
        raise ValueError(f"no GGUF architecture known for model_type {model_type!r} "
                         f"(known: {', '.join(sorted(GGUF_ARCH))})") from None


@dataclass(frozen=True)
class KvBSplit:
    """DeepSeek's kv_b_proj (H*(nope+v), r) as llama.cpp stores it (MLA with the absorbed projections):
    attn_k_b (H, r, nope), transposed so that its rows run along nope, and attn_v_b (H, v, r).

    H is num_attention_heads: transformers' DeepseekV3Attention gives kv_b_proj one (nope+v) block of
    rows per attention head, and llama.cpp's loader (deepseek2.cpp) makes wk_b {nope, r, n_head} and
    wv_b {r, v, n_head}. llama.cpp's converter (conversion/deepseek.py) reads num_key_value_heads there
    but asserts the same row count, so it converts only configs in which the two are equal (as in every
    DeepSeek-V2 / V3 release); num_key_value_heads is not the split's head count."""

    heads: int
    nope: int  # qk_nope_head_dim
    v: int  # v_head_dim
    rank: int  # kv_lora_rank

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> "KvBSplit":
        return cls(int(config["num_attention_heads"]), int(config["qk_nope_head_dim"]), int(config["v_head_dim"]),
                   int(config["kv_lora_rank"]))

    @property
    def kv_b_shape(self) -> tuple[int, int]:
        return (self.heads * (self.nope + self.v), self.rank)

    @property
    def k_b_shape(self) -> tuple[int, int, int]:
        return (self.heads, self.rank, self.nope)

    @property
    def v_b_shape(self) -> tuple[int, int, int]:
        return (self.heads, self.v, self.rank)

    def split(self, kv_b):
        """(k_b (H, r, nope), v_b (H, v, r)), contiguous, from kv_b (H*(nope+v), r): a torch tensor or a numpy array."""
        kv = kv_b.reshape(self.heads, self.nope + self.v, self.rank)
        return _contiguous(kv[:, :self.nope, :].swapaxes(1, 2)), _contiguous(kv[:, self.nope:, :])

    def join(self, k_b, v_b):
        """kv_b (H*(nope+v), r) from k_b (H, r, nope) and v_b (H, v, r): the inverse of split."""
        parts = [k_b.swapaxes(1, 2), v_b]
        if type(k_b).__module__.startswith("torch"):
            import torch

            kv = torch.cat(parts, dim=1)
        else:
            kv = np.concatenate(parts, axis=1)
        return kv.reshape(self.heads * (self.nope + self.v), self.rank)


def _contiguous(x):
    if hasattr(x, "contiguous"):
        return x.contiguous()
    return np.ascontiguousarray(x)


def tensor_order_key(name: str):
    """Sort key of GGUF tensor names: token_embd first, then the blocks in layer order, then the rest (by name)."""
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)
