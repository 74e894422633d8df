"""Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, and the float formats F16 / BF16, against the `gguf` package.

Without importance the bytes must be identical to gguf.quants.quantize; any bytes must decode to
identical float32 values in the C kernels, kernels.ref_legacy and gguf. With importance, the
weighted search must lower the importance-weighted error.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moeplan import kernels
from moeplan.kernels import formats
from moeplan.kernels import ref_legacy as ref

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
WEIGHTED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # search with importance; Q8_0 ignores importance
QT = gguf.GGMLQuantizationType
# byte offsets of the fp16 fields (scale, min) inside one block
HALF_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2]}

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gguf_quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), QT[fmt])


def gguf_dequantize(data: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.dequantize(data, QT[fmt])


def random_shape(rng: np.random.Generator, block: int = 32) -> tuple[int, ...]:
    cols = block * int(rng.integers(1, 9))
    if rng.random() < 0.5:
        return (int(rng.integers(1, 10)), cols)
    return (int(rng.integers(1, 5)), int(rng.integers(1, 6)), cols)  # experts x rows x cols


KINDS = ["gauss", "t3", "positive", "halves", "sparse", "outliers", "tiny", "int8"]


def sample(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """Test data whose scales stay inside the fp16 range (|x| < ~3e4), where gguf's arithmetic is defined."""
    if kind == "gauss":
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-5, 3.5)
    elif kind == "t3":
        x = rng.standard_t(3, shape) * 10.0 ** rng.uniform(-3, 1)
    elif kind == "positive":  # min > 0: Q4_1/Q5_1 with a positive offset
        x = 5.0 + rng.random(shape)
    elif kind == "halves":  # exact halves: many rounding ties
        x = rng.integers(-40, 41, shape) / 2.0 * 2.0 ** int(rng.integers(-8, 8))
    elif kind == "sparse":  # mostly zeros, including negative zeros
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.2)
        x[rng.random(shape) < 0.2] = -0.0
    elif kind == "outliers":
        x = rng.standard_normal(shape)
        x.reshape(-1)[rng.choice(x.size, size=max(1, x.size // 200), replace=False)] = 1e4 * rng.choice([-1, 1])
    elif kind == "tiny":  # fp16-subnormal scales
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-9, -6)
    elif kind == "int8":
        x = rng.integers(-127, 128, shape).astype(np.float64)
    else:
        raise ValueError(kind)
    return np.asarray(x, dtype=np.float32)


def tie_blocks(rng: np.random.Generator, fmt: str, nblocks: int) -> np.ndarray:
    """Blocks whose scale is an exact power of two, so that x / d lands on .5 for many weights."""
    lo, hi, anchors = {
        "Q8_0": (-126.5, 126.5, [127.0, -127.0]),  # d = 1: x*id = x, halves are ties
        "Q4_0": (-7.5, 7.5, [-8.0, 8.0]),  # d = max/-8 = +-1: x*id + 8.5 lands on integers
        "Q5_0": (-15.5, 15.5, [-16.0, 16.0]),
        "Q4_1": (0.0, 15.0, None),  # min 0, max 15: d = 1
        "Q5_1": (0.0, 31.0, None),
    }[fmt]
    x = rng.integers(int(2 * lo), int(2 * hi) + 1, (nblocks, 32)) / 2.0
    rows = np.arange(nblocks)
    if anchors is None:
        pos = rng.permutation(32)[:2]
        x[:, pos[0]], x[:, pos[1]] = lo, hi
    else:
        x[rows, rng.integers(0, 32, nblocks)] = rng.choice(anchors, nblocks)
    scale = 2.0 ** rng.integers(-12, 8, (nblocks, 1))
    return (x * scale).astype(np.float32).reshape(-1, 64)


def random_blocks(rng: np.random.Generator, fmt: str, nrows: int, ncols: int) -> np.ndarray:
    """Arbitrary bytes for `fmt` with finite fp16 fields (inf/NaN scales decode to inf/NaN anyway)."""
    f = formats.get(fmt)
    data = rng.integers(0, 256, (nrows, f.row_bytes(ncols)), dtype=np.uint8)
    blocks = data.reshape(nrows, -1, f.type_size)
    for off in HALF_FIELDS[fmt]:
        hi = blocks[:, :, off + 1]
        blocks[:, :, off + 1] = np.where((hi & 0x7C) == 0x7C, hi & 0xFB, hi)  # exponent 31 -> 30
    return data


# ---- byte identity with gguf -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", LEGACY)
def test_bytes_identical_to_gguf(fmt):
    rng = np.random.default_rng(100 + formats.get(fmt).type_id)
    for i in range(48):
        x = sample(rng, random_shape(rng), KINDS[i % len(KINDS)])
        got = kernels.quantize(x, fmt)
        want = gguf_quantize(x, fmt)
        assert got.shape == want.shape
        assert np.array_equal(got, want), f"{fmt}, case {i} ({KINDS[i % len(KINDS)]}, shape {x.shape})"
        assert np.array_equal(ref.quantize(x, fmt), want)


@pytest.mark.parametrize("fmt", LEGACY)
def test_rounding_ties_identical_to_gguf(fmt):
    rng = np.random.default_rng(7)
    x = tie_blocks(rng, fmt, 400)
    assert np.array_equal(kernels.quantize(x, fmt), gguf_quantize(x, fmt))
    assert np.array_equal(ref.quantize(x, fmt), gguf_quantize(x, fmt))


@pytest.mark.parametrize("fmt", LEGACY)
def test_special_blocks_identical_to_gguf(fmt):
    rows = [
        np.zeros(64),
        np.full(64, 1.5), np.full(64, -3.0), np.full(64, 7e3), np.full(64, 1e-3),  # constant rows
        np.r_[np.full(32, 2.0), np.full(32, -2.0)],
        np.r_[-5.0, 5.0, np.zeros(30), 5.0, -5.0, np.ones(30)],  # equal magnitudes: the first one wins
        np.linspace(-1e-7, 1e-7, 64),  # fp16-subnormal scale
        np.linspace(-1e-30, 3e-30, 64),  # scale underflows to 0 in fp16
        np.r_[np.full(63, 0.25), 3e4],
    ]
    x = np.array(rows, dtype=np.float32)
    got = kernels.quantize(x, fmt)
    assert np.array_equal(got, gguf_quantize(x, fmt))
    y = kernels.dequantize(got, fmt)
    assert np.all(np.isfinite(y))
    assert np.array_equal(y[0], np.zeros(64, np.float32))


@pytest.mark.parametrize("fmt", LEGACY)
def test_smallest_and_odd_shapes(fmt):
    rng = np.random.default_rng(3)
    for shape in [(1, 32), (1, 1, 32), (7, 96), (3, 5, 64), (1, 13, 32)]:
        x = rng.standard_normal(shape).astype(np.float32)
        q = kernels.quantize(x, fmt)
        assert q.shape == (*shape[:-1], formats.get(fmt).row_bytes(shape[-1]))
        assert np.array_equal(q, gguf_quantize(x, fmt))
        assert kernels.dequantize(q, fmt).shape == shape
    empty = kernels.quantize(np.zeros((0, 64), np.float32), fmt)
    assert empty.shape == (0, formats.get(fmt).row_bytes(64))


# ---- decoding --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", LEGACY)
def test_dequantize_identical_to_gguf_on_any_bytes(fmt):
    rng = np.random.default_rng(11)
    for shape in [(5, 64), (2, 3, 128)]:
        data = random_blocks(rng, fmt, int(np.prod(shape[:-1])), shape[-1]).reshape(*shape[:-1], -1)
        got = kernels.dequantize(data, fmt)
        assert got.shape == shape
        assert np.array_equal(got, gguf_dequantize(data, fmt))
        assert np.array_equal(got, ref.dequantize(data, fmt))


@pytest.mark.parametrize("fmt", LEGACY)
def test_dequantize_of_quantize_identical_to_gguf(fmt):
    rng = np.random.default_rng(12)
    for i in range(16):
        x = sample(rng, random_shape(rng), KINDS[i % len(KINDS)])
        imp = None if i % 2 == 0 else np.exp(2 * rng.standard_normal(x.shape[-1])).astype(np.float32)
        q = kernels.quantize(x, fmt, imp)
        got = kernels.dequantize(q, fmt)
        assert np.array_equal(got, gguf_dequantize(q, fmt))
        assert np.array_equal(got, ref.dequantize(q, fmt))


# ---- F16 / BF16 identity (kernels/csrc/q_float.c) ------------------------------------------------------

def _f16_edge_values() -> np.ndarray:
    h = np.arange(0x7BFF, dtype=np.uint16)  # every finite positive half below the largest
    lo = h.view(np.float16).astype(np.float64)
    hi = (h + 1).view(np.float16).astype(np.float64)
    mid = ((lo + hi) / 2).astype(np.float32)  # exact ties (float32 holds them exactly)
    near = np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(0))])
    big = np.array([65504, 65519, 65519.996, 65520, 65536, 1e5, 3e38, 2.0 ** -24, 2.0 ** -25,
                    2.0 ** -25 * 1.0000001, 2.0 ** -26, 1e-45, 6e-8, 5.96e-8, 0.0], dtype=np.float32)
    v = np.concatenate([near, big])
    return np.concatenate([v, -v])


