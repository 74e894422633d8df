"""Benchmark of moeplan's C quantization kernels against ggml's reference figures.

For every format that has a C kernel in this build (kernels.available_formats(), F32 excluded):

1. check before timing: the `gguf` package must decode the kernel's bytes to exactly what the
   kernel's own dequantize returns (gaussian and Student-t rows, with and without importance);
   a format that fails is reported WRONG and not timed;
2. time quantize and dequantize of the size x size gaussian, single-thread (threads=1) and with all
   OpenMP threads, best of a few repeats (time.perf_counter), without importance and with
   importance = ones where the format accepts both;
3. RMSE/std = sqrt(mean((dequant(quant(W)) - W)^2)) / std(W) on the gaussian (each setting) and on
   Student-t(3) data of the same shape (no importance, or ones for formats that need importance);
4. where the `gguf` package has a numpy quantizer for the format, its speed and RMSE (on at most
   1024 rows of the same data: it is slow);
5. compare with ggml's figures (REFERENCE below) and write results/kernels.csv and
   results/kernels.md (atomically).

    python benchmarks/bench_kernels.py                  # 4096 x 4096, as the reference
    python benchmarks/bench_kernels.py --quick          # 1024 x 1024 smoke run (to build/bench_quick/)
    python benchmarks/bench_kernels.py --formats Q4_K,Q6_K
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import io
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
import gguf

from moeplan import kernels
from moeplan.kernels import formats as fmts
from moeplan.kernels.outputs import write_text

# ggml's figures, measured with llama.cpp / ggml (commit
# 0c1e57098bba, one thread, generic x86-64 build, 4096 x 4096 float32 data as generated here).
# mws: million weights quantized per second; rmse: RMSE/std on the gaussian; *_imp: with
# importance = ones; rmse_t3: Student-t(3), no importance. None: not measured ("-" there).
REFERENCE: dict[str, dict[str, float | None]] = {
    "Q2_K": dict(mws=22.1, rmse=0.2966, mws_imp=9.8, rmse_imp=0.2680, rmse_t3=0.349),
    "Q3_K": dict(mws=98.9, rmse=0.1509, mws_imp=32.1, rmse_imp=0.1446, rmse_t3=0.188),
    "Q4_K": dict(mws=20.4, rmse=0.0714, mws_imp=11.9, rmse_imp=0.0707, rmse_t3=0.092),
    "Q5_K": dict(mws=23.8, rmse=0.0361, mws_imp=11.5, rmse_imp=0.0354, rmse_t3=0.047),
    "Q6_K": dict(mws=39.8, rmse=0.0177, mws_imp=39.2, rmse_imp=0.0173, rmse_t3=0.026),
    "Q8_0": dict(mws=367.0, rmse=0.00535, mws_imp=None, rmse_imp=None, rmse_t3=0.0085),
    "IQ4_NL": dict(mws=5.8, rmse=0.0761, mws_imp=6.0, rmse_imp=0.0749, rmse_t3=0.101),
    "IQ4_XS": dict(mws=5.8, rmse=0.0767, mws_imp=5.8, rmse_imp=0.0756, rmse_t3=0.102),
    "IQ3_S": dict(mws=None, rmse=None, mws_imp=3.8, rmse_imp=0.137, rmse_t3=None),
    "IQ3_XXS": dict(mws=None, rmse=None, mws_imp=2.7, rmse_imp=0.182, rmse_t3=None),
    "IQ2_S": dict(mws=None, rmse=None, mws_imp=6.0, rmse_imp=0.249, rmse_t3=None),
    "IQ2_XS": dict(mws=None, rmse=None, mws_imp=2.0, rmse_imp=0.300, rmse_t3=None),
    "IQ2_XXS": dict(mws=None, rmse=None, mws_imp=3.9, rmse_imp=0.344, rmse_t3=None),
    "IQ1_M": dict(mws=None, rmse=None, mws_imp=8.4, rmse_imp=0.451, rmse_t3=None),
    "IQ1_S": dict(mws=None, rmse=None, mws_imp=8.4, rmse_imp=0.485, rmse_t3=None),
}
REFERENCE_SOURCE = "ggml / llama.cpp commit 0c1e57098bba (2026-10-01)"

TIME_BUDGET_S = 1.5  # per measurement: repeat (at most MAX_REPEATS) while the total stays below
MAX_REPEATS = 3
GGUF_PY_ROWS = 1024  # rows the gguf package's numpy quantizer is timed on


@dataclass
class Row:
    format: str
    importance: str  # "none" | "ones"
    bits_per_weight: float
    size: int
    check: str  # "ok" | "WRONG: ..."
    quant_mws_1t: float | None = None
    quant_mws_1t_cpu: float | None = None  # by CPU time of the quantizing thread
    quant_mws_all: float | None = None
    dequant_mws_1t: float | None = None
    dequant_mws_all: float | None = None
    rmse: float | None = None
    rmse_t3: float | None = None
    gain: float | None = None  # <W, dequant(quant(W))> / <W, W> on the gaussian (1: not shrunk)
    ggml_mws: float | None = None
    ggml_rmse: float | None = None
    ggml_rmse_t3: float | None = None
    speed_ratio: float | None = None  # quant_mws_1t / ggml_mws
    rmse_ratio: float | None = None  # rmse / ggml_rmse
    status: str = ""
    gguf_py_mws: float | None = None
    gguf_py_rmse: float | None = None


def best_time(fn) -> tuple[float, float, object]:
    """Best wall time (time.perf_counter) of fn() over up to MAX_REPEATS runs (fewer when a run is
    slow), the best CPU time of the calling thread (time.thread_time; for threads=1 runs this is the
    kernel's own time, unaffected by other processes waiting for the same cores), and the result."""
    best, best_cpu, out, total = float("inf"), float("inf"), None, 0.0
    for _ in range(MAX_REPEATS):
        c0, t0 = time.thread_time(), time.perf_counter()
        out = fn()
        t, c = time.perf_counter() - t0, time.thread_time() - c0
        best, best_cpu, total = min(best, t), min(best_cpu, c), total + t
        if total + t > TIME_BUDGET_S:
            break
    return best, best_cpu, out


def gain_of(y: np.ndarray, x: np.ndarray) -> float:
    """<x, y> / <x, x> in float64, a block of rows at a time: below 1, the reconstruction is shrunk."""
    xy = xx = 0.0
    for r in range(0, x.shape[0], 512):
        a = x[r:r + 512].astype(np.float64)
        xy += float(np.einsum("ij,ij->", a, y[r:r + 512]))
        xx += float(np.einsum("ij,ij->", a, a))
    return xy / xx


# formats whose kernels rescale every super-block to importance-weighted gain 1 (kernels/csrc/debias.c):
# that trades a least-squares fit's RMSE/std r for up to r / sqrt(1 - r^2), the bound they are held to
UNBIASED = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS",
            "IQ1_M", "IQ1_S"}


