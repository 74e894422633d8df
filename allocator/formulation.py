"""The integer program (the data of allocator/problem.py), written once, read by every exact solver.

Data (from `Problem`):  items i with formats f: bytes b[i,f], damage c[i,f], read r[i,f];
MoE layers l, experts e, tensor kinds j: bytes b[l,j,f] of one expert's tensor, damage c[l,e,j,f];
removal cost p[l,e]; top-k cost a[l,k]; router bytes rb[l] per kept expert; groups g of a layer.

Variables (dicts keyed by index tuples, named after the math):
  x[i,f]      in {0,1}   item i stored in format f
  keep[l,e]   in {0,1}   routed expert e of layer l kept
  y[l,e,j,f]  in {0,1}   kind-j tensor of expert e of layer l stored in format f
  t[l,k]      in {0,1}   layer l activates k experts (free)        T[k] one global k (gguf)
  m[l]        integer    experts kept per group of layer l (free)   m one global count (gguf)
  z[l,j,f]    in {0,1}   gguf: the stacked kind-j tensor of layer l is in format f
  c[m], u[l,j,f,m]       gguf: one-hot kept count per group, and u = z AND c (see build_model)
  speed, free:  cap[l] >= bytes of every kept expert, split as cap[l] = sum_k capk[l,k]
  speed, gguf:  w[l,j,f,k] = z[l,j,f] AND T[k]  (continuous, exact: see the constraint)

Objective (nats/token):  sum c x + sum c y + sum p (1 - keep) + sum a t.

Candidates dominated by another of the same item (no more bytes, damage or read) are left out:
any plan using one can switch to its dominator without losing feasibility or cost, so the
optimum is unchanged (`dominator` maps them, to translate hints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from moeplan.kernels.inventory import Target

from .problem import Assignment, Problem, pareto


FAMILIES = ("one_format", "expert_format", "stacked_format", "gguf_uniform", "count_link", "topk_choice",
            "keep_ge_topk",
            "kept_count", "group_reach", "memory", "speed", "speed_cap", "speed_split", "speed_link")


@dataclass
class MipModel:
    """A mixed-integer linear program in plain arrays: columns with bounds, cost and type; rows
    lo <= sum coef * col <= hi, each tagged with its constraint family."""

    name: str = "moeplan"
    lb: list = field(default_factory=list)
    ub: list = field(default_factory=list)
    cost: list = field(default_factory=list)
    integer: list = field(default_factory=list)
    keys: list = field(default_factory=list)  # (variable name, index tuple)
    row_cols: list = field(default_factory=list)
    row_vals: list = field(default_factory=list)
    row_lo: list = field(default_factory=list)
    row_hi: list = field(default_factory=list)
    row_family: list = field(default_factory=list)
    offset: float = 0.0  # constant added to the objective

    def var(self, name: str, key: tuple, lb: float = 0.0, ub: float = 1.0, cost: float = 0.0,
            integer: bool = True) -> int:
        self.lb.append(lb)
        self.ub.append(ub)
        self.cost.append(float(cost))
        self.integer.append(integer)
        self.keys.append((name, key))
        return len(self.lb) - 1

    def add(self, family: str, terms: dict[int, float], lo: float = -math.inf, hi: float = math.inf) -> None:
        self.row_cols.append(np.fromiter(terms.keys(), dtype=np.int64, count=len(terms)))
        self.row_vals.append(np.fromiter(terms.values(), dtype=np.float64, count=len(terms)))
        self.row_lo.append(lo)
        self.row_hi.append(hi)
        self.row_family.append(family)

    @property
    def n_cols(self) -> int:
        return len(self.lb)

    @property
    def n_rows(self) -> int:
        return len(self.row_lo)

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row-wise sparse matrix (start, index, value)."""
        lens = np.fromiter((len(c) for c in self.row_cols), dtype=np.int64, count=self.n_rows)
        start = np.zeros(self.n_rows + 1, dtype=np.int64)
        np.cumsum(lens, out=start[1:])
        idx = np.concatenate(self.row_cols) if self.n_rows else np.zeros(0, dtype=np.int64)
        val = np.concatenate(self.row_vals) if self.n_rows else np.zeros(0)
        return start, idx, val

    def col_name(self, c: int) -> str:
        name, key = self.keys[c]
        return f"{name}[{','.join(str(k) for k in key)}]"

    def summary(self) -> dict:
        fam: dict[str, int] = {}
        for f in self.row_family:
            fam[f] = fam.get(f, 0) + 1
        n_int = sum(self.integer)
        return {"columns": self.n_cols, "integer_columns": n_int, "rows": self.n_rows,
                "nonzeros": int(sum(len(c) for c in self.row_cols)), "rows_by_family": fam}


