"""Output-aware refinement of quantized blocks: the choices a quantizer made for one matrix, improved
for the error the matrix's *output* sees on calibration inputs, not the per-weight error.

A quantizer with importance vectors minimizes sum_j c_j (w_j - q_j)^2 per row, with c the mean of
x_j^2 over the calibration inputs (llama.cpp's imatrix): the diagonal of the inputs' second moment.
What a row contributes to the layer's output error is (w - q) . x, whose mean square over the inputs
is (w - q)^T H (w - q) with H = mean(x x^T), the whole matrix. Its off-diagonal part (the inputs'
correlations, their common mean direction) is what the diagonal cannot see, and at one or two bits
per weight it is much of the error: on the bundled DeepSeek-V3 miniature's IQ1_S expert matrices the
refinement below lowers (w - q)^T H (w - q) by about 65% (on the calibration tokens it was fitted
on), and the KL divergence of the whole file (llama.cpp, held-out text) by 17% at 15% of BF16 (IQ1_S
and IQ2_XXS experts; 42% on the Qwen3-MoE miniature; results/vs-llama-quantize.md).

`refine(blocks, fmt, weight, gram)` starts from the quantizer's blocks and descends, one coordinate at a
time, on exactly that quadratic: each group of 8 weights tries every point of the codebook (IQ2_XXS:
every grid point with every sign pattern) at its sub-block's scale, each sub-block of 32 every scale
code (IQ1_S: and both delta signs), each super-block the least-squares value of its scale (rounded
to float16); a change is kept only when the loss goes down, so the result is never worse than the
blocks it started from, for the gram it was given. The output is ordinary GGUF blocks of the same
type and size; any decoder reads them.

Formats: IQ1_S and IQ2_XXS (`REFINABLE`, the two that hold most of a 1.5-2 bit MoE); the others are
returned as the quantizer wrote them. The gram of a row of n columns is n x n, so this is for the
routed experts' matrices (one gram per expert, from the tokens routed to it; sensitivity/grams.py
measures them). numpy: 0.06 s (IQ1_S) and 0.9 s (IQ2_XXS, 32,768 signed points a group) for a
256 x 256 matrix on this 2-core machine (results/refine.md); the same bytes for the same inputs on
one machine (the products go through its BLAS).
"""

from __future__ import annotations

import numpy as np

from . import formats as _formats
from .formats import Format
from .iq_grids import grid, sign_patterns

#: added to the gram's diagonal, as a share of its mean diagonal (GPTQ's dampening): a gram measured on
#: few tokens is singular, and the diagonal keeps every direction weighted a little
DAMPING = 0.01

_QK = 256  # weights per super-block
_IQ1S_BYTES = 50  # float16 d, 32 low index bytes, 8 uint16 (3 high index bits x 4, scale, delta sign)
_IQ2XXS_BYTES = 66  # float16 d, 8 x (4 grid index bytes, uint32: 4 x 7 sign bits + 4-bit scale)
_DELTA = 0.125  # IQ1S_DELTA: the shift of a sub-block's grid values, + or - by its sign bit


def refinable(fmt: str | Format) -> bool:
    return _formats.get(fmt).name in REFINABLE


def refine(blocks: np.ndarray, fmt: str | Format, weight, gram, *, passes: int = 2) -> np.ndarray:
    """Blocks of `weight` (rows, cols) as `fmt`, refined for `gram` (cols, cols), the sum (or mean)
    of x x^T over the inputs the matrix multiplies. Returns new uint8 blocks shaped like `blocks`
    (rows, row_bytes); a format not in REFINABLE, or a gram with nothing on its diagonal, returns
    `blocks` as they are."""
    f = _formats.get(fmt)
    blocks = np.asarray(blocks)
    if f.name not in REFINABLE:
        return blocks
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"refine takes one matrix (rows, cols); weight has shape {w.shape}")
    rows, cols = w.shape
    if cols % _QK:
        raise ValueError(f"{f.name} rows are whole super-blocks of {_QK}; weight has {cols} columns")
    nb = cols // _QK
    if blocks.dtype != np.uint8 or blocks.shape != (rows, nb * f.type_size):
        raise ValueError(f"blocks have shape {blocks.shape} ({blocks.dtype}); {f.name} blocks of a "
                         f"({rows}, {cols}) matrix are uint8 ({rows}, {nb * f.type_size})")
    h = np.asarray(gram, dtype=np.float64)
    if h.shape != (cols, cols):
        raise ValueError(f"the gram has shape {h.shape}; a matrix of {cols} columns needs ({cols}, {cols})")
    if not np.all(np.isfinite(h)) or not np.all(np.isfinite(w)):
        raise ValueError("refine needs finite weights and a finite gram")
    scale = float(np.mean(np.diag(h)))
    if not scale > 0 or rows == 0:
        return blocks
    h = (h + h.T) / (2 * scale)  # symmetric, mean diagonal 1 (the loss's units do not matter)
    h[np.diag_indices(cols)] += DAMPING
    return _REFINERS[f.name](blocks, w, h).descend(passes).encode()


