"""llama.cpp importance matrices (the output of llama-imatrix) as moeplan importance vectors.

moeplan's importance is a dict: checkpoint tensor name -> (cols,) float32, one weight per input
column, per expert for routed experts (model.layers.L.mlp.experts.E.down_proj.weight), as
sensitivity.importance.load_importance returns it. llama-imatrix writes the same statistic, the mean of
the squared activations entering each column, keyed by GGUF tensor name, in one of two layouts:

- GGUF (recent llama-imatrix, the default; general.type = "imatrix"): per tensor NAME two F32
  tensors, NAME.in_sum2 with ggml shape (ne0 = cols, nmat) holding the sums of squared inputs and
  NAME.counts (1, nmat) holding how many rows each matrix saw; nmat is the expert count for a stacked
  expert tensor (blk.L.ffn_*_exps.weight), else 1 (DeepSeek's per-head attn_k_b / attn_v_b: one row
  of heads x cols values and one count).
  The importance is in_sum2 / counts, and ones for a matrix with count 0 (llama-quantize's reading,
  tools/quantize/quantize.cpp load_imatrix).
- legacy .dat (--output-format dat): int32 n_entries; per entry int32 len, name, int32 ncall, int32
  nval, float32[nval] = (sums / count) * ncall; then int32 chunk count, int32 len, dataset name. The
  importance is values / ncall (all matrices of a tensor in one flat array).

Names are mapped back with kernels.gguf_layout (the names kernels.gguf_export writes): a stacked
expert tensor's matrix E is expert E's importance; DeepSeek's kv_b_proj (input kv_lora) takes the
mean over heads of attn_v_b (its input is kv_lora as well; llama-imatrix writes the H heads' sums
in one row of H x kv_lora with one count, and llama-quantize uses the per-head vectors, moeplan's
export one vector for all heads); attn_k_b (input qk_nope) has no
checkpoint tensor of its own and is dropped, as are tensors the checkpoint does not have.
token_embd is not a matrix product, so llama-imatrix never records it (nor output.weight without
--process-output): such tensors get no importance, as in llama-quantize.

    read_imatrix(path) -> Imatrix           # the raw entries, by GGUF name
    imatrix_importance(imatrix, names)      # -> checkpoint name -> (cols,)

(sensitivity.importance.load_importance_file reads either kind of importance file, by content.)
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .gguf_layout import EXPERT_MATRIX, KvBSplit, gguf_names
from .outputs import output_file



class ImportanceFileError(ValueError):
    """A file that is neither a moeplan importance file nor a llama.cpp imatrix."""


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # (nmat, ne0) float64: GGUF in_sum2, or legacy values (nmat unknown: (1, nval))
    counts: np.ndarray | None  # (nmat,) rows seen per matrix (GGUF); None for legacy
    ncall: int = 0  # legacy only

    def values(self, ncols: int | None = None) -> np.ndarray:
        """(nmat, ne0) float32 importance: sums / counts (ones where a matrix saw no rows), or for a
        legacy entry values / ncall, reshaped to rows of `ncols`."""
        if self.counts is None:
            v = self.sums.reshape(-1) / self.ncall if self.ncall > 0 else self.sums.reshape(-1)
            if ncols is None:
                return v.reshape(1, -1).astype(np.float32)
            if v.size % ncols:
                raise ValueError(f"an imatrix entry of {v.size} values does not split into rows of {ncols}")
            return v.reshape(-1, ncols).astype(np.float32)
        c = self.counts.reshape(-1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(c > 0, self.sums / np.where(c > 0, c, 1), 1.0)
        return v.astype(np.float32)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]  # GGUF tensor name -> entry
    legacy: bool
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# reading

def file_kind(path: Path) -> str:
    """'gguf', 'safetensors', 'dat' (parses as legacy imatrix), or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9:
        n = struct.unpack("<Q", head[:8])[0]
        if head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8:
            return "safetensors"
    try:
        _read_legacy(path)
        return "dat"
    except (ValueError, struct.error, UnicodeDecodeError):
        return "unknown"


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    names = sorted(n[: -len(".in_sum2")] for n in tensors if n.endswith(".in_sum2"))
    gtype = r.fields["general.type"].contents() if "general.type" in r.fields else None
    if not names:
        raise ImportanceFileError(f"{path} is a GGUF file but not an imatrix (general.type {gtype!r}, no "
                                  "*.in_sum2 tensors); give the file llama-imatrix wrote, or a moeplan "
                                  "importance .safetensors")
    entries = {}
    for name in names:
        s, c = tensors[name + ".in_sum2"], tensors.get(name + ".counts")
        if c is None:
            raise ImportanceFileError(f"{path}: imatrix tensor {name}.in_sum2 has no {name}.counts")
        sums = np.asarray(s.data, dtype=np.float64)
        ne0 = int(s.shape[0])  # gguf-py's shape is ggml's order: (ne0, nmat)
        sums = sums.reshape(-1, ne0)
        counts = np.asarray(c.data, dtype=np.float64).reshape(-1)
        if counts.size != sums.shape[0]:
            raise ImportanceFileError(f"{path}: {name} has {sums.shape[0]} matrices but {counts.size} counts")
        entries[name] = ImatrixEntry(sums, counts)

    def field_val(key, default):
        return r.fields[key].contents() if key in r.fields else default

    return Imatrix(entries, legacy=False, chunk_count=int(field_val("imatrix.chunk_count", 0)),
                   chunk_size=int(field_val("imatrix.chunk_size", 0)),
                   datasets=list(field_val("imatrix.datasets", []) or []))


