"""moeplan's GGUF files against llama.cpp's llama-quantize at identical tensor types, by llama.cpp's KLD.

For each bundled model (tiny-deepseek-v3, tiny-qwen3-moe) and each weight budget (15%, 25%, 40% of
the BF16 weight size):

1. a quantization-only gguf-target plan (no expert pruning, original top-k: allocator.cli.pareto's
   quantization-only ablation) solved with the model's shipped profile and its own format menu;
2. the plan written twice: by `moeplan materialize MODEL plan.json --gguf` (moeplan's kernels) and by
   llama-quantize from llama.cpp's F32 GGUF (convert_hf_to_gguf.py) with the plan's
   `llama_quantize_args()` (one --tensor-type per tensor; --pure); both with the same importance,
   llama-imatrix's on the model's calib.txt (moeplan reads it with --importance IMATRIX); the two
   files must hold the same tensors with identical types, shapes and byte sizes (checked with
   gguf-py's GGUFReader; a mismatch stops the run); and a third time, unless --no-refine, by
   `moeplan materialize --refine` (the same, with the routed experts' IQ1_S / IQ2_XXS matrices refined for the
   grams of their inputs on calib.txt, kernels/refine.py): the same types and bytes again (checked);
3. each file scored by llama-perplexity against the F32 model on valid.txt: --kl-divergence-base
   once, then --kl-divergence per file (mean KLD, PPL of the quantized model, "Same top p");
   The uncertainty of the ratio: valid.txt is also cut into --pieces consecutive parts (at line
   ends), each scored alone (its own F32 base); the spread of the pieces' ratios over sqrt(pieces)
   is the ratio's standard error (both files are scored on the same tokens, so it is a paired one);
4. the diagnostic: per routed-expert matrix (one expert of a stacked blk.L.ffn_*_exps tensor), the
   gain <w, w_hat> / <w, w> and the RMSE of each file's dequantized weights (gguf-py's dequantize)
   against the F32 file's weights.

Writes results/vs-llama-quantize.md, results/vs-llama-quantize.csv and
results/vs-llama-quantize-experts.csv (one row per expert matrix and file). The F32 GGUF, the imatrix
and the KLD base of a model already in --out-dir are reused (delete the folder for a cold run). llama.cpp's tools come
from benchmarks/llama_tools.py (built on first use into its cache). Repacking is off in every
llama.cpp run (-nr): this build crashes on quantized files on CPUs with AMX otherwise.

    python benchmarks/bench_vs_llama_quantize.py                     # both models, 15/25/40%
    python benchmarks/bench_vs_llama_quantize.py --models tiny-qwen3-moe --shares 0.25 --out-dir build/vs
"""

from __future__ import annotations

import argparse
import csv
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_tools import NO_REPACK, LlamaTools, build_llama_tools, convert_hf_to_gguf  # noqa: E402
from machine_info import logical_cpus  # noqa: E402
from moeplan.kernels.outputs import output_file, write_text  # noqa: E402

MODELS = ("tiny-deepseek-v3", "tiny-qwen3-moe")
SHARES = (0.15, 0.25, 0.40)
MOEPLAN = [sys.executable, "-c", "import sys; from moeplan.allocator.cli import main; sys.exit(main())"]  # `moeplan`


def _say(msg: str) -> None:
    print(f"[vs-llama-quantize] {msg}", file=sys.stderr, flush=True)


def _run(cmd, log: Path | None = None, env=None) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    out = r.stdout + r.stderr
    if log is not None:
        log.write_text(" ".join(shlex.quote(str(c)) for c in cmd) + "\n\n" + out)
    if r.returncode != 0:
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed ({r.returncode}):\n{out[-4000:]}")
    return out


# ---------------------------------------------------------------------------------------------
# plans

def quant_only_plan(model_dir: Path, share: float):
    """The quantization-only gguf plan at `share` x the BF16 weight size (allocator.cli.pareto's ablation),
    with the shipped profile and its own format menu."""
    from moeplan.allocator.cli.pareto import quantization_only_factory, quantization_only_sweep
    from moeplan.kernels.inventory import build_inventory
    from moeplan.sensitivity.profile import Profile

    inv = build_inventory(model_dir)
    prof = Profile.load(model_dir / "profile.json")
    prof.check_against(inv)
    budget = int(round(share * inv.bytes_uniform("BF16")))
    plans: dict = {}
    df = quantization_only_sweep(quantization_only_factory(inv, prof, "gguf"), [budget], plans)
    if not plans:
        raise RuntimeError(f"{model_dir.name}: no quantization-only plan fits {share:.0%} of BF16 "
                           f"({df.to_dict('records')})")
    (plan,) = plans.values()
    return plan, inv


