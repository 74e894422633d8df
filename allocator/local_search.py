"""Moves on a plan: the greedy fill (spend the budget left), swaps (trade one upgrade for another
when two rows bind) and the repair (restore a violated budget)."""

from __future__ import annotations

import math

import numpy as np

from moeplan.kernels.inventory import Target

from .problem import Assignment, Problem


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
    dd = np.where(a.keep[..., None, None], dd, math.inf)
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
    slack_r = (p.speed.max_read - tot.read_per_token) if p.speed is not None else math.inf
    for _ in range(max_moves):
        best = None
        for kind, dd, db, dr in _moves(p, a):
            ok = (dd < 0) & (db <= slack_b) & (dr <= slack_r)
            if not ok.any():
                continue
            score = np.where(ok, dd, math.inf)
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
        slack_r = (p.speed.max_read - tot.read_per_token) if p.speed is not None else math.inf
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
        gain = np.where(need_b & need_r & (unit[up][:, None] != unit[None, :]), dd[up][:, None] + dd[None, :], math.inf)
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
            score = np.where(ok, np.maximum(dd, 0) / np.maximum(saved, 1), math.inf)
            flat = int(score.argmin())
            if best is None or score.flat[flat] < best[0]:
                best = (score.flat[flat], kind, np.unravel_index(flat, score.shape))
        if best is None:
            raise RuntimeError("cannot repair the plan: no change saves bytes")
        _apply(a, best[1], tuple(int(i) for i in best[2]))
    raise RuntimeError("repair did not converge")
