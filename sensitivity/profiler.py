"""Measure a model's profile on calibration text (see profile.py for what a profile holds).

Method
------
Quantization damage. For a linear weight W (out x in) quantized to Q with error D = W - Q, the
output error on an input x is D x; over calibration tokens, with the diagonal approximation
E[x_i x_j] ~ 0 for i != j, its expected energy is sum_ij D_ij^2 E[x_j^2] -- the importance-weighted
squared error that the kernels' error kernel computes in one pass for every format (importance =
the per-column mean of x^2, over the tokens routed to the expert for expert tensors). An expert's
error is further scaled by its share of the tokens. A second-order expansion of the KL divergence
makes KL proportional to that energy for small errors, with an unknown gain per tensor group (each
non-expert tensor; each (layer, gate/up/down) of the routed experts). The gain is measured by really
quantizing the group to two calibration formats (IQ2_XXS and Q4_K) and measuring the KL; for every
other format it is interpolated log-log in the group's error energy (constant beyond the two).

Joint correction. Group KLs measured one at a time do not add up to the KL of quantizing many
groups together (about half of it at 3-4 bits per weight on the reference models, more than it at
1.5 bits), and the ratio depends on the format and differs between the routed experts and the
rest. So for each format f of the menu the model is also quantized twice more -- every routed
expert to f; every other tensor to f -- one forward pass each, and every tensor's damage in format f
is scaled by its class's rho_f = measured KL / the sum of the class's predictions: a plan that
quantizes one class uniformly is then predicted exactly, and a mixed plan adds the corrected
damages. (results/profile.md gives the fidelity this reaches.)

Expert removal and top-k: measured directly, one forward pass each (remove one expert; set one
layer's top-k to k), as KL against the original model on the calibration windows.

Every measurement changes tensors of one decoder layer (or the head), so the forward pass starts at
that layer from the cached inputs of the reference pass (evaluate.LayerInputs).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from moeplan import kernels
from moeplan.kernels import formats as fmts
from moeplan.kernels.imatrix import write_profile_imatrix
from moeplan.kernels.inventory import build_inventory

from .adapters import ExpertInputStats, MoEAdapter, TensorRole, adapter_for, record_routing
from .costs import CALIBRATION_FORMATS, CORRECTION_CLASSES, QUANTIZABLE, interpolate_gain, menu
from .distributed import profile_on_ray
from .importance import importance_path, save_importance
from .evaluate import LayerInputs, ReferenceLogits, chunk_tokens, evaluate, load_model_and_text, load_text_ids
from .layerwise import ERROR_ROWS, STREAM_SHARE, LayerwiseProfiler
from .profile import ExpertStats, Profile

# Every decoder layer's input on the calibration windows is kept (when it fits under this), so that
# a change in layer l reruns layers l.. only.
CACHE_LIMIT_BYTES = 4 << 30


class Profiler:
    def __init__(self, model: torch.nn.Module, calib_ids: Sequence[int] | torch.Tensor, *, seq_len: int = 128,
                 max_tokens: int = 4096, batch_size: int = 8, formats: Sequence[str] | None = None,
                 calibration_formats: Sequence[str] | str = CALIBRATION_FORMATS, progress: bool = True,
                 cache_layer_inputs: bool = True, joint_correction: bool = True):
        self.model = model.eval()
        self.adapter: MoEAdapter = adapter_for(model)
        self.windows = chunk_tokens(calib_ids, seq_len, max_tokens)
        self.batch_size = batch_size
        self.formats = menu(formats)
        if isinstance(calibration_formats, str):
            calibration_formats = [calibration_formats]
        self.calibration_formats = menu(list(calibration_formats))
        self.progress = progress
        self.cache_layer_inputs = cache_layer_inputs
        self.joint_correction = joint_correction
        self.reference: ReferenceLogits | None = None
        self.timings: dict[str, float] = {}

    # ---- helpers ----
    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    def _kl(self, model: torch.nn.Module | None = None, start: int | None = None) -> float:
        """KL of `model` (default: self.model as currently modified) against the original; `start`: the
        first decoder layer the modification touches (the layers before it are not rerun)."""
        return evaluate(model if model is not None else self.model, self.reference, start_layer=start).kld_mean

    def _joint_correction(self, refs, importance: dict, damage: dict) -> dict[str, dict[str, float]]:
        """rho[class][f] per tensor class (routed experts; every other tensor) and format: the KL of the
        model with every tensor of the class quantized to f, over the sum of their predicted damages."""
        saved = {r.name: r.get().detach().clone() for r in refs}
        classes = {c: [r for r in refs if _class_of(r) == c] for c in CORRECTION_CLASSES}
        rho: dict[str, dict[str, float]] = {c: {} for c in CORRECTION_CLASSES}
        try:
            with self._bar(len(self.formats) * len(classes), "joint correction") as bar:
                for c, members in classes.items():
                    start = self._first_layer(members)
                    for f in self.formats:
                        predicted = sum(damage[r.name][f] for r in members)
                        if predicted > 0:
                            for r in members:
                                _quantize_in_place(r, saved[r.name], f, importance[r.name])
                            rho[c][f] = float(self._kl(start=start) / predicted)
                            for r in members:
                                r.set(saved[r.name])
                        bar.update()
        finally:
            for r in refs:
                r.set(saved[r.name])
        return {c: v for c, v in rho.items() if v}

    def _first_layer(self, refs) -> int | None:
        """The first decoder layer whose output a change of the tensors `refs` alters (None: the
        embedding is among them, the whole model reruns)."""
        starts = []
        for ref in refs:
            if ref.layer is not None:
                starts.append(ref.layer)
            elif ref.role is TensorRole.HEAD:
                starts.append(self.adapter.n_layers())  # only the final norm and the head run
            else:
                return None
        return min(starts) if starts else None

    # ---- 1. statistics of one forward pass over the calibration windows ----
    def _collect(self) -> tuple[dict[int, ExpertInputStats], dict[str, np.ndarray]]:
        """The reference pass over the calibration windows, recording per MoE layer the routing and
        expert-input statistics (adapters.record_routing) and the per-column mean of x^2 of every
        plain Linear (attention, dense MLP, shared experts, head)."""
        linear_sq: dict[str, torch.Tensor] = {}
        linear_n: dict[str, int] = {}
        handles = []
        for mname, mod in self.model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                key = f"{mname}.weight"

                def lin_hook(m, args, key=key):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    linear_sq[key] = linear_sq.get(key, 0) + (x * x).sum(0)
                    linear_n[key] = linear_n.get(key, 0) + x.shape[0]

                handles.append(mod.register_forward_pre_hook(lin_hook))
        n_tokens = self.windows.numel()
        cache = self.cache_layer_inputs and LayerInputs.nbytes_estimate(self.model, n_tokens) <= CACHE_LIMIT_BYTES
        try:
            with record_routing(self.adapter, keep_logits=False, importance="gate_up_down", reap=True) as rec:
                self.reference = ReferenceLogits(self.model, self.windows, self.batch_size, cache_layer_inputs=cache)
        finally:
            for h in handles:
                h.remove()
        importance = {k: (v / linear_n[k]).numpy().astype(np.float32) for k, v in linear_sq.items()}
        return {layer: rec.stats(layer) for layer in self.adapter.moe_layers()}, importance

    # ---- the whole profile ----
    def run(self, fingerprint: str) -> tuple[Profile, dict[str, np.ndarray]]:
        t0 = time.perf_counter()
        ad = self.adapter
        stats, lin_imp = self._collect()
        count = {layer: st.tokens.numpy() for layer, st in stats.items()}  # (E,) tokens routed to each expert
        self.timings["statistics"] = time.perf_counter() - t0

        # importance vector and token share of every quantizable tensor
        refs = [r for r in ad.linear_tensors() if r.role in QUANTIZABLE]
        importance: dict[str, np.ndarray] = {}
        share: dict[str, float] = {}
        for r in refs:
            if r.role is TensorRole.ROUTED_EXPERT:
                st = stats[r.layer]
                cnt = max(count[r.layer][r.expert], 1.0)
                sq = st.sum_sq_mid[r.expert] if r.kind.value == "down" else st.sum_sq_in[r.expert]
                importance[r.name] = (sq.numpy() / cnt).astype(np.float32)
                share[r.name] = count[r.layer][r.expert] / max(st.seen, 1)
            else:
                imp = lin_imp.get(r.name)
                if imp is None or imp.shape[0] != r.shape[-1]:
                    imp = np.ones(r.shape[-1], dtype=np.float32)  # embeddings: a lookup, not a matmul input
                importance[r.name] = imp
                share[r.name] = 1.0

        # importance-weighted error of every tensor x format (the error kernel, one pass per tensor)
        t1 = time.perf_counter()
        err: dict[str, dict[str, float]] = {}
        with self._bar(len(refs), "error kernel") as bar:
            for r in refs:
                w = r.get().detach().float().contiguous()
                ncols = w.shape[-1]
                stored = {f: fmts.resolve(f, ncols).name for f in {*self.formats, *self.calibration_formats}}
                uniq = sorted(set(stored.values()))
                try:
                    qe = kernels.quant_error(w, uniq, importance[r.name])
                except ValueError as exc:
                    raise ValueError(f"tensor {r.name}: {exc}; profile with a menu of formats that can hold it "
                                     "(--formats)") from None
                by_stored = dict(zip(uniq, qe.err[:, 0]))
                err[r.name] = {f: float(by_stored[s]) * share[r.name] for f, s in stored.items()}
                bar.update()
        self.timings["error_kernel"] = time.perf_counter() - t1

        # gain per group, calibrated by a real quantization of the group
        t2 = time.perf_counter()
        groups: dict[tuple, list] = {}
        for r in refs:
            key = (r.layer, "experts", r.kind.value) if r.role is TensorRole.ROUTED_EXPERT else (r.name,)
            groups.setdefault(key, []).append(r)
        # per group and calibration format c: energy E_c = sum of the members' errors, gain g_c = KL / E_c
        points: dict[tuple, list[tuple[float, float]]] = {}
        with self._bar(len(groups) * len(self.calibration_formats), "gain calibration") as bar:
            for key, members in groups.items():
                saved = [r.get().detach().clone() for r in members]
                pts = []
                for c in self.calibration_formats:
                    energy = 0.0
                    for r, sv in zip(members, saved):
                        _quantize_in_place(r, sv, c, importance[r.name])
                        energy += err[r.name][c]
                    kl = self._kl(start=self._first_layer(members))
                    for r, sv in zip(members, saved):
                        r.set(sv)
                    pts.append((energy, kl / energy if energy > 0 else 0.0))
                    bar.update()
                points[key] = sorted(pts)
        self.timings["gain_calibration"] = time.perf_counter() - t2
        damage = {}
        gain: dict[tuple, dict[str, float]] = {}
        for key, members in groups.items():
            gain[key] = {f: interpolate_gain(points[key], sum(err[r.name][f] for r in members)) for f in self.formats}
            for r in members:
                damage[r.name] = {f: gain[key][f] * err[r.name][f] for f in self.formats}
        t5 = time.perf_counter()
        joint = self._joint_correction(refs, importance, damage) if self.joint_correction else {}
        for r in refs:
            for f, rho in joint.get(_class_of(r), {}).items():
                damage[r.name][f] *= rho
        self.timings["joint_correction"] = time.perf_counter() - t5

        # expert statistics and measured removal cost
        t3 = time.perf_counter()
        experts: dict[int, ExpertStats] = {}
        n_total = sum(ad.n_experts(l) for l in ad.moe_layers())
        with self._bar(n_total, "expert removal") as bar:
            for layer in ad.moe_layers():
                cnt, st = count[layer], stats[layer]
                n = ad.n_experts(layer)
                slots = max(cnt.sum(), 1.0)
                freq = cnt / slots * ad.top_k(layer)  # sums to top_k: per-token probability of use
                mean_score = np.where(cnt > 0, st.weight_sum.numpy() / np.maximum(cnt, 1), 0.0)
                reap = np.where(cnt > 0, st.reap_sum.numpy() / np.maximum(cnt, 1), 0.0)
                removal = []
                for e in range(n):
                    removal.append(self._removal_kl(layer, e))
                    bar.update()
                experts[layer] = ExpertStats(
                    freq=freq.tolist(), mean_score=mean_score.tolist(),
                    paper_importance=(0.5 * freq + 0.5 * mean_score).tolist(),
                    reap=reap.tolist(), removal_kl=removal)
        self.timings["expert_removal"] = time.perf_counter() - t3

        # top-k cost per layer
        t4 = time.perf_counter()
        topk: dict[int, dict[int, float]] = {}
        with self._bar(sum(ad.top_k(l) for l in ad.moe_layers()), "top-k") as bar:
            for layer in ad.moe_layers():
                k0 = ad.top_k(layer)
                topk[layer] = {k0: 0.0}
                for k in range(1, k0):
                    ad.set_top_k(layer, k)
                    try:
                        topk[layer][k] = self._kl(start=layer)
                    finally:
                        ad.set_top_k(layer, k0)
                    bar.update()
                bar.update()
        self.timings["top_k"] = time.perf_counter() - t4
        self.timings["total"] = time.perf_counter() - t0

        meta = {
            "method": "importance-weighted error kernel x per-group gain, calibrated by quantizing each group to "
                      f"{' and '.join(self.calibration_formats)}"
                      + (" and interpolated log-log in the group's error energy" if len(self.calibration_formats) > 1 else "")
                      + ("; every format scaled per class (routed experts, other tensors) by the measured KL of "
                         "the class quantized to that format over the sum of its groups' predictions "
                         "(joint_correction)" if joint else "")
                      + "; measured expert removal and top-k KL",
            "joint_correction": joint,
            "calibration_tokens": int(self.reference.n_tokens),
            "seq_len": int(self.windows.shape[1]),
            "reference_perplexity": self.reference.perplexity,
            "seconds": {k: round(v, 2) for k, v in self.timings.items()},
            "gain_points": {"/".join(map(str, k)): v for k, v in points.items()},
        }
        return Profile(fingerprint, list(self.formats), damage, experts, topk, False, meta), importance

    def _removal_kl(self, layer: int, expert: int) -> float:
        spec = self.adapter.routing_spec(layer)
        if spec.n_group > 1 and spec.has_correction_bias:
            # Group-limited routing cannot lose one expert physically (groups must stay equal);
            # the choice uses score + bias, so a bias of -1e9 excludes the expert exactly as a
            # removed one would be, while the kept experts' weights stay the unbiased scores.
            bias = self.adapter.e_score_correction_bias(layer)
            saved = bias[expert].item()
            bias[expert] = -1e9
            try:
                return self._kl(start=layer)
            finally:
                bias[expert] = saved
        m = copy.deepcopy(self.model)
        ad = adapter_for(m)
        ad.remove_experts(layer, [e for e in range(ad.n_experts(layer)) if e != expert])
        return self._kl(m, start=layer)


def _quantize_in_place(ref, original: torch.Tensor, fmt: str, importance: np.ndarray) -> None:
    """Set tensor `ref` to `original` quantized to `fmt` (or llama.cpp's fallback for its row length)
    and dequantized with the kernels."""
    w = original.float().contiguous()
    stored = fmts.resolve(fmt, w.shape[-1]).name
    ref.set(torch.from_numpy(kernels.dequantize(kernels.quantize(w, stored, importance), stored, w.shape)))


def _class_of(ref) -> str:
    return "routed_experts" if ref.role is TensorRole.ROUTED_EXPERT else "other"


PROFILERS = ("layerwise", "passes")


def state_path(profile_path: str | Path) -> Path:
    """Where the layer-streaming profiler keeps its resumable state while it writes PROFILE."""
    p = Path(profile_path)
    return p.with_name(p.name.removesuffix(".json") + ".state.safetensors")


def profile_model(model: str, calib_text: str | None = None, *, out: str | Path | None = None,
                  formats: Sequence[str] | None = None, max_tokens: int = 4096, seq_len: int = 128,
                  progress: bool = True, method: str = "layerwise", device: str = "cpu",
                  dtype: torch.dtype | None = None, threads: int | None = None,
                  imatrix_out: str | Path | None = None, removal: str = "auto",
                  activations_ram: int | None = None, activations_dir: str | Path | None = None,
                  error_rows: int = ERROR_ROWS, stream_share: float = STREAM_SHARE,
                  ray: str | None = None, workers: int | None = None) -> Profile:
    """Profile a checkpoint directory or a shipped reference model on calibration text
    (default: the model's shipped calibration split). Writes PROFILE (json) and its importance
    vectors (PROFILE.importance.safetensors) when `out` is given, and a llama.cpp imatrix GGUF of
    the same importance data when `imatrix_out` is given.

    method "layerwise" (default): sensitivity.layerwise, the checkpoint streamed one decoder layer
    at a time (resumable: an interrupted run with the same `out` continues after its last finished
    layer; hidden-state streams beyond `activations_ram` bytes, default half the available memory, go
    to files in `activations_dir`, default the directory of `out`; the error kernel estimates a matrix of
    more than 4 x `error_rows` rows from a sample of its rows, 0: every row; the gain and joint-correction
    streams carry `stream_share` of the windows); "passes": the in-memory reference profiler (the whole
    model in float32).

    `ray` (layerwise): measured by `workers` Ray workers (sensitivity.distributed), on a local cluster
    ("local") or a running one ("auto", host:port); the same profile up to the order of its sums, not
    resumable from `out`'s state file."""
    if method not in PROFILERS:
        raise ValueError(f"method {method!r}: use one of {', '.join(PROFILERS)}")
    if method == "passes" and (device != "cpu" or dtype not in (None, torch.float32)):
        raise ValueError("the in-memory profiler (method 'passes') runs on the CPU in float32; use method "
                         "'layerwise' for --device / --dtype")
    if threads is not None:
        torch.set_num_threads(threads)
    fingerprint = build_inventory(model).fingerprint
    if ray is not None:
        if method != "layerwise":
            raise ValueError("--ray needs --method layerwise (the in-memory profiler runs in one process)")
        if out is not None and state_path(out).exists():
            raise ValueError(f"{state_path(out)} is the state of an interrupted single-process profile; --ray does not "
                             "resume it: run without --ray to resume, or remove it")
        path, ids = load_text_ids(model, calib_text, "calib", "profiling", "--calib")
        prof, importance, counts = profile_on_ray(
            path, ids, fingerprint, address=None if ray == "local" else ray, workers=workers, formats=formats,
            seq_len=seq_len, max_tokens=max_tokens, progress=progress, device=device, dtype=dtype, threads=threads,
            removal=removal, activations_ram=activations_ram, activations_dir=activations_dir,
            error_rows=error_rows, stream_share=stream_share)
        if out is not None:
            prof.save(out)
            save_importance(importance, importance_path(out))
        if imatrix_out is not None:
            write_profile_imatrix(imatrix_out, importance, counts, build_inventory(model),
                                  prof.meta["calibration_tokens"], seq_len)
        return prof
    if workers is not None:
        raise ValueError("--workers is for --ray (the Ray workers of a distributed profile)")
    if method == "layerwise":
        path, ids = load_text_ids(model, calib_text, "calib", "profiling", "--calib")
        profiler = LayerwiseProfiler(path, ids, seq_len=seq_len, max_tokens=max_tokens, formats=formats,
                                     progress=progress, device=device, dtype=dtype, threads=threads,
                                     state_path=state_path(out) if out is not None else None, removal=removal,
                                     activations_ram=activations_ram, activations_dir=activations_dir,
                                     error_rows=error_rows, stream_share=stream_share)
    else:
        path, m, ids = load_model_and_text(model, calib_text, "calib", "profiling", "--calib")
        profiler = Profiler(m, ids, seq_len=seq_len, max_tokens=max_tokens, formats=formats, progress=progress)
    prof, importance = profiler.run(fingerprint)
    if out is not None:
        prof.save(out)
        save_importance(importance, importance_path(out))
    if imatrix_out is not None:
        if method != "layerwise":
            raise ValueError("an imatrix needs the token counts only the layerwise profiler records")
        write_profile_imatrix(imatrix_out, importance, profiler.token_counts, build_inventory(model),
                              prof.meta["calibration_tokens"], seq_len)
    return prof
