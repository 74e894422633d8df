"""The gguf target's relaxation: the kept count and top-k enumerated by branch and bound, stacked
formats per layer, and one pair solved almost exactly by a frontier over the layers
(see allocator/lagrangian.py)."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from .local_search import fill, swap
from .price_search import DUAL_TOL, search, two_prices
from .problem import Assignment, Problem, lower_hull, pareto
from .relax_free import solve_free
from .relaxation import INF, Cache, Items, Relaxed, price_scale

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



def solve_gguf(p: Problem, items: Items, W: float, R: float, cache: Cache, deadline: float = INF):
    """Enumerate the global kept count m (per group) and top-k k (see _enumerate). The memory row is
    solved first; with a speed row that its plan does not meet, the search is repeated with both
    rows, starting from the memory-only optimum's pair and prices, with the memory-only bounds."""
    if not p.L:
        return solve_free(p, items, W, R, cache, deadline)
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
    scale = cache.price("lambda", price_scale(p, W))
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


def _enumerate(p: Problem, items: Items, layers: _GGUFLayers, A: dict, pairs: list, W: float, R: float,
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
            return Relaxed(d_i + d_l + A[k], b_i + b_l, r_i + r_l, (f, c), lam, mu)

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
        value, _ = search(lambda u: (*dual_read(lam, u), u), R, best_prices[1] or lam, 1e-4, rtol_dual=DUAL_TOL,
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
            b, s = two_prices(relaxed, dual_read if speed else None, W, R, best_prices, DUAL_TOL, deadline)
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
