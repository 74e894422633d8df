"""Inventory: every tensor of a model with its role and exact bytes under every format.

Built without loading weights: from the safetensors headers of a checkpoint directory, or from a
config.json alone by building the architecture on torch's meta device (real shapes, no memory).
Tensor names follow the checkpoint convention with one tensor per routed expert
(`model.layers.L.mlp.experts.E.gate_proj.weight`), whatever the in-memory layout is (transformers 5
fuses experts into 3-D parameters; those are expanded here).

Shapes are torch's (out_features, in_features) for linear weights; GGUF rows (ggml's ne[0]) run
along the last axis, so a format fits a tensor when its block size divides shape[-1].
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from moeplan.kernels import formats as fmts
from moeplan.kernels.checkpoint import (
    checkpoint_shards,
    read_json,
    read_safetensors_header,
)
from moeplan.kernels.gguf_layout import KvBSplit
from moeplan.kernels.outputs import json_text, write_text

INVENTORY_VERSION = 1
# the bundled configs and reference models are package data of moeplan.sensitivity (they are read, not imported)
_SENSITIVITY_DIR = Path(__file__).resolve().parents[1] / "sensitivity"
CONFIG_DIR = _SENSITIVITY_DIR / "configs"
MODELS_DIR = _SENSITIVITY_DIR / "models"
BUNDLED_CONFIGS = {"deepseek-v3": CONFIG_DIR / "deepseek-v3.json"}


class Role(str, enum.Enum):
    ATTENTION = "attention"
    DENSE_MLP = "dense_mlp"
    ROUTED_EXPERT = "routed_expert"
    SHARED_EXPERT = "shared_expert"
    ROUTER = "router"
    EMBEDDING = "embedding"
    HEAD = "head"
    NORM = "norm"
    OTHER = "other"


QUANTIZABLE_ROLES = frozenset(
    {Role.ATTENTION, Role.DENSE_MLP, Role.ROUTED_EXPERT, Role.SHARED_EXPERT, Role.EMBEDDING, Role.HEAD}
)


class Target(str, enum.Enum):
    """Deployment target: what runtime the plan is for (allocator/problem.py, "Targets")."""

    GGUF = "gguf"  # mainline llama.cpp: one type per stacked expert tensor, one expert count, one top-k
    FREE = "free"  # moeplan / transformers: per-expert formats, per-layer counts and top-k


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    role: Role
    layer: int | None = None
    expert: int | None = None  # routed expert index within its layer
    kind: str = ""  # short tensor kind: q_a_proj, kv_b_proj, gate_proj, up_proj, down_proj, ...

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def quantizable(self) -> bool:
        """2-D weights of the roles that GGUF quantizes; routers, norms and biases stay F32."""
        return self.role in QUANTIZABLE_ROLES and len(self.shape) >= 2

    def storage_shapes(self, target: Target | str, config: dict | None = None) -> list[tuple[int, ...]]:
        """The shapes this tensor is stored as. For GGUF, DeepSeek's kv_b_proj (H*(nope+v), kv_lora)
        becomes attn_k_b (H, kv_lora, nope) and attn_v_b (H, v, kv_lora) (llama.cpp's MLA layout),
        which changes k_b's row length to qk_nope_head_dim."""
        if Target(target) is Target.GGUF and KvBSplit.applies(self.name, config):
            split = KvBSplit.of(config)
            return [split.k_b_shape, split.v_b_shape]
        return [self.shape]

    def nbytes(self, fmt: str | fmts.Format, target: Target | str = Target.FREE, config: dict | None = None) -> int:
        """Exact bytes stored for this tensor when asked for `fmt` (llama.cpp's fallback applied per
        stored part when the rows do not fit). Non-quantizable tensors are always F32."""
        if not self.quantizable:
            return 4 * self.numel
        total = 0
        for shp in self.storage_shapes(target, config):
            total += fmts.resolve(fmt, shp[-1]).nbytes(shp)
        return total

    def stored_format(self, fmt: str | fmts.Format, target: Target | str = Target.FREE,
                      config: dict | None = None) -> list[str]:
        """The format actually written for each stored part (after llama.cpp's fallback)."""
        if not self.quantizable:
            return ["F32"]
        return [fmts.resolve(fmt, shp[-1]).name for shp in self.storage_shapes(target, config)]

    def to_json(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "role": self.role.value, "kind": self.kind}
        if self.layer is not None:
            d["layer"] = self.layer
        if self.expert is not None:
            d["expert"] = self.expert
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TensorInfo":
        return cls(d["name"], tuple(d["shape"]), Role(d["role"]), d.get("layer"), d.get("expert"), d.get("kind", ""))


@dataclass
class Inventory:
    model_type: str
    config: dict
    tensors: list[TensorInfo]
    fingerprint: str
    source: str = ""
    version: int = INVENTORY_VERSION
    _by_name: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self._by_name = {t.name: t for t in self.tensors}
        experts: dict[tuple[int, int], list[TensorInfo]] = defaultdict(list)
        for t in self.tensors:
            if t.role is Role.ROUTED_EXPERT:
                experts[(t.layer, t.expert)].append(t)
        self._experts = dict(experts)
        by_layer: dict[int, list[int]] = defaultdict(list)
        for layer, e in sorted(experts):
            by_layer[layer].append(e)
        self._experts_by_layer = dict(by_layer)

    # ---- lookups ----
    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the inventory of this {self.model_type} model") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self._experts_by_layer)

    def experts_in_layer(self, layer: int) -> list[int]:
        return list(self._experts_by_layer.get(layer, []))

    def expert_tensors(self) -> dict[tuple[int, int], list[TensorInfo]]:
        """(layer, expert) -> that expert's tensors (gate, up, down)."""
        return dict(self._experts)

    @property
    def top_k(self) -> int:
        return int(self.config.get("num_experts_per_tok", 0) or 0)

    @property
    def n_group(self) -> int:
        """DeepSeek's expert groups (group-limited routing); 1 when the family has none."""
        return int(self.config.get("n_group", 1) or 1) if self.model_type.startswith("deepseek") else 1

    @property
    def topk_group(self) -> int:
        return int(self.config.get("topk_group", 1) or 1) if self.model_type.startswith("deepseek") else 1

    # ---- counts ----
    def params(self, roles: Iterable[Role] | None = None) -> int:
        rs = set(roles) if roles is not None else None
        return sum(t.numel for t in self.tensors if rs is None or t.role in rs)

    def routed_params(self) -> int:
        return self.params([Role.ROUTED_EXPERT])

    def params_keeping(self, keep_fraction: float) -> float:
        """Parameters when keeping `keep_fraction` of every layer's routed experts (rounded per layer)."""
        kept = 0
        for layer, experts in self._experts_by_layer.items():
            n_keep = round(keep_fraction * len(experts))
            per = [sum(t.numel for t in self._experts[(layer, e)]) for e in experts]
            kept += sum(sorted(per, reverse=True)[:n_keep])  # experts of a layer have equal size
        return self.params() - self.routed_params() + kept

    def bytes_uniform(self, fmt: str, target: Target | str = Target.FREE) -> int:
        """Total bytes with every quantizable tensor asked for `fmt` (fallbacks applied)."""
        return sum(t.nbytes(fmt, target, self.config) for t in self.tensors)

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """KV cache per token over all layers. MLA (DeepSeek): the compressed latent plus the rope key,
        (kv_lora_rank + qk_rope_head_dim) values per layer; otherwise K and V of every KV head."""
        c = self.config
        n_layers = int(c["num_hidden_layers"])
        if c.get("kv_lora_rank"):
            per_layer = int(c["kv_lora_rank"]) + int(c["qk_rope_head_dim"])
        else:
            n_kv = int(c.get("num_key_value_heads") or c["num_attention_heads"])
            head_dim = int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
            per_layer = 2 * n_kv * head_dim
        return n_layers * per_layer * bytes_per_value

    def summary(self) -> dict[str, int]:
        out = {r.value: 0 for r in Role}
        for t in self.tensors:
            out[t.role.value] += t.numel
        out["total"] = self.params()
        return {k: v for k, v in out.items() if v}

    # ---- files ----
    def to_json(self) -> dict:
        return {
            "version": self.version,
            "model_type": self.model_type,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "config": self.config,
            "tensors": [t.to_json() for t in self.tensors],
        }

    @classmethod
    def from_json(cls, d: dict) -> "Inventory":
        if d.get("version") != INVENTORY_VERSION:
            raise ValueError(f"inventory file version {d.get('version')!r} is not {INVENTORY_VERSION}; rebuild it with `moeplan inventory`")
        return cls(d["model_type"], d["config"], [TensorInfo.from_json(t) for t in d["tensors"]], d["fingerprint"], d.get("source", ""))

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, json_text(self.to_json(), indent=1, sort_keys=True) + "\n", "inventory")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Inventory":
        with open(path) as f:
            return cls.from_json(json.load(f))