@dataclass
class Formulation:
    problem: Problem
    model: MipModel
    x: dict
    y: dict
    keep: dict
    t: dict  # (l, k) -> column; for gguf every layer maps to the global T[k]
    m: dict  # l -> column (free) or every l -> the global m (gguf)
    z: dict
    dominator: dict  # ("x", i, f) / ("y", l, e, j, f) / ("z", l, j, f) -> the format index that replaces f
    dropped: tuple[str, ...]

    # ---- values <-> plans ----
    def to_assignment(self, values: np.ndarray) -> Assignment:
        p = self.problem
        v = np.asarray(values) > 0.5
        item_fmt = np.zeros(len(p.items), dtype=np.int64)
        for (i, f), c in self.x.items():
            if v[c]:
                item_fmt[i] = f
        keep = np.zeros((p.L, p.E), dtype=bool)
        for (l, e), c in self.keep.items():
            keep[l, e] = v[c]
        efmt = np.full((p.L, p.E, p.J), -1, dtype=np.int64)
        for (l, e, j, f), c in self.y.items():
            if v[c]:
                efmt[l, e, j] = f
        topk = np.zeros(p.L, dtype=np.int64)
        for (l, k), c in self.t.items():
            if v[c]:
                topk[l] = k
        return Assignment(item_fmt, keep, efmt, topk)

    def values_of(self, a: Assignment) -> np.ndarray:
        """Column values of a plan (a MIP start); choices of dominated candidates move to their dominator."""
        p = self.problem
        mdl = self.model
        val = np.zeros(mdl.n_cols)
        for i, f in enumerate(a.item_fmt.tolist()):
            f = self.dominator.get(("x", i, f), f)
            val[self.x[i, f]] = 1.0
        zf = {}
        if self.z:
            for l in range(p.L):
                kept = np.flatnonzero(a.keep[l])
                for j in range(p.J):
                    f = int(a.expert_fmt[l, kept[0], j]) if len(kept) else int(np.argmin(p.exp_bytes[l, j]))
                    f = self.dominator.get(("z", l, j, f), f)
                    zf[l, j] = f
                    val[self.z[l, j, f]] = 1.0
        for l in range(p.L):
            for e in range(p.E):
                if a.keep[l, e]:
                    val[self.keep[l, e]] = 1.0
                    for j in range(p.J):
                        f = zf[l, j] if zf else self.dominator.get(("y", l, e, j, int(a.expert_fmt[l, e, j])),
                                                                  int(a.expert_fmt[l, e, j]))
                        val[self.y[l, e, j, f]] = 1.0
            k = int(a.topk[l])
            if (l, k) in self.t:
                val[self.t[l, k]] = 1.0
        counts = a.keep.reshape(p.L, max(p.n_group, 1), -1).sum(2)
        for l, c in self.m.items():
            val[c] = counts[l, 0]
        # speed helpers: the smallest values the constraints allow
        for c, (name, key) in enumerate(mdl.keys):
            if name == "cap":
                (l,) = key
                val[c] = _expert_bytes_max(p, a, l, self.dominator)
            elif name == "capk":
                l, k = key
                val[c] = _expert_bytes_max(p, a, l, self.dominator) if int(a.topk[l]) == k else 0.0
            elif name == "w":
                l, j, f, k = key
                val[c] = 1.0 if (zf.get((l, j)) == f and int(a.topk[0]) == k) else 0.0
            elif name == "c":
                val[c] = 1.0 if key[0] == counts[0, 0] else 0.0
            elif name == "u":
                l, j, f, mm = key
                val[c] = 1.0 if (zf.get((l, j)) == f and mm == counts[0, 0]) else 0.0
        return val


def _expert_bytes_max(p: Problem, a: Assignment, l: int, dominator: dict) -> float:
    best = 0
    for e in np.flatnonzero(a.keep[l]):
        b = 0
        for j in range(p.J):
            f = int(a.expert_fmt[l, e, j])
            f = dominator.get(("y", l, int(e), j, f), dominator.get(("z", l, j, f), f))
            b += int(p.exp_bytes[l, j, f])
        best = max(best, b)
    return float(best)