def _bf16_edge_values(rng: np.random.Generator) -> np.ndarray:
    hi = rng.integers(0, 0x7F80, 20000).astype(np.uint32) << 16  # finite bf16 patterns, both parities
    low = np.array([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    bits = (hi[:, None] | low[None, :]).reshape(-1)
    bits = np.concatenate([bits, np.arange(0, 0x10000, dtype=np.uint32),  # float32 subnormals
                           np.uint32(0x7F7F0000) + np.arange(0, 0x10000, dtype=np.uint32)])  # near FLT_MAX
    v = bits.view(np.float32)
    return np.concatenate([v, -v])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # gguf's astype(float16) past 65504
def test_f16_bytes_identical_to_gguf():
    rng = np.random.default_rng(5)
    edges = _f16_edge_values()
    rand = rng.integers(0, 0x7F800000, 200000, dtype=np.uint32).view(np.float32)  # finite, all exponents
    for v in (edges, rand, rng.standard_normal(4096).astype(np.float32)):
        # values that round to inf in fp16 (|x| >= 65520) are refused; every other one is gguf's
        beyond = np.abs(v) >= 65520
        if beyond.any():
            with pytest.raises(ValueError, match=r"outside F16's range \(\|x\| <= 65519.996"):
                kernels.quantize(v[: v.size // 8 * 8].reshape(-1, 8), "F16")
        v = v[~beyond]
        x = v[: v.size // 8 * 8].reshape(-1, 8)
        got = kernels.quantize(x, "F16")
        assert np.array_equal(got, gguf_quantize(x, "F16").view(np.uint8))
        assert np.array_equal(kernels.dequantize(got, "F16"), gguf_dequantize(got.view(np.float16), "F16"))


def test_bf16_bytes_identical_to_gguf():
    rng = np.random.default_rng(6)
    for v in (_bf16_edge_values(rng), rng.integers(0, 0x7F800000, 200000, dtype=np.uint32).view(np.float32)):
        # values that round to inf in bfloat16 (|x| >= 0x1.ffp127) are refused; every other one is gguf's
        beyond = np.abs(v) >= np.float32(float.fromhex("0x1.ffp127"))
        if beyond.any():
            with pytest.raises(ValueError, match=r"outside BF16's range"):
                kernels.quantize(v[: v.size // 16 * 16].reshape(-1, 16), "BF16")
        v = v[~beyond]
        x = v[: v.size // 16 * 16].reshape(-1, 16)
        got = kernels.quantize(x, "BF16")
        want = gguf_quantize(x, "BF16")
        assert np.array_equal(got, want.view(np.uint8).reshape(got.shape))
        assert np.array_equal(kernels.dequantize(got, "BF16"), gguf_dequantize(want, "BF16"))
    # bf16 input to BF16 and f16 input to F16 are the identity
    t = torch.from_numpy(rng.standard_normal((4, 64)).astype(np.float32)).to(torch.bfloat16)
    assert np.array_equal(kernels.quantize(t, "BF16"), t.view(torch.int16).numpy().view(np.uint8))
    h = rng.standard_normal((4, 64)).astype(np.float16)
    assert np.array_equal(kernels.quantize(h, "F16"), h.view(np.uint8))


# ---- inputs of other dtypes -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", LEGACY)
def test_half_and_bfloat16_inputs_match_their_float32_widening(fmt):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 4, 128)).astype(np.float32)
    imp = np.exp(rng.standard_normal((3, 128))).astype(np.float32)
    h = x.astype(np.float16)
    b = torch.from_numpy(x).to(torch.bfloat16)
    for w in (None, imp):
        assert np.array_equal(kernels.quantize(h, fmt, w), kernels.quantize(h.astype(np.float32), fmt, w))
        assert np.array_equal(kernels.quantize(torch.from_numpy(h), fmt, w),
                              kernels.quantize(h.astype(np.float32), fmt, w))
        assert np.array_equal(kernels.quantize(b, fmt, w), kernels.quantize(b.float().numpy(), fmt, w))


# ---- importance ----------------------------------------------------------------------------------

def weighted_sse(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """per-block sum w (x - y)^2 over blocks of 32, float64"""
    d = x.astype(np.float64) - y.astype(np.float64)
    return (np.broadcast_to(w, x.shape).astype(np.float64) * d * d).reshape(-1, 32).sum(axis=1)


@pytest.mark.parametrize("fmt", WEIGHTED)
def test_importance_lowers_the_weighted_error(fmt):
    rng = np.random.default_rng(21)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    imp = np.exp(2 * rng.standard_normal(1024)).astype(np.float32)  # skewed importance
    plain = kernels.dequantize(kernels.quantize(x, fmt), fmt)
    weighted = kernels.dequantize(kernels.quantize(x, fmt, imp), fmt)
    e_plain = weighted_sse(x, plain, imp).sum()
    e_weighted = weighted_sse(x, weighted, imp).sum()
    assert e_weighted < 0.9 * e_plain, (e_weighted, e_plain)


@pytest.mark.parametrize("fmt", WEIGHTED)
def test_weighted_blocks_never_worse_than_the_plain_rule(fmt):
    # By construction (q_legacy.c keeps the plain rule's block when the search does not beat it), every
    # block's weighted error is at most the plain (gguf) block's, up to float32 summation in the comparison.
    rng = np.random.default_rng(22)
    for i in range(12):
        x = sample(rng, (16, 256), KINDS[i % len(KINDS)])
        imp = np.exp(2 * rng.standard_normal(256)).astype(np.float32)
        imp[rng.random(256) < 0.1] = 0.0  # some columns carry no weight
        plain = kernels.dequantize(gguf_quantize(x, fmt), fmt)
        weighted = kernels.dequantize(kernels.quantize(x, fmt, imp), fmt)
        e_plain = weighted_sse(x, plain, imp)
        e_weighted = weighted_sse(x, weighted, imp)
        assert np.all(e_weighted <= e_plain * (1 + 1e-5) + 1e-30), KINDS[i % len(KINDS)]


@pytest.mark.parametrize("fmt", WEIGHTED + ["Q8_0"])
def test_per_expert_importance(fmt):
    rng = np.random.default_rng(23)
    x = rng.standard_normal((3, 4, 256)).astype(np.float32)
    imp = np.exp(2 * rng.standard_normal((3, 256))).astype(np.float32)
    got = kernels.quantize(x, fmt, imp)
    for e in range(3):
        assert np.array_equal(got[e], kernels.quantize(x[e], fmt, imp[e]))
    if fmt != "Q8_0":  # Q8_0 ignores importance
        assert not np.array_equal(got, kernels.quantize(x, fmt, imp[0]))
    qe = kernels.quant_error(x, [fmt], imp)
    for e in range(3):
        one = kernels.quant_error(x[e], [fmt], imp[e])
        np.testing.assert_allclose(qe.err[0, e], one.err[0, 0], rtol=1e-12)
        np.testing.assert_allclose(qe.norm[e], one.norm[0], rtol=1e-12)


@pytest.mark.parametrize("fmt", LEGACY)
def test_quant_error_agrees_with_quantize_dequantize(fmt):
    rng = np.random.default_rng(24)
    for shape, imp_shape in [((8, 256), None), ((8, 256), (256,)), ((3, 5, 128), (3, 128)), ((3, 5, 128), None)]:
        x = rng.standard_t(4, shape).astype(np.float32)
        imp = None if imp_shape is None else np.exp(rng.standard_normal(imp_shape)).astype(np.float32)
        qe = kernels.quant_error(x, [fmt, "F16"], imp)
        y = kernels.dequantize(kernels.quantize(x, fmt, imp), fmt)
        w = np.ones(shape[-1]) if imp is None else imp
        w = np.broadcast_to(w[:, None, :] if (imp is not None and imp.ndim == 2) else w, shape).astype(np.float64)
        groups = 1 if len(shape) == 2 else shape[0]
        err = (w * (x.astype(np.float64) - y) ** 2).reshape(groups, -1).sum(axis=1)
        norm = (w * x.astype(np.float64) ** 2).reshape(groups, -1).sum(axis=1)
        np.testing.assert_allclose(qe.err[0], err, rtol=1e-6)
        np.testing.assert_allclose(qe.norm, norm, rtol=1e-6)


# ---- edge cases ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", LEGACY)
def test_edge_cases_stay_finite(fmt):
    rng = np.random.default_rng(25)
    imp = np.exp(rng.standard_normal(128)).astype(np.float32)
    cases = {
        "zeros": np.zeros((4, 128)),
        "constant": np.full((4, 128), -2.75),
        "outliers": np.where(rng.random((4, 128)) < 0.02, 1e4, rng.standard_normal((4, 128))),
        "tiny": rng.standard_normal((4, 128)) * 1e-7,
        "float32-subnormal": rng.standard_normal((4, 128)) * 1e-40,
    }
    for name, x in cases.items():
        x = x.astype(np.float32)
        for w in (None, imp):
            y = kernels.dequantize(kernels.quantize(x, fmt, w), fmt)
            assert np.all(np.isfinite(y)), (name, w is None)
            if name in ("zeros", "float32-subnormal"):
                assert np.all(np.abs(y) <= np.abs(x).max()), name
            if name == "constant":  # one level carries it, up to the fp16 rounding of the scale
                assert np.allclose(y, x, rtol=2.0 ** -11, atol=0), name


# ---- property tests ----------------------------------------------------------------------------------

U = 2.0 ** -24  # float32 unit roundoff
ABS = 1e-36  # when 1/d overflows (float32-subnormal d) the block decodes to 0 or the min: |x| < 1e-36 there


def plain_bound(fmt: str, x: np.ndarray) -> np.ndarray:
    """Per-weight bound on |x - dequant(quant(x))| for the plain (no importance) rule, float64.

    d is the float32 scale the rule computes, dh its fp16 rounding, m / mh the min and its rounding.
    Q8_0:  q = round(x/d) with |x/d| <= 127, so |x - q d| <= d/2 (+ a few float32 roundings of x/d,
           < 1e-4 d); decoding with dh adds |q| |d - dh| <= 127 |d - dh| and one product rounding.
    Q4_0:  level = floor(x/d + 1/2) in [-8, 7], x/d in [-8, 8]: |x - level d| <= |d| / 2, except the
           clamp 8 -> 7 (x/d >= 7.5): <= |d|; decoding: + 8 |d - dh|.   Q5_0: the same with 16.
    Q4_1:  level = round((x - m)/d) in [0, 15], (x - m)/d in [0, 15]: <= d/2; decoding d*q + m with dh,
           mh: + 15 |d - dh| + |m - mh| and two roundings.           Q5_1: the same with 31.
    """
    b = x.reshape(-1, 32)
    if fmt in ("Q8_0", "Q4_0", "Q5_0"):
        nmax = {"Q8_0": 127, "Q4_0": 8, "Q5_0": 16}[fmt]
        if fmt == "Q8_0":
            d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
        else:
            d = (b[np.arange(b.shape[0]), np.abs(b).argmax(axis=1)] / np.float32(-nmax)).astype(np.float32)
        dh = d.astype(np.float16).astype(np.float64)
        d = np.abs(d.astype(np.float64))
        half = 0.5001 if fmt == "Q8_0" else 1.0001
        bound = half * d + nmax * np.abs(d - np.abs(dh)) + 4 * U * nmax * np.abs(dh)
    else:
        nmax = {"Q4_1": 15, "Q5_1": 31}[fmt]
        m = b.min(axis=1)
        d = ((b.max(axis=1) - m) / np.float32(nmax)).astype(np.float32)
        dh = d.astype(np.float16).astype(np.float64)
        mh = m.astype(np.float16).astype(np.float64)
        d = d.astype(np.float64)
        bound = 0.5001 * d + nmax * np.abs(d - dh) + np.abs(m - mh) + 4 * U * (nmax * dh + np.abs(mh))
    return np.repeat(bound + ABS, 32).reshape(x.shape)


def tensors(max_abs: float | None):
    """2-D / 3-D float32 tensors with rows of 32..128; finite values, optionally bounded."""
    shape = st.one_of(
        st.tuples(st.integers(1, 3), st.sampled_from([32, 64, 128])),
        st.tuples(st.integers(1, 2), st.integers(1, 3), st.sampled_from([32, 64])),
    )
    if max_abs is None:
        elements = st.floats(width=32, allow_nan=False, allow_infinity=False)
    else:
        elements = st.floats(-max_abs, max_abs, width=32, allow_nan=False)
    return shape.flatmap(lambda s: hnp.arrays(np.float32, s, elements=elements))


@pytest.mark.parametrize("fmt", LEGACY)
@SETTINGS
@given(x=tensors(None), data=st.data())
def test_property_quantize_never_crashes(fmt, x, data):
    w = data.draw(hnp.arrays(np.float32, (x.shape[-1],),
                             elements=st.floats(0, float(np.float32(1e30)), width=32)) | st.none())
    if np.abs(x).max() > kernels.format_range(fmt):  # beyond the fp16 scale: refused, by name
        with pytest.raises(ValueError, match=f"outside {fmt}'s range"):
            kernels.quantize(x, fmt, w)
        return
    q = kernels.quantize(x, fmt, w)
    assert q.shape == (*x.shape[:-1], formats.get(fmt).row_bytes(x.shape[-1]))
    y = kernels.dequantize(q, fmt)
    assert y.shape == x.shape and np.isfinite(y).all()


@pytest.mark.parametrize("fmt", LEGACY)
@SETTINGS
@given(x=tensors(1e4))
def test_property_plain_error_within_bound(fmt, x):
    y = kernels.dequantize(kernels.quantize(x, fmt), fmt).astype(np.float64)
    err = np.abs(x.astype(np.float64) - y)
    bound = plain_bound(fmt, x)
    assert np.all(err <= bound), float((err - bound).max())
