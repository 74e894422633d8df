"""The one table of quantization formats.

Every stage reads this table: the C kernels are checked against it (sizeof(block) per format),
the allocator's byte model, the inventory and the GGUF writer compute sizes from it. Block sizes
and bytes per block are those of GGUF/ggml (the `gguf` package's GGML_QUANT_SIZES; a test checks
each entry against it).

Row-length rule: a format applies to a tensor whose rows (the last dimension, ggml's ne[0]) are a
multiple of its block size. For other rows llama.cpp substitutes a fallback format (llama-quant.cpp,
`tensor_type_fallback`): the 256-blocks fall back to a 32-block format, and that to F16 when the
row is not a multiple of 32 either. `resolve()` applies the same rule.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Sequence


class GGMLType(enum.IntEnum):
    """ggml type ids as stored in GGUF files."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35


class Family(str, enum.Enum):
    FLOAT = "float"
    LEGACY = "legacy"  # 32-element blocks, one scale (and min)
    K = "k"  # 256-element super-blocks with 6/8-bit sub-block scales
    IQ4 = "iq4"  # non-linear 4-bit grid
    TERNARY = "ternary"
    CODEBOOK = "codebook"  # IQ1/IQ2/IQ3 lattice codebooks


@dataclass(frozen=True)
class Format:
    name: str
    type_id: GGMLType
    block_size: int  # weights per block
    type_size: int  # bytes per block
    family: Family
    fallback: str | None = None  # llama.cpp's substitute when rows are not a multiple of block_size
    needs_importance: bool = False  # quantizer refuses to run without an importance vector

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def fits(self, ncols: int) -> bool:
        return ncols > 0 and ncols % self.block_size == 0

    def row_bytes(self, ncols: int) -> int:
        if not self.fits(ncols):
            raise ValueError(
                f"{self.name} needs rows that are a multiple of {self.block_size}; got {ncols}"
                f" (fallbacks that fit: {', '.join(fallback_chain(self.name, ncols)) or 'none'})"
            )
        return ncols // self.block_size * self.type_size

    def nbytes(self, shape: Sequence[int]) -> int:
        """Exact bytes of a tensor of `shape` (rows last) stored in this format."""
        if len(shape) == 0:
            raise ValueError("a scalar has no row to quantize")
        nrows = 1
        for s in shape[:-1]:
            nrows *= int(s)
        return nrows * self.row_bytes(int(shape[-1]))


_F = Family
FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format("F32", GGMLType.F32, 1, 4, _F.FLOAT),
        Format("F16", GGMLType.F16, 1, 2, _F.FLOAT),
        Format("BF16", GGMLType.BF16, 1, 2, _F.FLOAT),
        Format("Q8_0", GGMLType.Q8_0, 32, 34, _F.LEGACY, fallback="F16"),
        Format("Q5_1", GGMLType.Q5_1, 32, 24, _F.LEGACY, fallback="F16"),
        Format("Q5_0", GGMLType.Q5_0, 32, 22, _F.LEGACY, fallback="F16"),
        Format("Q4_1", GGMLType.Q4_1, 32, 20, _F.LEGACY, fallback="F16"),
        Format("Q4_0", GGMLType.Q4_0, 32, 18, _F.LEGACY, fallback="F16"),
        Format("Q6_K", GGMLType.Q6_K, 256, 210, _F.K, fallback="Q8_0"),
        Format("Q5_K", GGMLType.Q5_K, 256, 176, _F.K, fallback="Q5_1"),
        Format("Q4_K", GGMLType.Q4_K, 256, 144, _F.K, fallback="Q5_0"),
        Format("Q3_K", GGMLType.Q3_K, 256, 110, _F.K, fallback="Q4_0"),
        Format("Q2_K", GGMLType.Q2_K, 256, 84, _F.K, fallback="Q4_0"),
        Format("IQ4_NL", GGMLType.IQ4_NL, 32, 18, _F.IQ4, fallback="F16"),
        Format("IQ4_XS", GGMLType.IQ4_XS, 256, 136, _F.IQ4, fallback="IQ4_NL"),
        Format("TQ2_0", GGMLType.TQ2_0, 256, 66, _F.TERNARY, fallback="Q4_0"),
        Format("TQ1_0", GGMLType.TQ1_0, 256, 54, _F.TERNARY, fallback="Q4_0"),
        Format("IQ3_S", GGMLType.IQ3_S, 256, 110, _F.CODEBOOK, fallback="IQ4_NL", needs_importance=True),
        Format("IQ3_XXS", GGMLType.IQ3_XXS, 256, 98, _F.CODEBOOK, fallback="IQ4_NL", needs_importance=True),
        Format("IQ2_S", GGMLType.IQ2_S, 256, 82, _F.CODEBOOK, fallback="IQ4_NL", needs_importance=True),
        Format("IQ2_XS", GGMLType.IQ2_XS, 256, 74, _F.CODEBOOK, fallback="IQ4_NL", needs_importance=True),
        Format("IQ2_XXS", GGMLType.IQ2_XXS, 256, 66, _F.CODEBOOK, fallback="IQ4_NL", needs_importance=True),
        Format("IQ1_M", GGMLType.IQ1_M, 256, 56, _F.CODEBOOK, fallback="IQ4_NL", needs_importance=True),
        Format("IQ1_S", GGMLType.IQ1_S, 256, 50, _F.CODEBOOK, fallback="IQ4_NL", needs_importance=True),
    ]
}

BY_TYPE_ID: dict[int, Format] = {int(f.type_id): f for f in FORMATS.values()}


def get(fmt: str | Format | int) -> Format:
    """Look a format up by name (case-insensitive), ggml type id, or pass a Format through."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, (int, GGMLType)) and not isinstance(fmt, bool):
        try:
            return BY_TYPE_ID[int(fmt)]
        except KeyError:
            raise ValueError(f"unknown ggml type id {int(fmt)}; known: {sorted(BY_TYPE_ID)}") from None
    if isinstance(fmt, str):
        f = FORMATS.get(fmt.upper())
        if f is not None:
            return f
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    raise TypeError(f"a format is a name, a ggml type id or a Format, not {type(fmt).__name__}")


def fallback_chain(fmt: str | Format, ncols: int) -> list[str]:
    """The formats llama.cpp would try after `fmt` for rows of `ncols`, in order, ending with one that fits."""
    out: list[str] = []
    f = get(fmt)
    while f.fallback is not None:
        f = FORMATS[f.fallback]
        out.append(f.name)
        if f.fits(ncols):
            return out
    return out if (out and FORMATS[out[-1]].fits(ncols)) else []


def resolve(fmt: str | Format, ncols: int) -> Format:
    """The format llama.cpp actually stores for rows of `ncols` when asked for `fmt`.

    llama.cpp substitutes at most once and then goes to F16 (tensor_type_fallback): Q4_K -> Q5_0,
    and Q5_0 -> F16 if the rows are not a multiple of 32 either.
    """
    f = get(fmt)
    if f.fits(ncols):
        return f
    if f.fallback is None:
        raise ValueError(f"{f.name} has no fallback for rows of {ncols}")
    fb = FORMATS[f.fallback]
    if fb.fits(ncols):
        return fb
    return FORMATS["F16"]


def names(fmts: Iterable[str | Format]) -> list[str]:
    return [get(f).name for f in fmts]