GGUF_LINKING = ("count", "expert")


def build_model(p: Problem, drop: Iterable[str] = (), prune_dominated: bool = True,
                gguf_linking: str = "count") -> Formulation:
    """The integer program of `p`. `drop` leaves constraint families out (only to show, in tests,
    that each family matters); `prune_dominated=False` keeps every candidate.

    `gguf_linking` chooses how the gguf target ties each kept expert to its layer's stacked format
    (both exact): "expert" writes y[l,e,j,f] <= z[l,j,f] for every expert (tight, 356k rows at
    DeepSeek-V3 scale); "count" (default) counts instead: the experts of layer l in format f number
    n z[l,j,f], with n = G m the kept count, linearized through u[l,j,f,m] = z[l,j,f] AND c[m] over
    the one-hot count c (a few thousand rows)."""
    if gguf_linking not in GGUF_LINKING:
        raise ValueError(f"gguf_linking must be one of {GGUF_LINKING}, not {gguf_linking!r}")
    drop = tuple(drop)
    unknown = set(drop) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown constraint families {sorted(unknown)}; known: {FAMILIES}")
    gguf = p.target is Target.GGUF
    mdl = MipModel(name=f"moeplan_{p.target.value}")
    F, L, E, J = p.F, p.L, p.E, p.J
    G = p.n_group if p.n_group > 1 else 1
    size = E // G if E else 0
    dominator: dict = {}

    # ---- candidates: drop dominated formats (exact: see the module docstring) ----
    def undominated(nbytes, cost, read=None, across=None):
        if not prune_dominated:
            shape = np.shape(cost) if across is None else np.delete(np.shape(cost), across)
            return np.ones(shape, dtype=bool), np.broadcast_to(np.arange(F), shape)
        return pareto(nbytes, cost, read, across)

    # ---- variables ----
    x: dict = {}
    ok_x, dom_x = undominated(p.item_bytes, p.item_damage, p.item_read)
    for i in range(len(p.items)):
        for f in range(F):
            if ok_x[i, f]:
                x[i, f] = mdl.var("x", (i, f), cost=p.item_damage[i, f])
            else:
                dominator["x", i, f] = int(dom_x[i, f])

    keep: dict = {}
    y: dict = {}
    z: dict = {}
    for l in range(L):
        for e in range(E):
            # p (1 - keep): the constant sum p goes to the objective's offset
            keep[l, e] = mdl.var("keep", (l, e), cost=-p.removal[l, e])
            mdl.offset += float(p.removal[l, e])
        if gguf:
            # a stacked format is dominated only when it is no better for every expert of the layer
            ok_z, dom_z = undominated(p.exp_bytes[l], p.exp_damage[l], across=0)  # (J, F)
            for j in range(J):
                for f in range(F):
                    if not ok_z[j, f]:
                        dominator["z", l, j, f] = int(dom_z[j, f])
                        continue
                    z[l, j, f] = mdl.var("z", (l, j, f))
                    for e in range(E):
                        y[l, e, j, f] = mdl.var("y", (l, e, j, f), cost=p.exp_damage[l, e, j, f])
        else:
            ok_y, dom_y = undominated(p.exp_bytes[l][None], p.exp_damage[l])  # (E, J, F)
            for e in range(E):
                for j in range(J):
                    for f in range(F):
                        if ok_y[e, j, f]:
                            y[l, e, j, f] = mdl.var("y", (l, e, j, f), cost=p.exp_damage[l, e, j, f])
                        else:
                            dominator["y", l, e, j, f] = int(dom_y[e, j, f])

    # (the objective's costs sit on the variables: c on x and y, -p on keep with sum p as a constant
    # offset, so that p (1 - keep) is paid for every pruned expert, and a on t / T)
    t: dict = {}
    m: dict = {}
    m_lo = 2 if G > 1 else 1
    if gguf:
        ks = p.global_topk_options()
        T = {k: mdl.var("T", (k,), cost=float(sum(p.topk_cost[l, p.topk_index(k)] for l in range(L)))) for k in ks}
        t = {(l, k): T[k] for l in range(L) for k in ks}
        if L:
            mg = mdl.var("m", (), lb=m_lo, ub=size)
            m = {l: mg for l in range(L)}
    else:
        for l, lay in enumerate(p.layers):
            for k in lay.topk_options:
                t[l, k] = mdl.var("t", (l, k), cost=float(p.topk_cost[l, p.topk_index(k)]))
            m[l] = mdl.var("m", (l,), lb=m_lo, ub=size)

    def use(family: str) -> bool:
        return family not in drop

    # ---- constraints ----
    # one_format: every non-expert tensor is stored in exactly one format: sum_f x[i,f] = 1
    if use("one_format"):
        for i in range(len(p.items)):
            mdl.add("one_format", {x[i, f]: 1.0 for f in range(F) if (i, f) in x}, 1.0, 1.0)

    # expert_format: a kept expert's tensor has one format, a pruned one none: sum_f y[l,e,j,f] = keep[l,e]
    if use("expert_format"):
        for l in range(L):
            for e in range(E):
                for j in range(J):
                    row = {y[l, e, j, f]: 1.0 for f in range(F) if (l, e, j, f) in y}
                    row[keep[l, e]] = -1.0
                    mdl.add("expert_format", row, 0.0, 0.0)

    if gguf:
        # stacked_format: one format per stacked tensor (layer, kind): sum_f z[l,j,f] = 1
        if use("stacked_format"):
            for l in range(L):
                for j in range(J):
                    mdl.add("stacked_format", {z[l, j, f]: 1.0 for f in range(F) if (l, j, f) in z}, 1.0, 1.0)
        if gguf_linking == "expert":
            # gguf_uniform: every kept expert of a layer uses the stacked format: y[l,e,j,f] <= z[l,j,f]
            if use("gguf_uniform"):
                for (l, e, j, f), c in y.items():
                    mdl.add("gguf_uniform", {c: 1.0, z[l, j, f]: -1.0}, hi=0.0)
        elif L:
            # c[m]: the model keeps m experts per group (one-hot; sum_m c[m] = 1 and m = sum_m m c[m]
            # follow from the rows below with stacked_format and kept_count, so they are not written)
            ms = list(range(m_lo, size + 1))
            cnt = {mm: mdl.var("c", (mm,)) for mm in ms}
            # count_link: u[l,j,f,m] = z[l,j,f] AND c[m], exactly (c is one-hot): sum_f u[l,j,f,m] = c[m]
            # zeroes every count but the chosen one, and sum_m u[l,j,f,m] = z[l,j,f] copies z into it
            u = {(l, j, f, mm): mdl.var("u", (l, j, f, mm), integer=False) for (l, j, f) in z for mm in ms}
            if use("count_link"):
                for (l, j, f), zc in z.items():
                    row = {u[l, j, f, mm]: 1.0 for mm in ms}
                    row[zc] = -1.0
                    mdl.add("count_link", row, 0.0, 0.0)
                for l in range(L):
                    for j in range(J):
                        for mm in ms:
                            row = {u[l, j, f, mm]: 1.0 for f in range(F) if (l, j, f) in z}
                            row[cnt[mm]] = -1.0
                            mdl.add("count_link", row, 0.0, 0.0)
            # gguf_uniform: the kept experts in format f number G m z[l,j,f]: all kept experts use the
            # stacked format: sum_e y[l,e,j,f] = sum_m G m u[l,j,f,m]
            if use("gguf_uniform"):
                for (l, j, f) in z:
                    row = {y[l, e, j, f]: 1.0 for e in range(E)}
                    row.update({u[l, j, f, mm]: -float(G * mm) for mm in ms})
                    mdl.add("gguf_uniform", row, 0.0, 0.0)

    # topk_choice: each layer activates one k (gguf: one k for the model): sum_k t[l,k] = 1
    if use("topk_choice"):
        for l in range(L) if not gguf else range(min(L, 1)):
            mdl.add("topk_choice", {c: 1.0 for (ll, k), c in t.items() if ll == l}, 1.0, 1.0)

    # keep_ge_topk: a layer keeps at least k experts: sum_e keep[l,e] - sum_k k t[l,k] >= 0
    if use("keep_ge_topk"):
        for l in range(L):
            row = {keep[l, e]: 1.0 for e in range(E)}
            for (ll, k), c in t.items():
                if ll == l:
                    row[c] = row.get(c, 0.0) - k
            mdl.add("keep_ge_topk", row, lo=0.0)

    # kept_count: every group of a layer keeps m experts (no groups: the whole layer is one group);
    # gguf: one m for every layer, so the expert count is the same in every MoE layer
    if use("kept_count"):
        for l in range(L):
            for g in range(G):
                row = {keep[l, e]: 1.0 for e in range(g * size, (g + 1) * size)}
                row[m[l]] = -1.0
                mdl.add("kept_count", row, 0.0, 0.0)

    # group_reach: a token routes within topk_group groups: sum_k k t[l,k] <= topk_group * m[l]
    if G > 1 and use("group_reach"):
        for l in range(L) if not gguf else range(min(L, 1)):
            row = {c: float(k) for (ll, k), c in t.items() if ll == l}
            row[m[l]] = -float(p.topk_group)
            mdl.add("group_reach", row, hi=0.0)

    # memory: fixed + sum b x + sum b y + sum rb keep <= weight budget
    if use("memory"):
        row = {c: float(p.item_bytes[i, f]) for (i, f), c in x.items()}
        row.update({c: float(p.exp_bytes[l, j, f]) for (l, e, j, f), c in y.items()})
        row.update({c: float(p.router_bytes[l]) for (l, e), c in keep.items() if p.router_bytes[l]})
        mdl.add("memory", row, hi=float(p.budget.weights - p.fixed_bytes))

    # speed: bytes read per decoded token <= bandwidth / tokens per second
    if p.speed is not None:
        row = {c: float(p.item_read[i, f]) for (i, f), c in x.items()}
        row.update({c: float(p.router_bytes[l]) for (l, e), c in keep.items() if p.router_bytes[l]})
        if gguf:
            # w[l,j,f,k] = z[l,j,f] AND T[k], exactly: T is one-hot, so sum_f w[l,j,f,k] = T[k] zeroes
            # every k but the chosen one, and sum_k w[l,j,f,k] = z[l,j,f] then copies z into it
            ks = p.global_topk_options()
            w = {(l, j, f, k): mdl.var("w", (l, j, f, k), integer=False)
                 for (l, j, f) in z for k in ks}
            if use("speed_link"):
                for (l, j, f), zc in z.items():
                    r = {w[l, j, f, k]: 1.0 for k in ks}
                    r[zc] = -1.0
                    mdl.add("speed_link", r, 0.0, 0.0)
                for l in range(L):
                    for j in range(J):
                        for k in ks:
                            r = {w[l, j, f, k]: 1.0 for f in range(F) if (l, j, f) in z}
                            r[t[0, k]] = -1.0
                            mdl.add("speed_link", r, 0.0, 0.0)
            # a token reads k kept experts of every layer, all of the stacked format's size
            row.update({c: float(k * p.exp_bytes[l, j, f]) for (l, j, f, k), c in w.items()})
        else:
            cap, capk = {}, {}
            for l, lay in enumerate(p.layers):
                bmax = float(p.exp_bytes[l].max(axis=1).sum())
                cap[l] = mdl.var("cap", (l,), ub=bmax, integer=False)
                for k in lay.topk_options:
                    capk[l, k] = mdl.var("capk", (l, k), ub=bmax, integer=False)
                # speed_cap: cap[l] >= bytes of every kept expert (pruned experts weigh 0)
                if use("speed_cap"):
                    for e in range(E):
                        r = {y[l, e, j, f]: float(p.exp_bytes[l, j, f]) for j in range(J) for f in range(F)
                             if (l, e, j, f) in y}
                        r[cap[l]] = -1.0
                        mdl.add("speed_cap", r, hi=0.0)
                # speed_split: cap[l] = sum_k capk[l,k] with capk[l,k] <= bmax t[l,k]: only the chosen
                # k carries the cap, so sum_k k capk[l,k] = k x cap[l] exactly
                if use("speed_split"):
                    r = {capk[l, k]: 1.0 for k in lay.topk_options}
                    r[cap[l]] = -1.0
                    mdl.add("speed_split", r, 0.0, 0.0)
                    for k in lay.topk_options:
                        mdl.add("speed_split", {capk[l, k]: 1.0, t[l, k]: -bmax}, hi=0.0)
            row.update({c: float(k) for (l, k), c in capk.items()})
        if use("speed"):
            mdl.add("speed", row, hi=float(p.speed.max_read - p.fixed_read))

    return Formulation(p, mdl, x, y, keep, t, m, z, dominator, drop)
