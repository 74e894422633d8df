"""IQ4_NL and IQ4_XS (non-linear 4-bit grid) against the `gguf` package's decoder, and their error."""

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

IQ4 = ["IQ4_NL", "IQ4_XS"]
QT = gguf.GGMLQuantizationType
GRID32 = ref.IQ4_GRID.astype(np.float32)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gguf_dequantize(data, fmt):
    return gguf.quants.dequantize(data, QT[fmt])


def block(fmt):
    return formats.get(fmt).block_size


def random_shape(rng, fmt):
    cols = block(fmt) * int(rng.integers(1, 4))
    if rng.random() < 0.5:
        return (int(rng.integers(1, 6)), cols)
    return (int(rng.integers(1, 4)), int(rng.integers(1, 4)), cols)


KINDS = ["gauss", "t3", "positive", "sparse", "outliers", "tiny", "constant"]


def sample(rng, shape, kind):
    if kind == "gauss":
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 3)
    elif kind == "t3":
        x = rng.standard_t(3, shape)
    elif kind == "positive":
        x = 3.0 + rng.random(shape)
    elif kind == "sparse":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.15)
    elif kind == "outliers":
        x = rng.standard_normal(shape)
        x.reshape(-1)[rng.choice(x.size, size=max(1, x.size // 100), replace=False)] = -2e3
    elif kind == "tiny":  # fp16-subnormal scales
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-8, -5)
    elif kind == "constant":
        x = np.full(shape, rng.uniform(-5, 5))
    else:
        raise ValueError(kind)
    return np.asarray(x, dtype=np.float32)


# ---- the simple rule, in numpy: what the search must never lose to ---------------------------------

def nearest_decode(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x (n, 32) float32, scale (n,) float32 -> the decoded grid values nearest to each x (float32)."""
    levels = scale.astype(np.float32)[:, None, None] * GRID32[None, None, :]  # (n, 1, 16), as decoded
    k = np.abs(x[:, :, None].astype(np.float64) - levels).argmin(axis=2)
    return np.take_along_axis(np.broadcast_to(levels, (*x.shape, 16)), k[..., None], axis=2)[..., 0]


def first_signed_max(b: np.ndarray) -> np.ndarray:
    return b[np.arange(b.shape[0]), np.abs(b).argmax(axis=1)]


def simple_rule(x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded values of the simple rule and a per-weight bound on its error, shaped (blocks, 32).

    IQ4_NL: d = max/-127 (max: the signed value of largest magnitude), dh = fp16(d), nearest grid value.
    IQ4_XS: sub-block scales s_b = max_b/-127; d = s_max/-32 (s_max: the s_b of largest magnitude),
            dh = fp16(d), l_b = clip(round(s_b/dh), -32, 31), scale dl_b = dh l_b, nearest grid value.
    Bound, per weight with block scale s (dh or dl_b) and block max m: inside the grid's span the
    nearest grid value is at most half the widest gap (24, between 89 and 113) away: 12 |s|; beyond it
    (the grid ends at -127 and 113, and the max sits on the -127 side) at most |m| - 113 |s|.
    """
    if fmt == "IQ4_NL":
        b = x.reshape(-1, 32)
        m = first_signed_max(b)
        s = (m / np.float32(-127)).astype(np.float32).astype(np.float16).astype(np.float32)
    else:
        b = x.reshape(-1, 8, 32)
        m = first_signed_max(b.reshape(-1, 32)).reshape(-1, 8)
        sb = (m / np.float32(-127)).astype(np.float32)
        smax = first_signed_max(sb)
        dh = (smax / np.float32(-32)).astype(np.float32).astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(dh[:, None] != 0, sb / dh[:, None], 0).astype(np.float32)
        l_b = np.clip(np.rint(np.clip(r, -33, 32)), -32, 31).astype(np.float32)
        s = (dh[:, None] * l_b).astype(np.float32).reshape(-1)
        b = b.reshape(-1, 32)
        m = m.reshape(-1)
    y = nearest_decode(b, s)
    s64, m64 = np.abs(s.astype(np.float64)), np.abs(m.astype(np.float64))
    bound = np.maximum(12 * s64, m64 - 113 * s64) * (1 + 1e-5) + 1e-36
    return y, np.repeat(bound[:, None], 32, axis=1)


def block_sse(x, y, w=None):
    d = x.reshape(-1, 32).astype(np.float64) - y.reshape(-1, 32).astype(np.float64)
    ww = np.ones_like(d) if w is None else np.broadcast_to(w, x.shape).reshape(-1, 32).astype(np.float64)
    return (ww * d * d).sum(axis=1)


def super_sums(v, fmt):
    """sum over the format's blocks of per-32 values"""
    return v.reshape(-1, block(fmt) // 32).sum(axis=1)


# ---- the grid and decoding ---------------------------------------------------------------------------

def test_grid_matches_gguf():
    assert tuple(int(v) for v in ref.IQ4_GRID) == tuple(gguf.quants.IQ4_NL.kvalues)
    # the C kernel's table: one IQ4_NL block with d = 1.0 and indices 0..15, 15..0
    qs = np.arange(16, dtype=np.uint8) | (np.arange(15, -1, -1, dtype=np.uint8) << 4)
    blk = np.concatenate([np.array([1.0], np.float16).view(np.uint8), qs])[None, :]
    got = kernels.dequantize(blk, "IQ4_NL")
    assert np.array_equal(got[0], np.r_[GRID32, GRID32[::-1]])


@pytest.mark.parametrize("fmt", IQ4)
def test_dequantize_identical_to_gguf_on_any_bytes(fmt):
    rng = np.random.default_rng(41)
    f = formats.get(fmt)
    for shape in [(4, 2 * f.block_size), (2, 3, f.block_size)]:
        nrows = int(np.prod(shape[:-1]))
        data = rng.integers(0, 256, (nrows, f.row_bytes(shape[-1])), dtype=np.uint8)
        blocks = data.reshape(nrows, -1, f.type_size)
        hi = blocks[:, :, 1]
        blocks[:, :, 1] = np.where((hi & 0x7C) == 0x7C, hi & 0xFB, hi)  # finite fp16 scale
        data = data.reshape(*shape[:-1], -1)
        got = kernels.dequantize(data, fmt)
        assert got.shape == shape
        assert np.array_equal(got, gguf_dequantize(data, fmt))
        assert np.array_equal(got, ref.dequantize(data, fmt))


@pytest.mark.parametrize("fmt", IQ4)
def test_dequantize_of_quantize_identical_to_gguf(fmt):
    rng = np.random.default_rng(42)
    for i in range(21):
        x = sample(rng, random_shape(rng, fmt), KINDS[i % len(KINDS)])
        imp = None
        if i % 3 == 1:
            imp = np.exp(2 * rng.standard_normal(x.shape[-1])).astype(np.float32)
        elif i % 3 == 2 and x.ndim == 3:  # per-expert importance
            imp = np.exp(2 * rng.standard_normal((x.shape[0], x.shape[-1]))).astype(np.float32)
        q = kernels.quantize(x, fmt, imp)
        got = kernels.dequantize(q, fmt)
        assert np.array_equal(got, gguf_dequantize(q, fmt)), KINDS[i % len(KINDS)]
        assert np.array_equal(got, ref.dequantize(q, fmt))
        assert np.all(np.isfinite(got))


# ---- error -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_rmse_at_most_ggml_reference():
    # ggml figures (llama.cpp commit 0c1e57098bba, one thread), RMSE/std on 4096 x 4096
    limits = {"gauss": (0.0761, 0.0767), "gauss, importance = ones": (0.0749, 0.0756), "t3": (0.101, 0.102)}
    w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    t3 = np.random.default_rng(0).standard_t(3, size=(4096, 4096)).astype(np.float32)
    for name, x, imp in [("gauss", w, None), ("gauss, importance = ones", w, np.ones(4096, np.float32)),
                         ("t3", t3, None)]:
        qe = kernels.quant_error(x, IQ4, imp)
        rel = np.sqrt(qe.err[:, 0] / x.size) / x.std()
        assert rel[0] <= limits[name][0], (name, "IQ4_NL", rel[0])
        assert rel[1] <= limits[name][1], (name, "IQ4_XS", rel[1])


@pytest.mark.parametrize("fmt", IQ4)
def test_never_worse_than_the_simple_rule(fmt):
    # q_iq4.c evaluates the simple rule as one candidate and keeps the smaller error (block error for
    # IQ4_NL, super-block error for IQ4_XS), so this holds up to float32 summation.
    rng = np.random.default_rng(43)
    for i in range(14):
        x = sample(rng, (4, 512), KINDS[i % len(KINDS)])
        imp = None
        if i % 2 == 1:
            imp = np.exp(2 * rng.standard_normal(512)).astype(np.float32)
            imp[rng.random(512) < 0.1] = 0.0  # columns without weight,
            imp[32:64] = 0.0  # a whole block / sub-block without weight
        y = kernels.dequantize(kernels.quantize(x, fmt, imp), fmt)
        y_simple, bound = simple_rule(x, fmt)
        e = super_sums(block_sse(x, y, imp), fmt)
        e_simple = super_sums(block_sse(x, y_simple, imp), fmt)
        assert np.all(e <= e_simple * (1 + 1e-5) + 1e-30), KINDS[i % len(KINDS)]
        assert np.all(np.abs(x.reshape(-1, 32) - y_simple) <= bound)
        if KINDS[i % len(KINDS)] in ("gauss", "t3"):  # and the search does gain (about 15% on gaussian data)
            assert e.sum() < 0.95 * e_simple.sum()


@pytest.mark.parametrize("fmt", IQ4)
def test_weights_sit_on_the_nearest_grid_value(fmt):
    # for the stored scale(s), every weight decodes to the grid value nearest to it (ties and float32
    # rounding of x/scale aside)
    rng = np.random.default_rng(44)
    x = rng.standard_t(4, (6, 512)).astype(np.float32)
    xb = x.reshape(-1, 32).astype(np.float64)
    for imp in (None, np.exp(2 * rng.standard_normal(512)).astype(np.float32)):
        q = kernels.quantize(x, fmt, imp)
        y = kernels.dequantize(q, fmt).reshape(-1, 32)
        near = nearest_decode(x.reshape(-1, 32), stored_scales(q, fmt))
        assert np.all(np.abs(xb - y) <= np.abs(xb - near) * (1 + 1e-6) + 1e-30)


@pytest.mark.parametrize("fmt", IQ4)
def test_unbiased_scale_with_the_points_chosen_at_it(fmt):
    # q_iq4.c multiplies the searched scale by sum w x^2 / sum w x x_hat (gain 1, kernels/csrc/debias.c)
    # and then chooses every weight's grid value again at the rescaled fp16 scale: the weighted gain is
    # ~1 (it was 0.993 before the rescale), every weight sits on the grid value nearest to it at the
    # scale actually stored, and no block (IQ4_XS: super-block) is worse than the simple rule.
    rng = np.random.default_rng(50)
    x = (rng.standard_t(6, (64, 1024)) * rng.uniform(0.5, 2.0, (64, 1))).astype(np.float32)
    xd = x.astype(np.float64)
    for imp in (None, rng.lognormal(0.0, 0.5, 1024).astype(np.float32)):
        q = kernels.quantize(x, fmt, imp)
        y = kernels.dequantize(q, fmt).astype(np.float64)
        w = np.ones(1024) if imp is None else imp.astype(np.float64)
        gains = (w * xd * y).sum(axis=1) / (w * xd * xd).sum(axis=1)
        assert 0.998 <= float(np.median(gains)) <= 1.002, (fmt, float(np.median(gains)))
        near = nearest_decode(x.reshape(-1, 32), stored_scales(q, fmt))
        xb = xd.reshape(-1, 32)
        assert np.all(np.abs(xb - y.reshape(-1, 32)) <= np.abs(xb - near) * (1 + 1e-6) + 1e-30)
        y_simple, _ = simple_rule(x, fmt)
        e = super_sums(block_sse(x, y, imp), fmt)
        e_simple = super_sums(block_sse(x, y_simple, imp), fmt)
        assert np.all(e <= e_simple * (1 + 1e-5) + 1e-30)


def stored_scales(q: np.ndarray, fmt: str) -> np.ndarray:
    """the float32 scale of every 32 weights (d for IQ4_NL, d * l_b for IQ4_XS)"""
    f = formats.get(fmt)
    b = np.ascontiguousarray(q).reshape(-1, f.type_size)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
    if fmt == "IQ4_NL":
        return d[:, 0]
    return (d * ref.iq4_xs_scales(b).astype(np.float32)).reshape(-1)


@pytest.mark.parametrize("fmt", IQ4)
def test_importance_lowers_the_weighted_error(fmt):
    rng = np.random.default_rng(45)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    imp = np.exp(2 * rng.standard_normal(1024)).astype(np.float32)
    plain = kernels.dequantize(kernels.quantize(x, fmt), fmt)
    weighted = kernels.dequantize(kernels.quantize(x, fmt, imp), fmt)
    e_plain = block_sse(x, plain, imp).sum()
    e_weighted = block_sse(x, weighted, imp).sum()
    assert e_weighted < 0.9 * e_plain, (e_weighted, e_plain)


@pytest.mark.parametrize("fmt", IQ4)
def test_per_expert_importance(fmt):
    rng = np.random.default_rng(46)
    x = rng.standard_normal((3, 2, 512)).astype(np.float32)
    imp = np.exp(2 * rng.standard_normal((3, 512))).astype(np.float32)
    got = kernels.quantize(x, fmt, imp)
    for e in range(3):
        assert np.array_equal(got[e], kernels.quantize(x[e], fmt, imp[e]))
    assert not np.array_equal(got, kernels.quantize(x, fmt, imp[0]))


@pytest.mark.parametrize("fmt", IQ4)
def test_quant_error_agrees_with_quantize_dequantize(fmt):
    rng = np.random.default_rng(47)
    x = rng.standard_t(5, (2, 3, 512)).astype(np.float32)
    for imp in (None, np.exp(rng.standard_normal((2, 512))).astype(np.float32)):
        qe = kernels.quant_error(x, [fmt], imp)
        y = kernels.dequantize(kernels.quantize(x, fmt, imp), fmt).astype(np.float64)
        w = np.ones((2, 1, 512)) if imp is None else imp[:, None, :]
        np.testing.assert_allclose(qe.err[0], (w * (x - y) ** 2).reshape(2, -1).sum(axis=1), rtol=1e-6)


@pytest.mark.parametrize("fmt", IQ4)
def test_half_and_bfloat16_inputs_match_their_float32_widening(fmt):
    rng = np.random.default_rng(48)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    imp = np.exp(rng.standard_normal(256)).astype(np.float32)
    h = x.astype(np.float16)
    b = torch.from_numpy(x).to(torch.bfloat16)
    for w in (None, imp):
        assert np.array_equal(kernels.quantize(h, fmt, w), kernels.quantize(h.astype(np.float32), fmt, w))
        assert np.array_equal(kernels.quantize(torch.from_numpy(h), fmt, w),
                              kernels.quantize(h.astype(np.float32), fmt, w))
        assert np.array_equal(kernels.quantize(b, fmt, w), kernels.quantize(b.float().numpy(), fmt, w))


@pytest.mark.parametrize("fmt", IQ4)
def test_edge_cases(fmt):
    rng = np.random.default_rng(49)
    n = block(fmt)
    imp = np.exp(rng.standard_normal(2 * n)).astype(np.float32)
    zero_imp = np.zeros(2 * n, np.float32)
    cases = {
        "zeros": np.zeros((3, 2 * n)),
        "constant": np.full((3, 2 * n), 0.4375),
        "outliers": np.where(rng.random((3, 2 * n)) < 0.01, 5e3, rng.standard_normal((3, 2 * n))),
        "tiny": rng.standard_normal((3, 2 * n)) * 1e-7,
        "float32-subnormal": rng.standard_normal((3, 2 * n)) * 1e-40,
        "at the edge of the range": rng.uniform(-1, 1, (3, 2 * n)) * kernels.format_range(fmt),
    }
    for name, x in cases.items():
        x = x.astype(np.float32)
        for w in (None, imp, zero_imp):
            y = kernels.dequantize(kernels.quantize(x, fmt, w), fmt)
            assert np.all(np.isfinite(y)), name
            if name == "zeros":
                assert np.array_equal(y, np.zeros_like(y))
            if name == "constant":  # 0.4375 = 113 * dh for an fp16 dh, or close to it
                assert np.allclose(y, x, rtol=2e-3), name
    with pytest.raises(ValueError, match=f"outside {fmt}'s range"):  # beyond it: refused
        kernels.quantize((rng.standard_normal((3, 2 * n)) * 1e9).astype(np.float32), fmt)
    for shape in [(1, n), (1, 1, n), (7, 3 * n)]:
        x = rng.standard_normal(shape).astype(np.float32)
        q = kernels.quantize(x, fmt)
        assert q.shape == (*shape[:-1], formats.get(fmt).row_bytes(shape[-1]))
        assert kernels.dequantize(q, fmt).shape == shape


# ---- property tests ----------------------------------------------------------------------------------

def tensors(fmt, max_abs):
    n = block(fmt)
    shape = st.one_of(st.tuples(st.integers(1, 3), st.sampled_from([n, 2 * n])),
                      st.tuples(st.integers(1, 2), st.integers(1, 2), st.just(n)))
    elements = (st.floats(width=32, allow_nan=False, allow_infinity=False) if max_abs is None
                else st.floats(-max_abs, max_abs, width=32, allow_nan=False))
    return shape.flatmap(lambda s: hnp.arrays(np.float32, s, elements=elements))


@pytest.mark.parametrize("fmt", IQ4)
@SETTINGS
@given(data=st.data())
def test_property_quantize_never_crashes(fmt, data):
    x = data.draw(tensors(fmt, None))
    w = data.draw(hnp.arrays(np.float32, (x.shape[-1],), elements=st.floats(0, float(np.float32(1e30)), width=32))
                  | st.none())
    if np.abs(x).max() > kernels.format_range(fmt):  # beyond the fp16 scale: refused, by name
        with pytest.raises(ValueError, match=f"outside {fmt}'s range"):
            kernels.quantize(x, fmt, w)
        return
    y = kernels.dequantize(kernels.quantize(x, fmt, w), fmt)
    assert y.shape == x.shape
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("fmt", IQ4)
@SETTINGS
@given(data=st.data())
def test_property_error_within_bound(fmt, data):
    # Bound: the search never loses to the simple rule (test_never_worse_than_the_simple_rule), whose
    # per-weight error is at most max(12 |s|, |m| - 113 |s|) (see simple_rule); so the squared error
    # of every block (super-block for IQ4_XS) is at most the sum of those bounds squared.
    x = data.draw(tensors(fmt, 1e5))
    y = kernels.dequantize(kernels.quantize(x, fmt), fmt)
    _, bound = simple_rule(x, fmt)
    e = super_sums(block_sse(x, y), fmt)
    limit = super_sums((bound.astype(np.float64) ** 2).sum(axis=1), fmt)
    assert np.all(e <= limit * (1 + 1e-5) + 1e-60)
    scale = stored_scales(kernels.quantize(x, fmt), fmt)
    near = nearest_decode(x.reshape(-1, 32), scale)
    xb = x.reshape(-1, 32).astype(np.float64)
    assert np.all(np.abs(xb - y.reshape(-1, 32)) <= np.abs(xb - near) * (1 + 1e-6) + 1e-30)
