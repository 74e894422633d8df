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

Where each part is: relax_free (the free target's layers, with and without the speed row) and
relax_gguf (the (kept count, top-k) enumeration, the gguf layers and `_pair_frontier`), on what
relaxation holds for both; price_search (the dual's maximization over its prices); local_search
(fill, swap, repair). This module puts them together.
"""

from __future__ import annotations

import time

from moeplan.kernels.inventory import Target

from .local_search import fill
from .problem import Problem
from .relax_free import solve_free
from .relax_gguf import solve_gguf
from .relaxation import INF, Cache, Items
from .solution import Solution, Status


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
    items = Items(p)
    solve = solve_gguf if p.target is Target.GGUF else solve_free
    bound, a, log = solve(p, items, W, R, Cache(p, cache), deadline)
    log["relaxed_objective"] = p.objective(a)
    a = fill(p, a)
    obj = p.objective(a)
    bound = min(bound, obj)
    gap = (obj - bound) / obj if obj else 0.0
    status = Status.OPTIMAL if gap <= rel_gap else Status.FEASIBLE
    if time.perf_counter() > deadline:
        log["time_limit_reached"] = True
    return Solution("lagrangian", status, obj, bound, time.perf_counter() - t0, a, time_limit=time_limit, log=log)
