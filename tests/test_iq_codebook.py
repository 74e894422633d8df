"""The codebook formats IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M.

The `gguf` package's decoder is the independent check of the byte layout; error bounds come from
ggml's own figures (llama.cpp commit 0c1e57098bba: RMSE/std on
W = default_rng(0).standard_normal((4096, 4096)), importance = ones).
"""

import pathlib
import subprocess
import sys

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeplan import kernels
from moeplan.kernels import _C, formats, iq_grids

# ggml's RMSE/std on the 4096 x 4096 gaussian with importance = ones
GGML_RMSE = {
    "IQ3_S": 0.137,
    "IQ3_XXS": 0.182,
    "IQ2_S": 0.249,
    "IQ2_XS": 0.300,
    "IQ2_XXS": 0.344,
    "IQ1_M": 0.451,
    "IQ1_S": 0.485,
}
FORMATS = [name for name in GGML_RMSE if name in kernels.available_formats()]

# Bound on a 256-row slice of the same matrix: ggml's full-matrix figure plus 0.003. Over 256 x 4096
# weights the slice-to-slice standard deviation of RMSE/std is at most 0.0004 for every format here
# (measured on the 16 slices of the full matrix), so 0.003 covers sampling with a wide margin and
# is still far smaller than the gap to the next format.
SLICE_MARGIN = 0.003


_GAUSSIAN = None


def gaussian(rows=4096, cols=4096):
    """The reference matrix (default_rng(0), 4096 x 4096), or a C-contiguous corner of it."""
    global _GAUSSIAN
    if _GAUSSIAN is None:
        _GAUSSIAN = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    return np.ascontiguousarray(_GAUSSIAN[:rows, :cols])


def gguf_decode(q, name):
    return gguf.quants.dequantize(q, gguf.GGMLQuantizationType[name])


def rmse_over_std(x, y):
    return float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2)) / x.std())


def weighted_err(x, y, w):
    return float(np.sum(w * (x.astype(np.float64) - y) ** 2))


def test_all_codebook_formats_have_kernels():
    assert FORMATS == list(GGML_RMSE)
    for name in FORMATS:
        assert formats.get(name).needs_importance


@pytest.mark.parametrize("name", FORMATS)
def test_grid_comes_from_gguf(name):
    g = iq_grids.grid(name)
    cls = getattr(gguf.quants, name)
    assert g.shape == tuple(cls.grid_shape) and g.dtype == np.float32
    assert len(np.unique(g, axis=0)) == len(g)  # distinct points
    iq_grids.check_sign_table()


def test_set_grid_rejects_bad_and_conflicting_grids():
    with pytest.raises(ValueError, match="no codebook"):
        _C.set_grid(int(formats.GGMLType.IQ2_XXS), np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="no codebook"):
        _C.set_grid(int(formats.GGMLType.Q4_K), np.zeros(2048, np.float32))
    iq_grids.load("IQ2_XXS")
    other = iq_grids.grid("IQ2_XXS")[::-1].copy()
    with pytest.raises(ValueError, match="different grid"):
        _C.set_grid(int(formats.GGMLType.IQ2_XXS), other)
    _C.set_grid(int(formats.GGMLType.IQ2_XXS), iq_grids.grid("IQ2_XXS"))  # the same grid again: fine


def test_kernels_refuse_a_codebook_format_before_its_grid_is_loaded():
    code = (
        "import numpy as np\n"
        "from moeplan.kernels import _C\n"
        "x = np.zeros((1, 256), np.float32); out = np.zeros((1, 66), np.uint8)\n"
        "try:\n"
        "    _C.quantize(16, x, 0, 1, 256, out, np.ones(256, np.float32), 1, 1)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert "IQ2_XXS: codebook grid not loaded" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("name", FORMATS)
def test_needs_importance(name):
    x = gaussian(2, 256)
    with pytest.raises(ValueError, match=f"{name} needs importance"):
        kernels.quantize(x, name)
    with pytest.raises(ValueError, match=f"{name} needs importance"):
        kernels.quant_error(x, [name])


@pytest.mark.parametrize("name", FORMATS)
def test_decode_matches_gguf_2d(name):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 1024)) * rng.uniform(0.01, 3, size=(8, 1))).astype(np.float32)
    imp = rng.uniform(0.1, 2, size=1024).astype(np.float32)
    q = kernels.quantize(x, name, imp)
    assert q.shape == (8, formats.get(name).row_bytes(1024))
    y = kernels.dequantize(q, name)
    assert np.array_equal(y, gguf_decode(q, name))
    assert rmse_over_std(x / x.std(axis=1, keepdims=True), y / x.std(axis=1, keepdims=True)) < 0.6


