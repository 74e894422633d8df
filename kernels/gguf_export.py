"""GGUF export: a transformers MoE checkpoint plus a per-tensor format plan -> a GGUF file that
mainline llama.cpp loads, quantized with moeplan's own kernels.

Families: DeepseekV3 (GGUF architecture "deepseek2") and Qwen3Moe ("qwen3moe").

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
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from . import api as _api  # looked up at each call (tests patch kernels.api.quantize)
from . import formats as _formats
from .checkpoint import Checkpoint, read_json
from .formats import Format
from .gguf_layout import KvBSplit, gguf_name, tensor_order_key
from .inventory import build_inventory
from .outputs import check_output, fsync, output_file

CHUNK_BYTES = 64 << 20  # float32 bytes of source rows read and quantized at once for 2-D tensors
KEY_KEPT_EXPERTS = "moeplan.kept_experts.{layer}"  # original indices of the experts stacked in layer L

_EXPERT_RE = re.compile(r"^(?P<prefix>.*layers\.(?P<layer>\d+)\.mlp\.experts)\.(?P<e>\d+)\.(?P<kind>gate_proj|up_proj|down_proj)\.weight$")
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

    def by_name(self) -> dict[str, GGUFTensor]:
        return {t.name: t for t in self.tensors}

    def bytes_by_type(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for t in self.tensors:
            out[t.type] += t.nbytes
        return dict(out)


# ---------------------------------------------------------------------------------------------
# families


def _n_experts(config: Mapping) -> int:
    for key in ("n_routed_experts", "num_local_experts", "num_experts"):
        if config.get(key):
            return int(config[key])
    raise ValueError("config.json names no routed expert count (n_routed_experts / num_local_experts / num_experts)")


def _rope(config: Mapping) -> dict:
    """rope parameters from a transformers 5 config (rope_parameters) or an older one (rope_theta, rope_scaling)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default")) or "default"
    return rope


@dataclass(frozen=True)
class _Family:
    model_type: str
    arch_name: str  # GGUF general.architecture
    moe_layers: Callable[[Mapping], list[int]]
    validate: Callable[[Mapping], None]
    metadata: Callable[[Any, Mapping, int, int], None]  # (writer, config, expert count, top-k)
    n_group: Callable[[Mapping], int]
    topk_group: Callable[[Mapping], int]


def _ds_moe_layers(c: Mapping) -> list[int]:
    return list(range(int(c.get("first_k_dense_replace") or 0), int(c["num_hidden_layers"])))


def _ds_validate(c: Mapping) -> None:
    problems = []
    if c.get("attention_bias"):
        problems.append("attention_bias=true (llama.cpp's deepseek2 loads no attention biases)")
    if int(c.get("moe_layer_freq", 1) or 1) != 1:
        problems.append(f"moe_layer_freq={c['moe_layer_freq']} (llama.cpp's deepseek2 has MoE in every layer after the dense ones)")
    if c.get("scoring_func", "sigmoid") != "sigmoid":
        problems.append(f"scoring_func={c['scoring_func']!r} (DeepSeek-V3 routing is sigmoid)")
    if c.get("topk_method", "noaux_tc") not in ("noaux_tc",):
        problems.append(f"topk_method={c['topk_method']!r} (llama.cpp implements noaux_tc group-limited routing)")
    if c.get("q_lora_rank") is None:
        problems.append("q_lora_rank is null: llama.cpp treats only the DeepSeek-V2-Lite layer counts as q-lora-free")
    if not c.get("n_shared_experts"):
        problems.append("n_shared_experts=0 (llama.cpp's deepseek2 requires the shared expert tensors)")
    rope = _rope(c)
    if rope["rope_type"] == "yarn":
        m, m_all = rope.get("mscale", 1.0), rope.get("mscale_all_dim", 0.0)
        if m_all and m != m_all:
            problems.append(f"yarn mscale={m} differs from mscale_all_dim={m_all} (llama.cpp assumes them equal)")
    elif rope["rope_type"] not in ("default", "linear"):
        problems.append(f"rope_type {rope['rope_type']!r} (supported: default, linear, yarn)")
    if problems:
        raise ValueError("this DeepseekV3 checkpoint cannot be expressed as llama.cpp's deepseek2: " + "; ".join(problems))
    n_group = int(c.get("n_group") or 1)
    if n_group > 1:
        topk_group = int(c.get("topk_group") or 1)
        if not 0 < topk_group < n_group:
            raise ValueError(f"topk_group={topk_group} must be in 1..n_group-1={n_group - 1} (llama.cpp asserts n_group_used < n_expert_groups)")