def _read_legacy(path: Path) -> Imatrix:
    raw = Path(path).read_bytes()
    pos = 0

    def i32():
        nonlocal pos
        if pos + 4 > len(raw):
            raise ValueError("truncated")
        (v,) = struct.unpack_from("<i", raw, pos)
        pos += 4
        return v

    n = i32()
    if not (0 < n < 1 << 24):
        raise ValueError("bad entry count")
    entries = {}
    for _ in range(n):
        ln = i32()
        if not (0 < ln < 4096) or pos + ln > len(raw):
            raise ValueError("bad name length")
        name = raw[pos:pos + ln].decode("utf-8")
        pos += ln
        ncall, nval = i32(), i32()
        if nval < 0 or pos + 4 * nval > len(raw):
            raise ValueError("bad value count")
        vals = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        entries[name] = ImatrixEntry(vals.reshape(1, -1), None, ncall)
    chunks = datasets = None
    if pos < len(raw):
        chunks = i32()
        if pos < len(raw):
            ln = i32()
            if ln < 0 or pos + ln != len(raw):
                raise ValueError("trailing bytes")
            datasets = [raw[pos:pos + ln].decode("utf-8", "replace")]
            pos += ln
    if pos != len(raw):
        raise ValueError("trailing bytes")
    return Imatrix(entries, legacy=True, chunk_count=int(chunks or 0), datasets=datasets or [])


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """A llama-imatrix file (GGUF or legacy .dat), by content."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "gguf":
        return _read_gguf(path)
    if kind == "dat":
        return _read_legacy(path)
    raise ImportanceFileError(f"{path} is not a llama.cpp imatrix (neither GGUF with *.in_sum2 tensors nor the "
                              "legacy .dat layout)")


def is_imatrix(path: str | os.PathLike) -> bool:
    """True for a llama-imatrix file (GGUF with *.in_sum2 tensors, or legacy .dat)."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "dat":
        return True
    if kind == "gguf":
        try:
            _read_gguf(path)
            return True
        except ImportanceFileError:
            return False
    return False


# ---------------------------------------------------------------------------------------------
# GGUF names -> checkpoint names

def imatrix_importance(imatrix: Imatrix, tensors: Iterable, *, strict: bool = True) -> dict[str, np.ndarray]:
    """Checkpoint tensor name -> (cols,) float32 importance from `imatrix`, for `tensors` (an
    Inventory or TensorInfo-like objects with .name and .shape; 2-D weights only). With `strict`, an
    entry whose column count does not match its checkpoint tensor raises."""
    out: dict[str, np.ndarray] = {}
    model_type = getattr(tensors, "model_type", None)
    for t in tensors:
        shape = tuple(int(d) for d in t.shape)
        if len(shape) != 2:
            continue
        cols = shape[-1]
        try:
            gnames = gguf_names(t.name, model_type)
        except ValueError:
            continue
        m = EXPERT_MATRIX.match(t.name)
        if KvBSplit.is_kv_b(t.name):
            gnames = [g for g in gnames if g.endswith("attn_v_b.weight")]  # input kv_lora, like kv_b_proj's
        entry = imatrix.entries.get(gnames[0]) if gnames else None
        if entry is None:
            continue
        if m:  # matrix E of the stacked tensor
            v = entry.values(cols)
            e = int(m["expert"])
            if v.shape[1] != cols or e >= v.shape[0]:
                if strict:
                    raise ValueError(f"imatrix {gnames[0]} has {v.shape[0]} x {v.shape[1]} values; {t.name} needs "
                                     f"expert {e} of rows of {cols}")
                continue
            out[t.name] = np.ascontiguousarray(v[e])
            continue
        # several matrices for one checkpoint tensor (attn_v_b: one per head; llama-imatrix keeps one
        # count for them all and writes their values in one row of H x cols): pooled, weighted by rows seen
        vals = entry.values().reshape(-1)
        if vals.size % cols:
            if strict:
                raise ValueError(f"imatrix {gnames[0]} has {vals.size} values, not rows of {t.name}'s {cols} columns")
            continue
        mats = vals.reshape(-1, cols)
        w = np.ones(mats.shape[0])
        if entry.counts is not None and entry.counts.size == mats.shape[0]:
            w = entry.counts.astype(np.float64)
        v = (mats * w[:, None]).sum(axis=0) / w.sum() if w.sum() > 0 else mats.mean(axis=0)
        v = v.reshape(1, -1)
        out[t.name] = np.ascontiguousarray(v[0], dtype=np.float32)
    return out


