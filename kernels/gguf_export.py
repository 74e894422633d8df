"""GGUF export: a transformers MoE checkpoint plus a per-tensor format plan -> a GGUF file that
mainline llama.cpp loads, quantized with moeplan's own kernels.

Families: DeepseekV3 (GGUF architecture "deepseek2") and Qwen3Moe ("qwen3moe"), in gguf_families; the
vocabulary in gguf_vocab; names, the kv_b split and the tensor order in gguf_layout; reading a file
back in gguf_reader. This module plans what is stored and writes it.

Layout, following llama.cpp's converter (convert_hf_to_gguf.py) and loader (llama-model.cpp):
- routed experts of one layer are stacked into one 3-D tensor per projection,
  blk.L.ffn_{gate,up,down}_exps (experts, rows, cols), so they share one type;
- DeepSeek's kv_b_proj (H*(nope+v), kv_lora) is split into attn_k_b (H, kv_lora, nope), transposed so
  that its rows run along nope, and attn_v_b (H, v, kv_lora) (MLA with the absorbed projections);
- norms, biases, the router (ffn_gate_inp) and DeepSeek's exp_probs_b stay F32;
- llama.cpp's fallback (kernels.formats.resolve) applies to each stored tensor by its own row length.

Shapes here are torch's, rows last (ggml's ne[0] = shape[-1]); GGUF stores them reversed.

The file is written tensor by tensor (one expert or one chunk of rows at a time is read and
quantized; a tensor's quantized bytes go to gguf-py's GGUFWriter.write_tensor_data), to a temporary
file next to the output that is renamed at the end. Nothing written
depends on time or on the output path (general.name is the checkpoint directory's name), so the
same inputs give the same bytes.
"""


from __future__ import annotations

import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from . import api as _api  # looked up at each call (tests patch kernels.api.quantize)
from . import formats as _formats
from . import refine as _refine
from .checkpoint import Checkpoint, read_json
from .formats import Format
from .gguf_families import Architecture, family_of, routed_expert_count
from .gguf_layout import EXPERT_MATRIX, KvBSplit, gguf_name, tensor_order_key
from .gguf_vocab import Vocab, add_vocab, read_tokenizer
from .inventory import build_inventory
from .outputs import check_output, fsync, output_file

CHUNK_BYTES = 64 << 20  # float32 bytes of source rows read and quantized at once for 2-D tensors
KEY_KEPT_EXPERTS = "moeplan.kept_experts.{layer}"  # original indices of the experts stacked in layer L