def types_summary(plan) -> str:
    """Stacked expert types and the other tensors' types, with counts: 'exps IQ2_XXS x6, Q2_K x3; rest Q4_K x9'."""
    def count(vals):
        c: dict[str, int] = {}
        for v in vals:
            c[v] = c.get(v, 0) + 1
        return ", ".join(f"{k} x{n}" for k, n in sorted(c.items(), key=lambda kv: -kv[1]))

    rest = [f for n, f in plan.tensors.items() if ".experts." not in n]
    return f"exps {count(plan.stacked.values())}; rest {count(rest)}"


# ---------------------------------------------------------------------------------------------
# files

def tensor_table(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in r.tensors}


def check_identical_types(a: Path, b: Path) -> None:
    """Same tensors with the same types, shapes and byte sizes in both files, else RuntimeError."""
    ta, tb = tensor_table(a), tensor_table(b)
    problems = [f"only in {a.name}: {n}" for n in sorted(set(ta) - set(tb))]
    problems += [f"only in {b.name}: {n}" for n in sorted(set(tb) - set(ta))]
    problems += [f"{n}: {ta[n]} vs {tb[n]}" for n in sorted(set(ta) & set(tb)) if ta[n] != tb[n]]
    if problems:
        raise RuntimeError(f"{a} and {b} differ in {len(problems)} tensors:\n  " + "\n  ".join(problems[:30]))


def llama_quantize(tools: LlamaTools, plan, f32: Path, imatrix: Path, out: Path, ftype: int, log: Path) -> None:
    args = [l for l in plan.llama_quantize_args().splitlines() if l.strip() and not l.startswith("#")]
    argv = []
    for l in args:
        argv += l.split(" ", 1)
    _run([tools.quantize, "--pure", "--imatrix", imatrix, *argv, f32, out, str(ftype), "2"], log)


def file_type_of(path: Path) -> int:
    import gguf

    r = gguf.GGUFReader(str(path))
    return int(r.fields["general.file_type"].contents()) if "general.file_type" in r.fields else 7


_QUANTIZED_FTYPES = {2, 3, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30}


def moeplan_importance(model_dir: Path, imatrix: Path, work: Path) -> tuple[Path, list[str]]:
    """The importance moeplan quantizes with: llama-imatrix's file when it covers every 2-D weight,
    else (token_embd is a row lookup that llama-imatrix never records, and moeplan's IQ kernels need
    importance) a .safetensors of the imatrix's vectors (kernels.imatrix) plus, for the tensors it
    lacks, the shipped profile's (ones for the embedding). Returns the file and the names filled in."""
    from moeplan.kernels.inventory import build_inventory
    from moeplan.sensitivity.importance import SHIPPED_IMPORTANCE, load_importance, load_importance_file, save_importance

    imp = load_importance_file(imatrix, model_dir)
    shipped = load_importance(model_dir / SHIPPED_IMPORTANCE)
    missing = [t.name for t in build_inventory(model_dir) if t.quantizable and t.name not in imp and t.name in shipped]
    if not missing:
        return imatrix, []
    merged = work / "importance-imatrix+profile.safetensors"
    save_importance({**imp, **{n: shipped[n] for n in missing}}, merged)
    return merged, missing


# ---------------------------------------------------------------------------------------------
# llama-perplexity

