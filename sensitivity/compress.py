"""Apply a compression decision to an in-memory transformers model.

Weights are replaced by their dequantized values from moeplan's kernels (so the model computes what a
runtime reading the quantized file computes), pruned experts are physically removed, and per-layer
top-k is set. For the `gguf` target, DeepSeek's kv_b_proj is quantized the way llama.cpp stores it
(split into k_b, transposed, and v_b, with their own row lengths and fallbacks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from moeplan import kernels
from moeplan.kernels import formats as fmts
from moeplan.kernels.gguf_layout import KvBSplit
from moeplan.kernels.refine import refinable, refine
from moeplan.kernels.inventory import EXPERT_RE, Target

from .adapters import adapter_for

_NO_OP = {"BF16", "F32"}  # the reference checkpoints are BF16: storing BF16 (or F32) changes nothing


@dataclass
class Decision:
    """What to do to a model: the plan's decisions without its bookkeeping."""

    formats: dict[str, str] = field(default_factory=dict)  # checkpoint tensor name -> requested format
    kept_experts: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> experts to keep
    top_k: dict[int, int] = field(default_factory=dict)  # MoE layer -> experts per token
    target: Target = Target.FREE

    @classmethod
    def from_plan(cls, plan) -> "Decision":
        """The decisions of an allocator.Plan (pruned experts are absent from plan.tensors)."""
        return cls(formats=dict(plan.tensors), kept_experts={l.layer: list(l.kept) for l in plan.layers},
                   top_k={l.layer: l.top_k for l in plan.layers}, target=Target(plan.target))


def quantize_dequantize(w: torch.Tensor, fmt: str, importance: np.ndarray | None = None,
                        name: str | None = None, gram: np.ndarray | None = None) -> torch.Tensor:
    """w after a round trip through `fmt` (llama.cpp's fallback applied for its row length); with
    `gram` (the (cols, cols) gram of its inputs), refined for it by kernels.refine where the format
    allows, as `moeplan materialize --refine` writes it."""
    f = fmts.resolve(fmt, w.shape[-1])
    if f.name in _NO_OP and w.dtype in (torch.bfloat16, torch.float32):
        return w.float() if f.name == "F32" else w.to(torch.bfloat16).float()
    x = w.detach().float().contiguous()
    imp = importance
    if f.needs_importance and imp is None:
        imp = np.ones(x.shape[-1], dtype=np.float32)
    if imp is not None and np.shape(imp)[-1] != x.shape[-1]:
        raise ValueError(f"importance of {name or 'a tensor'} has shape {tuple(np.shape(imp))}, but the tensor has "
                         f"{x.shape[-1]} input columns: one value per column is needed (is the importance file "
                         "from this model?)")
    try:
        q = kernels.quantize(x, f.name, imp)
    except ValueError as exc:
        raise ValueError(f"{name or 'tensor'} as {f.name}: {exc}") from None
    if gram is not None and refinable(f):
        q = refine(q, f, x.numpy(), gram)
    return torch.from_numpy(kernels.dequantize(q, f.name, x.shape))


def quantize_dequantize_kv_b(w: torch.Tensor, fmt: str, config: dict, importance: np.ndarray | None,
                             name: str | None = None) -> torch.Tensor:
    """kv_b_proj (H*(nope+v), r) through llama.cpp's storage: k_b (H, r, nope) and v_b (H, v, r)
    (kernels.gguf_layout.KvBSplit), each quantized with its own row length."""
    split = KvBSplit.of(config)
    h, nope, v, r = split.heads, split.nope, split.v, split.rank
    k_b, v_b = split.split(w.float())
    k_q = quantize_dequantize(k_b.reshape(h * r, nope), fmt).view(h, r, nope)
    v_q = quantize_dequantize(v_b.reshape(h * v, r), fmt, importance, name).view(h, v, r)
    return split.join(k_q, v_q)


@torch.no_grad()
def apply_decision(model: torch.nn.Module, decision: Decision,
                   importance: Mapping[str, np.ndarray] | None = None) -> torch.nn.Module:
    """Quantize-dequantize, prune and set top-k, in place. Returns the model."""
    ad = adapter_for(model)
    config = model.config.to_dict()
    refs = {r.name: r for r in ad.linear_tensors()}
    unknown = sorted(set(decision.formats) - set(refs))
    if unknown:
        raise KeyError(f"{len(unknown)} tensors of the decision are not in the model, e.g. {unknown[:3]}")
    for name, fmt in decision.formats.items():
        r = refs[name]
        imp = None if importance is None else importance.get(name)
        w = r.get()
        if Target(decision.target) is Target.GGUF and KvBSplit.applies(name, config):
            r.set(quantize_dequantize_kv_b(w, fmt, config, imp, name))
        else:
            r.set(quantize_dequantize(w, fmt, imp, name))
    prune_and_set_top_k(ad, decision.kept_experts, decision.top_k)
    return model


def prune_and_set_top_k(ad, kept_experts: Mapping[int, Sequence[int]], top_k: Mapping[int, int]) -> None:
    """Remove every routed expert not in kept_experts[layer] and set each layer's top-k. A lower top-k
    goes first: a layer may keep fewer experts than its original top-k."""
    for layer, k in top_k.items():
        if k < ad.top_k(layer):
            ad.set_top_k(layer, k)
    for layer, keep in kept_experts.items():
        if len(keep) != ad.n_experts(layer):
            ad.remove_experts(layer, list(keep))
    for layer, k in top_k.items():
        if k != ad.top_k(layer):
            ad.set_top_k(layer, k)


def predicted_damage(profile, decision: Decision) -> float:
    """The profile's prediction for a decision: the objective of the integer program."""
    total = 0.0
    removed: dict[int, set[int]] = {}
    for layer, keep in decision.kept_experts.items():
        n = profile.experts[layer].n_experts
        removed[layer] = set(range(n)) - set(keep)
        total += sum(profile.experts[layer].removal_kl[e] for e in removed[layer])
    for name, fmt in decision.formats.items():
        exp = _expert_of(name)
        if exp is not None and exp[1] in removed.get(exp[0], ()):
            continue  # a pruned expert carries no quantization damage
        total += profile.damage(name, fmt)
    for layer, k in decision.top_k.items():
        total += profile.topk_cost[layer][k]
    return total


def _expert_of(name: str) -> tuple[int, int] | None:
    m = EXPERT_RE.search(name)
    return (int(m.group(1)), int(m.group(2))) if m else None
