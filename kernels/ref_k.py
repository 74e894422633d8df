"""Plain numpy decoders of the GGUF k-quant blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).

Written from the block layouts in kernels/csrc/moeplan.h, one weight at a time in spirit: for every
weight k of a 256-weight super-block, the byte and bit that hold its quant and the sub-block whose
scale applies are index arrays below. Each decoder evaluates the same float32 expressions in the same
order as the C kernels, (d * scale) * q - (dmin * min), so results are bit-identical; the tests use
this module and the `gguf` package as two independent decoders of the bytes the C kernels write.

Speed is not a goal here (the C dequantizers are the fast path).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_K = np.arange(QK_K)

# 2-bit fields (Q2_K qs, Q3_K low bits): weight k sits in byte 32*(k//128) + k%32 at bit 2*((k%128)//32)
_B2_BYTE = 32 * (_K // 128) + _K % 32
_B2_SHIFT = 2 * ((_K % 128) // 32)
# 1-bit fields (Q3_K hmask, Q5_K qh): weight k is bit k//32 of byte k%32
_B1_BYTE = _K % 32
_B1_SHIFT = _K // 32
# 4-bit fields (Q4_K, Q5_K qs): in chunk c = k//64, weight 64c+l (l < 32) is the low nibble of byte
# 32c+l and weight 64c+32+l its high nibble
_B4_BYTE = 32 * (_K // 64) + _K % 32
_B4_SHIFT = 4 * ((_K % 64) // 32)
# Q6_K: in half h = k//128, group g = (k%128)//32, lane l = k%32:
#   low 4 bits: byte 64h + 32*(g%2) + l of ql, nibble g//2; high 2 bits: byte 32h + l of qh, bits 2g
_Q6_H, _Q6_G, _Q6_L = _K // 128, (_K % 128) // 32, _K % 32
_Q6_QL_BYTE = 64 * _Q6_H + 32 * (_Q6_G % 2) + _Q6_L
_Q6_QL_SHIFT = 4 * (_Q6_G // 2)
_Q6_QH_BYTE = 32 * _Q6_H + _Q6_L
_Q6_QH_SHIFT = 2 * _Q6_G

# (bytes per block) of each format, as in kernels/formats.py
TYPE_SIZE = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _bits(field: np.ndarray, byte: np.ndarray, shift: np.ndarray, mask: int) -> np.ndarray:
    """(n_blocks, 256) int32: (field[:, byte[k]] >> shift[k]) & mask for every weight k."""
    return (field[:, byte].astype(np.int32) >> shift) & mask


def _fp16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """(n_blocks,) float32 from the little-endian fp16 at `offset` of every block."""
    raw = blocks[:, offset].astype(np.uint16) | (blocks[:, offset + 1].astype(np.uint16) << 8)
    return raw.view(np.float16).astype(np.float32)


def _scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the 8 six-bit scales and mins of 12 packed bytes, (n_blocks, 8) each.
    Scales and mins 0-3 are the low 6 bits of bytes 0-3 and 4-7; 4-7 take their low 4 bits from
    bytes 8-11 (scale: low nibble, min: high nibble) and their top 2 bits from the top of bytes 0-7."""
    s = s.astype(np.int32)
    sc = np.empty((s.shape[0], 8), dtype=np.int32)
    mn = np.empty((s.shape[0], 8), dtype=np.int32)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _scales_q3(s: np.ndarray) -> np.ndarray:
    """Q3_K: the 16 six-bit scales (stored + 32) of 12 packed bytes, (n_blocks, 16) signed.
    Scale j: low 4 bits from byte j%8 (low nibble for j < 8, high for j >= 8), top 2 bits from
    byte 8 + j%4 at bit 2*(j//4)."""
    s = s.astype(np.int32)
    j = np.arange(16)
    lo = (s[:, j % 8] >> (4 * (j // 8))) & 15
    hi = (s[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (lo | (hi << 4)) - 32


def _as_blocks(data: np.ndarray, fmt: str) -> np.ndarray:
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if data.size % TYPE_SIZE[fmt]:
        raise ValueError(f"{fmt} data must be a multiple of {TYPE_SIZE[fmt]} bytes, got {data.size}")
    return data.reshape(-1, TYPE_SIZE[fmt])


def dequantize_q2_k(data: np.ndarray) -> np.ndarray:
    b = _as_blocks(data, "Q2_K")  # scales[16] qs[64] d dmin
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _fp16(b, 80), _fp16(b, 82)
    dl = d[:, None] * (scales & 15).astype(np.float32)  # (n, 16)
    ml = dmin[:, None] * (scales >> 4).astype(np.float32)
    q = _bits(qs, _B2_BYTE, _B2_SHIFT, 3).astype(np.float32)
    sub = _K // 16
    return (dl[:, sub] * q - ml[:, sub]).reshape(-1)


def dequantize_q3_k(data: np.ndarray) -> np.ndarray:
    b = _as_blocks(data, "Q3_K")  # hmask[32] qs[64] scales[12] d
    hmask, qs, scales = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _fp16(b, 108)
    dl = d[:, None] * _scales_q3(scales).astype(np.float32)  # (n, 16)
    q = _bits(qs, _B2_BYTE, _B2_SHIFT, 3) + 4 * _bits(hmask, _B1_BYTE, _B1_SHIFT, 1) - 4
    return (dl[:, _K // 16] * q.astype(np.float32)).reshape(-1)


def _dequantize_k4(b: np.ndarray, qh: np.ndarray | None, qs: np.ndarray) -> np.ndarray:
    d, dmin = _fp16(b, 0), _fp16(b, 2)
    sc, mn = _scales_k4(b[:, 4:16])
    dl = d[:, None] * sc.astype(np.float32)  # (n, 8)
    ml = dmin[:, None] * mn.astype(np.float32)
    q = _bits(qs, _B4_BYTE, _B4_SHIFT, 15)
    if qh is not None:
        q = q + 16 * _bits(qh, _B1_BYTE, _B1_SHIFT, 1)
    sub = _K // 32
    return (dl[:, sub] * q.astype(np.float32) - ml[:, sub]).reshape(-1)


def dequantize_q4_k(data: np.ndarray) -> np.ndarray:
    b = _as_blocks(data, "Q4_K")  # d dmin scales[12] qs[128]
    return _dequantize_k4(b, None, b[:, 16:144])


def dequantize_q5_k(data: np.ndarray) -> np.ndarray:
    b = _as_blocks(data, "Q5_K")  # d dmin scales[12] qh[32] qs[128]
    return _dequantize_k4(b, b[:, 16:48], b[:, 48:176])


def dequantize_q6_k(data: np.ndarray) -> np.ndarray:
    b = _as_blocks(data, "Q6_K")  # ql[128] qh[64] scales[16] (int8) d
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _fp16(b, 208)
    dl = d[:, None] * scales  # (n, 16)
    q = _bits(ql, _Q6_QL_BYTE, _Q6_QL_SHIFT, 15) | (_bits(qh, _Q6_QH_BYTE, _Q6_QH_SHIFT, 3) << 4)
    return (dl[:, _K // 16] * (q - 32).astype(np.float32)).reshape(-1)


DEQUANTIZERS = {
    "Q2_K": dequantize_q2_k,
    "Q3_K": dequantize_q3_k,
    "Q4_K": dequantize_q4_k,
    "Q5_K": dequantize_q5_k,
    "Q6_K": dequantize_q6_k,
}


def dequantize(data: np.ndarray, fmt: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Decode k-quant bytes to float32; `shape` defaults to (..., 256 * blocks) from the byte array."""
    fmt = fmt.upper()
    if fmt not in DEQUANTIZERS:
        raise ValueError(f"ref_k decodes only {', '.join(DEQUANTIZERS)}, not {fmt}")
    data = np.asarray(data)
    out = DEQUANTIZERS[fmt](data)
    if shape is None:
        if data.ndim < 1 or data.shape[-1] % TYPE_SIZE[fmt]:
            raise ValueError(f"give shape=...: the last axis of {data.shape} is not whole {fmt} blocks")
        shape = (*data.shape[:-1], data.shape[-1] // TYPE_SIZE[fmt] * QK_K)
    return out.reshape(shape)