def _add_rope_scaling(w, rope: Mapping) -> None:
    import gguf

    kind = rope["rope_type"]
    if kind == "linear" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))


def _ds_metadata(w, c: Mapping, n_expert: int, top_k: int) -> None:
    import gguf

    rope = _rope(c)
    kv_lora, rope_dim = int(c["kv_lora_rank"]), int(c["qk_rope_head_dim"])
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_context_length(int(c["max_position_embeddings"]))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(int(c["num_attention_heads"]))
    w.add_head_count_kv(1)  # MLA runs as multi-query attention over the compressed latent
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    w.add_expert_count(n_expert)
    w.add_expert_used_count(top_k)
    w.add_expert_group_count(int(c.get("n_group") or 1))
    w.add_expert_group_used_count(int(c.get("topk_group") or 1))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(int(c.get("first_k_dense_replace") or 0))
    w.add_vocab_size(int(c["vocab_size"]))
    w.add_q_lora_rank(int(c["q_lora_rank"]))
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length(kv_lora + rope_dim)
    w.add_value_length(kv_lora)
    w.add_key_length_mla(int(c["qk_nope_head_dim"]) + rope_dim)
    w.add_value_length_mla(int(c["v_head_dim"]))
    w.add_expert_feed_forward_length(int(c["moe_intermediate_size"]))
    w.add_expert_shared_count(int(c["n_shared_experts"]))
    w.add_expert_weights_scale(float(c.get("routed_scaling_factor", 1.0)))
    if c.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope_dim)
    _add_rope_scaling(w, rope)
    if rope["rope_type"] == "yarn" and rope.get("mscale_all_dim"):
        # llama.cpp divides this key by 0.1 when it reads it for deepseek2 (as its converter writes it)
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))


def _qwen_moe_layers(c: Mapping) -> list[int]:
    return list(range(int(c["num_hidden_layers"])))


def _qwen_validate(c: Mapping) -> None:
    problems = []
    if c.get("mlp_only_layers"):
        problems.append(f"mlp_only_layers={c['mlp_only_layers']} (llama.cpp's qwen3moe has MoE in every layer)")
    if int(c.get("decoder_sparse_step", 1) or 1) != 1:
        problems.append(f"decoder_sparse_step={c['decoder_sparse_step']} (llama.cpp's qwen3moe has MoE in every layer)")
    if not c.get("norm_topk_prob", False):
        problems.append("norm_topk_prob=false (llama.cpp's qwen3moe always renormalizes the top-k routing weights)")
    if c.get("use_sliding_window"):
        problems.append("use_sliding_window=true (not supported by llama.cpp's qwen3moe)")
    if c.get("attention_bias"):
        problems.append("attention_bias=true (llama.cpp's qwen3moe loads no output-projection bias)")
    rope = _rope(c)
    if rope["rope_type"] not in ("default", "linear", "yarn"):
        problems.append(f"rope_type {rope['rope_type']!r} (supported: default, linear, yarn)")
    if problems:
        raise ValueError("this Qwen3Moe checkpoint cannot be expressed as llama.cpp's qwen3moe: " + "; ".join(problems))


