"""Python entry points of the C kernels: quantize, dequantize, quant_error.

Inputs are float32, float16 or bfloat16 tensors (numpy arrays, torch tensors, or ml_dtypes bfloat16
arrays), 2-D (rows x cols) or 3-D stacked experts (experts x rows x cols); rows (the last axis) are
the ggml rows that blocks run along. Nothing is copied when the input is C-contiguous; bfloat16 and
float16 rows are widened to float32 one row at a time inside the C code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import formats as _formats
from . import iq_grids as _iq_grids
from .formats import Format

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "moeplan's C kernels (kernels._C) are not built: install the package with `pip install -e .` "
        "(or run `python setup.py build_ext --inplace` in the source tree)"
    ) from exc

_SRC_F32, _SRC_F16, _SRC_BF16 = 0, 1, 2


def _check_c_table() -> dict[int, tuple[str, int, int, int]]:
    """The C side's (name, block size, sizeof(block), needs importance) per type id, checked against the registry."""
    table = {}
    for type_id, name, block_size, type_size, needs_imp in _C.format_table():
        f = _formats.get(int(type_id))
        if (f.name, f.block_size, f.type_size) != (name, block_size, type_size):
            raise ImportError(
                f"C kernel table disagrees with kernels/formats.py for {f.name}: "
                f"C has ({name}, {block_size}, {type_size}), registry ({f.name}, {f.block_size}, {f.type_size})"
            )
        if bool(needs_imp) != f.needs_importance:
            raise ImportError(f"C kernel table disagrees with kernels/formats.py on needs_importance for {f.name}")
        table[int(type_id)] = (name, block_size, type_size, needs_imp)
    return table


_C_TABLE = _check_c_table()


def available_formats() -> list[str]:
    """Names of the formats that have a C kernel in this build, in registry order."""
    return [f.name for f in _formats.FORMATS.values() if int(f.type_id) in _C_TABLE]


def openmp_info() -> tuple[bool, int]:
    """(built with OpenMP, default thread count)."""
    return _C.openmp()


def _threads(threads: int | None) -> int:
    if threads is None:
        env = os.environ.get("MOEPLAN_THREADS")
        return int(env) if env else 0  # 0: OpenMP's default (all cores)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads


def _kernel_format(fmt: str | Format | int) -> Format:
    f = _formats.get(fmt)
    if int(f.type_id) not in _C_TABLE:
        raise NotImplementedError(
            f"format {f.name} has no C kernel in this build; available: {', '.join(available_formats())}"
        )
    if f.family is _formats.Family.CODEBOOK:
        _iq_grids.load(f)  # the codebook grids come from the gguf package, once, on first use
    return f


@dataclass
class _Src:
    buf: np.ndarray  # C-contiguous, viewed as float32 or uint16
    code: int
    shape: tuple[int, ...]
    keepalive: Any = None


def _as_source(x: Any, what: str = "x") -> _Src:
    """A C-contiguous view of x as float32 / uint16 (float16 or bfloat16 bits), without widening."""
    keep = None
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{what} is on {x.device}; move it to the CPU first (tensor.cpu())")
        if x.requires_grad:
            x = x.detach()
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{what} has dtype {x.dtype}; expected torch.float32, torch.float16 or torch.bfloat16")
        if not x.is_contiguous():
            raise ValueError(
                f"{what} is not contiguous (strides {tuple(x.stride())} for shape {tuple(x.shape)}); "
                "call .contiguous() first (quantizing a view would need a full copy)"
            )
        code = {torch.float32: _SRC_F32, torch.float16: _SRC_F16, torch.bfloat16: _SRC_BF16}[x.dtype]
        keep = x
        arr = x.view(torch.int16).numpy().view(np.uint16) if code != _SRC_F32 else x.numpy()
        return _Src(arr, code, tuple(arr.shape), keep)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what} must be a numpy array or a torch tensor, not {type(x).__name__}")
    if x.dtype == np.float32:
        code = _SRC_F32
    elif x.dtype == np.float16:
        code = _SRC_F16
    elif x.dtype.name == "bfloat16":  # ml_dtypes / jax bfloat16
        code = _SRC_BF16
    else:
        raise TypeError(
            f"{what} has dtype {x.dtype}; expected float32, float16 or bfloat16 "
            "(pass bfloat16 as a torch tensor or an ml_dtypes array)"
        )
    if not x.flags.c_contiguous:
        raise ValueError(
            f"{what} is not C-contiguous (strides {x.strides} for shape {x.shape}); "
            "use np.ascontiguousarray first (quantizing a view would need a full copy)"
        )
    arr = x.view(np.uint16) if code != _SRC_F32 else x
    return _Src(arr, code, tuple(x.shape), x)


