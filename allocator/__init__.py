"""moeplan's allocator: the integer program that chooses expert pruning, per-tensor formats and
top-k under a memory budget, its solvers, the baselines, the plan file, sweeps and the CLI."""

if __name__ != "moeplan.allocator":  # the folder found by its bare name from a checkout's root
    raise ModuleNotFoundError(f"No module named {__name__!r} (moeplan's allocator/ folder is imported as "
                              f"moeplan.allocator)", name=__name__)

from .baselines import Baseline, all_baselines, llama_mix, paper_baseline, paper_pipeline, uniform
from .formulation import FAMILIES, Formulation, MipModel, build_model
from .plan import Plan, PlanError, assignment_from_plan, make_plan
from .problem import (Assignment, Budget, Candidate, InfeasibleBudget, Item, MoELayer, Problem, Speed, Totals,
                      lower_hull, parse_size)
from .solvers import SOLVERS, Solution, Status, solve, write_model
from .sweep import ProblemFactory, budgets_between, sweep

__all__ = [
    "Assignment", "Baseline", "Budget", "Candidate", "FAMILIES", "Formulation", "InfeasibleBudget", "Item",
    "MipModel", "MoELayer", "Plan", "PlanError", "Problem", "ProblemFactory", "SOLVERS", "Solution", "Speed",
    "Status", "Totals", "all_baselines", "assignment_from_plan", "budgets_between", "build_model", "llama_mix",
    "lower_hull", "make_plan", "paper_baseline", "paper_pipeline", "parse_size", "solve", "sweep",
    "uniform", "write_model",
]