_EXPERT_KINDS = ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored in the file."""

    name: str  # GGUF name, e.g. blk.3.ffn_down_exps.weight
    type: str  # stored format (after llama.cpp's fallback)
    shape: tuple[int, ...]  # torch order, rows last
    nbytes: int
    requested: str  # the format asked for (before the fallback)
    sources: tuple[str, ...]  # checkpoint tensors it is made of


@dataclass(frozen=True)
class GGUFReport:
    path: Path
    arch: str
    tensors: tuple[GGUFTensor, ...]
    total_tensor_bytes: int  # sum of the tensors' bytes, without alignment padding
    file_size: int
    expert_count: int
    expert_used_count: int
    skipped: tuple[str, ...] = ()  # checkpoint tensors not written (multi-token-prediction layers)
    refined: int = 0  # routed expert matrices refined for their inputs' grams (kernels.refine)

    def by_name(self) -> dict[str, GGUFTensor]:
        return {t.name: t for t in self.tensors}

    def bytes_by_type(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for t in self.tensors:
            out[t.type] += t.nbytes
        return dict(out)


# ---------------------------------------------------------------------------------------------
# the plan: what is stored, in which format, from which checkpoint tensors


@dataclass
class _Stored:
    name: str  # GGUF name
    shape: tuple[int, ...]
    fmt: Format
    requested: str
    sources: tuple[str, ...]
    op: str  # "rows" (2-D, chunked), "f32", "experts", "k_b", "v_b"
    importance: Any = None  # (cols,) array, or per expert a list of arrays for "experts"
    rows: list[int] | None = None  # "f32": rows (or elements) kept, for the router and exp_probs_b
    row_perm: np.ndarray | None = None  # "rows": read the whole tensor and reorder its rows
    experts: list[int] = field(default_factory=list)  # "experts": original indices
    prefix: str = ""  # "experts": checkpoint name prefix (model.layers.L.mlp.experts)
    kind: str = ""  # "experts": gate_proj / up_proj / down_proj
    split: KvBSplit | None = None  # "k_b", "v_b": the kv_b split they come from

    @property
    def nbytes(self) -> int:
        return self.fmt.nbytes(self.shape)


def _check_importance_vec(name: str, v: Any, ncols: int) -> np.ndarray:
    try:
        import torch

        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().float().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(v, dtype=np.float32)
    if a.shape != (ncols,):
        raise ValueError(f"importance[{name!r}] has shape {a.shape}; expected ({ncols},), one weight per input column")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"importance[{name!r}] must be finite and non-negative")
    return np.ascontiguousarray(a)


def _gguf_name(arch: str, hf_name: str) -> str:
    out = gguf_name(hf_name, arch)
    if out is None:
        raise ValueError(f"checkpoint tensor {hf_name!r} has no GGUF name in this architecture; llama.cpp would not load it")
    return out


def _rope_deinterleave_perm(n_heads: int, head_dim: int, rope_dim: int) -> np.ndarray:
    """Row order that turns rope dims laid out in halves (x_i pairs with x_{i+d/2}, transformers'
    rotate_half) into adjacent pairs (x_{2i}, x_{2i+1}), llama.cpp's deepseek2 rope, in each head's
    trailing rope_dim rows."""
    half = rope_dim // 2
    inner = np.empty(rope_dim, dtype=np.int64)
    inner[0::2] = np.arange(half)
    inner[1::2] = np.arange(half) + half
    perm = []
    for h in range(n_heads):
        base = h * head_dim
        perm.extend(range(base, base + head_dim - rope_dim))
        perm.extend(base + head_dim - rope_dim + inner)
    return np.asarray(perm, dtype=np.int64)


def rope_row_perms(fam: Architecture, config: Mapping) -> dict[str, np.ndarray]:
    """Tensor kind -> the row order llama.cpp's rope layout needs (DeepSeek with rope_interleave=false)."""
    if fam.model_type != "deepseek_v3" or config.get("rope_interleave", True):
        return {}
    h, nope, rope = int(config["num_attention_heads"]), int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"])
    q_kind = "q_b_proj" if config.get("q_lora_rank") else "q_proj"
    return {q_kind: _rope_deinterleave_perm(h, nope + rope, rope),
            "kv_a_proj_with_mqa": _rope_deinterleave_perm(1, int(config["kv_lora_rank"]) + rope, rope)}


@dataclass
class _Plan:
    stored: list[_Stored]
    n_expert: int
    top_k: int
    kept: dict[int, list[int]]
    skipped: list[str]


def _written_tensors(inv, config: Mapping) -> tuple[list, list[str]]:
    """The inventory entries that are written, and the names skipped: multi-token-prediction layers
    (index >= num_hidden_layers, left out as llama.cpp's converter does), FP8 scales (consumed on read)
    and a tied lm_head."""
    n_layers = int(config["num_hidden_layers"])
    skipped, infos = [], []
    for t in inv:
        if t.name.endswith("_scale_inv"):
            continue
        if t.layer is not None and t.layer >= n_layers:
            skipped.append(t.name)
            continue
        if config.get("tie_word_embeddings") and t.name.startswith("lm_head"):
            continue
        infos.append(t)
    return infos, skipped


def _check_tables(inv, by_name: Mapping, formats: Mapping[str, str], importance: Mapping[str, Any],
                  default_format: str) -> None:
    unknown = [n for n in formats if n not in inv]
    if unknown:
        raise ValueError(f"formats names {len(unknown)} tensor(s) that the checkpoint does not have, e.g. "
                         f"{', '.join(map(repr, unknown[:5]))}; use the inventory's names "
                         "(routed experts as model.layers.L.mlp.experts.E.gate_proj.weight)")
    _formats.get(default_format)
    for n, f in formats.items():
        fmt = _formats.get(f)  # unknown format names raise here
        if n in by_name and not by_name[n].quantizable and fmt.name != "F32":
            raise ValueError(f"{n} is stored as F32 in GGUF ({by_name[n].role.value}); it cannot be {fmt.name}: "
                             "drop it from formats")
    unknown = [n for n in importance if n not in inv]
    if unknown:
        raise ValueError(f"importance names tensor(s) the checkpoint does not have, e.g. {', '.join(map(repr, unknown[:5]))}")


