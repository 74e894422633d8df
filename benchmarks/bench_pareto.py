"""Measured Pareto curves on the shipped reference models: KLD to the original vs weight size.

For each model, at weight budgets from 6% to 35% of its BF16 size (plus the seed paper's 7.7%), solve
moeplan (target free and gguf), quantization only (moeplan's program without pruning or top-k changes),
the seed paper's sequential pipeline, llama.cpp's Q2_K / Q3_K_M / Q4_K_M mixes and every uniform
format of the profile's menu; apply every plan to the model and measure it against the original on the
model's held-out valid.txt (allocator.cli.pareto.pareto_curves). The profile is the one shipped next to the
model (sensitivity/models/<model>/profile.json): re-run this script after re-profiling.

    python benchmarks/bench_pareto.py [--models NAME ...] [--eval-tokens 4096] [--points 11]

Writes results/pareto-<model>.csv (one row per plan, predicted and measured), results/pareto-<model>.png
(measured KLD vs size; predicted vs measured) and results/pareto.md (per budget: moeplan's measured KLD
against the best baseline at or below the budget, judged against the goal ratio 0.7).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve each other on a busy machine

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from moeplan.allocator.cli.pareto import (GOAL_RATIO, MOEPLAN_FREE, MOEPLAN_GGUF, QUANT_ONLY, goal_markdown,
                              goal_table, pareto_curves, write)
from moeplan.allocator.sweep import PAPER_RATIO
from moeplan.kernels.outputs import write_text
from machine_info import logical_cpus

MODELS = ("tiny-deepseek-v3", "tiny-qwen3-moe")
RESULTS = ROOT / "results"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fractions(points: int, lo: float, hi: float) -> list[float]:
    return sorted({round(float(x), 4) for x in np.linspace(lo, hi, points)} | {PAPER_RATIO})


def machine() -> str:
    import torch

    return f"{logical_cpus()}, torch {torch.__version__} with {torch.get_num_threads()} threads"


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def _line(method: str) -> str:
    return "uniform formats" if method.startswith("uniform ") else "llama.cpp mixes" if method.startswith("llama.cpp ") \
        else method


def model_section(name: str, df, goal, seconds: float) -> str:
    a = df.attrs
    ok = df[df["measured_kld"].notna()]
    lines = [f"## {name}", "",
             f"BF16 weights {a['bf16_bytes'] / 1e6:.2f} MB; original perplexity {a['reference_perplexity']:.2f} on "
             f"{a['eval_tokens']} held-out tokens (valid.txt); {a['evaluations']} distinct plans applied and measured; "
             f"solve {a['solve_s']:.1f} s, measure {a['measure_s']:.0f} s, total {seconds:.0f} s. Profile "
             f"{a['profile_fingerprint']}{' (SYNTHETIC)' if a['synthetic_profile'] else ''}.",
             "",
             f"Plot: `results/pareto-{name}.png`; every plan: `results/pareto-{name}.csv`.",
             "",
             "Per budget: measured KLD (nats/token) of moeplan and of the best baseline whose weights fit the "
             "budget (lowest measured KLD among the seed paper's pipeline at any budget, llama.cpp's mixes and "
             f"the uniform formats); ratios at most {GOAL_RATIO} in bold. Quantization only is moeplan's own "
             "program without pruning or top-k changes (an ablation, not counted as a baseline).",
             "",
             goal_markdown(goal)]
    # the ablation: where moeplan's own program without pruning / top-k measures lower than moeplan (gguf)
    both = goal[goal[QUANT_ONLY].notna() & goal[MOEPLAN_GGUF].notna()]
    lower = both[both[QUANT_ONLY] < both[MOEPLAN_GGUF]]
    same = both[both[QUANT_ONLY] == both[MOEPLAN_GGUF]]
    lines.append(f"Quantization only vs moeplan (gguf), at the {len(both)} budgets where both have a plan: the same "
                 f"plan at {len(same)}; quantization only measures lower at {len(lower)}"
                 + (" (" + ", ".join(f"{100 * r['budget_fraction']:.1f}%: {r[QUANT_ONLY]:.4f} vs {r[MOEPLAN_GGUF]:.4f}"
                                     for _, r in lower.iterrows()) + ")" if len(lower) else "") + ".")
    lines.append("")
    # how close the prediction is
    pr = ok[ok["damage"].notna() & (ok["damage"] > 0)]
    lines.append(f"Predicted vs measured over all {len(pr)} measured plans: Spearman {spearman(pr['damage'], pr['measured_kld']):.3f}; "
                 f"median measured / predicted {np.median(pr['measured_kld'] / pr['damage']):.2f}; by method: "
                 + ", ".join(f"{m} {np.median(g['measured_kld'] / g['damage']):.2f}"
                             for m, g in pr.assign(line=pr["method"].map(_line)).groupby("line", sort=True)) + ".")
    lines.append("")
    lines.append("| method | MB | % BF16 | kept experts | predicted | measured KLD | KLD p99 | top-1 | ppl |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for _, r in ok.sort_values(["method", "weight_bytes"]).iterrows():
        lines.append(f"| {r['method']} | {r['weight_bytes'] / 1e6:.2f} | {100 * r['size_fraction']:.1f} | "
                     f"{int(r['kept_experts'])} | {r['damage']:.4f} | {r['measured_kld']:.4f} | {r['kld_p99']:.3f} | "
                     f"{r['top1_agreement']:.3f} | {r['perplexity']:.2f} |")
    infeasible = df[df["status"] == "infeasible"]
    if len(infeasible):
        lines.append("")
        lines.append("No plan (infeasible): " + "; ".join(
            f"{m} at {', '.join(f'{100 * x:.1f}%' for x in g['budget_fraction'])}"
            for m, g in infeasible.groupby("method", sort=False)) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per evaluation (default 4096)")
    ap.add_argument("--points", type=int, default=11, help="budgets from --lo to --hi (default 11, plus 7.7%%)")
    ap.add_argument("--lo", type=float, default=0.06, help="smallest budget, fraction of BF16 (default 0.06)")
    ap.add_argument("--hi", type=float, default=0.35, help="largest budget, fraction of BF16 (default 0.35)")
    ap.add_argument("--sample", choices=["spread", "head"], default="spread",
                    help="held-out windows evenly spaced over valid.txt (default) or its first tokens")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (default results/)")
    ap.add_argument("--materialize", type=Path, metavar="DIR", help="also write every gguf-target plan as GGUF")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_pareto.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                     " " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    fr = fractions(args.points, args.lo, args.hi)
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    sections, summary = [], []
    for name in args.models:
        _say(f"== {name}: {len(fr)} budgets, {args.eval_tokens} held-out tokens")
        t0 = time.perf_counter()
        df = pareto_curves(name, fr, eval_tokens=args.eval_tokens, sample=args.sample, progress=_say,
                           materialize_dir=(args.materialize / name) if args.materialize else None)
        seconds = time.perf_counter() - t0
        write(df, args.out / f"pareto-{name}.csv", args.out / f"pareto-{name}.png",
              title=f"{name}: measured KL divergence vs weight size")
        goal = goal_table(df)
        sections.append(model_section(name, df, goal, seconds))
        for m in (MOEPLAN_FREE, MOEPLAN_GGUF):
            judged = goal[goal[f"meets {m}"].notna()]
            met = int(judged[f"meets {m}"].astype(bool).sum())
            worst = judged[f"ratio {m}"].max() if len(judged) else float("nan")
            summary.append(f"| {name} | {m} | {met} of {len(judged)} | {worst:.2f} |")
        _say(f"== {name}: {seconds:.0f} s")
    elapsed = time.perf_counter() - t_all
    load1 = os.getloadavg()
    head = [
        "# Measured Pareto curves: KLD to the original model vs weight size",
        "",
        f"Goal: moeplan's measured KLD at most {GOAL_RATIO}x the best baseline's (lowest measured KLD among the "
        "baselines whose weights fit the budget) at every budget. Budgets: "
        + ", ".join(f"{100 * f:.1f}%" for f in fr) + " of each model's BF16 weight size (7.7% is the seed paper's "
        "103 GB / 1342 GB). Every plan is applied in memory (the dequantized weights of its formats, pruned experts "
        "removed, top-k set: what `moeplan materialize` writes) and compared with the original model on held-out "
        f"text the profile never saw: {args.eval_tokens // 128} windows of 128 tokens "
        + ("evenly spaced over the model's valid.txt (code, documentation and prose)." if args.sample == "spread"
           else "from the start of the model's valid.txt."),
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min for {len(args.models)} models).",
        f"Machine: {machine()}; load average {load0[0]:.2f} at start, {load1[0]:.2f} at the end "
        "(a shared machine: times are indicative).",
        "",
        "| model | moeplan | budgets meeting the goal (of those with a baseline at or below) | worst ratio |",
        "|---|---|---|---|",
        *summary,
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "pareto.md", "\n".join(head) + "\n" + "\n".join(sections))
    _say(f"wrote {args.out / 'pareto.md'} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
