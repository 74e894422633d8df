"""What the Lagrangian's two relaxations (relax_free, relax_gguf) share: the relaxed solution at some
prices, the non-expert items' choice, the tables kept between solves and a first price."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .problem import Assignment, Problem

INF = math.inf


@dataclass
class Relaxed:
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

class Items:
    def __init__(self, p: Problem):
        self.c, self.b, self.r = p.item_damage, p.item_bytes, p.item_read
        self.idx = np.arange(len(p.items))

    def at(self, lam: float, mu: float):
        f = (self.c + lam * self.b + mu * self.r).argmin(axis=1) if len(self.idx) else np.zeros(0, dtype=np.int64)
        return f, float(self.c[self.idx, f].sum()), int(self.b[self.idx, f].sum()), int(self.r[self.idx, f].sum())




class Cache:
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


def price_scale(p: Problem, W: float) -> float:
    """A first price to try (nats per byte): damage between the smallest formats and the best ones,
    per byte of the budget."""
    n = len(p.items)
    dmin = float(p.item_damage.min(axis=1).sum()) + float(p.exp_damage.min(axis=-1).sum())
    dsmall = float(p.item_damage[np.arange(n), p.item_bytes.argmin(1)].sum()) if n else 0.0
    if p.L:
        small = p.exp_bytes.argmin(-1)  # (L, J)
        dsmall += float(np.take_along_axis(p.exp_damage, small[:, None, :, None], -1).sum())
    return max((dsmall - dmin) / max(W, 1.0), 1e-30)
