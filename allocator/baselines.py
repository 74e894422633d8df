"""Baseline plans, made through the same size and damage accounting as the solver's plans.

- `uniform(problem, fmt)`: every quantizable tensor asked for `fmt` (llama.cpp's fallbacks apply
  where rows do not fit), every expert kept, the original top-k;
- `paper_pipeline(problem)`: the sequential pipeline of arXiv 2509.25689 -- keep the top 75% of
  each layer's experts by I_e = 0.5 f_e + 0.5 s_e, scale top-k by the same fraction, start every
  tensor at the smallest format of the menu and greedily upgrade the most sensitive tensors (the
  largest damage reduction per byte) while the budget allows. With group-limited routing the 75%
  are taken in every group (the runtime needs equal groups). It is also the exact solvers'
  alternative starting plan ("greedy");
- `llama_mix(problem, preset)`: llama.cpp's default mixes Q2_K, Q3_K_M and Q4_K_M, from the
  per-tensor type rules of llama-quant.cpp (written out in LLAMA_RULES below), every expert kept,
  the original top-k.

A baseline may need formats outside the problem's menu (Q5_K in Q3_K_M, Q6_K for the output); it
is then evaluated on the same problem with a wider menu (`widen`), which needs the profile to have
those formats. Every baseline returns a `Baseline`: its plan, and whether the plan fits.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from moeplan.kernels import formats as fmts
from moeplan.kernels.gguf_layout import gguf_names
from moeplan.kernels.inventory import Target

from .problem import Assignment, Problem, Totals, pareto


@dataclass
class Baseline:
    name: str
    problem: Problem  # the problem the assignment indexes (the input one, or a wider menu of it)
    assignment: Assignment | None
    violations: list[str] = field(default_factory=list)
    totals: Totals | None = None
    note: str = ""

    @property
    def feasible(self) -> bool:
        return self.assignment is not None and not self.violations

    @property
    def objective(self) -> float | None:
        return self.totals.damage if self.totals is not None else None


def widen(p: Problem, formats: list[str]) -> Problem:
    """The same problem with `formats` added to the menu (needs their damage in the profile)."""
    extra = [fmts.get(f).name for f in formats if fmts.get(f).name not in p.formats]
    if not extra:
        return p
    missing = [f for f in extra if f not in p.profile.formats]
    if missing:
        raise ValueError(f"this baseline needs formats {missing} that the profile does not have "
                         f"(it has {p.profile.formats}); profile them to compare against it")
    return Problem.build(p.inventory, p.profile, p.budget, p.target, list(p.formats) + extra, p.speed,
                         check_fingerprint=False)


def _finish(name: str, p: Problem, a: Assignment | None, note: str = "") -> Baseline:
    if a is None:
        return Baseline(name, p, None, ["no plan"], None, note)
    return Baseline(name, p, a, p.check(a), p.evaluate(a), note)


def _original_topk(p: Problem) -> np.ndarray:
    k = np.zeros(p.L, dtype=np.int64)
    for li, lay in enumerate(p.layers):
        opts = lay.topk_options if p.target is Target.FREE else p.global_topk_options()
        k[li] = p.top_k if p.top_k in opts else max(opts)
    return k


# ---------------------------------------------------------------------------------------------
# uniform

def uniform(p: Problem, fmt: str) -> Baseline:
    """Every quantizable tensor asked for `fmt`, all experts kept, the original top-k."""
    name = fmts.get(fmt).name
    q = widen(p, [name])
    f = q.fmt_index(name)
    a = Assignment(np.full(len(q.items), f, dtype=np.int64), np.ones((q.L, q.E), dtype=bool),
                   np.full((q.L, q.E, q.J), f, dtype=np.int64), _original_topk(q))
    return _finish(f"uniform {name}", q, a)


# ---------------------------------------------------------------------------------------------
# the seed paper's sequential pipeline

PAPER_KEEP = 0.75  # fraction of every layer's experts the paper keeps (671B -> 508B for DeepSeek-V3)


def paper_pipeline(p: Problem, keep_fraction: float = PAPER_KEEP) -> Assignment:
    """The pipeline's plan (raises ValueError when even its starting point does not fit)."""
    b = paper_baseline(p, keep_fraction)
    if not b.feasible:
        raise ValueError(f"the paper's pipeline has no plan here: {b.note or b.violations[:1]}")
    return b.assignment


