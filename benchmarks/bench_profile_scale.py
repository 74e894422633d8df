"""The layer-streaming profiler at growing checkpoint sizes: speed, peak memory, forward work.

Generated checkpoints (random weights with the shapes of real MoE layers: Qwen3-MoE-like, hidden
2048, 64 experts of width 512, top-8; and one DeepSeek-V3-like in FP8 e4m3 with 128 x 128 block
scales) of about 0.5, 1, 2 and 4 GB in BF16 (1, 2, 5 and 10 decoder layers) are profiled by
`moeplan profile` in a subprocess each, which reports its own peak RSS (getrusage), wall time and
the profile's full-pass equivalents and time per part. Then, per checkpoint, the error-kernel sweep
over the default 13-format menu on one thread, as the profiler runs it (rows sampled to a stated
standard error), and, on a DeepSeek-V3 miniature (its 61 layers and 256 experts, widths / 32), the
profiler's forward-work accounting of DeepSeek-V3's structure.

    python benchmarks/bench_profile_scale.py [--sizes 0.5,1,2,4] [--tokens 512] [--formats Q4_K,Q8_0]
        [--fp8] [--work DIR] [--miniature-tokens 0]

With --work, the checkpoints and each finished measurement are kept there and reused by the next run
with the same settings (so the tables can be written again without measuring again).

Writes results/profile-scale.csv and results/profile-scale.md (the goals of the measurement, and a
projection of a DeepSeek-V3 profile from the measured per-layer costs). Random weights: the damages
mean nothing; the figures are about speed and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"

QWEN_LIKE = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128, "moe_intermediate_size": 512,
    "intermediate_size": 6144, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 4096, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
}
LAYERS = {0.5: 1, 1: 2, 2: 5, 4: 10}

_PROBE = r"""
import json, resource, sys, time
t = time.perf_counter()
from moeplan.sensitivity.profiler import profile_model
prof = profile_model(sys.argv[1], out=sys.argv[2], formats=sys.argv[3].split(","), max_tokens=int(sys.argv[4]),
                     seq_len=128, progress=False, removal=sys.argv[5])
print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "meta": {k: prof.meta[k] for k in ("full_pass_equivalents", "seconds", "removal", "threads",
                                                     "error_sampling", "stream_windows")}}))
"""

# The error-kernel sweep over the default menu, as the profiler runs it (one call per tensor, a layer's
# routed experts stacked per kind, rows sampled to a 5% relative standard error), on one thread; and, on
# the first stack of routed experts (8 experts), every row too: the exact figure and its speed.
_SWEEP = r"""
import json, re, sys, time, zlib
import numpy as np
from moeplan import kernels
from moeplan.kernels import formats as fmts
from moeplan.kernels.checkpoint import Checkpoint, read_json
from moeplan.kernels.inventory import Role, build_inventory
from moeplan.sensitivity.costs import menu
from moeplan.sensitivity.layerwise import ERROR_ROWS, ERROR_TARGET_RSE
d = sys.argv[1]
inv = build_inventory(d)
ck = Checkpoint(__import__("pathlib").Path(d), read_json(d + "/config.json"))
groups = {}
for t in inv:
    if t.layer is None or len(t.shape) != 2 or not t.quantizable:
        continue
    key = re.sub(r"\.experts\.\d+\.", ".experts.*.", t.name) if t.role is Role.ROUTED_EXPERT else t.name
    groups.setdefault(key, []).append(t.name)
rng = np.random.default_rng(0)
bf16 = secs = 0.0
rows = measured = 0
worst = 0.0
exact = None
for key, names in groups.items():
    x = np.stack([ck.read(n).float().numpy() for n in names])
    imp = rng.uniform(0.5, 2.0, (x.shape[0], x.shape[-1])).astype(np.float32)
    uniq = sorted({fmts.resolve(f, x.shape[-1]).name for f in menu(None)})
    t0 = time.perf_counter()
    qe = kernels.sampled_quant_error(x, uniq, imp, rows=ERROR_ROWS, target_rse=ERROR_TARGET_RSE,
                                     seed=zlib.crc32(key.encode()), threads=1)
    secs += time.perf_counter() - t0
    bf16 += x.size * 2
    rows += qe.rows * x.shape[0]
    measured += qe.sampled * x.shape[0]
    worst = max(worst, float(qe.relative_se().max(initial=0.0)))
    if exact is None and len(names) > 1:
        sub = np.ascontiguousarray(x[:8])
        t0 = time.perf_counter()
        full = kernels.quant_error(sub, uniq, imp[:8], threads=1)
        t_full = time.perf_counter() - t0
        err = np.abs(qe.err[:, :8] / np.where(full.err > 0, full.err, 1) - 1)[full.err > 0]
        exact = {"tensor": key, "every_row_mb_per_s_per_core": round(sub.size * 2 / 1e6 / t_full, 3),
                 "max_relative_error_vs_every_row": round(float(err.max()), 5),
                 "median_relative_error_vs_every_row": round(float(np.median(err)), 5)}
