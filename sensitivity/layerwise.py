"""The layer-streaming profiler: a model's profile from one pass over its weights, one decoder layer at a time.

    prof, importance = LayerwiseProfiler("path/to/checkpoint", token_ids).run(fingerprint)

The checkpoint stays on disk (streaming.StreamingModel): decoder layer l is read, measured and
dropped before layer l+1 is read, so the process holds one layer in the compute dtype, the
calibration activations and the streams below, whatever the model's size.

Method
------
Every decision (a tensor's format, an expert's removal, a layer's top-k) changes one decoder layer
(or the embedding, or the head). Its cost is the product of two measured factors:

1. Locally, on the layer's cached inputs: the energy of the change of the layer's output, summed
   over the calibration tokens, computed exactly: the layer (for tensors of the MLP block, the
   block; for routed experts, the experts module with the recorded routing) is run with the change.
   Tensor x format: the importance-weighted error of the error kernel (every format; importance =
   per-column mean of x^2 over the tensor's inputs, over the tokens routed to the expert for expert
   tensors, scaled by the expert's share of the tokens), mapped to output energy by a local gain
   measured by really quantizing each tensor group (each non-expert tensor; each of gate / up / down
   of the layer's routed experts) to the calibration formats, interpolated log-log in the group's
   error energy. Top-k: the router re-run with k.
2. End to end: the KL divergence of the model's output per unit of output energy of layer l, for
   each kind of change, measured by hidden-state streams. At layer l, the layer's output with the
   change in place becomes a stream that advances through layers l+1.. together with the reference
   (each layer's weights are read once for all streams); at the head, KL / energy is the gain. One
   stream per layer and kind: its routed experts quantized to STREAM_FORMAT; its other tensors
   quantized to STREAM_FORMAT; top-k lowered by one. (The KL per unit of energy differs between
   rounding noise, which is spread over all directions, and routing changes, which move a token's
   output along an expert's output.)

The joint correction of the in-memory profiler (profiler.py) is kept: per format f and class
(routed experts; every other tensor), one stream with every tensor of the class quantized to f, and
rho_f = its KL / the sum of the class's predicted damages.

Expert removal. The KL per unit of energy of removing an expert varies several-fold between the
experts of one layer (on tiny-qwen3-moe, 0.2x to 5x of the layer's median), more than between kinds
of change, so no per-layer gain predicts it well. removal="streams" (the default while the model has
at most REMOVAL_STREAMS_MAX routed experts) gives every expert's removal its own stream, measured end
to end as the in-memory profiler does, but with each layer read once. removal="fisher" (larger
models) measures each removal in the Fisher metric of its layer's output: the gradients of sampled
next tokens' log-likelihoods are carried back through the layers in one backward sweep, and
E[(g . delta)^2] / 2 over the samples is the second-order KL of the change delta; each layer's values
are scaled so that the expert of median token count, removed for real in a stream, comes out at its
measured KL. (On tiny-qwen3-moe the Fisher values rank a layer's experts with Spearman 0.85-0.98
against the measured removal KLs; see results/profile.md for the plan-level fidelity of both.)

Forward work, in full-pass equivalents (decoder-layer runs over the calibration set / layers; runs of
the MLP block or the routed experts count for their share of the layer's multiply-adds): 1
(reference) + 2 F (joint correction) + about 3 x L / 2 (the gain streams) + the local runs + either
the expert streams (removal="streams", about experts x L / 2) or the backward sweep (removal=
"fisher", 1 + 2 x FISHER_SAMPLES). The profile's meta records the count and the wall time of each part.

Experts that calibration never routes to get the layer's mean importance vector, the mean share of
a routed expert and the layer's mean removal cost (meta["unrouted_experts"] lists them): never a
zero cost that would make them free to prune or to quantize to 1 bit.

Every statistic is a sum over calibration tokens (energies, KL sums, sums of squares, routing
counts), so a share of the windows can be measured apart and the sums added (_Share). A profiler
measures the windows of its share (all of them by default); the statistics every share needs before
it can go on (a layer's importance vectors, token shares and routing counts, before the error kernel,
the quantized copies and the local runs; the head's importance) pass through `_allreduce`, which adds
the shares' sums (one share: they are the totals already), and every other sum is added at the end
(ADDITIVE). sensitivity/distributed.py runs one share per Ray worker; this one process is the case of
one share, the same code.

Resumption: after each layer the state (reference and stream hidden states, the measurements so
far) is written atomically to STATE; a run started with the same STATE, model and settings resumes
after the last finished layer and gives the same profile.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from moeplan import kernels
from moeplan.kernels import formats as fmts
from moeplan.kernels.checkpoint import read_safetensors_header, write_safetensors
from moeplan.kernels.outputs import json_text, output_file

from .activations import SpillBudget, SpillDict
from .adapters import ExpertKind, MoEAdapter, TensorRole, record_routing
from .evaluate import chunk_tokens
from .profile import ExpertStats, Profile
from .costs import CALIBRATION_FORMATS, CORRECTION_CLASSES, QUANTIZABLE, interpolate_gain, menu
from .streaming import StreamingModel, release_memory

STREAM_FORMAT = "Q3_K"
FISHER_SAMPLES = 4  # sampled next tokens per position for the Fisher metric of expert removal
REMOVAL_METHODS = ("auto", "streams", "fisher")
# removal "auto": one stream per expert (exact) while the model has at most this many routed experts and
# two layers' expert streams fit in this much memory; else the Fisher metric (one backward sweep)
REMOVAL_STREAMS_MAX = 2048
REMOVAL_STREAMS_BYTES = 4 << 30
STATE_VERSION = 2
# the error kernel starts from this many rows of a matrix (seeded sample, the same rows for every format),
# doubled up to ERROR_TARGET_RSE; a sample of a quarter of the rows or more: every row (kernels.sampled_quant_error)
ERROR_ROWS = 64
ERROR_TARGET_RSE = 0.05  # the sample doubles until every estimate's relative standard error is at most this
# the gain and joint-correction streams (a KL per unit of energy; a KL over a sum of predictions: ratios)
# carry this share of the calibration windows; the reference, the local runs, the importance and the
# per-expert removal streams use every window
STREAM_SHARE = 0.25
# the measurements that are sums over the calibration tokens of a share (added over the shares at the
# end); every other entry of the measurements is the same in every share
ADDITIVE = ("local", "stream_energy", "removal_energy", "topk_energy", "head_kl", "stream_kl", "removal_fisher",
            "passes")
_CHUNK = 4096  # tokens per experts-module call in the local runs
EXPERTS, OTHER = CORRECTION_CLASSES
REMOVAL, TOPK = "removal", "topk"  # the gain streams of expert removal and of top-k
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _energy(delta: torch.Tensor) -> float:
    d = delta.double()
    return float((d * d).sum())


def _kl_sum(ref_lp: torch.Tensor, lp: torch.Tensor) -> float:
    """Sum over positions of KL(P_ref || P) (each clamped at 0, as evaluate() does)."""
    return float((ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0.0).double().sum())


_ROW_CHUNK_BYTES = 64 << 20  # float32 bytes of a matrix quantized or dequantized at once


def _row_steps(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    """[r0, r1) row ranges of about _ROW_CHUNK_BYTES of float32 each."""
    step = max(1, _ROW_CHUNK_BYTES // (4 * max(1, cols)))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


@dataclass
class _Quantized:
    """A tensor (2-D, or a 3-D stack of experts) held as a format's bytes, not as a dequantized copy:
    the layer's tensors in one format take that format's size, not the compute dtype's. A matrix is
    quantized and dequantized a chunk of rows at a time (the same bytes as all at once: every block
    lies inside one row), so no float copy of a large matrix (an embedding, a head) is made."""

    data: np.ndarray  # (rows, row_bytes) or (experts, rows, row_bytes)
    stored: str  # the format after llama.cpp's fallback for the row length
    shape: tuple[int, ...]

    @classmethod
    def of(cls, w: torch.Tensor, fmt: str, importance: np.ndarray | None, name: str) -> "_Quantized":
        """`w` quantized to `fmt`; a stack one matrix at a time, a matrix a chunk of rows at a time."""
        stored = fmts.resolve(fmt, w.shape[-1]).name
        row_bytes = fmts.get(stored).row_bytes(w.shape[-1])

        def matrix(m: torch.Tensor, imp: np.ndarray | None, out: np.ndarray) -> np.ndarray:
            for r0, r1 in _row_steps(m.shape[0], m.shape[1]):
                out[r0:r1] = kernels.quantize(m[r0:r1].detach().float().cpu().contiguous(), stored, imp)
            return out

        try:
            if w.dim() == 2:
                data = matrix(w, importance, np.empty((w.shape[0], row_bytes), np.uint8))
            else:
                imp = None if importance is None else np.asarray(importance).reshape(-1, w.shape[-1])
                data = np.empty((w.shape[0], w.shape[1], row_bytes), np.uint8)
                for e in range(w.shape[0]):
                    matrix(w[e], None if imp is None else imp[e if imp.shape[0] > 1 else 0], data[e])
        except ValueError as exc:
            raise ValueError(f"tensor {name} ({stored}): {exc}; profile with a menu of formats that can hold it "
                             "(--formats)") from None
        return cls(data, stored, tuple(w.shape))

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Rows `index` of a matrix, dequantized (float32)."""
        return torch.from_numpy(kernels.dequantize(np.ascontiguousarray(self.data[index]), self.stored,
                                                   (len(index), self.shape[-1])))

    def write_into(self, live: torch.Tensor) -> None:
        """Dequantize into `live` (one matrix of a stack, a chunk of rows, at a time)."""
        with torch.no_grad():
            for e in range(self.shape[0]) if len(self.shape) == 3 else [None]:
                data, out = (self.data, live) if e is None else (self.data[e], live[e])
                for r0, r1 in _row_steps(out.shape[0], out.shape[1]):
                    out[r0:r1].copy_(torch.from_numpy(kernels.dequantize(np.ascontiguousarray(data[r0:r1]),
                                                                         self.stored, (r1 - r0, out.shape[1]))))