@pytest.mark.parametrize("name", FORMATS)
def test_decode_matches_gguf_3d(name):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 512)).astype(np.float32)
    imp = rng.uniform(0, 2, size=(3, 512)).astype(np.float32)
    q = kernels.quantize(x, name, imp)
    assert q.shape == (3, 4, formats.get(name).row_bytes(512))
    y = kernels.dequantize(q, name)
    assert y.shape == x.shape
    assert np.array_equal(y, gguf_decode(q, name))


@pytest.mark.parametrize("name", FORMATS)
def test_decode_of_arbitrary_bytes_matches_gguf(name):
    # every bit of every field: random blocks, with the fp16 scale kept finite
    f = formats.get(name)
    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, size=(16, 4 * f.type_size), dtype=np.uint8)
    blocks = q.reshape(-1, f.type_size)
    if name == "IQ1_M":  # d is spread over the top nibbles of the scale words (bytes 48..55); bit 14 is in byte 55
        blocks[:, 55] &= 0xBF
    else:  # d is the first two bytes
        blocks[:, 1] &= 0xBF
    y = kernels.dequantize(q, name)
    ref = gguf_decode(q, name)
    assert np.all(np.isfinite(ref))
    assert np.array_equal(y, ref)


def unbiased_bound(r):
    """The RMSE/std of a least-squares fit with RMSE/std r once rescaled to gain 1: the kernels scale
    each super-block up by sum w x^2 / sum w x x_hat (kernels/csrc/debias.c), which trades
    r -> r / sqrt(1 - r^2) of squared error for an unshrunk reconstruction."""
    return r / np.sqrt(1.0 - r * r)


def scale_free_rmse_over_std(x, y):
    """RMSE/std after the least-squares rescale of the whole reconstruction (the error of the
    chosen points and relative scales, whatever the overall gain)."""
    x64, y64 = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
    c = float(x64 @ y64 / (y64 @ y64))
    return float(np.sqrt(np.mean((c * y64 - x64) ** 2)) / x64.std())


@pytest.mark.parametrize("name", FORMATS)
def test_error_on_gaussian_slice(name):
    x = gaussian(256)
    q = kernels.quantize(x, name, np.ones(4096, np.float32))
    y = kernels.dequantize(q, name)
    r = rmse_over_std(x, y)
    # the points and relative scales: at least as good as ggml's least-squares-shrunk figure
    rs = scale_free_rmse_over_std(x, y)
    assert rs <= GGML_RMSE[name] + SLICE_MARGIN, f"{name}: scale-free RMSE/std {rs:.4f} vs ggml {GGML_RMSE[name]}"
    # the unbiased reconstruction: within what gain 1 costs a fit of ggml's quality
    bound = unbiased_bound(GGML_RMSE[name]) + SLICE_MARGIN
    assert r <= bound, f"{name}: RMSE/std {r:.4f} vs {bound:.4f} (ggml {GGML_RMSE[name]} at gain 1)"


@pytest.mark.slow
@pytest.mark.parametrize("name", FORMATS)
def test_error_on_full_gaussian(name):
    x = gaussian()
    err = kernels.quant_error(x, [name], np.ones(4096, np.float32))
    r = float(err.rmse()[0] / x.std())
    bound = unbiased_bound(GGML_RMSE[name])
    assert r <= bound, f"{name}: RMSE/std {r:.4f} vs {bound:.4f} (ggml {GGML_RMSE[name]} at gain 1)"


