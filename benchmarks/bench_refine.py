"""Speed of kernels.refine (`moeplan materialize --refine`) and what it gains on its own objective.

For IQ1_S and IQ2_XXS, on matrices of the bundled miniatures' expert shape (256 x 256) and of
DeepSeek-V3's (gate / up: 7168 columns; down: 2048 columns; a slice of rows, since a row's cost does
not depend on the others), with a gram of synthetic inputs that are correlated and share a mean
direction (as normalized hidden states do):

1. the C quantizer's blocks (importance = the gram's diagonal, one thread), timed;
2. `refine` from those blocks (numpy; BLAS with its default threads), timed, best of --repeats;
3. the output error (w - q)^T H (w - q) after / before, and the refined weights per second;
4. DeepSeek-V3's 653.9B routed-expert weights at that speed, in hours of one such process, and the memory its
   grams take per MoE layer (256 experts x (7168^2 + 2048^2) float64s).

Writes results/refine.md and results/refine.csv.

    python benchmarks/bench_refine.py
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import logical_cpus  # noqa: E402
from moeplan import kernels  # noqa: E402
from moeplan.kernels.outputs import output_file, write_text  # noqa: E402
from moeplan.kernels.refine import DAMPING, REFINABLE, refine  # noqa: E402

SHAPES = (("bundled miniatures' experts", 256, 256), ("DeepSeek-V3 gate / up (rows of)", 256, 7168),
          ("DeepSeek-V3 down (rows of)", 256, 2048))
V3_ROUTED = 653.9e9  # routed-expert weights of DeepSeek-V3 (kernels.inventory)
V3_GRAMS_PER_LAYER = 256 * (7168 ** 2 + 2048 ** 2) * 8


def problem(rows: int, cols: int, seed: int):
    """Weights and the gram E[x x^T] of inputs x = s * (A z + e + m): 64 shared factors z, noise e, a
    mean m, column scales s (the expectation, not a sample: DeepSeek-V3's widths would need
    hundreds of thousands of tokens)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    a = rng.standard_normal((64, cols)) / 4
    m = rng.standard_normal(cols)
    s = np.exp(rng.standard_normal(cols) * 0.5)
    gram = (a.T @ a + np.eye(cols) + np.outer(m, m)) * np.outer(s, s)
    return w, gram


def output_error(w, blocks, fmt, gram) -> float:
    r = kernels.dequantize(blocks, fmt).astype(np.float64) - w
    h = gram / np.mean(np.diag(gram)) + DAMPING * np.eye(gram.shape[0])
    return float(np.einsum("ri,ij,rj->", r, h, r))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", default=str(ROOT / "results"))
    a = ap.parse_args(argv)
    rows_out = []
    for fmt in REFINABLE:  # the codebooks' search tables are built on first use: not timed
        kernels.quantize(np.ones((1, 256), np.float32), fmt, np.ones(256, np.float32))
    for fmt in REFINABLE:
        for label, rows, cols in SHAPES:
            w, gram = problem(rows, cols, 0)
            imp = np.diag(gram).astype(np.float32)
            t = time.perf_counter()
            blocks = kernels.quantize(w, fmt, imp, threads=1)
            t_q = time.perf_counter() - t
            best = np.inf
            for _ in range(a.repeats):
                t = time.perf_counter()
                out = refine(blocks, fmt, w, gram)
                best = min(best, time.perf_counter() - t)
            ratio = output_error(w, out, fmt, gram) / output_error(w, blocks, fmt, gram)
            wps = rows * cols / best
            rows_out.append({"format": fmt, "matrix": label, "rows": rows, "cols": cols, "quantize_s": t_q,
                             "refine_s": best, "refined_weights_per_s": wps, "output_error_ratio": ratio,
                             "v3_routed_hours": V3_ROUTED / wps / 3600})
            print(f"{fmt} {label} {rows}x{cols}: refine {best:.2f} s ({wps / 1e3:.0f} k weights/s), "
                  f"output error x{ratio:.3f}", file=sys.stderr)
    res = Path(a.results)
    with output_file(res / "refine.csv", "results") as tmp, open(tmp, "x", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        wr.writeheader()
        wr.writerows(rows_out)
    command = "python benchmarks/bench_refine.py" + ("" if not (argv or sys.argv[1:]) else
                                                     " " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])))
    lines = ["# kernels.refine: speed and gain on its objective", "",
             "`moeplan materialize --refine` refines the routed experts' IQ1_S and IQ2_XXS blocks for the gram of "
             "their inputs (kernels/refine.py). Here on synthetic matrices (weights N(0, 0.02^2); the gram of inputs "
             "with 64 shared factors, a common mean and unequal column scales, its expectation): the C "
             "quantizer's blocks (importance = the gram's diagonal, one thread), then `refine` from them "
             f"(numpy, two passes; BLAS with its default threads; best of {a.repeats}). Output error = "
             "(w - q)^T H (w - q), H the gram (normalized, damped as refine does), after / before. DeepSeek-V3 rows "
             "are a slice of the matrix (each row's cost does not depend on the others). What this gains in "
             "llama.cpp's KL divergence: results/vs-llama-quantize.md.", "",
             "| format | matrix | rows x cols | quantize (s) | refine (s) | refined weights/s | output error after / before "
             "| DeepSeek-V3's routed experts at this speed (hours, one such process) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows_out:
        lines.append(f"| {r['format']} | {r['matrix']} | {r['rows']} x {r['cols']} | {r['quantize_s']:.3f} | "
                     f"{r['refine_s']:.2f} | {r['refined_weights_per_s']:,.0f} | {r['output_error_ratio']:.3f} | "
                     f"{r['v3_routed_hours']:,.0f} |")
    lines += ["", f"The grams of one DeepSeek-V3 MoE layer (256 experts, one 7168^2 and one 2048^2 float64 matrix each) "
              f"take {V3_GRAMS_PER_LAYER / 2**30:.0f} GiB; `--refine` holds every layer's at once and runs the float "
              "model in memory, so it is for models that fit in RAM (README, known limits).", "",
              f"Made by `{command}`. Machine: {logical_cpus()}.", ""]
    write_text(res / "refine.md", "\n".join(lines), "results")
    print(f"wrote {res / 'refine.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
