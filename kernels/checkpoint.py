"""Reading a checkpoint's files safely: the shard list, safetensors headers and JSON.

Everything here treats the checkpoint as untrusted input. Shard names from
model.safetensors.index.json must stay inside the checkpoint directory and name regular files (no
`../x`, no absolute paths, no FIFOs or devices, which would hang or leak). A safetensors header is
checked completely before any tensor is read (the safetensors library's own rules: a JSON object of
known dtypes, non-negative shapes, byte ranges that match the shape and lie inside the file, in
order and without overlap). Every problem is a CheckpointError (a ValueError) naming the file and
the tensor or field.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# safetensors dtype -> bytes per element (the format's full list)
ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file that is malformed, missing or not allowed (the message names it)."""


@dataclass(frozen=True)
class StTensor:
    """One tensor of a safetensors file: dtype, shape and the absolute byte range in the file."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte
    nbytes: int

    @property
    def itemsize(self) -> int:
        return ST_ITEMSIZE[self.dtype]


def regular_file(path: Path, what: str = "file") -> os.stat_result:
    """stat() of `path`, refusing anything but a regular file (a FIFO would block the reader)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} {path} is not a regular file; give the checkpoint's files themselves")
    return st


def read_json(path: str | os.PathLike, what: str = "JSON file", limit: int = MAX_HEADER_BYTES) -> Any:
    """A JSON file, with every way it can be broken reported as one CheckpointError."""
    path = Path(path)
    st = regular_file(path, what)
    if st.st_size > limit:
        raise CheckpointError(f"{what} {path} is {st.st_size} bytes, more than {limit}: is it the right file?")
    with open(path, "rb") as f:
        return parse_json(f.read(), f"{what} {path}")


def parse_json(raw: bytes | str, where: str) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None


def checkpoint_shards(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory: those its model.safetensors.index.json names, else
    every *.safetensors but moeplan's own side files (importance vectors). Each is a regular file
    inside the directory."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.exists() or index.is_symlink():
        obj = read_json(index, "shard index")
        wmap = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        names = sorted(set(wmap.values()))
        shards = [_inside(path, n, index) for n in names]
        missing = [n for n, s in zip(names, shards) if not s.exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {missing[:3]}")
    else:
        shards = sorted(p for p in path.glob("*.safetensors") if not p.name.endswith(".importance.safetensors"))
    for s in shards:
        regular_file(s, "shard")
    return shards


def _inside(root: Path, name: str, index: Path) -> Path:
    """root/name, refusing a name that leaves the checkpoint directory."""
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or "\0" in name:
        raise CheckpointError(f"{index}: shard name {name!r} is not a file name inside the checkpoint directory")
    return root / p


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, StTensor], dict[str, str]]:
    """The tensors of a safetensors file (name -> StTensor, absolute byte ranges) and its metadata,
    validated against the file's size; no tensor data is read."""
    path = Path(path)
    size = regular_file(path, "safetensors file").st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} does not fit the {size}-byte file; is it truncated "
                                  "or not a safetensors file?")
        header = parse_json(f.read(n), f"{path} (safetensors header)")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header must be a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: '__metadata__' must map strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, StTensor] = {}
    for name, e in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"} or len(e) != 3:
            raise CheckpointError(f"{where}: an entry needs exactly 'dtype', 'shape' and 'data_offsets'")
        dtype, shape, off = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(off, list) or len(off) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in off)):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end], got {off!r}")
        numel = 1
        for d in shape:
            numel *= d
        begin, end = off
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(f"{where}: bytes {begin}..{end} lie outside the file's {data_size} data bytes "
                                  "(truncated or corrupt file)")
        if end - begin != numel * ST_ITEMSIZE[dtype]:
            raise CheckpointError(f"{where}: {end - begin} bytes for shape {shape} of {dtype} "
                                  f"({numel * ST_ITEMSIZE[dtype]} expected)")
        tensors[name] = StTensor(name, dtype, tuple(shape), data_start + begin, end - begin)
    spans = sorted((t.start, t.start + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    return tensors, meta
