"""Maximizing the Lagrangian dual over its prices: one price by bracketing and regula falsi on its
supergradient, two prices by a search over mu inside a search over lambda."""

from __future__ import annotations

import math
import time


# ---------------------------------------------------------------------------------------------
# the price search

def search(evaluate, cap: float, start: float, tol: float, max_iter: int = 80, step: float = 8.0,
            rtol_dual: float = 0.0, deadline: float = math.inf):
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


# Relative width at which a price search stops. The bound lost by stopping is second order in the
# width (the supergradient vanishes at the optimum), and the fill spends the slack it leaves.
TOL_PRICE = 1e-7
# A gguf pair's price search also stops once the dual provably cannot rise by more than this
# fraction (its plan comes from the layer frontier, which needs good prices, not exact ones).
DUAL_TOL = 1e-7


def two_prices(relaxed, dual_read, W: float, R: float, start: tuple[float, float], rtol_dual: float = 0.0,
                deadline: float = math.inf):
    """max over (lambda, mu) of the dual, mu searched for every lambda (warm-started from the last).

    relaxed(lam, mu) -> Relaxed (the full relaxed solution); dual_read(lam, mu) -> (L(lam, mu), the
    relaxed solution's read) (cheap). Every bound is L at prices that were evaluated. With
    `rtol_dual` the searches also stop once the dual cannot rise by more than that fraction (a
    bound found faster, from prices less precise: for callers that do not take the plan from them).
    Returns (bound, solution feasible in both rows)."""
    if not math.isfinite(R):
        def ev(lam):
            s = relaxed(lam, 0.0)
            return s.dual(W, R), s.bytes, s

        return search(ev, W, start[0], TOL_PRICE, rtol_dual=rtol_dual, deadline=deadline)

    last = {"mu": start[1]}

    def inner(lam):
        def ev_mu(mu):
            return (*dual_read(lam, mu), mu)

        # warm start: the best mu moves little between neighbouring lambdas
        bound, mu_hi = search(ev_mu, R, last["mu"] or start[0], TOL_PRICE, step=2.0 if last["mu"] else 8.0,
                               rtol_dual=rtol_dual, deadline=deadline)
        if mu_hi > 0:
            last["mu"] = mu_hi
        s = relaxed(lam, mu_hi)
        return max(bound, s.dual(W, R)), s.bytes, s

    return search(inner, W, start[0], TOL_PRICE * 100, step=2.0, rtol_dual=rtol_dual, deadline=deadline)
