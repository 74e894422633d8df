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

from moeplan.kernels.outputs import output_file, write_text

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


# Single-thread quantize speed of every format the profiler quantizes whole layers to with the default
# menu (the menu, the calibration formats and the stream format), with an importance vector, as the
# profiler calls it: the cost of the quantized copies of a layer (one per format) at DeepSeek-V3 scale.
_QUANT = r"""
import json, time
import numpy as np
from moeplan import kernels
from moeplan.sensitivity.costs import CALIBRATION_FORMATS, menu
from moeplan.sensitivity.layerwise import STREAM_FORMAT
rng = np.random.default_rng(0)
x = rng.standard_normal((256, 2048)).astype(np.float32)
imp = rng.uniform(0.5, 2.0, 2048).astype(np.float32)
out = {}
for f in dict.fromkeys(menu(None) + menu(list(CALIBRATION_FORMATS)) + [STREAM_FORMAT]):
    kernels.quantize(x[:8], f, imp, threads=1)
    n, t0 = 0, time.process_time()  # CPU time: other jobs on the machine do not count
    while n == 0 or time.process_time() - t0 < 0.5:
        kernels.quantize(x, f, imp, threads=1)
        n += 1
    out[f] = x.size * n / (time.process_time() - t0)
print(json.dumps(out))
"""


def quantize_speeds(work: Path) -> dict[str, float]:
    """Weights per second per core of each format's quantizer (cached in --work)."""
    cached = work / "quantize-speeds.json"
    if cached.exists():
        return json.loads(cached.read_text())
    r = subprocess.run([sys.executable, "-c", _QUANT], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"quantize speeds: failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    write_text(cached, json.dumps(out))
    return out


def multiply_adds(cfg: dict) -> dict[str, float]:
    """Multiply-adds per token of a Qwen3-MoE or DeepSeek-V3 config's weight matrices, the decoder layers
    (attention, dense MLPs, routed experts at top-k plus shared experts and the router) and the head
    (the embedding is a lookup). DeepSeek-V3's own config gives 36.6e9 (its 37B activated parameters
    count the embedding too)."""
    h, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    if cfg["model_type"] == "deepseek_v3":
        heads, qk = cfg["num_attention_heads"], cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        q = h * cfg["q_lora_rank"] + cfg["q_lora_rank"] * heads * qk if cfg.get("q_lora_rank") else h * heads * qk
        attn = q + h * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) \
            + cfg["kv_lora_rank"] * heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]) \
            + heads * cfg["v_head_dim"] * h
        dense_layers = cfg.get("first_k_dense_replace", 0)
        moe = (cfg["num_experts_per_tok"] + cfg.get("n_shared_experts", 0)) * 3 * h * cfg["moe_intermediate_size"] \
            + h * cfg["n_routed_experts"]
    else:
        hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
        attn = 2 * h * cfg["num_attention_heads"] * hd + 2 * h * cfg["num_key_value_heads"] * hd
        dense_layers = len(cfg.get("mlp_only_layers") or [])
        moe = cfg["num_experts_per_tok"] * 3 * h * cfg["moe_intermediate_size"] + h * cfg["num_experts"]
    dense = 3 * h * cfg["intermediate_size"]
    layers = n_layers * attn + dense_layers * dense + (n_layers - dense_layers) * moe
    return {"layers": float(layers), "head": float(h * cfg["vocab_size"])}


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
        write_text(done, json.dumps(rows[-1]))
    return rows


