"""`moeplan demo`: the whole pipeline on the bundled DeepSeek-V3-architecture reference model.

profile (the shipped one, or measured anew with --reprofile) -> solve at a default budget (target
gguf) -> predicted sweep with the baselines -> materialize the plan as GGUF -> evaluate the plan and
the seed paper's pipeline at the same budget against the original model -> summary table.
Everything it writes goes into one folder (default ./moeplan-demo).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from moeplan.allocator import paper_baseline, solve
from moeplan.allocator.cli.evaluation import Evaluator
from moeplan.allocator.cli.materialize import materialize
from moeplan.allocator.plan import PlanError, make_plan
from moeplan.allocator.sweep import ProblemFactory, sweep, write
from moeplan.kernels.inventory import build_inventory, resolve_model
from moeplan.kernels.outputs import json_text, write_text
from moeplan.sensitivity.importance import importance_path
from moeplan.sensitivity.profile import Profile

from .args import Command

DEFAULT_MODEL = "tiny-deepseek-v3"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_demo(model: str = DEFAULT_MODEL, out: str | Path = "moeplan-demo", fraction: float = 0.20,
             context: int = 256, reprofile: bool = False, eval_tokens: int = 4096, sweep_points: int = 12,
             write_gguf: bool = True) -> dict:
    from moeplan.sensitivity.profiler import profile_model

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(model)
    if not model_dir.is_dir():
        raise ValueError(f"the demo needs a checkpoint with weights; {model_dir} is not one")
    inv = build_inventory(model_dir)

    # 1. profile
    shipped = model_dir / "profile.json"
    if shipped.exists() and not reprofile:
        profile = Profile.load(shipped)
        profile.check_against(inv)
        imp_file = importance_path(shipped)
        _say(f"[1/5] profile: shipped with the model ({shipped})")
    else:
        _say("[1/5] profile: measuring on the model's calibration text")
        profile = profile_model(str(model_dir), out=out / "profile.json")
        imp_file = importance_path(out / "profile.json")

    # 2. solve at the default budget: `fraction` of the BF16 weights, plus the KV cache for `context`
    bf16 = inv.bytes_uniform("BF16")
    kv = inv.kv_cache_bytes_per_token() * context
    memory = int(fraction * bf16) + kv
    factory = ProblemFactory(inv, profile, target="gguf", context=context, reserve=0)
    problem = factory(memory)
    _say(f"[2/5] solve: {memory:,} bytes of memory ({100 * fraction:.0f}% of the {bf16:,}-byte BF16 weights "
         f"+ KV cache for {context} tokens)\n" + problem.budget.split())
    sol = solve(problem, "lagrangian")
    _say("      " + sol.summary())
    try:
        exact = solve(problem, "highs", time_limit=60)
        _say("      " + exact.summary())
        if exact.assignment is not None and exact.objective is not None and exact.objective <= sol.objective:
            sol = exact
    except Exception as exc:  # the Lagrangian plan stands on its own
        _say(f"      exact check skipped: {exc}")
    plan = make_plan(problem, sol.assignment, sol.report())
    plan.save(out / "plan.json")
    try:
        write_text(out / "llama-quantize-args.txt", plan.llama_quantize_args())
    except PlanError as exc:  # a plan that prunes experts: llama-quantize cannot write it
        write_text(out / "llama-quantize-args.txt", f"# {exc}\n")

    # 3. predicted sweep, both targets, with the baselines
    budgets = [int(r * bf16) + kv for r in np.linspace(0.06, 0.35, sweep_points)]
    frames = []
    for target in ("gguf", "free"):
        f = factory if target == "gguf" else ProblemFactory(inv, profile, target="free", context=context, reserve=0)
        df = sweep(f, budgets, uniform_formats=["Q2_K", "Q3_K", "Q4_K"], baselines=(target == "gguf"))
        df.loc[df["method"] == "moeplan", "method"] = f"moeplan ({target})"
        frames.append(df)
    import pandas as pd

    pareto = pd.concat(frames, ignore_index=True)
    write(pareto, out / "pareto.csv", out / "pareto.png", bf16_bytes=bf16, title=f"{model}: predicted damage vs size")
    _say(f"[3/5] sweep: {len(budgets)} budgets x 2 targets -> {out / 'pareto.csv'}, {out / 'pareto.png'}")

    # 4. materialize the plan as GGUF
    gguf_report = None
    if write_gguf:
        rep = materialize(str(model_dir), plan, gguf_out=out / "model.gguf", progress=False)
        gguf_report = rep.gguf
        _say(f"[4/5] materialize: {gguf_report.path} ({gguf_report.file_size:,} bytes; tensor data "
             f"{gguf_report.total_tensor_bytes:,}, plan predicted {plan.totals.weight_bytes:,})")

    # 5. measure: moeplan's plan and the paper's pipeline at the same budget
    evaluator = Evaluator(model_dir, eval_tokens=eval_tokens, seq_len=128,
                          importance=imp_file if imp_file.exists() else None)
    rows = []
    candidates = [("moeplan (gguf)", plan)]
    pb = paper_baseline(problem)
    if pb.feasible:
        candidates.append(("paper pipeline", make_plan(pb.problem, pb.assignment,
                                                       {"solver": pb.name, "status": "baseline", "wall_s": 0.0})))
    for name, pl in candidates:
        r = evaluator(pl)
        rows.append({"method": name, "weight_bytes": pl.totals.weight_bytes, "bits_per_weight": pl.totals.bits_per_weight,
                     "predicted_kld": pl.damage.total, "measured_kld": r.kld_mean, "kld_p99": r.kld_p99,
                     "top1_agreement": r.top1_agreement, "perplexity": r.perplexity})
    llama_check = _llama_check(gguf_report, evaluator, plan) if gguf_report else None
    summary = {"model": model, "memory_bytes": memory, "reference_perplexity": evaluator.reference_perplexity,
               "solver": sol.report(), "results": rows, "llama_cpp": llama_check,
               "seconds": round(time.perf_counter() - t_start, 1)}
    write_text(out / "summary.json", json_text(summary, indent=1) + "\n")
    _say(f"[5/5] evaluate on {evaluator.n_tokens} held-out tokens (original perplexity "
         f"{evaluator.reference_perplexity:.2f})")
    _print_table(rows, llama_check, summary["seconds"], out)
    return summary


def _llama_check(report, evaluator: Evaluator, plan) -> dict | None:
    """Run the GGUF in llama.cpp on one window; compare its next-token choices with the in-memory plan."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install -e '.[llama]')"}
    import torch
    from llama_cpp import Llama

    ids = evaluator.reference.windows[0].tolist()
    llm = Llama(model_path=str(report.path), n_ctx=len(ids) + 8, logits_all=True, verbose=False, seed=0)
    llm.eval(ids)
    ll = np.array(llm.scores[: len(ids)], dtype=np.float32)
    m = evaluator.compressed(plan)
    with torch.inference_mode():
        hf = m(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    agree = float((ll.argmax(-1) == hf.argmax(-1)).mean())
    rel = float(np.median(np.abs(ll - hf).max(-1) / np.abs(hf).max(-1)))
    return {"tokens": len(ids), "top1_agreement_llama_vs_moeplan": agree, "median_rel_max_logit_diff": rel}


def _print_table(rows, llama_check, seconds, out) -> None:
    head = f"{'method':<18}{'MB':>8}{'bits/w':>8}{'pred KL':>10}{'meas KL':>10}{'KL p99':>9}{'top-1':>8}{'ppl':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:<18}{r['weight_bytes'] / 1e6:>8.2f}{r['bits_per_weight']:>8.2f}{r['predicted_kld']:>10.4f}"
              f"{r['measured_kld']:>10.4f}{r['kld_p99']:>9.3f}{r['top1_agreement']:>8.3f}{r['perplexity']:>9.2f}")
    if llama_check:
        if "skipped" in llama_check:
            print(f"llama.cpp check skipped: {llama_check['skipped']}")
        else:
            print(f"llama.cpp runs the GGUF: next-token agreement with moeplan's evaluation of the same plan "
                  f"{llama_check['top1_agreement_llama_vs_moeplan']:.3f} over {llama_check['tokens']} tokens")
    print(f"wrote plan.json, llama-quantize-args.txt, model.gguf, pareto.csv, pareto.png, summary.json to {out}/ "
          f"in {seconds:.0f} s")


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=DEFAULT_MODEL, help="shipped reference model or checkpoint (default: %(default)s)")
    ap.add_argument("--out", default="moeplan-demo", help="output folder (default: %(default)s)")
    ap.add_argument("--fraction", type=float, default=0.20,
                    help="weight budget as a fraction of the BF16 size (default: %(default)s)")
    ap.add_argument("--context", type=int, default=256, help="context the KV cache must hold (default: %(default)s)")
    ap.add_argument("--reprofile", action="store_true", help="measure the profile instead of using the shipped one")
    ap.add_argument("--no-gguf", action="store_true", help="skip writing the GGUF file")


def _run(args) -> int:
    run_demo(args.model, args.out, args.fraction, args.context, args.reprofile, write_gguf=not args.no_gguf)
    return 0


COMMAND = Command("demo", "the whole pipeline on the bundled reference model", _args, _run)