print(json.dumps({"formats": len(menu(None)), "bf16_bytes": bf16, "seconds": secs,
                  "mb_per_s_per_core": bf16 / 1e6 / secs, "share_of_rows_measured": measured / rows,
                  "max_relative_se": worst, "exact_check": exact}))
"""


def _deepseek_like() -> dict:
    cfg = json.loads((ROOT / "sensitivity/models/tiny-deepseek-v3/config.json").read_text())
    cfg.update(hidden_size=2048, moe_intermediate_size=512, intermediate_size=4096, n_routed_experts=64,
               num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=1, num_attention_heads=16,
               num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
               qk_head_dim=96, head_dim=32, v_head_dim=64, vocab_size=4096)  # head_dim: the rotary part
    return cfg


def run(sizes: list[float], tokens: int, formats: str, fp8: bool, work: Path, removal: str) -> list[dict]:
    from moeplan.sensitivity.factory.generated import write_random_checkpoint
    from moeplan.kernels.inventory import build_inventory

    rows = []
    cases = [("qwen3-moe-like", QWEN_LIKE, LAYERS[s], "BF16") for s in sizes]
    if fp8:
        cases.append(("deepseek-v3-like", _deepseek_like(), 3, "F8_E4M3"))
    for family, base, layers, dtype in cases:
        d = work / f"{family}-{layers}L-{dtype}"
        if not d.exists():
            write_random_checkpoint(d, {**base, "num_hidden_layers": layers}, dtype=dtype)
        inv = build_inventory(d)
        bf16 = inv.bytes_uniform("BF16")
        disk = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        done = work / f"{d.name}-{tokens}-tokens-{formats}-{removal}.result.json"  # a row from an earlier run
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        out = work / f"{d.name}.json"
        for stale in (out, out.with_name(out.stem + ".state.safetensors")):
            stale.unlink(missing_ok=True)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _PROBE, str(d), str(out), formats, str(tokens), removal],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{d.name}: profile failed:\n{r.stderr[-3000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        sw = subprocess.run([sys.executable, "-c", _SWEEP, str(d)], capture_output=True, text=True)
        if sw.returncode != 0:
            sys.exit(f"{d.name}: error-kernel sweep failed:\n{sw.stderr[-3000:]}")
        sweep = json.loads(sw.stdout.strip().splitlines()[-1])
        sec = res["meta"]["seconds"]
        threads = res["meta"]["threads"]
        rows.append({
            "checkpoint": d.name, "dtype": dtype, "layers": layers, "bf16_bytes": bf16, "disk_bytes": disk,
            "wall_s": round(res["wall_s"], 1), "peak_rss": res["peak_rss"],
            "rss_over_bf16": round(res["peak_rss"] / bf16, 3),
            "mb_per_s_per_core": round(bf16 / 1e6 / res["wall_s"] / threads, 3),
            "error_kernel_mb_per_s_per_core": round(bf16 / 1e6 / max(sec.get("error_kernel", 0), 1e-9) / threads, 2),
            "full_pass_equivalents": res["meta"]["full_pass_equivalents"], "removal": res["meta"]["removal"],
            "stream_windows": res["meta"]["stream_windows"],
            "sweep_mb_per_s_per_core": round(sweep["mb_per_s_per_core"], 2),
            "sweep_share_of_rows": round(sweep["share_of_rows_measured"], 4),
            "sweep_max_relative_se": round(sweep["max_relative_se"], 4),
            "sweep_exact": sweep["exact_check"],
            "threads": threads, "seconds": sec, "subprocess_s": round(time.perf_counter() - t, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
        out.unlink(missing_ok=True)
        done.write_text(json.dumps(rows[-1]))
    return rows


def _dsv3_miniature() -> dict:
    """DeepSeek-V3's structure (61 layers, the first 3 dense, 256 routed experts of which 8 per token in 8
    groups, a shared expert, MLA) with every width divided by 32, so that each part of a layer keeps its
    share of the multiply-adds: the profiler's forward-work accounting of DeepSeek-V3 itself, measured by
    running it (full-pass equivalents depend on the structure, not on the widths)."""
    cfg = json.loads((ROOT / "sensitivity/models/tiny-deepseek-v3/config.json").read_text())
    cfg.update(num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256, num_experts_per_tok=8, n_group=8,
               topk_group=4, n_shared_experts=1, hidden_size=7168 // 32, intermediate_size=18432 // 32,
               moe_intermediate_size=2048 // 32, q_lora_rank=1536 // 32, kv_lora_rank=512 // 32,
               num_attention_heads=128 // 32, num_key_value_heads=128 // 32, qk_nope_head_dim=128,
               qk_rope_head_dim=64, qk_head_dim=192, head_dim=64, v_head_dim=128, vocab_size=4096)
    return cfg


_MINIATURE_PROBE = r"""
import json, sys
from moeplan.sensitivity.profiler import profile_model
prof = profile_model(sys.argv[1], formats=None, max_tokens=int(sys.argv[2]), seq_len=128, progress=False,
                     removal="fisher")