def _kept_and_top_k(fam: Architecture, config: Mapping, kept_experts: Mapping | None,
                    top_k: int | None) -> tuple[dict[int, list[int]], int, int]:
    """(kept experts per MoE layer in index order, kept count, experts used per token), checked
    against llama.cpp's limits: one expert count, equal counts per routing group, top-k reachable."""
    moe_layers = fam.moe_layers(config)
    n_routed = routed_expert_count(config)
    if kept_experts is not None:
        extra = sorted(set(int(l) for l in kept_experts) - set(moe_layers))
        if extra:
            raise ValueError(f"kept_experts names layers {extra} that are not MoE layers "
                             f"(MoE layers: {moe_layers[0]}..{moe_layers[-1]})")
    kept: dict[int, list[int]] = {}
    for layer in moe_layers:
        ks = kept_experts.get(layer, kept_experts.get(str(layer))) if kept_experts is not None else None
        ks = list(range(n_routed)) if ks is None else [int(e) for e in ks]
        if len(set(ks)) != len(ks):
            raise ValueError(f"kept_experts[{layer}] lists an expert twice: {ks}")
        bad = [e for e in ks if not 0 <= e < n_routed]
        if bad:
            raise ValueError(f"kept_experts[{layer}] has experts {bad} outside 0..{n_routed - 1}")
        if not ks:
            raise ValueError(f"kept_experts[{layer}] is empty; every MoE layer needs at least one expert")
        kept[layer] = sorted(ks)  # index order keeps each routing group contiguous
    counts = {layer: len(ks) for layer, ks in kept.items()}
    if len(set(counts.values())) > 1:
        raise ValueError("llama.cpp has one expert count for all layers, but kept_experts keeps "
                         + ", ".join(f"{c} in layer {l}" for l, c in sorted(counts.items())[:8])
                         + (" ..." if len(counts) > 8 else "") + "; keep the same number in every MoE layer")
    n_expert = next(iter(counts.values()))
    n_group, topk_group = fam.n_group(config), fam.topk_group(config)
    reachable = n_expert
    if n_group > 1:
        if n_routed % n_group:
            raise ValueError(f"{n_routed} routed experts do not split into n_group={n_group} groups")
        size = n_routed // n_group
        for layer, ks in kept.items():
            per = [sum(1 for e in ks if e // size == g) for g in range(n_group)]
            if len(set(per)) > 1:
                raise ValueError(f"layer {layer} keeps {per} experts in its {n_group} routing groups; DeepSeek's "
                                 "group-limited routing in llama.cpp needs the same number kept in every group")
            if per[0] < 2:
                raise ValueError(f"layer {layer} keeps {per[0]} expert per routing group; group scores are the sum "
                                 "of each group's top 2 experts, so keep at least 2 per group")
        reachable = topk_group * (n_expert // n_group)
    k = int(top_k) if top_k is not None else int(config["num_experts_per_tok"])
    if not 1 <= k <= reachable:
        where = f"the {topk_group} selected groups hold {reachable}" if n_group > 1 else f"{n_expert} are kept"
        raise ValueError(f"top_k={k} is not possible: {where} experts per token")
    return kept, n_expert, k


class _Planner:
    """Turns checkpoint tensors into the stored tensors of the file, checking each as it goes."""

    def __init__(self, fam: Architecture, config: Mapping, inv, formats: Mapping[str, str],
                 importance: Mapping[str, Any], default_format: str, kept: dict[int, list[int]]):
        self.config, self.inv, self.formats, self.importance = config, inv, formats, importance
        self.default_format, self.kept = default_format, kept
        self.kernel_formats = set(_api.available_formats())
        self.arch = fam.arch_name
        self.mla = fam.model_type == "deepseek_v3"
        self.row_perms = rope_row_perms(fam, config)

    def requested(self, name: str) -> str:
        return _formats.get(self.formats.get(name, self.default_format)).name

    def importance_of(self, name: str, ncols: int) -> np.ndarray | None:
        return _check_importance_vec(name, self.importance[name], ncols) if name in self.importance else None

    def check(self, s: _Stored) -> _Stored:
        """The stored format has a kernel, and importance is there when the format needs it."""
        if s.fmt.name not in self.kernel_formats:
            raise ValueError(f"{s.name} ({s.sources[0]}) would be stored as {s.fmt.name} (asked {s.requested}), which "
                             f"has no kernel in this build; available: {', '.join(sorted(self.kernel_formats))}")
        if s.fmt.needs_importance:
            imp = s.importance
            if imp is None or (isinstance(imp, list) and any(v is None for v in imp)):
                raise ValueError(f"{s.name} is stored as {s.fmt.name}, which needs importance weights; give importance "
                                 f"for {s.sources[0]}" + (" and the other experts" if len(s.sources) > 1 else ""))
        return s

    def experts(self, layer: int, names_by_kind: Mapping[str, Mapping[int, str]]) -> list[_Stored]:
        """blk.L.ffn_{gate,up,down}_exps: the kept experts stacked (experts, rows, cols), one type each."""
        out = []
        kept = self.kept[layer]
        for kind in _EXPERT_KINDS:
            names = names_by_kind[kind]
            missing = [e for e in kept if e not in names]
            if missing:
                raise ValueError(f"layer {layer} has no {kind} for experts {missing[:5]}")
            srcs = [names[e] for e in kept]
            req = {self.requested(n) for n in srcs}
            if len(req) > 1:
                example = {r: next(n for n in srcs if self.requested(n) == r) for r in sorted(req)}
                raise ValueError(
                    f"layer {layer} {kind}: GGUF stores all experts of a layer in one tensor "
                    f"(blk.{layer}.ffn_{kind.split('_')[0]}_exps) with one type, but the kept experts ask for "
                    f"{', '.join(sorted(req))} (e.g. " + ", ".join(f"{n} -> {r}" for r, n in example.items()) + ")")
            rows, cols = self.inv[srcs[0]].shape
            imps = [self.importance_of(n, cols) for n in srcs]
            if any(v is not None for v in imps) and any(v is None for v in imps):
                lacking = [n for n, v in zip(srcs, imps) if v is None]
                raise ValueError(f"importance is given for some experts of layer {layer} {kind} but not for "
                                 f"{lacking[:3]}; give it for every kept expert or none")
            prefix = EXPERT_MATRIX.match(srcs[0]).group("prefix")
            req_fmt = req.pop()
            out.append(self.check(_Stored(
                _gguf_name(self.arch, f"{prefix}.{kind}.weight"), (len(srcs), rows, cols), _formats.resolve(req_fmt, cols),
                req_fmt, tuple(srcs), "experts", importance=imps if imps[0] is not None else None,
                experts=list(kept), prefix=prefix, kind=kind)))
        return out

    def kv_b(self, t) -> list[_Stored]:
        """DeepSeek's kv_b_proj (H*(nope+v), r) as llama.cpp's attn_k_b (H, r, nope) and attn_v_b (H, v, r)."""
        split = KvBSplit.of(self.config)
        h, nope, v, r = split.heads, split.nope, split.v, split.rank
        if t.shape != split.kv_b_shape:
            raise ValueError(f"{t.name} has shape {t.shape}, expected ({h}*({nope}+{v}), {r}) from the config")
        req = self.requested(t.name)
        k_name, v_name = KvBSplit.part_names(t.name)
        kb = _Stored(_gguf_name(self.arch, k_name), split.k_b_shape,
                     _formats.resolve(req, nope), req, (t.name,), "k_b", split=split)
        if kb.fmt.needs_importance:
            # k_b's rows run along q's nope dims, which the checkpoint's importance (over kv_lora) does not cover
            kb.importance = np.ones(nope, dtype=np.float32)
        vb = _Stored(_gguf_name(self.arch, v_name), split.v_b_shape, _formats.resolve(req, r),
                     req, (t.name,), "v_b", importance=self.importance_of(t.name, r), split=split)
        return [self.check(kb), self.check(vb)]

    def single(self, t) -> _Stored:
        name, gname = t.name, _gguf_name(self.arch, t.name)
        if not t.quantizable:  # norms, biases, router, exp_probs_b: F32
            rows, shape = None, t.shape
            if t.layer in self.kept and (t.kind == "gate" or "e_score_correction_bias" in name):
                rows = self.kept[t.layer]  # the router's rows (and correction biases) of the kept experts
                shape = (len(rows), *t.shape[1:])
            return _Stored(gname, shape, _formats.FORMATS["F32"], "F32", (name,), "f32", rows=rows)
        if len(t.shape) != 2:
            raise ValueError(f"{name} has shape {t.shape}; only 2-D weights are quantized")
        req = self.requested(name)
        s = _Stored(gname, t.shape, _formats.resolve(req, t.shape[-1]), req, (name,), "rows",
                    importance=self.importance_of(name, t.shape[-1]))
        perm = self.row_perms.get(t.kind)
        if perm is not None:
            if len(perm) != t.shape[0]:
                raise ValueError(f"{name} has {t.shape[0]} rows; the rope layout of the config implies {len(perm)}")
            s.row_perm = perm
        return self.check(s)


def _plan(model_dir: Path, config: Mapping, fam: Architecture, formats: Mapping[str, str],
          kept_experts: Mapping[int, Sequence[int]] | None, top_k: int | None,
          importance: Mapping[str, Any] | None, default_format: str) -> _Plan:
    inv = build_inventory(model_dir)
    importance = dict(importance or {})
    infos, skipped = _written_tensors(inv, config)
    _check_tables(inv, {t.name: t for t in infos}, formats, importance, default_format)
    kept, n_expert, k = _kept_and_top_k(fam, config, kept_experts, top_k)

    experts_of: dict[int, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    for t in infos:
        if t.expert is not None:
            experts_of[t.layer][t.kind][t.expert] = t.name
    if sorted(experts_of) != sorted(kept):
        raise ValueError(f"routed experts found in layers {sorted(experts_of)}, but the config makes {sorted(kept)} "
                         "MoE layers; is config.json the checkpoint's?")

    planner = _Planner(fam, config, inv, formats, importance, default_format, kept)
    stored: list[_Stored] = []
    for t in infos:
        if t.expert is not None:
            continue
        if planner.mla and t.kind == "kv_b_proj":
            stored.extend(planner.kv_b(t))
        else:
            stored.append(planner.single(t))
    for layer in sorted(kept):
        stored.extend(planner.experts(layer, experts_of[layer]))
    names = [s.name for s in stored]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two checkpoint tensors map to the GGUF tensor {dup}")
    stored.sort(key=lambda s: tensor_order_key(s.name))
    return _Plan(stored, n_expert, k, kept, skipped)


# ---------------------------------------------------------------------------------------------
# writing


def _file_type(stored: Sequence[_Stored]) -> int | None:
    """general.file_type: llama.cpp's name for the type that holds most of the quantized bytes."""
    import gguf

    ft = gguf.LlamaFileType
    table = {"F32": ft.ALL_F32, "F16": ft.MOSTLY_F16, "BF16": ft.MOSTLY_BF16, "Q8_0": ft.MOSTLY_Q8_0,
             "Q5_1": ft.MOSTLY_Q5_1, "Q5_0": ft.MOSTLY_Q5_0, "Q4_1": ft.MOSTLY_Q4_1, "Q4_0": ft.MOSTLY_Q4_0,
             "Q6_K": ft.MOSTLY_Q6_K, "Q5_K": ft.MOSTLY_Q5_K_M, "Q4_K": ft.MOSTLY_Q4_K_M, "Q3_K": ft.MOSTLY_Q3_K_M,
             "Q2_K": ft.MOSTLY_Q2_K, "IQ4_NL": ft.MOSTLY_IQ4_NL, "IQ4_XS": ft.MOSTLY_IQ4_XS, "TQ2_0": ft.MOSTLY_TQ2_0,
             "TQ1_0": ft.MOSTLY_TQ1_0, "IQ3_S": ft.MOSTLY_IQ3_S, "IQ3_XXS": ft.MOSTLY_IQ3_XXS, "IQ2_S": ft.MOSTLY_IQ2_S,
             "IQ2_XS": ft.MOSTLY_IQ2_XS, "IQ2_XXS": ft.MOSTLY_IQ2_XXS, "IQ1_M": ft.MOSTLY_IQ1_M, "IQ1_S": ft.MOSTLY_IQ1_S}
    by_type: dict[str, int] = defaultdict(int)
    for s in stored:
        if s.op != "f32":
            by_type[s.fmt.name] += s.nbytes
    if not by_type:
        return None
    top = max(sorted(by_type), key=lambda k: by_type[k])
    return int(table[top]) if top in table else None


def write_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, formats: Mapping[str, str], *,
               kept_experts: Mapping[int, Sequence[int]] | None = None, top_k: int | None = None,
               importance: Mapping[str, Any] | None = None, progress: bool = True,
               default_format: str = "BF16", tokenizer_pre: str | None = None,
               threads: int | None = None, grams: Mapping[str, Any] | None = None) -> GGUFReport:
    """Write the checkpoint in `model_dir` as a GGUF file for llama.cpp.

    formats: checkpoint tensor name -> format (kernels.formats names); tensors not named get
      default_format; llama.cpp's fallback applies per stored tensor by its row length.
    kept_experts: per MoE layer, the routed experts to keep (the same number in every layer; a layer
      not named keeps all). DeepSeek's group-limited routing needs the same number kept in every group.
    top_k: experts used per token (default: the config's num_experts_per_tok).
    importance: checkpoint tensor name -> per-input-column importance (cols,), per expert for routed experts.
    tokenizer_pre: llama.cpp pre-tokenizer name, when tokenizer.json's is not recognized.
    grams: routed expert tensor name (per expert, as `importance`) -> the gram (cols, cols) of its
      inputs: a matrix named here, in a format kernels.refine improves, is refined for it.

    Every check runs before the first byte is written; the output appears only when complete.
    """
    import gguf

    model_dir = Path(model_dir)
    out_path = check_output(out_path, "--gguf", make_parents=False)
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    config = read_json(cfg_path, "config")
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} is not a JSON object")
    fam = family_of(config)
    fam.validate(config)

    ckpt = Checkpoint(model_dir, config)
    try:
        plan = _plan(model_dir, config, fam, dict(formats), kept_experts, top_k, importance, default_format)
        vocab = read_tokenizer(model_dir, int(config["vocab_size"]), config, tokenizer_pre)
        with output_file(out_path, "--gguf") as tmp:
            writer = gguf.GGUFWriter(tmp, fam.arch_name)  # tmp lies in a fresh private directory
            try:
                refined = _write(writer, plan, config, fam, vocab, model_dir, ckpt, _api.quantize, progress, threads,
                                 grams)
            finally:
                writer.close()
            fsync(tmp)  # on disk before it is renamed into place
    finally:
        ckpt.close()

    tensors = tuple(GGUFTensor(s.name, s.fmt.name, s.shape, s.nbytes, s.requested, s.sources) for s in plan.stored)
    return GGUFReport(out_path, fam.arch_name, tensors, sum(t.nbytes for t in tensors), out_path.stat().st_size,
                      plan.n_expert, plan.top_k, tuple(plan.skipped), refined)


def _write(w, plan: _Plan, config: Mapping, fam: Architecture, vocab: Vocab, model_dir: Path, ckpt: Checkpoint,
           quantize, progress: bool, threads: int | None, grams: Mapping[str, Any] | None = None) -> int:
    """Writes the file; returns how many matrices were refined for `grams`."""
    import gguf

    w.add_name(model_dir.resolve().name)
    w.add_type(gguf.GGUFType.MODEL)  # general.type, as llama.cpp's converter writes it
    fam.metadata(w, config, plan.n_expert, plan.top_k)
    ft = _file_type(plan.stored)
    if ft is not None:
        w.add_file_type(ft)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_routed = routed_expert_count(config)
    if plan.n_expert != n_routed:
        for layer, ks in sorted(plan.kept.items()):
            w.add_array(KEY_KEPT_EXPERTS.format(layer=layer), [int(e) for e in ks])
    add_vocab(w, vocab)
    for s in plan.stored:
        w.add_tensor_info(s.name, s.shape, np.dtype(np.float32), s.nbytes, raw_dtype=gguf.GGMLQuantizationType(int(s.fmt.type_id)))
    _add_size_label(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    refined: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(s.nbytes for s in plan.stored), unit="B", unit_scale=True, desc="GGUF", file=sys.stderr)
    try:
        for s in plan.stored:
            data = np.empty(s.nbytes, dtype=np.uint8)  # the stored bytes of this one tensor
            written = 0
            try:
                for chunk in _tensor_bytes(s, ckpt, quantize, threads, grams, refined):
                    raw = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
                    if written + raw.nbytes > s.nbytes:
                        raise AssertionError(f"{s.name}: wrote more than the {s.nbytes} bytes planned")
                    data[written:written + raw.nbytes] = raw
                    written += raw.nbytes
                    if bar is not None:
                        bar.update(raw.nbytes)
            except ValueError as exc:  # a value beyond the format's range, named with its tensor
                what = s.name if s.op == "experts" else f"{s.sources[0]} ({s.name})"
                raise ValueError(f"{what} as {s.fmt.name}: {exc}; give it a wider format in the plan "
                                 "(e.g. BF16)") from None
            if written != s.nbytes:
                raise AssertionError(f"{s.name}: wrote {written} bytes, planned {s.nbytes}")
            w.write_tensor_data(data)  # gguf-py aligns it (32 bytes, its default) and pads after it
    finally:
        if bar is not None:
            bar.close()
    return len(refined)


def _add_size_label(w) -> None:
    """general.size_label from the tensors written ("8x1.2M" for a MoE: experts x (shared + one expert's
    parameters)), computed as llama.cpp's converter does (gguf-py's parameter count and size_label)."""
    import gguf

    total, shared, expert, count = w.get_total_parameter_count()
    if total > 0:
        w.add_size_label(gguf.size_label(total, shared, expert, count))


def _tensor_bytes(s: _Stored, ckpt: Checkpoint, quantize, threads: int | None,
                  grams: Mapping[str, Any] | None = None, refined: list | None = None) -> Iterator[np.ndarray]:
    """The stored bytes of one tensor, in file order, a piece at a time."""
    if s.op == "f32":
        x = ckpt.read(s.sources[0]).float()
        if s.rows is not None:
            x = x[s.rows]
        yield x.contiguous().numpy().astype(np.float32, copy=False)
    elif s.op == "rows":
        name = s.sources[0]
        if s.row_perm is not None:
            x = ckpt.read(name)[s.row_perm].contiguous()
            yield quantize(x, s.fmt, s.importance, threads=threads)
            return
        nrows = s.shape[0]
        step = ckpt.row_chunk(name, CHUNK_BYTES)
        for r0 in range(0, nrows, step):
            x = ckpt.read(name, rows=(r0, min(nrows, r0 + step)))
            yield quantize(x, s.fmt, s.importance, threads=threads)
            del x
    elif s.op == "experts":
        for i, e in enumerate(s.experts):
            x = ckpt.expert(s.prefix, e, s.kind)
            if tuple(x.shape) != s.shape[1:]:
                raise ValueError(f"expert {e} of {s.prefix} {s.kind} has shape {tuple(x.shape)}, expected {s.shape[1:]}")
            imp = s.importance[i] if s.importance is not None else None
            name = s.sources[i]  # the expert's tensor name, as the plan, the importance and the grams name it
            try:
                q = quantize(x, s.fmt, imp, threads=threads)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            if grams is not None and name in grams and _refine.refinable(s.fmt):
                q = _refine.refine(q, s.fmt, x.float().numpy(), grams[name])
                if refined is not None:
                    refined.append(name)
            yield q
            del x
    elif s.op in ("k_b", "v_b"):
        k_b, v_b = s.split.split(ckpt.read(s.sources[0]))  # (H*(nope+v), r) -> (H, r, nope), (H, v, r)
        yield quantize(k_b if s.op == "k_b" else v_b, s.fmt, s.importance, threads=threads)
    else:  # pragma: no cover
        raise AssertionError(s.op)
