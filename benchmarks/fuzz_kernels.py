"""Fuzzing of the C quantization kernels: every format, every finite float32 input.

Each case is a small dict of parameters (format, shape, source dtype, how the values and the
importance are drawn, a seed); `build(case)` turns it into the same arrays every time, so a case is
its own reproducer. `check(case)` runs, for one case:

  quantize (threads=1) twice and with threads=2: identical bytes, or the same clean ValueError
      (naming the value, its row and column and the format's range) exactly when some |x| is beyond
      the format's range (kernels.api.format_range); any other exception is a failure;
  dequantize (threads 1 and 2): identical and finite; for unit importance and blocks with
      1 <= max|x|, a bounded relative error per block (`REL_SSE`), so that a representable value
      is really encoded and not saturated;
  quant_error (threads=1 twice, threads=2): finite, deterministic at threads=1, equal to the error
      recomputed from the dequantized values;
  dequantize of random bytes of the same size: no crash, deterministic.

Cases run in a worker subprocess (`python fuzz_kernels.py --worker`, one JSON case per line on
stdin); a worker that dies (segfault, sanitizer abort) is reported as a crash of the case it was
running and replaced. tests/test_fuzz_kernels.py drives the same worker from hypothesis.

    python benchmarks/fuzz_kernels.py                       # 100,000 cases, seed 0 -> results/fuzz.md
    python benchmarks/fuzz_kernels.py --cases 2000 --out -  # quick run, summary to stdout only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FLT_MAX = float(np.finfo(np.float32).max)
F16_MAX = 65504.0
BF16_MAX = float.fromhex("0x1.fep127")  # largest finite bfloat16

# every format of the registry (import-free: the parent process never loads the C extension)
FORMATS = ["F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K",
           "Q2_K", "IQ4_NL", "IQ4_XS", "TQ2_0", "TQ1_0", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS",
           "IQ1_M", "IQ1_S"]
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q5_1": 32, "Q5_0": 32, "Q4_1": 32, "Q4_0": 32,
         "IQ4_NL": 32}
NEEDS_IMPORTANCE = {"IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"}

KINDS = ["gauss", "decades", "one_huge", "subnormal", "zeros", "constant", "extremes", "near_range", "bits",
         "ties", "sparse"]
IMPORTANCE = ["none", "ones", "exp", "some_zero", "all_zero", "huge", "subnormal", "bits", "mixed"]
DTYPES = ["f32", "f32", "f32", "f32", "f16", "bf16"]

# Largest sum((y - x)^2) / sum(x^2) accepted per block (blocks with max|x| >= 1, unit weights): about
# twice the worst seen over 6,000 in-range cases per the case mix below, below 1 (what storing zeros
# gives) for every format but the ternary ones (whose rounding is never worse than zero, per weight).
# It catches saturated scales and garbage, not small losses of accuracy.
REL_SSE = {"F32": 0.0, "F16": 2.0 ** -20, "BF16": 2.0 ** -14, "Q8_0": 1e-3, "Q6_K": 2e-3, "Q5_1": 3e-2,
           "Q5_0": 1e-2, "Q5_K": 5e-3, "Q4_1": 0.15, "Q4_0": 4e-2, "Q4_K": 2e-2, "IQ4_NL": 3e-2, "IQ4_XS": 3e-2,
           "Q3_K": 0.1, "Q2_K": 0.2, "IQ3_S": 0.3, "IQ3_XXS": 0.3, "IQ2_S": 0.6, "IQ2_XS": 0.6,
           "IQ2_XXS": 0.75, "IQ1_M": 0.6, "IQ1_S": 0.6, "TQ1_0": 1.0, "TQ2_0": 1.0}


def block_of(fmt: str) -> int:
    return BLOCK.get(fmt, 256)


# ---- cases -----------------------------------------------------------------------------------------

def random_case(rng: np.random.Generator, fmt: str | None = None) -> dict:
    """One case drawn from rng (the benchmark's generator; the test draws the same fields with hypothesis)."""
    fmt = fmt or FORMATS[int(rng.integers(len(FORMATS)))]
    b = block_of(fmt)
    ncols = b * int(rng.integers(1, 3 if b == 256 else 5)) if b > 1 else int(rng.integers(1, 65))
    rows = int(rng.integers(1, 5))
    shape = [rows, ncols] if rng.random() < 0.8 else [2, rows, ncols]
    imp = IMPORTANCE[int(rng.integers(len(IMPORTANCE)))]
    return dict(fmt=fmt, shape=shape, dtype=DTYPES[int(rng.integers(len(DTYPES)))],
                kind=KINDS[int(rng.integers(len(KINDS)))], imp=imp, seed=int(rng.integers(2**32)))


def _random_finite_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    u = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    exp = (u >> 23) & 0xFF
    u = np.where(exp == 0xFF, u & ~np.uint32(0x40000000), u)  # exponent 255 -> 127: finite
    return u.view(np.float32)


def build(case: dict, max_abs: float | None = None):
    """(x as the dtype the case asks for, importance or None) of a case; max_abs: the format's range."""
    rng = np.random.default_rng(case["seed"])
    shape = tuple(case["shape"])
    n = int(np.prod(shape))
    kind = case["kind"]
    R = max_abs if max_abs is not None else 1e6
    with np.errstate(over="ignore"):
        above = float(np.nextafter(np.float32(R), np.float32(np.inf)))
    e = rng.uniform(-46, 38.6)
    if kind == "gauss":
        x = rng.standard_normal(n) * 10.0 ** e
    elif kind == "decades":
        lo = rng.uniform(-46, 38)
        hi = rng.uniform(lo, 38.6)
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(lo, hi, n)
    elif kind == "one_huge":
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-46, 0)
        x[int(rng.integers(n))] = rng.choice([-1, 1]) * 10.0 ** rng.uniform(0, 38.6)
    elif kind == "subnormal":
        x = (rng.integers(0, 2**23, n, dtype=np.int64).astype(np.uint32).view(np.float32).astype(np.float64)
             * rng.choice([-1, 1], n))
        x[rng.random(n) < 0.2] = 0.0
    elif kind == "zeros":
        x = np.where(rng.random(n) < 0.5, -0.0, 0.0)
    elif kind == "constant":
        x = np.full(n, rng.choice([-1, 1]) * 10.0 ** e)
    elif kind == "extremes":
        pool = np.array([FLT_MAX, -FLT_MAX, 1e-45, -1e-45, 0.0, -0.0, 1.0, -1.0, F16_MAX, -F16_MAX, R, -R,
                         above, 2.0 ** -24, 65519.0, 65520.0, BF16_MAX])
        x = rng.choice(pool, n)
    elif kind == "near_range":
        # values of the order of the range: up to R, and in a third of the cases one just beyond it
        x = rng.uniform(-1, 1, n) * R
        x[int(rng.integers(n))] = rng.choice([-1, 1]) * R
        if rng.random() < 1 / 3:
            x[int(rng.integers(n))] = rng.choice([-1, 1]) * above
    elif kind == "bits":
        x = _random_finite_bits(rng, n).astype(np.float64)
    elif kind == "fill":  # case["value"] with alternating signs (reproducers of reported defects)
        x = np.full(n, float(case["value"]))
        x[1::2] *= -1
    elif kind == "ties":
        x = rng.integers(-64, 65, n) / 2.0 * 2.0 ** int(rng.integers(-20, 20))
    elif kind == "sparse":
        x = rng.standard_normal(n) * 10.0 ** e * (rng.random(n) < 0.1)
    else:
        raise ValueError(kind)
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.clip(np.nan_to_num(x, nan=0.0, posinf=FLT_MAX, neginf=-FLT_MAX), -FLT_MAX, FLT_MAX)
    x = x.astype(np.float32).reshape(shape)
    ncols = shape[-1]
    groups = shape[0] if len(shape) == 3 else 1
    imp_kind = case["imp"]
    if imp_kind == "none" and case["fmt"] in NEEDS_IMPORTANCE:
        imp_kind = "ones"
    ishape = (groups, ncols) if (len(shape) == 3 and rng.random() < 0.5) else (ncols,)
    m = int(np.prod(ishape))
    if imp_kind == "none":
        imp = None
    elif imp_kind == "ones":
        imp = np.ones(m)
    elif imp_kind == "exp":
        imp = np.exp(3 * rng.standard_normal(m))
    elif imp_kind == "some_zero":
        imp = np.exp(rng.standard_normal(m)) * (rng.random(m) < 0.5)
    elif imp_kind == "all_zero":
        imp = np.zeros(m)
    elif imp_kind == "huge":
        imp = 10.0 ** rng.uniform(30, 38.5, m)
    elif imp_kind == "subnormal":
        imp = rng.integers(0, 2**23, m, dtype=np.int64).astype(np.uint32).view(np.float32).astype(np.float64)
    elif imp_kind == "bits":
        imp = np.abs(_random_finite_bits(rng, m).astype(np.float64))
    elif imp_kind == "mixed":
        imp = rng.choice(np.array([0.0, 1e-45, 1e-30, 1.0, 3.0, 1e20, 1e38, FLT_MAX]), m)
    else:
        raise ValueError(imp_kind)
    if imp is not None:
        imp = np.clip(imp, 0, FLT_MAX).astype(np.float32).reshape(ishape)
    if case["dtype"] == "f16":
        x = np.clip(x, -F16_MAX, F16_MAX).astype(np.float16)
    elif case["dtype"] == "bf16":
        import torch

        x = torch.from_numpy(np.clip(x, -BF16_MAX, BF16_MAX)).to(torch.bfloat16)
    return x, imp