print(json.dumps({k: prof.meta[k] for k in ("full_pass_equivalents", "stream_windows", "seconds")}
                 | {"formats": len(prof.formats)}))
"""


def miniature(work: Path, tokens: int) -> dict:
    from moeplan.sensitivity.factory.generated import write_random_checkpoint

    d = work / "deepseek-v3-miniature"
    cached = work / f"{d.name}-{tokens}-tokens.json"  # its accounting, from an earlier run in this --work
    if cached.exists():
        return json.loads(cached.read_text())
    if not d.exists():
        write_random_checkpoint(d, _dsv3_miniature(), dtype="BF16")
    r = subprocess.run([sys.executable, "-c", _MINIATURE_PROBE, str(d), str(tokens)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{d.name}: profile failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1]) | {"tokens": tokens, "layers": 61}
    print(json.dumps(out), flush=True)
    cached.write_text(json.dumps(out))
    return out


def write_results(rows: list[dict], cmd: str, tokens: int, formats: str, mini: dict | None) -> None:
    import numpy as np
    import pandas as pd

    RESULTS.mkdir(exist_ok=True)
    flat = [{k: v for k, v in r.items() if k not in ("seconds", "sweep_exact")}
            | {f"s_{k}": v for k, v in r["seconds"].items()} for r in rows]
    pd.DataFrame(flat).to_csv(RESULTS / "profile-scale.csv", index=False)
    n_fmt = len(formats.split(","))
    lines = ["# The layer-streaming profiler at growing checkpoint sizes", "",
             f"Command: `{cmd}`. Machine: {os.cpu_count()} cores ({platform.machine()}), load average at the end "
             f"{os.getloadavg()[0]:.2f} (other jobs on the machine slow the timings). Calibration: {tokens} tokens "
             f"(windows of 128); the gain and joint-correction streams on a quarter of the windows (the default "
             f"stream share); menu {formats} plus the profiler's calibration and stream formats (IQ2_XXS, Q4_K, "
             "Q3_K); removal by the Fisher metric. Random weights: speed and memory only. Each profile runs in a "
             "subprocess that reports its own peak RSS (getrusage).", "",
             "| checkpoint | dtype | layers | BF16 size (GB) | on disk (GB) | wall (s) | peak RSS (GB) | RSS / BF16 | "
             f"MB/s/core (BF16, whole profile) | full-pass equivalents | 2L + F (F = {n_fmt}) | error-kernel sweep, "
             "default menu: MB/s/core | rows measured | max relative SE |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {r['dtype']} | {r['layers']} | {r['bf16_bytes'] / 1e9:.2f} | "
                     f"{r['disk_bytes'] / 1e9:.2f} | {r['wall_s']:.0f} | {r['peak_rss'] / 1e9:.2f} | "
                     f"{r['rss_over_bf16']:.2f} | {r['mb_per_s_per_core']:.2f} | {r['full_pass_equivalents']} | "
                     f"{2 * r['layers'] + n_fmt} | {r['sweep_mb_per_s_per_core']:.1f} | "
                     f"{r['sweep_share_of_rows']:.1%} | {r['sweep_max_relative_se']:.1%} |")
    lines += ["", "The error-kernel sweep: every quantizable tensor of the checkpoint's decoder layers, each "
              "layer's routed experts stacked per kind, against the 13 formats of the default menu, on one thread "
              "(`kernels.sampled_quant_error` as the profiler calls it: 64 rows of a matrix, the sample doubled "
              "until every estimate's relative standard error is at most 5%, every row of a matrix whose sample "
              "would be a quarter of it). Against every row, on 8 experts of the first stack:", ""]
    for r in rows:
        e = r.get("sweep_exact")
        if e:
            lines.append(f"- {r['checkpoint']}: {e['tensor']}: every row {e['every_row_mb_per_s_per_core']} "
                         f"MB/s/core; the sampled estimate's relative error: median "
                         f"{e['median_relative_error_vs_every_row']:.2%}, max {e['max_relative_error_vs_every_row']:.2%}")
    lines += ["", "Time per part (s):", ""]
    for r in rows:
        lines.append(f"- {r['checkpoint']}: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()))
    bf = sorted((r for r in rows if r["dtype"] == "BF16"), key=lambda r: r["layers"])
    lines += ["", "## Goals", ""]
    if len(bf) >= 2:
        rss = [r["peak_rss"] for r in bf]
        lines.append(f"- Peak RSS across the BF16 sizes: {min(rss) / 1e9:.2f} to {max(rss) / 1e9:.2f} GB, max / min "
                     f"{max(rss) / min(rss):.2f} (goal: flat within 20%).")
        big = [r for r in bf if r["bf16_bytes"] >= 1.9e9]
        if big:
            lines.append("- Peak RSS over the BF16 size from 2 GB on: " + ", ".join(
                f"{r['rss_over_bf16']:.2f} ({r['checkpoint']})" for r in big) + " (goal: below 1).")
        x = np.array([r["bf16_bytes"] / 1e9 for r in bf])
        y = np.array([r["wall_s"] for r in bf])
        slope, icpt = np.polyfit(x, y, 1)
        resid = y - (slope * x + icpt)
        r2 = 1 - (resid ** 2).sum() / ((y - y.mean()) ** 2).sum()
        lines.append(f"- Wall time against the BF16 size: {slope:.0f} s per GB + {icpt:.0f} s, R^2 = {r2:.3f} "
                     "(goal: linear).")
    sw = [r["sweep_mb_per_s_per_core"] for r in rows]
    lines.append(f"- Error-kernel sweep over the default menu: {min(sw):.1f} to {max(sw):.1f} MB/s of BF16 weights "
                 "per core (goal: at least 10).")
    fpe = [f"{r['full_pass_equivalents']} at L = {r['layers']} (2L + F = {2 * r['layers'] + n_fmt})" for r in rows]
    lines.append("- Forward work, full-pass equivalents: " + "; ".join(fpe) + ". A few of them do not grow with L "
                 "(the reference pass, the local runs of each tensor group, the Fisher sweep's 1 + 2 x 4 samples), "
                 "so at one to five layers they exceed 2L + F; at DeepSeek-V3's 61 layers see below.")
    if len(bf) >= 2 and not mini:
        xl = np.array([r["layers"] for r in bf], dtype=float)
        yf = np.array([r["full_pass_equivalents"] for r in bf])
        b_l, a_l = np.polyfit(xl, yf, 1)
        share = bf[-1]["stream_windows"] / max(1, tokens // 128)  # windows of 128 tokens
        extra = 2 * (13 - n_fmt) * share  # the joint-correction streams of the 13-format default menu
        lines.append(f"- Projected, not measured: a straight line through the BF16 rows, {a_l:.1f} + {b_l:.2f} L "
                     f"full-pass equivalents, plus 2 x (13 - {n_fmt}) x {share:.2f} for the joint-correction streams "
                     f"of the default menu, gives {a_l + b_l * 61 + extra:.0f} at DeepSeek-V3's 61 layers against "
                     "2L + F = 135 (DeepSeek-V3's layers differ in their parts' shares of the work; "
                     "`--miniature-tokens` measures its own structure's accounting, a run of about two hours on "
                     "two shared cores).")
    if mini:
        bound = 2 * mini["layers"] + mini["formats"]
        lines.append(f"- DeepSeek-V3's own accounting, measured on its miniature (`_dsv3_miniature`: its 61 layers, "
                     f"3 dense, 256 routed experts, top-8 in 8 groups, MLA, every width / 32; {mini['tokens']} tokens, "
                     f"the default {mini['formats']}-format menu, {mini['stream_windows']} of "
                     f"{mini['tokens'] // 128} windows in the streams): **{mini['full_pass_equivalents']} full-pass "
                     f"equivalents** against 2L + F = {bound} (goal: at most that; about 16,500 before the "
                     "layer-streaming profiler).")
    if len(bf) >= 2:
        a, b = bf[0], bf[-1]
        dsv3_gb = 1340.0  # DeepSeek-V3's BF16 weights (671B parameters)
        sweep = float(np.median(sw))
        lines += ["", "## Projection to DeepSeek-V3", ""]
        if r2 >= 0.9:
            per_gb = (b["wall_s"] - a["wall_s"]) / ((b["bf16_bytes"] - a["bf16_bytes"]) / 1e9)
            core_s = per_gb * b["threads"]
            lines += [f"Marginal cost measured here with the menu {formats}: {per_gb:.0f} s per GB of BF16 weights on "
                      f"{b['threads']} threads ({core_s:.0f} core-s per GB), from {a['checkpoint']} to "
                      f"{b['checkpoint']}: on a 64-core CPU server at the same per-core speed, "
                      f"{core_s * dsv3_gb / 64 / 3600:.1f} h for DeepSeek-V3's {dsv3_gb:.0f} GB.", ""]
        else:
            lines += [f"The wall times of this run are not linear in the size (R^2 = {r2:.2f}): other jobs shared the "
                      "two cores, unevenly over the run, so no wall-time projection is made from them; a run on an "
                      "idle machine gives one.", ""]
        lines += [f"- The error-kernel sweep over the default menu, {sweep:.1f} MB/s per core on one thread (a lower "
                  "bound: measured under the same load), takes "
                  f"{dsv3_gb * 1e3 / sweep / 64 / 3600:.1f} h for {dsv3_gb:.0f} GB on 64 cores.",
                  "- The joint correction quantizes every layer once per format of the menu, at the quantize speeds "
                  "of results/kernels.md (the codebook formats dominate); the forward work is the full-pass "
                  "equivalents above, each one pass of the model over the calibration set.",
                  "- On one 8-GPU node the forward work moves to the GPUs; the C kernels stay on the host's cores.", ""]
    (RESULTS / "profile-scale.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5,1,2,4", help="BF16 sizes in GB among 0.5, 1, 2, 4 (default: all)")
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens (default 512)")
    ap.add_argument("--formats", default="Q4_K,Q8_0", help="format menu (default Q4_K,Q8_0)")
    ap.add_argument("--removal", default="fisher", choices=("fisher", "streams", "auto"),
                    help="expert removal method (default fisher: the large-model path)")
    ap.add_argument("--fp8", action="store_true", help="also a DeepSeek-V3-like FP8 checkpoint")
    ap.add_argument("--work", type=Path, help="where the generated checkpoints go (default: a temp dir, removed)")
    ap.add_argument("--miniature-tokens", type=int, default=0,
                    help="calibration tokens for DeepSeek-V3's miniature (its forward-work accounting; 1024: about "
                         "two hours on two shared cores); 0 (default): skip it, project from the BF16 rows")
    args = ap.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    bad = [s for s in sizes if s not in LAYERS]
    if bad:
        sys.exit(f"--sizes: {bad} not among {sorted(LAYERS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="moeplan-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = run(sizes, args.tokens, args.formats, args.fp8, work, args.removal)
        mini = miniature(work, args.miniature_tokens) if args.miniature_tokens else None
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    cmd = "python benchmarks/bench_profile_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(rows, cmd.strip(), args.tokens, args.formats, mini)
    print((RESULTS / "profile-scale.md").read_text())


if __name__ == "__main__":
    main()