# ---------------------------------------------------------------------------------------------
# classification of checkpoint names

# a routed expert's tensor stored one per expert (groups: layer, expert, kind), and a fused 3-D one (layer, kind)
EXPERT_RE = re.compile(
    r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"
)
FUSED_EXPERT_RE = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)$")
_LAYER_RE = re.compile(r"layers\.(\d+)\.")
_W_KIND = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def classify(name: str, shape: Sequence[int]) -> TensorInfo:
    """Role, layer, expert and kind of one checkpoint tensor, from its name."""
    shape = tuple(int(s) for s in shape)
    m = EXPERT_RE.search(name)
    if m:
        kind = _W_KIND.get(m.group(3), m.group(3))
        return TensorInfo(name, shape, Role.ROUTED_EXPERT, int(m.group(1)), int(m.group(2)), kind)
    lm = _LAYER_RE.search(name)
    layer = int(lm.group(1)) if lm else None
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) >= 2 else parts[-1]
    if name.endswith("weight_scale_inv") or name.endswith("weight_scale"):
        role = Role.OTHER  # block scales of an FP8 checkpoint: folded into the weights on read
    elif "embed_tokens" in name or name.endswith("wte.weight"):
        role = Role.EMBEDDING
    elif name.startswith("lm_head") or name.endswith("output.weight"):
        role = Role.HEAD
    elif "norm" in leaf or len(shape) == 1 and "bias" not in name and "correction" not in name:
        role = Role.NORM
    elif re.search(r"\.(?:mlp|block_sparse_moe)\.(gate|router)(\.|$)", name) or "e_score_correction_bias" in name \
            or "shared_expert_gate" in name:
        role = Role.ROUTER
    elif "shared_expert" in name:
        role = Role.SHARED_EXPERT
    elif "self_attn" in name or ".attn." in name or "attention" in name:
        role = Role.ATTENTION
    elif ".mlp." in name:
        role = Role.DENSE_MLP
    else:
        role = Role.OTHER
    return TensorInfo(name, shape, role, layer, None, leaf)


