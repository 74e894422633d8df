"""TQ1_0 and TQ2_0 (ternary, 256-weight blocks) against the `gguf` package."""

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

TERNARY = ["TQ1_0", "TQ2_0"]
QT = gguf.GGMLQuantizationType
SCALE_OFFSET = {"TQ1_0": 52, "TQ2_0": 64}  # byte offset of the fp16 scale in a block
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gguf_quantize(x, fmt):
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), QT[fmt])


def gguf_dequantize(data, fmt):
    return gguf.quants.dequantize(data, QT[fmt])


def random_shape(rng):
    cols = 256 * int(rng.integers(1, 4))
    if rng.random() < 0.5:
        return (int(rng.integers(1, 6)), cols)
    return (int(rng.integers(1, 4)), int(rng.integers(1, 4)), cols)


def sample(rng, shape, kind):
    if kind == "gauss":
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-5, 3.5)
    elif kind == "ternary":  # ternary-trained weights: {-a, 0, a} with a per tensor
        x = rng.integers(-1, 2, shape) * np.float16(10.0 ** rng.uniform(-3, 2)).astype(np.float64)
    elif kind == "halves":  # amax a power of two and weights at exactly +-amax/2: ties
        x = rng.integers(-2, 3, shape) / 2.0 * 2.0 ** int(rng.integers(-10, 10))
    elif kind == "sparse":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.1)
    elif kind == "outliers":
        x = rng.standard_normal(shape)
        x.reshape(-1)[rng.choice(x.size, size=3, replace=False)] = 3e4
    elif kind == "tiny":  # fp16-subnormal scales
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-8, -5)
    else:
        raise ValueError(kind)
    return np.asarray(x, dtype=np.float32)


KINDS = ["gauss", "ternary", "halves", "sparse", "outliers", "tiny"]


@pytest.mark.parametrize("fmt", TERNARY)
def test_bytes_identical_to_gguf(fmt):
    rng = np.random.default_rng(300 + formats.get(fmt).type_id)
    for i in range(36):
        kind = KINDS[i % len(KINDS)]
        x = sample(rng, random_shape(rng), kind)
        got = kernels.quantize(x, fmt)
        assert np.array_equal(got, gguf_quantize(x, fmt)), (kind, x.shape)
        assert np.array_equal(ref.quantize(x, fmt), got)


@pytest.mark.parametrize("fmt", TERNARY)
def test_special_blocks_identical_to_gguf(fmt):
    rows = [np.zeros(256), np.full(256, 0.75), np.full(256, -3e4),
            np.r_[1.0, -1.0, np.full(254, 0.5)],  # ties: x / amax = 0.5 exactly rounds away from zero
            np.r_[1.0, np.full(255, np.nextafter(np.float32(0.5), np.float32(0)))],  # just below the tie
            np.linspace(-1e-7, 1e-7, 256), np.linspace(-1e-30, 1e-30, 256)]
    x = np.array(rows, dtype=np.float32)
    got = kernels.quantize(x, fmt)
    assert np.array_equal(got, gguf_quantize(x, fmt))
    y = kernels.dequantize(got, fmt)
    assert np.all(np.isfinite(y))
    assert np.array_equal(y[3], np.r_[1.0, -1.0, np.ones(254)].astype(np.float32))
    assert np.array_equal(y[4], np.r_[1.0, np.zeros(255)].astype(np.float32))


@pytest.mark.parametrize("fmt", TERNARY)
def test_ternary_weights_are_reproduced_exactly(fmt):
    rng = np.random.default_rng(31)
    a = np.float32(np.float16(0.0123))  # fp16-exact scale
    t = rng.integers(-1, 2, (6, 512)).astype(np.float32)
    t[:, ::256] = 1  # every block has a nonzero, so d = a
    x = t * a
    assert np.array_equal(kernels.dequantize(kernels.quantize(x, fmt), fmt), x)


@pytest.mark.parametrize("fmt", TERNARY)
def test_dequantize_identical_to_gguf_on_any_bytes(fmt):
    # every byte value decodes the same way in C, numpy and gguf (TQ1_0 bytes 243..255 never come out
    # of the quantizer, but their base-3 decoding is still defined modulo 256)
    rng = np.random.default_rng(32)
    f = formats.get(fmt)
    for shape in [(3, 256), (2, 2, 512)]:
        nrows = int(np.prod(shape[:-1]))
        data = rng.integers(0, 256, (nrows, f.row_bytes(shape[-1])), dtype=np.uint8)
        blocks = data.reshape(nrows, -1, f.type_size)
        hi = blocks[:, :, SCALE_OFFSET[fmt] + 1]
        blocks[:, :, SCALE_OFFSET[fmt] + 1] = np.where((hi & 0x7C) == 0x7C, hi & 0xFB, hi)  # finite scale
        data = data.reshape(*shape[:-1], -1)
        got = kernels.dequantize(data, fmt)
        assert got.shape == shape
        assert np.array_equal(got, gguf_dequantize(data, fmt))
        assert np.array_equal(got, ref.dequantize(data, fmt))