def _num(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise RuntimeError(f"llama-perplexity's output has no match for {pattern!r}:\n{text[-3000:]}")
    return float(m.group(1))


def _chunks(chunks: int) -> list:
    """llama-perplexity's chunk option: every chunk of the text for 0."""
    return ["--chunks", chunks] if chunks > 0 else []


def text_pieces(text: Path, pieces: int, work: Path) -> list[Path]:
    """`text` cut into `pieces` consecutive parts of about equal length, at line ends."""
    lines = text.read_text(encoding="utf-8").splitlines(keepends=True)
    total, out, start, acc = sum(len(x) for x in lines), [], 0, 0
    for i, line in enumerate(lines):
        acc += len(line)
        if acc >= total * (len(out) + 1) / pieces or i == len(lines) - 1:
            path = work / f"{text.stem}-piece{len(out) + 1}of{pieces}.txt"
            write_text(path, "".join(lines[start:i + 1]))
            out.append(path)
            start = i + 1
    return out


def ratio_se(ours: list[float], theirs: list[float]) -> float:
    """The standard error of the ratio from the pieces' ratios (their spread over sqrt(pieces))."""
    r = np.asarray(ours) / np.asarray(theirs)
    return float(np.std(r, ddof=1) / np.sqrt(len(r))) if len(r) > 1 else float("nan")


def _perplexity(tools: LlamaTools, args: list, log: Path, last: str) -> str:
    """llama-perplexity's output, run again until it holds `last` (a regex of its final statistics).
    This llama.cpp's logger writes from a thread of its own and does not flush it at exit (llama.cpp
    issue 22142), so a run that succeeded now and then loses its last lines (here up to half the runs
    of some texts, on an idle machine too; ten in a row were seen once). Every run computes the same
    figures; a retry changes none."""
    for attempt in range(30):
        out = _run([tools.perplexity, *args, "-t", "2", *NO_REPACK["llama-perplexity"]], log)
        if re.search(last, out):
            return out
        _say(f"llama-perplexity lost its last lines ({Path(str(args[1])).name}, {Path(str(args[3])).name}); again")
    raise RuntimeError(f"llama-perplexity: no {last!r} in its output after 30 runs; see {log}")


def kld(tools: LlamaTools, model: Path, base: Path, text: Path, ctx: int, chunks: int, log: Path) -> dict:
    out = _perplexity(tools, ["-m", model, "-f", text, "-c", ctx, *_chunks(chunks), "--kl-divergence-base", base,
                              "--kl-divergence"], log, r"Same top p:\s+[-0-9.eE+]+")
    return {"kld": _num(r"Mean\s+KLD:\s+([-0-9.eE+]+)", out),
            "kld_se": _num(r"Mean\s+KLD:\s+[-0-9.eE+]+\s+±\s+([-0-9.eE+]+)", out),
            "kld_p99": _num(r"99\.0%\s+KLD:\s+([-0-9.eE+]+)", out),
            "ppl": _num(r"Mean\s+PPL\(Q\)\s*:\s+([-0-9.eE+]+)", out),
            "same_top_p": _num(r"Same top p:\s+([-0-9.eE+]+)", out)}


# ---------------------------------------------------------------------------------------------
# the diagnostic

def expert_gains(f32: Path, files: dict[str, Path]) -> list[dict]:
    """Per routed-expert matrix and file: gain <w, w_hat>/<w, w> and RMSE of the dequantized weights."""
    import gguf
    from gguf.quants import dequantize

    ref = {t.name: t for t in gguf.GGUFReader(str(f32)).tensors if "_exps." in t.name}
    rows = []
    for label, path in files.items():
        for t in gguf.GGUFReader(str(path)).tensors:
            if t.name not in ref:
                continue
            w = np.asarray(ref[t.name].data, dtype=np.float64)
            wh = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64).reshape(w.shape)
            for e in range(w.shape[0]):
                a, b = w[e].reshape(-1), wh[e].reshape(-1)
                rows.append({"file": label, "tensor": t.name, "expert": e, "type": t.tensor_type.name,
                             "gain": float(a @ b / (a @ a)), "rmse": float(np.sqrt(np.mean((b - a) ** 2))),
                             "rel_rmse": float(np.sqrt(np.mean((b - a) ** 2) / np.mean(a ** 2)))})
    return rows


# ---------------------------------------------------------------------------------------------

