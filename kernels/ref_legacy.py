"""Plain numpy references for the legacy, IQ4 and ternary formats (what kernels/csrc/q_legacy.c,
q_iq4.c and q_tq.c compute).

- Dequantizers for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0: float32 arithmetic in
  the order the C code uses, so results are bit-identical.
- Quantizers for the formats whose bytes must equal GGUF's (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0,
  TQ2_0), without importance: every step is one float32 operation, as in the C code.

Arrays are (..., cols) float32 in, (..., row_bytes) uint8 out, the layout `kernels.quantize` returns.
Slow but readable: tests compare the C kernels, this module and the `gguf` package with each other.
"""

from __future__ import annotations

import numpy as np

from . import formats as _formats

# IQ4_NL / IQ4_XS non-linear grid (a format constant of GGUF)
IQ4_GRID = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)

_F32 = np.float32


# ---- helpers -----------------------------------------------------------------------------------

def _blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % block:
        raise ValueError(f"rows of {x.shape[-1]} values are not a multiple of {block}")
    return x.reshape(-1, block), x.shape


def _out(parts: list[np.ndarray], shape: tuple[int, ...], block: int) -> np.ndarray:
    b = np.concatenate([p.reshape(p.shape[0], -1).view(np.uint8) for p in parts], axis=1)
    return b.reshape(*shape[:-1], shape[-1] // block * b.shape[1])


def _byte_blocks(data: np.ndarray, fmt: str) -> tuple[np.ndarray, tuple[int, ...]]:
    f = _formats.get(fmt)
    data = np.ascontiguousarray(data).view(np.uint8)
    shape = (*data.shape[:-1], data.shape[-1] // f.type_size * f.block_size)
    return data.reshape(-1, f.type_size), shape


def _fp16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bits, round to nearest even (numpy's conversion)."""
    with np.errstate(over="ignore"):
        return v.astype(np.float16).view(np.uint16)


def _half(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 little-endian half bits -> (n, 1) float32"""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32).reshape(-1, 1)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d in float32; 0 where d == 0 or where 1/d overflows (float32-subnormal d)."""
    with np.errstate(divide="ignore", over="ignore"):
        inv = (_F32(1) / d).astype(np.float32)
    return np.where((d == 0) | np.isinf(inv), _F32(0), inv).astype(np.float32)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, halves away from zero, exactly: a - trunc(a) is exact in float32."""
    a = np.abs(v)
    i = np.trunc(a)
    i = i + (a - i >= _F32(0.5)).astype(np.float32)
    return np.where(v < 0, -i, i).astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) levels -> (n, 16): byte j = q[j] | q[j + 16] << 4"""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit levels -> (n, 4) bytes: bit j of the little-endian uint32 is bit 4 of q[j]"""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)


# ---- Q8_0 --------------------------------------------------------------------------------------

def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    b, shape = _blocks(x, 32)
    d = (np.abs(b).max(axis=1) / _F32(127)).astype(np.float32)
    q = round_half_away(b * _inverse(d)[:, None]).astype(np.int8)
    return _out([_fp16_bits(d), q], shape, 32)


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    b, shape = _byte_blocks(data, "Q8_0")
    return (b[:, 2:].view(np.int8).astype(np.float32) * _half(b[:, :2])).reshape(shape)


# ---- Q4_0 / Q5_0 (symmetric, d = signed max / -nmax) ------------------------------------------------

def _quantize_symmetric(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    b, shape = _blocks(x, 32)
    first_max = np.abs(b).argmax(axis=1)  # first of equal magnitudes
    mx = b[np.arange(b.shape[0]), first_max]
    d = (mx / _F32(-nmax)).astype(np.float32)
    u = b * _inverse(d)[:, None] + _F32(nmax + 0.5)
    top = 2 * nmax - 1
    q = np.where(u < top, np.trunc(u), top).astype(np.uint8)
    return d, q, shape


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    d, q, shape = _quantize_symmetric(x, 8)
    return _out([_fp16_bits(d), _pack_nibbles(q)], shape, 32)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    d, q, shape = _quantize_symmetric(x, 16)
    return _out([_fp16_bits(d), _high_bits(q), _pack_nibbles(q)], shape, 32)


def dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    b, shape = _byte_blocks(data, "Q4_0")
    q = _unpack_nibbles(b[:, 2:]).astype(np.float32) - _F32(8)
    return (q * _half(b[:, :2])).reshape(shape)


def _five_bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    h = np.ascontiguousarray(qh).view("<u4").reshape(-1, 1)
    hi = ((h >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return _unpack_nibbles(qs) | (hi << 4)


def dequantize_q5_0(data: np.ndarray) -> np.ndarray:
    b, shape = _byte_blocks(data, "Q5_0")
    q = _five_bit(b[:, 2:6], b[:, 6:]).astype(np.float32) - _F32(16)
    return (q * _half(b[:, :2])).reshape(shape)


# ---- Q4_1 / Q5_1 (affine, d = (max - min) / nmax, m = min) ----------------------------------------

def _quantize_affine(x: np.ndarray, nmax: int):
    b, shape = _blocks(x, 32)
    mn = b.min(axis=1)
    mx = b.max(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        d = ((mx - mn) / _F32(nmax)).astype(np.float32)
        u = (b - mn[:, None]) * _inverse(d)[:, None] + _F32(0.5)
    q = np.where(u < nmax, np.trunc(np.nan_to_num(u)), nmax).astype(np.uint8)
    return d, mn, q, shape


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    d, m, q, shape = _quantize_affine(x, 15)
    return _out([_fp16_bits(d), _fp16_bits(m), _pack_nibbles(q)], shape, 32)


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    d, m, q, shape = _quantize_affine(x, 31)
    return _out([_fp16_bits(d), _fp16_bits(m), _high_bits(q), _pack_nibbles(q)], shape, 32)


def dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    b, shape = _byte_blocks(data, "Q4_1")
    q = _unpack_nibbles(b[:, 4:]).astype(np.float32)
    return (q * _half(b[:, :2]) + _half(b[:, 2:4])).reshape(shape)


def dequantize_q5_1(data: np.ndarray) -> np.ndarray:
    b, shape = _byte_blocks(data, "Q5_1")
    q = _five_bit(b[:, 4:8], b[:, 8:]).astype(np.float32)
    return (q * _half(b[:, :2]) + _half(b[:, 2:4])).reshape(shape)


# ---- IQ4_NL / IQ4_XS ------------------------------------------------------------------------------

def dequantize_iq4_nl(data: np.ndarray) -> np.ndarray:
    b, shape = _byte_blocks(data, "IQ4_NL")
    g = IQ4_GRID[_unpack_nibbles(b[:, 2:])].astype(np.float32)
    return (_half(b[:, :2]) * g).reshape(shape)


def iq4_xs_scales(b: np.ndarray) -> np.ndarray:
    """(n, 136) IQ4_XS blocks -> (n, 8) signed sub-block scales l - 32 in [-32, 31]"""
    lo = np.stack([b[:, 4:8] & 0x0F, b[:, 4:8] >> 4], axis=2).reshape(-1, 8)
    sh = np.ascontiguousarray(b[:, 2:4]).view("<u2").reshape(-1, 1)
    hi = ((sh >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)
    return (lo | (hi << 4)).astype(np.int32) - 32


def dequantize_iq4_xs(data: np.ndarray) -> np.ndarray:
    b, shape = _byte_blocks(data, "IQ4_XS")
    dl = _half(b[:, :2]) * iq4_xs_scales(b).astype(np.float32)  # (n, 8)
    qs = b[:, 8:].reshape(-1, 8, 16)
    idx = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # (n, 8, 32)
    return (dl[:, :, None] * IQ4_GRID[idx].astype(np.float32)).reshape(shape)


# ---- TQ1_0 / TQ2_0 -----------------------------------------------------------------------------

def _ternary(x: np.ndarray):
    b, shape = _blocks(x, 256)
    d = np.abs(b).max(axis=1).astype(np.float32)
    t = (round_half_away(b * _inverse(d)[:, None]) + 1).astype(np.uint8)  # digits 0, 1, 2
    return d, t, shape


def _base3_bytes(t: np.ndarray) -> np.ndarray:
    """(n, k, 5) trits, most significant first -> (n, k) bytes ceil(v * 256 / 243)"""
    v = (t.astype(np.uint32) * np.array([81, 27, 9, 3, 1], dtype=np.uint32)).sum(axis=2)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def quantize_tq1_0(x: np.ndarray) -> np.ndarray:
    d, t, shape = _ternary(x)
    n = t.shape[0]
    a = t[:, :160].reshape(n, 5, 32).transpose(0, 2, 1)  # byte j: weights 32 k + j
    b = t[:, 160:240].reshape(n, 5, 16).transpose(0, 2, 1)  # byte j: weights 160 + 16 k + j
    c = t[:, 240:].reshape(n, 4, 4).transpose(0, 2, 1)  # byte j: weights 240 + 4 k + j, fifth trit 0
    c = np.concatenate([c, np.zeros((n, 4, 1), np.uint8)], axis=2)
    return _out([_base3_bytes(a), _base3_bytes(b), _base3_bytes(c), _fp16_bits(d)], shape, 256)


def quantize_tq2_0(x: np.ndarray) -> np.ndarray:
    d, t, shape = _ternary(x)
    t = t.reshape(-1, 2, 4, 32)  # weight 128 g + 32 k + j -> bits 2k of byte 32 g + j
    qs = (t << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(axis=2, dtype=np.uint8)
    return _out([qs.reshape(-1, 64), _fp16_bits(d)], shape, 256)


def _trits(bytes_: np.ndarray, count: int) -> np.ndarray:
    """(n, m) bytes -> (n, count, m) trits in {-1, 0, 1}, most significant first"""
    pow3 = np.array([1, 3, 9, 27, 81][:count], dtype=np.uint8)
    q = (bytes_[:, None, :] * pow3[None, :, None]).astype(np.uint8)  # mod 256
    return ((q.astype(np.uint16) * 3) >> 8).astype(np.int8) - 1


def dequantize_tq1_0(data: np.ndarray) -> np.ndarray:
    b, shape = _byte_blocks(data, "TQ1_0")
    n = b.shape[0]
    t = np.concatenate([_trits(b[:, :32], 5).reshape(n, -1), _trits(b[:, 32:48], 5).reshape(n, -1),
                        _trits(b[:, 48:52], 4).reshape(n, -1)], axis=1)
    return (t.astype(np.float32) * _half(b[:, 52:54])).reshape(shape)


def dequantize_tq2_0(data: np.ndarray) -> np.ndarray:
    b, shape = _byte_blocks(data, "TQ2_0")
    qs = b[:, :64].reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    t = (qs & 3).astype(np.int8).reshape(-1, 256) - 1
    return (t.astype(np.float32) * _half(b[:, 64:66])).reshape(shape)


# ---- dispatch ----------------------------------------------------------------------------------

QUANTIZE = {
    "Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1, "Q5_0": quantize_q5_0,
    "Q5_1": quantize_q5_1, "TQ1_0": quantize_tq1_0, "TQ2_0": quantize_tq2_0,
}
DEQUANTIZE = {
    "Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0, "Q4_1": dequantize_q4_1, "Q5_0": dequantize_q5_0,
    "Q5_1": dequantize_q5_1, "IQ4_NL": dequantize_iq4_nl, "IQ4_XS": dequantize_iq4_xs,
    "TQ1_0": dequantize_tq1_0, "TQ2_0": dequantize_tq2_0,
}


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """GGUF bytes of x without importance (the formats in QUANTIZE)."""
    return QUANTIZE[_formats.get(fmt).name](x)


def dequantize(data: np.ndarray, fmt: str) -> np.ndarray:
    """float32 values of GGUF bytes shaped (..., row_bytes)."""
    return DEQUANTIZE[_formats.get(fmt).name](data)
