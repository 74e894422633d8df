"""Codebook grids of the IQ1/IQ2/IQ3 formats, taken from the installed `gguf` package.

The grids are data of the GGUF format (the lattice points ggml's decoders look up); they are not
retyped here: `gguf.quants.<TYPE>` carries each one for its own decoder (grid_hex, grid_map,
grid_shape, init_grid()). `load()` hands them to the C kernels, which build their search tables
(nearest-point maps and neighbour lists) from them; kernels.api calls it on first use of a
codebook format.
"""

from __future__ import annotations

import threading

import numpy as np

from .formats import Family, FORMATS, Format

_loaded: set[str] = set()
_lock = threading.Lock()


def codebook_formats() -> list[str]:
    return [f.name for f in FORMATS.values() if f.family is Family.CODEBOOK]


def grid(name: str) -> np.ndarray:
    """The codebook of format `name` as float32 (points, coordinates), in the units its decoder
    multiplies by the block scale (e.g. 8, 25, 43 for the IQ2 formats; -1, 0, 1 for IQ1)."""
    import gguf.quants as q

    cls = getattr(q, name, None)
    if cls is None or not getattr(cls, "grid_hex", None):
        raise ValueError(f"the installed gguf package has no codebook for {name}")
    cls.init_grid()
    g = np.ascontiguousarray(np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape))
    return g


def _ksigns() -> np.ndarray:
    """gguf's sign table of IQ2_XXS / IQ2_XS / IQ3_XXS: the 8 sign bits (set: negative) of each 7-bit index."""
    import gguf.quants as q

    return np.frombuffer(q.IQ2_XXS.ksigns, dtype=np.uint8)


def sign_patterns() -> np.ndarray:
    """(128, 8) float64 +-1: the sign patterns of IQ2_XXS / IQ2_XS / IQ3_XXS by their 7-bit index."""
    return np.where((_ksigns()[:, None] >> np.arange(8)) & 1, -1.0, 1.0)


def check_sign_table() -> None:
    """The 7-bit sign indices of IQ2_XXS / IQ2_XS / IQ3_XXS expand to 8 signs with even parity; the C
    decoder computes that rule, so check it against gguf's table."""
    table = _ksigns()
    i = np.arange(128, dtype=np.uint8)
    parity = np.unpackbits(i[:, None], axis=1).sum(axis=1) & 1
    expected = i | (parity.astype(np.uint8) << 7)
    if not np.array_equal(table, expected):
        raise ImportError("gguf's IQ2 sign table is not the even-parity rule the C kernels decode with")


def load(fmt: str | Format | None = None) -> None:
    """Install the grid of one codebook format (or of all of them) in the C kernels. Cheap when done."""
    from . import _C
    from .formats import get

    names = codebook_formats() if fmt is None else [get(fmt).name]
    with _lock:
        for name in names:
            if name in _loaded:
                continue
            if get(name).family is not Family.CODEBOOK:
                raise ValueError(f"{name} is not a codebook format")
            if name in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS"):
                check_sign_table()
            _C.set_grid(int(get(name).type_id), grid(name))
            _loaded.add(name)
