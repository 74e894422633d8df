"""The free target's relaxation: per MoE layer an exact minimization at given prices (with the speed
row: also the layer's cap on expert bytes), and the price search over it (see allocator/lagrangian.py)."""

from __future__ import annotations

import itertools

import numpy as np

from .local_search import fill, repair
from .price_search import two_prices
from .problem import Assignment, Problem
from .relaxation import INF, Cache, Items, Relaxed, price_scale

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



# Relative price step below the search's final prices at which the free target's second plan is taken.
OVERSHOOT = 1e-5


def solve_free(p: Problem, items: Items, W: float, R: float, cache: Cache, deadline: float = INF):
    log: dict = {"evaluations": 0}
    scale = cache.price("lambda", price_scale(p, W))

    def relaxed_with(layers):
        def relaxed(lam, mu):
            log["evaluations"] += 1
            f, d_i, b_i, r_i = items.at(lam, mu)
            if layers is None:
                z = np.zeros((0, 0), dtype=bool)
                return Relaxed(d_i, b_i, r_i, Assignment(f, z, np.zeros((0, 0, 0), np.int64), np.zeros(0, np.int64)),
                                lam, mu)
            keep, efmt, k, d_l, b_l, r_l = layers.at(lam, mu)
            return Relaxed(d_i + d_l, b_i + b_l, r_i + r_l, Assignment(f, keep, efmt, np.asarray(k, np.int64)), lam, mu)
        return relaxed

    # the memory row alone first: its bound holds with the speed row too, and its plan may meet it
    free_layers = cache.get("free_layers", lambda: _FreeLayers(p)) if p.L else None
    bound, s = two_prices(relaxed_with(free_layers), None, W, INF, (scale, 0.0), deadline=deadline)
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
    bound, s = two_prices(relaxed, dual_read, W, R, (s.lam, s.lam), deadline=deadline)
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
