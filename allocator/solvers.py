"""One interface to every solver: `solve(problem, solver=...) -> Solution`.

- "lagrangian" (default): the multiple-choice-knapsack Lagrangian of allocator/lagrangian.py: a
  feasible plan and a proven lower bound in about a second at DeepSeek-V3 scale;
- "highs", "cbc" (through PuLP), "cpsat" (OR-Tools): the exact integer program of
  allocator/formulation.py, started from the Lagrangian plan (MIP start / hint), stopped at
  `time_limit` with the best plan found and its proven gap.

Every Solution reports status, objective (recomputed exactly from the plan by `Problem.evaluate`),
best bound, relative gap, wall time, and the plan's size split. Every plan is checked against the
problem's own definition of feasibility (`Problem.check`) before it is returned.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from .baselines import paper_pipeline
from .formulation import Formulation, MipModel, build_model
from .lagrangian import solve_lagrangian
from .local_search import repair
from .problem import Assignment, Problem
from .solution import Solution, Status

SOLVERS = ("lagrangian", "highs", "cbc", "cpsat")


def solve(problem: Problem, solver: str = "lagrangian", time_limit: float = 60.0, threads: int = 2,
          hint: Assignment | str | None = "lagrangian", rel_gap: float = 1e-6,
          dump_model: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None,
          cache: dict | None = None) -> Solution:
    """Solve `problem` with `solver`. Raises InfeasibleBudget (with the smallest feasible size) when
    no plan fits. `hint` is the exact solvers' starting plan: "lagrangian" (default), "greedy"
    (the seed paper's pipeline), an Assignment, or None. `dump_model` writes the integer program
    (.lp or .mps, by extension) before solving. `cache` (a dict kept between calls) lets repeated
    solves of one problem at other budgets reuse the Lagrangian's tables and prices."""
    solver = solver.lower()
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if time_limit <= 0 or threads < 1:
        raise ValueError(f"time_limit must be positive and threads >= 1, got {time_limit}, {threads}")
    problem.check_feasible()
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    if dump_model is not None:
        write_model(build_model(problem), dump_model)
        say(f"wrote the integer program to {dump_model}")
    if solver == "lagrangian":
        sol = solve_lagrangian(problem, rel_gap=rel_gap, time_limit=time_limit, cache=cache)
        sol.threads = threads
        sol.wall_s = time.perf_counter() - t0
        return _finish(problem, sol)

    start, start_bound = None, None
    if isinstance(hint, str):
        if hint == "lagrangian":
            say("starting plan: Lagrangian")
            start_sol = solve_lagrangian(problem, rel_gap=rel_gap, time_limit=time_limit, cache=cache)
            start, start_bound = start_sol.assignment, start_sol.bound
        elif hint == "greedy":
            say("starting plan: the seed paper's pipeline")
            try:
                start = paper_pipeline(problem)
            except ValueError:
                start = None
        else:
            raise ValueError(f"hint must be 'lagrangian', 'greedy', an Assignment or None, not {hint!r}")
    elif hint is not None:
        start = hint
    if start is not None and problem.check(start):
        start = None  # an infeasible start helps no solver
    hint_s = time.perf_counter() - t0
    say(f"building the integer program ({solver})")
    form = build_model(problem)
    # the time limit is wall time from the call: the start plan and the model building count
    deadline = t0 + time_limit
    run = {"highs": _solve_highs, "cbc": _solve_cbc, "cpsat": _solve_cpsat}[solver]
    say(f"solving with {solver} ({deadline - time.perf_counter():.0f} s left, {threads} threads)")
    status, values, bound, log = run(form, deadline, threads, form.values_of(start) if start is not None else None,
                                     rel_gap)
    a = form.to_assignment(values) if values is not None else None
    if a is not None and problem.check(a):
        # solvers accept tiny tolerance violations; repair them exactly
        log["repaired"] = problem.check(a)
        a = repair(problem, a)
    if a is None and start is not None:
        a = start
        log["returned_start"] = True
    obj = problem.objective(a) if a is not None else None
    log["solver_bound"] = bound
    if start_bound is not None and (bound is None or start_bound > bound):
        # the Lagrangian start's bound is proven too: report the better of the two
        bound = start_bound
        log["bound_from"] = "lagrangian"
    if status is Status.INFEASIBLE:
        obj = None
        a = None
    sol = Solution(solver, status, obj, bound, time.perf_counter() - t0, a, time_limit=time_limit, threads=threads,
                   hint_s=hint_s, model_size=form.model.summary(), log=log)
    if sol.bound is not None and sol.objective is not None:
        sol.bound = min(sol.bound, sol.objective)
    return _finish(problem, sol)


def _finish(problem: Problem, sol: Solution) -> Solution:
    if sol.assignment is not None:
        bad = problem.check(sol.assignment)
        if bad:
            raise AssertionError(f"{sol.solver} returned an invalid plan: {bad[:3]}")
        sol.totals = problem.evaluate(sol.assignment)
        if sol.status is Status.NO_SOLUTION:
            sol.status = Status.FEASIBLE
    return sol


# ---------------------------------------------------------------------------------------------
# HiGHS

def _highs_model(mdl: MipModel, names: bool = False):
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    lp = highspy.HighsLp()
    lp.num_col_ = mdl.n_cols
    lp.num_row_ = mdl.n_rows
    lp.col_cost_ = np.asarray(mdl.cost, dtype=np.float64)
    lp.col_lower_ = np.asarray(mdl.lb, dtype=np.float64)
    lp.col_upper_ = np.asarray(mdl.ub, dtype=np.float64)
    lp.row_lower_ = np.asarray(mdl.row_lo, dtype=np.float64)
    lp.row_upper_ = np.asarray(mdl.row_hi, dtype=np.float64)
    lp.offset_ = float(mdl.offset)
    start, idx, val = mdl.csr()
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = start.astype(np.int32)
    lp.a_matrix_.index_ = idx.astype(np.int32)
    lp.a_matrix_.value_ = val
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in mdl.integer]
    if names:
        lp.col_names_ = [mdl.col_name(c) for c in range(mdl.n_cols)]
        counter: dict[str, int] = {}
        rn = []
        for fam in mdl.row_family:
            counter[fam] = counter.get(fam, 0) + 1
            rn.append(f"{fam}_{counter[fam]}")
        lp.row_names_ = rn
    h.passModel(lp)
    return h


