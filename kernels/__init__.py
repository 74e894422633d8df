"""moeplan's GGUF-compatible quantization kernels.

`kernels.formats` (the format registry) is pure Python; quantize / dequantize / quant_error load
the C extension on first use.
"""

from . import formats
from .formats import FORMATS, Format, GGMLType

_API = ("quantize", "dequantize", "quant_error", "QuantError", "available_formats", "openmp_info")

__all__ = ["formats", "FORMATS", "Format", "GGMLType", *_API]


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