@pytest.mark.parametrize("name", FORMATS)
def test_special_rows(name):
    rng = np.random.default_rng(4)
    x = np.zeros((6, 512), np.float32)
    x[1] = 0.75  # constant
    x[2] = rng.standard_normal(512)
    x[2, [3, 300]] = [80.0, -120.0]  # outliers
    x[3] = rng.standard_normal(512) * 1e-6  # small: fp16 scale in the subnormal range
    x[4] = rng.standard_normal(512) * 1e-30  # below fp16: decodes to zero
    x[5, :256] = rng.standard_normal(256)  # one block zero, one not
    imp = np.ones(512, np.float32)
    q = kernels.quantize(x, name, imp)
    y = kernels.dequantize(q, name)
    assert np.all(np.isfinite(y))
    assert np.array_equal(y, gguf_decode(q, name))
    assert np.all(y[0] == 0)
    assert np.all(y[5, 256:] == 0)
    assert np.all(np.abs(y[4]) <= 1e-20)
    # the constant row keeps its level within 2-bit accuracy (the sparse grids hold no all-equal
    # point, and IQ1's ternary points cannot be equal at all)
    assert abs(float(y[1].mean()) - 0.75) < 0.1
    assert np.mean((y[1] - 0.75) ** 2) < (0.4 * 0.75) ** 2
    # the outliers dominate their block's scale, yet keep their sign and most of their size
    assert y[2, 3] > 20 and y[2, 300] < -30
    # tiny rows are not worse than zero
    assert weighted_err(x[3], y[3], 1) <= weighted_err(x[3], 0 * y[3], 1)


@pytest.mark.parametrize("name", FORMATS)
def test_values_beyond_the_fp16_scale_are_refused(name):
    # beyond fp16's 65504 times the largest level the input is refused by name; up to it, the output
    # is finite and follows x
    x = (np.random.default_rng(9).standard_normal((2, 256)) * 1e8).astype(np.float32)
    with pytest.raises(ValueError, match=f"outside {name}'s range"):
        kernels.quantize(x, name, np.ones(256, np.float32))
    x = (np.random.default_rng(9).uniform(-1, 1, (2, 256)) * kernels.format_range(name)).astype(np.float32)
    q = kernels.quantize(x, name, np.ones(256, np.float32))
    y = kernels.dequantize(q, name)
    assert np.all(np.isfinite(y))
    assert np.array_equal(y, gguf_decode(q, name))
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.7


@pytest.mark.parametrize("name", FORMATS)
def test_importance_with_zeros(name):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 768)).astype(np.float32)
    imp = rng.uniform(0.5, 1.5, size=768).astype(np.float32)
    imp[::3] = 0
    imp[256:512] = 0  # a whole super-block without weight
    q = kernels.quantize(x, name, imp)
    y = kernels.dequantize(q, name)
    assert np.all(np.isfinite(y))
    assert np.array_equal(y, gguf_decode(q, name))
    # the unweighted block is still quantized sensibly (unit weights there)
    assert rmse_over_std(x[:, 256:512], y[:, 256:512]) < 0.6


@pytest.mark.parametrize("name", FORMATS)
def test_per_expert_importance(name):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 5, 512)).astype(np.float32)
    imp = rng.uniform(0, 3, size=(3, 512)).astype(np.float32) ** 2
    q = kernels.quantize(x, name, imp)
    for e in range(3):
        assert np.array_equal(q[e], kernels.quantize(x[e], name, imp[e]))
    # one shared vector for all experts
    q1 = kernels.quantize(x, name, imp[0])
    assert np.array_equal(q1[2], kernels.quantize(x[2], name, imp[0]))


@pytest.mark.parametrize("name", FORMATS)
def test_skewed_importance_lowers_weighted_error(name):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 1024)).astype(np.float32)
    imp = np.exp(rng.normal(0, 1.5, size=1024)).astype(np.float32)
    y_imp = kernels.dequantize(kernels.quantize(x, name, imp), name)
    y_one = kernels.dequantize(kernels.quantize(x, name, np.ones(1024, np.float32)), name)
    e_imp, e_one = weighted_err(x, y_imp, imp), weighted_err(x, y_one, imp)
    assert e_imp < 0.9 * e_one, f"{name}: weighted error {e_imp:.1f} with importance vs {e_one:.1f} without"


