"""Reading a checkpoint's files safely: the shard list, safetensors headers and JSON.

`Checkpoint` is the one reader of weights: a tensor, a range of rows or one routed expert at a time,
with plain file reads (no memory map: what the process holds is what it read and has not yet
dropped), FP8 dequantized on read, NaN / Inf refused.

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
from typing import Any, Mapping

import numpy as np

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
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe or a device)"
        raise CheckpointError(f"{what} {path} is {kind}; give the path of the file itself")
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
        raise CheckpointError(f"{where}: not JSON ({exc})") from None


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


# ---------------------------------------------------------------------------------------------
# reading tensors

def as_float(x):
    """A contiguous float32 / float16 / bfloat16 torch tensor (the kernels read those without widening)."""
    import torch

    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    return x.contiguous()


def finite(name: str, x, where: str = ""):
    """x, refusing NaN / Inf weights (a corrupt checkpoint; quantizing or evaluating them would hide it)."""
    import torch

    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{where}tensor {name} has a non-finite value ({x[tuple(bad)].item()} at index {tuple(bad)}): "
                         "the checkpoint is corrupt; re-export or repair it")
    return x


# safetensors dtype -> (numpy dtype read from the file, torch dtype it is viewed as, or None for numpy's own)
_ST_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, "bfloat16"),
              "F64": (np.float64, None), "F8_E4M3": (np.uint8, "float8_e4m3fn")}


@dataclass(frozen=True)
class _StEntry:
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # byte offset of the data in the shard file


class Checkpoint:
    """Tensors of a safetensors checkpoint directory, read with plain file reads a contiguous range at
    a time (one tensor, a chunk of rows, one expert); no memory map, so what the process holds is what
    was read and not yet written.

    FP8 checkpoints (DeepSeek-V3's original release: float8_e4m3fn weights with a float32
    `weight_scale_inv` per 128x128 block) are dequantized on read."""

    def __init__(self, model_dir: Path, config: Mapping):
        shards = checkpoint_shards(Path(model_dir))
        if not shards:
            raise FileNotFoundError(f"{model_dir} has no *.safetensors files")
        self._entries: dict[str, _StEntry] = {}
        for shard in shards:
            header, _ = read_safetensors_header(shard)  # validated: ranges inside the file, shapes >= 0
            for name, t in header.items():
                if name in self._entries:
                    raise ValueError(f"tensor {name} is in both {self._entries[name].shard.name} and {shard.name}")
                self._entries[name] = _StEntry(shard, t.dtype, t.shape, t.start)
        q = config.get("quantization_config") or {}
        self.fp8_block = tuple(q.get("weight_block_size") or (128, 128)) if q.get("quant_method") == "fp8" else None
        self._files: dict[Path, Any] = {}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """Every tensor name of the checkpoint, sorted."""
        return sorted(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def _raw(self, name: str, lead: tuple[int, int], inner: tuple[int, int] | None = None):
        """Elements lead[0]:lead[1] of the first axis (with `inner`: one first-axis element, rows
        inner[0]:inner[1] of its second axis) as a torch tensor of the file's dtype."""
        import torch

        e = self._entries[name]
        if e.dtype not in _ST_DTYPES:
            raise ValueError(f"{name} has dtype {e.dtype}; supported: {', '.join(_ST_DTYPES)}")
        np_dtype, torch_view = _ST_DTYPES[e.dtype]
        item = np.dtype(np_dtype).itemsize
        inner_size = int(np.prod(e.shape[1:], dtype=np.int64)) if len(e.shape) > 1 else 1
        if inner is None:
            first, count, shape = lead[0] * inner_size, (lead[1] - lead[0]) * inner_size, (lead[1] - lead[0], *e.shape[1:])
        else:
            row = int(np.prod(e.shape[2:], dtype=np.int64))
            first = lead[0] * inner_size + inner[0] * row
            count, shape = (inner[1] - inner[0]) * row, (inner[1] - inner[0], *e.shape[2:])
        if e.shard not in self._files:
            self._files[e.shard] = open(e.shard, "rb")
        f = self._files[e.shard]
        f.seek(e.offset + first * item)
        buf = bytearray(count * item)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"{e.shard} ends inside tensor {name}; is the file truncated?")
        x = torch.from_numpy(np.frombuffer(buf, dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(shape))
        return x.view(getattr(torch, torch_view)) if torch_view else x

    def read(self, name: str, rows: tuple[int, int] | None = None, index: int | None = None):
        """The tensor (or rows [r0, r1) of it, or element `index` of its first axis) as a torch tensor
        in float32, float16 or bfloat16."""
        import torch

        shape = self.shape(name)
        if index is not None:
            x = self._raw(name, (index, index + 1))[0]
        elif rows is not None:
            x = self._raw(name, rows)
        elif shape:
            x = self._raw(name, (0, shape[0]))
        else:
            raise ValueError(f"{name} is a scalar; no GGUF tensor is made of one")
        if x.dtype == getattr(torch, "float8_e4m3fn", None):
            return finite(name, self._dequant_fp8(name, x, rows))
        return finite(name, as_float(x))

    def _dequant_fp8(self, name: str, x, rows: tuple[int, int] | None):
        sname = name + "_scale_inv"
        if sname not in self:
            raise ValueError(f"{name} is float8 but the checkpoint has no {sname}")
        if x.dim() != 2:
            raise ValueError(f"{name}: float8 weights of {x.dim()} dimensions are not supported")
        br, bc = self.fp8_block or (128, 128)
        r0 = rows[0] if rows is not None else 0
        if r0 % br:
            raise AssertionError("float8 row chunks must start on a scale block")
        scale = self._raw(sname, (r0 // br, (r0 + x.shape[0] + br - 1) // br)).float()
        scale = scale.repeat_interleave(br, 0)[: x.shape[0]].repeat_interleave(bc, 1)[:, : x.shape[1]]
        return (x.float() * scale).contiguous()

    def row_chunk(self, name: str, chunk_bytes: int = 64 << 20) -> int:
        """Rows per read for a 2-D tensor: about chunk_bytes of float32, a multiple of the FP8 block."""
        shape = self.shape(name)
        rows = max(1, chunk_bytes // (4 * max(1, shape[-1])))
        if self.fp8_block is not None:
            rows = max(self.fp8_block[0], rows // self.fp8_block[0] * self.fp8_block[0])
        return rows

    def expert(self, prefix: str, e: int, kind: str):
        """One routed expert's (rows, cols) weight, from per-expert tensors or a fused 3-D one
        (transformers' gate_up_proj (E, 2I, H), down_proj (E, H, I))."""
        name = f"{prefix}.{e}.{kind}.weight"
        if name in self:
            return self.read(name)
        if kind in ("gate_proj", "up_proj"):
            if f"{prefix}.{kind}" in self:
                return self.read(f"{prefix}.{kind}", index=e)
            fused = f"{prefix}.gate_up_proj"  # (E, 2I, H): gate rows first, then up rows
            two_i = self.shape(fused)[1]
            half = (0, two_i // 2) if kind == "gate_proj" else (two_i // 2, two_i)
            return finite(fused, as_float(self._raw(fused, (e, e + 1), half)))
        return self.read(f"{prefix}.down_proj", index=e)


# ---------------------------------------------------------------------------------------------
# writing

_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn"}


def write_safetensors(path: str | os.PathLike, specs, metadata: Mapping[str, str] | None = None) -> None:
    """A safetensors file written one tensor at a time, never the whole file in memory: the header
    (names, dtypes, shapes, offsets) first, then each producer's tensor in order.

    specs: (name, dtype, shape, produce) with dtype one of F32 / F16 / BF16 / F8_E4M3 and produce() a
    torch tensor of that shape (converted to dtype). Write to a temp path (kernels.outputs)."""
    import torch

    header, offset = {}, 0
    for name, dtype, shape, _ in specs:
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"{name}: cannot write dtype {dtype} (supported: {', '.join(_TORCH_DTYPES)})")
        n = ST_ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "xb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, produce in specs:
            t = produce()
            if tuple(t.shape) != tuple(shape):
                raise AssertionError(f"{name}: produced {tuple(t.shape)}, header says {tuple(shape)}")
            t = t.detach().to(getattr(torch, _TORCH_DTYPES[dtype])).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())