def describe(case: dict) -> str:
    """A line that reproduces the case."""
    return (f"python -c 'import sys; sys.path.insert(0, \"benchmarks\"); import fuzz_kernels as f; "
            f"print(f.check({json.dumps(case)}))'")


# ---- the checks (run in the worker) ------------------------------------------------------------------

def _widened(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float32)
    return x.float().numpy()


def _range(kernels, fmt: str) -> float | None:
    fr = getattr(kernels.api, "format_range", None)
    return float(fr(fmt)) if fr is not None else None


def check(case: dict) -> tuple[str, str]:
    """(outcome, detail): outcome 'ok', 'error' (a clean ValueError) or a failure:
    'nondeterministic', 'nonfinite', 'inaccurate', 'bad_error', 'missing_error', 'exception', 'qe_mismatch'."""
    import moeplan.kernels.api  # noqa: F401  (kernels.api)
    from moeplan import kernels

    fmt = case["fmt"]
    R = _range(kernels, fmt)
    x, imp = build(case, R)
    xf = _widened(x)
    beyond = bool((np.abs(xf) > R).any()) if R is not None else None
    try:
        q = kernels.quantize(x, fmt, imp, threads=1)
    except ValueError as exc:
        msg = str(exc)
        if beyond is False:
            return "bad_error", f"ValueError for values within the range {R:g}: {msg}"
        if not ("row" in msg and "column" in msg and fmt in msg and "range" in msg):
            return "bad_error", f"error without value/position/range: {msg}"
        try:
            kernels.quant_error(x, [fmt], imp, threads=1)
        except ValueError as exc2:
            if str(exc2) != msg:
                return "bad_error", f"quant_error's message differs: {exc2} vs {msg}"
        else:
            return "missing_error", "quantize refused the input but quant_error accepted it"
        return "error", msg.split(" is outside")[0]
    except Exception as exc:  # noqa: BLE001
        return "exception", f"{type(exc).__name__}: {exc}"
    if beyond:
        return "missing_error", f"max |x| {np.abs(xf).max():g} is beyond the range {R:g} but quantize accepted it"
    if not np.array_equal(q, kernels.quantize(x, fmt, imp, threads=1)):
        return "nondeterministic", "two runs with threads=1 differ"
    if not np.array_equal(q, kernels.quantize(x, fmt, imp, threads=2)):
        return "nondeterministic", "threads=1 and threads=2 differ"
    y = kernels.dequantize(q, fmt, threads=1)
    if not np.array_equal(y, kernels.dequantize(q, fmt, threads=2), equal_nan=True):
        return "nondeterministic", "dequantize threads=1 and threads=2 differ"
    if not np.isfinite(y).all():
        bad = np.argwhere(~np.isfinite(y))[0]
        return "nonfinite", f"dequantize gives {y[tuple(bad)]} at {tuple(int(i) for i in bad)}"
    # accuracy: unit weights, blocks whose values are large enough for normal fp16 scales
    if imp is None or bool(np.all(imp == 1)):
        b = block_of(fmt) if block_of(fmt) > 1 else xf.shape[-1]
        xb = xf.reshape(-1, b).astype(np.float64)
        yb = y.reshape(-1, b).astype(np.float64)
        amax = np.abs(xb).max(axis=1)
        sel = amax >= 1.0
        if sel.any():
            rel = ((yb - xb) ** 2).sum(axis=1)[sel] / (xb ** 2).sum(axis=1)[sel]
            if rel.max() > REL_SSE[fmt]:
                return "inaccurate", f"block relative squared error {rel.max():.3g} > {REL_SSE[fmt]:g}"
    qe = kernels.quant_error(x, [fmt], imp, threads=1)
    if not (np.isfinite(qe.err).all() and np.isfinite(qe.norm).all()):
        return "nonfinite", f"quant_error gives err {qe.err.tolist()} norm {qe.norm.tolist()}"
    qe1 = kernels.quant_error(x, [fmt], imp, threads=1)
    if not (np.array_equal(qe.err, qe1.err) and np.array_equal(qe.norm, qe1.norm)):
        return "nondeterministic", "quant_error differs between two runs with threads=1"
    qe2 = kernels.quant_error(x, [fmt], imp, threads=2)
    if not (np.allclose(qe.err, qe2.err, rtol=1e-9, atol=0) and np.allclose(qe.norm, qe2.norm, rtol=1e-9, atol=0)):
        return "nondeterministic", "quant_error threads=1 and threads=2 differ beyond summation order"
    shape = xf.shape
    groups = shape[0] if len(shape) == 3 else 1
    w = np.ones(shape[-1]) if imp is None else imp.astype(np.float64)
    w = np.broadcast_to(w[:, None, :] if (imp is not None and imp.ndim == 2) else w, shape)
    d = (xf.astype(np.float64) - y) ** 2
    err = (w * d).reshape(groups, -1).sum(axis=1)
    norm = (w * xf.astype(np.float64) ** 2).reshape(groups, -1).sum(axis=1)
    if not (np.allclose(qe.err[0], err, rtol=1e-4, atol=1e-300) and np.allclose(qe.norm, norm, rtol=1e-4, atol=1e-300)):
        return "qe_mismatch", f"quant_error err {qe.err[0].tolist()} norm {qe.norm.tolist()}; recomputed {err.tolist()} {norm.tolist()}"
    # any bytes decode without a crash, the same way twice
    rng = np.random.default_rng(case["seed"] ^ 0x5EED)
    raw = rng.integers(0, 256, q.shape, dtype=np.uint8)
    with np.errstate(all="ignore"):
        r1 = kernels.dequantize(raw, fmt, shape, threads=1)
        r2 = kernels.dequantize(raw, fmt, shape, threads=2)
    if not np.array_equal(r1, r2, equal_nan=True):
        return "nondeterministic", "dequantize of random bytes differs between threads=1 and 2"
    return "ok", ""


