"""moeplan's GGUF-compatible quantization kernels, installed as `moeplan.kernels`.

`moeplan.kernels.formats` (the format registry) is pure Python; quantize / dequantize / quant_error
load the C extension (`moeplan.kernels._C`) on first use.
"""

if __name__ != "moeplan.kernels":
    # This folder was found under its bare name `kernels` because a moeplan checkout's root is on
    # sys.path (Python started there). The name belongs to Hugging Face's `kernels` package, which
    # transformers imports: load that one in our place, or say that none is installed.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout])
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (moeplan's kernels/ folder is "
                                  f"imported as moeplan.kernels)", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # what the import statement returns
    _spec.loader.exec_module(_module)
else:
    from . import formats
    from .formats import FORMATS, Format, GGMLType

    _API = ("quantize", "dequantize", "quant_error", "QuantError", "sampled_quant_error", "SampledQuantError",
            "available_formats", "openmp_info", "format_range")

    __all__ = ["formats", "FORMATS", "Format", "GGMLType", *_API]

    def __getattr__(name):
        if name in _API:
            from . import api

            return getattr(api, name)
        raise AttributeError(f"module 'moeplan.kernels' has no attribute {name!r}")
