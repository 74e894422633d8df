"""llama.cpp's GGUF layout of a checkpoint: tensor names, DeepSeek's kv_b split, tensor order.

- gguf_name / gguf_names: checkpoint tensor names -> the names llama.cpp's GGUF files use
  (blk.N.ffn_down_exps, ...), through gguf-py's TensorNameMap: for the GGUF writer and its reader, the
  plan's llama-quantize arguments, llama.cpp's per-tensor type rules (which match on these names) and
  reading llama-imatrix files. Routed experts map to their layer's stacked tensor; DeepSeek's
  kv_b_proj is stored split as attn_k_b and attn_v_b (llama.cpp's MLA layout).
- KvBSplit: that split's shapes and the split itself (the inventory's byte counts, the in-memory
  compression, the GGUF writer and its reader all use it).
- tensor_order_key: the order of the tensors in a file moeplan writes (and of llama-quantize arguments).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

# model_type -> GGUF architecture name (the prefix of the metadata keys, e.g. deepseek2.expert_count)
GGUF_ARCH = {"deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2", "qwen3_moe": "qwen3moe",
             "qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe"}

_LAYER = re.compile(r"^(?P<pre>.*?layers\.)(?P<layer>\d+)(?P<rest>\..+)$")
# one routed expert's matrix as the GGUF families store them (prefix: the layer's experts module)
EXPERT_MATRIX = re.compile(r"^(?P<prefix>.*layers\.(?P<layer>\d+)\.mlp\.experts)\.(?P<expert>\d+)\."
                           r"(?P<kind>gate_proj|up_proj|down_proj)\.weight$")


@functools.lru_cache(maxsize=None)
def _name_map(arch: str):
    """gguf-py's TensorNameMap of `arch` for block 0 (gguf_name moves block L to block 0 and back)."""
    import gguf

    for arch_id, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return gguf.get_tensor_name_map(arch_id, 1)
    raise RuntimeError(f"the installed gguf package does not know the architecture {arch!r}")


def gguf_name(name: str, arch: str) -> str | None:
    """The GGUF name of checkpoint tensor `name` in GGUF architecture `arch` (e.g. deepseek2), from
    gguf-py's TensorNameMap (llama.cpp's converter's own table); a layer's routed experts go by their
    stacked name (model.layers.L.mlp.experts.gate_proj.weight -> blk.L.ffn_gate_exps.weight). None when
    llama.cpp has no such tensor in that architecture."""
    key = name.replace("e_score_correction_bias", "e_score_correction.bias")
    m = _LAYER.match(key)
    if m:
        key = f"{m['pre']}0{m['rest']}"
    out = _name_map(arch).get_name(key, try_suffixes=(".weight", ".bias"))
    if out is None or m is None:
        return out
    return f"blk.{m['layer']}." + out.removeprefix("blk.0.") if out.startswith("blk.0.") else out


def gguf_names(name: str, model_type: str | None = None) -> list[str]:
    """The GGUF tensor(s) a checkpoint tensor is stored as: two for DeepSeek's kv_b_proj (attn_k_b,
    attn_v_b); a routed expert's tensor (model.layers.L.mlp.experts.E.down_proj.weight) maps to its
    layer's stacked tensor. Named as in the architecture of `model_type` or, where that one has no such
    tensor (a dense layer of a Qwen MoE: llama.cpp's qwen3moe has none), in the first of GGUF_ARCH's
    that has it (every architecture names a tensor type the same way). Unknown names raise."""
    e = EXPERT_MATRIX.match(name)
    key = f"{e['prefix']}.{e['kind']}.weight" if e else name
    keys = list(KvBSplit.part_names(key)) if KvBSplit.is_kv_b(key) else [key]
    arches = dict.fromkeys([GGUF_ARCH[model_type]] if model_type in GGUF_ARCH else [])
    arches.update(dict.fromkeys(GGUF_ARCH.values()))
    for arch in arches:
        out = [gguf_name(k, arch) for k in keys]
        if all(out):
            return out
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

    @staticmethod
    def is_kv_b(name: str) -> bool:
        return name.endswith("self_attn.kv_b_proj.weight")

    @staticmethod
    def applies(name: str, config: Mapping[str, Any] | None) -> bool:
        """Whether llama.cpp stores checkpoint tensor `name` of a model of `config` split (MLA's kv_b_proj)."""
        return KvBSplit.is_kv_b(name) and config is not None and bool(config.get("kv_lora_rank"))

    @staticmethod
    def part_names(name: str) -> tuple[str, str]:
        """The checkpoint-style names of kv_b_proj's two parts (k_b_proj, v_b_proj), as TensorNameMap knows them."""
        return name.replace("kv_b_proj", "k_b_proj"), name.replace("kv_b_proj", "v_b_proj")

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