def run(models, shares, out_dir: Path, ctx: int, chunks: int, imat_ctx: int, imat_chunks: int,
        pieces: int = 8, refine: bool = True) -> tuple[list, list]:
    tools = build_llama_tools()
    rows, expert_rows = [], []
    for name in models:
        model_dir = ROOT / "sensitivity" / "models" / name
        work = out_dir / name
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        f32 = work / "f32.gguf"
        if not f32.exists():
            convert_hf_to_gguf(tools, model_dir, f32)
        imatrix = work / "imatrix.gguf"
        if not imatrix.exists():
            _run([tools.imatrix, "-m", f32, "-f", model_dir / "calib.txt", "-o", imatrix, "-c", imat_ctx,
                  "--chunks", imat_chunks, "-t", "2", "--process-output", *NO_REPACK["llama-imatrix"]],
                 work / "imatrix.log")
        scoring = f"c{ctx}-{chunks or 'all'}"  # the base holds the F32 logits of these windows only
        base, base_log = work / f"f32-{scoring}.kld", work / f"base-{scoring}.log"
        if not base.exists() or not base_log.exists() or "Final estimate" not in base_log.read_text():
            _perplexity(tools, ["-m", f32, "-f", model_dir / "valid.txt", "-c", ctx, *_chunks(chunks),
                                "--kl-divergence-base", base], base_log, r"Final estimate: PPL")
        piece_bases = []
        for text in (text_pieces(model_dir / "valid.txt", pieces, work) if pieces > 1 else []):
            b = work / f"f32-c{ctx}-{text.stem}.kld"
            if not b.exists():  # only the file is read (complete even when the log loses its last lines)
                _run([tools.perplexity, "-m", f32, "-f", text, "-c", ctx, "-t", "2", *NO_REPACK["llama-perplexity"],
                      "--kl-divergence-base", b], work / f"base-{text.stem}.log")
            piece_bases.append((text, b))
        importance, filled = moeplan_importance(model_dir, imatrix, work)
        base_ppl = _num(r"Final estimate: PPL = ([0-9.]+)", base_log.read_text())
        scored = _num(r"calculating perplexity over (\d+) chunks", base_log.read_text())
        _say(f"{name}: F32 GGUF, imatrix, KLD base ({time.perf_counter() - t0:.0f} s); F32 PPL {base_ppl:.3f}")
        for share in shares:
            t1 = time.perf_counter()
            tag = f"{round(100 * share)}pct"
            plan, inv = quant_only_plan(model_dir, share)
            plan_path = work / f"plan-{tag}.json"
            plan.save(plan_path)
            ours, theirs = work / f"moeplan-{tag}.gguf", work / f"llama-quantize-{tag}.gguf"
            refined = work / f"moeplan-refine-{tag}.gguf"
            _run([*MOEPLAN, "materialize", model_dir, plan_path, "--gguf", ours, "--importance", importance],
                 work / f"materialize-{tag}.log")
            if refine:
                _run([*MOEPLAN, "materialize", model_dir, plan_path, "--gguf", refined, "--importance", importance,
                      "--refine"], work / f"materialize-refine-{tag}.log")
            ft = file_type_of(ours)
            llama_quantize(tools, plan, f32, imatrix, theirs, ft if ft in _QUANTIZED_FTYPES else 7,
                           work / f"quantize-{tag}.log")
            check_identical_types(ours, theirs)
            files = [("moeplan", ours), ("llama-quantize", theirs)]
            if refine:
                check_identical_types(refined, theirs)
                files.append(("moeplan-refine", refined))
            res, by_piece = {}, {}
            for label, path in files:
                res[label] = kld(tools, path, base, model_dir / "valid.txt", ctx, chunks, work / f"kld-{label}-{tag}.log")
                by_piece[label] = [kld(tools, path, b, text, ctx, 0, work / f"kld-{label}-{tag}-{text.stem}.log")["kld"]
                                   for text, b in piece_bases]
            er = expert_gains(f32, {"moeplan": ours, "llama-quantize": theirs})
            for r in er:
                r.update(model=name, share=share)
            expert_rows += er

            def med(label, key="gain"):
                return float(np.median([r[key] for r in er if r["file"] == label]))

            row = {"model": name, "share_of_bf16": share, "budget_bytes": int(round(share * inv.bytes_uniform("BF16"))),
                   "plan_weight_bytes": plan.totals.weight_bytes, "plan_types": types_summary(plan),
                   "predicted_damage": plan.damage.total, "importance_not_from_imatrix": " ".join(filled),
                   "moeplan_bytes": ours.stat().st_size, "llama_quantize_bytes": theirs.stat().st_size,
                   "moeplan_kld": res["moeplan"]["kld"], "llama_quantize_kld": res["llama-quantize"]["kld"],
                   "kld_ratio": res["moeplan"]["kld"] / res["llama-quantize"]["kld"],
                   "kld_ratio_se": ratio_se(by_piece["moeplan"], by_piece["llama-quantize"]),
                   "pieces": len(piece_bases),
                   "moeplan_kld_pieces": " ".join(f"{v:.6f}" for v in by_piece["moeplan"]),
                   "llama_quantize_kld_pieces": " ".join(f"{v:.6f}" for v in by_piece["llama-quantize"]),
                   "moeplan_kld_se": res["moeplan"]["kld_se"], "llama_quantize_kld_se": res["llama-quantize"]["kld_se"],
                   "scored_chunks": int(scored), "ctx": ctx,
                   "moeplan_kld_p99": res["moeplan"]["kld_p99"], "llama_quantize_kld_p99": res["llama-quantize"]["kld_p99"],
                   "moeplan_ppl": res["moeplan"]["ppl"], "llama_quantize_ppl": res["llama-quantize"]["ppl"],
                   "f32_ppl": base_ppl,
                   "moeplan_same_top_p": res["moeplan"]["same_top_p"],
                   "llama_quantize_same_top_p": res["llama-quantize"]["same_top_p"],
                   "moeplan_median_expert_gain": med("moeplan"), "llama_quantize_median_expert_gain": med("llama-quantize"),
                   "moeplan_median_expert_rel_rmse": med("moeplan", "rel_rmse"),
                   "llama_quantize_median_expert_rel_rmse": med("llama-quantize", "rel_rmse")}
            if refine:
                row.update({"refine_kld": res["moeplan-refine"]["kld"], "refine_kld_se": res["moeplan-refine"]["kld_se"],
                            "refine_kld_ratio": res["moeplan-refine"]["kld"] / res["llama-quantize"]["kld"],
                            "refine_kld_ratio_se": ratio_se(by_piece["moeplan-refine"], by_piece["llama-quantize"]),
                            "refine_kld_pieces": " ".join(f"{v:.6f}" for v in by_piece["moeplan-refine"]),
                            "refine_ppl": res["moeplan-refine"]["ppl"],
                            "refine_same_top_p": res["moeplan-refine"]["same_top_p"],
                            "refined_matrices": _num(r"refined\s+(\d+) routed",
                                                     (work / f"materialize-refine-{tag}.log").read_text())})
            rows.append(row)
            _say(f"{name} {share:.0%}: KLD moeplan {row['moeplan_kld']:.5f} vs llama-quantize "
                 f"{row['llama_quantize_kld']:.5f} (x{row['kld_ratio']:.3f} +- {row['kld_ratio_se']:.3f}"
                 + (f"; --refine {row['refine_kld']:.5f}, x{row['refine_kld_ratio']:.3f}" if refine else "")
                 + "); median expert gain "
                 f"{row['moeplan_median_expert_gain']:.4f} vs {row['llama_quantize_median_expert_gain']:.4f} "
                 f"({time.perf_counter() - t1:.0f} s)")
    return rows, expert_rows