def paper_baseline(p: Problem, keep_fraction: float = PAPER_KEEP, greedy_cache: dict | None = None) -> Baseline:
    name = "paper pipeline (2509.25689)"
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    L, E = p.L, p.E
    keep = np.zeros((L, E), dtype=bool)
    topk = np.zeros(L, dtype=np.int64)
    G = p.n_group if p.n_group > 1 else 1
    size = E // G if E else 0
    m = max(int(round(keep_fraction * size)), 2 if G > 1 else 1) if E else 0
    for li, lay in enumerate(p.layers):
        # step 1: keep the top fraction by I_e = 0.5 f_e + 0.5 s_e (in every group)
        imp = np.asarray(p.profile.experts[lay.layer].paper_importance)
        keep[li] = p._keep_top(imp, m)
        # step 2: top-k scaled by the same fraction, to an allowed value
        opts = lay.topk_options if p.target is Target.FREE else p.global_topk_options()
        want = max(1, int(round(p.top_k * keep_fraction)))
        reach = p.topk_group * m if G > 1 else m
        allowed = [k for k in opts if k <= reach]
        if not allowed:
            return _finish(name, p, None, "no top-k option fits the kept experts")
        topk[li] = min(allowed, key=lambda k: (abs(k - want), -k))
    # step 3: every tensor at the smallest format, then greedy upgrades by damage saved per byte
    # (the order of upgrades does not depend on the budget: a sweep computes it once)
    key = ("paper_greedy", id(p.exp_damage), id(p.item_damage), p.target.value, keep_fraction, p.speed)
    store = {} if greedy_cache is None else greedy_cache
    if key not in store:
        store[key] = _Greedy(p, keep, topk)
    a = store[key].plan(p.budget.weights)
    if a is None:
        return _finish(name, p, None, "the pruned model at the smallest formats does not fit the budget")
    return _finish(name, p, a)