def _unbiased(ref: float | None, fmt: str) -> float | None:
    return None if ref is None or fmt not in UNBIASED else float(f"{ref / np.sqrt(1.0 - ref * ref):.4g}")


def rmse_over_std(y: np.ndarray, x: np.ndarray) -> float:
    """sqrt(mean((y - x)^2)) / std(x), in float64, a block of rows at a time."""
    se = 0.0
    for r in range(0, x.shape[0], 512):
        d = y[r:r + 512].astype(np.float64) - x[r:r + 512]
        se += float(np.einsum("ij,ij->", d, d))
    return float(np.sqrt(se / x.size) / x.std(dtype=np.float64))


def gguf_check(fmt: fmts.Format, data: list[np.ndarray], importance: list[np.ndarray | None]) -> str:
    """'ok' when gguf decodes the kernel's bytes to the kernel's own dequantize on every sample."""
    qtype = gguf.GGMLQuantizationType[fmt.name]
    for x in data:
        for imp in importance:
            q = kernels.quantize(x, fmt.name, imp)
            ours = kernels.dequantize(q, fmt.name)
            try:
                theirs = gguf.quants.dequantize(q, qtype)
            except NotImplementedError:
                return "ok (gguf cannot decode this type; not checked)"
            theirs = np.asarray(theirs, dtype=np.float32).reshape(ours.shape)
            if not np.array_equal(ours, theirs, equal_nan=True):
                n = int(np.sum(ours != theirs))
                return f"WRONG: gguf decodes {n} of {ours.size} values differently"
    return "ok"


