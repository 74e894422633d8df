"""Fuzzing of the C kernels: every format, finite float32 / float16 / bfloat16 input of any magnitude.

The cases and their checks are benchmarks/fuzz_kernels.py's (a case is a dict of parameters that
rebuilds its arrays; `check` quantizes three times (threads 1, 1, 2), dequantizes, runs quant_error
and decodes random bytes). They run in a worker subprocess, so that a segfault or a sanitizer abort
is a failure of the case that caused it, reported with the line that reproduces it, and not the end
of the test session. Outcomes allowed: 'ok' (encoded, deterministic, finite, accurate) and 'error'
(a ValueError naming the value, its row and column and the format's range, exactly when a value is
beyond the range). The longer run is `python benchmarks/fuzz_kernels.py` (results/fuzz.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeplan import kernels


_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "fuzz_kernels.py"
_spec = importlib.util.spec_from_file_location("fuzz_kernels", _PATH)
fz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fz)

FLT_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(scope="module")
def runner():
    r = fz.Runner()
    yield r
    r.close()


def assert_all_pass(cases, results):
    bad = [(c, o, d) for c, (o, d) in zip(cases, results) if o not in ("ok", "error")]
    assert not bad, "\n".join(f"{o}: {d}\n  reproduce: {fz.describe(c)}" for c, o, d in bad[:5])


# ---- the reported defects, as fuzz cases -------------------------------------------------------------

def fill(fmt, value, imp="ones", shape=(1, 256), dtype="f32"):
    return dict(fmt=fmt, shape=list(shape), dtype=dtype, kind="fill", value=value, imp=imp, seed=1)


REPORTED = [
    # IQ1_S / IQ1_M segfaulted on |x| ~ 1e38 (the ternary fit's merge ran past its FLT_MAX sentinel)
    *[fill(f, v) for f in ("IQ1_S", "IQ1_M") for v in (2e38, 1.4e38, FLT_MAX)],
    # IQ2 / IQ3 wrote uninitialized points for |x| >= 1e20 (errors overflowed to inf, no candidate won)
    *[dict(fmt=f, shape=[2, 512], dtype="f32", kind="decades", imp=i, seed=s)
      for f in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S") for i in ("ones", "some_zero") for s in (1, 2)],
    *[fill(f, v) for f in ("IQ2_XXS", "IQ3_S") for v in (1e20, 3e25)],
    # fp16 block scales overflowed to inf: dequantize and quant_error returned inf / NaN
    *[fill(f, 1e7, imp="none") for f in ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                          "IQ4_NL", "TQ1_0", "TQ2_0")],
    *[fill(f, 1e9, imp="none") for f in ("Q6_K", "IQ4_XS")],
    fill("F16", 70000.0, imp="none"), fill("F16", 65520.0, imp="none"), fill("BF16", FLT_MAX, imp="none"),
    # quant_error's float32 error sums overflowed with huge importance
    *[dict(fmt=f, shape=[2, 256], dtype="f32", kind="gauss", imp="huge", seed=3) for f in ("Q4_K", "IQ4_XS", "Q8_0")],
]


def test_reported_defects(runner):
    assert_all_pass(REPORTED, runner.run(REPORTED))


# ---- hypothesis-driven fuzzing -----------------------------------------------------------------------

@st.composite
def cases(draw):
    fmt = draw(st.sampled_from(fz.FORMATS))
    b = fz.block_of(fmt)
    ncols = b * draw(st.integers(1, 2 if b == 256 else 4)) if b > 1 else draw(st.integers(1, 48))
    rows = draw(st.integers(1, 4))
    shape = draw(st.sampled_from([[rows, ncols], [2, rows, ncols]]))
    return dict(fmt=fmt, shape=shape, dtype=draw(st.sampled_from(["f32", "f32", "f16", "bf16"])),
                kind=draw(st.sampled_from(fz.KINDS)), imp=draw(st.sampled_from(fz.IMPORTANCE)),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(cases(), min_size=8, max_size=8))
def test_fuzz_every_format(runner, batch):
    assert_all_pass(batch, runner.run(batch))


# ---- the range error and the range boundary, in process ---------------------------------------------

def test_error_names_value_position_and_range():
    x = np.ones((2, 256), np.float32)
    x[1, 3] = 2e38
    with pytest.raises(ValueError, match=r"value 2e\+38 at row 1, column 3 is outside Q4_K's range \(\|x\| <= 4.126752e\+06: "):
        kernels.quantize(x, "Q4_K")
    x3 = np.ones((2, 3, 32), np.float32)
    x3[1, 2, 5] = -1e6
    with pytest.raises(ValueError, match=r"value -1e\+06 at expert 1, row 2, column 5 is outside Q4_0's range"):
        kernels.quantize(x3, "Q4_0")
    # quant_error names the first format (in the order given) whose range the value leaves
    with pytest.raises(ValueError, match=r"column 5 is outside Q4_0's range"):
        kernels.quant_error(x3, ["Q8_0", "Q4_0", "Q4_1"])
    # NaN / Inf keep their own message, now with the column
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"holds NaN or Inf \(first at row 1, column 3\)"):
        kernels.quantize(x, "Q4_K")


@pytest.mark.parametrize("fmt", kernels.available_formats())
def test_values_at_the_range_boundary_encode(fmt):
    """The largest |x| in range encodes finitely and closely (either sign); the next float32 is refused."""
    R = np.float32(kernels.format_range(fmt))
    f = kernels.formats.get(fmt)
    n = max(f.block_size, 32)
    rng = np.random.default_rng(3)
    imp = np.ones(n, np.float32)
    for sign in (1, -1):
        x = (rng.uniform(-0.5, 0.5, (2, n)) * R).astype(np.float32)
        x[:, 7] = sign * R
        y = kernels.dequantize(kernels.quantize(x, fmt, imp), fmt)
        assert np.isfinite(y).all()
        tol = {"TQ1_0": 0.01, "TQ2_0": 0.01}.get(fmt, fz.REL_SSE[fmt])
        assert np.abs(y[:, 7] - x[:, 7]).max() <= max(0.3, tol) * R, (y[:, 7], x[:, 7])
        qe = kernels.quant_error(x, [fmt], imp)
        assert np.isfinite(qe.err).all() and np.isfinite(qe.norm).all()
        if R < FLT_MAX:
            x[1, 9] = np.nextafter(R, np.float32(np.inf)) * sign
            with pytest.raises(ValueError, match=rf"at row 1, column 9 is outside {fmt}'s range"):
                kernels.quantize(x, fmt, imp)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q5_1", "Q4_K", "Q3_K", "IQ4_NL", "IQ4_XS", "IQ2_XS", "IQ3_S", "IQ1_M"])
def test_importance_scale_does_not_change_bytes(fmt):
    """Importance is normalized per block by a power of two: scaling it by any power of two, up to
    float32's max or down into subnormals, gives the same bytes; quant_error scales exactly with it."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    imp = np.exp(rng.standard_normal(512)).astype(np.float32) + 0.5
    q = kernels.quantize(x, fmt, imp)
    e = kernels.quant_error(x, [fmt], imp).err[0, 0]
    for k in (-120, -60, 60, 120):
        w = np.ldexp(imp, k).astype(np.float32)
        assert np.array_equal(kernels.quantize(x, fmt, w), q), k
        qe = kernels.quant_error(x, [fmt], w)
        assert np.isfinite(qe.err).all() and np.isfinite(qe.norm).all()
        assert qe.err[0, 0] == pytest.approx(np.ldexp(e, k), rel=1e-12)