class _Greedy:
    """The pipeline's step 3 for fixed kept experts and top-k.

    Units are tensors (for gguf: stacked expert tensors); each climbs the ladder of its undominated
    formats from the smallest. The greedy takes, among every unit's next step, the one with the
    largest damage decrease per added byte, if it fits the budget; a unit whose step does not fit
    stops there. The order in which steps come up does not depend on the budget (a stopped unit
    only drops out), so it is computed once and each budget walks it (`plan`)."""

    def __init__(self, p: Problem, keep: np.ndarray, topk: np.ndarray):
        self.p, self.keep, self.topk = p, keep, topk
        n = len(p.items)
        L, J = p.L, p.J
        gguf = p.target is Target.GGUF
        units: list[tuple] = []
        ub, uc = [], []
        for i in range(n):
            units.append(("item", (i,)))
            ub.append(p.item_bytes[i]); uc.append(p.item_damage[i])
        nk = keep.sum(1)
        for l in range(L):
            for j in range(J):
                if gguf:
                    units.append(("stacked", (l, j)))
                    ub.append(nk[l] * p.exp_bytes[l, j]); uc.append(p.exp_damage[l, keep[l], j].sum(0))
                else:
                    for e in np.flatnonzero(keep[l]):
                        units.append(("expert", (l, int(e), j)))
                        ub.append(p.exp_bytes[l, j]); uc.append(p.exp_damage[l, e, j])
        ub, uc = np.array(ub), np.array(uc)
        ok, _ = pareto(ub, uc)
        order = np.lexsort((uc, ub), axis=-1)  # formats by bytes, then damage, per unit
        ladders = [o[k].tolist() for o, k in zip(order, np.take_along_axis(ok, order, 1))]
        self.units, self.ladders = units, ladders
        ubl, ucl = ub.tolist(), uc.tolist()
        # the budget-independent order of steps: (unit, new format, added bytes)
        heap = []
        for u, lad in enumerate(ladders):
            if len(lad) > 1:
                heap.append((-(ucl[u][lad[0]] - ucl[u][lad[1]]) / max(ubl[u][lad[1]] - ubl[u][lad[0]], 1), u, 1))
        heapq.heapify(heap)
        steps = []
        while heap:
            _, u, r = heapq.heappop(heap)
            lad = ladders[u]
            steps.append((u, lad[r], ubl[u][lad[r]] - ubl[u][lad[r - 1]]))
            if r + 1 < len(lad):
                f0, f1 = lad[r], lad[r + 1]
                heapq.heappush(heap, (-(ucl[u][f0] - ucl[u][f1]) / max(ubl[u][f1] - ubl[u][f0], 1), u, r + 1))
        self.steps = steps

    def base(self) -> Assignment:
        p = self.p
        item_fmt = np.zeros(len(p.items), dtype=np.int64)
        efmt = np.full((p.L, p.E, p.J), -1, dtype=np.int64)
        a = Assignment(item_fmt, self.keep.copy(), efmt, self.topk.copy())
        for u, (kind, idx) in enumerate(self.units):
            self._set(a, kind, idx, self.ladders[u][0])
        return a

    def _set(self, a: Assignment, kind: str, idx: tuple, f: int) -> None:
        if kind == "item":
            a.item_fmt[idx[0]] = f
        elif kind == "stacked":
            a.expert_fmt[idx[0], self.keep[idx[0]], idx[1]] = f
        else:
            a.expert_fmt[idx] = f

    def plan(self, weight_budget: int | None = None) -> Assignment | None:
        p = self.p
        a = self.base()
        tot = p.evaluate(a)
        slack = (p.budget.weights if weight_budget is None else weight_budget) - tot.weight_bytes
        slack_r = p.speed.max_read - tot.read_per_token if p.speed is not None else None
        if slack < 0 or (slack_r is not None and slack_r < 0):
            return None
        stopped = set()
        if slack_r is not None:
            eb = p.expert_total_bytes(a).tolist() if p.L else []
            lmax = [max(row) for row in eb]
        for u, f, db in self.steps:
            if u in stopped:
                continue
            kind, idx = self.units[u]
            if slack_r is not None:  # bytes read per token follow the step too
                if kind == "expert":
                    l, e, j = idx
                    newb = eb[l][e] + db
                    dr = int(self.topk[l] * max(0, newb - lmax[l]))
                elif kind == "stacked":
                    dr = int(self.topk[idx[0]] * db // max(int(self.keep[idx[0]].sum()), 1))
                else:
                    i = idx[0]
                    dr = int(p.item_read[i, f] - p.item_read[i, a.item_fmt[i]])
                if dr > slack_r:
                    stopped.add(u)
                    continue
            if db > slack:
                stopped.add(u)
                continue
            slack -= db
            self._set(a, kind, idx, f)
            if slack_r is not None:
                slack_r -= dr
                if kind == "expert":
                    eb[l][e] = newb
                    lmax[l] = max(lmax[l], newb)
        return a


# ---------------------------------------------------------------------------------------------
# llama.cpp's default mixes

def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# The per-tensor rules of llama.cpp's presets (llama-quant.cpp, llama_tensor_get_type_impl) for the
# tensor classes an MoE model has, in the order llama.cpp applies them. `i` is the layer of the
# tensor (ffn_down) or the running count of attn_v-like tensors (attn_v, attn_qkv, attn_kv_b), `n`
# the count of layers / of such tensors; `experts8` is llama.cpp's special case for 8-expert models
# (Mixtral) and `gqa` the query heads per KV head.
LLAMA_RULES = {
    #  class            Q2_K                                  Q3_K_M                                         Q4_K_M
    "output":      {"Q2_K": lambda **c: "Q6_K", "Q3_K_M": lambda **c: "Q6_K", "Q4_K_M": lambda **c: "Q6_K"},
    "token_embd":  {"Q2_K": lambda **c: None, "Q3_K_M": lambda **c: None, "Q4_K_M": lambda **c: None},
    "attn_v":      {"Q2_K": lambda i, n, gqa, experts8, **c: "Q8_0" if experts8 else ("Q4_K" if gqa >= 4 else "Q3_K"),
                    "Q3_K_M": lambda i, n, experts8, **c: "Q8_0" if experts8 else ("Q5_K" if i < 2 else "Q4_K"),
                    "Q4_K_M": lambda i, n, experts8, **c: "Q8_0" if experts8 else ("Q6_K" if _more_bits(i, n) else None)},
    "attn_k":      {"Q2_K": lambda experts8, **c: "Q8_0" if experts8 else None,
                    "Q3_K_M": lambda experts8, **c: "Q8_0" if experts8 else None,
                    "Q4_K_M": lambda experts8, **c: "Q8_0" if experts8 else None},
    "attn_output": {"Q2_K": lambda experts8, **c: "Q5_K" if experts8 else "Q3_K",
                    "Q3_K_M": lambda experts8, **c: "Q5_K" if experts8 else "Q4_K",
                    "Q4_K_M": lambda experts8, **c: "Q5_K" if experts8 else None},
    "attn_qkv":    {"Q2_K": lambda **c: None, "Q3_K_M": lambda **c: "Q4_K", "Q4_K_M": lambda **c: "Q5_K"},
    "ffn_down":    {"Q2_K": lambda **c: "Q3_K",
                    "Q3_K_M": lambda i, n, **c: "Q5_K" if i < n // 16 else "Q4_K",
                    "Q4_K_M": lambda i, n, **c: "Q6_K" if _more_bits(i, n) else None},
}
LLAMA_DEFAULT = {"Q2_K": "Q2_K", "Q3_K_M": "Q3_K", "Q4_K_M": "Q4_K"}  # the preset's base type


def _llama_class(gguf_name: str) -> str | None:
    """llama.cpp's tensor category (tensor_get_category), by substring of the GGUF name."""
    if gguf_name == "output.weight":
        return "output"
    if gguf_name == "token_embd.weight":
        return "token_embd"
    for key, cls in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_output.weight", "attn_output"), ("ffn_down", "ffn_down")):
        if key in gguf_name:
            return cls
    return None


def llama_mix_types(inventory, preset: str) -> dict[str, str]:
    """GGUF tensor name -> the type llama.cpp's preset asks for (before the row-length fallback,
    which the byte model applies)."""
    if preset not in LLAMA_DEFAULT:
        raise ValueError(f"unknown llama.cpp preset {preset!r}; known: {', '.join(LLAMA_DEFAULT)}")
    cfg = inventory.config
    n_layers = int(cfg.get("num_hidden_layers", 0) or 0)
    heads = int(cfg.get("num_attention_heads", 1) or 1)
    gqa = heads // int(cfg.get("num_key_value_heads") or heads)
    moe = inventory.moe_layers
    experts8 = bool(moe) and len(inventory.experts_in_layer(moe[0])) == 8
    names: list[str] = []
    for t in inventory.tensors:
        if t.quantizable:
            for g in gguf_names(t.name, inventory.model_type):
                if g not in names:
                    names.append(g)
    n_v = sum(1 for g in names if _llama_class(g) == "attn_v")
    out, i_v = {}, 0
    for g in names:
        cls = _llama_class(g)
        ftype = LLAMA_DEFAULT[preset]
        if cls is not None:
            layer = int(g.split(".")[1]) if g.startswith("blk.") else 0
            i, n = (i_v, n_v) if cls == "attn_v" else (layer, n_layers)
            ftype = LLAMA_RULES[cls][preset](i=i, n=n, gqa=gqa, experts8=experts8) or ftype
            if cls == "attn_v":
                i_v += 1
        out[g] = ftype
    return out


def llama_mix(p: Problem, preset: str) -> Baseline:
    """llama.cpp's preset mix: every expert kept, the original top-k, per-tensor types by its rules."""
    types = llama_mix_types(p.inventory, preset)
    q = widen(p, sorted(set(types.values())))
    item_fmt = np.zeros(len(q.items), dtype=np.int64)
    for it in q.items:
        parts = gguf_names(it.name, q.inventory.model_type)
        # DeepSeek's kv_b_proj is stored as attn_k_b + attn_v_b; llama.cpp's rules give both one type here
        item_fmt[it.index] = q.fmt_index(types[parts[0]])
    efmt = np.zeros((q.L, q.E, q.J), dtype=np.int64)
    for li, lay in enumerate(q.layers):
        for j in range(q.J):
            efmt[li, :, j] = q.fmt_index(types[gguf_names(lay.tensor_names[0][j], q.inventory.model_type)[0]])
    a = Assignment(item_fmt, np.ones((q.L, q.E), dtype=bool), efmt, _original_topk(q))
    return _finish(f"llama.cpp {preset}", q, a)


def all_baselines(p: Problem, uniform_formats: list[str] | None = None) -> list[Baseline]:
    """The paper's pipeline, llama.cpp's three mixes and uniform formats; skipped (with a note) where
    the profile lacks a needed format."""
    out: list[Baseline] = [paper_baseline(p)]
    for preset in LLAMA_DEFAULT:
        try:
            out.append(llama_mix(p, preset))
        except ValueError as exc:
            out.append(Baseline(f"llama.cpp {preset}", p, None, ["not evaluated"], None, str(exc)))
    for f in uniform_formats or []:
        try:
            out.append(uniform(p, f))
        except ValueError as exc:
            out.append(Baseline(f"uniform {f}", p, None, ["not evaluated"], None, str(exc)))
    return out