def _expand_fused(name: str, shape: tuple[int, ...]) -> list[TensorInfo] | None:
    """Per-expert entries for a fused 3-D expert parameter (transformers 5 in-memory layout):
    gate_up_proj (E, 2I, H) -> gate_proj (I, H) and up_proj (I, H) per expert; down_proj (E, H, I)."""
    m = FUSED_EXPERT_RE.search(name)
    if not m or len(shape) != 3:
        return None
    layer, which = int(m.group(1)), m.group(2)
    prefix = name[: m.start()] + f"layers.{layer}.mlp.experts"
    n_exp = shape[0]
    out = []
    for e in range(n_exp):
        if which == "gate_up_proj":
            inter = shape[1] // 2
            for kind in ("gate_proj", "up_proj"):
                out.append(TensorInfo(f"{prefix}.{e}.{kind}.weight", (inter, shape[2]), Role.ROUTED_EXPERT, layer, e, kind))
        else:
            out.append(TensorInfo(f"{prefix}.{e}.{which}.weight", (shape[1], shape[2]), Role.ROUTED_EXPERT, layer, e, which))
    return out


def _sort_key(t: TensorInfo):
    return (t.layer if t.layer is not None else (-1 if t.role is Role.EMBEDDING else 1 << 30),
            t.expert if t.expert is not None else -1, t.name)


# ---------------------------------------------------------------------------------------------
# builders

