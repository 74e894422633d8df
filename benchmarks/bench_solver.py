"""Solver benchmark at DeepSeek-V3 scale -> results/solver.md, results/solver.csv, results/solver_sweep_*.

    python benchmarks/bench_solver.py --time-limit 60 --threads 2

DeepSeek-V3's inventory comes from the shipped config (671B parameters, 45k tensors); the profile is
SYNTHETIC (sensitivity/synthetic.py, seed 0): every damage figure here is predicted from generated
costs, not measured. Budget: 128 GB of device memory, 4096 tokens of context, 2 GB runtime reserve.
Four problems: target free (per-expert formats) and gguf (llama.cpp's layout), each with the memory
row alone and with a decode-speed row as well. For each: the Lagrangian (the median of 3 runs), then
HiGHS, CBC and CP-SAT with the same time limit and the Lagrangian plan as their start, side by side;
the free target also without a start. Every plan is checked against the problem's own definition of
feasibility, and every bound against every plan, before anything is timed or written. Then 30-budget
sweeps (64 GB to 400 GB) with the baselines.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from moeplan.allocator.baselines import LLAMA_DEFAULT, llama_mix, paper_baseline
from moeplan.allocator.problem import Budget, Problem, Speed, fmt_bytes
from moeplan.allocator.solvers import solve
from moeplan.allocator.sweep import ProblemFactory, budgets_between, sweep, write
from moeplan.kernels.inventory import build_inventory
from moeplan.kernels.outputs import output_file, write_text
from moeplan.sensitivity.synthetic import synthetic_profile, toy_inventory
from machine_info import logical_cpus

MENU = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "Q2_K", "Q3_K", "Q4_K", "Q6_K"]  # 8 formats
EXTRA = ["Q5_K", "Q8_0"]  # in the profile (llama.cpp's mixes need them), not in the menu
SPEED = (256.0, 20.0)  # GB/s, tokens/s -> 12.8 GB read per token


def machine() -> str:
    return f"{logical_cpus()}, load average {os.getloadavg()[0]:.1f} at start"


def versions() -> str:
    import highspy
    import numpy
    import ortools
    import pulp

    return (f"Python {platform.python_version()}, numpy {numpy.__version__}, HiGHS {highspy.Highs().version()}, "
            f"OR-Tools {ortools.__version__}, PuLP {pulp.__version__} (CBC)")


def verify(p: Problem, sols: list) -> None:
    """Check before timing: every plan is valid, and every bound is below every plan."""
    for s in sols:
        if s.assignment is not None:
            bad = p.check(s.assignment)
            assert not bad, (s.solver, bad[:2])
            assert math.isclose(s.objective, p.objective(s.assignment), rel_tol=1e-12)
    objs = [s.objective for s in sols if s.objective is not None]
    for s in sols:
        if s.bound is not None and objs:
            assert s.bound <= min(objs) * (1 + 1e-9) + 1e-12, (s.solver, s.bound, min(objs))


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    mach = machine()
    t0 = time.perf_counter()
    inv = toy_inventory(n_layers=4, first_dense=1, n_experts=16, n_group=4, topk_group=2, top_k=4) if args.toy \
        else build_inventory("deepseek-v3")
    t_inv = time.perf_counter() - t0
    memory = "2MB" if args.toy else "128GB"
    reserve = 0 if args.toy else "2GB"
    rows, sections = [], []
    speed = Speed.of(*SPEED) if not args.toy else None
    cases = [("free", None), ("free", speed), ("gguf", None), ("gguf", speed)]
    if args.toy:
        cases = [("free", None), ("gguf", None)]
    profiles = {}
    for target, sp in cases:
        if target not in profiles:
            t0 = time.perf_counter()
            profiles[target] = synthetic_profile(inv, MENU + EXTRA, seed=0, target=target)
            print(f"synthetic profile ({target}): {time.perf_counter() - t0:.1f} s", flush=True)
        prof = profiles[target]
        t0 = time.perf_counter()
        p = Problem.build(inv, prof, Budget.of(memory, inv, 4096 if not args.toy else 8, reserve), target, MENU, sp)
        t_build = time.perf_counter() - t0
        name = f"{target}, memory" + (" + speed" if sp else "")
        print(f"== {name}: {p.describe().splitlines()[1]}", flush=True)
        # the Lagrangian: one checked run, then the median of 3 timed runs
        lag = solve(p, "lagrangian", threads=args.threads)
        sols = [lag]
        walls = []
        for _ in range(3):
            s = solve(p, "lagrangian", threads=args.threads)
            walls.append(s.wall_s)
            assert s.objective == lag.objective
        lag.wall_s = statistics.median(walls)
        print(f"   {lag.summary()}  (runs {', '.join(f'{w:.2f}' for w in walls)} s)", flush=True)
        speed_active = lag.log.get("speed_row") == "active"
        runs = [("lagrangian", "-", lag)]
        if not args.skip_exact:
            exacts = ["highs", "cbc", "cpsat"]
            for solver in exacts:
                s = solve(p, solver, time_limit=args.time_limit, threads=args.threads, rel_gap=args.rel_gap)
                print(f"   {s.summary()}  (start plan {s.hint_s:.1f} s)", flush=True)
                runs.append((solver, "lagrangian", s))
                sols.append(s)
            if target == "free" and sp is None:
                for solver in ("highs", "cbc"):
                    s = solve(p, solver, time_limit=args.time_limit, threads=args.threads, rel_gap=args.rel_gap,
                              hint=None)
                    print(f"   {s.summary()}  (no start plan)", flush=True)
                    runs.append((solver, "none", s))
                    sols.append(s)
        verify(p, sols)
        for solver, hint, s in runs:
            rows.append({"case": name, "target": target, "speed_row": sp is not None, "speed_row_active": speed_active,
                         "solver": solver, "start": hint, "status": s.status.value, "objective": s.objective,
                         "bound": s.bound, "solver_bound": s.log.get("solver_bound", s.bound),
                         "bound_from": s.log.get("bound_from", solver), "returned_start": bool(s.log.get("returned_start")),
                         "gap": s.gap, "wall_s": round(s.wall_s, 3), "start_s": round(s.hint_s, 3),
                         "time_limit_s": None if solver == "lagrangian" else args.time_limit,
                         "weight_bytes": s.totals.weight_bytes if s.totals else None,
                         "read_per_token_bytes": s.totals.read_per_token if s.totals else None,
                         "kept_experts": s.totals.kept_experts if s.totals else None,
                         "binaries": p.L * p.E * (1 + p.J * p.F) + len(p.items) * p.F,
                         "model_columns": s.model_size.get("columns"), "model_rows": s.model_size.get("rows")})
        pb = paper_baseline(p)
        mixes = [llama_mix(p, pre) for pre in LLAMA_DEFAULT]
        sections.append((name, p, lag, t_build, pb, mixes))

    # sweeps: 30 budgets, moeplan's Lagrangian with the paper's pipeline at every budget
    sweeps = []
    for target in ("free", "gguf"):
        factory = ProblemFactory(inv, profiles[target], target, MENU, 4096 if not args.toy else 8, reserve)
        budgets = budgets_between("64GB", "400GB", 30) if not args.toy else budgets_between("1.6MB", "6MB", 30)
        factory(budgets[0])  # arrays built once, outside the timing
        t0 = time.perf_counter()
        df0 = sweep(factory, budgets, baselines=False)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        df = sweep(factory, budgets, baselines=True, uniform_formats=["Q2_K", "Q4_K"])
        t_base = time.perf_counter() - t0
        ours = df0[df0.method == "moeplan"]
        assert (ours.status.isin(["optimal", "feasible"])).all()
        write(df, out / f"solver_sweep_{target}.csv", out / f"solver_sweep_{target}.png", inv.bytes_uniform("BF16"),
              f"{inv.model_type}, target {target}, formats {','.join(MENU)}")
        sweeps.append((target, t_plain, t_base, ours.gap.max(), df))
        print(f"sweep {target}: 30 budgets {t_plain:.1f} s (with baselines {t_base:.1f} s), max gap {ours.gap.max():.2e}",
              flush=True)

    import pandas as pd

    table = pd.DataFrame(rows)
    with output_file(out / "solver.csv", "results") as tmp, open(tmp, "x") as f:
        f.write("# SYNTHETIC profile: objectives are predicted damage (KL nats/token) from generated costs, not measured\n")
        table.to_csv(f, index=False)
    md = report(args, started, mach, t_inv, table, sections, sweeps)
    write_text(out / "solver.md", md)
    print(f"wrote {out / 'solver.md'}, {out / 'solver.csv'}")


def _f(v, fmt):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def report(args, started, mach, t_inv, table, sections, sweeps) -> str:
    cmd = "python benchmarks/bench_solver.py " + " ".join(sys.argv[1:])
    L = []
    L.append("# Solver benchmark: DeepSeek-V3 scale (SYNTHETIC profile)\n")
    L.append("**Every damage figure below is predicted from a SYNTHETIC profile** (sensitivity/synthetic.py, seed 0: "
             "generated costs with realistic spreads, not measurements). Sizes and bytes are exact.\n")
    L.append(f"Command: `{cmd.strip()}`  \nRun: {started}; machine: {mach}; {versions()}.  \n"
             f"Inventory from the shipped config: {t_inv:.1f} s.\n")
    L.append(f"Problem: DeepSeek-V3 (671B), 128 GB device memory, 4096-token context, 2 GB reserve; formats "
             f"{', '.join(MENU)} (8); exact solvers stop at a relative gap of {args.rel_gap:g} or after "
             f"{args.time_limit:g} s (wall time, including their model building and start plan), {args.threads} "
             f"threads. Speed row: {SPEED[0]:g} GB/s at {SPEED[1]:g} tokens/s = "
             f"{SPEED[0] / SPEED[1]:g} GB read per token at most. An exact solver's reported bound is the better of "
             f"its own and its Lagrangian start's (both proven; column 'bound from'); where it found no plan of its "
             f"own within the limit it returns the start plan.\n")
    for name, p, lag, t_build, pb, mixes in sections:
        L.append(f"## {name}\n")
        L.append("```\n" + p.describe() + "\n```\n")
        L.append(f"Problem build (arrays from the inventory and profile): {t_build:.2f} s.\n")
        L.append("| solver | start plan | status | objective | bound | bound from | solver's own bound | plan | gap | wall s |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for _, r in table[table.case == name].iterrows():
            plan = "start plan returned" if r.returned_start else ("-" if r.solver == "lagrangian" else "own")
            L.append(f"| {r.solver} | {r.start} | {r.status} | {_f(r.objective, '.6g')} | {_f(r.bound, '.6g')} | "
                     f"{r.bound_from} | {_f(r.solver_bound, '.6g')} | {plan} | {_f(r.gap, '.2e')} | {r.wall_s:.2f} |")
        t = lag.totals
        L.append("")
        L.append(f"Lagrangian plan: {fmt_bytes(t.weight_bytes)} of weights ({t.bits_per_weight:.3f} bits/weight, "
                 f"{t.params / 1e9:.1f}B parameters kept), {t.kept_experts:,} of {t.total_experts:,} experts kept, "
                 f"top-k {sorted(set(lag.assignment.topk.tolist()))}, {fmt_bytes(t.read_per_token)} read per token; "
                 f"damage {t.damage:.4g} = quantization {t.damage_quant:.4g} + pruning {t.damage_prune:.4g} + "
                 f"top-k {t.damage_topk:.4g} nats/token (SYNTHETIC).\n")
        if pb.feasible:
            L.append(f"Seed paper's pipeline at the same budget: damage {pb.objective:.4g} nats/token "
                     f"({pb.objective / lag.objective:.2f}x moeplan's), {fmt_bytes(pb.totals.weight_bytes)}.")
        else:
            L.append(f"Seed paper's pipeline at the same budget: no plan ({pb.note or pb.violations[:1]}).")
        for b in mixes:
            L.append(f"llama.cpp {b.name.split()[-1]} mix: {fmt_bytes(b.totals.weight_bytes)} -- "
                     + ("fits" if b.feasible else "does not fit") + ".")
        L.append("")
    L.append("## 30-budget sweeps (64 GB to 400 GB)\n")
    L.append("| target | moeplan only, s | with the paper's pipeline at every budget, s | largest gap |")
    L.append("|---|---|---|---|")
    for target, t_plain, t_base, gmax, _ in sweeps:
        L.append(f"| {target} | {t_plain:.2f} | {t_base:.2f} | {gmax:.2e} |")
    L.append("")
    L.append("Tables and plots: results/solver_sweep_free.{csv,png}, results/solver_sweep_gguf.{csv,png} "
             "(SYNTHETIC profile; the seed paper's operating point, 103 of 1342 GB = 7.7% of BF16, is marked).\n")
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per exact solve (default 60)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rel-gap", type=float, default=1e-4, help="exact solvers' stopping gap (default 1e-4 = 0.01%%)")
    ap.add_argument("--skip-exact", action="store_true", help="Lagrangian and sweeps only")
    ap.add_argument("--toy", action="store_true", help="a toy model instead of DeepSeek-V3 (smoke test of this script)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    run(ap.parse_args())


if __name__ == "__main__":
    main()