def by_type(expert_rows) -> list[dict]:
    """Median gain and relative RMSE per (type, file) over every expert matrix of every run."""
    out = []
    types = sorted({r["type"] for r in expert_rows})
    for t in types:
        row = {"type": t}
        for label in ("moeplan", "llama-quantize"):
            sel = [r for r in expert_rows if r["type"] == t and r["file"] == label]
            row[f"{label} n"] = len(sel)
            row[f"{label} gain"] = float(np.median([r["gain"] for r in sel])) if sel else float("nan")
            row[f"{label} rel_rmse"] = float(np.median([r["rel_rmse"] for r in sel])) if sel else float("nan")
        out.append(row)
    return out


def write(rows, expert_rows, md: Path, csv_path: Path, experts_csv: Path, command: str, wall_s: float,
          ctx: int, chunks: int, imat_ctx: int, imat_chunks: int) -> None:
    import importlib.metadata

    md.parent.mkdir(parents=True, exist_ok=True)
    for path, data in ((csv_path, rows), (experts_csv, expert_rows)):
        with output_file(path, "results") as tmp, open(tmp, "x", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    try:
        llv = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        llv = "?"
    lines = [
        "# moeplan vs llama-quantize at identical tensor types",
        "",
        "**After the kernel fixes**: kernels/csrc/debias.c (each super-block's scale rescaled to importance-weighted "
        "gain 1); IQ4_NL / IQ4_XS rescaled the same way with their grid values chosen again at the rescaled scale "
        "(kernels/csrc/q_iq4.c); the codebook formats' searches weighting each error by importance * "
        "sqrt(2 mean x^2 + x^2) (kernels/csrc/q_iq.c). Before the first, with the least-squares scales "
        "(commit 044344c), moeplan / llama-quantize KLD was "
        "1.97 (tiny-deepseek-v3, 15%), 1.18 (25%), 0.91 (40%); tiny-qwen3-moe 2.03 / 1.61 / 0.95 "
        "(moeplan KLD 0.03355, 0.00324, 0.00044; 0.02268, 0.00145, 0.00014), with median expert gains "
        "0.88 / 0.98 / 0.998 and 0.89 / 0.98 / 0.999.",
        "",
        "Per model and weight budget (share of the BF16 weight size): a quantization-only gguf plan "
        "(no expert pruning, original top-k; the shipped profile and its own format menu), written by "
        "`moeplan materialize --gguf` and by llama.cpp's `llama-quantize --pure` from the F32 GGUF of "
        "`convert_hf_to_gguf.py` with the plan's `--tensor-type` overrides. Both files hold the same tensors with "
        "identical types, shapes and sizes (checked), and both are quantized with the same importance: "
        f"llama-imatrix's on calib.txt (`-c {imat_ctx} --chunks {imat_chunks} --process-output`), which moeplan "
        "reads with kernels.imatrix (`--importance imatrix.gguf`). llama-imatrix never records token_embd (a row "
        "lookup): llama-quantize quantizes it without importance (ggml's own x^2 weighting), moeplan, whose IQ kernels "
        "need importance, with its profile's vector for it (ones), merged with the imatrix's into one .safetensors. "
        "DeepSeek's kv_b_proj: moeplan gives attn_v_b the imatrix's per-head vectors pooled over heads, attn_k_b "
        "ones (its export's rule); llama-quantize uses the per-head vectors of both. KLD: llama-perplexity against the F32 GGUF on valid.txt "
        f"(`-c {ctx}`, {'every one of its' if not chunks else 'the first'} "
        f"{'/'.join(sorted({str(r['scored_chunks']) for r in rows}))} windows, the second half of each scored), "
        "`--kl-divergence-base` once, then `--kl-divergence` per file; repacking off (`-nr`). Ratio = moeplan / "
        "llama-quantize (below 1: moeplan's file is closer to F32).",
        "",
        "KLD: mean over the scored tokens +- its standard error as llama-perplexity gives it. Ratio +- its "
        f"standard error from {', '.join(sorted({str(r['pieces']) for r in rows}))} consecutive pieces of valid.txt "
        "scored alone (each with its own F32 base): the spread of the pieces' ratios over sqrt(pieces), a paired "
        "error, since both files are scored on the same tokens (per-piece KLDs in the csv).",
        "",
    ]
    refined = all("refine_kld" in r for r in rows)
    if refined:
        lines += [
            "`moeplan --refine`: the same plan written by `moeplan materialize --gguf --refine` with the same "
            "importance: the routed experts' IQ1_S and IQ2_XXS matrices are refined for the whole gram of their inputs "
            "(kernels/refine.py; grams of the float model's expert inputs on calib.txt, its first 65,536 tokens, "
            "sensitivity/grams.py), not only its diagonal. Same types, shapes and bytes as the other two (checked). "
            "It uses more of the calibration text than an importance vector holds: the identical-importance "
            "comparison is the `moeplan` column; `--refine` is what a user of moeplan gets from the same calib.txt.",
            "",
        ]
    lines += [
        "| model | share of BF16 | plan types | moeplan bytes | llama-quantize bytes | moeplan KLD | llama-quantize KLD "
        "| ratio | " + ("moeplan --refine KLD (matrices refined) | ratio --refine | " if refined else "")
        + "moeplan same top-1 | llama-quantize same top-1 | moeplan median expert gain | llama-quantize median expert gain |",
        "|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if refined else "") + "---:|---:|---:|---:|",
    ]
    for r in rows:
        extra = (f"{r['refine_kld']:.6f} +- {r['refine_kld_se']:.6f} ({int(r['refined_matrices'])}) | "
                 f"{r['refine_kld_ratio']:.3f} +- {r['refine_kld_ratio_se']:.3f} | ") if refined else ""
        lines.append(f"| {r['model']} | {100 * r['share_of_bf16']:.0f}% | {r['plan_types']} | {r['moeplan_bytes']:,} | "
                     f"{r['llama_quantize_bytes']:,} | {r['moeplan_kld']:.6f} +- {r['moeplan_kld_se']:.6f} | "
                     f"{r['llama_quantize_kld']:.6f} +- {r['llama_quantize_kld_se']:.6f} | "
                     f"{r['kld_ratio']:.3f} +- {r['kld_ratio_se']:.3f} | {extra}{r['moeplan_same_top_p']:.2f}% | "
                     f"{r['llama_quantize_same_top_p']:.2f}% | "
                     f"{r['moeplan_median_expert_gain']:.4f} | {r['llama_quantize_median_expert_gain']:.4f} |")
    lines += ["", "PPL (F32 / moeplan / llama-quantize" + (" / moeplan --refine" if refined else "") + "): " + "; ".join(
        f"{r['model']} {100 * r['share_of_bf16']:.0f}% {r['f32_ppl']:.3f} / {r['moeplan_ppl']:.3f} / {r['llama_quantize_ppl']:.3f}"
        + (f" / {r['refine_ppl']:.3f}" if refined else "") for r in rows), ""]
    lines += ["## Diagnostic: gain and RMSE of the routed-expert matrices", "",
              "Per expert matrix (one expert of a stacked `blk.L.ffn_*_exps` tensor), dequantized with gguf-py: "
              "gain = <w, w_hat> / <w, w> against the F32 weights (1 is unbiased; below 1, the quantized weights are "
              "shrunk) and RMSE / RMS(w). Medians over every expert matrix of every run above, by stored type "
              "(n: matrices). Per matrix: results/vs-llama-quantize-experts.csv.", "",
              "| type | n | moeplan median gain | llama-quantize median gain | moeplan median RMSE/RMS | llama-quantize median RMSE/RMS |",
              "|---|---:|---:|---:|---:|---:|"]
    for t in by_type(expert_rows):
        lines.append(f"| {t['type']} | {t['moeplan n']} | {t['moeplan gain']:.4f} | {t['llama-quantize gain']:.4f} | "
                     f"{t['moeplan rel_rmse']:.4f} | {t['llama-quantize rel_rmse']:.4f} |")
    lines += ["", f"Made by `{command}` in {wall_s / 60:.1f} min (llama.cpp tools built from the llama-cpp-python "
              f"{llv} sdist by benchmarks/llama_tools.py; the build not counted).", "",
              f"Machine: {logical_cpus()}.", "",
              "The kernel variants tried against this benchmark, with their KLDs, are in "
              "[vs-llama-quantize-variants.md](vs-llama-quantize-variants.md).", ""]
    write_text(md, "\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--shares", default=",".join(str(s) for s in SHARES), help="weight budgets, shares of BF16")
    ap.add_argument("--out-dir", default=str(ROOT / "build" / "vs-llama-quantize"), help="work files (GGUFs, logs)")
    ap.add_argument("--results", default=str(ROOT / "results"), help="where the md and csv go")
    ap.add_argument("--ctx", type=int, default=256, help="llama-perplexity context (default 256)")
    ap.add_argument("--chunks", type=int, default=0,
                    help="llama-perplexity chunks of valid.txt (default 0: all of it, the most precise KLD)")
    ap.add_argument("--pieces", type=int, default=8,
                    help="pieces of valid.txt scored alone for the ratio's standard error (default 8; 1: none)")
    ap.add_argument("--no-refine", action="store_true",
                    help="skip the third file, `moeplan materialize --refine` (grams of the experts' inputs on calib.txt)")
    ap.add_argument("--imatrix-ctx", type=int, default=128)
    ap.add_argument("--imatrix-chunks", type=int, default=64)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    shares = [float(s) for s in a.shares.split(",") if s.strip()]
    rows, expert_rows = run(models, shares, Path(a.out_dir), a.ctx, a.chunks, a.imatrix_ctx, a.imatrix_chunks,
                            a.pieces, not a.no_refine)
    res = Path(a.results)
    command = "python benchmarks/bench_vs_llama_quantize.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                                " " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])))
    write(rows, expert_rows, res / "vs-llama-quantize.md", res / "vs-llama-quantize.csv",
          res / "vs-llama-quantize-experts.csv", command, time.perf_counter() - t0, a.ctx, a.chunks,
          a.imatrix_ctx, a.imatrix_chunks)
    _say(f"wrote {res / 'vs-llama-quantize.md'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
