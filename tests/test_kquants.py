"""The k-quant kernels (Q2_K .. Q6_K): GGUF byte compatibility, quantization quality, edge cases.

Two independent decoders check every byte the C kernels write: the `gguf` package's
`gguf.quants.dequantize` and kernels/ref_k.py (numpy, written from the block layouts). Both must
agree with the C dequantizer bit for bit.
"""

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeplan import kernels
from moeplan.kernels import ref_k

KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
UNBIASED = KQUANTS  # every k-quant rescales its super-blocks to gain 1 (kernels/csrc/debias.c)

# ggml's RMSE/std on the 4096 x 4096 gaussian / Student-t(3) data
# (llama.cpp commit 0c1e57098bba, one thread): the kernels must do at least as well.
GGML_RMSE = {
    # fmt: (no importance, importance = ones, t3 no importance)
    "Q2_K": (0.2966, 0.2680, 0.349),
    "Q3_K": (0.1509, 0.1446, 0.188),
    "Q4_K": (0.0714, 0.0707, 0.092),
    "Q5_K": (0.0361, 0.0354, 0.047),
    "Q6_K": (0.0177, 0.0173, 0.026),
}

# Per-format bound on max |error| / max |x| within a 256-block (no importance, values within the
# format's fp16 range), in steps of a grid spanning the whole block, [-max|x|, max|x|], with the
# format's levels: step = 2 / (levels - 1), no sub-block's step being larger by much. Nearest
# rounding errs by at most half a step inside the range a sub-block covers; beyond it, the
# least-squares choice of step (and min) may clip an extreme when that lowers the sub-block's total
# squared error, which bounds the clipped amount by about one step. For the symmetric formats the
# candidate steps are at least rlo * extreme / N, so the short side clips by at most
# (1 - (N-1) rlo / N) extreme + (N-1) d / 2: 1.19 steps for Q3_K, 1.42 for Q6_K. Bound: 1.5 steps
# (the worst seen over 48k gaussian, heavy-tailed, sparse, lattice and mixed-magnitude blocks:
# 1.14 steps).
MAX_ERR_PER_BLOCK = {fmt: 1.5 * 2 / (levels - 1) for fmt, levels in
                     {"Q2_K": 4, "Q3_K": 8, "Q4_K": 16, "Q5_K": 32, "Q6_K": 64}.items()}


def gguf_decode(q: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.dequantize(q, gguf.GGMLQuantizationType[fmt])


def roundtrip(x, fmt, importance=None, **kw):
    q = kernels.quantize(x, fmt, importance, **kw)
    return q, kernels.dequantize(q, fmt)


def assert_decoders_agree(q: np.ndarray, fmt: str, y: np.ndarray) -> None:
    """The C decode y of bytes q equals both independent decoders bit for bit."""
    g = gguf_decode(q, fmt)
    r = ref_k.dequantize(q, fmt)
    assert g.shape == y.shape == r.shape
    assert np.array_equal(g, y), f"{fmt}: gguf decodes the bytes differently"
    assert np.array_equal(r, y), f"{fmt}: ref_k decodes the bytes differently"


# ---------------------------------------------------------------------------------------------
# byte compatibility


@pytest.mark.parametrize("fmt", KQUANTS)
def test_decoders_agree_on_random_bytes(fmt):
    """Arbitrary blocks (every scale, min and quant pattern), fp16 fields kept finite."""
    rng = np.random.default_rng(7)
    size = kernels.formats.get(fmt).type_size
    blocks = rng.integers(0, 256, (4, 16 * size), dtype=np.uint8).reshape(4, 16, size)
    fp16_offsets = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[fmt]
    for o in fp16_offsets:
        blocks[..., o + 1] &= 0x3B  # exponent < 31: finite, and |d| < 2^8 keeps products finite
    q = blocks.reshape(4, 16 * size)
    y = kernels.dequantize(q, fmt)
    assert y.shape == (4, 16 * 256)
    assert_decoders_agree(q, fmt, y)


def _random_tensor(rng, shape):
    kind = rng.integers(0, 4)
    if kind == 0:
        x = rng.standard_normal(shape)
    elif kind == 1:
        x = rng.standard_t(3, shape)
    elif kind == 2:
        x = rng.uniform(-1, 1, shape) * 10.0 ** rng.uniform(-4, 3)
    else:
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3, shape[:-1] + (1,))
    return x.astype(np.float32)