@pytest.mark.parametrize("fmt", TERNARY)
def test_importance_is_ignored(fmt):
    rng = np.random.default_rng(33)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    imp = np.exp(2 * rng.standard_normal((2, 256))).astype(np.float32)
    assert np.array_equal(kernels.quantize(x, fmt, imp), kernels.quantize(x, fmt))


@pytest.mark.parametrize("fmt", TERNARY)
def test_half_and_bfloat16_inputs_match_their_float32_widening(fmt):
    rng = np.random.default_rng(34)
    x = rng.standard_normal((2, 3, 512)).astype(np.float32)
    h = x.astype(np.float16)
    b = torch.from_numpy(x).to(torch.bfloat16)
    assert np.array_equal(kernels.quantize(h, fmt), kernels.quantize(h.astype(np.float32), fmt))
    assert np.array_equal(kernels.quantize(torch.from_numpy(h), fmt), kernels.quantize(h.astype(np.float32), fmt))
    assert np.array_equal(kernels.quantize(b, fmt), kernels.quantize(b.float().numpy(), fmt))


@pytest.mark.parametrize("fmt", TERNARY)
def test_smallest_and_odd_shapes(fmt):
    rng = np.random.default_rng(35)
    for shape in [(1, 256), (1, 1, 256), (5, 768), (3, 7, 256)]:
        x = rng.standard_normal(shape).astype(np.float32)
        q = kernels.quantize(x, fmt)
        assert q.shape == (*shape[:-1], formats.get(fmt).row_bytes(shape[-1]))
        assert np.array_equal(q, gguf_quantize(x, fmt))


@pytest.mark.parametrize("fmt", TERNARY)
def test_quant_error_agrees_with_quantize_dequantize(fmt):
    rng = np.random.default_rng(36)
    x = rng.standard_normal((3, 4, 256)).astype(np.float32)
    imp = np.exp(rng.standard_normal((3, 256))).astype(np.float32)
    qe = kernels.quant_error(x, [fmt], imp)
    y = kernels.dequantize(kernels.quantize(x, fmt, imp), fmt).astype(np.float64)
    err = (imp[:, None, :] * (x - y) ** 2).reshape(3, -1).sum(axis=1)
    np.testing.assert_allclose(qe.err[0], err, rtol=1e-6)
    # gaussian data: about 0.81 RMSE/std by construction (ggml reference figure)
    rel = np.sqrt(((x - y) ** 2).mean()) / x.std()
    assert 0.75 < rel < 0.87


@pytest.mark.parametrize("fmt", TERNARY)
def test_edge_cases_stay_finite(fmt):
    rng = np.random.default_rng(37)
    for x in [np.zeros((2, 256)), np.full((2, 256), 5.0), rng.standard_normal((2, 256)) * 1e-40,
              rng.standard_normal((2, 256)) * 1e-7]:
        y = kernels.dequantize(kernels.quantize(x.astype(np.float32), fmt), fmt)
        assert np.all(np.isfinite(y))
        assert np.all(np.abs(y) <= np.abs(x).max() * (1 + 2.0 ** -11) + 6e-8)


# ---- property tests ----------------------------------------------------------------------------------

def tensors(max_abs):
    shape = st.one_of(st.tuples(st.integers(1, 2), st.sampled_from([256, 512])),
                      st.tuples(st.integers(1, 2), st.integers(1, 2), st.just(256)))
    elements = (st.floats(width=32, allow_nan=False, allow_infinity=False) if max_abs is None
                else st.floats(-max_abs, max_abs, width=32, allow_nan=False))
    return shape.flatmap(lambda s: hnp.arrays(np.float32, s, elements=elements))


@pytest.mark.parametrize("fmt", TERNARY)
@SETTINGS
@given(x=tensors(None))
def test_property_quantize_never_crashes(fmt, x):
    if np.abs(x).max() > 65504:  # the fp16 scale is the block's max |x|: refused beyond, by name
        with pytest.raises(ValueError, match=f"outside {fmt}'s range"):
            kernels.quantize(x, fmt, np.ones(x.shape[-1], np.float32))
        return
    q = kernels.quantize(x, fmt, np.ones(x.shape[-1], np.float32))
    y = kernels.dequantize(q, fmt)
    assert y.shape == x.shape and np.isfinite(y).all()


@pytest.mark.parametrize("fmt", TERNARY)
@SETTINGS
@given(x=tensors(1e4))
def test_property_error_within_bound(fmt, x):
    # d = amax, t = round(x/d) in {-1, 0, 1}: |x - t d| <= d/2 (x/d carries two float32 roundings,
    # ~1e-7 d); decoding with the fp16 dh adds |t| |d - dh| and one product rounding. When 1/d
    # overflows (float32-subnormal amax) the block decodes to 0: |x| < 1e-36.
    b = x.reshape(-1, 256).astype(np.float64)
    d = np.abs(b).max(axis=1, keepdims=True)
    dh = d.astype(np.float32).astype(np.float16).astype(np.float64)
    bound = 0.5001 * d + np.abs(d - dh) + 2.0 ** -23 * dh + 1e-36
    y = kernels.dequantize(kernels.quantize(x, fmt), fmt).astype(np.float64).reshape(b.shape)
    assert np.all(np.abs(b - y) <= bound)