def check_importance(values: Mapping[str, np.ndarray], source) -> Mapping[str, np.ndarray]:
    """Refuse importance vectors with negative or non-finite values (a mean of squares is neither)."""
    for name, v in values.items():
        if not (np.isfinite(v).all() and (v >= 0).all()):
            raise ValueError(f"importance file {source}: {name} has negative or non-finite values; importance is "
                             "a mean of squares (re-run `moeplan profile` or llama-imatrix)")
    return values


# ---------------------------------------------------------------------------------------------
# writing (tests, and for handing moeplan's importance to llama-quantize)

def write_imatrix_gguf(path: str | os.PathLike, entries: Mapping[str, tuple[np.ndarray, np.ndarray]],
                       chunk_count: int = 1, chunk_size: int = 512, datasets: Iterable[str] = ()) -> None:
    """A GGUF imatrix in llama-imatrix's layout: entries: GGUF name -> (sums (nmat, ne0), counts (nmat,))."""
    import gguf

    w = gguf.GGUFWriter(str(path), "")
    for kv in w.kv_data:  # llama-imatrix writes no general.architecture
        kv.pop("general.architecture", None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name in sorted(entries):
        sums, counts = entries[name]
        sums = np.asarray(sums, dtype=np.float32)
        sums = sums.reshape(1, -1) if sums.ndim == 1 else sums
        counts = np.asarray(counts, dtype=np.float32).reshape(-1, 1)
        w.add_tensor(name + ".in_sum2", np.ascontiguousarray(sums))
        w.add_tensor(name + ".counts", np.ascontiguousarray(counts))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()



def profile_imatrix_entries(importance: Mapping[str, np.ndarray], counts: Mapping[str, float], tensors: Iterable,
                            config: Mapping) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """llama-imatrix's entries (GGUF name -> (sums, counts)) for importance vectors (checkpoint name ->
    per-column mean of x^2) measured on `counts` tokens each: the inverse of imatrix_importance.

    Routed experts stack into their layer's *_exps entry, one row and one count per expert (an
    expert no token was routed to: zeros, count 0, which llama-quantize reads as ones). DeepSeek's
    kv_b_proj gives attn_v_b, whose input is kv_b_proj's, the vector repeated once per head with
    one count (llama-imatrix's layout); attn_k_b, whose input is the query's per-head part, has no
    entry (llama-quantize then quantizes it without importance). The token embedding is a lookup:
    no entry, as llama-imatrix writes none."""
    entries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    stacked: dict[str, dict[int, tuple[np.ndarray, float]]] = {}
    model_type = config.get("model_type")
    for t in tensors:
        if len(t.shape) != 2 or t.name not in importance:
            continue
        try:
            gnames = gguf_names(t.name, model_type)
        except ValueError:
            continue
        if not gnames or gnames[0].startswith("token_embd"):
            continue
        vec = np.asarray(importance[t.name], dtype=np.float64)
        n = float(counts.get(t.name, 0.0))
        m = EXPERT_MATRIX.match(t.name)
        if m:
            stacked.setdefault(gnames[0], {})[int(m["expert"])] = (vec, n)
        elif KvBSplit.is_kv_b(t.name):
            heads = KvBSplit.of(config).heads
            v_b = [g for g in gnames if g.endswith("attn_v_b.weight")][0]
            entries[v_b] = (np.tile(vec * n, heads)[None], np.array([n]))
        else:
            entries[gnames[0]] = ((vec * n)[None], np.array([n]))
    for g, per in stacked.items():
        n_e = max(per) + 1
        cols = len(next(iter(per.values()))[0])
        sums, cnt = np.zeros((n_e, cols)), np.zeros(n_e)
        for e, (vec, n) in per.items():
            sums[e], cnt[e] = vec * n, n
        entries[g] = (sums, cnt)
    return entries


def write_profile_imatrix(path: str | os.PathLike, importance: Mapping[str, np.ndarray], counts: Mapping[str, float],
                          inventory, tokens: int, chunk_size: int, dataset: str = "calibration text") -> None:
    """A llama.cpp imatrix GGUF (llama-quantize --imatrix) of a profile's importance vectors."""
    entries = profile_imatrix_entries(importance, counts, inventory.tensors, inventory.config)
    if not entries:
        raise ValueError("no importance vector maps to a GGUF tensor: nothing to write as an imatrix")
    with output_file(path, "--imatrix") as tmp:
        write_imatrix_gguf(tmp, entries, chunk_count=max(1, int(tokens) // int(chunk_size)),
                           chunk_size=int(chunk_size), datasets=[dataset])