def _check_rank(shape: tuple[int, ...], what: str = "x") -> tuple[int, int, int]:
    """(groups, rows per group, cols) for a 2-D or 3-D tensor."""
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    raise ValueError(f"{what} must be 2-D (rows, cols) or 3-D (experts, rows, cols); got shape {shape}")


def _check_cols(f: Format, ncols: int) -> None:
    if ncols <= 0:
        raise ValueError(f"the tensor's rows are empty (last dimension {ncols}); there is nothing to store in {f.name}")
    if not f.fits(ncols):
        chain = _formats.fallback_chain(f, ncols)
        hint = f"; llama.cpp falls back to {' then '.join(chain)}" if chain else ""
        fits = [g.name for g in _formats.FORMATS.values() if g.fits(ncols) and int(g.type_id) in _C_TABLE]
        raise ValueError(
            f"{f.name} needs rows that are a multiple of {f.block_size}, but the tensor's rows have {ncols} "
            f"values{hint} (formats that fit: {', '.join(fits)})"
        )


def _as_importance(importance: Any, groups: int, ncols: int, three_d: bool) -> np.ndarray | None:
    if importance is None:
        return None
    try:
        import torch

        if isinstance(importance, torch.Tensor):
            importance = importance.detach().cpu().float().numpy()
    except ImportError:  # pragma: no cover
        pass
    try:
        with np.errstate(over="ignore"):  # float64 beyond the float32 range becomes inf, reported below
            w = np.asarray(importance, dtype=np.float32)
    except (TypeError, ValueError):
        raise TypeError(
            f"importance must be an array of non-negative numbers, not {type(importance).__name__}"
        ) from None
    per_expert = three_d and w.shape == (groups, ncols)
    if w.shape != (ncols,) and not per_expert:
        want = f"({ncols},) or ({groups}, {ncols}) per expert" if three_d else f"({ncols},)"
        raise ValueError(f"importance has shape {w.shape}; expected {want}, one weight per input column")
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        pos = np.unravel_index(int(np.argmax(bad)), w.shape)
        where = f"expert {pos[0]}, column {pos[1]}" if per_expert else f"column {pos[0]}"
        raise ValueError(
            f"importance must be finite and non-negative; {where} holds {float(w[pos])} "
            "(importance is the per-column mean of x^2 of the layer's input)"
        )
    return np.ascontiguousarray(np.broadcast_to(w, (groups, ncols)))


def format_range(fmt: str | Format | int) -> float:
    """The largest |x| `fmt` encodes: its fp16 block scale (at most 65504) times its largest level
    magnitude, or for F16 / BF16 the largest value that rounds to a finite number (F32: float32's max).
    quantize and quant_error refuse a tensor holding a value beyond it (ValueError)."""
    f = _kernel_format(fmt)
    return _C.format_range(int(f.type_id))


def _range_reason(f: Format, limit: float) -> str:
    if f.name == "F16":
        return "the largest float16 is 65504; from 65520 on, values round to inf"
    if f.name == "BF16":
        return "the largest bfloat16 is 3.3895314e+38; beyond this bound, values round to inf"
    if f.name in ("Q4_1", "Q5_1"):
        return "the block minimum is stored as fp16, at most 65504"
    if f.name in ("TQ1_0", "TQ2_0"):
        return "the block's max |x| is its fp16 scale, at most 65504"
    return f"the fp16 scale tops out at 65504, times {limit / 65504:g} for the largest level"


def _row_values(src: _Src, row: int) -> np.ndarray:
    """Row `row` (of all rows, experts flattened) widened to float32 as the C code sees it."""
    r = src.buf.reshape(-1, src.shape[-1])[row]
    if src.code == _SRC_F16:
        return r.view(np.float16).astype(np.float32)
    if src.code == _SRC_BF16:
        return (r.astype(np.uint32) << 16).view(np.float32)
    return r


def _raise_bad_row(bad_row: int, src: _Src, fmts: Sequence[Format], what: str = "x") -> None:
    """The C code returned the first row holding a NaN/Inf or a value beyond a format's range: name
    the first such value, its position, and the format whose range it leaves."""
    if bad_row < 0:
        return
    shape = src.shape
    if len(shape) == 3:
        e, r = divmod(bad_row, shape[1])
        where = f"expert {e}, row {r}"
    else:
        where = f"row {bad_row}"
    v = _row_values(src, bad_row)
    limits = [(f, format_range(f)) for f in fmts]
    lowest = min(lim for _, lim in limits)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(v) <= np.float32(lowest))
    col = int(np.argmax(bad)) if bad.any() else 0
    val = v[col]
    if not np.isfinite(val):
        raise ValueError(f"{what} holds NaN or Inf (first at {where}, column {col}); quantization needs finite values")
    f, limit = next((f, lim) for f, lim in limits if not abs(val) <= np.float32(lim))
    raise ValueError(
        f"value {str(np.float32(val))} at {where}, column {col} is outside {f.name}'s range "
        f"(|x| <= {str(np.float32(limit))}: {_range_reason(f, limit)})"
    )