def worker() -> None:
    """Read one JSON case per line, answer one JSON line per case: {"i":..., "out":..., "detail":...}."""
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        out.write(json.dumps({"start": msg["i"]}) + "\n")
        out.flush()
        outcome, detail = check(msg["case"])
        out.write(json.dumps({"i": msg["i"], "out": outcome, "detail": detail}) + "\n")
        out.flush()


class Runner:
    """A worker subprocess that runs cases; replaced when it dies. run(cases) -> [(outcome, detail)]."""

    def __init__(self, env: dict | None = None):
        self.env = env
        self.proc = None

    def _start(self):
        import tempfile

        self.errfile = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errfile,
                                     text=True, bufsize=1, env=self.env, cwd=str(ROOT))

    def run(self, cases: list[dict]) -> list[tuple[str, str]]:
        results: list[tuple[str, str]] = []
        i = 0
        while i < len(cases):
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            try:
                for j in range(i, len(cases)):
                    self.proc.stdin.write(json.dumps({"i": j, "case": cases[j]}) + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            while i < len(cases):
                line = self.proc.stdout.readline()
                if not line:  # the worker died while running case i
                    self.proc.stdin.close()
                    rc = self.proc.wait()
                    self.errfile.seek(0)
                    err = self.errfile.read()[-4000:]
                    self.errfile.close()
                    results.append(("crash", f"worker exit status {rc}; stderr tail:\n{err}"))
                    self.proc = None
                    i += 1
                    break
                msg = json.loads(line)
                if "start" in msg:
                    continue
                results.append((msg["out"], msg["detail"]))
                i += 1
        return results

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.proc = None


FAILURES = ("crash", "nondeterministic", "nonfinite", "inaccurate", "bad_error", "missing_error", "exception",
            "qe_mismatch")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="worker processes run side by side")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--formats", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--out", default=str(ROOT / "results" / "fuzz.md"), help="results file, or - for none")
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return 0
    fmts = args.formats.split(",") if args.formats else FORMATS
    rng = np.random.default_rng(args.seed)
    # formats in turn, so that every format gets cases/len(fmts) of them
    cases = [random_case(rng, fmts[k % len(fmts)]) for k in range(args.cases)]
    t0 = time.perf_counter()
    runners = [Runner() for _ in range(max(1, args.workers))]
    from concurrent.futures import ThreadPoolExecutor

    batches = [cases[k:k + args.batch] for k in range(0, len(cases), args.batch)]
    results: list[list[tuple[str, str]]] = [None] * len(batches)  # type: ignore[list-item]

    def go(slot: int):
        r = runners[slot]
        for bi in range(slot, len(batches), len(runners)):
            results[bi] = r.run(batches[bi])
        r.close()

    with ThreadPoolExecutor(len(runners)) as ex:
        list(ex.map(go, range(len(runners))))
    wall = time.perf_counter() - t0
    flat = [res for batch in results for res in batch]
    total = Counter(o for o, _ in flat)
    per_fmt: dict[str, Counter] = defaultdict(Counter)
    examples: dict[str, list[str]] = defaultdict(list)
    for case, (o, d) in zip(cases, flat):
        per_fmt[case["fmt"]][o] += 1
        if o in FAILURES and len(examples[o]) < 5:
            examples[o].append(f"{o}: {d.splitlines()[0] if d else ''}\n    case {json.dumps(case)}")
    crashes = total["crash"]
    nondet = total["nondeterministic"]
    nonfinite = total["nonfinite"]
    other = sum(total[k] for k in FAILURES) - crashes - nondet - nonfinite
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine_info import logical_cpus

    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# Kernel fuzzing",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {logical_cpus()}  ",
        f"Cases: {len(cases):,} (seed {args.seed}, {len(fmts)} formats), wall time {wall:.0f} s with {len(runners)} workers",
        "",
        "Each case: quantize (threads 1, again 1, then 2), dequantize (threads 1 and 2), quant_error, and",
        "dequantize of random bytes, on finite float32/float16/bfloat16 input with extreme magnitudes,",
        "subnormals, mixed signs and importance with zeros, huge and subnormal values (benchmarks/fuzz_kernels.py).",
        "",
        "| outcome | cases |",
        "|---|---:|",
        f"| crashes | {crashes} |",
        f"| non-deterministic outputs | {nondet} |",
        f"| non-finite outputs from finite input | {nonfinite} |",
        f"| other failures (inaccurate, wrong or missing error, other exception) | {other} |",
        f"| clean errors (value beyond the format's range) | {total['error']} |",
        f"| encoded and checked | {total['ok']} |",
        "",
        "| format | ok | clean errors | failures |",
        "|---|---:|---:|---:|",
    ]
    for f in fmts:
        c = per_fmt[f]
        lines.append(f"| {f} | {c['ok']} | {c['error']} | {sum(c[k] for k in FAILURES)} |")
    if examples:
        lines += ["", "First failures:", "", "```"]
        for o in FAILURES:
            lines += examples.get(o, [])
        lines += ["```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out != "-":
        from moeplan.kernels.outputs import write_text

        write_text(args.out, text)
    return 1 if sum(total[k] for k in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