def _qwen_metadata(w, c: Mapping, n_expert: int, top_k: int) -> None:
    rope = _rope(c)
    head_dim = int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_context_length(int(c["max_position_embeddings"]))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(int(c["num_attention_heads"]))
    w.add_head_count_kv(int(c.get("num_key_value_heads") or c["num_attention_heads"]))
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    w.add_expert_count(n_expert)
    w.add_expert_used_count(top_k)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_expert_feed_forward_length(int(c["moe_intermediate_size"]))
    _add_rope_scaling(w, rope)


FAMILIES: dict[str, _Family] = {
    "deepseek_v3": _Family("deepseek_v3", "deepseek2", _ds_moe_layers, _ds_validate, _ds_metadata,
                           lambda c: int(c.get("n_group") or 1), lambda c: int(c.get("topk_group") or 1)),
    "qwen3_moe": _Family("qwen3_moe", "qwen3moe", _qwen_moe_layers, _qwen_validate, _qwen_metadata,
                         lambda c: 1, lambda c: 1),
}


def family_of(config: Mapping) -> _Family:
    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"model_type {mt!r} has no GGUF writer; supported: {', '.join(FAMILIES)}")
    return FAMILIES[mt]


# ---------------------------------------------------------------------------------------------
# tokenizer


def _normalize_regex(s: str) -> str:
    # tokenizer.json files spell CR/LF inside regexes either as the characters or as \r \n escapes
    return s.replace("\r", "\\r").replace("\n", "\\n")


# llama.cpp pre-tokenizer name -> the Split regexes of tokenizer.json's pre_tokenizer (in order),
# each followed by a ByteLevel step without its own regex (llama-vocab.cpp keeps the same regexes).
_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "deepseek-v3": (
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    ),
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}


def detect_pre_tokenizer(pre: Mapping | None) -> str:
    """The llama.cpp pre-tokenizer name (tokenizer.ggml.pre) for a tokenizer.json pre_tokenizer.

    A lone ByteLevel step with its built-in regex is GPT-2's (llama.cpp "gpt-2"); Split sequences are
    matched against the regexes llama.cpp implements."""
    if not pre:
        raise ValueError("tokenizer.json has no pre_tokenizer; pass tokenizer_pre=... (a llama.cpp pre-tokenizer name)")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        if steps[0].get("add_prefix_space"):
            raise ValueError("ByteLevel pre-tokenizer with add_prefix_space=true has no llama.cpp equivalent")
        return "gpt-2"
    if steps and steps[-1].get("type") == "ByteLevel" and not steps[-1].get("use_regex", True):
        regexes = []
        for s in steps[:-1]:
            if s.get("type") != "Split" or "Regex" not in s.get("pattern", {}) or s.get("behavior", "Isolated") != "Isolated" or s.get("invert"):
                break
            regexes.append(_normalize_regex(s["pattern"]["Regex"]))
        else:
            for name, known in _PRE_TOKENIZERS.items():
                if tuple(regexes) == tuple(_normalize_regex(k) for k in known):
                    return name
    raise ValueError(
        "tokenizer.json's pre_tokenizer matches none of the pre-tokenizers this writer recognizes "
        f"(gpt-2, {', '.join(_PRE_TOKENIZERS)}); pass tokenizer_pre=... with the llama.cpp name whose regex it uses"
    )


def _special_token_id(value: Any, token_to_id: Mapping[str, int]) -> int | None:
    if isinstance(value, Mapping):
        value = value.get("content")
    if isinstance(value, str):
        return token_to_id.get(value)
    return None


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool | None
    add_eos: bool | None
    chat_template: str | None


