"""Lagrangian relaxation: a feasible plan and a proven lower bound, fast.

Price the memory row with lambda >= 0 and the speed row with mu >= 0:

    L(lambda, mu) = min  damage + lambda (bytes - W) + mu (read - R)

over plans that satisfy every OTHER constraint of the integer program. For any prices L is a lower
bound on the optimum (weak duality); it is concave and piecewise linear, and its maximum is found
by bisection on its supergradient (bytes - W, read - R). The relaxed problem separates exactly:

- a non-expert item picks min_f c[i,f] + lambda b[i,f] + mu r[i,f] (only its lower convex hull
  can win: multiple-choice knapsack);
- free target, per MoE layer: each expert tensor picks its best format at price lambda; an
  expert's net cost is delta_e = (its tensors) + (lambda + mu) rb - p_e; the layer keeps the m
  cheapest experts of every group and chooses (k, m), m >= m_lo(k), to minimize
  a[l,k] + sum over groups of the m smallest delta: exact after one sort per layer;
- free target with the speed row: the layer also chooses its cap C, a level of expert bytes
  (the largest kept expert may not exceed it); experts then pick their best format combination
  within C, and the layer pays mu k C;
- gguf: the kept count m (per group) and the global k are enumerated; per layer the stacked
  formats c (one per kind) are enumerated: keeping the m cheapest experts of each group under c
  is a price-independent table T[l,c,m], and the layer pays (lambda G m + mu k) bytes(c).

The relaxed solution at the smallest price that satisfies the budgets is a plan; a greedy fill
then spends the budget it leaves (upgrades with the largest damage reduction that fit). With the
speed row (free target) the relaxed plan just below the final prices, which overshoots the rows a
little, is repaired and filled as a second candidate. For gguf, every (kept count, top-k) pair whose
bound is still below the best plan gets a frontier over its layers (`_pair_frontier`): with the pair
fixed all layers move the two rows along one direction, so an exact (bytes, damage) frontier over
the layers, pruned by reduced costs, gives a near-exact bound and plan for the pair. The gap
reported is plan - (best proven bound), so it is proven.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import numpy as np

from moeplan.kernels.inventory import Target

from .problem import Assignment, Problem, lower_hull, pareto
from .solution import Solution, Status

INF = math.inf


@dataclass
class _Relaxed:
    """The minimizer of the relaxed problem at some prices: its damage and its use of the two rows."""

    damage: float
    bytes: int
    read: int  # as priced: for the free target with speed, k x the layer's cap
    a: Assignment
    lam: float = 0.0
    mu: float = 0.0

    def dual(self, W: float, R: float) -> float:
        value = self.damage + self.lam * (self.bytes - W)
        return value + self.mu * (self.read - R) if self.mu else value


# ---------------------------------------------------------------------------------------------
# non-expert items

class _Items:
    def __init__(self, p: Problem):
        self.c, self.b, self.r = p.item_damage, p.item_bytes, p.item_read
        self.idx = np.arange(len(p.items))

    def at(self, lam: float, mu: float):
        f = (self.c + lam * self.b + mu * self.r).argmin(axis=1) if len(self.idx) else np.zeros(0, dtype=np.int64)
        return f, float(self.c[self.idx, f].sum()), int(self.b[self.idx, f].sum()), int(self.r[self.idx, f].sum())


# ---------------------------------------------------------------------------------------------
# free target

class _FreeLayers:
    """Per-layer exact minimization for the free target (no speed row, or mu priced on router rows only)."""

    def __init__(self, p: Problem):
        self.p = p
        self.G = p.n_group if p.n_group > 1 else 1
        self.size = p.E // self.G if p.E else 0
        self.mlo = [(p.kept_per_group_options(int(k)) or [self.size + 1])[0] for k in p.topk_values]

    def at(self, lam: float, mu: float = 0.0):
        p = self.p
        cost = p.exp_damage + lam * p.exp_bytes[:, None, :, :]  # (L, E, J, F)
        f = cost.argmin(axis=-1)  # (L, E, J)
        delta = np.take_along_axis(cost, f[..., None], -1)[..., 0].sum(-1) - p.removal  # (L, E)
        keep, k, m = self._keep(delta, lam + mu)
        efmt = np.where(keep[..., None], f, -1)
        return self._totals(keep, efmt, k)

    def _keep(self, delta: np.ndarray, router_price: float):
        """Best (k, m) per layer and the kept experts: the m smallest delta of every group."""
        p, G, size = self.p, self.G, self.size
        L = p.L
        d = delta.reshape(L, G, size)
        order = np.argsort(d, axis=-1, kind="stable")
        C = np.zeros((L, size + 1))
        C[:, 1:] = np.cumsum(np.take_along_axis(d, order, -1), axis=-1).sum(axis=1)
        C += router_price * (p.router_bytes * G)[:, None] * np.arange(size + 1)[None, :]
        best = np.full((L, len(p.topk_values)), INF)
        marg = np.zeros((L, len(p.topk_values)), dtype=np.int64)
        for ki, lo in enumerate(self.mlo):
            if lo > size:
                continue
            a = C[:, lo:].argmin(axis=1)
            marg[:, ki] = lo + a
            best[:, ki] = p.topk_cost[:, ki] + C[np.arange(L), lo + a]
        ki = best.argmin(axis=1)
        m = marg[np.arange(L), ki]
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(size), order.shape), -1)
        keep = (rank < m[:, None, None]).reshape(L, G * size)
        return keep, p.topk_values[ki], m

    def _totals(self, keep, efmt, k, read_override=None):
        p = self.p
        li = np.arange(p.L)[:, None, None]
        ei = np.arange(p.E)[None, :, None]
        ji = np.arange(p.J)[None, None, :]
        f0 = np.where(keep[..., None], efmt, 0)
        dmg = float(np.where(keep[..., None], p.exp_damage[li, ei, ji, f0], 0.0).sum())
        dmg += float(p.removal[~keep].sum()) + float(p.topk_cost[np.arange(p.L), np.searchsorted(p.topk_values, k)].sum())
        eb = np.where(keep, p.exp_bytes[li, ji, f0].sum(-1), 0)  # (L, E)
        nk = keep.sum(1)
        nbytes = int(eb.sum() + (nk * p.router_bytes).sum())
        read = int((nk * p.router_bytes).sum() + (k * eb.max(axis=1)).sum()) if read_override is None else read_override
        return keep, efmt, k, dmg, nbytes, read


class _FreeSpeedLayers(_FreeLayers):
    """Free target with the speed row: each layer also picks a cap on its experts' bytes."""

    def __init__(self, p: Problem):
        super().__init__(p)
        L, J, F = p.L, p.J, p.F
        combos = np.array(list(itertools.product(range(F), repeat=J)), dtype=np.int64)  # (C, J)
        self.combos = combos
        Bc = p.exp_bytes[:, np.arange(J)[None, :], combos].sum(-1)  # (L, C)
        self.order = np.argsort(Bc, axis=1, kind="stable")  # combos by bytes, per layer
        self.Bs = np.take_along_axis(Bc, self.order, 1)  # (L, C) increasing
        # a cap level = the bytes of some combination; its prefix of combos is what fits under it
        levels, self.firstpos = [], []
        for l in range(L):
            u, idx = np.unique(self.Bs[l], return_index=True)
            levels.append(u)
            self.firstpos.append(idx)  # where each level's run of combinations starts
        Q = max(len(u) for u in levels)
        self.level = np.array([np.r_[u, np.full(Q - len(u), u[-1])] for u in levels])  # (L, Q)
        # damage of every combination for every expert, in the per-layer byte order: (L, E, C), as an
        # outer sum over the kinds (the combinations run with the last kind fastest)
        D = p.exp_damage[:, :, 0, :]
        for j in range(1, J):
            D = (D[..., :, None] + p.exp_damage[:, :, j, None, :]).reshape(L, p.E, -1)
        Ds = np.moveaxis(np.take_along_axis(D, self.order[:, None, :], 2), 2, 1)  # (L, C, E)
        # combinations of one level weigh the same at any price: only the least damaging one of each
        # level can win, for every expert (Dq, and its position in the byte order, Pq: (L, Q, E))
        self.Dq = np.empty((L, Q, p.E))
        self.Pq = np.empty((L, Q, p.E), dtype=np.int64)
        for l in range(L):
            first, n_l = self.firstpos[l], len(self.firstpos[l])
            runs = np.repeat(np.arange(n_l), np.diff(np.r_[first, len(self.Bs[l])]))  # level of each position
            self.Dq[l, :n_l] = np.minimum.reduceat(Ds[l], first, axis=0)
            hit = Ds[l] == self.Dq[l, runs]  # (C, E): the positions that reach their level's minimum
            pos = np.where(hit, np.arange(len(runs))[:, None], len(runs))
            self.Pq[l, :n_l] = np.minimum.reduceat(pos, first, axis=0)
            self.Dq[l, n_l:] = self.Dq[l, n_l - 1]
            self.Pq[l, n_l:] = self.Pq[l, n_l - 1]
        self.removal_total = float(p.removal.sum())
        self._lam = None

    def prepare(self, lam: float) -> None:
        """The price-lambda part: best combination of every expert under every cap, sorted per group."""
        p, G, size = self.p, self.G, self.size
        L, Q = self.level.shape
        # best priced combination of every expert within every cap: (L, Q, E)
        PMq = np.minimum.accumulate(self.Dq + lam * self.level[:, :, None], axis=1)
        delta = PMq - p.removal[:, None, :]
        d = delta.reshape(L, Q, G, size)
        d = np.sort(d, axis=-1)
        C0 = np.zeros(d.shape[:2] + (size + 1,))
        C0[..., 1:] = np.cumsum(d, axis=-1).sum(axis=2)  # (L, Q, size + 1)
        self._lam, self._C0 = lam, C0

    def choose(self, mu: float):
        """Best (q, k, m) per layer at the prepared lambda and this mu; read as priced (k x cap)."""
        p, G, size = self.p, self.G, self.size
        L, Q = self.level.shape
        lam = self._lam
        C = self._C0 + (lam + mu) * (p.router_bytes * G)[:, None, None] * np.arange(size + 1)[None, None, :]
        # C is convex in m (partial sums of sorted costs plus a linear term), so the best m >= m_lo(k)
        # is max(unconstrained argmin, m_lo(k))
        m_free = C.argmin(axis=2)  # (L, Q)
        best = np.full((L, Q, len(p.topk_values)), INF)
        marg = np.zeros((L, Q, len(p.topk_values)), dtype=np.int64)
        for ki, lo in enumerate(self.mlo):
            if lo > size:
                continue
            mk = np.maximum(m_free, lo)
            marg[:, :, ki] = mk
            best[:, :, ki] = p.topk_cost[:, ki][:, None] + np.take_along_axis(C, mk[..., None], 2)[..., 0] \
                + mu * p.topk_values[ki] * self.level
        flat = best.reshape(L, -1).argmin(axis=1)
        q, ki = np.unravel_index(flat, (Q, len(p.topk_values)))
        m = marg[np.arange(L), q, ki]
        k = p.topk_values[ki]
        read = int((k * self.level[np.arange(L), q]).sum() + (G * m * p.router_bytes).sum())
        # the layers' part of the Lagrangian: every expert's removal cost plus the best choice's net cost
        value = float(best.reshape(L, -1)[np.arange(L), flat].sum() + self.removal_total)
        return q, k, m, read, value

    def at(self, lam: float, mu: float = 0.0):
        if self._lam != lam:
            self.prepare(lam)
        q, k, m, _, _ = self.choose(mu)
        return self.solution(q, k, m)

    def solution(self, q, k, m):
        """The experts' formats under each layer's cap and the kept experts."""
        p, G, size = self.p, self.G, self.size
        L, E = p.L, p.E
        fmt = np.zeros((L, E, p.J), dtype=np.int64)
        delta = np.zeros((L, E))
        for l in range(L):
            V = self.Dq[l, :q[l] + 1] + self._lam * self.level[l, :q[l] + 1, None]  # (levels under the cap, E)
            best = V.argmin(axis=0)  # (E,) level
            fmt[l] = self.combos[self.order[l, self.Pq[l, best, np.arange(E)]]]
            delta[l] = V[best, np.arange(E)] - p.removal[l]
        d = delta.reshape(L, G, size)
        order = np.argsort(d, axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(size), order.shape), -1)
        keep = (rank < m[:, None, None]).reshape(L, E)
        efmt = np.where(keep[..., None], fmt, -1)
        read = int((k * self.level[np.arange(L), q]).sum() + (keep.sum(1) * p.router_bytes).sum())
        return self._totals(keep, efmt, k, read_override=read)


