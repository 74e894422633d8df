"""The result of a solve, whichever solver made it: status, objective, proven bound, gap, time, plan."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from .problem import Assignment, Totals


class Status(str, enum.Enum):
    OPTIMAL = "optimal"  # gap within the requested tolerance
    FEASIBLE = "feasible"  # a plan, with a gap above the tolerance (time limit)
    INFEASIBLE = "infeasible"
    NO_SOLUTION = "no_solution"  # stopped before finding any plan


@dataclass
class Solution:
    solver: str
    status: Status
    objective: float | None  # predicted damage of the plan, nats/token (exact, from Problem.evaluate)
    bound: float | None  # proven lower bound on the optimum
    wall_s: float
    assignment: Assignment | None = None
    totals: Totals | None = None
    time_limit: float | None = None
    threads: int | None = None
    hint_s: float = 0.0  # part of wall_s spent on the starting plan
    model_size: dict = field(default_factory=dict)
    log: dict = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """(objective - bound) / objective; 0 when both are 0."""
        if self.objective is None or self.bound is None:
            return None
        diff = max(self.objective - self.bound, 0.0)
        return diff / abs(self.objective) if self.objective else (0.0 if diff == 0 else math.inf)

    def report(self) -> dict:
        out = {"solver": self.solver, "status": self.status.value, "objective": self.objective,
               "bound": self.bound, "gap": self.gap, "wall_s": round(self.wall_s, 4), "hint_s": round(self.hint_s, 4),
               "time_limit_s": self.time_limit, "threads": self.threads}
        if self.model_size:
            out["model"] = {k: v for k, v in self.model_size.items() if k != "rows_by_family"}
        return out

    def summary(self) -> str:
        gap = "-" if self.gap is None else f"{self.gap:.2e}"
        obj = "-" if self.objective is None else f"{self.objective:.6g}"
        bnd = "-" if self.bound is None else f"{self.bound:.6g}"
        return f"{self.solver}: {self.status.value}, objective {obj}, bound {bnd}, gap {gap}, {self.wall_s:.2f} s"