def read_tokenizer(model_dir: str | os.PathLike, vocab_size: int, config: Mapping,
                   tokenizer_pre: str | None = None) -> _Vocab:
    """Byte-level BPE vocabulary from tokenizer.json (+ tokenizer_config.json) in llama.cpp's "gpt2" form."""
    import gguf

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json; llama.cpp needs the vocabulary in the GGUF file")
    tj = read_json(path, "tokenizer")
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json has a {model.get('type')!r} model; only byte-level BPE is supported")
    pre = tokenizer_pre or detect_pre_tokenizer(tj.get("pre_tokenizer"))
    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special_ids: set[int] = set()
    user_ids: set[int] = set()
    for tok in tj.get("added_tokens") or []:
        id_to_token[int(tok["id"])] = tok["content"]
        (special_ids if tok.get("special") else user_ids).add(int(tok["id"]))
    if id_to_token and max(id_to_token) >= vocab_size:
        raise ValueError(f"tokenizer.json has token id {max(id_to_token)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(id_to_token[i])
            types.append(int(gguf.TokenType.CONTROL if i in special_ids else
                             gguf.TokenType.USER_DEFINED if i in user_ids else gguf.TokenType.NORMAL))
    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        else:
            a, b = m
            if " " in a or " " in b:
                raise ValueError(f"merge {m!r} holds a space; a byte-level vocabulary never does")
            merges.append(f"{a} {b}")
    if not merges:
        raise ValueError("tokenizer.json has no merges; llama.cpp's BPE tokenizer needs them")

    token_to_id = {t: i for i, t in enumerate(tokens)}
    tcfg_path = model_dir / "tokenizer_config.json"
    tcfg = read_json(tcfg_path, "tokenizer config") if tcfg_path.exists() else {}
    special: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = _special_token_id(tcfg.get(f"{kind}_token"), token_to_id)
        if tid is None:
            cid = config.get(f"{kind}_token_id")
            if isinstance(cid, list):
                cid = cid[0] if cid else None
            tid = int(cid) if cid is not None else None
        if tid is not None:
            if not 0 <= tid < vocab_size:
                raise ValueError(f"{kind} token id {tid} is outside the vocabulary of {vocab_size}")
            special[kind] = tid
    chat_template = tcfg.get("chat_template") if isinstance(tcfg.get("chat_template"), str) else None
    if chat_template is None and (model_dir / "chat_template.jinja").exists():
        chat_template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    add_bos = tcfg.get("add_bos_token") if isinstance(tcfg.get("add_bos_token"), bool) else None
    add_eos = tcfg.get("add_eos_token") if isinstance(tcfg.get("add_eos_token"), bool) else None
    return _Vocab(tokens, types, merges, pre, special, add_bos, add_eos, chat_template)


def _add_vocab(w, v: _Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id, "pad": w.add_pad_token_id}
    for kind, tid in v.special.items():
        adders[kind](tid)
    if v.add_bos is not None:
        w.add_add_bos_token(v.add_bos)
    if v.add_eos is not None:
        w.add_add_eos_token(v.add_eos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


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


def _rope_row_perms(fam: _Family, config: Mapping) -> dict[str, np.ndarray]:
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


def _kept_and_top_k(fam: _Family, config: Mapping, kept_experts: Mapping | None,
                    top_k: int | None) -> tuple[dict[int, list[int]], int, int]:
    """(kept experts per MoE layer in index order, kept count, experts used per token), checked
    against llama.cpp's limits: one expert count, equal counts per routing group, top-k reachable."""
    moe_layers = fam.moe_layers(config)
    n_routed = _n_experts(config)
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

    def __init__(self, fam: _Family, config: Mapping, inv, formats: Mapping[str, str],
                 importance: Mapping[str, Any], default_format: str, kept: dict[int, list[int]]):
        self.config, self.inv, self.formats, self.importance = config, inv, formats, importance
        self.default_format, self.kept = default_format, kept
        self.kernel_formats = set(_api.available_formats())
        self.arch = fam.arch_name
        self.mla = fam.model_type == "deepseek_v3"
        self.row_perms = _rope_row_perms(fam, config)

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
            prefix = _EXPERT_RE.match(srcs[0]).group("prefix")
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


def _plan(model_dir: Path, config: Mapping, fam: _Family, formats: Mapping[str, str],
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
               threads: int | None = None) -> GGUFReport:
    """Write the checkpoint in `model_dir` as a GGUF file for llama.cpp.

    formats: checkpoint tensor name -> format (kernels.formats names); tensors not named get
      default_format; llama.cpp's fallback applies per stored tensor by its row length.
    kept_experts: per MoE layer, the routed experts to keep (the same number in every layer; a layer
      not named keeps all). DeepSeek's group-limited routing needs the same number kept in every group.
    top_k: experts used per token (default: the config's num_experts_per_tok).
    importance: checkpoint tensor name -> per-input-column importance (cols,), per expert for routed experts.
    tokenizer_pre: llama.cpp pre-tokenizer name, when tokenizer.json's is not recognized.

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
                _write(writer, plan, config, fam, vocab, model_dir, ckpt, _api.quantize, progress, threads)
            finally:
                writer.close()
            fsync(tmp)  # on disk before it is renamed into place
    finally:
        ckpt.close()

    tensors = tuple(GGUFTensor(s.name, s.fmt.name, s.shape, s.nbytes, s.requested, s.sources) for s in plan.stored)
    return GGUFReport(out_path, fam.arch_name, tensors, sum(t.nbytes for t in tensors), out_path.stat().st_size,
                      plan.n_expert, plan.top_k, tuple(plan.skipped))


def _write(w, plan: _Plan, config: Mapping, fam: _Family, vocab: _Vocab, model_dir: Path, ckpt: Checkpoint,
           quantize, progress: bool, threads: int | None) -> None:
    import gguf

    w.add_name(model_dir.resolve().name)
    w.add_type(gguf.GGUFType.MODEL)  # general.type, as llama.cpp's converter writes it
    fam.metadata(w, config, plan.n_expert, plan.top_k)
    ft = _file_type(plan.stored)
    if ft is not None:
        w.add_file_type(ft)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_routed = _n_experts(config)
    if plan.n_expert != n_routed:
        for layer, ks in sorted(plan.kept.items()):
            w.add_array(KEY_KEPT_EXPERTS.format(layer=layer), [int(e) for e in ks])
    _add_vocab(w, vocab)
    for s in plan.stored:
        w.add_tensor_info(s.name, s.shape, np.dtype(np.float32), s.nbytes, raw_dtype=gguf.GGMLQuantizationType(int(s.fmt.type_id)))
    _add_size_label(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(s.nbytes for s in plan.stored), unit="B", unit_scale=True, desc="GGUF", file=sys.stderr)
    try:
        for s in plan.stored:
            data = np.empty(s.nbytes, dtype=np.uint8)  # the stored bytes of this one tensor
            written = 0
            try:
                for chunk in _tensor_bytes(s, ckpt, quantize, threads):
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


def _add_size_label(w) -> None:
    """general.size_label from the tensors written ("8x1.2M" for a MoE: experts x (shared + one expert's
    parameters)), computed as llama.cpp's converter does (gguf-py's parameter count and size_label)."""
    import gguf

    total, shared, expert, count = w.get_total_parameter_count()
    if total > 0:
        w.add_size_label(gguf.size_label(total, shared, expert, count))


def _tensor_bytes(s: _Stored, ckpt: Checkpoint, quantize, threads: int | None) -> Iterator[np.ndarray]:
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
            try:
                q = quantize(x, s.fmt, imp, threads=threads)
            except ValueError as exc:
                raise ValueError(f"{s.prefix}.{e}.{s.kind}.weight: {exc}") from None
            yield q
            del x
    elif s.op in ("k_b", "v_b"):
        k_b, v_b = s.split.split(ckpt.read(s.sources[0]))  # (H*(nope+v), r) -> (H, r, nope), (H, v, r)
        yield quantize(k_b if s.op == "k_b" else v_b, s.fmt, s.importance, threads=threads)
    else:  # pragma: no cover
        raise AssertionError(s.op)


# ---------------------------------------------------------------------------------------------
# reading a file back as the compressed checkpoint


def compressed_config(config: Mapping, n_expert: int, top_k: int) -> dict:
    """The transformers config of the model a GGUF file holds: `n_expert` routed experts per layer, top-k."""
    out = dict(config)
    for key in ("n_routed_experts", "num_local_experts", "num_experts"):
        if key in out and out[key]:
            out[key] = n_expert
    out["num_experts_per_tok"] = top_k
    return out


def read_back(gguf_path: str | os.PathLike, config: Mapping,
              decode: Callable[[np.ndarray, int, tuple[int, ...]], np.ndarray] | None = None
              ) -> tuple[dict, dict[str, np.ndarray], dict[int, list[int]]]:
    """The compressed model in a GGUF file as checkpoint tensors.

    Returns (config of the compressed model, checkpoint name -> float32 array, kept experts per layer
    as original indices). Experts are renumbered 0..kept-1 in the names; the kv_b split, the expert
    stacking and any rope row reordering are undone. `decode(raw_bytes, ggml_type, shape)` dequantizes
    (default: moeplan's kernels)."""
    import gguf

    if decode is None:
        def decode(raw, type_id, shape):
            return _api.dequantize(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), int(type_id), shape)

    fam = family_of(config)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = fam.arch_name

    def field_val(key: str):
        f = reader.fields.get(key)
        if f is None:
            return None
        return f.contents()

    n_expert = int(field_val(f"{arch}.expert_count"))
    top_k = int(field_val(f"{arch}.expert_used_count"))
    kept = {}
    for layer in fam.moe_layers(config):
        v = field_val(KEY_KEPT_EXPERTS.format(layer=layer))
        kept[layer] = [int(e) for e in v] if v is not None else list(range(_n_experts(config)))
    cfg = compressed_config(config, n_expert, top_k)

    # GGUF name -> checkpoint name, for the tensors that map one to one
    ckpt_names = _expected_checkpoint_names(cfg)
    reverse: dict[str, str] = {}
    for n in ckpt_names:
        g = gguf_name(n, arch)
        if g is not None:
            reverse[g] = n
    perms = _rope_row_perms(fam, config)

    state: dict[str, np.ndarray] = {}
    kb: dict[int, np.ndarray] = {}
    vb: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF ne -> torch order
        x = decode(np.asarray(t.data), int(t.tensor_type), shape).reshape(shape).astype(np.float32, copy=False)
        m = re.match(r"blk\.(\d+)\.(.+)\.(weight|bias)$", t.name)
        layer = int(m.group(1)) if m else None
        base = m.group(2) if m else None
        if base in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            kind = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}[base]
            for e in range(x.shape[0]):
                state[f"model.layers.{layer}.mlp.experts.{e}.{kind}.weight"] = x[e]
        elif base == "attn_k_b":
            kb[layer] = x
        elif base == "attn_v_b":
            vb[layer] = x
        else:
            if t.name not in reverse:
                raise ValueError(f"{gguf_path}: tensor {t.name} has no checkpoint name")
            name = reverse[t.name]
            kind = name.split(".")[-2]
            if kind in perms:
                inv = np.empty_like(perms[kind])
                inv[perms[kind]] = np.arange(len(inv))
                x = x[inv]
            state[name] = x
    split = KvBSplit.of(config) if kb else None
    for layer in kb:
        state[f"model.layers.{layer}.self_attn.kv_b_proj.weight"] = split.join(kb[layer], vb[layer])
    return cfg, state, kept


def _expected_checkpoint_names(cfg: Mapping) -> list[str]:
    """Checkpoint names of the (non-expert) tensors of a model of this config, from transformers on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c)
    names = [n for n, _ in model.named_parameters()]
    names += [n for n, _ in model.named_buffers() if "e_score_correction_bias" in n]
    return names