@dataclass
class _Group:
    """Tensors measured together: one non-expert tensor, or one kind of a layer's routed experts."""

    key: str  # "name" for a tensor, "L/experts/gate" for an expert kind
    cls: str  # EXPERTS or OTHER
    names: list[str]  # the member tensors' checkpoint names
    where: str  # "experts" (the experts module), "mlp" (the MLP block), "layer", "embedding", "head"


@dataclass
class _Share:
    """A share of the calibration windows with its hidden states: the reference and every stream,
    one tensor per batch. Every measurement of a share is a sum over its tokens."""

    windows: torch.Tensor  # (n, T) token ids
    batch_size: int
    offset: int = 0  # the index of its first window among all the calibration windows
    ref: list[torch.Tensor] = field(default_factory=list)
    kw: list[dict] = field(default_factory=list)
    streams: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        for b, i in enumerate(range(0, self.windows.shape[0], self.batch_size)):
            yield b, self.windows[i: i + self.batch_size]


class LayerwiseProfiler:
    def __init__(self, model_dir: str | Path, calib_ids: Sequence[int] | torch.Tensor, *, seq_len: int = 128,
                 max_tokens: int = 4096, batch_size: int = 8, formats: Sequence[str] | None = None,
                 calibration_formats: Sequence[str] = CALIBRATION_FORMATS, stream_format: str = STREAM_FORMAT,
                 device: str = "cpu", dtype: torch.dtype | None = None, threads: int | None = None,
                 progress: bool = True, state_path: str | Path | None = None, joint_correction: bool = True,
                 fisher_samples: int = FISHER_SAMPLES, removal: str = "auto",
                 activations_ram: int | None = None, activations_dir: str | Path | None = None,
                 error_rows: int = ERROR_ROWS, stream_share: float = STREAM_SHARE,
                 share: tuple[int, int] | None = None):
        if not 0 < stream_share <= 1:
            raise ValueError(f"stream_share {stream_share}: give a share of the calibration windows in (0, 1]")
        if error_rows < 0:
            raise ValueError(f"error_rows {error_rows}: use 0 (every row) or a positive number of rows")
        self.error_rows = int(error_rows)
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = threads
        self.sm = StreamingModel(model_dir, dtype=dtype, device=self.device)
        self.ad: MoEAdapter = self.sm.ad
        if getattr(self.sm.model.config, "tie_word_embeddings", False):
            raise ValueError(f"{model_dir}: the head is tied to the embedding; the layer-streaming profiler "
                             "measures them apart: profile with --method passes")
        self.windows = chunk_tokens(calib_ids, seq_len, max_tokens)
        n_win = self.windows.shape[0]
        # the gain and joint-correction streams carry the first `stream_windows` windows (whole batches)
        self.stream_share = float(stream_share)
        stream_windows = max(1, math.ceil(stream_share * n_win - 1e-9))
        batch_size = max(1, min(batch_size, stream_windows))
        self.stream_windows = min(n_win, math.ceil(stream_windows / batch_size) * batch_size)
        # the windows this profiler measures, [start, stop) (whole batches; default all of them)
        start, stop = share if share is not None else (0, n_win)
        if not (0 <= start < stop <= n_win) or (start % batch_size and start):
            raise ValueError(f"share {share}: give windows [start, stop) inside 0..{n_win}, starting "
                             f"at a multiple of the batch size {batch_size}")
        self.share = _Share(self.windows[start:stop], batch_size, start)
        self.share_range = (start, stop)
        self._fraction = (stop - start) / n_win
        # this share's batches that the streams carry: its batches among the first `stream_windows` windows
        self.stream_batches = max(0, math.ceil((min(stop, self.stream_windows) - start) / batch_size))
        # hidden states beyond the RAM budget go to files (sensitivity/activations.py): the streams and
        # the backward sweep's layer inputs; the reference (one copy) stays in RAM
        self.activations = SpillBudget(activations_ram, activations_dir if activations_dir is not None else
                                       (Path(state_path).parent if state_path is not None else None))
        self.share.streams = SpillDict(self.activations)
        self.formats = menu(formats)
        self.calibration_formats = menu(list(calibration_formats))
        self.stream_format = menu([stream_format])[0]
        self.all_formats = list(dict.fromkeys([*self.formats, *self.calibration_formats, self.stream_format]))
        self.joint_correction = joint_correction
        self.progress = progress
        self.state_path = Path(state_path) if state_path is not None else None
        # measurements, all JSON-able (they are the resumable state with the hidden states)
        self.m: dict = {"err": {}, "local": {}, "groups": {}, "stream_energy": {}, "stream_kl": {},
                        "removal_energy": {}, "topk_energy": {}, "experts": {}, "unrouted": {},
                        "head_kl": {}, "counts": {}, "removal_fisher": {}, "removal_stream_expert": {},
                        "passes": 0.0, "seconds": {}, "done": -1,
                        "error_sampling": {"matrices": 0, "sampled_matrices": 0, "max_relative_se": 0.0,
                                           "rows": 0, "rows_measured": 0,
                                           "sum_relative_se": 0.0, "values": 0}}
        self.importance: dict[str, np.ndarray] = {}
        self.n_positions = 0
        self.fisher_samples = fisher_samples
        self.boundary = SpillDict(self.activations)  # MoE layers' reference inputs, for the backward sweep
        self.grads: list[list[torch.Tensor]] = []
        self.first_moe = min(self.ad.moe_layers())
        if removal not in REMOVAL_METHODS:
            raise ValueError(f"removal {removal!r}: use one of {', '.join(REMOVAL_METHODS)}")
        if removal == "auto":
            n_exp = sum(self.ad.n_experts(l) for l in self.ad.moe_layers())
            h = int(self.sm.model.config.hidden_size)
            per_layer = max(self.ad.n_experts(l) for l in self.ad.moe_layers())
            fits = per_layer * self.windows.numel() * h * 4 * 2 <= REMOVAL_STREAMS_BYTES
            removal = "streams" if n_exp <= REMOVAL_STREAMS_MAX and fits else "fisher"
        self.removal = removal

    @property
    def token_counts(self) -> dict[str, float]:
        """Tokens each importance vector was measured on (routed tokens for an expert's tensors)."""
        return self.m["counts"]

    # ---- bookkeeping ---------------------------------------------------------------------------

    def _tick(self, part: str, t0: float) -> None:
        self.m["seconds"][part] = self.m["seconds"].get(part, 0.0) + time.perf_counter() - t0

    def _count_passes(self, layer_runs: float) -> None:
        """Forward work in full-pass equivalents: `layer_runs` decoder-layer runs over all windows."""
        self.m["passes"] += layer_runs / self.sm.n_layers * self._fraction

    def _settings(self, fingerprint: str) -> dict:
        return {"version": STATE_VERSION, "fingerprint": fingerprint, "formats": self.formats,
                "fisher_samples": self.fisher_samples, "removal": self.removal,
                "calibration_formats": self.calibration_formats, "stream_format": self.stream_format,
                "windows": list(self.windows.shape), "windows_sha": _sha(self.windows),
                "batch_size": self.share.batch_size, "dtype": str(self.dtype), "joint": self.joint_correction,
                "error_rows": self.error_rows, "stream_windows": self.stream_windows, "share": list(self.share_range)}

    # ---- the shares' sums ----------------------------------------------------------------------

    def _allreduce(self, tag: str, sums: dict) -> dict:
        """The sums of every share for the statistics `sums` of this share (nested dicts of numbers and
        arrays). One share: they are the totals."""
        return sums

    def _owned(self, sizes: dict[str, float]) -> set[str]:
        """Which of the tensor groups `sizes` (key -> elements) this profiler runs the error kernel on;
        the others' errors come from the other shares at the end. One share: all."""
        return set(sizes)

    # ---- layer-local runs ----------------------------------------------------------------------

    def _costs(self, l: int, refs) -> dict[str, float]:
        """Multiply-adds per token of layer l's parts, as fractions of the whole layer's: what one run
        of the MLP block or of the routed experts counts for in full-pass equivalents."""
        k = self.ad.top_k(l) if l in self.ad.moe_layers() else 0
        n_e = self.ad.n_experts(l) if k else 1
        macs = {"experts": 0.0, "mlp": 0.0, "layer": 0.0}
        for r in refs:
            n = float(np.prod(r.shape))
            if r.role is TensorRole.ROUTED_EXPERT:
                n *= k / n_e
                macs["experts"] += n
            if r.role in (TensorRole.ROUTED_EXPERT, TensorRole.SHARED_EXPERT, TensorRole.DENSE_MLP):
                macs["mlp"] += n
            macs["layer"] += n
        return {p: v / macs["layer"] for p, v in macs.items()}

    def _run_layer(self, layer, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.sm.run_layer(layer, h, self.share.kw[b]) for b, h in enumerate(hidden)]

    @torch.inference_mode()
    def _experts_out(self, experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([experts(x[i: i + _CHUNK], idx[i: i + _CHUNK], w[i: i + _CHUNK])
                          for i in range(0, x.shape[0], _CHUNK)]) if x.shape[0] else x.clone()

    @torch.inference_mode()
    def _reference_pass(self, l: int, layer) -> dict:
        """Layer l over the reference hidden states with everything the local runs need recorded;
        the reference advances to layer l's output."""
        ad, sm = self.ad, self.sm
        moe = l in ad.moe_layers()
        rec: dict = {"mlp_in": [], "mlp_out": [], "ex_out": [], "sq": {}, "n": {}}
        handles = []
        mlp = layer.mlp
        handles.append(mlp.register_forward_pre_hook(lambda m, a: rec["mlp_in"].append(a[0])))
        handles.append(mlp.register_forward_hook(lambda m, a, o: rec["mlp_out"].append(o)))
        # the routing and the experts' inputs, kept as the experts got them (they are re-run on them)
        routing = record_routing(ad, layers=[l], inputs=True, device=self.device) if moe else None
        if moe:
            handles.append(ad.experts_module(l).register_forward_hook(lambda m, a, k, o: rec["ex_out"].append(o),
                                                                      with_kwargs=True))
        prefix = f"{ad.layers_prefix}.{l}"
        experts = ad.experts_module(l) if moe else None
        for name, mod in layer.named_modules(prefix=prefix):
            if isinstance(mod, torch.nn.Linear) and not (experts is not None and name.startswith(
                    sm._prefix[id(experts)])):
                key = ad.checkpoint_name(f"{name}.weight", l)

                def lin(m, a, key=key):
                    x = a[0].detach().reshape(-1, a[0].shape[-1]).double()
                    rec["sq"][key] = rec["sq"].get(key, 0) + (x * x).sum(0)
                    rec["n"][key] = rec["n"].get(key, 0) + x.shape[0]

                handles.append(mod.register_forward_pre_hook(lin))
        try:
            rec["h_in"] = self.share.ref
            rec["h_out"] = self._run_layer(layer, self.share.ref)
        finally:
            for h in handles:
                h.remove()
            if routing is not None:
                routing.close()
        self._count_passes(1)
        for k in ("mlp_in", "mlp_out", "ex_out"):
            rec[k] = torch.cat([t.reshape(-1, t.shape[-1]) for t in rec[k]]) if rec[k] else None
        rec["ex_in"], rec["idx"], rec["w"] = routing.expert_inputs(l) if moe else (None, None, None)
        rec["logits"] = routing.routing(l).logits if moe else None
        return rec

    def _expert_sums(self, l: int, rec: dict) -> dict:
        """The share's routing sums at layer l: its tokens; per expert the tokens routed to it, their
        routing weights, weight x output norm (REAP), the squares of its inputs and of its down_proj's."""
        ad = self.ad
        experts = ad.experts_module(l)
        n = ad.n_experts(l)
        x, idx, w = rec["ex_in"], rec["idx"], rec["w"].float()
        tokens = x.shape[0]
        count, wsum, reap = np.zeros(n), np.zeros(n), np.zeros(n)
        h, inter = x.shape[1], experts.down_proj.shape[-1]
        sq_in, sq_mid = np.zeros((n, h)), np.zeros((n, inter))
        self._count_passes(self.cost["experts"])  # every routed expert's output, once
        with torch.inference_mode():
            for e in torch.unique(idx).tolist():
                tok, slot = torch.nonzero(idx == e, as_tuple=True)
                xe = x[tok]
                g, u = torch.nn.functional.linear(xe, experts.gate_up_proj[e]).chunk(2, dim=-1)
                mid = experts.act_fn(g) * u
                out = torch.nn.functional.linear(mid, experts.down_proj[e]).float()
                we = w[tok, slot]
                count[e] = tok.numel()
                wsum[e] = float(we.double().sum())
                reap[e] = float((we * out.norm(dim=-1)).double().sum())
                xd, md = xe.double(), mid.double()
                sq_in[e] = (xd * xd).sum(0).cpu().numpy()
                sq_mid[e] = (md * md).sum(0).cpu().numpy()
        return {"tokens": tokens, "count": count, "wsum": wsum, "reap": reap, "sq_in": sq_in, "sq_mid": sq_mid}

    def _expert_statistics(self, l: int, sums: dict) -> tuple[dict, dict[str, np.ndarray], dict[str, float]]:
        """Routing statistics and the importance vector and token share of every expert tensor of layer l,
        from the routing sums of every share."""
        ad = self.ad
        n, k = ad.n_experts(l), ad.top_k(l)
        tokens, count, wsum, reap, sq_in, sq_mid = (sums[s] for s in ("tokens", "count", "wsum", "reap", "sq_in",
                                                                     "sq_mid"))
        routed = count > 0
        unrouted = [int(e) for e in np.nonzero(~routed)[0]]
        total = max(count.sum(), 1.0)
        mean_in, mean_mid = sq_in.sum(0) / total, sq_mid.sum(0) / total
        imp, share = {}, {}
        for e in range(n):
            c = count[e]
            for kind in ExpertKind:
                name = ad.expert_tensor_name(l, e, kind)
                self.m["counts"][name] = float(c)
                if c > 0:
                    v = (sq_mid[e] if kind is ExpertKind.DOWN else sq_in[e]) / c
                    share[name] = c / max(tokens, 1)
                else:  # never routed on the calibration text: the layer's mean expert (stated in meta)
                    v = mean_mid if kind is ExpertKind.DOWN else mean_in
                    share[name] = k / n
                imp[name] = v.astype(np.float32)
        slots = max(count.sum(), 1.0)
        freq = count / slots * k
        mean_score = np.where(routed, wsum / np.maximum(count, 1), 0.0)
        stats = {"freq": freq.tolist(), "mean_score": mean_score.tolist(),
                 "paper_importance": (0.5 * freq + 0.5 * mean_score).tolist(),
                 "reap": np.where(routed, reap / np.maximum(count, 1), 0.0).tolist()}
        return stats | {"unrouted": unrouted}, imp, share

    # ---- one decoder layer -----------------------------------------------------------------------

    def _layer(self, l: int) -> None:
        ad, sm, m = self.ad, self.sm, self.m
        layer = sm.layers[l]
        moe = l in ad.moe_layers()
        t0 = time.perf_counter()
        with sm.loaded(layer):
            rec = self._reference_pass(l, layer)
            if l >= self.first_moe and self.removal == "fisher":
                self.boundary[l] = rec["h_in"]
            self._tick("reference", t0)
            refs = [r for r in ad.linear_tensors(l) if r.role in QUANTIZABLE]
            self.cost = self._costs(l, refs)
            others = [r for r in refs if r.role is not TensorRole.ROUTED_EXPERT]
            experts = ad.experts_module(l) if moe else None
            sums = self._allreduce(f"layer/{l}", {"sq": {k: v.cpu().numpy() for k, v in rec["sq"].items()},
                                                  "n": rec["n"], "experts": self._expert_sums(l, rec) if moe else {}})
            imp, share = {}, {}
            for r in others:
                n = sums["n"].get(r.name, 0)
                v = sums["sq"][r.name] / n if n else np.ones(r.shape[-1], dtype=np.float64)
                imp[r.name] = v.astype(np.float32)
                share[r.name] = 1.0
                m["counts"][r.name] = float(n)
            if moe:
                stats, eimp, eshare = self._expert_statistics(l, sums["experts"])
                imp |= eimp
                share |= eshare
                m["experts"][str(l)] = stats
                if stats["unrouted"]:
                    m["unrouted"][str(l)] = stats["unrouted"]
            self.importance |= imp

            # the error kernel: every tensor x every format, one pass per tensor (experts per kind, stacked)
            t1 = time.perf_counter()
            groups: list[_Group] = []
            owned = self._owned({r.name: float(np.prod(r.shape)) for r in others} | (
                {f"{l}/experts/{k.value}": float(_kind_view(experts, k).numel()) for k in ExpertKind} if moe else {}))
            for r in others:
                where = "mlp" if r.role in (TensorRole.SHARED_EXPERT, TensorRole.DENSE_MLP) else "layer"
                groups.append(_Group(r.name, OTHER, [r.name], where))
                if r.name in owned:
                    self._errors(r.name, [r.name], r.get(), imp[r.name][None], np.array([1.0]))
            if moe:
                n_e = ad.n_experts(l)
                for kind in ExpertKind:
                    names = [ad.expert_tensor_name(l, e, kind) for e in range(n_e)]
                    groups.append(_Group(f"{l}/experts/{kind.value}", EXPERTS, names, "experts"))
                    if groups[-1].key in owned:
                        self._errors(groups[-1].key, names, _kind_view(experts, kind),
                                     np.stack([imp[n] for n in names]), np.array([share[n] for n in names]))
            self._tick("error_kernel", t1)

            # local runs and the streams, one format at a time (the layer in that format's bytes in memory;
            # a tensor swapped back is read again from the checkpoint, no float copy of it is kept)
            t2 = time.perf_counter()
            live = {g.key: (_kind_view(experts, ExpertKind(g.key.rsplit("/", 1)[1])) if g.cls == EXPERTS
                            else next(r for r in others if r.name == g.key).get()) for g in groups}
            g_imp = {g.key: (np.stack([imp[n] for n in g.names]) if g.cls == EXPERTS else imp[g.key]) for g in groups}
            in_flight = [s for s in self.share.streams if s.startswith("gain/")]
            for f in self.all_formats:
                q = {g.key: _Quantized.of(live[g.key], f, g_imp[g.key], g.key) for g in groups}
                if f in self.calibration_formats:
                    for g in groups:
                        with self._swapped(l, [(g, live[g.key], q[g.key])]):
                            e = self._local_energy(l, layer, g.where, rec)
                        m["local"].setdefault(g.key, {})[f] = e
                if f == self.stream_format:
                    for cls in (EXPERTS, OTHER):
                        members = [g for g in groups if g.cls == cls]
                        if not members:
                            continue
                        with self._swapped(l, [(g, live[g.key], q[g.key]) for g in members]):
                            out = self._changed_output(l, layer, "experts" if cls == EXPERTS else "layer", rec,
                                                       streamed=True)
                        name = f"gain/{l}/{cls}"
                        m["stream_energy"][name] = self._stream_energy(out, rec["h_out"])
                        self.share.streams[name] = self._streamed(out)
                if f in self.formats and self.joint_correction:
                    for cls in (EXPERTS, OTHER):
                        members = [g for g in groups if g.cls == cls]
                        name = f"joint/{cls}/{f}"
                        if name not in self.share.streams and not members:
                            continue  # still identical to the reference
                        src = self.share.streams[name] if name in self.share.streams else self._streamed(rec["h_in"])
                        with self._swapped(l, [(g, live[g.key], q[g.key]) for g in members]):
                            self.share.streams[name] = self._run_layer(layer, src)
                        self._count_passes(self._windows_of(src) / self.share.windows.shape[0])
                del q
            self._tick("local_and_streams", t2)

            if moe:
                t3 = time.perf_counter()
                self._routing_changes(l, experts, rec)
                self._tick("removal_and_topk", t3)
            t4 = time.perf_counter()
            for name in in_flight:
                self.share.streams[name] = self._run_layer(layer, self.share.streams[name])
            self._count_passes(sum(self._windows_of(self.share.streams[n]) for n in in_flight)
                               / self.share.windows.shape[0])
            self._tick("streams", t4)
            for g in groups:
                m["groups"][g.key] = {"cls": g.cls, "names": g.names, "layer": l}
        self.share.ref = rec["h_out"]

    @contextlib.contextmanager
    def _swapped(self, l: int, swaps: Sequence[tuple["_Group", torch.Tensor, _Quantized]]) -> Iterator[None]:
        """Each live tensor of layer l in `swaps` holds its quantized values inside the block; after it,
        the checkpoint's values again (read from the checkpoint: bit for bit what loading wrote)."""
        try:
            for _, live, q in swaps:
                q.write_into(live)
            yield
        finally:
            for g, live, _ in swaps:
                if g.cls == EXPERTS:
                    self.sm.reread(live, l, kind=ExpertKind(g.key.rsplit("/", 1)[1]))
                else:
                    self.sm.reread(live, l, name=g.key)

    @contextlib.contextmanager
    def _restored(self, live: torch.Tensor, source: str) -> Iterator[None]:
        """After the block, `live` holds checkpoint tensor `source`'s values again (read back from the
        checkpoint a chunk of rows at a time: bit for bit what loading wrote)."""
        try:
            yield
        finally:
            self.sm.reread(live, -1, name=source)

    def _windows_of(self, hidden: list[torch.Tensor]) -> int:
        return sum(h.shape[0] for h in hidden)

    def _streamed(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """The batches of `hidden` that the gain and joint-correction streams carry."""
        return list(hidden[: self.stream_batches])

    def _stream_energy(self, out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
        """Energy of out - ref over this share's streamed windows, scaled by all windows / all streamed
        windows: summed over the shares, an estimate of the whole calibration set's, as the local
        energies are (the stream's KL is a mean over the streamed positions)."""
        out = self._streamed(out)
        return sum(_energy(o - r) for o, r in zip(out, ref)) * self.windows.shape[0] / self.stream_windows

    def _errors(self, key: str, names: list[str], w: torch.Tensor, importance: np.ndarray, share: np.ndarray) -> None:
        """Importance-weighted error of the tensors `names` (rows of the stack `w`) in every format, from a
        seeded sample of rows (kernels.sampled_quant_error: `error_rows` rows, doubled until every relative
        standard error is at most ERROR_TARGET_RSE; every row of a small matrix). The sample goes to meta."""
        x = w.detach()
        if x.dim() == 2:
            x, importance = x[None], importance.reshape(1, -1)
        stored = {f: fmts.resolve(f, x.shape[-1]).name for f in self.all_formats}
        uniq = sorted(set(stored.values()))
        try:
            qe = kernels.sampled_quant_error(x.cpu(), uniq, importance, rows=self.error_rows,
                                             target_rse=ERROR_TARGET_RSE, seed=zlib.crc32(key.encode()))
        except ValueError as exc:
            raise ValueError(f"tensor {key}: {exc}; profile with a menu of formats that can hold it "
                             "(--formats)") from None
        by = dict(zip(uniq, qe.err))
        for i, n in enumerate(names):
            self.m["err"][n] = {f: float(by[s][i]) * float(share[i]) for f, s in stored.items()}
        acc = self.m["error_sampling"]
        rel = qe.relative_se()
        acc["matrices"] += len(names)
        sampled = qe.sampled < qe.rows
        acc["sampled_matrices"] += len(names) if sampled else 0
        acc["rows_measured"] += qe.sampled * len(names)
        acc["rows"] += qe.rows * len(names)
        acc["max_relative_se"] = max(acc["max_relative_se"], float(rel.max(initial=0.0)))
        acc["sum_relative_se"] += float(rel.sum())
        acc["values"] += int(rel.size)

    @torch.inference_mode()
    def _changed_output(self, l: int, layer, where: str, rec: dict, streamed: bool = False) -> list[torch.Tensor]:
        """Layer l's output per batch with the change in place, from its cached inputs. `where`: the
        smallest part that sees the change (the rest of the layer is unchanged, its output reused).
        streamed: only the batches the streams carry."""
        h_in, h_out = (self._streamed(rec["h_in"]), self._streamed(rec["h_out"])) if streamed else \
            (rec["h_in"], rec["h_out"])
        share = self._windows_of(h_out) / self.share.windows.shape[0]
        if where == "layer":
            self._count_passes(share)
            return self._run_layer(layer, h_in)
        if where == "mlp":
            outs, i = [], 0
            for b, h in enumerate(h_out):
                n = h.shape[0] * h.shape[1]
                x = rec["mlp_in"][i: i + n].view_as(h)
                outs.append(h + (layer.mlp(x) - rec["mlp_out"][i: i + n].view_as(h)))
                i += n
            self._count_passes(self.cost["mlp"] * share)
            return outs
        experts = self.ad.experts_module(l)
        n = _tokens(h_out)
        new = self._experts_out(experts, rec["ex_in"][:n], rec["idx"][:n], rec["w"][:n])
        self._count_passes(self.cost["experts"] * share)
        return _add_by_batch(h_out, new - rec["ex_out"][:n])

    def _local_energy(self, l: int, layer, where: str, rec: dict) -> float:
        if where == "experts":  # only the routed experts' output changes: no need to rebuild the layer output
            new = self._experts_out(self.ad.experts_module(l), rec["ex_in"], rec["idx"], rec["w"])
            self._count_passes(self.cost["experts"])
            return _energy(new - rec["ex_out"])
        return sum(_energy(o - r) for o, r in zip(self._changed_output(l, layer, where, rec), rec["h_out"]))

    @torch.inference_mode()
    def _routing_changes(self, l: int, experts, rec: dict) -> None:
        """Output energy of every smaller top-k, and the two gain streams of routing changes (they
        move a token's output along an expert's output, not like rounding noise, and their KL per
        unit of energy differs): the routed expert of median token count removed; top-k lowered by one."""
        ad = self.ad
        x, logits, out = rec["ex_in"], rec["logits"], rec["ex_out"]
        k0 = ad.top_k(l)
        work = 0.0
        topk = {}
        for k in range(1, k0):
            w, i = ad.route(l, logits, top_k=k)
            topk[str(k)] = _energy(self._experts_out(experts, x, i, w.to(rec["w"].dtype)) - out)
            work += x.shape[0] * k / k0
        freq = self.m["experts"][str(l)]["freq"]
        routed = sorted((f, e) for e, f in enumerate(freq) if f > 0)
        median = routed[len(routed) // 2][1]
        variants = {}
        if self.removal == "streams":  # every expert's removal, each its own stream: measured end to end
            idx, energy = rec["idx"], [0.0] * ad.n_experts(l)
            for e in range(ad.n_experts(l)):
                tok, w, i = _rerouted(ad, l, logits, idx, rec["w"], exclude=e)
                if not bool(tok.any()):
                    continue
                delta = torch.zeros_like(out)
                delta[tok] = self._experts_out(experts, x[tok], i, w.to(rec["w"].dtype)) - out[tok]
                energy[e] = _energy(delta)
                work += int(tok.sum())
                self.share.streams[f"gain/{l}/expert/{e}"] = _add_by_batch(rec["h_out"], delta)
            self.m["removal_energy"][str(l)] = energy
        else:
            variants[REMOVAL] = ad.route(l, logits, exclude=median)
        if k0 > 1:
            variants[TOPK] = ad.route(l, logits, top_k=k0 - 1)
        h_out = self._streamed(rec["h_out"])
        n = _tokens(h_out)  # the streamed tokens: the first n rows of the layer's flat inputs
        for kind, (w, i) in variants.items():
            new = self._experts_out(experts, x[:n], i[:n], w[:n].to(rec["w"].dtype))
            work += n
            name = f"gain/{l}/{kind}"
            changed = _add_by_batch(h_out, new - out[:n])
            self.m["stream_energy"][name] = self._stream_energy(changed, rec["h_out"])
            self.share.streams[name] = self._streamed(changed)
        self.m["removal_stream_expert"][str(l)] = median
        self._count_passes(self.cost["experts"] * work / max(x.shape[0], 1))
        self.m["topk_energy"][str(l)] = topk

    # ---- the backward sweep: expert removal in the Fisher metric ---------------------------------

    def _fisher_grads(self, head, norm, ref_lp: list[torch.Tensor]) -> None:
        """FISHER_SAMPLES next-token samples per position from the model's own distribution, and the
        gradient of each sample's log-likelihood with respect to the last layer's output: E over the
        samples of (g . delta)^2 / 2 is the second-order KL of a change delta there (Fisher information)."""
        for p in (*head.parameters(), *norm.parameters()):
            p.requires_grad_(False)
        grads: list[list[torch.Tensor]] = [[] for _ in range(self.fisher_samples)]
        for b, h_ref in enumerate(self.share.ref):
            # seeded by the batch's first window: the same samples whichever share measures the batch
            gen = torch.Generator().manual_seed(self.share.offset + b * self.share.batch_size)
            probs = ref_lp[b].exp().reshape(-1, ref_lp[b].shape[-1]).float().cpu()
            with torch.enable_grad():
                h = h_ref.clone().requires_grad_(True)
                lp = _next_lp(head(norm(h)))
                for s in range(self.fisher_samples):
                    y = torch.multinomial(probs, 1, generator=gen).to(self.device).view(*lp.shape[:2], 1)
                    (g,) = torch.autograd.grad(lp.gather(-1, y).sum(), h, retain_graph=s + 1 < self.fisher_samples)
                    grads[s].append(g.detach())
        self.grads = grads

    def _backward_layer(self, l: int) -> None:
        """At MoE layer l: every expert's removal in the Fisher metric of layer l's output; then the
        gradients carried to layer l's input (one backward run per sample)."""
        ad, sm = self.ad, self.sm
        layer = sm.layers[l]
        t0 = time.perf_counter()
        with sm.loaded(layer):
            for p in layer.parameters():
                p.requires_grad_(False)
            if l in ad.moe_layers():
                refs = [r for r in ad.linear_tensors(l) if r.role in QUANTIZABLE]
                self.cost = self._costs(l, refs)
                saved, self.share.ref = self.share.ref, self.boundary[l]
                try:
                    rec = self._reference_pass(l, layer)
                finally:
                    self.share.ref = saved
                self._removals(l, ad.experts_module(l), rec)
            if l > self.first_moe:
                kw = [_plain(k) for k in self.share.kw]
                new: list[list[torch.Tensor]] = [[] for _ in range(self.fisher_samples)]
                for b, h_ref in enumerate(self.boundary[l]):
                    with torch.enable_grad():
                        h = h_ref.clone().requires_grad_(True)
                        out = layer(h, **kw[b])
                        out = out[0] if isinstance(out, tuple) else out
                        for s in range(self.fisher_samples):
                            (g,) = torch.autograd.grad(out, h, self.grads[s][b],
                                                       retain_graph=s + 1 < self.fisher_samples)
                            new[s].append(g.detach())
                self.grads = new
                self._count_passes(1 + 2 * self.fisher_samples)
        self.boundary.pop(l, None)
        self._tick("removal_fisher", t0)

    @torch.inference_mode()
    def _removals(self, l: int, experts, rec: dict) -> None:
        """For each expert: its tokens re-routed without it; the output change's energy and its
        second-order KL in the Fisher metric, 1/2 mean over samples of sum over tokens (g . delta)^2."""
        ad = self.ad
        x, idx, logits, out = rec["ex_in"], rec["idx"], rec["logits"], rec["ex_out"]
        g = [torch.cat([t.reshape(-1, t.shape[-1]) for t in gs]) for gs in self.grads]  # per sample (N, H)
        n = ad.n_experts(l)
        energy, fisher = [0.0] * n, [0.0] * n
        work = 0
        for e in range(n):
            tok, w, i = _rerouted(ad, l, logits, idx, rec["w"], exclude=e)
            if not bool(tok.any()):
                continue
            delta = (self._experts_out(experts, x[tok], i, w.to(rec["w"].dtype)) - out[tok]).float()
            energy[e] = _energy(delta)
            win = torch.nonzero(tok).flatten() // self.windows.shape[1]  # the window of each changed token
            per_window = []
            for gs in g:
                dot = (gs[tok].float() * delta).sum(-1).double()
                per_window.append(float((torch.zeros(self.share.windows.shape[0], dtype=torch.float64,
                                                     device=dot.device).index_add_(0, win, dot) ** 2).sum()))
            fisher[e] = 0.5 * float(np.mean(per_window))  # a sum over windows: / positions in _profile
            work += int(tok.sum())
        self._count_passes(self.cost["experts"] * work / max(x.shape[0], 1))
        self.m["removal_energy"][str(l)] = energy
        self.m["removal_fisher"][str(l)] = fisher

    # ---- embedding and head ----------------------------------------------------------------------

    @torch.inference_mode()
    def _embedding(self) -> None:
        sm, m = self.sm, self.m
        t0 = time.perf_counter()
        emb = sm.model.get_input_embeddings()
        name = sm._prefix[id(emb)] + ".weight"
        self.share.ref, self.share.kw = [], []
        for _, batch in self.share.batches():
            h, kw = sm.embed(batch)
            self.share.ref.append(h)
            self.share.kw.append(kw)
        with sm.loaded(emb):
            w = emb.weight
            for b, batch in self.share.batches():
                if not torch.equal(self.share.ref[b], w[batch.to(self.device)].to(self.share.ref[b].dtype)):
                    raise ValueError("the embedding output is not a plain row lookup; the layer-streaming "
                                     "profiler cannot measure it: profile with --method passes")
            ones = np.ones(w.shape[-1], dtype=np.float32)
            self.importance[name] = ones
            if name in self._owned({name: float(w.numel())}):
                self._errors(name, [name], w, ones[None], np.array([1.0]))
            m["groups"][name] = {"cls": OTHER, "names": [name], "layer": -1}
            for f in self.all_formats:
                q = _Quantized.of(w, f, ones, name)
                outs = [h + _changed_rows(q, w, batch.to(self.device)) for (_, batch), h in
                        zip(self.share.batches(), self.share.ref)]
                if f in self.calibration_formats:
                    m["local"].setdefault(name, {})[f] = sum(_energy(o - h) for o, h in zip(outs, self.share.ref))
                if f == self.stream_format:
                    m["stream_energy"][f"gain/-1/{OTHER}"] = self._stream_energy(outs, self.share.ref)
                    self.share.streams[f"gain/-1/{OTHER}"] = self._streamed(outs)
                if f in self.formats and self.joint_correction:
                    self.share.streams[f"joint/{OTHER}/{f}"] = self._streamed(outs)
        self._tick("reference", t0)

    def _head(self) -> None:
        sm = self.sm
        t0 = time.perf_counter()
        norm, head = sm._base.norm, sm.model.get_output_embeddings()
        name = sm._prefix[id(head)] + ".weight"
        with sm.loaded(norm), sm.loaded(head):
            ref_lp = self._head_measurements(norm, head, name)
            if self.removal == "fisher":
                self._fisher_grads(head, norm, ref_lp)
        self.share.streams.clear()
        self.share.ref = []
        self._tick("head", t0)

    @torch.inference_mode()
    def _head_measurements(self, norm, head, name: str) -> list[torch.Tensor]:
        sm, m = self.sm, self.m
        normed = [norm(h) for h in self.share.ref]
        x = torch.cat([h.reshape(-1, h.shape[-1]) for h in normed]).double()
        ref_lp = [_next_lp(head(h)) for h in normed]
        nll = -sum(float(lp.gather(-1, batch[:, 1:].to(self.device).unsqueeze(-1)).double().sum())
                   for lp, (_, batch) in zip(ref_lp, self.share.batches()))
        sums = self._allreduce("head", {"sq": (x * x).sum(0).cpu().numpy(), "n": x.shape[0], "nll": nll,
                                        "positions": sum(lp.shape[0] * lp.shape[1] for lp in ref_lp)})
        del x
        imp = (sums["sq"] / sums["n"]).astype(np.float32)
        self.importance[name] = imp
        m["counts"][name] = float(sums["n"])
        if name in self._owned({name: float(head.weight.numel())}):
            self._errors(name, [name], head.weight, imp[None], np.array([1.0]))
        m["groups"][name] = {"cls": OTHER, "names": [name], "layer": sm.n_layers}
        n_pos = sums["positions"]
        m["reference_perplexity"] = math.exp(sums["nll"] / n_pos)
        self.n_positions = n_pos
        kl = {}  # KL summed over the share's positions (divided by all positions in _profile), as head_kl
        for s, hidden in self.share.streams.items():
            if not s.startswith(f"joint/{OTHER}/"):
                kl[s] = sum(_kl_sum(r, _next_lp(head(norm(h)))) for r, h in zip(ref_lp, hidden))
        source = sm.checkpoint_source(head)
        for f in self.all_formats:
            q = _Quantized.of(head.weight, f, imp, name)
            with self._restored(head.weight, source):
                q.write_into(head.weight)
                del q
                if f in self.calibration_formats:
                    m["head_kl"][f] = sum(_kl_sum(r, _next_lp(head(h))) for r, h in zip(ref_lp, normed))
                s = f"joint/{OTHER}/{f}"
                if s in self.share.streams:
                    kl[s] = sum(_kl_sum(r, _next_lp(head(norm(h))))
                                for r, h in zip(ref_lp, self.share.streams[s]))
        m["stream_kl"] = kl
        m["calibration_tokens"] = n_pos
        m["n_positions"] = n_pos
        return ref_lp

    # ---- the whole profile -------------------------------------------------------------------------

    def run(self, fingerprint: str) -> tuple[Profile, dict[str, np.ndarray]]:
        self._steps(self._settings(fingerprint))
        self.activations.close()
        prof = self._profile(fingerprint)
        if self.state_path is not None and self.state_path.exists():
            self.state_path.unlink()
        self.sm.close()
        return prof, dict(self.importance)

    def _steps(self, settings: dict) -> None:
        """Every step of the share (embedding, layers, head, backward sweep), resumed after the last one
        the state holds."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        n = self.sm.n_layers
        steps = [("embedding", None), *(("layer", l) for l in range(n)), ("head", None)]
        if self.removal == "fisher":
            steps += [("backward", l) for l in range(n - 1, self.first_moe - 1, -1)]
        done = self._resume(settings)
        with tqdm(total=len(steps), initial=done + 1, desc="profile", unit="step", disable=not self.progress) as bar:
            for i in range(done + 1, len(steps)):
                kind, l = steps[i]
                bar.set_postfix_str(f"{kind} {'' if l is None else l}, {len(self.share.streams)} streams".replace(" ,", ","))
                if kind == "embedding":
                    self._embedding()
                elif kind == "layer":
                    self._layer(l)
                elif kind == "head":
                    self._head()
                else:
                    self._backward_layer(l)
                self._save(settings, i)
                release_memory()
                bar.update()
        self.m["seconds"]["total"] = self.m["seconds"].get("total", 0.0) + time.perf_counter() - t0

    def _profile(self, fingerprint: str) -> Profile:
        m, ad = self.m, self.ad
        n_pos = m["n_positions"]  # the KLs and the Fisher values are sums over the calibration positions
        # the gain and joint-correction streams carry the first stream_windows windows (equal lengths),
        # the per-expert removal streams every window
        n_streamed = n_pos * self.stream_windows / self.windows.shape[0]
        kl = {s: v / (n_pos if _every_window(s) else n_streamed) for s, v in m["stream_kl"].items()}
        head_kl = {f: v / n_pos for f, v in m["head_kl"].items()}

        def gain(l: int, cls: str) -> float:
            s = f"gain/{l}/{cls}"
            e = m["stream_energy"].get(s, 0.0)
            return kl[s] / e if e > 0 else 0.0

        damage: dict[str, dict[str, float]] = {}
        points_out = {}
        for key, g in m["groups"].items():
            names, l = g["names"], g["layer"]
            energy = {f: sum(m["err"][n][f] for n in names) for f in self.all_formats}
            if l == self.sm.n_layers:  # the head: the local change is the output itself
                pts = sorted((energy[c], head_kl[c] / energy[c] if energy[c] > 0 else 0.0)
                             for c in self.calibration_formats)
                scale = 1.0
            else:
                pts = sorted((energy[c], m["local"][key][c] / energy[c] if energy[c] > 0 else 0.0)
                             for c in self.calibration_formats)
                scale = gain(l, g["cls"])
            points_out[key] = pts
            for f in self.formats:
                lam = interpolate_gain(pts, energy[f])
                for n in names:
                    damage.setdefault(n, {})[f] = scale * lam * m["err"][n][f]
        joint: dict[str, dict[str, float]] = {c: {} for c in CORRECTION_CLASSES}
        if self.joint_correction:
            cls_of = {n: g["cls"] for g in m["groups"].values() for n in g["names"]}
            for c in CORRECTION_CLASSES:
                members = [n for n in damage if cls_of[n] == c]
                for f in self.formats:
                    s = f"joint/{c}/{f}"
                    predicted = sum(damage[n][f] for n in members)
                    if s in kl and predicted > 0:
                        joint[c][f] = kl[s] / predicted
            for n in damage:
                for f, rho in joint[cls_of[n]].items():
                    damage[n][f] *= rho
        joint = {c: v for c, v in joint.items() if v}
        experts: dict[int, ExpertStats] = {}
        topk: dict[int, dict[int, float]] = {}
        for l in ad.moe_layers():
            st = m["experts"][str(l)]
            # removal: the Fisher metric's KL of each expert, scaled so that the stream's expert (removed
            # for real and measured end to end) comes out at its measured KL
            fisher, med = m["removal_fisher"].get(str(l)), m["removal_stream_expert"][str(l)]
            fisher = None if fisher is None else [f / n_pos for f in fisher]
            if self.removal == "streams":
                removal = [kl.get(f"gain/{l}/expert/{e}", 0.0) for e in range(ad.n_experts(l))]
            elif fisher[med] > 0:
                c = kl[f"gain/{l}/{REMOVAL}"] / fisher[med]
                removal = [c * f for f in fisher]
            else:
                g = gain(l, REMOVAL)
                removal = [g * e for e in m["removal_energy"][str(l)]]
            routed = [r for e, r in enumerate(removal) if e not in st["unrouted"]]
            mean = float(np.mean(routed)) if routed else 0.0
            removal = [mean if e in st["unrouted"] else r for e, r in enumerate(removal)]
            experts[l] = ExpertStats(freq=st["freq"], mean_score=st["mean_score"],
                                     paper_importance=st["paper_importance"], reap=st["reap"], removal_kl=removal)
            gk = gain(l, TOPK)
            topk[l] = {ad.top_k(l): 0.0} | {int(k): gk * e for k, e in m["topk_energy"][str(l)].items()}
        meta = {
            "method": "layer-streaming: per-layer local output energy of every decision on the layer's cached "
                      "inputs (importance-weighted error kernel x a local gain calibrated per tensor group by "
                      f"quantizing it to {' and '.join(self.calibration_formats)}; expert removal and top-k by "
                      "re-routing), times a per-layer, per-class end-to-end gain measured by a hidden-state stream "
                      f"injected at the layer (its experts / its other tensors quantized to {self.stream_format}); "
                      + ("every format scaled per class by the measured KL of the class quantized to that format "
                         "over the sum of its predictions (joint_correction)" if joint else "no joint correction"),
            "profiler": "layerwise",
            "removal": self.removal,
            "removal_method": ("each expert's removal is its own hidden-state stream, measured end to end"
                               if self.removal == "streams" else
                               f"each expert's removal in the Fisher metric of its layer's output ({self.fisher_samples} "
                               "sampled next tokens per position, one backward sweep), scaled per layer so that the "
                               "expert of median token count, removed for real in a stream, comes out at its measured "
                               "KL"),
            "joint_correction": joint,
            "calibration_tokens": int(m["calibration_tokens"]),
            "seq_len": int(self.windows.shape[1]),
            "reference_perplexity": m["reference_perplexity"],
            "full_pass_equivalents": round(m["passes"], 2),
            "seconds": {k: round(v, 2) for k, v in m["seconds"].items()},
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "stream_format": self.stream_format,
            "error_sampling": self._sampling_meta(),
            "stream_windows": self.stream_windows,
            "streams": f"the gain and joint-correction streams carry {self.stream_windows} of the "
                       f"{self.windows.shape[0]} calibration windows (stream_share {self.stream_share}); their "
                       "energies are scaled to every window, their KL is a mean over their positions",
            "activations": {"ram_budget_bytes": self.activations.ram_bytes,
                            "peak_bytes_on_disk": self.activations.peak_on_disk,
                            "directory": str(self.activations.directory)},
            "layer_gain": {f"{l}/{c}": gain(l, c) for l in range(-1, self.sm.n_layers)
                           for c in (*CORRECTION_CLASSES, REMOVAL, TOPK) if f"gain/{l}/{c}" in m["stream_energy"]},
            "removal_stream_expert": m.get("removal_stream_expert", {}),
            "gain_points": points_out,
            "unrouted_experts": {l: v for l, v in m["unrouted"].items()},
            "unrouted_estimate": "experts never routed on the calibration text get the layer's token-weighted mean "
                                 "importance vector, a routed expert's mean token share (top-k / experts) and the "
                                 "mean removal cost of the layer's routed experts",
        }
        return Profile(fingerprint, list(self.formats), damage, experts, topk, False, meta)

    def _sampling_meta(self) -> dict:
        acc = self.m["error_sampling"]
        return {"rows": self.error_rows, "target_relative_se": ERROR_TARGET_RSE,
                "rule": f"the error of every format estimated from {self.error_rows} rows of a matrix (seeded, the "
                        "same rows for every format and expert), scaled to the matrix, the sample doubled until "
                        f"every estimate's relative standard error is at most {ERROR_TARGET_RSE:.0%}; a matrix "
                        "whose sample would be a quarter of its rows or more: every row, exactly"
                        if self.error_rows else "every row",
                "matrices": acc["matrices"], "sampled_matrices": acc["sampled_matrices"],
                "share_of_rows_measured": round(acc["rows_measured"] / acc["rows"], 6) if acc["rows"] else 1.0,
                "max_relative_se": round(acc["max_relative_se"], 6),
                "mean_relative_se": round(acc["sum_relative_se"] / acc["values"], 6) if acc["values"] else 0.0}

    # ---- resumable state -------------------------------------------------------------------------

    def _save(self, settings: dict, done: int) -> None:
        if self.state_path is None:
            return
        self.m["done"] = done
        tensors = {}
        for b, h in enumerate(self.share.ref):
            tensors[f"ref/{b}"] = h
        for s, hs in self.share.streams.items():
            for b, h in enumerate(hs):
                tensors[f"stream/{s}/{b}"] = h
        for l, hs in self.boundary.items():
            for b, h in enumerate(hs):
                tensors[f"boundary/{l}/{b}"] = h
        for si, gs in enumerate(self.grads):
            for b, g in enumerate(gs):
                tensors[f"grad/{si}/{b}"] = g
        for n, v in self.importance.items():
            tensors[f"importance/{n}"] = torch.from_numpy(np.ascontiguousarray(v))
        meta = {"settings": json_text(settings), "m": json_text(self.m)}
        # one tensor at a time: the state is as large as the activations, never copied whole
        specs = [(k, _ST_DTYPE[v.dtype], tuple(v.shape), lambda v=v: v.detach().cpu()) for k, v in tensors.items()]
        with output_file(self.state_path, "profile state") as tmp:
            write_safetensors(tmp, specs, meta)

    def _resume(self, settings: dict) -> int:
        """The last finished step of a matching saved state (-1: none)."""
        if self.state_path is None or not self.state_path.exists():
            return -1
        from safetensors import safe_open

        read_safetensors_header(self.state_path)
        with safe_open(str(self.state_path), "pt") as f:
            meta = f.metadata() or {}
            saved = json.loads(meta.get("settings", "null"))
            if saved != json.loads(json_text(settings)):
                diff = sorted(k for k in settings if (saved or {}).get(k) != json.loads(json_text(settings))[k])
                raise ValueError(f"profile state {self.state_path} is from another run (it differs in "
                                 f"{', '.join(diff) or 'its format'}): remove it to start again")
            self.m = json.loads(meta["m"])
            ref, streams, boundary, grads = {}, {}, {}, {}
            for key in f.keys():
                kind, rest = key.split("/", 1)
                t = f.get_tensor(key)
                if kind == "ref":
                    ref[int(rest)] = t.to(self.device)
                elif kind == "stream":
                    s, b = rest.rsplit("/", 1)
                    streams.setdefault(s, {})[int(b)] = t.to(self.device)
                elif kind in ("boundary", "grad"):
                    a, b = rest.split("/")
                    (boundary if kind == "boundary" else grads).setdefault(int(a), {})[int(b)] = t.to(self.device)
                else:
                    self.importance[rest] = t.numpy()
        self.share.ref = [ref[b] for b in sorted(ref)]
        self.share.streams.clear()
        self.share.streams.update({s: [v[b] for b in sorted(v)] for s, v in streams.items()})
        self.boundary.clear()
        self.boundary.update({l: [v[b] for b in sorted(v)] for l, v in boundary.items()})
        self.grads = [[grads[si][b] for b in sorted(grads[si])] for si in sorted(grads)]
        self.n_positions = int(self.m.get("n_positions", 0))
        self.share.kw = [self.sm.embed(batch)[1] for _, batch in self.share.batches()]
        return int(self.m["done"])


def _every_window(stream: str) -> bool:
    """Whether a stream carries every calibration window (an expert's removal: gain/L/expert/E), not
    only the first stream_windows."""
    return "/expert/" in stream


def _kind_view(experts, kind: ExpertKind) -> torch.Tensor:
    """The live (E, rows, cols) stack of one kind of a layer's routed experts."""
    inter = experts.down_proj.shape[-1]
    if kind is ExpertKind.DOWN:
        return experts.down_proj.data
    return experts.gate_up_proj.data[:, :inter] if kind is ExpertKind.GATE else experts.gate_up_proj.data[:, inter:]


def _tokens(hidden: list[torch.Tensor]) -> int:
    """Tokens in a list of (batch, positions, hidden) batches: the streamed batches come first, so their
    tokens are the first rows of a layer's flat recorded inputs."""
    return sum(h.shape[0] * h.shape[1] for h in hidden)


def _changed_rows(q: _Quantized, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(quantized - original) rows of the embedding `w` for the token ids `ids`: only the rows a batch
    looks up are dequantized (the same values as indexing the whole matrix's difference)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    delta = q.rows(uniq.cpu().numpy()).to(w.dtype).to(w.device) - w[uniq]
    return delta[inverse]


def _next_lp(logits: torch.Tensor) -> torch.Tensor:
    from .evaluate import _next_token_log_probs

    return _next_token_log_probs(logits)


def _add_by_batch(hidden: list[torch.Tensor], flat_delta: torch.Tensor) -> list[torch.Tensor]:
    outs, i = [], 0
    for h in hidden:
        n = h.shape[0] * h.shape[1]
        outs.append(h + flat_delta[i: i + n].view_as(h).to(h.dtype))
        i += n
    return outs


def _rerouted(ad, l: int, logits: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, **how):
    """(tokens whose routing changes, their new weights, their new indices) when layer l routes with
    `how` (exclude=..., top_k=...): not only the tokens that used an excluded expert -- its removal can
    change a group's score (group-limited routing) or every token's weights (softmax without top-k
    normalization)."""
    w_new, i_new = ad.route(l, logits, **how)
    if idx.shape != i_new.shape:  # another top-k: every token changes
        tok = torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device)
    else:  # the same experts with the same weights, in any column order
        o_old, o_new = idx.argsort(-1), i_new.argsort(-1)
        same_idx = (idx.gather(-1, o_old) == i_new.gather(-1, o_new)).all(-1)
        dw = (w.float().gather(-1, o_old) - w_new.gather(-1, o_new)).abs().amax(-1)
        tok = ~(same_idx & (dw <= 1e-6 * w.float().abs().amax(-1)))
    return tok, w_new[tok].to(w.dtype), i_new[tok]


def _plain(kw: dict) -> dict:
    """The layers' keyword arguments as ordinary tensors (those made under inference_mode cannot be
    saved for a backward pass)."""
    def conv(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, tuple):
            return tuple(conv(x) for x in v)
        return v

    with torch.inference_mode(False):
        return {k: conv(v) for k, v in kw.items()}


def _sha(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