def write_model(form: Formulation, path: str | os.PathLike) -> None:
    """The integer program as an .lp or .mps file (HiGHS's writer, variables named x[i,f], ...)."""
    path = Path(path)
    if path.suffix.lower() not in (".lp", ".mps"):
        raise ValueError(f"model dumps are .lp or .mps files, not {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    h = _highs_model(form.model, names=True)
    h.writeModel(str(path))


def _left(deadline: float) -> float:
    """Seconds to the deadline, at least 1 (a solver always gets to look at its start plan)."""
    return max(deadline - time.perf_counter(), 1.0)


def _solve_highs(form: Formulation, deadline: float, threads: int, start, rel_gap: float):
    import highspy

    h = _highs_model(form.model)
    h.setOptionValue("time_limit", _left(deadline))
    h.setOptionValue("threads", int(threads))
    h.setOptionValue("mip_rel_gap", float(rel_gap))
    h.setOptionValue("mip_abs_gap", 0.0)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = list(map(float, start))
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    ms = h.getModelStatus()
    info = h.getInfo()
    has = info.primal_solution_status == 2  # kSolutionStatusFeasible
    values = np.array(h.getSolution().col_value) if has else None
    bound = float(info.mip_dual_bound) if math.isfinite(info.mip_dual_bound) else None
    log = {"model_status": h.modelStatusToString(ms), "nodes": int(info.mip_node_count),
           "solver_objective": float(info.objective_function_value) if has else None}
    if ms == highspy.HighsModelStatus.kOptimal:
        status = Status.OPTIMAL
    elif ms == highspy.HighsModelStatus.kInfeasible:
        status = Status.INFEASIBLE
    else:
        status = Status.FEASIBLE if has else Status.NO_SOLUTION
    return status, values, bound, log


# ---------------------------------------------------------------------------------------------
# CBC: the binary that PuLP ships, run on an MPS file written here

CBC_GRACE = 3.0  # seconds CBC gets after an interrupt to write its best plan (interrupted 1 s before the deadline)


def _solve_cbc(form: Formulation, deadline: float, threads: int, start, rel_gap: float):
    """CBC as a subprocess under the caller's wall-time deadline. The model is written as an MPS file
    directly from the arrays (numpy, seconds at DeepSeek-V3 scale), CBC gets the time left as its own
    limit (-sec), and at the deadline it is interrupted (SIGINT: CBC stops its search and writes the
    best plan it has), then killed if it is still reading the model. CBC's log gives the bound."""
    import signal
    import subprocess

    mdl = form.model
    binary = _cbc_binary()
    log: dict = {}
    with tempfile.TemporaryDirectory(prefix="moeplan-cbc-") as tmp:
        t0 = time.perf_counter()
        mps, solpath, logpath = (os.path.join(tmp, n) for n in ("model.mps", "model.sol", "cbc.log"))
        write_mps(mdl, mps)
        args = [binary, mps]
        if start is not None:
            mst = os.path.join(tmp, "start.sol")
            _write_cbc_solution(mdl, np.asarray(start, dtype=np.float64), mst)
            args += ["-mips", mst]
        log["export_s"] = round(time.perf_counter() - t0, 3)
        left = deadline - time.perf_counter()
        args += ["-sec", f"{max(left - 2.0, 1.0):.1f}", "-threads", str(int(threads)), "-ratioGap", repr(float(rel_gap)),
                 "-allowableGap", "0", "-solve", "-solution", solpath]
        with open(logpath, "w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                proc.wait(timeout=max(deadline - 1.0 - time.perf_counter(), 1.0))
            except subprocess.TimeoutExpired:
                log["interrupted"] = True
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=CBC_GRACE)
                except subprocess.TimeoutExpired:
                    log["killed"] = True
                    proc.kill()
                    proc.wait()
        text = Path(logpath).read_text(errors="replace")
        head, values = _read_cbc_solution(solpath, mdl.n_cols + 1) if os.path.exists(solpath) else ("", None)
    log["cbc_result"] = _cbc_result(text) or head
    if values is not None:
        values = values[:mdl.n_cols]  # the last column carries the objective's constant
        if not _integral_and_feasible(mdl, values):
            # stopped before any integer plan: the file holds the relaxation's point, not a plan
            log["discarded_relaxation"] = True
            values = None
    low = head.lower()
    if low.startswith("infeasible") or "integer infeasible" in low:
        return Status.INFEASIBLE, None, None, log
    bound = _cbc_bound(text)
    if values is not None and head.startswith("Optimal"):
        status = Status.OPTIMAL
        # "optimal" means within the relative gap CBC was given (its log may only show the root bound)
        obj = float(np.dot(mdl.cost, values) + mdl.offset)
        bound = max(bound if bound is not None else -math.inf, obj - float(rel_gap) * abs(obj))
    else:
        status = Status.FEASIBLE if values is not None else Status.NO_SOLUTION
    return status, values, bound, log


def _integral_and_feasible(mdl: MipModel, values: np.ndarray, tol: float = 1e-6) -> bool:
    """Whether column values form a plan: integral where they must be, every row met (to a relative
    tolerance; solve() repairs what is left)."""
    integer = np.asarray(mdl.integer, dtype=bool)
    if np.any(np.abs(values[integer] - np.rint(values[integer])) > tol):
        return False
    start, idx, val = mdl.csr()
    act = np.add.reduceat(val * values[idx], start[:-1]) if len(idx) else np.zeros(mdl.n_rows)
    act = np.where(np.diff(start) > 0, act, 0.0)
    lo, hi = np.asarray(mdl.row_lo, dtype=np.float64), np.asarray(mdl.row_hi, dtype=np.float64)
    slack = tol * (1.0 + np.maximum(np.abs(np.where(np.isfinite(lo), lo, 0)), np.abs(np.where(np.isfinite(hi), hi, 0))))
    return bool(np.all(act >= lo - slack) and np.all(act <= hi + slack))


def _cbc_binary() -> str:
    """The CBC executable PuLP ships (or the one `pulp[cbc]` / the system installs)."""
    import shutil

    try:
        import pulp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # PuLP 3 announces PULP_CBC_CMD's retirement
            for make in (pulp.PULP_CBC_CMD, pulp.COIN_CMD):
                cmd = make(msg=False)
                if cmd.available():
                    return cmd.path
    except ImportError:
        pass
    found = shutil.which("cbc")
    if found:
        return found
    raise RuntimeError("CBC is not available: install pulp (it ships a CBC binary) or choose another solver")


def _num(v: np.ndarray) -> np.ndarray:
    return np.char.mod("%.17g", np.asarray(v, dtype=np.float64))


def write_mps(mdl: MipModel, path: str | os.PathLike) -> None:
    """`mdl` as a fixed-name MPS file (columns C<n>, rows R<n>; one more column, fixed at 1, carries
    the objective's constant, which MPS readers treat differently). Written column-wise with numpy."""
    n, m = mdl.n_cols, mdl.n_rows
    start, idx, val = mdl.csr()
    rows = np.repeat(np.arange(m), np.diff(start))
    order = np.lexsort((rows, idx))  # by column, then row
    cidx, ridx, cval = idx[order], rows[order], val[order]
    lo, hi = np.asarray(mdl.row_lo, dtype=np.float64), np.asarray(mdl.row_hi, dtype=np.float64)
    sense = np.where(lo == hi, "E", np.where(np.isfinite(hi), "L", "G"))
    if np.any(~np.isfinite(lo) & ~np.isfinite(hi)):
        raise ValueError("a row without bounds cannot be written to MPS")
    rname = np.char.add("R", np.arange(m).astype(str))
    cname = np.char.add("C", np.arange(n).astype(str))
    cost = np.asarray(mdl.cost, dtype=np.float64)
    integer = np.asarray(mdl.integer, dtype=bool)
    out = ["NAME          " + (mdl.name or "moeplan"), "ROWS", " N  OBJ"]
    out += list(np.char.add(np.char.add(" ", sense), np.char.add("  ", rname)))
    out.append("COLUMNS")
    # every column: its objective entry (when nonzero) and its matrix entries, with integer markers
    has_cost = np.flatnonzero(cost != 0)
    ent_col = np.r_[has_cost, cidx]
    ent_row = np.r_[np.full(len(has_cost), "OBJ", dtype=rname.dtype), rname[ridx]]
    ent_val = np.r_[cost[has_cost], cval]
    o = np.argsort(ent_col, kind="stable")
    ent_col, ent_row, ent_val = ent_col[o], ent_row[o], ent_val[o]
    lines = np.char.add(np.char.add(np.char.add("    ", cname[ent_col]), np.char.add("  ", ent_row)),
                        np.char.add("  ", _num(ent_val)))
    # columns without entries still need a line
    present = np.zeros(n, dtype=bool)
    present[ent_col] = True
    empty = np.flatnonzero(~present)
    lines = np.r_[lines, np.char.add(np.char.add("    ", cname[empty]), "  OBJ  0")]
    ent_col = np.r_[ent_col, empty]
    o = np.argsort(ent_col, kind="stable")
    lines, ent_col = lines[o], ent_col[o]
    # integer runs: a marker pair around every maximal run of integer columns
    change = np.flatnonzero(np.diff(np.r_[False, integer[ent_col], False].astype(np.int8)))
    pieces, prev, k = [], 0, 0
    for pos in change:
        pieces.append(lines[prev:pos])
        pieces.append(np.array([f"    M{k}  'MARKER'  '{'INTORG' if k % 2 == 0 else 'INTEND'}'"]))
        prev, k = pos, k + 1
    pieces.append(lines[prev:])
    out += list(np.concatenate(pieces))
    out.append(f"    ONE  OBJ  {float(mdl.offset)!r}")
    out.append("RHS")
    rhs = np.where(sense == "G", lo, hi)
    nz = np.flatnonzero(rhs != 0)
    out += list(np.char.add(np.char.add("    RHS  ", rname[nz]), np.char.add("  ", _num(rhs[nz]))))
    ranged = np.flatnonzero((sense != "E") & np.isfinite(lo) & np.isfinite(hi))
    if len(ranged):
        out.append("RANGES")
        out += list(np.char.add(np.char.add("    RNG  ", rname[ranged]), np.char.add("  ", _num(hi[ranged] - lo[ranged]))))
    out.append("BOUNDS")
    lb, ub = np.asarray(mdl.lb, dtype=np.float64), np.asarray(mdl.ub, dtype=np.float64)
    binary = integer & (lb == 0) & (ub == 1)
    bv = np.flatnonzero(binary)
    out += list(np.char.add(" BV BND  ", cname[bv]))
    other = np.flatnonzero(~binary)
    lb, ub = lb.tolist(), ub.tolist()  # plain floats: repr gives their shortest exact text
    for c in other.tolist():
        if lb[c] == ub[c]:
            out.append(f" FX BND  C{c}  {lb[c]!r}")
            continue
        if lb[c] == -math.inf:
            out.append(f" MI BND  C{c}")
        elif lb[c] != 0:
            out.append(f" LO BND  C{c}  {lb[c]!r}")
        if ub[c] != math.inf:
            out.append(f" UP BND  C{c}  {ub[c]!r}")
        elif integer[c]:
            out.append(f" PL BND  C{c}")
    out.append(" FX BND  ONE  1")
    out.append("ENDATA")
    Path(path).write_text("\n".join(out) + "\n")


def _write_cbc_solution(mdl: MipModel, values: np.ndarray, path: str) -> None:
    """A start plan in the format CBC writes its solutions in (what -mips reads)."""
    v = np.r_[values, 1.0]
    v = np.where(np.r_[np.asarray(mdl.integer, dtype=bool), False], np.rint(v), v)
    names = np.r_[np.char.add("C", np.arange(mdl.n_cols).astype(str)), ["ONE"]]
    lines = np.char.add(np.char.add(np.char.add(np.char.rjust(np.arange(len(v)).astype(str), 7), " "),
                                    np.char.add(names, " ")), np.char.add(_num(v), " 0"))
    Path(path).write_text("Stopped on time - objective value 0\n" + "\n".join(lines) + "\n")


def _read_cbc_solution(path: str, n: int) -> tuple[str, np.ndarray | None]:
    """(CBC's status line, column values) from its solution file; values None without a plan."""
    text = Path(path).read_text(errors="replace").splitlines()
    if not text:
        return "", None
    head = text[0].strip()
    low = head.lower()
    if "infeasible" in low or "no integer solution" in low or "objective value" not in low:
        return head, None
    values = np.zeros(n)
    for line in text[1:]:
        tok = line.split()
        if tok and tok[0] == "**":  # CBC marks values outside their bounds; solve() repairs them
            tok = tok[1:]
        if len(tok) < 3:
            continue
        name = tok[1]
        c = n - 1 if name == "ONE" else int(name[1:]) if name.startswith("C") and name[1:].isdigit() else -1
        if 0 <= c < n:
            values[c] = float(tok[2])
    return head, values


def _cbc_bound(text: str) -> float | None:
    """CBC's proven lower bound from its log: the final "Lower bound:", else the last "best possible"
    of its progress lines, else the root relaxation's "Continuous objective value"."""
    for pattern in (r"Lower bound:\s*([-+0-9.eE]+)", r"best possible\s*([-+0-9.eE]+)",
                    r"Continuous objective value is\s*([-+0-9.eE]+)"):
        found = re.findall(pattern, text)
        if found:
            try:
                return float(found[-1])
            except ValueError:
                continue
    return None


def _cbc_result(text: str) -> str:
    m = re.search(r"Result - (.*)", text)
    return m.group(1).strip() if m else ""


# ---------------------------------------------------------------------------------------------
# CP-SAT

COST_DIGITS = 12  # CP-SAT's objective: costs x 10^(COST_DIGITS - ceil(log10(max |cost|))), rounded


def cost_scale(mdl: MipModel) -> float:
    """The one factor that turns the objective's costs (nats/token) into CP-SAT's integers: a power of
    ten that puts the largest cost between 10^(COST_DIGITS-1) and 10^COST_DIGITS, so every cost keeps
    about 12 significant digits (sums stay far inside int64)."""
    biggest = max((abs(c) for c in mdl.cost), default=0.0)
    if biggest == 0:
        return 1.0
    return 10.0 ** (COST_DIGITS - math.ceil(math.log10(biggest)))


def _solve_cpsat(form: Formulation, deadline: float, threads: int, start, rel_gap: float):
    from ortools.sat.python import cp_model

    mdl = form.model
    scale = cost_scale(mdl)
    model = cp_model.CpModel()
    cols = []
    for c in range(mdl.n_cols):
        # continuous helpers (speed caps in bytes, the 0/1 products w) take integral values at
        # every integral plan, so they are integers here
        lo, hi = math.ceil(mdl.lb[c] - 1e-9), math.floor(mdl.ub[c] + 1e-9)
        cols.append(model.NewBoolVar(f"v{c}") if (lo, hi) == (0, 1) else model.NewIntVar(lo, hi, f"v{c}"))
    for r in range(mdl.n_rows):
        vals = mdl.row_vals[r]
        iv = np.rint(vals).astype(np.int64)
        if not np.array_equal(iv, vals):
            raise ValueError(f"row {r} ({mdl.row_family[r]}) has fractional coefficients; CP-SAT needs integers")
        lo = -cp_model.INT_MAX if mdl.row_lo[r] == -math.inf else math.ceil(mdl.row_lo[r] - 1e-9)
        hi = cp_model.INT_MAX if mdl.row_hi[r] == math.inf else math.floor(mdl.row_hi[r] + 1e-9)
        expr = cp_model.LinearExpr.WeightedSum([cols[c] for c in mdl.row_cols[r]], iv.tolist())
        model.AddLinearConstraint(expr, lo, hi)
    icost = [int(round(c * scale)) for c in mdl.cost]
    model.Minimize(cp_model.LinearExpr.WeightedSum(
        [cols[c] for c, w in enumerate(icost) if w], [w for w in icost if w]))
    if start is not None:
        for c, v in enumerate(start):
            model.AddHint(cols[c], int(round(v)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = _left(deadline)
    solver.parameters.num_workers = int(threads)
    solver.parameters.relative_gap_limit = float(rel_gap)
    st = solver.Solve(model)
    values = None
    if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        values = np.array([solver.Value(v) for v in cols], dtype=np.float64)
    # the bound is proven for the rounded costs; every cost moved by at most 0.5 / scale, so subtracting
    # that for every costed column keeps it a bound of the exact problem
    rounding = 0.5 / scale * sum(1 for w in mdl.cost if w)
    bound = (solver.BestObjectiveBound() / scale + mdl.offset - rounding
             if st in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None)
    status = {cp_model.OPTIMAL: Status.OPTIMAL, cp_model.FEASIBLE: Status.FEASIBLE,
              cp_model.INFEASIBLE: Status.INFEASIBLE}.get(st, Status.NO_SOLUTION)
    log = {"cpsat_status": solver.StatusName(st), "cost_scale": scale,
           "rounded_objective": solver.ObjectiveValue() / scale + mdl.offset if values is not None else None}
    return status, values, bound, log
