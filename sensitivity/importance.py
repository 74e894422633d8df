"""Importance vectors (tensor name -> per-input-column mean of x^2, what the quantizers weight their
errors by): written and read here, whichever tool made the file.

- `save_importance` / `load_importance`: moeplan's own .safetensors (`moeplan profile` writes
  PROFILE.importance.safetensors next to PROFILE.json, `importance_path`).
- `load_importance_file`: that file or a llama-imatrix file (GGUF or legacy .dat, kernels.imatrix),
  told apart by content.
- `importance_vectors`: what a command uses: a given file, or the checkpoint's shipped
  profile.importance.safetensors when no file is given (`moeplan materialize`, `moeplan evaluate`,
  the measured curves and the demo all resolve it here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from moeplan.kernels.checkpoint import read_safetensors_header, regular_file
from moeplan.kernels.imatrix import ImportanceFileError, check_importance, file_kind, imatrix_importance, read_imatrix
from moeplan.kernels.inventory import build_inventory
from moeplan.kernels.outputs import output_file


def importance_path(profile_path: str | os.PathLike) -> Path:
    """The importance file written next to a profile (PROFILE.json -> PROFILE.importance.safetensors)."""
    p = Path(profile_path)
    return p.with_name(p.name.removesuffix(".json") + ".importance.safetensors")


SHIPPED_IMPORTANCE = importance_path("profile.json").name  # next to a checkpoint's shipped profile.json


def save_importance(importance: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    from safetensors.numpy import save_file

    with output_file(path, "importance") as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in importance.items()}, str(tmp))


def load_importance(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Importance vectors from moeplan's .safetensors, each finite and non-negative."""
    from safetensors.numpy import load_file

    header, _ = read_safetensors_header(path)  # a broken file is named here, not deep in the library
    bad = [n for n, t in header.items() if t.dtype not in ("F32", "F16", "BF16", "F64")]
    if bad:
        raise ValueError(f"importance file {path}: tensor {bad[0]} has dtype {header[bad[0]].dtype}, not float")
    return dict(check_importance(load_file(str(path)), path))


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


def importance_vectors(model_dir: str | os.PathLike, importance, option: str = "importance file") -> tuple:
    """(file or None, tensor name -> importance vector, or None): `importance` a loaded mapping, a
    path to a moeplan importance file or a llama-imatrix file (which must exist; `option` names it
    in the error), or None for the checkpoint's shipped profile.importance.safetensors when there is
    one."""
    if isinstance(importance, Mapping):
        return None, dict(importance)
    if importance is None:
        p = Path(model_dir) / SHIPPED_IMPORTANCE
        return (p, load_importance(p)) if p.exists() else (None, None)
    p = Path(importance)
    if not p.exists():
        raise FileNotFoundError(f"{option} {p} does not exist")
    return p, load_importance_file(p, model_dir)