@pytest.mark.parametrize("fmt", KQUANTS)
def test_gguf_decodes_our_bytes_exactly(fmt):
    rng = np.random.default_rng(11)
    shapes = [(1, 256), (3, 512), (8, 1024), (5, 2304), (2, 4, 768), (3, 2, 256), (4, 3, 512)]
    for i, shape in enumerate(shapes * 2):
        x = _random_tensor(rng, shape)
        imp = None
        if i % 2:
            imp_shape = (shape[0], shape[-1]) if len(shape) == 3 and i % 4 == 1 else (shape[-1],)
            imp = np.exp(2 * rng.standard_normal(imp_shape)).astype(np.float32)
        q, y = roundtrip(x, fmt, imp)
        assert q.shape == (*shape[:-1], shape[-1] // 256 * kernels.formats.get(fmt).type_size)
        assert y.shape == shape
        assert_decoders_agree(q, fmt, y)


@pytest.mark.parametrize("fmt", KQUANTS)
def test_thread_count_does_not_change_bytes(fmt):
    x = np.random.default_rng(3).standard_normal((37, 512)).astype(np.float32)
    imp = np.random.default_rng(4).random(512).astype(np.float32)
    for w in (None, imp):
        assert np.array_equal(kernels.quantize(x, fmt, w, threads=1), kernels.quantize(x, fmt, w, threads=2))


# ---------------------------------------------------------------------------------------------
# quality against ggml's figures (4096 x 4096, as the reference was measured)


@pytest.fixture(scope="module")
def reference_data():
    g = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    t3 = np.random.default_rng(0).standard_t(3, (4096, 4096)).astype(np.float32)
    return g, t3


@pytest.mark.slow
def test_rmse_at_most_ggml(reference_data):
    """The k-quants rescale each super-block to gain 1 (kernels/csrc/debias.c), which costs a
    least-squares fit of RMSE/std r up to r / sqrt(1 - r^2): the bound against ggml's figure r."""
    g, t3 = reference_data
    ones = np.ones(g.shape[1], dtype=np.float32)
    measured = {}
    for col, (x, imp) in enumerate([(g, None), (g, ones), (t3, None)]):
        qe = kernels.quant_error(x, KQUANTS, imp)
        for fmt, rmse in zip(KQUANTS, qe.rmse() / x.std(dtype=np.float64)):
            measured[fmt, col] = float(rmse)

    def bound(fmt, col):
        r = GGML_RMSE[fmt][col]
        return r / np.sqrt(1.0 - r * r) if fmt in UNBIASED else r

    worse = {k: (v, bound(*k)) for k, v in measured.items() if v > bound(*k)}
    assert not worse, f"rmse/std above ggml's (format, setting): (ours, bound) {worse}"


def test_scale_free_rmse_at_most_ggml(reference_data):
    """The points and relative scales: after the least-squares rescale of the whole
    reconstruction, at least as good as ggml's figure (on a 256-row slice, + 0.003)."""
    g, _ = reference_data
    x = np.ascontiguousarray(g[:256])
    for fmt in UNBIASED:
        for col, imp in ((0, None), (1, np.ones(x.shape[1], np.float32))):
            y = roundtrip(x, fmt, imp)[1].astype(np.float64).ravel()
            x64 = x.astype(np.float64).ravel()
            c = float(x64 @ y / (y @ y))
            r = float(np.sqrt(np.mean((c * y - x64) ** 2)) / x64.std())
            assert r <= GGML_RMSE[fmt][col] + 0.003, (fmt, col, r, GGML_RMSE[fmt][col])


# ---------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("fmt", KQUANTS)
def test_zero_rows_decode_to_zero(fmt):
    x = np.zeros((3, 512), dtype=np.float32)
    for imp in (None, np.ones(512, dtype=np.float32)):
        q, y = roundtrip(x, fmt, imp)
        assert not np.any(y)
        assert_decoders_agree(q, fmt, y)


@pytest.mark.parametrize("fmt", KQUANTS)
@pytest.mark.parametrize("c", [0.7, -3.0, 1000.0, -1e-3, 2e-5])
def test_constant_rows(fmt, c):
    x = np.full((2, 512), c, dtype=np.float32)
    q, y = roundtrip(x, fmt)
    assert_decoders_agree(q, fmt, y)
    # a constant is one level times a 6-bit (Q3_K: signed, -32..31) or finer sub-block scale:
    # within 1% (Q3_K: the nearest of d*s*{1..4} with s <= 32 lies within about 1/64)
    tol = 0.02 if fmt == "Q3_K" else 0.01
    assert np.abs(y - c).max() <= tol * abs(c)


@pytest.mark.parametrize("fmt", KQUANTS)
def test_huge_outliers(fmt):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 1024)).astype(np.float32)
    clean = x.copy()
    spots = [(0, 5, 1e4), (1, 300, -1e4), (2, 700, 1e4), (4, 1000, -1e4)]
    for r, c, v in spots:
        x[r, c] = v
    q, y = roundtrip(x, fmt)
    assert np.isfinite(y).all()
    assert_decoders_agree(q, fmt, y)
    for r, c, v in spots:
        assert abs(y[r, c] - v) <= 0.02 * abs(v), (r, c, y[r, c])
    # super-blocks are independent: those without an outlier are byte-identical to the clean tensor's
    q_clean = kernels.quantize(clean, fmt)
    bs = kernels.formats.get(fmt).type_size
    touched = {(r, c // 256) for r, c, _ in spots}
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // 256):
            same = np.array_equal(q[r, b * bs:(b + 1) * bs], q_clean[r, b * bs:(b + 1) * bs])
            assert same != ((r, b) in touched)


@pytest.mark.parametrize("fmt", KQUANTS)
@pytest.mark.parametrize("scale", [1e-30, 1e-38, 1e-12, 1e-7])
def test_tiny_values_stay_finite(fmt, scale):
    """fp16 scales underflow: blocks decode to (near) zero, never NaN/Inf."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((3, 512)) * scale).astype(np.float32)
    for imp in (None, rng.random(512).astype(np.float32)):
        q, y = roundtrip(x, fmt, imp)
        assert np.isfinite(y).all()
        assert_decoders_agree(q, fmt, y)
        assert np.abs(y - x).max() <= max(np.abs(x).max(), 2.0**-24)


@pytest.mark.parametrize("fmt", KQUANTS)
def test_values_beyond_fp16_scales_are_refused(fmt):
    """fp16 super-block scales top out at 65504: a value beyond what the format's extreme level then
    reaches (kernels.format_range; the smallest is Q2_K's most negative, -15 * 65504) is refused
    with a ValueError that names it, instead of saturating; up to the range, blocks decode closely."""
    rng = np.random.default_rng(14)
    x = (rng.uniform(-1, 1, (3, 512)) * 1e38).astype(np.float32)
    x[0, 0], x[1, 300] = np.finfo(np.float32).max, -np.finfo(np.float32).max
    with pytest.raises(ValueError, match=rf"at row 0, column 0 is outside {fmt}'s range"):
        kernels.quantize(x, fmt)
    R = kernels.format_range(fmt)
    x = (rng.uniform(-1, 1, (3, 512)) * R).astype(np.float32)
    x[0, 0], x[1, 300] = R, -R
    q, y = roundtrip(x, fmt)
    assert np.isfinite(y).all()
    assert_decoders_agree(q, fmt, y)
    assert abs(y[0, 0] - R) <= 0.1 * R and abs(y[1, 300] + R) <= 0.1 * R


@pytest.mark.parametrize("fmt", KQUANTS)
def test_small_values_keep_their_precision(fmt):
    """Weights around 1e-5: the ideal super-block scale is an fp16 subnormal; the kernels keep it
    nonzero and large enough, and the error stays within 25% of that on unit-scale data (Q6_K
    loses most: its integer sub-block scales then run up to about 20 instead of 128)."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    ref = np.sqrt(np.mean((kernels.dequantize(kernels.quantize(x, fmt), fmt) - x) ** 2))
    xs = (x * 1e-5).astype(np.float32)
    _, ys = roundtrip(xs, fmt)
    assert np.sqrt(np.mean((ys - xs) ** 2)) / 1e-5 <= 1.25 * ref


@pytest.mark.parametrize("fmt", KQUANTS)
@pytest.mark.parametrize("shape", [(1, 256), (3, 512), (1, 1, 256), (5, 3, 256)])
def test_small_and_odd_shapes(fmt, shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    q, y = roundtrip(x, fmt)
    assert y.shape == shape
    assert_decoders_agree(q, fmt, y)
    assert np.sqrt(np.mean((y - x) ** 2)) < 2 * GGML_RMSE[fmt][0] * x.std()


@pytest.mark.parametrize("fmt", KQUANTS)
def test_rows_not_multiple_of_256_are_refused(fmt):
    with pytest.raises(ValueError, match="multiple of 256"):
        kernels.quantize(np.zeros((2, 384), dtype=np.float32), fmt)


@pytest.mark.parametrize("fmt", KQUANTS)
def test_per_expert_importance_acts_on_its_expert_only(fmt):
    rng = np.random.default_rng(2)
    E, R, C = 3, 4, 512
    x = rng.standard_normal((E, R, C)).astype(np.float32)
    imp = np.exp(2 * rng.standard_normal((E, C))).astype(np.float32)
    q = kernels.quantize(x, fmt, imp)
    # each expert is quantized with its own importance row ...
    for e in range(E):
        assert np.array_equal(q[e], kernels.quantize(x[e], fmt, imp[e]))
    # ... and changing expert 1's importance changes expert 1's bytes only
    imp2 = imp.copy()
    imp2[1] = np.exp(2 * rng.standard_normal(C))
    q2 = kernels.quantize(x, fmt, imp2)
    assert np.array_equal(q[0], q2[0]) and np.array_equal(q[2], q2[2])
    assert not np.array_equal(q[1], q2[1])


@pytest.mark.parametrize("fmt", KQUANTS)
def test_half_precision_inputs_match_their_float32_widening(fmt):
    rng = np.random.default_rng(6)
    x16 = rng.standard_normal((5, 512)).astype(np.float16)
    assert np.array_equal(kernels.quantize(x16, fmt), kernels.quantize(x16.astype(np.float32), fmt))
    xb = torch.randn(2, 5, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    imp = np.exp(rng.standard_normal(512)).astype(np.float32)
    assert np.array_equal(kernels.quantize(xb, fmt, imp), kernels.quantize(xb.float().numpy(), fmt, imp))


@pytest.mark.parametrize("fmt", KQUANTS)
def test_importance_with_zeros(fmt):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 1024)).astype(np.float32)
    imp = np.exp(rng.standard_normal(1024)).astype(np.float32)
    imp[rng.random(1024) < 0.3] = 0.0
    imp[256:512] = 0.0  # a whole super-block without importance
    q, y = roundtrip(x, fmt, imp)
    assert np.isfinite(y).all()
    assert_decoders_agree(q, fmt, y)
    # no importance anywhere: the plain (unweighted) quantizer
    assert np.array_equal(kernels.quantize(x, fmt, np.zeros(1024, np.float32)), kernels.quantize(x, fmt))
    # zero-importance columns still get a value within the block's range (nothing diverges)
    assert np.abs(y).max() <= 1.5 * np.abs(x).max()


# ---------------------------------------------------------------------------------------------
# importance


@pytest.mark.parametrize("fmt", KQUANTS)
def test_importance_lowers_the_weighted_error(fmt):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((64, 2048)).astype(np.float32)
    imp = np.exp(2 * rng.standard_normal(2048)).astype(np.float32)

    def weighted_err(importance):
        y = kernels.dequantize(kernels.quantize(x, fmt, importance), fmt)
        return float(np.sum(imp * (y.astype(np.float64) - x) ** 2))

    with_imp, without = weighted_err(imp), weighted_err(None)
    assert with_imp < 0.9 * without, (with_imp, without)


@pytest.mark.parametrize("imp_kind", ["none", "skewed"])
def test_quant_error_matches_quantize_dequantize(imp_kind):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 6, 768)).astype(np.float32)  # 2 experts
    imp = None if imp_kind == "none" else np.exp(2 * rng.standard_normal((2, 768))).astype(np.float32)
    qe = kernels.quant_error(x, KQUANTS, imp)
    w = np.ones((2, 768)) if imp is None else imp.astype(np.float64)
    for i, fmt in enumerate(KQUANTS):
        y = kernels.dequantize(kernels.quantize(x, fmt, imp), fmt)
        err = np.sum(w[:, None, :] * (y.astype(np.float64) - x) ** 2, axis=(1, 2))
        np.testing.assert_allclose(qe.err[i], err, rtol=1e-6)
    np.testing.assert_allclose(qe.norm, np.sum(w[:, None, :] * x.astype(np.float64) ** 2, axis=(1, 2)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# properties


@st.composite
def mixed_tensors(draw):
    """Rows 1..8 of 256..1024 finite values: gaussian, heavy-tailed, sparse, or with magnitudes
    mixed per element / per 16-value group over 9 decades (all within |x| < 1e6, where every
    k-quant's fp16 super-block scales can reach)."""
    rows = draw(st.integers(1, 8))
    cols = 256 * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["normal", "per_element", "per_group", "heavy", "sparse", "constant_groups"]))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols))
    if kind == "per_element":
        x *= 10.0 ** rng.uniform(-5, 4, (rows, cols))
    elif kind == "per_group":
        x *= np.repeat(10.0 ** rng.uniform(-5, 4, (rows, cols // 16)), 16, axis=1)
    elif kind == "heavy":
        x = rng.standard_t(1.5, (rows, cols)).clip(-1e5, 1e5)
    elif kind == "sparse":
        x[rng.random((rows, cols)) < 0.7] = 0.0
    elif kind == "constant_groups":
        x = np.repeat(rng.standard_normal((rows, cols // 16)) * 10.0 ** rng.uniform(-3, 3), 16, axis=1)
    return x.astype(np.float32)


@pytest.mark.parametrize("fmt", KQUANTS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=mixed_tensors())
def test_property_roundtrip_error_bounded(fmt, x):
    q, y = roundtrip(x, fmt)
    assert np.isfinite(y).all()
    assert np.array_equal(y, gguf_decode(q, fmt))
    err = np.abs(y - x).reshape(-1, 256).max(axis=1)
    amax = np.abs(x).reshape(-1, 256).max(axis=1)
    assert np.all(err <= MAX_ERR_PER_BLOCK[fmt] * amax), (err / np.maximum(amax, 1e-38)).max()


@pytest.mark.parametrize("fmt", KQUANTS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=mixed_tensors(), imp_seed=st.integers(0, 2**32 - 1), zero_frac=st.sampled_from([0.0, 0.3, 1.0]))
def test_property_any_importance_is_safe(fmt, x, imp_seed, zero_frac):
    rng = np.random.default_rng(imp_seed)
    imp = np.exp(3 * rng.standard_normal(x.shape[1])).astype(np.float32)
    imp[rng.random(x.shape[1]) < zero_frac] = 0.0
    q, y = roundtrip(x, fmt, imp)
    assert np.isfinite(y).all()
    assert np.array_equal(y, gguf_decode(q, fmt))
