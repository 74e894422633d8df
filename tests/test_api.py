"""Bad input to kernels.quantize / dequantize / quant_error: clear errors that name the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeplan import kernels
from moeplan.kernels import _C, api


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)


# ---- dtype and rank ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int32, np.float64, np.int8, np.complex64])
def test_wrong_numpy_dtype(dtype):
    with pytest.raises(TypeError, match=rf"x has dtype {np.dtype(dtype).name}; expected float32, float16 or bfloat16"):
        kernels.quantize(np.zeros((4, 64), dtype=dtype), "Q8_0")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_wrong_torch_dtype(dtype):
    with pytest.raises(TypeError, match=rf"dtype {dtype}; expected torch.float32, torch.float16 or torch.bfloat16"):
        kernels.quantize(torch.zeros((4, 64), dtype=dtype), "Q4_0")


def test_not_an_array():
    with pytest.raises(TypeError, match="numpy array or a torch tensor, not list"):
        kernels.quantize([[0.0] * 32], "Q8_0")


@pytest.mark.parametrize("shape", [(64,), (2, 2, 2, 64), ()])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"must be 2-D \(rows, cols\) or 3-D \(experts, rows, cols\); got shape"):
        kernels.quantize(np.zeros(shape, np.float32), "Q8_0")
    with pytest.raises(ValueError, match="must be 2-D"):
        kernels.quant_error(np.zeros(shape, np.float32), ["Q8_0"])


# ---- row length ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, ncols, fallback", [
    ("Q4_0", 48, "llama.cpp falls back to F16"),
    ("Q8_0", 100, "llama.cpp falls back to F16"),
    ("IQ4_XS", 96, "llama.cpp falls back to IQ4_NL"),
    ("IQ4_XS", 100, "llama.cpp falls back to IQ4_NL then F16"),
    ("TQ1_0", 64, "llama.cpp falls back to Q4_0"),
    ("TQ2_0", 160, "llama.cpp falls back to Q4_0"),
])
def test_rows_not_a_multiple_of_the_block(fmt, ncols, fallback):
    x = np.zeros((2, ncols), np.float32)
    with pytest.raises(ValueError) as err:
        kernels.quantize(x, fmt)
    msg = str(err.value)
    assert f"{fmt} needs rows that are a multiple of {kernels.formats.get(fmt).block_size}" in msg
    assert f"rows have {ncols} values" in msg
    assert fallback in msg
    fits = msg.split("formats that fit: ")[1].rstrip(")").split(", ")
    assert "F16" in fits and fmt not in fits
    assert all(kernels.formats.get(f).fits(ncols) for f in fits)  # every format named does fit
    if ncols % 32 == 0:
        assert "Q4_0" in fits and "IQ4_NL" in fits
    with pytest.raises(ValueError, match=f"{fmt} needs rows that are a multiple"):
        kernels.quant_error(x, [fmt])
    with pytest.raises(ValueError, match=f"{fmt} needs rows that are a multiple"):
        kernels.dequantize(np.zeros(2 * 1000, np.uint8), fmt, shape=(2, ncols))


def test_empty_rows():
    with pytest.raises(ValueError, match="rows are empty"):
        kernels.quantize(np.zeros((2, 0), np.float32), "F16")


# ---- NaN / Inf -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_first_bad_row(x, bad):
    x[3, 5] = bad
    x[1, 60] = bad
    with pytest.raises(ValueError, match=r"x holds NaN or Inf \(first at row 1, column 60\)"):
        kernels.quantize(x, "Q4_0")
    with pytest.raises(ValueError, match=r"first at row 1"):
        kernels.quant_error(x, ["Q8_0", "IQ4_NL"])


@pytest.mark.parametrize("convert", [
    lambda a: a,
    lambda a: a.astype(np.float16),
    lambda a: torch.from_numpy(a).to(torch.bfloat16),
    lambda a: torch.from_numpy(a).half(),
])
def test_non_finite_values_name_the_expert(convert):
    x = np.zeros((3, 4, 256), np.float32)
    x[2, 1, 7] = np.nan
    x[2, 3, 0] = np.inf
    with pytest.raises(ValueError, match=r"first at expert 2, row 1"):
        kernels.quantize(convert(x), "IQ4_XS")
    with pytest.raises(ValueError, match=r"first at expert 2, row 1"):
        kernels.quant_error(convert(x), ["TQ2_0"])


def test_float16_overflow_to_inf_is_reported():
    x = np.ones((2, 32), np.float16)
    x[1, 3] = np.float16(np.inf)
    with pytest.raises(ValueError, match="first at row 1"):
        kernels.quantize(x, "Q8_0")


# ---- contiguity and devices --------------------------------------------------------------------------

def test_non_contiguous_numpy():
    base = np.zeros((8, 128), np.float32)
    for view in (base[:, ::2], base[::2], np.zeros((64, 4), np.float32).T):
        with pytest.raises(ValueError, match="not C-contiguous.*np.ascontiguousarray"):
            kernels.quantize(view, "Q8_0")
    np.testing.assert_array_equal(kernels.quantize(np.ascontiguousarray(base[:, ::2]), "Q8_0").shape, (8, 68))


def test_non_contiguous_torch():
    for view in (torch.zeros(64, 4).t(), torch.zeros(4, 128)[:, ::2], torch.zeros(2, 64, 4).transpose(1, 2)):
        with pytest.raises(ValueError, match=r"not contiguous.*\.contiguous\(\)"):
            kernels.quantize(view, "Q4_1")


def test_tensor_not_on_the_cpu():
    with pytest.raises(ValueError, match="is on meta; move it to the CPU"):
        kernels.quantize(torch.empty((2, 64), device="meta"), "Q8_0")


def test_tensor_requiring_grad_is_accepted():
    t = torch.randn(2, 64, requires_grad=True)
    assert np.array_equal(kernels.quantize(t, "Q8_0"), kernels.quantize(t.detach().numpy(), "Q8_0"))


# ---- dequantize ----------------------------------------------------------------------------------

def test_dequantize_wrong_byte_count(x):
    q = kernels.quantize(x, "Q8_0")  # 4 rows x 68 bytes
    with pytest.raises(ValueError, match=r"Q8_0 data for shape \(4, 64\) must be 272 bytes; got 269"):
        kernels.dequantize(q.tobytes()[:-3], "Q8_0", shape=(4, 64))
    with pytest.raises(ValueError, match=r"must be 340 bytes; got 272"):
        kernels.dequantize(q, "Q8_0", shape=(5, 64))
    with pytest.raises(ValueError, match="cannot infer the shape"):
        kernels.dequantize(np.ascontiguousarray(q[:, :-1]), "Q8_0")
    with pytest.raises(ValueError, match="cannot infer the shape"):
        kernels.dequantize(q.tobytes(), "Q8_0")
    np.testing.assert_array_equal(kernels.dequantize(q.tobytes(), "Q8_0", shape=(4, 64)),
                                  kernels.dequantize(q, "Q8_0"))


def test_dequantize_bad_data_and_shape(x):
    q = kernels.quantize(x, "Q4_0")
    with pytest.raises(ValueError, match="not C-contiguous"):
        kernels.dequantize(np.zeros((4, 40), np.uint8)[:, ::2], "Q4_0", shape=(4, 32))
    with pytest.raises(TypeError, match="numpy uint8 array or bytes, not list"):
        kernels.dequantize([1, 2, 3], "Q4_0", shape=(1, 32))
    with pytest.raises(ValueError, match="negative dimension"):
        kernels.dequantize(q, "Q4_0", shape=(-4, 64))
    with pytest.raises(ValueError, match="at least one dimension"):
        kernels.dequantize(q, "Q4_0", shape=())


# ---- importance ----------------------------------------------------------------------------------

def test_importance_wrong_shape(x):
    with pytest.raises(ValueError, match=r"importance has shape \(32,\); expected \(64,\), one weight per input column"):
        kernels.quantize(x, "Q4_0", np.ones(32, np.float32))
    with pytest.raises(ValueError, match=r"importance has shape \(1, 64\); expected \(64,\)"):
        kernels.quantize(x, "Q4_0", np.ones((1, 64), np.float32))
    x3 = np.zeros((3, 2, 64), np.float32)
    with pytest.raises(ValueError, match=r"expected \(64,\) or \(3, 64\) per expert"):
        kernels.quantize(x3, "IQ4_NL", np.ones((2, 64), np.float32))
    with pytest.raises(ValueError, match=r"importance has shape"):
        kernels.quant_error(x3, ["Q5_0"], np.ones((3, 2, 64), np.float32))


@pytest.mark.parametrize("value, shown", [(-1.0, "-1.0"), (np.nan, "nan"), (np.inf, "inf")])
def test_importance_negative_or_not_finite(x, value, shown):
    w = np.ones(64, np.float32)
    w[9] = value
    w[20] = value
    with pytest.raises(ValueError, match=f"importance must be finite and non-negative; column 9 holds {shown}"):
        kernels.quantize(x, "Q4_1", w)
    with pytest.raises(ValueError, match="column 9"):
        kernels.quant_error(x, ["Q4_1"], w)
    we = np.ones((3, 64), np.float32)
    we[1, 9] = value
    with pytest.raises(ValueError, match=f"expert 1, column 9 holds {shown}"):
        kernels.quantize(np.zeros((3, 2, 64), np.float32), "Q5_1", we)
    with pytest.raises(ValueError, match="column 9"):
        kernels.quantize(x, "Q4_1", torch.from_numpy(w))


def test_importance_not_numbers(x):
    with pytest.raises(TypeError, match="importance must be an array of non-negative numbers, not str"):
        kernels.quantize(x, "Q4_0", "ones")


def test_importance_float64_beyond_float32_is_reported(x):
    with pytest.raises(ValueError, match="column 0 holds inf"):
        kernels.quantize(x, "Q4_0", np.full(64, 1e300))


def test_importance_of_other_dtypes_is_accepted(x):
    w = np.exp(np.random.default_rng(1).standard_normal(64))
    want = kernels.quantize(x, "IQ4_NL", w.astype(np.float32))
    assert np.array_equal(kernels.quantize(x, "IQ4_NL", w), want)  # float64 numpy
    assert np.array_equal(kernels.quantize(x, "IQ4_NL", torch.from_numpy(w)), want)  # float64 torch
    assert np.array_equal(kernels.quantize(x, "IQ4_NL", list(w)), want)


# ---- formats ---------------------------------------------------------------------------------------

def test_unknown_format(x):
    with pytest.raises(ValueError, match="unknown format 'Q9_9'; known formats: F32, F16"):
        kernels.quantize(x, "Q9_9")
    with pytest.raises(ValueError, match="unknown ggml type id 99"):
        kernels.dequantize(np.zeros(8, np.uint8), 99, shape=(1, 4))
    with pytest.raises(TypeError, match="a format is a name, a ggml type id or a Format, not float"):
        kernels.quant_error(x, [2.5])
    with pytest.raises(ValueError, match="formats is empty"):
        kernels.quant_error(x, [])


def test_format_without_kernel(x, monkeypatch):
    # drop Q8_0 from the table of formats the C build provides: the API must refuse it by name
    table = {k: v for k, v in api._C_TABLE.items() if k != int(kernels.GGMLType.Q8_0)}
    monkeypatch.setattr(api, "_C_TABLE", table)
    for call in (lambda: kernels.quantize(x, "Q8_0"), lambda: kernels.dequantize(np.zeros(68, np.uint8), "Q8_0", (1, 64)),
                 lambda: kernels.quant_error(x, ["Q4_0", "Q8_0"])):
        with pytest.raises(NotImplementedError, match="format Q8_0 has no C kernel in this build; available: .*Q4_0"):
            call()
    assert "Q8_0" not in kernels.available_formats()


def test_format_without_kernel_in_the_c_layer(x):
    out = np.empty((4, 68), np.uint8)
    with pytest.raises(NotImplementedError, match="ggml type 99 has no C kernel"):
        _C.quantize(99, x, 0, 4, 64, out, None, 4, 1)
    with pytest.raises(NotImplementedError, match="ggml type 99 has no C kernel"):
        _C.dequantize(99, out, 4, 64, np.empty((4, 64), np.float32), 1)


def test_formats_without_kernel_in_this_build_say_so(x):
    missing = [n for n in kernels.FORMATS if n not in kernels.available_formats()]
    for name in missing:  # empty once every format has a kernel
        with pytest.raises(NotImplementedError, match=f"format {name} has no C kernel in this build"):
            kernels.quantize(np.zeros((1, 256), np.float32), name, np.ones(256, np.float32))


def test_threads_must_be_positive(x):
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        kernels.quantize(x, "Q8_0", threads=0)
    assert np.array_equal(kernels.quantize(x, "Q8_0", threads=1), kernels.quantize(x, "Q8_0", threads=2))


def test_empty_tensors_are_fine():
    assert kernels.quantize(np.zeros((0, 64), np.float32), "Q4_0").shape == (0, 36)
    assert kernels.quantize(np.zeros((2, 0, 256), np.float32), "IQ4_XS", np.ones((2, 256), np.float32)).shape == (2, 0, 136)
    assert kernels.dequantize(np.zeros((0, 36), np.uint8), "Q4_0").shape == (0, 64)