def resolve_model(model: str | os.PathLike) -> Path:
    """A bundled name (deepseek-v3, a shipped reference model), a checkpoint directory, or a config.json."""
    s = str(model)
    if s in BUNDLED_CONFIGS:
        return BUNDLED_CONFIGS[s]
    if (MODELS_DIR / s).is_dir():
        return MODELS_DIR / s
    p = Path(s).expanduser()
    if p.exists():
        return p
    bundled = sorted(BUNDLED_CONFIGS) + sorted(d.name for d in MODELS_DIR.glob("*") if d.is_dir())
    raise FileNotFoundError(
        f"model {s!r} is neither a checkpoint directory, a config.json, nor a bundled name "
        f"({', '.join(bundled)})"
    )


def build_inventory(model: str | os.PathLike) -> Inventory:
    """Inventory of a checkpoint directory (safetensors headers), a config.json (meta device) or a bundled name."""
    path = resolve_model(model)
    if path.is_dir():
        shards = checkpoint_shards(path)
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{path} has no config.json; a checkpoint directory needs one")
        config = _config(read_json(cfg_path, "config"), cfg_path)
        if shards:
            return _from_safetensors(shards, config, str(path))
        return _from_config(config, str(cfg_path))
    if path.suffix == ".json":
        return _from_config(_config(read_json(path, "config"), path), str(path))
    raise ValueError(f"{path} is not a directory or a .json config")


def _config(obj, path) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a JSON object; a config.json maps field names to values")
    return obj


def check_config_matches(inv: Inventory) -> None:
    """Refuse a checkpoint whose config.json disagrees with its weights: every tensor the config's
    architecture has (built on the meta device) must be in the safetensors files with the same
    shape. A writer that trusted the config would emit wrong metadata for the weights it copies."""
    want = _from_config(inv.config, "config.json")
    mismatched = [(t.name, t.shape, inv[t.name].shape) for t in want if t.name in inv and inv[t.name].shape != t.shape]
    if mismatched:
        name, by_config, in_file = mismatched[0]
        raise ValueError(f"{inv.source}: config.json disagrees with the weights: {name} is {list(in_file)} in the "
                         f"safetensors files but {list(by_config)} by config.json ({len(mismatched)} such tensors); "
                         "fix config.json (or the weights) so that they describe the same model")
    missing = [t.name for t in want if t.name not in inv]
    if missing:
        raise ValueError(f"{inv.source}: config.json describes tensors the safetensors files do not have, e.g. "
                         f"{missing[0]} ({len(missing)} missing); fix config.json or complete the checkpoint")


def _from_safetensors(shards: list[Path], config: dict, source: str) -> Inventory:
    tensors: list[TensorInfo] = []
    h = hashlib.sha256()
    for shard in shards:
        header, _ = read_safetensors_header(shard)
        for name in sorted(header):
            shape = header[name].shape
            fused = _expand_fused(name, shape)
            tensors.extend(fused if fused is not None else [classify(name, shape)])
        # content digest: the header and the first MiB of data tell two checkpoints of one architecture apart
        with open(shard, "rb") as f:
            h.update(f.read(8 + 1024 * 1024))
    tensors.sort(key=_sort_key)
    return Inventory(config.get("model_type", "unknown"), config, tensors, _fingerprint(config, tensors, h.hexdigest()), source)


def _from_config(config: dict, source: str) -> Inventory:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if "model_type" not in config:
        raise ValueError(f"{source}: config has no model_type; is it a transformers config.json?")
    cfg_kwargs = {k: v for k, v in config.items() if k not in ("quantization_config",)}
    cfg = AutoConfig.for_model(**cfg_kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tensors: list[TensorInfo] = []
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        fused = _expand_fused(name, shape)
        tensors.extend(fused if fused is not None else [classify(name, shape)])
    for name, b in model.named_buffers():
        if "e_score_correction_bias" in name:
            tensors.append(classify(name, tuple(b.shape)))
    tensors.sort(key=_sort_key)
    return Inventory(config["model_type"], config, tensors, _fingerprint(config, tensors, "config-only"), source)


def _fingerprint(config: dict, tensors: list[TensorInfo], content: str) -> str:
    h = hashlib.sha256()
    h.update(config.get("model_type", "").encode())
    for t in sorted(tensors, key=lambda t: t.name):
        h.update(f"{t.name}:{t.shape}".encode())
    h.update(content.encode())
    return h.hexdigest()[:16]