# Relative importance-weighted error of the large weights (|x| >= sqrt(2 mean x^2) of their super-block)
# on a Student-t(4) matrix: the searches weight each error by importance * sqrt(2 mean x^2 + x^2)
# (q_iq.c superblock_weights), which keeps the large weights closer than importance alone did (left:
# importance alone, right: with the factor; the bound lies between them).
LARGE_WEIGHT_ERROR = {"IQ1_S": (0.3308, 0.3247), "IQ1_M": (0.2758, 0.2592), "IQ2_XXS": (0.2009, 0.1699),
                      "IQ2_XS": (0.1503, 0.1282), "IQ2_S": (0.1458, 0.1238), "IQ3_XXS": (0.0946, 0.0819),
                      "IQ3_S": (0.0760, 0.0662)}


@pytest.mark.parametrize("name", FORMATS)
def test_search_weights_favour_the_large_weights(name):
    rng = np.random.default_rng(3)
    x = rng.standard_t(4, size=(128, 2048)).astype(np.float32)
    imp = rng.lognormal(0.0, 0.5, 2048).astype(np.float32)
    y = kernels.dequantize(kernels.quantize(x, name, imp), name).astype(np.float64)
    xb, yb = x.reshape(-1, 256).astype(np.float64), y.reshape(-1, 256)
    wb = np.tile(imp, 128).reshape(-1, 256).astype(np.float64)
    big = np.abs(xb) >= np.sqrt(2 * (xb ** 2).mean(axis=1, keepdims=True))
    e, s = wb * (xb - yb) ** 2, wb * xb ** 2
    rel_big = float(np.sqrt(e[big].sum() / s[big].sum()))
    before, after = LARGE_WEIGHT_ERROR[name]
    assert rel_big <= 0.5 * (before + after), f"{name}: large-weight error {rel_big:.4f} (importance alone {before})"
    # the large weights keep a smaller relative error than the rest, and the whole stays bounded
    assert rel_big < 0.5 * float(np.sqrt(e[~big].sum() / s[~big].sum()))


@pytest.mark.parametrize("name", FORMATS)
def test_quant_error_agrees_with_quantize_dequantize(name):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 6, 512)).astype(np.float32)
    imp = rng.uniform(0, 2, size=(2, 512)).astype(np.float32)
    y = kernels.dequantize(kernels.quantize(x, name, imp), name)
    qe = kernels.quant_error(x, [name, "Q8_0"] if "Q8_0" in kernels.available_formats() else [name], imp)
    for e in range(2):
        want = weighted_err(x[e], y[e], imp[e])
        assert qe.err[0, e] == pytest.approx(want, rel=1e-5)
        assert qe.norm[e] == pytest.approx(float(np.sum(imp[e] * x[e].astype(np.float64) ** 2)), rel=1e-6)


@pytest.mark.parametrize("name", FORMATS)
def test_threads_do_not_change_bytes(name):
    x = gaussian(16, 512)
    imp = np.linspace(0.1, 2, 512, dtype=np.float32)
    assert np.array_equal(kernels.quantize(x, name, imp, threads=1), kernels.quantize(x, name, imp, threads=2))


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(FORMATS),
    scale=st.floats(1e-12, 1e4),
    seed=st.integers(0, 2**32 - 1),
    zero_frac=st.floats(0, 1),
)
def test_roundtrip_invariants(name, scale, seed, zero_frac):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, size=(2, 256)) * scale).astype(np.float32)
    x[rng.random(x.shape) < zero_frac] = 0
    # in the format's range (values beyond it are refused, tested apart); heavy tails reach it at 1e4
    lim = np.float32(0.99 * kernels.format_range(name))
    np.clip(x, -lim, lim, out=x)
    imp = rng.uniform(0, 1, size=256).astype(np.float32)
    q = kernels.quantize(x, name, imp)
    y = kernels.dequantize(q, name)
    assert np.all(np.isfinite(y))
    assert np.array_equal(y, gguf_decode(q, name))
    assert np.all(y[np.all(x == 0, axis=1)] == 0)
