"""Quality vs size: solve one problem at many memory budgets, with the baselines on the same axes.

`sweep(factory, budgets)` solves the problem `factory(memory)` at every budget. A `ProblemFactory`
builds the problem's arrays once (bytes, damage and the Lagrangian's budget-independent tables
do not depend on the budget) and only swaps the budget; the Lagrangian keeps its precomputed
tables and starts each price search from the previous budget's price. Results go to a pandas
table (CSV) and a plot of predicted damage against size (PNG) with the seed paper's operating
point (103 GB of DeepSeek-V3's 1342 GB in BF16: 7.7% of the BF16 size) marked.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from moeplan.kernels.inventory import Inventory, Target
from moeplan.kernels.outputs import output_file
from moeplan.sensitivity.profile import Profile

from .baselines import LLAMA_DEFAULT, llama_mix, paper_baseline, uniform
from .plan import make_plan
from .problem import Budget, InfeasibleBudget, Problem, Speed, parse_size
from .solvers import solve

PAPER_RATIO = 103 / 1342  # the seed paper: 103 GB of DeepSeek-V3's 1342 GB (BF16)


@dataclass
class ProblemFactory:
    """memory -> Problem, building the arrays once."""

    inventory: Inventory
    profile: Profile
    target: Target | str = Target.FREE
    formats: Sequence[str] | str | None = None
    context: int = 4096
    reserve: int | str = 2_000_000_000
    speed: Speed | None = None
    _base: Problem | None = field(default=None, repr=False)

    def __call__(self, memory: int | str) -> Problem:
        budget = Budget.of(memory, self.inventory, self.context, self.reserve)
        if self._base is None:
            self._base = Problem.build(self.inventory, self.profile, budget, self.target, self.formats, self.speed)
            return self._base
        return self._base.replace(budget=budget)


def budgets_between(lo: int | str, hi: int | str, n: int) -> list[int]:
    """n memory sizes from lo to hi, evenly spaced."""
    a, b = parse_size(lo), parse_size(hi)
    if n < 1 or b < a:
        raise ValueError(f"need n >= 1 and lo <= hi, got n={n}, {a} .. {b}")
    if n == 1:
        return [a]
    return [int(round(a + (b - a) * i / (n - 1))) for i in range(n)]


def sweep(factory: Callable[[int], Problem], budgets: Iterable[int | str], solver: str = "lagrangian",
          time_limit: float = 60.0, threads: int = 2, baselines: bool = True, uniform_formats: Sequence[str] = (),
          progress: Callable[[str], None] | None = None, plans: dict | None = None):
    """One row per (budget, method): moeplan's plan and, with `baselines`, the paper's pipeline at every
    budget; llama.cpp's mixes and `uniform_formats` once (their size does not depend on the budget).
    Returns a pandas DataFrame. With `plans` (a dict), also fills it with row index -> Plan for every
    row that has a plan (what the measuring step, pareto.measure, evaluates)."""
    import pandas as pd

    say = progress or (lambda s: None)
    rows = []
    budgets = [parse_size(b) for b in budgets]
    cache: dict = {}
    t_all = time.perf_counter()
    for idx, mem in enumerate(budgets):
        p = factory(mem)
        synthetic = bool(p.profile.synthetic)
        base = {"memory_bytes": mem, "weight_budget_bytes": p.budget.weights, "synthetic_profile": synthetic,
                "target": p.target.value}
        try:
            sol = solve(p, solver, time_limit=time_limit, threads=threads, cache=cache)
        except InfeasibleBudget as exc:
            rows.append({**base, "method": "moeplan", "status": "infeasible", "min_memory_bytes": exc.min_memory})
            say(f"[{idx + 1}/{len(budgets)}] {mem / 1e9:.1f} GB: infeasible (needs {exc.min_memory / 1e9:.1f} GB)")
        else:
            rows.append({**base, **_row("moeplan", sol.status.value, sol.totals, sol.objective, sol.bound, sol.gap,
                                        sol.wall_s)})
            _keep_plan(plans, len(rows) - 1, p, sol.assignment, sol.report())
            say(f"[{idx + 1}/{len(budgets)}] {mem / 1e9:.1f} GB: {sol.summary()}")
        if baselines:
            t0 = time.perf_counter()
            b = paper_baseline(p, greedy_cache=cache)
            if b.feasible:
                rows.append({**base, **_row(b.name, "baseline", b.totals, b.objective, None, None,
                                            time.perf_counter() - t0)})
                _keep_plan(plans, len(rows) - 1, b.problem, b.assignment, {"solver": b.name, "status": "baseline",
                                                                          "wall_s": rows[-1]["wall_s"]})
            else:
                rows.append({**base, "method": b.name, "status": "infeasible"})
    if baselines and budgets:
        p = factory(budgets[-1])
        fixed = []
        for preset in LLAMA_DEFAULT:
            fixed.append(lambda preset=preset: llama_mix(p, preset))
        for f in uniform_formats:
            fixed.append(lambda f=f: uniform(p, f))
        for make in fixed:
            try:
                b = make()
            except ValueError as exc:
                say(f"baseline skipped: {exc}")
                continue
            rows.append({"memory_bytes": None, "weight_budget_bytes": None, "synthetic_profile": bool(p.profile.synthetic),
                         "target": p.target.value, **_row(b.name, "baseline", b.totals, b.objective, None, None, 0.0)})
            # a fixed mix does not depend on the budget: its plan records the memory it needs itself
            q = b.problem
            own = q.replace(budget=dataclasses.replace(q.budget, memory=q.budget.memory - q.budget.weights
                                                       + b.totals.weight_bytes))
            _keep_plan(plans, len(rows) - 1, own, b.assignment, {"solver": b.name, "status": "baseline", "wall_s": 0.0})
    df = pd.DataFrame(rows)
    df.attrs["wall_s"] = time.perf_counter() - t_all
    return df


def _keep_plan(plans: dict | None, row: int, problem: Problem, assignment, report: dict) -> None:
    if plans is not None and assignment is not None:
        plans[row] = make_plan(problem, assignment, report)


def _row(method, status, totals, objective, bound, gap, wall_s) -> dict:
    return {"method": method, "status": status, "damage": objective, "bound": bound, "gap": gap,
            "weight_bytes": totals.weight_bytes, "weight_gb": totals.weight_bytes / 1e9,
            "bits_per_weight": totals.bits_per_weight, "params": totals.params, "kept_experts": totals.kept_experts,
            "read_per_token_bytes": totals.read_per_token, "damage_quant": totals.damage_quant,
            "damage_prune": totals.damage_prune, "damage_topk": totals.damage_topk, "wall_s": wall_s}


def plot(df, path: str | Path, bf16_bytes: int | None = None, title: str = "") -> None:
    """Predicted damage vs size: moeplan's curve, the paper's pipeline, fixed baselines as points,
    and the paper's size ratio marked (when the model's BF16 size is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ok = df[df["status"].isin(["optimal", "feasible", "baseline"]) & df["damage"].notna()]
    for method, grp in ok.groupby("method", sort=False):
        grp = grp.sort_values("weight_gb")
        if grp["memory_bytes"].notna().any() and len(grp) > 1:
            style = dict(marker="o", ms=3, lw=2) if str(method).startswith("moeplan") else dict(marker="s", ms=3, lw=1, ls="--")
            ax.plot(grp["weight_gb"], grp["damage"], label=method, **style)
        else:
            ax.scatter(grp["weight_gb"], grp["damage"], label=method, marker="^", zorder=3)
    if bf16_bytes:
        x = PAPER_RATIO * bf16_bytes / 1e9
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.annotate(f"seed paper's ratio\n(103 / 1342 GB = {100 * PAPER_RATIO:.1f}%)", (x, 0.98),
                    xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8, color="gray")
    ax.set_xlabel("weights (GB)")
    ax.set_ylabel("predicted damage (KL nats/token)")
    ax.set_yscale("log")
    synthetic = bool(df["synthetic_profile"].any()) if "synthetic_profile" in df else False
    ax.set_title((title + "\n" if title else "") + ("SYNTHETIC profile: predicted, not measured" if synthetic else
                                                    "predicted from the measured profile"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path: str | Path) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with output_file(path, "plot") as tmp:
            fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def write(df, csv_path: str | Path, png_path: str | Path | None = None, bf16_bytes: int | None = None,
          title: str = "") -> None:
    with output_file(csv_path, "table") as tmp, open(tmp, "x") as f:
        if bool(df.get("synthetic_profile", False).any() if hasattr(df.get("synthetic_profile", None), "any") else False):
            f.write("# SYNTHETIC profile: every damage figure below is predicted from generated costs, not measured\n")
        df.to_csv(f, index=False)
    if png_path is not None:
        plot(df, png_path, bf16_bytes, title)
