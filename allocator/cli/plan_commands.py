"""`moeplan inventory`, `moeplan solve` and `moeplan sweep`.

    moeplan inventory MODEL
    moeplan solve MODEL (--profile FILE | --synthetic-profile) --memory 128GB --target gguf ...
    moeplan sweep MODEL (--profile FILE | --synthetic-profile) --from 64GB --to 400GB --steps 30 ...

MODEL is a checkpoint directory, a config.json, or a bundled name (deepseek-v3).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from moeplan.allocator.cli.pareto import measure
from moeplan.allocator.cli.pareto import write as write_measured
from moeplan.allocator.plan import make_plan
from moeplan.allocator.problem import Budget, InfeasibleBudget, Problem, fmt_bytes, parse_size
from moeplan.allocator.solvers import solve
from moeplan.allocator.sweep import ProblemFactory, budgets_between, sweep, write
from moeplan.kernels.inventory import resolve_model
from moeplan.kernels.outputs import check_output, write_text
from moeplan.sensitivity.importance import importance_path
from moeplan.sensitivity.synthetic import SYNTHETIC_FORMATS

from .args import (
    Command,
    add_model,
    add_problem,
    format_menu,
    load_inventory,
    load_profile,
    nonneg_float,
    positive_int,
    say,
    speed_constraint,
)

# ---------------------------------------------------------------------------------------------
# inventory

def _inventory_args(ap):
    add_model(ap)
    ap.add_argument("--out", metavar="FILE", help="write the inventory JSON")


def _inventory_run(args) -> int:
    if args.out:
        check_output(args.out, "--out")
    inv = load_inventory(args.model)
    rows = [(role, n) for role, n in inv.summary().items()]
    print(f"model {inv.model_type}  fingerprint {inv.fingerprint}  source {inv.source}")
    print(f"{'role':<16}{'parameters':>20}")
    for role, n in rows:
        print(f"{role:<16}{n:>20,}")
    print(f"MoE layers {len(inv.moe_layers)}, experts per layer "
          f"{len(inv.experts_in_layer(inv.moe_layers[0])) if inv.moe_layers else 0}, top-k {inv.top_k}, "
          f"groups {inv.n_group} (a token uses {inv.topk_group})")
    print(f"BF16 size {inv.bytes_uniform('BF16') / 1e9:,.1f} GB, KV cache {inv.kv_cache_bytes_per_token():,} bytes/token")
    if args.out:
        inv.save(args.out)
        say(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# solve

def _solve_args(ap):
    add_model(ap)
    add_problem(ap)
    ap.add_argument("--memory", required=True, help="device memory: 128GB, 96GiB, 1.5TB, or bytes")
    ap.add_argument("--rel-gap", type=nonneg_float, default=1e-6, help="relative gap at which a solve stops (default 1e-6)")
    ap.add_argument("--out", metavar="PLAN", help="write the plan JSON here")
    ap.add_argument("--llama-quantize-args", metavar="FILE", help="also write llama-quantize arguments (target gguf)")
    ap.add_argument("--dump-model", metavar="FILE", help="write the integer program (.lp or .mps)")
    ap.add_argument("--hint", choices=["lagrangian", "greedy", "none"], default="lagrangian",
                    help="exact solvers' starting plan (default lagrangian)")


def _solve_run(args) -> int:
    for flag, path in (("--out", args.out), ("--llama-quantize-args", args.llama_quantize_args),
                       ("--dump-model", args.dump_model)):
        if path:
            check_output(path, flag)
    inv = load_inventory(args.model)
    menu = format_menu(args)
    prof = load_profile(args, inv, menu)
    try:
        budget = Budget.of(args.memory, inv, args.context, args.reserve)
        problem = Problem.build(inv, prof, budget, args.target, menu, speed_constraint(args))
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    say(problem.describe())
    try:
        sol = solve(problem, args.solver, time_limit=args.time_limit, threads=args.threads,
                    hint=None if args.hint == "none" else args.hint, rel_gap=args.rel_gap,
                    dump_model=args.dump_model, progress=say)
    except InfeasibleBudget as exc:
        print(f"moeplan solve: infeasible: {exc}", file=sys.stderr)
        return 2
    if sol.assignment is None:
        print(f"moeplan solve: {sol.summary()} -- no plan", file=sys.stderr)
        return 3
    print(summary_table(problem, sol))
    plan = make_plan(problem, sol.assignment, sol.report())
    if args.out:
        plan.save(args.out)
        say(f"wrote {args.out}")
    if args.llama_quantize_args:
        write_text(args.llama_quantize_args, plan.llama_quantize_args(), "--llama-quantize-args")
        say(f"wrote {args.llama_quantize_args}")
    return 0


def summary_table(problem, sol) -> str:
    """The solve's report as a plain table: status, objective, bound, gap, time, size split."""
    t = sol.totals
    syn = " (SYNTHETIC profile)" if problem.profile.synthetic else ""
    lines = [
        f"solver {sol.solver}: {sol.status.value}   objective {sol.objective:.6g} nats/token{syn}   "
        f"bound {sol.bound:.6g}   gap {sol.gap:.2e}   {sol.wall_s:.2f} s",
        f"{'part':<16}{'bytes':>18}{'size':>14}{'share':>8}",
    ]
    for role, b in sorted(t.bytes_by_role.items(), key=lambda kv: -kv[1]):
        lines.append(f"{role:<16}{b:>18,}{fmt_bytes(b):>14}{100 * b / max(t.weight_bytes, 1):>7.1f}%")
    lines.append(f"{'weights':<16}{t.weight_bytes:>18,}{fmt_bytes(t.weight_bytes):>14}"
                 f"{100 * t.weight_bytes / problem.budget.weights:>7.1f}% of the weight budget")
    ks = sorted(set(sol.assignment.topk.tolist()))
    lines.append(f"kept experts {t.kept_experts:,} / {t.total_experts:,}, top-k {ks if len(ks) > 1 else ks[0] if ks else '-'}, "
                 f"{t.params / 1e9:.1f}B parameters, {t.bits_per_weight:.3f} bits/weight, "
                 f"{fmt_bytes(t.read_per_token)} read per token")
    lines.append(f"damage: quantization {t.damage_quant:.6g} + pruning {t.damage_prune:.6g} + top-k {t.damage_topk:.6g} "
                 f"= {t.damage:.6g} nats/token{syn}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# sweep

def _sweep_args(ap):
    add_model(ap)
    add_problem(ap)
    grid = ap.add_mutually_exclusive_group(required=True)
    grid.add_argument("--budgets", help="comma-separated memory sizes, e.g. 64GB,96GB,128GB")
    grid.add_argument("--from", dest="lo", help="smallest memory of an even grid (with --to, --steps)")
    ap.add_argument("--to", dest="hi", help="largest memory of the grid")
    ap.add_argument("--steps", type=positive_int, default=30, help="budgets in the grid (default 30)")
    ap.add_argument("--no-baselines", action="store_true", help="leave out the paper's pipeline and llama.cpp's mixes")
    ap.add_argument("--uniform", default="", help="uniform-format baselines to add, e.g. Q2_K,Q4_K")
    ap.add_argument("--out-csv", default="sweep.csv", help="table of results (default sweep.csv)")
    ap.add_argument("--out-png", default="sweep.png", help="plot of damage vs size (default sweep.png)")
    ap.add_argument("--measure", action="store_true",
                    help="apply every plan to the model and measure it against the original on held-out text: "
                         "KLD (mean, p99), perplexity, top-1 agreement (needs a checkpoint with weights)")
    ap.add_argument("--eval-tokens", type=positive_int, default=4096,
                    help="held-out tokens to measure on (default 4096; with --measure)")
    ap.add_argument("--eval-text", metavar="FILE",
                    help="held-out text to measure on (default: the checkpoint's valid.txt; with --measure)")
    ap.add_argument("--materialize", metavar="DIR",
                    help="also write every gguf-target plan as GGUF into DIR (with --measure)")


def _sweep_run(args) -> int:
    if (args.materialize or args.eval_text) and not args.measure:
        raise ValueError("--materialize and --eval-text go with --measure")
    check_output(args.out_csv, "--out-csv")
    check_output(args.out_png, "--out-png")
    if args.materialize:
        check_output(Path(args.materialize) / "x", "--materialize")
    if args.measure:
        model_dir = resolve_model(args.model)
        if not model_dir.is_dir():
            raise ValueError(f"--measure needs a checkpoint with weights (a directory with config.json and the "
                             f"*.safetensors files); {model_dir} is not one")
        eval_text = Path(args.eval_text).read_text() if args.eval_text else None
    inv = load_inventory(args.model)
    menu = format_menu(args)
    extra = [] if args.no_baselines else ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    extra += [f for f in args.uniform.split(",") if f.strip()]
    wanted = list(dict.fromkeys(menu + [f for f in extra if f in SYNTHETIC_FORMATS]))
    prof = load_profile(args, inv, wanted if args.synthetic_profile else None)
    if args.budgets:
        budgets = [parse_size(b) for b in args.budgets.split(",") if b.strip()]
        if not budgets:
            raise ValueError(f"--budgets {args.budgets!r} names no memory size; give e.g. 64GB,96GB,128GB")
    else:
        if not args.hi:
            raise ValueError("--from needs --to")
        budgets = budgets_between(args.lo, args.hi, args.steps)
    factory = ProblemFactory(inv, prof, args.target, menu, args.context, args.reserve, speed_constraint(args))
    t0 = time.perf_counter()
    plans: dict | None = {} if args.measure else None
    df = sweep(factory, budgets, args.solver, args.time_limit, args.threads, baselines=not args.no_baselines,
               uniform_formats=[f.strip() for f in args.uniform.split(",") if f.strip()], progress=say, plans=plans)
    say(f"sweep of {len(budgets)} budgets: {time.perf_counter() - t0:.1f} s")
    title = f"{inv.model_type}, target {args.target}, formats {','.join(menu)}"
    cols = ["memory_bytes", "method", "status", "weight_gb", "damage", "gap"]
    if args.measure:
        imp = importance_path(args.profile) if args.profile else None
        t1 = time.perf_counter()
        df = measure(df, plans, model_dir, eval_tokens=args.eval_tokens, eval_text=eval_text,
                            importance=imp if imp is not None and imp.exists() else None,
                            materialize_dir=args.materialize, progress=say)
        say(f"measured {len(plans)} plans: {time.perf_counter() - t1:.1f} s")
        df["bf16_bytes"] = inv.bytes_uniform("BF16")
        write_measured(df, args.out_csv, args.out_png, inv.bytes_uniform("BF16"), title)
        cols += ["measured_kld", "kld_p99", "perplexity", "top1_agreement"]
    else:
        write(df, args.out_csv, args.out_png, inv.bytes_uniform("BF16"), title)
    shown = df[[c for c in cols if c in df]].copy()
    shown["memory_bytes"] = shown["memory_bytes"].map(lambda v: "-" if v != v or v is None else fmt_bytes(v))
    print(shown.to_string(index=False))
    say(f"wrote {args.out_csv} and {args.out_png}")
    return 0


COMMANDS = [
    Command("inventory", "list a model's tensors, roles and sizes", _inventory_args, _inventory_run),
    Command("solve", "the best plan for a memory budget (plan JSON)", _solve_args, _solve_run),
    Command("sweep", "solve at many budgets: damage vs size table and plot", _sweep_args, _sweep_run),
]