def gguf_py_quantizer(fmt: fmts.Format, x: np.ndarray) -> tuple[float | None, float | None]:
    """(Mw/s, RMSE/std) of the gguf package's numpy quantizer on x, or (None, None) without one."""
    qtype = gguf.GGMLQuantizationType[fmt.name]
    try:
        t0 = time.perf_counter()
        q = gguf.quants.quantize(x, qtype)
        t = time.perf_counter() - t0
    except NotImplementedError:
        return None, None
    y = np.asarray(gguf.quants.dequantize(q, qtype), dtype=np.float32).reshape(x.shape)
    return x.size / t / 1e6, rmse_over_std(y, x)


def _above(ours: float | None, ref: float | None) -> bool:
    """ours > ref at the precision the reference figure is given to (its significant digits):
    ggml's Q8_0 error is 0.00535 as published; moeplan's byte-identical Q8_0 measures 0.0053503."""
    if ours is None or ref is None:
        return False
    digits = len(f"{ref:.6g}".replace(".", "").replace("-", "").lstrip("0").rstrip("0")) or 1
    return float(f"{ours:.{digits}g}") > ref


def status_of(row: Row) -> str:
    if not row.check.startswith("ok"):
        return "WRONG"
    if row.format in UNBIASED:
        worse = _above(row.rmse, _unbiased(row.ggml_rmse, row.format)) or \
            _above(row.rmse_t3, _unbiased(row.ggml_rmse_t3, row.format))
    else:
        worse = _above(row.rmse, row.ggml_rmse) or _above(row.rmse_t3, row.ggml_rmse_t3)
    if worse:
        return "WORSE"
    if row.ggml_mws is None and row.ggml_rmse is None:
        return "n/a"
    if row.ggml_mws is not None and row.quant_mws_1t is not None and row.quant_mws_1t < row.ggml_mws:
        return "SLOWER"
    return "PASS"


def bench_format(fmt: fmts.Format, gauss: np.ndarray, t3: np.ndarray, all_threads: int) -> list[Row]:
    ones = np.ones(gauss.shape[1], dtype=np.float32)
    settings = ["ones"] if fmt.needs_importance else ["none", "ones"]
    if fmt.family == fmts.Family.FLOAT:
        settings = ["none"]  # importance does not apply to plain float storage
    n = gauss.size
    sample = [gauss[:64], t3[:64]]
    check = gguf_check(fmt, sample, [ones] if fmt.needs_importance else [None, ones])
    ref = REFERENCE.get(fmt.name, {})
    rows = []
    for setting in settings:
        imp = ones if setting == "ones" else None
        row = Row(fmt.name, setting, fmt.bits_per_weight, gauss.shape[0], check)
        row.ggml_mws = ref.get("mws_imp" if setting == "ones" else "mws")
        row.ggml_rmse = ref.get("rmse_imp" if setting == "ones" else "rmse")
        row.ggml_rmse_t3 = ref.get("rmse_t3") if setting == "none" else None
        if check.startswith("ok"):
            t1, c1, _ = best_time(lambda: kernels.quantize(gauss, fmt.name, imp, threads=1))
            ta, _, q = best_time(lambda: kernels.quantize(gauss, fmt.name, imp, threads=all_threads))
            d1, _, _ = best_time(lambda: kernels.dequantize(q, fmt.name, threads=1))
            da, _, y = best_time(lambda: kernels.dequantize(q, fmt.name, threads=all_threads))
            row.quant_mws_1t, row.quant_mws_all = n / t1 / 1e6, n / ta / 1e6
            row.quant_mws_1t_cpu = n / c1 / 1e6 if c1 > 0 else None
            row.dequant_mws_1t, row.dequant_mws_all = n / d1 / 1e6, n / da / 1e6
            row.rmse = rmse_over_std(y, gauss)
            row.gain = gain_of(y, gauss)
            if setting == settings[0]:  # t3 once per format: without importance where allowed
                yt = kernels.dequantize(kernels.quantize(t3, fmt.name, imp, threads=all_threads), fmt.name)
                row.rmse_t3 = rmse_over_std(yt, t3)
            if row.ggml_mws:
                row.speed_ratio = row.quant_mws_1t / row.ggml_mws
            if row.ggml_rmse:
                row.rmse_ratio = row.rmse / row.ggml_rmse
            if setting == settings[0]:
                row.gguf_py_mws, row.gguf_py_rmse = gguf_py_quantizer(fmt, gauss[:GGUF_PY_ROWS])
        row.status = status_of(row)
        rows.append(row)
    return rows


