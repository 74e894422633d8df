"""Importance vectors from a file, whichever tool wrote it: a moeplan importance .safetensors
(`moeplan profile`'s PROFILE.importance.safetensors, sensitivity.profiler.load_importance) or a
llama-imatrix file (GGUF or legacy .dat, kernels.imatrix), told apart by content."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moeplan.kernels.checkpoint import regular_file
from moeplan.kernels.imatrix import ImportanceFileError, check_importance, file_kind, imatrix_importance, read_imatrix
from moeplan.kernels.inventory import build_inventory

from .profiler import load_importance


def load_importance_file(path: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Importance vectors from `path`, detected by content: a moeplan importance .safetensors
    (`moeplan profile`'s PROFILE.importance.safetensors), or a llama-imatrix file (GGUF or legacy
    .dat), mapped to the checkpoint names of `model_dir` (needed for an imatrix)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"importance file {path} does not exist")
    regular_file(path, "importance file")  # a FIFO would block the content sniffing below
    kind = file_kind(path)
    if kind == "safetensors":
        return load_importance(path)
    if kind in ("gguf", "dat"):
        im = read_imatrix(path)
        if model_dir is None:
            raise ValueError("reading a llama.cpp imatrix as importance needs the checkpoint (model_dir)")
        out = check_importance(imatrix_importance(im, build_inventory(model_dir)), path)
        if not out:
            raise ImportanceFileError(f"{path}: none of the imatrix's {len(im.entries)} tensors (e.g. "
                                      f"{next(iter(im.entries), '-')}) is a tensor of {model_dir}")
        return out
    raise ImportanceFileError(f"{path} is neither a moeplan importance file (.safetensors from `moeplan profile`) "
                              "nor a llama.cpp imatrix (GGUF or legacy .dat from llama-imatrix)")