def quantize(x: Any, fmt: str | Format | int, importance: Any = None, *, threads: int | None = None) -> np.ndarray:
    """Quantize a 2-D or 3-D tensor to GGUF blocks.

    Every value must be finite and within the format's range (`format_range`): a ValueError names the
    first one that is not (row, column; callers add the tensor's name).

    Returns uint8 of shape (*x.shape[:-1], row_bytes), the byte layout GGUF stores (the `gguf`
    package's `quant_shape_to_byte_shape`). `importance`: per input column weights (cols,), or
    (experts, cols) for 3-D input; quantizers then minimize the importance-weighted squared error.
    """
    f = _kernel_format(fmt)
    src = _as_source(x)
    groups, rows, ncols = _check_rank(src.shape)
    _check_cols(f, ncols)
    w = _as_importance(importance, groups, ncols, len(src.shape) == 3)
    if f.needs_importance and w is None:
        raise ValueError(
            f"{f.name} needs importance weights (a per-input-column mean of x^2 from calibration data, "
            "as llama.cpp's imatrix); pass importance=..., e.g. np.ones(cols) if none is at hand"
        )
    nrows = groups * rows
    out = np.empty((*src.shape[:-1], f.row_bytes(ncols)), dtype=np.uint8)
    if nrows:
        bad = _C.quantize(int(f.type_id), src.buf, src.code, nrows, ncols, out, w, max(rows, 1), _threads(threads))
        _raise_bad_row(bad, src, [f])
    return out


def dequantize(data: Any, fmt: str | Format | int, shape: Sequence[int] | None = None, *,
               threads: int | None = None) -> np.ndarray:
    """Decode GGUF blocks to float32. `shape` is the logical shape (rows last); without it, it is
    inferred from a byte array shaped as `quantize` returns."""
    f = _kernel_format(fmt)
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    if not isinstance(data, np.ndarray):
        raise TypeError(f"data must be a numpy uint8 array or bytes, not {type(data).__name__}")
    if data.dtype != np.uint8:
        data = data.view(np.uint8) if data.flags.c_contiguous else data
        if data.dtype != np.uint8:
            raise TypeError("data must be a C-contiguous byte buffer")
    if not data.flags.c_contiguous:
        raise ValueError("data is not C-contiguous; use np.ascontiguousarray first")
    if shape is None:
        if data.ndim < 2 or data.shape[-1] % f.type_size != 0:
            raise ValueError(
                f"cannot infer the shape: give shape=... (data has shape {data.shape}; "
                f"{f.name} rows are a multiple of {f.type_size} bytes)"
            )
        shape = (*data.shape[:-1], data.shape[-1] // f.type_size * f.block_size)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError("shape must have at least one dimension")
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    ncols = shape[-1]
    _check_cols(f, ncols)
    nrows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    expected = nrows * f.row_bytes(ncols)
    if data.size != expected:
        raise ValueError(
            f"{f.name} data for shape {shape} must be {expected} bytes; got {data.size} "
            f"({nrows} rows x {f.row_bytes(ncols)} bytes per row)"
        )
    out = np.empty(shape, dtype=np.float32)
    if nrows:
        _C.dequantize(int(f.type_id), data, nrows, ncols, out, _threads(threads))
    return out


@dataclass(frozen=True)
class QuantError:
    """Squared error of one tensor under several formats.

    err[i, g]: sum over group g's elements of w_j (x - dequant(quant(x)))^2 for formats[i];
    norm[g]: sum of w_j x^2 over group g (groups: experts of a 3-D tensor, one group for 2-D).
    """

    formats: tuple[str, ...]
    err: np.ndarray  # (n_formats, n_groups) float64
    norm: np.ndarray  # (n_groups,) float64
    numel: int  # elements per group

    def relative(self) -> np.ndarray:
        """err / norm per format and group (0 where the group is all zero)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.norm > 0, self.err / self.norm, 0.0)

    def rmse(self) -> np.ndarray:
        """sqrt(mean weighted squared error) per format, over the whole tensor."""
        return np.sqrt(self.err.sum(axis=1) / (self.numel * self.err.shape[1]))


def quant_error(x: Any, formats: Sequence[str | Format | int], importance: Any = None, *,
                threads: int | None = None) -> QuantError:
    """Importance-weighted squared error of x under every format in `formats`, in one pass over x,
    without writing a dequantized tensor. Formats whose block size does not divide the rows are an
    error: resolve them first with kernels.formats.resolve."""
    fmts = [_kernel_format(f) for f in formats]
    if not fmts:
        raise ValueError("formats is empty")
    src = _as_source(x)
    groups, rows, ncols = _check_rank(src.shape)
    for f in fmts:
        _check_cols(f, ncols)
    w = _as_importance(importance, groups, ncols, len(src.shape) == 3)
    for f in fmts:
        if f.needs_importance and w is None:
            raise ValueError(f"{f.name} needs importance weights; pass importance=...")
    err = np.zeros((len(fmts), groups), dtype=np.float64)
    norm = np.zeros(groups, dtype=np.float64)
    if groups * rows:
        bad = _C.quant_error([int(f.type_id) for f in fmts], src.buf, src.code, groups * rows, ncols, w,
                             max(rows, 1), err, norm, _threads(threads))
        _raise_bad_row(bad, src, fmts)
    return QuantError(tuple(f.name for f in fmts), err, norm, rows * ncols)


@dataclass(frozen=True)
class SampledQuantError:
    """quant_error estimated from a sample of each group's rows.

    err[i, g]: the estimate of quant_error's err[i, g] (the sampled rows' mean error times the
    group's rows); se[i, g]: its standard error (the rows' spread over sqrt(sampled rows), with the
    finite-population correction; 0 when every row was measured). The same rows are sampled in every
    group and for every format, so comparisons between formats share the sample."""

    formats: tuple[str, ...]
    err: np.ndarray  # (n_formats, n_groups) float64
    se: np.ndarray  # (n_formats, n_groups) float64
    rows: int  # rows per group
    sampled: int  # rows measured per group

    def relative_se(self) -> np.ndarray:
        """se / err per format and group (0 where err is 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.err > 0, self.se / self.err, 0.0)