def machine_facts(all_threads: int) -> dict[str, str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    built_omp, omp_threads = kernels.openmp_info()
    return {
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "cpu": model,
        "openmp": f"{'yes' if built_omp else 'no'}, {omp_threads} threads by default; all-thread runs use {all_threads}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gguf": importlib.metadata.version("gguf"),
    }


def fmt_num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = [f.name for f in fields(Row)]
    w.writerow(names)
    for r in rows:
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in asdict(r).values()])
    return buf.getvalue()


def to_markdown(rows: list[Row], facts: dict[str, str], command: str, size: int, elapsed: float,
                load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    out = [
        "# moeplan quantization kernels vs ggml",
        "",
        f"Command: `{command}` ({elapsed:.0f} s)",
        "",
        f"Data: `np.random.default_rng(0).standard_normal(({size}, {size}))` float32 (gaussian) and "
        f"`standard_t(3, ...)` with the same seed and shape (t3). Reference: ggml's figures from "
        f"`{REFERENCE_SOURCE}` (one thread, generic x86-64 build, 4096 x 4096)"
        + ("" if size == 4096 else f"; this run used {size} x {size}, so compare loosely") + ".",
        "",
        "Every format was checked before timing: the `gguf` package decodes the kernel's bytes to "
        "exactly the kernel's dequantize output (else WRONG, not timed).",
        "",
        "Mw/s: million weights per second (best of up to 3 runs, wall time). 1T: threads=1, the figure "
        "compared with ggml; all: every OpenMP thread. 'by CPU time': the same single-thread runs timed "
        "by the quantizing thread's CPU time, which other processes competing for the cores do not "
        "inflate (wall and CPU figures agree on an idle machine). Gain: <W, W_hat> / <W, W> on the gaussian (below 1: "
        "the reconstruction is shrunk; the formats marked * rescale each super-block to importance-weighted gain 1, "
        "kernels/csrc/debias.c, which costs squared error: a least-squares fit's RMSE/std r becomes up to "
        "r / sqrt(1 - r^2)). Status: WORSE if an RMSE/std is above ggml's (compared at the "
        "precision ggml's figure is given to; for the * formats above ggml's r / sqrt(1 - r^2)), else SLOWER if single-thread quantize (wall) is below ggml's Mw/s, else PASS; n/a "
        "without a reference.",
        "",
        "| format | bpw | importance | quant Mw/s 1T | ggml Mw/s | speed ratio | RMSE/std | ggml | ratio | gain "
        "| t3 RMSE/std | ggml t3 | quant Mw/s 1T by CPU time | quant Mw/s all | dequant Mw/s 1T / all "
        "| gguf-py Mw/s, RMSE/std | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gp = "-" if r.gguf_py_mws is None else f"{r.gguf_py_mws:.2f}, {r.gguf_py_rmse:.4f}"
        out.append(
            f"| {r.format}{'*' if r.format in UNBIASED else ''} | {r.bits_per_weight:.4g} | {r.importance} | {fmt_num(r.quant_mws_1t, 1)} "
            f"| {fmt_num(r.ggml_mws, 1)} | {fmt_num(r.speed_ratio, 2)} | {fmt_num(r.rmse, 5)} "
            f"| {fmt_num(r.ggml_rmse, 4)} | {fmt_num(r.rmse_ratio, 3)} | {fmt_num(r.gain, 4)} | {fmt_num(r.rmse_t3, 4)} "
            f"| {fmt_num(r.ggml_rmse_t3, 3)} | {fmt_num(r.quant_mws_1t_cpu, 1)} | {fmt_num(r.quant_mws_all, 1)} "
            f"| {fmt_num(r.dequant_mws_1t, 0)} / {fmt_num(r.dequant_mws_all, 0)} | {gp} | {r.status} |"
        )
    wrong = [r for r in rows if r.status == "WRONG"]
    for r in wrong:
        out.append(f"\n{r.format}: {r.check}")
    out += [
        "",
        "Machine:",
        "",
    ]
    out += [f"- {k}: {v}" for k, v in facts.items()]
    out += [
        f"- load average (1, 5, 15 min) at start {load[0]}, at end {load[1]}: other processes "
        "shared the machine when this is well above 0",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", help="comma-separated formats (default: every format with a C kernel)")
    ap.add_argument("--size", type=int, default=4096, help="rows = cols of the test matrices (default 4096)")
    ap.add_argument("--quick", action="store_true", help="1024 x 1024 smoke run")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default results/; build/bench_quick/ with --quick, so that a smoke "
                         "run never overwrites the committed results)")
    args = ap.parse_args(argv)
    size = 1024 if args.quick else args.size
    if args.out is None:
        args.out = ROOT / ("build/bench_quick" if args.quick else "results")
    if size <= 0 or size % 256:
        ap.error(f"--size must be a positive multiple of 256, got {size}")

    available = [f for f in kernels.available_formats() if f != "F32"]
    if args.formats:
        wanted = [fmts.get(s.strip()).name for s in args.formats.split(",") if s.strip()]
        missing = [f for f in wanted if f not in available]
        if missing:
            ap.error(f"no C kernel for {', '.join(missing)} in this build; available: {', '.join(available)}")
        names = wanted
    else:
        names = available

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    gauss = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    t3 = np.random.default_rng(0).standard_t(3, (size, size)).astype(np.float32)
    all_threads = kernels.openmp_info()[1]
    rows: list[Row] = []
    for name in names:
        fmt = fmts.get(name)
        if fmt.block_size > 1 and size % fmt.block_size:
            print(f"{name}: skipped, {size} is not a multiple of {fmt.block_size}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        new = bench_format(fmt, gauss, t3, all_threads)
        rows += new
        for r in new:
            print(
                f"{r.format:8s} {r.importance:4s} quant 1T {fmt_num(r.quant_mws_1t, 1):>7s} Mw/s "
                f"(ggml {fmt_num(r.ggml_mws, 1)})  rmse/std {fmt_num(r.rmse, 5)} (ggml {fmt_num(r.ggml_rmse, 4)})  "
                f"t3 {fmt_num(r.rmse_t3, 4)}  {r.status}  [{time.perf_counter() - t0:.1f} s]",
                flush=True,
            )
    elapsed = time.perf_counter() - t_start
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])])
    facts = machine_facts(all_threads)
    write_text(args.out / "kernels.csv", to_csv(rows))
    write_text(args.out / "kernels.md", to_markdown(rows, facts, command, size, elapsed, (load_start, os.getloadavg())))
    print(f"wrote {args.out / 'kernels.csv'} and {args.out / 'kernels.md'} ({elapsed:.0f} s)")
    return 1 if any(r.status == "WRONG" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