def _dsv3_miniature(experts: int = 256, layers: int = 61) -> dict:
    """DeepSeek-V3's structure (61 layers, the first 3 dense, routed experts of which 8 per token in 8
    groups, a shared expert, MLA) with every width divided by 32, so that each part of a layer keeps its
    share of the multiply-adds: the profiler's forward-work accounting of DeepSeek-V3 itself, measured by
    running it. Full-pass equivalents depend on the structure, not on the widths, and hardly on the
    number of routed experts (a part's cost counts the experts a token runs, top-k of them; the router's
    width is what moves): the bench runs `experts` of them (16 by default, 2 per group; DeepSeek-V3 has
    256) and measures that on 5 layers with 16 and with 64 experts."""
    cfg = json.loads((ROOT / "sensitivity/models/tiny-deepseek-v3/config.json").read_text())
    cfg.update(num_hidden_layers=layers, first_k_dense_replace=3, n_routed_experts=experts, num_experts_per_tok=8,
               n_group=8,
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


def _miniature_run(work: Path, tokens: int, experts: int, layers: int) -> dict:
    from moeplan.sensitivity.factory.generated import write_random_checkpoint

    d = work / f"deepseek-v3-miniature-{layers}L-{experts}E"
    cached = work / f"{d.name}-{tokens}-tokens.json"  # its accounting, from an earlier run in this --work
    if cached.exists():
        return json.loads(cached.read_text())
    if not d.exists():
        write_random_checkpoint(d, _dsv3_miniature(experts, layers), dtype="BF16")
    r = subprocess.run([sys.executable, "-c", _MINIATURE_PROBE, str(d), str(tokens)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{d.name}: profile failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1]) | {"tokens": tokens, "layers": layers, "experts": experts}
    print(json.dumps(out), flush=True)
    write_text(cached, json.dumps(out))
    return out


def miniature(work: Path, tokens: int, experts: int = 16) -> dict:
    """DeepSeek-V3's accounting on its 61-layer miniature, with the check that the number of routed
    experts does not change it (5 layers, 2 of them MoE; `experts` and 4 x `experts` of them)."""
    few, many = (_miniature_run(work, tokens, e, 5) for e in (experts, 4 * experts))
    out = _miniature_run(work, tokens, experts, 61)
    return out | {"check": {f"{e['experts']} experts": e["full_pass_equivalents"] for e in (few, many)}}


def _line_fpe(bf: list[dict], tokens: int, n_fmt: int) -> tuple[float, float, float, float]:
    """DeepSeek-V3's full-pass equivalents from a straight line a + b L through the BF16 rows, plus the
    joint-correction streams of the 13-format default menu that the bench's menu lacks (each on the
    streamed share of the windows): (value at 61 layers, a, b, the stream share)."""
    import numpy as np

    b_l, a_l = np.polyfit(np.array([r["layers"] for r in bf], dtype=float),
                          np.array([r["full_pass_equivalents"] for r in bf]), 1)
    share = bf[-1]["stream_windows"] / max(1, tokens // 128)  # windows of 128 tokens
    return a_l + 61 * b_l + 2 * (13 - n_fmt) * share, a_l, b_l, share


def projection(bf: list[dict], tokens: int, formats: str, speeds: dict[str, float], mini: dict | None,
               sweep: float) -> list[str]:
    """DeepSeek-V3's profile time from this run's measured costs, part by part: the error-kernel sweep
    (MB/s per core), the quantized copies of every layer (one per format, at the measured quantize
    speeds), and the forward work (full-pass equivalents x multiply-adds per pass, at the per-core rate
    the BF16 rows measured)."""
    from moeplan.sensitivity.costs import CALIBRATION_FORMATS, DEFAULT_FORMATS
    from moeplan.sensitivity.layerwise import STREAM_FORMAT

    def per_weight(menu):  # core-seconds per weight to quantize a layer once in each format
        return sum(1.0 / speeds[f] for f in dict.fromkeys([*menu, *CALIBRATION_FORMATS, STREAM_FORMAT]))

    # the forward rate: what a row's wall time leaves after its error kernel and its quantized copies
    rates = []
    for r in bf:
        weights = r["bf16_bytes"] / 2
        quant = weights * per_weight(formats.split(",")) / r["threads"]
        fwd = r["wall_s"] - r["seconds"].get("error_kernel", 0.0) - quant
        macs = multiply_adds({**QWEN_LIKE, "num_hidden_layers": r["layers"]})
        rates.append((r, quant, fwd, r["full_pass_equivalents"] * (macs["layers"] + macs["head"]) * tokens
                      / max(fwd, 1e-9) / r["threads"]))
    rate = rates[-1][3]  # the most layers: the embedding's and the head's fixed share is smallest
    cfg = json.loads((ROOT / "sensitivity/configs/deepseek-v3.json").read_text())
    macs = multiply_adds(cfg)
    n_weights = 671e9
    dsv3_gb = 2 * n_weights / 1e9
    calib = 4096  # the profiler's default --max-tokens
    if mini:
        fpe, fpe_from = mini["full_pass_equivalents"], "measured on the miniature"
    else:
        fpe, fpe_from = round(_line_fpe(bf, tokens, len(formats.split(",")))[0], 1), "projected"
    fwd_macs = fpe * (macs["layers"] + macs["head"]) * calib
    quant_core_s = n_weights * per_weight(DEFAULT_FORMATS)
    sweep_core_s = dsv3_gb * 1e3 / sweep
    out = ["", "## Projection to DeepSeek-V3", "",
           "Part by part, from this run's measurements (the default 13-format menu, the default 4096 calibration "
           f"tokens, 671e9 weights, {macs['layers'] + macs['head']:.3g} multiply-adds per token from DeepSeek-V3's "
           "config: `multiply_adds`):", "",
           f"- Error-kernel sweep: {sweep:.1f} MB/s of BF16 weights per core (above): {sweep_core_s:,.0f} core-s.",
           "- Quantized copies: every layer once per format of the menu, the calibration formats and the stream "
           "format, at the quantize speeds measured here (one thread, CPU time, importance given; Mw/s: " +
           ", ".join(f"{f} {v / 1e6:.1f}" for f, v in speeds.items()) + f"): {quant_core_s:,.0f} core-s.",
           f"- Forward work: {fpe} full-pass equivalents ({fpe_from}) x {calib} tokens x the multiply-adds per "
           f"token = {fwd_macs:.3g} multiply-adds. The BF16 rows' forward rate, what each wall time leaves after "
           "its error kernel and its quantized copies, divided by its full-pass equivalents' multiply-adds "
           "(per core): " + ", ".join(f"{r['checkpoint']} {rt / 1e9:.1f} G/s (forward {fw:.0f} s of "
                                      f"{r['wall_s']:.0f} s, quantized copies {q:.0f} s)" for r, q, fw, rt in rates)
           + f"; the last, {rate / 1e9:.1f} G multiply-adds/s per core (float32, this machine's cores), is used "
           "(the more layers, the smaller the fixed share of the embedding and the head).", ""]
    cpu = {"error sweep": sweep_core_s / 64, "quantized copies": quant_core_s / 64,
           "forward": fwd_macs / rate / 64}
    gpu_rate = 8 * 989e12 / 2 * 0.2  # 8 H100s, BF16 dense peak 989 TFLOP/s, 20% of it assumed
    host = 112  # a DGX H100's two 56-core Xeon 8480C
    gpu = {"error sweep": sweep_core_s / host, "quantized copies": quant_core_s / host,
           "forward": fwd_macs / gpu_rate}
    out += ["| machine | error sweep (h) | quantized copies (h) | forward work (h) | total (h) |",
            "|---|---:|---:|---:|---:|"]
    for name, parts in (("64-core CPU server (this machine's per-core speeds)", cpu),
                        (f"8-GPU node (forward on 8 H100 at an assumed 20% of 989 TFLOP/s BF16; the C kernels on "
                         f"its {host} host cores)", gpu)):
        out.append(f"| {name} | {parts['error sweep'] / 3600:.2f} | {parts['quantized copies'] / 3600:.2f} | "
                   f"{parts['forward'] / 3600:.2f} | {sum(parts.values()) / 3600:.1f} |")
    out += ["", "Not counted: reading the checkpoint (671 GB of FP8 once per profile, each layer's tensors read "
            "back from the page cache after a swap) and the Fisher sweep's backward passes beyond their "
            "full-pass equivalents. On the GPU node the C kernels on the host bound the time; the quantized copies "
            "are the largest part, and they split across workers as the error sweep does "
            "(`moeplan profile --ray`).", ""]
    return out


def write_results(rows: list[dict], cmd: str, tokens: int, formats: str, mini: dict | None,
                  speeds: dict[str, float] | None = None) -> None:
    import numpy as np
    import pandas as pd

    RESULTS.mkdir(exist_ok=True)
    flat = [{k: v for k, v in r.items() if k not in ("seconds", "sweep_exact")}
            | {f"s_{k}": v for k, v in r["seconds"].items()} for r in rows]
    with output_file(RESULTS / "profile-scale.csv", "results") as tmp:
        pd.DataFrame(flat).to_csv(tmp, index=False)
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
        at_61, a_l, b_l, share = _line_fpe(bf, tokens, n_fmt)
        lines.append(f"- Projected, not measured: a straight line through the BF16 rows, {a_l:.1f} + {b_l:.2f} L "
                     f"full-pass equivalents, plus 2 x (13 - {n_fmt}) x {share:.2f} for the joint-correction streams "
                     f"of the default menu, gives {at_61:.0f} at DeepSeek-V3's 61 layers against "
                     "2L + F = 135 (DeepSeek-V3's layers differ in their parts' shares of the work; "
                     "`--miniature-tokens` measures its own structure's accounting).")
    if mini:
        bound = 2 * mini["layers"] + mini["formats"]
        lines.append(f"- DeepSeek-V3's own accounting, measured on its miniature (`_dsv3_miniature`: its 61 layers, "
                     f"3 dense, {mini['experts']} routed experts (DeepSeek-V3: 256; the accounting counts the top-k a "
                     "token runs, not the experts there are; at 5 layers, " + ", ".join(
                         f"{k}: {v}" for k, v in mini["check"].items()) + " full-pass equivalents), top-8 in 8 "
                     f"groups, MLA, every width / 32; {mini['tokens']} tokens, "
                     f"the default {mini['formats']}-format menu, {mini['stream_windows']} of "
                     f"{mini['tokens'] // 128} windows in the streams): **{mini['full_pass_equivalents']} full-pass "
                     f"equivalents** against 2L + F = {bound} (goal: at most that; about 16,500 before the "
                     "layer-streaming profiler).")
    if len(bf) >= 2 and speeds:
        lines += projection(bf, tokens, formats, speeds, mini, float(np.median(sw)))
    write_text(RESULTS / "profile-scale.md", "\n".join(lines) + "\n")


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
                    help="calibration tokens for DeepSeek-V3's miniature (its forward-work accounting; 512: four "
                         "windows, one of them streamed as in a default profile); 0 (default): skip it, project "
                         "from the BF16 rows")
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
        speeds = quantize_speeds(work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    cmd = "python benchmarks/bench_profile_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results(rows, cmd.strip(), args.tokens, args.formats, mini, speeds)
    print((RESULTS / "profile-scale.md").read_text())


if __name__ == "__main__":
    main()