class _Refiner:
    """One matrix's blocks as their decoded choices (a subclass per format parses and encodes them,
    and searches its points and sub-block scales); the reconstruction q and h (q - w) kept current
    through every change; the super-block scales d (rows, super-blocks), refitted here."""

    def _start(self, w: np.ndarray, h: np.ndarray) -> None:
        self.w, self.h = w, h
        self.q = self._reconstruct()
        self.hr = (self.q - w) @ h

    def _reconstruct(self) -> np.ndarray:
        raise NotImplementedError

    def _apply(self, rows: np.ndarray, cols: slice, new: np.ndarray) -> None:
        """Set q[rows, cols] = new and keep h (q - w) current."""
        dq = new - self.q[rows, cols]
        self.q[rows, cols] = new
        self.hr[rows] += dq @ self.h[cols]

    def descend(self, passes: int) -> "_Refiner":
        for _ in range(max(0, int(passes))):
            self._points()
            self._sub_blocks()
            self._super_blocks()
        return self

    def _points(self) -> None:
        raise NotImplementedError

    def _sub_blocks(self) -> None:
        raise NotImplementedError

    def _super_blocks(self) -> None:
        """Each super-block's scale d: the least-squares value for the loss with everything else
        fixed, rounded to float16, kept where it lowers the loss."""
        for b in range(self.d.shape[1]):
            cols = slice(_QK * b, _QK * b + _QK)
            d = self.d[:, b]
            ok = d != 0
            unit = np.zeros_like(self.q[:, cols])
            unit[ok] = self.q[ok, cols] / d[ok, None]  # the super-block at d = 1
            curv = ((unit @ self.h[cols, cols]) * unit).sum(axis=1)
            slope = (unit * self.hr[:, cols]).sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                target = np.where(curv > 0, d - slope / curv, d)
            new_d = np.clip(target, 0, 65504.0).astype(np.float16).astype(np.float64)
            step = new_d - d
            change = 2 * step * slope + step * step * curv  # the loss's change
            move = np.nonzero(ok & (new_d > 0) & (change < -1e-12 * (1 + np.abs(curv * d * d))))[0]
            if move.size:
                self.d[move, b] = new_d[move]
                self._apply(move, cols, unit[move] * new_d[move, None])

    def _best_points(self, feats: np.ndarray, table: np.ndarray, now: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A group's candidate points scored for every row as feats (rows, k) @ table (k, candidates):
        the loss change of each candidate up to a constant per row. Returns the best candidate of
        each row and the rows where it beats the current one (`now`)."""
        rows = self.w.shape[0]
        best = np.empty(rows, dtype=np.int64)
        gain = np.empty(rows)
        step = max(1, (1 << 22) // max(1, table.shape[1]))  # rows per product: a few MB of scores at a time
        for r0 in range(0, rows, step):
            r = slice(r0, r0 + step)
            score = feats[r] @ table
            b = np.argmin(score, axis=1)
            cur = score[np.arange(score.shape[0]), now[r]]
            best[r] = b
            gain[r] = (cur - score[np.arange(score.shape[0]), b]) / (1 + np.abs(cur))
        return best, np.nonzero(gain > 1e-12)[0]

    def _gradient(self, cols: slice) -> np.ndarray:
        """(rows, 8): the loss's gradient at a group's weights, the group's own term taken out."""
        return self.hr[:, cols] - self.q[:, cols] @ self.h[cols, cols]

    def _best_sub_block(self, j: int, values: np.ndarray, now: np.ndarray) -> np.ndarray:
        """Sub-block j (32 columns): of the options `values` (rows, options, 32), each row's that
        lowers the loss most is applied where it is not the current one (`now`) and gains; returns
        the rows that moved and, for every row, the option chosen."""
        cols = slice(32 * j, 32 * j + 32)
        dv = values - self.q[:, None, cols]
        change = -(2 * (dv @ self.hr[:, cols, None])[:, :, 0] + ((dv @ self.h[cols, cols]) * dv).sum(axis=2))
        c = np.argmax(change, axis=1)
        gain = change[np.arange(len(c)), c]
        moved = np.nonzero((c != now) & (gain > 1e-12 * (1 + np.abs(gain))))[0]
        if moved.size:
            self._apply(moved, cols, values[moved, c[moved]])
        return moved, c


class _Iq1s(_Refiner):
    """IQ1_S: super-block scales d (rows, nb), grid indices (rows, groups of 8), sub-block scale
    codes and delta signs (rows, sub-blocks of 32)."""

    def __init__(self, blocks: np.ndarray, w: np.ndarray, h: np.ndarray):
        rows, cols = w.shape
        nb = cols // _QK
        b = np.ascontiguousarray(blocks).reshape(rows, nb, _IQ1S_BYTES)
        self.d = b[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float64)  # (rows, nb)
        qh = b[:, :, 34:50].copy().view(np.uint16).astype(np.int64).reshape(rows, nb * 8)
        lo = b[:, :, 2:34].astype(np.int64).reshape(rows, nb * 32)
        hi = (qh[:, :, None] >> (3 * np.arange(4))) & 7  # (rows, sub-blocks, 4)
        self.idx = lo | (hi.reshape(rows, nb * 32) << 8)  # (rows, groups of 8)
        self.sc = (qh >> 12) & 7  # (rows, sub-blocks)
        self.neg = (qh >> 15) & 1
        self.grid = _grid("IQ1_S").astype(np.float64)
        self._start(w, h)

    # -- the reconstruction --------------------------------------------------------------------
    def _sub_scale(self) -> np.ndarray:  # (rows, sub-blocks): d * (2 s + 1)
        return np.repeat(self.d, 8, axis=1) * (2 * self.sc + 1)

    def _shift(self) -> np.ndarray:  # (rows, sub-blocks): +-delta
        return np.where(self.neg == 1, -_DELTA, _DELTA)

    def _reconstruct(self) -> np.ndarray:
        rows = self.w.shape[0]
        pts = self.grid[self.idx] + np.repeat(self._shift(), 4, axis=1)[:, :, None]  # (rows, groups, 8)
        return (np.repeat(self._sub_scale(), 4, axis=1)[:, :, None] * pts).reshape(rows, -1)

    def _points(self) -> None:
        """Each group of 8 weights: the codebook point, at the group's scale and shift, that lowers
        the loss most (or the one it has)."""
        g8 = self.grid  # (2048, 8)
        for g in range(self.idx.shape[1]):
            cols = slice(8 * g, 8 * g + 8)
            hgg = self.h[cols, cols]
            a = self._sub_scale()[:, g // 4]  # (rows,)
            t = self._shift()[:, g // 4]
            # the loss change of point c with c = a (G_c + t), up to a constant per row:
            # a^2 G_c^T Hgg G_c + 2 a^2 t 1^T Hgg G_c + 2 a u.G_c
            table = np.vstack([((g8 @ hgg) * g8).sum(axis=1)[None], (g8 @ hgg.sum(axis=1))[None], g8.T])
            feats = np.concatenate([(a * a)[:, None], (2 * a * a * t)[:, None], 2 * a[:, None] * self._gradient(cols)],
                                   axis=1)
            best, change = self._best_points(feats, table, self.idx[:, g])
            if change.size:
                self.idx[change, g] = best[change]
                self._apply(change, cols, a[change, None] * (g8[best[change]] + t[change, None]))

    def _sub_blocks(self) -> None:
        """Each sub-block of 32: the scale code (0..7) and delta sign that lower the loss most, its
        points kept."""
        rows = self.w.shape[0]
        options = np.arange(16)  # delta sign * 8 + scale code
        mult = (2 * (options % 8) + 1)[None, :, None]
        shift = np.where(options >= 8, -_DELTA, _DELTA)[None, :, None]
        for j in range(self.sc.shape[1]):
            base = self.grid[self.idx[:, 4 * j:4 * j + 4]].reshape(rows, 32)
            values = self.d[:, j // 8, None, None] * mult * (base[:, None, :] + shift)  # (rows, 16, 32)
            moved, c = self._best_sub_block(j, values, self.neg[:, j] * 8 + self.sc[:, j])
            self.sc[moved, j], self.neg[moved, j] = c[moved] % 8, c[moved] // 8

    # -- the blocks ----------------------------------------------------------------------------
    def encode(self) -> np.ndarray:
        rows, nb = self.d.shape
        out = np.zeros((rows, nb, _IQ1S_BYTES), dtype=np.uint8)
        out[:, :, :2] = self.d.astype(np.float16)[:, :, None].view(np.uint8)
        out[:, :, 2:34] = (self.idx & 255).astype(np.uint8).reshape(rows, nb, 32)
        hi = (self.idx >> 8).reshape(rows, nb * 8, 4)
        qh = hi[:, :, 0] | (hi[:, :, 1] << 3) | (hi[:, :, 2] << 6) | (hi[:, :, 3] << 9) | (self.sc << 12) | (self.neg << 15)
        out[:, :, 34:50] = qh.astype(np.uint16).reshape(rows, nb, 8).view(np.uint8)
        return out.reshape(rows, nb * _IQ1S_BYTES)


class _Iq2xxs(_Refiner):
    """IQ2_XXS: super-block scales d (rows, nb); per group of 8 a grid point (256, magnitudes 8 / 25 /
    43) and a sign pattern (128, even parity: the 8th sign follows from the other 7); per sub-block of
    32 a 4-bit scale code s, the sub-block's scale d (0.5 + s) / 4."""

    def __init__(self, blocks: np.ndarray, w: np.ndarray, h: np.ndarray):
        rows, cols = w.shape
        nb = cols // _QK
        b = np.ascontiguousarray(blocks).reshape(rows, nb, _IQ2XXS_BYTES)
        self.d = b[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float64)
        aux = b[:, :, 2:].copy().view(np.uint32).astype(np.int64).reshape(rows, nb * 8, 2)  # per sub-block
        self.gi = ((aux[:, :, 0, None] >> (8 * np.arange(4))) & 255).reshape(rows, nb * 32)  # grid index per group
        self.si = ((aux[:, :, 1, None] >> (7 * np.arange(4))) & 127).reshape(rows, nb * 32)  # sign index per group
        self.sc = aux[:, :, 1] >> 28  # (rows, sub-blocks)
        self.grid, self.signs = _grid("IQ2_XXS").astype(np.float64), _signs()
        self.cand = (self.grid[:, None, :] * self.signs[None]).reshape(-1, 8)  # point gi * 128 + si
        self._start(w, h)

    def _sub_scale(self) -> np.ndarray:  # (rows, sub-blocks)
        return np.repeat(self.d, 8, axis=1) * (0.5 + self.sc) * 0.25

    def _reconstruct(self) -> np.ndarray:
        rows = self.w.shape[0]
        pts = self.cand[self.gi * 128 + self.si]  # (rows, groups, 8)
        return (np.repeat(self._sub_scale(), 4, axis=1)[:, :, None] * pts).reshape(rows, -1)

    def _points(self) -> None:
        """Each group of 8 weights: the signed grid point, at the group's scale, that lowers the loss
        most (or the one it has)."""
        cand = self.cand
        for g in range(self.gi.shape[1]):
            cols = slice(8 * g, 8 * g + 8)
            a = self._sub_scale()[:, g // 4]
            # the loss change of point c with c = a C_c, up to a constant per row: a^2 C_c^T Hgg C_c + 2 a u.C_c
            table = np.vstack([((cand @ self.h[cols, cols]) * cand).sum(axis=1)[None], cand.T])
            feats = np.concatenate([(a * a)[:, None], 2 * a[:, None] * self._gradient(cols)], axis=1)
            best, change = self._best_points(feats, table, self.gi[:, g] * 128 + self.si[:, g])
            if change.size:
                c = best[change]
                self.gi[change, g], self.si[change, g] = c // 128, c % 128
                self._apply(change, cols, a[change, None] * cand[c])

    def _sub_blocks(self) -> None:
        """Each sub-block of 32: the scale code (0..15) that lowers the loss most, its points kept."""
        rows = self.w.shape[0]
        mult = ((0.5 + np.arange(16)) * 0.25)[None, :, None]
        for j in range(self.sc.shape[1]):
            base = self.cand[self.gi[:, 4 * j:4 * j + 4] * 128 + self.si[:, 4 * j:4 * j + 4]].reshape(rows, 32)
            values = self.d[:, j // 8, None, None] * mult * base[:, None, :]  # (rows, 16, 32)
            moved, c = self._best_sub_block(j, values, self.sc[:, j])
            self.sc[moved, j] = c[moved]

    def encode(self) -> np.ndarray:
        rows, nb = self.d.shape
        out = np.zeros((rows, nb, _IQ2XXS_BYTES), dtype=np.uint8)
        out[:, :, :2] = self.d.astype(np.float16)[:, :, None].view(np.uint8)
        gi = self.gi.reshape(rows, nb * 8, 4)
        si = self.si.reshape(rows, nb * 8, 4)
        aux = np.zeros((rows, nb * 8, 2), dtype=np.uint32)
        aux[:, :, 0] = (gi << (8 * np.arange(4))).sum(axis=2).astype(np.uint32)
        aux[:, :, 1] = ((si << (7 * np.arange(4))).sum(axis=2) | (self.sc << 28)).astype(np.uint32)
        out[:, :, 2:] = aux.reshape(rows, nb, 16).view(np.uint8)
        return out.reshape(rows, nb * _IQ2XXS_BYTES)


_REFINERS = {"IQ1_S": _Iq1s, "IQ2_XXS": _Iq2xxs}

#: formats `refine` improves; the rest are returned unchanged
REFINABLE = tuple(_REFINERS)

_GRIDS: dict[str, np.ndarray] = {}


def _grid(name: str) -> np.ndarray:
    if name not in _GRIDS:
        _GRIDS[name] = grid(name)
    return _GRIDS[name]


def _signs() -> np.ndarray:
    if "signs" not in _GRIDS:
        _GRIDS["signs"] = sign_patterns()
    return _GRIDS["signs"]
