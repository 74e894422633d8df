"""Measured quality vs size: every plan of a sweep applied to the model and evaluated on held-out text.

`allocator.sweep` predicts the damage of moeplan's plans and of the baselines from the profile.
This module measures it: each plan is applied in memory to a copy of the original model
(`sensitivity.compress.apply_decision`: the dequantized weights a runtime reading the quantized file
computes with, pruned experts removed, top-k set: exactly what `moeplan materialize --hf` writes)
and compared with the original model on the checkpoint's held-out text (`valid.txt`): KL divergence
of the next-token distributions (mean and 99th percentile), perplexity and top-1 agreement.

- `Evaluator` (allocator.cli.evaluation, the command line's one evaluator): the original model, its
  reference log-probabilities (computed once) and the importance vectors; evaluates a Plan (identical
  plans are evaluated once).
- `measure(table, plans, model)`: a sweep's table with the measured columns added, for every row
  that has a plan (`sweep(..., plans=d)` collects them).
- `quantization_only_factory(...)`: moeplan's integer program with pruning and top-k changes taken
  away (the ablation "quantization only"). Problem.build has no switch for that, so the problem is
  built from a copy of the profile in which removing any expert costs REMOVAL_FORBIDDEN nats/token
  (far above any plan's total damage) and the original top-k is the only option; budgets below the
  smallest unpruned plan are reported infeasible, and every plan is checked to prune nothing.
- `pareto_curves(model, fractions)`: the whole comparison on one checkpoint at weight budgets given
  as fractions of its BF16 size: moeplan (target free and gguf), quantization only, the seed paper's
  pipeline, llama.cpp's default mixes and uniform formats, all measured.
- `goal_table(df)`: per budget, moeplan's measured KLD against the best baseline at or below it.
- `plot(df, path)`, `write(df, csv, png)`, `goal_markdown(goal)`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from moeplan.allocator.cli.evaluation import Evaluator
from moeplan.allocator.cli.materialize import materialize
from moeplan.allocator.problem import Assignment, Problem, parse_size
from moeplan.allocator.sweep import PAPER_RATIO, ProblemFactory, save_figure, sweep
from moeplan.kernels import formats as fmts
from moeplan.kernels.inventory import Inventory, Target, build_inventory, resolve_model
from moeplan.kernels.outputs import output_file
from moeplan.sensitivity.profile import Profile

# weight budgets of the default curves: 6% .. 35% of the BF16 size, plus the seed paper's ratio
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(sorted({round(float(x), 4) for x in np.linspace(0.06, 0.35, 11)}
                                                    | {PAPER_RATIO}))
REMOVAL_FORBIDDEN = 1e3  # nats/token: the cost that makes removing an expert never worth it
GOAL_RATIO = 0.7  # moeplan's measured KLD at most this times the best baseline's, at every budget
MEASURED_COLUMNS = ("measured_kld", "kld_p99", "perplexity", "top1_agreement", "eval_tokens", "measure_s")

MOEPLAN_FREE = "moeplan (free)"
MOEPLAN_GGUF = "moeplan (gguf)"
QUANT_ONLY = "quantization only (gguf)"
_FLOAT_FORMATS = {"BF16", "F16", "F32"}


def _say_nothing(msg: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# measuring plans

def measure(table, plans: dict | None = None, model=None, *, evaluator: Evaluator | None = None,
            eval_tokens: int = 4096, eval_text: str | None = None, seq_len: int = 128, importance=None,
            sample: str = "spread", materialize_dir: str | Path | None = None,
            progress: Callable[[str], None] | None = None):
    """`table` with the measured columns (MEASURED_COLUMNS) filled for every row that has a plan.

    `table` is a sweep's DataFrame with `plans` (row index -> Plan, from `sweep(..., plans=d)`), or a
    list of Plans (a table of them is made). The plans are evaluated by `evaluator`, or by a new
    Evaluator of checkpoint `model` (eval_tokens, eval_text, seq_len, importance, sample: see Evaluator).
    With `materialize_dir`, every gguf-target plan is also written there as GGUF (columns gguf_file,
    gguf_bytes). Rows without a plan keep NaN. Returns a new DataFrame."""
    import pandas as pd

    say = progress or _say_nothing
    if isinstance(table, (list, tuple)):
        plans = dict(enumerate(table))
        table = pd.DataFrame([{"method": p.solver.solver, "status": p.solver.status, "target": p.target,
                               "damage": p.damage.total, "weight_bytes": p.totals.weight_bytes,
                               "weight_gb": p.totals.weight_bytes / 1e9, "bits_per_weight": p.totals.bits_per_weight}
                              for p in table])
    if plans is None:
        raise ValueError("measure needs the plans of the table's rows: sweep(..., plans=d) collects them")
    unknown = [i for i in plans if i not in table.index]
    if unknown:
        raise ValueError(f"plans are given for rows {unknown[:5]} that the table does not have")
    if evaluator is None:
        if model is None:
            raise ValueError("measure needs a checkpoint (model=...) or an Evaluator (evaluator=...)")
        say(f"measure: reference logits of the original model on {eval_tokens} held-out tokens ({sample})")
        evaluator = Evaluator(model, eval_tokens=eval_tokens, eval_text=eval_text, seq_len=seq_len,
                              importance=importance, sample=sample)
        say(f"measure: original model perplexity {evaluator.reference_perplexity:.2f} on {evaluator.n_tokens} "
            f"predicted tokens ({evaluator.seconds:.1f} s)")
    out = table.copy()
    for c in MEASURED_COLUMNS:
        out[c] = np.nan
    out["reference_perplexity"] = evaluator.reference_perplexity
    if materialize_dir is not None:
        materialize_dir = Path(materialize_dir)
        materialize_dir.mkdir(parents=True, exist_ok=True)
        out["gguf_file"] = None
        out["gguf_bytes"] = np.nan
    order = [i for i in out.index if i in plans]
    t_all = time.perf_counter()
    for n, i in enumerate(order):
        plan = plans[i]
        t0 = time.perf_counter()
        before = evaluator.evaluations
        r = evaluator(plan)
        dt = time.perf_counter() - t0
        out.loc[i, list(MEASURED_COLUMNS)] = [r.kld_mean, r.kld_p99, r.perplexity, r.top1_agreement, r.n_tokens, dt]
        again = " (same plan as an earlier row)" if evaluator.evaluations == before else ""
        msg = (f"[{n + 1}/{len(order)}] {out.loc[i, 'method']} at {plan.totals.weight_bytes / 1e6:.2f} MB: measured KLD "
               f"{r.kld_mean:.4f} (p99 {r.kld_p99:.3f}), predicted {plan.damage.total:.4f}, top-1 "
               f"{r.top1_agreement:.3f}, ppl {r.perplexity:.2f}, {dt:.1f} s{again}")
        if materialize_dir is not None:
            if plan.target == "gguf":
                f = materialize_dir / f"{n:03d}-{_slug(out.loc[i, 'method'])}-{plan.totals.weight_bytes}.gguf"
                rep = materialize(evaluator.model_dir, plan, gguf_out=f, importance_file=evaluator.importance_file,
                            progress=False)
                out.loc[i, "gguf_file"] = str(f)
                out.loc[i, "gguf_bytes"] = rep.gguf.file_size
                msg += f", wrote {f.name}"
            else:
                msg += ", no GGUF (target free)"
        say(msg)
    out.attrs.update(table.attrs)
    out.attrs.update({"reference_perplexity": evaluator.reference_perplexity, "eval_tokens": evaluator.n_tokens,
                      "measure_s": time.perf_counter() - t_all, "evaluations": evaluator.evaluations})
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()


# ---------------------------------------------------------------------------------------------
# quantization only: moeplan's program without pruning and top-k changes

def quantization_only_profile(profile: Profile, inventory: Inventory) -> Profile:
    """A copy of `profile` in which removing an expert costs REMOVAL_FORBIDDEN and the original top-k
    is the only top-k option (the tensor damages are the profile's own)."""
    k0 = inventory.top_k or 1
    experts = {l: dataclasses.replace(s, removal_kl=[REMOVAL_FORBIDDEN] * s.n_experts)
               for l, s in profile.experts.items()}
    topk = {l: {k0: float(profile.topk_cost.get(l, {}).get(k0, 0.0))} for l in inventory.moe_layers}
    meta = dict(profile.meta)
    meta["variant"] = "quantization only: no expert removal, original top-k"
    return dataclasses.replace(profile, experts=experts, topk_cost=topk, meta=meta)


def quantization_only_factory(inventory: Inventory, profile: Profile, target: Target | str = Target.GGUF,
                              formats: Sequence[str] | str | None = None, context: int = 0,
                              reserve: int | str = 0) -> ProblemFactory:
    """memory -> the quantization-only problem (see quantization_only_profile)."""
    return ProblemFactory(inventory, quantization_only_profile(profile, inventory), target, formats, context, reserve)


def smallest_unpruned(problem: Problem) -> int:
    """Weight bytes of the smallest plan that keeps every expert and the original top-k."""
    item_fmt = (problem.item_bytes.argmin(axis=1) if len(problem.items) else np.zeros(0)).astype(np.int64)
    keep = np.ones((problem.L, problem.E), dtype=bool)
    efmt = np.zeros((problem.L, problem.E, problem.J), dtype=np.int64)
    for li in range(problem.L):
        efmt[li, :, :] = problem.exp_bytes[li].argmin(axis=1)[None, :]
    topk = np.full(problem.L, problem.top_k, dtype=np.int64)
    return problem.evaluate(Assignment(item_fmt, keep, efmt, topk)).weight_bytes


def quantization_only_sweep(factory: ProblemFactory, budgets: Iterable[int | str], plans: dict | None = None,
                            solver: str = "lagrangian", time_limit: float = 60.0, threads: int = 2,
                            progress: Callable[[str], None] | None = None):
    """sweep() of the quantization-only problem: budgets below its smallest unpruned plan are rows
    with status infeasible; every plan is checked to keep every expert and the original top-k."""
    import pandas as pd

    budgets = [parse_size(b) for b in budgets]
    if not budgets:
        raise ValueError("no budgets to sweep")
    floor = smallest_unpruned(factory(max(budgets)))
    fits = [b for b in budgets if factory(b).budget.weights >= floor]
    got: dict = {}
    df = sweep(factory, fits, solver, time_limit, threads, baselines=False, progress=progress, plans=got) if fits \
        else pd.DataFrame()
    k0 = factory.inventory.top_k or 1
    for i, plan in got.items():
        for l in plan.layers:
            if len(l.kept) != l.n_experts or l.top_k != k0:
                raise RuntimeError(f"the quantization-only plan at {df.loc[i, 'memory_bytes']:,} bytes keeps "
                                   f"{len(l.kept)}/{l.n_experts} experts with top-k {l.top_k} in layer {l.layer}: "
                                   "the removal cost did not keep the solver from pruning")
    rows = []
    for b in budgets:
        if b in fits:
            continue
        p = factory(b)
        rows.append({"memory_bytes": b, "weight_budget_bytes": p.budget.weights, "synthetic_profile": bool(p.profile.synthetic),
                     "target": p.target.value, "method": "moeplan", "status": "infeasible",
                     "min_memory_bytes": floor + (b - p.budget.weights)})
    low = pd.DataFrame(rows)
    out, keyed = _concat([(low, {}), (df, got)])
    if plans is not None:
        plans.update(keyed)
    return out


def _concat(parts):
    """Concatenate (DataFrame, plans) pairs, re-keying the plans to the new row index."""
    import pandas as pd

    frames, plans, offset = [], {}, 0
    for df, pl in parts:
        if df is None or len(df) == 0:
            continue
        frames.append(df.reset_index(drop=True))
        plans.update({offset + int(i): p for i, p in pl.items()})
        offset += len(df)
    if not frames:
        return pd.DataFrame(), {}
    return pd.concat(frames, ignore_index=True), plans


# ---------------------------------------------------------------------------------------------
# the whole comparison on one checkpoint

def default_uniform_formats(profile: Profile) -> list[str]:
    """Every quantized format of the profile's menu (not the float ones), smallest first."""
    names = [fmts.get(f).name for f in profile.formats if fmts.get(f).name not in _FLOAT_FORMATS]
    return sorted(names, key=lambda f: fmts.get(f).bits_per_weight)


def pareto_curves(model, fractions: Sequence[float] = DEFAULT_FRACTIONS, *, profile: Profile | str | Path | None = None,
                  eval_tokens: int = 4096, eval_text: str | None = None, seq_len: int = 128, sample: str = "spread",
                  uniform_formats: Sequence[str] | None = None, quant_only: bool = True,
                  targets: Sequence[str] = ("free", "gguf"), solver: str = "lagrangian", time_limit: float = 60.0,
                  threads: int = 2, evaluator: Evaluator | None = None, materialize_dir: str | Path | None = None,
                  progress: Callable[[str], None] | None = None, plans: dict | None = None):
    """Measured KLD vs size on checkpoint `model` at weight budgets `fractions` x its BF16 size.

    Lines: moeplan for each of `targets` ("moeplan (free)", "moeplan (gguf)"), "quantization only
    (gguf)" (with `quant_only`), the seed paper's pipeline at every budget (gguf target), llama.cpp's
    Q2_K / Q3_K_M / Q4_K_M mixes and the uniform formats (default: every quantized format of the
    profile's menu). The profile is the checkpoint's shipped profile.json unless `profile` is given.
    Budgets are weight budgets (no KV cache, no runtime reserve); eval_tokens, eval_text, seq_len and
    sample choose the held-out windows (see Evaluator). Returns one DataFrame (a row per
    plan, measured columns included); df.attrs holds bf16_bytes, model, reference_perplexity,
    eval_tokens and timings; `plans` (a dict), when given, receives row index -> Plan."""
    say = progress or _say_nothing
    t_start = time.perf_counter()
    model_dir = resolve_model(model)
    if not model_dir.is_dir():
        raise ValueError(f"measured curves need a checkpoint with weights; {model_dir} is not a checkpoint directory")
    fractions = [float(f) for f in fractions]
    if not fractions or any(not (0 < f <= 1.5) for f in fractions):
        raise ValueError(f"fractions of the BF16 size must be in (0, 1.5], got {fractions}")
    bad = [t for t in targets if t not in ("free", "gguf")]
    if bad:
        raise ValueError(f"unknown targets {bad}: use free and/or gguf")
    inv = build_inventory(model_dir)
    if profile is None:
        profile = model_dir / "profile.json"
        if not profile.exists():
            raise FileNotFoundError(f"{model_dir} ships no profile.json; run `moeplan profile {model}` or pass profile=")
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    profile.check_against(inv)
    uniform_formats = default_uniform_formats(profile) if uniform_formats is None else list(uniform_formats)
    bf16 = inv.bytes_uniform("BF16")
    budgets = sorted({int(round(f * bf16)) for f in fractions})

    parts = []
    t0 = time.perf_counter()
    for target in ("gguf",) + tuple(t for t in targets if t != "gguf"):
        with_baselines = target == "gguf"
        f = ProblemFactory(inv, profile, target, None, 0, 0)
        got: dict = {}
        say(f"solve: moeplan (target {target}){' and baselines' if with_baselines else ''} at {len(budgets)} budgets")
        df = sweep(f, budgets, solver, time_limit, threads, baselines=with_baselines,
                   uniform_formats=uniform_formats if with_baselines else (), plans=got)
        if target not in targets:  # gguf solved only for its baselines
            drop = df.index[df["method"] == "moeplan"]
            df = df.drop(index=drop)
            got = {i: p for i, p in got.items() if i not in drop}
        df.loc[df["method"] == "moeplan", "method"] = f"moeplan ({target})"
        parts.append((df, got))
    if quant_only:
        got = {}
        say(f"solve: quantization only (target gguf) at {len(budgets)} budgets")
        df = quantization_only_sweep(quantization_only_factory(inv, profile, "gguf"), budgets, got, solver,
                                     time_limit, threads)
        df.loc[df["method"] == "moeplan", "method"] = QUANT_ONLY
        parts.append((df, got))
    table, got = _concat(parts)
    solve_s = time.perf_counter() - t0
    table["model"] = model_dir.name
    table["bf16_bytes"] = bf16
    table["size_fraction"] = table["weight_bytes"] / bf16
    table["budget_fraction"] = table["weight_budget_bytes"] / bf16
    say(f"solve: {len(got)} plans in {solve_s:.1f} s")
    out = measure(table, got, model_dir, evaluator=evaluator, eval_tokens=eval_tokens, eval_text=eval_text,
                  seq_len=seq_len, sample=sample, materialize_dir=materialize_dir, progress=say)
    out.attrs.update({"model": model_dir.name, "bf16_bytes": bf16, "solve_s": solve_s,
                      "wall_s": time.perf_counter() - t_start, "profile_fingerprint": profile.fingerprint,
                      "synthetic_profile": bool(profile.synthetic)})
    if plans is not None:
        plans.update(got)
    return out


# ---------------------------------------------------------------------------------------------
# the goal: moeplan at most GOAL_RATIO x the best baseline at or below every budget

def goal_table(df, ratio: float = GOAL_RATIO, methods: Sequence[str] = (MOEPLAN_FREE, MOEPLAN_GGUF)):
    """One row per budget: each of `methods`' measured KLD, quantization only's, the best baseline
    whose weights fit the budget (lowest measured KLD among the rows with status "baseline" and
    weight_bytes <= the weight budget), and the ratios method / best baseline."""
    import pandas as pd

    need = {"method", "status", "weight_bytes", "weight_budget_bytes", "measured_kld"}
    missing = need - set(df.columns)
    if missing:
        raise ValueError(f"the table has no columns {sorted(missing)}: measure it first (allocator.cli.pareto.measure)")
    base = df[(df["status"] == "baseline") & df["measured_kld"].notna()]
    budgets = sorted(df.loc[df["method"].isin(list(methods) + [QUANT_ONLY]), "weight_budget_bytes"].dropna().unique())
    bf16 = df["bf16_bytes"].dropna().iloc[0] if "bf16_bytes" in df and df["bf16_bytes"].notna().any() else None
    rows = []
    for b in budgets:
        row = {"weight_budget_bytes": int(b), "budget_fraction": b / bf16 if bf16 else np.nan}
        for m in list(methods) + [QUANT_ONLY]:
            hit = df[(df["method"] == m) & (df["weight_budget_bytes"] == b) & df["measured_kld"].notna()]
            row[m] = float(hit["measured_kld"].iloc[0]) if len(hit) else np.nan
        fit = base[base["weight_bytes"] <= b]
        if len(fit):
            best = fit.loc[fit["measured_kld"].idxmin()]
            row.update(best_baseline=best["method"], best_baseline_bytes=int(best["weight_bytes"]),
                       best_baseline_kld=float(best["measured_kld"]))
        else:
            row.update(best_baseline=None, best_baseline_bytes=np.nan, best_baseline_kld=np.nan)
        for m in methods:
            r = row[m] / row["best_baseline_kld"] if row["best_baseline_kld"] > 0 else np.nan
            row[f"ratio {m}"] = r
            row[f"meets {m}"] = bool(r <= ratio) if np.isfinite(r) else None
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["ratio"] = ratio
    return out


def goal_markdown(goal, methods: Sequence[str] = (MOEPLAN_FREE, MOEPLAN_GGUF)) -> str:
    """The goal table as Markdown (ratios within the goal in bold), with a line per method saying
    where the goal is met."""
    ratio = goal.attrs.get("ratio", GOAL_RATIO)
    def kld(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    head = ["budget (% BF16)", "budget (MB)"] + [f"{m} KLD" for m in methods] + [f"{QUANT_ONLY} KLD",
                                                 "best baseline <= budget", "its MB", "its KLD"] + \
           [f"ratio {m}" for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in goal.iterrows():
        cells = [f"{100 * r['budget_fraction']:.1f}", f"{r['weight_budget_bytes'] / 1e6:.2f}"]
        cells += [kld(r[m]) for m in methods] + [kld(r[QUANT_ONLY])]
        if r["best_baseline"] is None or (isinstance(r["best_baseline"], float) and math.isnan(r["best_baseline"])):
            cells += ["none fits", "-", "-"]
        else:
            cells += [str(r["best_baseline"]), f"{r['best_baseline_bytes'] / 1e6:.2f}", kld(r["best_baseline_kld"])]
        for m in methods:
            v = r[f"ratio {m}"]
            cells.append("-" if not np.isfinite(v) else f"**{v:.2f}**" if v <= ratio else f"{v:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    for m in methods:
        judged = goal[goal[f"meets {m}"].notna()]
        met = judged[judged[f"meets {m}"].astype(bool)]
        fails = judged[~judged[f"meets {m}"].astype(bool)]
        where = ", ".join(f"{100 * x:.1f}%" for x in fails["budget_fraction"]) or "none"
        lines.append(f"\n{m}: ratio <= {ratio} at {len(met)} of {len(judged)} budgets that have a baseline "
                     f"at or below them; not met at: {where}.")
    nobase = goal[goal["best_baseline"].isna()]
    if len(nobase):
        lines.append(f"No baseline fits {len(nobase)} budget(s) ("
                     + ", ".join(f"{100 * x:.1f}%" for x in nobase["budget_fraction"]) + " of BF16): not judged.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# plot and files

_STYLE = {
    MOEPLAN_FREE: dict(color="C0", marker="o", ms=4, lw=2),
    MOEPLAN_GGUF: dict(color="C1", marker="o", ms=4, lw=2),
    QUANT_ONLY: dict(color="C2", marker="D", ms=3, lw=1.5, ls="-."),
    "paper pipeline (2509.25689)": dict(color="C3", marker="s", ms=3, lw=1.5, ls="--"),
    "uniform formats": dict(color="C7", marker="x", ms=5, lw=1, ls=":"),
    "llama.cpp mixes": dict(color="C4", marker="^", ms=7, lw=0),
}


def _line_of(method: str) -> str:
    if method.startswith("uniform "):
        return "uniform formats"
    if method.startswith("llama.cpp "):
        return "llama.cpp mixes"
    return method


def plot(df, path: str | Path, bf16_bytes: int | None = None, title: str = "", predicted_panel: bool = True) -> None:
    """Measured KLD (log) vs weight size, a line per method (uniform formats and llama.cpp's mixes
    labelled point by point), the seed paper's size ratio marked; with `predicted_panel`, a second
    panel of predicted vs measured KLD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bf16 = bf16_bytes or (int(df["bf16_bytes"].dropna().iloc[0]) if "bf16_bytes" in df and df["bf16_bytes"].notna().any()
                          else None)
    ok = df[df["measured_kld"].notna() & (df["measured_kld"] > 0)].copy()
    ok["line"] = ok["method"].map(_line_of)
    ok["mb"] = ok["weight_bytes"] / 1e6
    ncols = 2 if predicted_panel else 1
    fig, axes = plt.subplots(1, ncols, figsize=(8 + 5 * (ncols - 1), 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1] if ncols == 2 else [1]})
    ax = axes[0, 0]
    order = {k: n for n, k in enumerate(_STYLE)}
    lines = sorted(ok["line"].unique(), key=lambda k: (order.get(k, len(order)), k))
    for line in lines:
        grp = ok[ok["line"] == line].sort_values("mb")
        st = dict(_STYLE.get(line, dict(marker="o", ms=3, lw=1)))
        ax.plot(grp["mb"], grp["measured_kld"], label=line, **st)
        if line in ("uniform formats", "llama.cpp mixes"):
            for _, r in grp.iterrows():
                ax.annotate(r["method"].split(" ", 1)[1], (r["mb"], r["measured_kld"]), textcoords="offset points",
                            xytext=(3, 4), fontsize=6, color=st.get("color"))
    if bf16:
        x = PAPER_RATIO * bf16 / 1e6
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.annotate(f"seed paper's ratio\n{100 * PAPER_RATIO:.1f}% of BF16", (x, 0.02), xycoords=("data", "axes fraction"),
                    ha="left", va="bottom", fontsize=7, color="gray")
        sec = ax.secondary_xaxis("top", functions=(lambda mb: 100 * mb * 1e6 / bf16, lambda pc: pc * bf16 / 1e8))
        sec.set_xlabel("% of the BF16 size", fontsize=8)
    ax.set_xlabel("weights (MB)")
    ax.set_ylabel("measured KL divergence to the original (nats/token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ntok = df["eval_tokens"].dropna()
    sub = f"measured on {int(ntok.iloc[0])} held-out tokens" if len(ntok) else "measured"
    ax.set_title((title + "\n" if title else "") + sub, fontsize=9)
    if predicted_panel:
        bx = axes[0, 1]
        pr = ok[ok["damage"].notna() & (ok["damage"] > 0)]
        for line in lines:
            grp = pr[pr["line"] == line]
            if not len(grp):
                continue
            st = _STYLE.get(line, {})
            bx.scatter(grp["damage"], grp["measured_kld"], s=14, marker=st.get("marker", "o"), color=st.get("color"),
                       label=line)
        if len(pr):
            lo = float(min(pr["damage"].min(), pr["measured_kld"].min()))
            hi = float(max(pr["damage"].max(), pr["measured_kld"].max()))
            bx.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--", label="measured = predicted")
        bx.set_xscale("log")
        bx.set_yscale("log")
        syn = bool(df["synthetic_profile"].any()) if "synthetic_profile" in df else False
        bx.set_xlabel("predicted damage (nats/token)" + (" -- SYNTHETIC profile" if syn else ""))
        bx.set_ylabel("measured KLD (nats/token)")
        bx.set_title("predicted vs measured", fontsize=9)
        bx.grid(True, which="both", alpha=0.3)
        bx.legend(fontsize=6)
    save_figure(fig, path)


CSV_COLUMNS = ("model", "method", "target", "status", "memory_bytes", "weight_budget_bytes", "budget_fraction",
               "weight_bytes", "size_fraction", "bits_per_weight", "kept_experts", "damage", "damage_quant",
               "damage_prune", "damage_topk", "measured_kld", "kld_p99", "perplexity", "top1_agreement",
               "reference_perplexity", "eval_tokens", "gap", "wall_s", "measure_s")


def write(df, csv_path: str | Path, png_path: str | Path | None = None, bf16_bytes: int | None = None,
          title: str = "") -> None:
    """The table as CSV (the usual columns first) and, with png_path, the plot."""
    cols = [c for c in CSV_COLUMNS if c in df] + [c for c in df.columns if c not in CSV_COLUMNS]
    with output_file(csv_path, "table") as tmp, open(tmp, "x") as f:
        if "synthetic_profile" in df and bool(df["synthetic_profile"].fillna(False).astype(bool).any()):
            f.write("# SYNTHETIC profile: the predicted damage column is generated, not measured; measured_* are measured\n")
        df[cols].to_csv(f, index=False)
    if png_path is not None:
        plot(df, png_path, bf16_bytes, title)