# ---------------------------------------------------------------------------------------------
# gguf target

class _GGUFLayers:
    """gguf: a stacked-format combination per layer; m kept per group and k are global."""

    def __init__(self, p: Problem):
        self.p = p
        L, E, J, F = p.L, p.E, p.J, p.F
        G = self.G = p.n_group if p.n_group > 1 else 1
        size = self.size = E // G if E else 0
        # stacked formats dominated for every expert of the layer never win (exact)
        ok = np.stack([pareto(p.exp_bytes[l], p.exp_damage[l], across=0)[0] for l in range(L)])  # (L, J, F)
        combos = np.array(list(itertools.product(range(F), repeat=J)), dtype=np.int64)  # (C, J), last kind fastest
        valid = np.ones((L, len(combos)), dtype=bool)
        for j in range(J):
            valid &= ok[:, j, :][:, combos[:, j]]
        self.combos = combos
        self.Bint = p.exp_bytes[:, np.arange(J)[None, :], combos].sum(-1)  # (L, C) bytes of one expert
        # net cost of keeping each expert under each combination, delta = damage - removal: (L, E, C),
        # built as an outer sum over the kinds (the removal cost split evenly over them)
        ec = p.exp_damage - p.removal[:, :, None, None] / J  # (L, E, J, F)
        D = ec[:, :, 0, :]
        for j in range(1, J):
            D = (D[..., :, None] + ec[:, :, j, None, :]).reshape(L, E, -1)
        D = D.reshape(L, G, size, -1)
        # T[m, l, c]: damage of layer l keeping the m cheapest experts of every group under c (plus
        # every expert's removal cost): sort each group, then running sums over m
        D.sort(axis=2)
        for i in range(1, size):
            D[:, :, i] += D[:, :, i - 1]
        T = np.zeros((size + 1, L, len(combos)))
        T[1:] = np.moveaxis(D.sum(axis=1), 1, 0)
        T += p.removal.sum(1)[None, :, None]
        self.T = np.where(valid[None], T, INF)

    def at(self, lam: float, mu: float, m: int, k: int):
        p = self.p
        n = self.G * m
        Tm = self.T[m]
        c = (Tm + (lam * n + mu * k) * self.Bint).argmin(axis=1)  # (L,); T is +inf for dominated combos
        li = np.arange(p.L)
        eb = self.Bint[li, c]
        return c, float(Tm[li, c].sum()), int((n * (eb + p.router_bytes)).sum()), int((k * eb + n * p.router_bytes).sum())

    def assignment_part(self, c: np.ndarray, m: int, k: int):
        p, G, size = self.p, self.G, self.size
        L, E, J = p.L, p.E, p.J
        fmt = self.combos[c]  # (L, J)
        delta = p.exp_damage[np.arange(L)[:, None, None], np.arange(E)[None, :, None], np.arange(J)[None, None, :],
                             fmt[:, None, :]].sum(-1) - p.removal  # (L, E)
        order = np.argsort(delta.reshape(L, G, size), axis=-1, kind="stable")[:, :, :m]  # (L, G, m)
        keep = np.zeros((L, G, size), dtype=bool)
        np.put_along_axis(keep, order, True, axis=-1)
        keep = keep.reshape(L, E)
        efmt = np.where(keep[..., None], fmt[:, None, :], -1)
        return keep, efmt, np.full(L, k, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# moves: greedy fill (spend leftover budget) and repair (restore a violated budget)

def _moves(p: Problem, a: Assignment):
    """All single changes of a plan: (kind, index, new format, d damage, d bytes, d read)."""
    out = []
    n = len(p.items)
    if n:
        cur = a.item_fmt
        ii = np.arange(n)
        dd = p.item_damage - p.item_damage[ii, cur][:, None]
        db = p.item_bytes - p.item_bytes[ii, cur][:, None]
        dr = p.item_read - p.item_read[ii, cur][:, None]
        out.append(("item", dd, db, dr))
    if p.L == 0:
        return out
    L, E, J = p.L, p.E, p.J
    li = np.arange(L)[:, None, None]
    ji = np.arange(J)[None, None, :]
    f0 = np.where(a.keep[..., None], a.expert_fmt, 0)
    if p.target is Target.GGUF:
        kept = a.keep
        nk = kept.sum(1)  # (L,)
        e0 = np.argmax(kept, axis=1)
        cur = a.expert_fmt[np.arange(L), e0]  # (L, J)
        dmg = np.where(kept[..., None, None], p.exp_damage, 0.0).sum(1)  # (L, J, F)
        dd = dmg - np.take_along_axis(dmg, cur[..., None], 2)
        db1 = p.exp_bytes - np.take_along_axis(p.exp_bytes, cur[..., None], 2)  # (L, J, F)
        db = nk[:, None, None] * db1
        dr = a.topk[:, None, None] * db1
        out.append(("stacked", dd, db, dr))
        return out
    ei = np.arange(E)[None, :, None]
    curd = p.exp_damage[li, ei, ji, f0]  # (L, E, J)
    curb = p.exp_bytes[li, ji, f0]  # (L, E, J)
    dd = p.exp_damage - curd[..., None]
    db = p.exp_bytes[:, None, :, :] - curb[..., None]
    B = np.where(a.keep, curb.sum(-1), 0)  # (L, E) expert bytes
    srt = np.sort(B, axis=1)
    max1, max2 = srt[:, -1], srt[:, -2] if E > 1 else np.zeros(L, dtype=np.int64)
    others_max = np.where(B == max1[:, None], max2[:, None], max1[:, None])  # max of the other experts
    # only ties at the max need care: with two experts at max1, max2 == max1 already
    newB = B[..., None, None] + db
    newmax = np.maximum(others_max[..., None, None], newB)
    dr = a.topk[:, None, None, None] * (newmax - max1[:, None, None, None])
    dd = np.where(a.keep[..., None, None], dd, INF)
    out.append(("expert", dd, db, dr))
    return out


def _apply(a: Assignment, kind: str, idx: tuple) -> None:
    if kind == "item":
        i, f = idx
        a.item_fmt[i] = f
    elif kind == "stacked":
        l, j, f = idx
        a.expert_fmt[l, a.keep[l], j] = f
    else:
        l, e, j, f = idx
        a.expert_fmt[l, e, j] = f


def fill(p: Problem, a: Assignment, max_moves: int = 10_000) -> Assignment:
    """Spend the budget a plan leaves: repeatedly apply the single change that lowers damage the most
    among those that still fit the memory (and speed) budget."""
    a = a.copy()
    tot = p.evaluate(a)
    slack_b = p.budget.weights - tot.weight_bytes
    slack_r = (p.speed.max_read - tot.read_per_token) if p.speed is not None else INF
    for _ in range(max_moves):
        best = None
        for kind, dd, db, dr in _moves(p, a):
            ok = (dd < 0) & (db <= slack_b) & (dr <= slack_r)
            if not ok.any():
                continue
            score = np.where(ok, dd, INF)
            flat = int(score.argmin())
            if best is None or score.flat[flat] < best[0]:
                best = (score.flat[flat], kind, np.unravel_index(flat, score.shape), db.flat[flat], dr.flat[flat])
        if best is None:
            break
        _, kind, idx, db_, dr_ = best
        _apply(a, kind, tuple(int(i) for i in idx))
        slack_b -= int(db_)
        slack_r -= dr_
    return a


def swap(p: Problem, a: Assignment, max_rounds: int = 200, max_moves: int = 20_000) -> Assignment:
    """Pairs of changes where one pays for the other: an upgrade that does not fit alone together
    with the cheapest change (of another unit) that frees what it lacks, in memory and in reads.
    Applies the best improving pair until none is left, then fills. For plans with few, coarse
    units (the gguf target's stacked tensors), where the leftover of two budgets is too small for
    any single upgrade."""
    a = fill(p, a)
    for _ in range(max_rounds):
        tot = p.evaluate(a)
        slack_b = p.budget.weights - tot.weight_bytes
        slack_r = (p.speed.max_read - tot.read_per_token) if p.speed is not None else INF
        kinds, dd, db, dr, idx = [], [], [], [], []
        for kind, d_, b_, r_ in _moves(p, a):
            flat = np.isfinite(d_).ravel()
            kinds += [kind] * int(flat.sum())
            dd.append(d_.ravel()[flat])
            db.append(b_.ravel()[flat].astype(np.float64))
            dr.append(np.asarray(r_, dtype=np.float64).ravel()[flat])
            idx += [(kind, np.unravel_index(i, d_.shape)) for i in np.flatnonzero(flat)]
        dd, db, dr = np.concatenate(dd), np.concatenate(db), np.concatenate(dr)
        if len(dd) > max_moves:
            return a  # too many single changes for the quadratic search: the fill already ran
        unit = np.array([(k, tuple(int(x) for x in ix[:-1])) .__hash__() for k, ix in idx])
        up = np.flatnonzero(dd < 0)
        if not len(up):
            return a
        # pair (u, v): u's extra bytes/reads beyond the slack must be freed by v
        need_b = db[up][:, None] + db[None, :] <= slack_b
        need_r = dr[up][:, None] + dr[None, :] <= slack_r
        gain = np.where(need_b & need_r & (unit[up][:, None] != unit[None, :]), dd[up][:, None] + dd[None, :], INF)
        flat = int(gain.argmin())
        if not gain.flat[flat] < -1e-15:
            return a
        i, j = np.unravel_index(flat, gain.shape)
        for k in (up[i], j):
            kind, ix = idx[k]
            _apply(a, kind, tuple(int(x) for x in ix))
        a = fill(p, a)
    return a


def repair(p: Problem, a: Assignment, max_moves: int = 100_000) -> Assignment:
    """Restore the memory and speed budgets of a plan that exceeds them (a MIP solution within the
    solver's tolerance): repeatedly apply the change with the least damage per byte saved."""
    a = a.copy()
    for _ in range(max_moves):
        tot = p.evaluate(a)
        over_b = tot.weight_bytes - p.budget.weights
        over_r = (tot.read_per_token - p.speed.max_read) if p.speed is not None else -1
        if over_b <= 0 and over_r <= 0:
            return a
        best = None
        for kind, dd, db, dr in _moves(p, a):
            saved = -db if over_b > 0 else -dr
            ok = (saved > 0) & np.isfinite(dd)
            if over_b > 0:
                ok &= dr <= max(-over_r, 0) if over_r <= 0 else (dr <= 0)
            if not ok.any():
                continue
            score = np.where(ok, np.maximum(dd, 0) / np.maximum(saved, 1), INF)
            flat = int(score.argmin())
            if best is None or score.flat[flat] < best[0]:
                best = (score.flat[flat], kind, np.unravel_index(flat, score.shape))
        if best is None:
            raise RuntimeError("cannot repair the plan: no change saves bytes")
        _apply(a, best[1], tuple(int(i) for i in best[2]))
    raise RuntimeError("repair did not converge")


# ---------------------------------------------------------------------------------------------
# the price search

def _search(evaluate, cap: float, start: float, tol: float, max_iter: int = 80, step: float = 8.0,
            rtol_dual: float = 0.0, deadline: float = INF):
    """Maximize a concave piecewise-linear dual over one price >= 0 through the root of its
    supergradient use(price) - cap, a decreasing step function.

    `evaluate(price)` returns (bound, use, solution): a lower bound proven at that price, the priced
    row's use by the relaxed solution, and the solution. `start` is a first guess of the price.
    The root is bracketed by factors of `step` from `start`, then narrowed by regula falsi on log(price)
    with the Illinois rule (a bisection step whenever interpolation stalls) until the bracket is
    `tol` wide, or until the dual cannot exceed the best bound seen by more than `rtol_dual`
    (relative): the
    supporting lines at the two ends of the bracket (slopes use - cap) meet at the highest value
    a concave function through both ends can reach, or until time.perf_counter() passes `deadline`
    (the bracket is found first: its feasible end is the plan). Returns the best bound seen and the
    solution at the smallest price found whose use fits `cap` (a plan for that row)."""
    b0, u0, s0 = evaluate(0.0)
    if u0 <= cap:
        return b0, s0  # the row is slack: the unpriced optimum fits
    best = b0
    lo, ulo, bl_val = 0.0, u0, b0
    hi = start if start > 0 else 1e-12  # any positive first guess: the bracket grows by 8 per step
    bh, uh, sh = evaluate(hi)
    best = max(best, bh)
    if uh <= cap:  # bracket downwards
        for _ in range(int(80 / math.log2(step)) + 1):  # down to start / 2^80; the price no longer matters
            mid = hi / step
            bm, um, sm = evaluate(mid)
            best = max(best, bm)
            if um > cap:
                lo, ulo, bl_val = mid, um, bm
                break
            hi, uh, sh, bh = mid, um, sm, bm
        else:
            return best, sh
    else:  # bracket upwards
        while uh > cap:
            lo, ulo, bl_val = hi, uh, bh
            hi *= step
            if hi > 1e200:
                raise RuntimeError("no price makes the relaxed plan fit: the budget is infeasible")
            bh, uh, sh = evaluate(hi)
            best = max(best, bh)
    if lo == 0.0:
        lo = hi / step
        bl, ulo, _ = evaluate(lo)
        bl_val = bl
        best = max(best, bl)
        if ulo <= cap:
            return best, sh  # cannot happen for a monotone use; keep the feasible side
    glo, ghi = ulo - cap, uh - cap  # > 0, <= 0
    vlo, vhi = bl_val, bh  # the dual at both ends
    side = 0
    for _ in range(max_iter):
        if hi - lo <= tol * hi or ghi == 0 or time.perf_counter() > deadline:
            break
        if rtol_dual > 0 and _ceiling(lo, vlo, ulo - cap, hi, vhi, uh - cap) - best <= rtol_dual * abs(best):
            break
        a, b = math.log(lo), math.log(hi)
        t = glo / (glo - ghi) if glo != ghi else 0.5
        t = min(max(t, 0.02), 0.98)  # stay strictly inside the bracket
        mid = math.exp(a + t * (b - a))
        bm, um, sm = evaluate(mid)
        best = max(best, bm)
        if um > cap:
            lo, glo, ulo, vlo = mid, um - cap, um, bm
            if side == -1:
                ghi /= 2  # Illinois: the other end was kept twice
            side = -1
        else:
            hi, uh, sh, ghi, vhi = mid, um, sm, um - cap, bm
            if side == 1:
                glo /= 2
            side = 1
    return best, sh


def _ceiling(x0: float, v0: float, g0: float, x1: float, v1: float, g1: float) -> float:
    """Highest value of a concave function with value v0 and supergradient g0 > 0 at x0, v1 and
    g1 <= 0 at x1 > x0: where its two supporting lines meet."""
    if g0 <= g1:
        return max(v0, v1)
    y = (v1 - v0 + g0 * x0 - g1 * x1) / (g0 - g1)
    y = min(max(y, x0), x1)
    return v0 + g0 * (y - x0)


class _Cache:
    """Tables that depend on the problem's arrays but not on its budget, kept in a caller's dict."""

    def __init__(self, p: Problem, store: dict | None):
        self.store = {} if store is None else store
        self.key = (id(p.exp_damage), id(p.item_damage), p.target.value, p.speed is not None)

    def get(self, name: str, make):
        k = (self.key, name)
        if k not in self.store:
            self.store[k] = make()
        return self.store[k]

    def price(self, name: str, default: float) -> float:
        return self.store.get((self.key, "price", name), default)

    def set_price(self, name: str, value: float) -> None:
        if value > 0:
            self.store[(self.key, "price", name)] = value


def _price_scale(p: Problem, W: float) -> float:
    """A first price to try (nats per byte): damage between the smallest formats and the best ones,
    per byte of the budget."""
    n = len(p.items)
    dmin = float(p.item_damage.min(axis=1).sum()) + float(p.exp_damage.min(axis=-1).sum())
    dsmall = float(p.item_damage[np.arange(n), p.item_bytes.argmin(1)].sum()) if n else 0.0
    if p.L:
        small = p.exp_bytes.argmin(-1)  # (L, J)
        dsmall += float(np.take_along_axis(p.exp_damage, small[:, None, :, None], -1).sum())
    return max((dsmall - dmin) / max(W, 1.0), 1e-30)


def solve_lagrangian(p: Problem, rel_gap: float = 1e-6, time_limit: float = 60.0, cache: dict | None = None):
    """Feasible plan + proven lower bound (see the module docstring). `cache` keeps the
    budget-independent tables (and the last prices) between solves of one problem's arrays.
    `time_limit` (seconds) stops the price searches and the enumeration of gguf pairs where they
    are once it has passed (after a first plan): the plan stays feasible and the bound proven, only
    the gap is wider (log["time_limit_reached"])."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    W = float(p.budget.weights - p.fixed_bytes)
    R = float(p.speed.max_read - p.fixed_read) if p.speed is not None else INF
    items = _Items(p)
    solve = _solve_gguf if p.target is Target.GGUF else _solve_free
    bound, a, log = solve(p, items, W, R, _Cache(p, cache), deadline)
    log["relaxed_objective"] = p.objective(a)
    a = fill(p, a)
    obj = p.objective(a)
    bound = min(bound, obj)
    gap = (obj - bound) / obj if obj else 0.0
    status = Status.OPTIMAL if gap <= rel_gap else Status.FEASIBLE
    if time.perf_counter() > deadline:
        log["time_limit_reached"] = True
    return Solution("lagrangian", status, obj, bound, time.perf_counter() - t0, a, time_limit=time_limit, log=log)


# Relative width at which a price search stops. The bound lost by stopping is second order in the
# width (the supergradient vanishes at the optimum), and the fill spends the slack it leaves.
TOL_PRICE = 1e-7
# A gguf pair's price search also stops once the dual provably cannot rise by more than this
# fraction (its plan comes from the layer frontier, which needs good prices, not exact ones).
DUAL_TOL = 1e-7


def _two_prices(relaxed, dual_read, W: float, R: float, start: tuple[float, float], rtol_dual: float = 0.0,
                deadline: float = INF):
    """max over (lambda, mu) of the dual, mu searched for every lambda (warm-started from the last).

    relaxed(lam, mu) -> _Relaxed (the full relaxed solution); dual_read(lam, mu) -> (L(lam, mu), the
    relaxed solution's read) (cheap). Every bound is L at prices that were evaluated. With
    `rtol_dual` the searches also stop once the dual cannot rise by more than that fraction (a
    bound found faster, from prices less precise: for callers that do not take the plan from them).
    Returns (bound, solution feasible in both rows)."""
    if not math.isfinite(R):
        def ev(lam):
            s = relaxed(lam, 0.0)
            return s.dual(W, R), s.bytes, s

        return _search(ev, W, start[0], TOL_PRICE, rtol_dual=rtol_dual, deadline=deadline)

    last = {"mu": start[1]}

    def inner(lam):
        def ev_mu(mu):
            return (*dual_read(lam, mu), mu)

        # warm start: the best mu moves little between neighbouring lambdas
        bound, mu_hi = _search(ev_mu, R, last["mu"] or start[0], TOL_PRICE, step=2.0 if last["mu"] else 8.0,
                               rtol_dual=rtol_dual, deadline=deadline)
        if mu_hi > 0:
            last["mu"] = mu_hi
        s = relaxed(lam, mu_hi)
        return max(bound, s.dual(W, R)), s.bytes, s

    return _search(inner, W, start[0], TOL_PRICE * 100, step=2.0, rtol_dual=rtol_dual, deadline=deadline)


# Relative price step below the search's final prices at which the free target's second plan is taken.
OVERSHOOT = 1e-5


def _solve_free(p: Problem, items: _Items, W: float, R: float, cache: _Cache, deadline: float = INF):
    log: dict = {"evaluations": 0}
    scale = cache.price("lambda", _price_scale(p, W))

    def relaxed_with(layers):
        def relaxed(lam, mu):
            log["evaluations"] += 1
            f, d_i, b_i, r_i = items.at(lam, mu)
            if layers is None:
                z = np.zeros((0, 0), dtype=bool)
                return _Relaxed(d_i, b_i, r_i, Assignment(f, z, np.zeros((0, 0, 0), np.int64), np.zeros(0, np.int64)),
                                lam, mu)
            keep, efmt, k, d_l, b_l, r_l = layers.at(lam, mu)
            return _Relaxed(d_i + d_l, b_i + b_l, r_i + r_l, Assignment(f, keep, efmt, np.asarray(k, np.int64)), lam, mu)
        return relaxed

    # the memory row alone first: its bound holds with the speed row too, and its plan may meet it
    free_layers = cache.get("free_layers", lambda: _FreeLayers(p)) if p.L else None
    bound, s = _two_prices(relaxed_with(free_layers), None, W, INF, (scale, 0.0), deadline=deadline)
    log["lambda"] = s.lam
    cache.set_price("lambda", s.lam)
    if p.speed is None or p.read_per_token(s.a) <= p.speed.max_read:
        return bound, s.a, log
    log["speed_row"] = "active"
    layers = cache.get("free_speed_layers", lambda: _FreeSpeedLayers(p))

    def dual_read(lam, mu):
        log["evaluations"] += 1
        if layers._lam != lam:
            layers.prepare(lam)
        _, d_i, b_i, r_i = items.at(lam, mu)
        *_, read, value = layers.choose(mu)
        return d_i + lam * (b_i - W) + mu * (r_i - R) + value, r_i + read

    relaxed = relaxed_with(layers)
    bound, s = _two_prices(relaxed, dual_read, W, R, (s.lam, s.lam), deadline=deadline)
    log["lambda"], log["mu"] = s.lam, s.mu
    # The plan at the prices found leaves slack in both rows; the relaxed plan just below them (the
    # other side of the breakpoint) overshoots them a little. Both become plans (fill; repair, then
    # fill) and the better one is kept.
    best = fill(p, s.a)
    best_obj = p.objective(best)
    over = relaxed(s.lam * (1 - OVERSHOOT), s.mu * (1 - OVERSHOOT)).a
    try:
        a = fill(p, repair(p, over))
    except RuntimeError:
        a = None
    if a is not None and not p.check(a) and p.objective(a) < best_obj:
        best, log["plan_from"] = a, "repaired overshoot"
    return bound, best, log


def _solve_gguf(p: Problem, items: _Items, W: float, R: float, cache: _Cache, deadline: float = INF):
    """Enumerate the global kept count m (per group) and top-k k (see _enumerate). The memory row is
    solved first; with a speed row that its plan does not meet, the search is repeated with both
    rows, starting from the memory-only optimum's pair and prices, with the memory-only bounds."""
    if not p.L:
        return _solve_free(p, items, W, R, cache, deadline)
    layers = cache.get("gguf_layers", lambda: _GGUFLayers(p))
    log: dict = {"evaluations": 0, "pairs_searched": 0}
    ks = p.global_topk_options()
    A = {k: float(p.topk_cost[:, p.topk_index(k)].sum()) for k in ks}
    pairs = [(m, k) for k in ks for m in p.kept_per_group_options(k)]
    if not pairs:
        raise RuntimeError("no (kept count, top-k) pair is allowed")
    # without the speed row k only adds A[k]: each m takes its cheapest allowed k
    best_k: dict[int, int] = {}
    for m, k in pairs:
        if m not in best_k or A[k] < A[best_k[m]]:
            best_k[m] = k
    scale = cache.price("lambda", _price_scale(p, W))
    mem_pairs = sorted(best_k.items())
    first = cache.store.get((cache.key, "pair"), mem_pairs[len(mem_pairs) // 2])
    if first not in mem_pairs:
        first = mem_pairs[len(mem_pairs) // 2]
    p_mem = p.replace(speed=None) if p.speed is not None else p
    bound, a, pair, prices, mem_bounds = _enumerate(p_mem, items, layers, A, mem_pairs, W, INF, first,
                                                    (scale, 0.0), {}, log, deadline)
    cache.set_price("lambda", prices[0])
    cache.store[(cache.key, "pair")] = pair
    if p.speed is None or p.read_per_token(a) <= p.speed.max_read:
        return bound, a, log
    log["speed_row"] = "active"
    # memory-only bounds hold with the speed row too: (m, k) costs what (m, best k) costs, moved by A
    start = {(m, k): mem_bounds[m, best_k[m]] - A[best_k[m]] + A[k] for m, k in pairs}
    bound, a, pair, prices, _ = _enumerate(p, items, layers, A, pairs, W, R, pair, (prices[0], prices[0]), start, log,
                                           deadline)
    return bound, a, log


def _enumerate(p: Problem, items: _Items, layers: _GGUFLayers, A: dict, pairs: list, W: float, R: float,
               first: tuple, prices: tuple, start_bounds: dict, log: dict, deadline: float = INF):
    """Branch and bound over (m, k) pairs. The open pair with the lowest bound is first tightened
    cheaply (one evaluation at the best plan's prices; with the speed row, a search over mu alone),
    and only if it still could beat the best plan gets a full price search and a plan. Any prices
    give a valid bound, so every pair's bound is the best of what was computed for it. Stops when no
    pair's bound is below the best plan, or once time.perf_counter() passes `deadline` with a plan
    found (the pairs not searched then keep the bounds they have). Returns (bound, plan, pair, prices,
    bounds)."""
    speed = math.isfinite(R)

    def relaxed_for(m, k):
        def relaxed(lam, mu):
            log["evaluations"] += 1
            f, d_i, b_i, r_i = items.at(lam, mu)
            c, d_l, b_l, r_l = layers.at(lam, mu, m, k)
            return _Relaxed(d_i + d_l + A[k], b_i + b_l, r_i + r_l, (f, c), lam, mu)

        def dual_read(lam, mu):
            log["evaluations"] += 1
            _, d_i, b_i, r_i = items.at(lam, mu)
            _, d_l, b_l, r_l = layers.at(lam, mu, m, k)
            return d_i + d_l + A[k] + lam * (b_i + b_l - W) + mu * (r_i + r_l - R), r_i + r_l

        return relaxed, dual_read

    def tighten(pair) -> float:
        relaxed, dual_read = relaxed_for(*pair)
        lam = best_prices[0]
        if not speed:
            return relaxed(*best_prices).dual(W, R)
        value, _ = _search(lambda u: (*dual_read(lam, u), u), R, best_prices[1] or lam, 1e-4, rtol_dual=DUAL_TOL,
                           deadline=deadline)
        return value

    bounds: dict = {pr: start_bounds.get(pr, -INF) for pr in pairs}
    pair_prices: dict = {}
    searched: set = set()
    tightened: set = set()
    best_obj, best_a, best_pair, best_prices = INF, None, first, prices
    pair = first
    while pair is not None:
        relaxed, dual_read = relaxed_for(*pair)
        searched.add(pair)
        try:
            b, s = _two_prices(relaxed, dual_read if speed else None, W, R, best_prices, DUAL_TOL, deadline)
        except RuntimeError:
            bounds[pair] = INF  # the pair cannot meet the rows
        else:
            log["pairs_searched"] += 1
            bounds[pair] = max(b, bounds[pair])
            pair_prices[pair] = (s.lam, s.mu if speed else 0.0)
            f, c = s.a
            a = Assignment(f, *layers.assignment_part(c, *pair))
            if not p.check(a):
                a = fill(p, a)
                obj = p.objective(a)
                if obj < best_obj:
                    best_obj, best_a, best_pair = obj, a, pair
                    best_prices = (s.lam, s.mu if speed else 0.0)
        pair = None
        while True:
            open_pairs = [pr for pr in pairs if pr not in searched and bounds[pr] < best_obj]
            if not open_pairs or (best_a is not None and time.perf_counter() > deadline):
                break
            cand = min(open_pairs, key=bounds.get)
            if cand in tightened:
                pair = cand
                break
            tightened.add(cand)
            try:
                bounds[cand] = max(bounds[cand], tighten(cand))
            except RuntimeError:
                bounds[cand] = INF
    if best_a is None:
        raise RuntimeError("no (kept count, top-k) pair has a plan within the budgets")
    # the pairs that could still beat the best plan: the layer frontier (near exact for a pair)
    framed: set = set()
    while True:
        open_pairs = [pr for pr in pair_prices if pr not in framed and bounds[pr] < best_obj * (1 - FRONTIER_GAP)]
        if not open_pairs or time.perf_counter() > deadline:
            break
        pr = min(open_pairs, key=bounds.get)
        framed.add(pr)
        fb, plans = _pair_frontier(p, layers, *pr, A[pr[1]], *pair_prices[pr], W, R, best_obj)
        log["frontiers"] = log.get("frontiers", 0) + 1
        if fb is not None:
            bounds[pr] = max(bounds[pr], fb)
        for _, a in plans:
            a = fill(p, a)
            obj = p.objective(a)
            if obj < best_obj:
                best_obj, best_a, best_pair, best_prices = obj, a, pr, pair_prices[pr]
    if speed:
        best_a = swap(p, best_a)  # two binding rows: a single upgrade rarely fits what is left
    log.update(kept_per_group=best_pair[0], top_k=best_pair[1], **{"lambda": best_prices[0], "mu": best_prices[1]})
    return min(bounds.values()), best_a, best_pair, best_prices, bounds


# ---------------------------------------------------------------------------------------------
# gguf: one (kept count, top-k) pair solved almost exactly by a frontier over the layers

FRONTIER_GAP = 1e-7  # pairs whose Lagrangian bound is this close to the best plan are left as they are
MAX_BIG_COMBOS = 64  # combinations of the large items' formats enumerated next to the layer frontier


def _pair_frontier(p: Problem, layers: _GGUFLayers, m: int, k: int, A_k: float, lam: float, mu: float,
                   W: float, R: float, upper: float, max_states: int = 200_000):
    """A lower bound on the best plan of pair (m, k) that is much tighter than the Lagrangian's, and
    plans found on the way.

    With m and k fixed, a layer in stacked combination c adds n x (its expert bytes) to the memory
    row and k x (the same bytes) to the read row (n = kept experts): every layer moves both rows
    along one direction, so the layers' sum E of expert bytes is the one quantity they share. The
    exact frontier (E, least layer damage) is built layer by layer. Reduced costs at the prices
    (lambda, mu) prune it: any plan has objective >= L(lambda, mu) + sum of its units' reduced
    costs (the slack terms are >= 0), so a plan using choices whose reduced costs add up to more than
    D = upper - L cannot beat `upper` and is left out. The items whose read differs from their bytes
    (the embedding) and the largest other items are enumerated; the rest (read = bytes) are relaxed
    to the convex hull of their (bytes, damage) points, which they fill up to
    min(memory left, read left): a relaxation, so the bound stays proven.

    Returns (bound, [(value, assignment)]) with bound <= every plan of the pair (or None when the
    prices prove nothing), and up to a few plans (feasible, before any fill)."""
    n = layers.G * m
    Tm = layers.T[m]
    P = lam * n + mu * k
    Vl = Tm + P * layers.Bint  # (L, C)
    vmin_l = Vl.min(axis=1)
    rl = Vl - vmin_l[:, None]
    Vi = p.item_damage + lam * p.item_bytes + mu * p.item_read
    vmin_i = Vi.min(axis=1) if len(p.items) else np.zeros(0)
    ri = Vi - vmin_i[:, None]
    rb = float((n * p.router_bytes).sum())
    R_ = R if math.isfinite(R) else INF
    lb = float(vmin_l.sum() + vmin_i.sum() + A_k + lam * (rb - W) + (mu * (rb - R_) if mu else 0.0))
    D = upper - lb
    if not D > 0:
        return None, []
    # ---- the large items: read != bytes (must be), then by the spread of their candidate bytes ----
    n_items = len(p.items)
    core_i = ri <= D
    spread = np.where(core_i, p.item_bytes, -1).max(1) - np.where(core_i, p.item_bytes, np.iinfo(np.int64).max).min(1)
    forced = [i for i in range(n_items) if (p.item_read[i] != p.item_bytes[i]).any()]
    big, combos = [], 1
    for i in forced + [int(i) for i in np.argsort(-spread, kind="stable") if int(i) not in forced]:
        cnt = int(core_i[i].sum())
        if combos * cnt > MAX_BIG_COMBOS:
            continue
        if i not in forced and spread[i] <= 0:
            break
        big.append(i)
        combos *= cnt
    small = np.setdiff1d(np.arange(n_items), big)
    # ---- the small items: convex hull of (weight, damage), weight = min(bytes, read) (a relaxation
    # when read != bytes); only candidates with reduced cost <= D ----
    base_w, base_c = 0.0, 0.0
    seg_w, seg_c, seg_item, seg_to = [], [], [], []
    w_all = np.minimum(p.item_bytes, p.item_read)
    for i in small.tolist():
        opts = np.flatnonzero(core_i[i])
        hull = [int(opts[h]) for h in lower_hull(w_all[i, opts].tolist(), p.item_damage[i, opts].tolist())]
        base_w += float(w_all[i, hull[0]])
        base_c += float(p.item_damage[i, hull[0]])
        for a_, b_ in zip(hull, hull[1:]):
            seg_w.append(float(w_all[i, b_] - w_all[i, a_]))
            seg_c.append(float(p.item_damage[i, b_] - p.item_damage[i, a_]))
            seg_item.append(i)
            seg_to.append(b_)
    seg_w, seg_c = np.array(seg_w), np.array(seg_c)
    order = np.argsort(seg_c / np.maximum(seg_w, 1e-300), kind="stable")
    seg_w, seg_c = seg_w[order], seg_c[order]
    seg_item, seg_to = np.array(seg_item, dtype=np.int64)[order], np.array(seg_to, dtype=np.int64)[order]
    cum_w = np.r_[0.0, np.cumsum(seg_w)]
    cum_c = np.r_[0.0, np.cumsum(seg_c)]

    def small_value(cap):
        """Least damage of the small items' hull within `cap` bytes (inf below their smallest)."""
        room = np.asarray(cap, dtype=np.float64) - base_w
        j = np.clip(np.searchsorted(cum_w, room, side="right") - 1, 0, len(seg_w))  # whole segments taken
        val = base_c + cum_c[j]
        if len(seg_w):
            jj = np.minimum(j, len(seg_w) - 1)
            part = np.where(j < len(seg_w), np.clip((room - cum_w[j]) / seg_w[jj], 0.0, 1.0), 0.0)
            val = val + part * seg_c[jj]
        return np.where(room >= 0, val, INF)

    # ---- the layer frontier: (E, damage) Pareto-minimal, reduced cost <= D ----
    E = np.zeros(1, dtype=np.int64)
    dmg = np.zeros(1)
    rcs = np.zeros(1)
    back = []
    for l in range(p.L):
        opts = np.flatnonzero(rl[l] <= D)
        ne = (E[:, None] + layers.Bint[l, opts][None, :]).ravel()
        nd = (dmg[:, None] + Tm[l, opts][None, :]).ravel()
        nr = (rcs[:, None] + rl[l, opts][None, :]).ravel()
        ok = nr <= D
        idx = np.flatnonzero(ok)
        ne, nd, nr = ne[ok], nd[ok], nr[ok]
        o = np.lexsort((nd, ne))
        ne, nd, nr, idx = ne[o], nd[o], nr[o], idx[o]
        keep = nd < np.minimum.accumulate(np.r_[INF, nd[:-1]])  # strictly better than every smaller E
        if not keep.any():
            return upper, []  # nothing within reach of `upper`
        ne, nd, nr, idx = ne[keep], nd[keep], nr[keep], idx[keep]
        if len(ne) > max_states:
            return None, []  # too wide a frontier: leave the Lagrangian bound as it is
        back.append((idx // len(opts), opts[idx % len(opts)]))
        E, dmg, rcs = ne, nd, nr
    # ---- every state with every large-item combination ----
    big_opts = [np.flatnonzero(core_i[i]) for i in big]
    best = INF
    cands = []
    for combo in itertools.product(*big_opts) if big else [()]:
        cb = float(sum(p.item_damage[i, f] for i, f in zip(big, combo)))
        bb = float(sum(p.item_bytes[i, f] for i, f in zip(big, combo)))
        br = float(sum(p.item_read[i, f] for i, f in zip(big, combo)))
        rc_big = float(sum(ri[i, f] for i, f in zip(big, combo)))
        if rc_big > D:
            continue
        cap = np.minimum(W - rb - bb - n * E, R_ - rb - br - k * E)
        val = np.where(rcs + rc_big <= D, dmg + A_k + cb + small_value(cap), INF)
        j = int(val.argmin())
        best = min(best, float(val[j]))
        for j in np.argsort(val, kind="stable")[:3]:
            if math.isfinite(val[j]):
                cands.append((float(val[j]), int(j), combo, float(cap[j])))
    bound = min(best, upper)
    # ---- plans: the best few candidates, small items rounded down on the hull ----
    plans = []
    for _, j, combo, cap in sorted(cands, key=lambda x: x[0])[:4]:
        c = np.zeros(p.L, dtype=np.int64)
        s = j
        for l in range(p.L - 1, -1, -1):
            parent, opt = back[l]
            c[l] = opt[s]
            s = int(parent[s])
        item_fmt = np.array([int(np.flatnonzero(core_i[i])[0]) if len(np.flatnonzero(core_i[i])) else 0
                             for i in range(n_items)], dtype=np.int64)
        for i in small.tolist():
            opts = np.flatnonzero(core_i[i])
            hull = [int(opts[h]) for h in lower_hull(w_all[i, opts].tolist(), p.item_damage[i, opts].tolist())]
            item_fmt[i] = hull[0]
        taken = int(np.searchsorted(cum_w, cap - base_w, side="right") - 1)
        for s_ in range(max(taken, 0)):
            item_fmt[seg_item[s_]] = seg_to[s_]
        for i, f in zip(big, combo):
            item_fmt[i] = f
        a = Assignment(item_fmt, *layers.assignment_part(c, m, k))
        if not p.check(a):
            plans.append((p.objective(a), a))
    return bound, plans