def sampled_quant_error(x: Any, formats: Sequence[str | Format | int], importance: Any = None, *,
                        rows: int, seed: int = 0, target_rse: float | None = None,
                        threads: int | None = None) -> SampledQuantError:
    """quant_error of x (2-D, or 3-D stacked experts: one group each) estimated from `rows` rows per
    group (the first rows of a seeded permutation; the same rows in every group and for every format),
    with a standard error per format and group. Blocks run along a row, so a row's error does not
    depend on the others and the scaled sample mean is unbiased.

    target_rse: while some group's estimate for some format has a relative standard error above it,
    the sample doubles (the rows measured so far are kept). A sample of a quarter of the rows or more
    is not worth it: then (and for rows <= 0) every row is measured, exactly (se 0). The cost is the
    sampled share of quant_error's."""
    shape = tuple(int(v) for v in getattr(x, "shape", ()))
    groups, n_rows, ncols = _check_rank(shape)
    perm = np.random.default_rng(seed).permutation(n_rows)
    imp = None
    if importance is not None:
        imp = np.asarray(importance, dtype=np.float32)
        imp = np.broadcast_to(imp.reshape(-1, ncols), (groups, ncols)) if imp.ndim == 1 or imp.shape[0] == 1 \
            else imp.reshape(groups, ncols)
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    is_torch = torch is not None and isinstance(x, torch.Tensor)
    per_row = None  # (formats, groups, rows measured)
    done, want = 0, rows
    while 0 < want and 4 * want < n_rows:
        idx = perm[done:want]
        if is_torch:
            sub = x.detach()[..., torch.from_numpy(idx), :].contiguous()
        else:
            sub = np.ascontiguousarray(np.asarray(x)[..., idx, :])
        # every sampled row its own group: one error per row and format
        n = len(idx)
        sub = sub.reshape(groups * n, 1, ncols)
        qe = quant_error(sub, formats, None if imp is None else np.ascontiguousarray(np.repeat(imp, n, axis=0)),
                         threads=threads)
        new = qe.err.reshape(len(qe.formats), groups, n)
        per_row = new if per_row is None else np.concatenate([per_row, new], axis=2)
        done = want
        err = per_row.mean(axis=2) * n_rows
        se = per_row.std(axis=2, ddof=1) * n_rows / np.sqrt(done) * np.sqrt(1.0 - done / n_rows) if done > 1 \
            else np.full_like(err, np.inf)
        out = SampledQuantError(qe.formats, err, se, n_rows, done)
        if target_rse is None or float(out.relative_se().max(initial=0.0)) <= target_rse:
            return out
        want *= 2
    if is_torch and not x.is_contiguous():
        x = x.contiguous()
    qe = quant_error(x, formats, importance, threads=threads)
    return SampledQuantError(qe.formats, qe.err, np.zeros_like(qe.err), n_rows, n_rows)
