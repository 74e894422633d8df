"""A GGUF file moeplan wrote, read back as the compressed model's checkpoint tensors (what the tests and
the benchmarks compare with the in-memory compression): the expert stacking, the kv_b split and the
rope row order undone."""


from __future__ import annotations

import os
import re
from typing import Callable, Mapping

import numpy as np

from . import api as _api  # looked up at each call (tests patch kernels.api.quantize)
from .gguf_export import KEY_KEPT_EXPERTS, rope_row_perms
from .gguf_families import family_of, routed_expert_count
from .gguf_layout import KvBSplit, gguf_name


def compressed_config(config: Mapping, n_expert: int, top_k: int) -> dict:
    """The transformers config of the model a GGUF file holds: `n_expert` routed experts per layer, top-k."""
    out = dict(config)
    for key in ("n_routed_experts", "num_local_experts", "num_experts"):
        if key in out and out[key]:
            out[key] = n_expert
    out["num_experts_per_tok"] = top_k
    return out


def read_back(gguf_path: str | os.PathLike, config: Mapping,
              decode: Callable[[np.ndarray, int, tuple[int, ...]], np.ndarray] | None = None
              ) -> tuple[dict, dict[str, np.ndarray], dict[int, list[int]]]:
    """The compressed model in a GGUF file as checkpoint tensors.

    Returns (config of the compressed model, checkpoint name -> float32 array, kept experts per layer
    as original indices). Experts are renumbered 0..kept-1 in the names; the kv_b split, the expert
    stacking and any rope row reordering are undone. `decode(raw_bytes, ggml_type, shape)` dequantizes
    (default: moeplan's kernels)."""
    import gguf

    if decode is None:
        def decode(raw, type_id, shape):
            return _api.dequantize(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), int(type_id), shape)

    fam = family_of(config)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = fam.arch_name

    def field_val(key: str):
        f = reader.fields.get(key)
        if f is None:
            return None
        return f.contents()

    n_expert = int(field_val(f"{arch}.expert_count"))
    top_k = int(field_val(f"{arch}.expert_used_count"))
    kept = {}
    for layer in fam.moe_layers(config):
        v = field_val(KEY_KEPT_EXPERTS.format(layer=layer))
        kept[layer] = [int(e) for e in v] if v is not None else list(range(routed_expert_count(config)))
    cfg = compressed_config(config, n_expert, top_k)

    # GGUF name -> checkpoint name, for the tensors that map one to one
    ckpt_names = _expected_checkpoint_names(cfg)
    reverse: dict[str, str] = {}
    for n in ckpt_names:
        g = gguf_name(n, arch)
        if g is not None:
            reverse[g] = n
    perms = rope_row_perms(fam, config)

    state: dict[str, np.ndarray] = {}
    kb: dict[int, np.ndarray] = {}
    vb: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF ne -> torch order
        x = decode(np.asarray(t.data), int(t.tensor_type), shape).reshape(shape).astype(np.float32, copy=False)
        m = re.match(r"blk\.(\d+)\.(.+)\.(weight|bias)$", t.name)
        layer = int(m.group(1)) if m else None
        base = m.group(2) if m else None
        if base in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            kind = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}[base]
            for e in range(x.shape[0]):
                state[f"model.layers.{layer}.mlp.experts.{e}.{kind}.weight"] = x[e]
        elif base == "attn_k_b":
            kb[layer] = x
        elif base == "attn_v_b":
            vb[layer] = x
        else:
            if t.name not in reverse:
                raise ValueError(f"{gguf_path}: tensor {t.name} has no checkpoint name")
            name = reverse[t.name]
            kind = name.split(".")[-2]
            if kind in perms:
                inv = np.empty_like(perms[kind])
                inv[perms[kind]] = np.arange(len(inv))
                x = x[inv]
            state[name] = x
    split = KvBSplit.of(config) if kb else None
    for layer in kb:
        state[f"model.layers.{layer}.self_attn.kv_b_proj.weight"] = split.join(kb[layer], vb[layer])
    return cfg, state, kept


def _expected_checkpoint_names(cfg: Mapping) -> list[str]:
    """Checkpoint names of the (non-expert) tensors of a model of this config, from transformers on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c)
    names = [n for n, _ in model.named_parameters()]
    names += [n for n, _ in model.named_buffers() if "e_score_correction_bias" in n]
    return names
