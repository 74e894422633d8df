"""The allocation problem: what can be chosen, what each choice costs and weighs.

A `Problem` is built from an inventory (exact bytes), a profile (costs in KL nats/token), a
`Budget` (device memory minus KV cache and runtime reserve), a deployment target and a format menu,
optionally with a decode-speed constraint. It holds the data of the integer program (allocator/formulation.py)
in arrays (what the solvers read) and typed views of them (what people read):

  items i        the non-expert quantizable tensors (attention, dense MLP, shared experts,
                 embedding, head): one format each, candidates (format, bytes, damage, read)
  MoE layers l   routed experts e with tensor kinds j (gate/up/down): per expert tensor a format,
                 per expert keep or prune (removal cost), per layer a top-k (top-k cost)
  fixed          tensors that are never quantized (norms, routers) -- a router's rows go with the
                 experts they route to

Targets: `free` gives every expert tensor its own format, any kept count and top-k
per layer; `gguf` (llama.cpp) gives one format per stacked expert tensor (layer, kind), the same
kept count in every MoE layer and one global top-k. With DeepSeek's group-limited routing, both
keep the same number of experts in each of the n_group contiguous groups of a layer (the router
reshapes scores to (n_group, E / n_group)), at least 2 per group (a group's score is the sum of
its best two) and top-k <= topk_group x kept-per-group (a token only sees topk_group groups).

Bytes read per decoded token (the speed constraint): the KV cache at full context, every tensor
that is not a routed expert (the embedding: one row), the router rows of the kept experts, and
per MoE layer k times the bytes of the LARGEST kept expert of that layer (the worst case over
which experts a token is routed to; for `gguf` all kept experts of a layer are the same size, so
it is also the exact value).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from moeplan.kernels import formats as fmts
from moeplan.kernels.inventory import Inventory, Role, Target, TensorInfo
from moeplan.sensitivity.profile import Profile

DEFAULT_CONTEXT = 4096
DEFAULT_RESERVE = 2_000_000_000  # bytes for the runtime's compute buffers and scratch (set it with --reserve)
KV_BYTES_PER_VALUE = 2  # BF16 / F16 KV cache

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Bytes from "128GB" (10^9), "128GiB" (2^30), "1.5TB", "512MiB", or a plain number of bytes."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size cannot be negative: {text}")
        return int(text)
    if isinstance(text, float):
        text = repr(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot read size {text!r}: write a number with a unit, e.g. 128GB, 128GiB, 1.5TB or 500000000")
    value, unit = float(m.group(1)), m.group(2).upper()
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit {m.group(2)!r} in {text!r}: use B, KB, MB, GB, TB (powers of 1000) "
                         "or KiB, MiB, GiB, TiB (powers of 1024)")
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size > MAX_SIZE:
        raise ValueError(f"size {text!r} is larger than any machine ({MAX_SIZE:.0e} bytes at most)")
    return int(round(size))


MAX_SIZE = 1e18  # 1 EB: far above any budget, far below what an int64 or a float can hold exactly enough


def fmt_bytes(n: float) -> str:
    """Bytes for people: GB (10^9) down to 0.1 GB, then MB, kB, B."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= 0.1 * size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n):,} B"


# ---------------------------------------------------------------------------------------------
# budget and speed

@dataclass(frozen=True)
class Budget:
    """Device memory split into KV cache, runtime reserve and what is left for the weights."""

    memory: int  # bytes of device memory
    context: int = DEFAULT_CONTEXT  # tokens of context the KV cache must hold
    reserve: int = DEFAULT_RESERVE  # bytes for the runtime (compute buffers, scratch)
    kv_bytes_per_token: int = 0  # KV cache bytes per token of context (BF16), from the inventory

    def __post_init__(self):
        if self.memory <= 0:
            raise ValueError(f"device memory must be positive, got {self.memory} bytes")
        if self.context < 0 or self.reserve < 0 or self.kv_bytes_per_token < 0:
            raise ValueError("context, reserve and KV bytes per token cannot be negative")

    @classmethod
    def of(cls, memory: str | int, inventory: Inventory, context: int = DEFAULT_CONTEXT,
           reserve: str | int = DEFAULT_RESERVE) -> "Budget":
        return cls(parse_size(memory), int(context), parse_size(reserve),
                   inventory.kv_cache_bytes_per_token(KV_BYTES_PER_VALUE))

    @property
    def kv_cache(self) -> int:
        return self.context * self.kv_bytes_per_token

    @property
    def weights(self) -> int:
        """Bytes left for the weights: memory - KV cache - reserve."""
        return self.memory - self.kv_cache - self.reserve

    def split(self) -> str:
        rows = [
            ("device memory", self.memory, ""),
            ("- KV cache", self.kv_cache, f"{self.context} tokens x {self.kv_bytes_per_token:,} B (BF16)"),
            ("- runtime reserve", self.reserve, ""),
            ("= weight budget", self.weights, ""),
        ]
        return "\n".join(f"{a:<18} {fmt_bytes(b):>12}  {c}".rstrip() for a, b, c in rows)

    def to_json(self) -> dict:
        return {"memory_bytes": self.memory, "context": self.context, "kv_cache_bytes": self.kv_cache,
                "kv_bytes_per_token": self.kv_bytes_per_token, "reserve_bytes": self.reserve,
                "weight_budget_bytes": self.weights}


@dataclass(frozen=True)
class Speed:
    """Decode-speed target: decoding is memory bound, so tokens/s <= bandwidth / bytes read per token."""

    bandwidth: float  # bytes per second
    tokens_per_s: float

    def __post_init__(self):
        if not (self.bandwidth > 0 and self.tokens_per_s > 0):
            raise ValueError(f"bandwidth and tokens/s must be positive, got {self.bandwidth} B/s, {self.tokens_per_s} tok/s")

    @classmethod
    def of(cls, bandwidth_gbps: float, tokens_per_s: float) -> "Speed":
        return cls(float(bandwidth_gbps) * 1e9, float(tokens_per_s))

    @property
    def max_read(self) -> int:
        """Most bytes one decoded token may read."""
        return int(self.bandwidth / self.tokens_per_s)

    def to_json(self) -> dict:
        return {"bandwidth_bytes_per_s": self.bandwidth, "tokens_per_s": self.tokens_per_s,
                "max_read_bytes_per_token": self.max_read}


class InfeasibleBudget(ValueError):
    """No plan fits: carries the smallest feasible size (and read per token) for the target and menu."""

    def __init__(self, message: str, min_weight_bytes: int, min_memory: int, min_read: int | None = None):
        super().__init__(message)
        self.min_weight_bytes = min_weight_bytes
        self.min_memory = min_memory
        self.min_read = min_read


# ---------------------------------------------------------------------------------------------
# typed views

@dataclass(frozen=True)
class Candidate:
    fmt: str  # format asked for (a menu entry)
    stored: tuple[str, ...]  # format actually written per stored part (llama.cpp's fallback)
    nbytes: int
    damage: float  # KL nats/token
    read: int  # bytes read per decoded token


@dataclass(frozen=True)
class Item:
    """A non-expert quantizable tensor: it gets one format of the menu."""

    index: int
    name: str
    role: Role
    layer: int | None
    kind: str
    shape: tuple[int, ...]
    stored: tuple[tuple[str, ...], ...]  # per menu format: formats actually stored


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer: E routed experts, each with the tensor kinds of `Problem.kinds`."""

    layer: int
    index: int  # position in Problem.layers (row of the expert arrays)
    n_experts: int
    tensor_names: tuple[tuple[str, ...], ...]  # (E, J) checkpoint names
    shapes: tuple[tuple[int, ...], ...]  # (J,) shape of one expert's tensor of each kind
    stored: tuple[tuple[tuple[str, ...], ...], ...]  # (J, F) formats actually stored
    topk_options: tuple[int, ...]
    router_bytes_per_expert: int  # F32 router rows (and correction bias) that go with each kept expert
    params_per_expert: int


@dataclass
class Assignment:
    """One plan in array form (what every solver produces and `Problem.evaluate` scores).

    item_fmt   (n_items,)  index into Problem.formats
    keep       (L, E)      bool
    expert_fmt (L, E, J)   index into Problem.formats, -1 for pruned experts
    topk       (L,)        experts activated per token in each MoE layer
    """

    item_fmt: np.ndarray
    keep: np.ndarray
    expert_fmt: np.ndarray
    topk: np.ndarray

    def copy(self) -> "Assignment":
        return Assignment(self.item_fmt.copy(), self.keep.copy(), self.expert_fmt.copy(), self.topk.copy())

    def key(self) -> tuple:
        return (self.item_fmt.tobytes(), self.keep.tobytes(), self.expert_fmt.tobytes(), self.topk.tobytes())


@dataclass
class Totals:
    """Size, reads and predicted damage of an assignment (the plan's accounting)."""

    weight_bytes: int  # everything stored: quantized tensors + fixed tensors
    bytes_by_role: dict[str, int]
    params: int  # parameters kept
    bits_per_weight: float  # 8 x weight_bytes / params
    read_per_token: int  # bytes read per decoded token (see the module docstring)
    damage: float  # predicted KL nats/token: quant + prune + topk
    damage_quant: float
    damage_prune: float
    damage_topk: float
    kept_experts: int
    total_experts: int

    def to_json(self) -> dict:
        return {"weight_bytes": self.weight_bytes, "bytes_by_role": dict(sorted(self.bytes_by_role.items())),
                "params": self.params, "bits_per_weight": self.bits_per_weight,
                "read_per_token_bytes": self.read_per_token, "kept_experts": self.kept_experts,
                "total_experts": self.total_experts}


# ---------------------------------------------------------------------------------------------
# candidate filters (used by the solvers)

def pareto(nbytes: np.ndarray, cost: np.ndarray, read: np.ndarray | None = None,
           across: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Undominated candidates along the last axis, for a batch of items at once.

    Candidate g dominates a when it has no more bytes, read and cost (cost compared on every
    row of axis `across` at once, e.g. every expert sharing a stacked format) and is strictly better
    somewhere, or is identical and comes first. Dropping dominated candidates keeps every optimum
    reachable. Returns (ok, dom): ok marks the undominated; dom gives, for every candidate, an
    undominated one that is at least as good (itself when ok)."""
    cost = np.asarray(cost, dtype=np.float64)
    shape = cost.shape if across is None else cost.shape[:across] + cost.shape[across + 1:]
    b = np.broadcast_to(np.asarray(nbytes), shape)
    r = b if read is None else np.broadcast_to(np.asarray(read), shape)
    F = shape[-1]

    def pair(v):  # v[..., g] against v[..., a]: (..., a, g)
        return v[..., None, :], v[..., :, None]

    bg, ba = pair(b)
    rg, ra = pair(r)
    if across is None:
        cg, ca = pair(cost)
        cle, clt = cg <= ca, cg < ca
    else:
        c = np.moveaxis(cost, across, -2)  # (..., E, F)
        cg = np.moveaxis(c, -2, 0)[..., None, :]  # (E, ..., 1, F)
        ca = np.moveaxis(c, -2, 0)[..., :, None]  # (E, ..., F, 1)
        cle, clt = (cg <= ca).all(axis=0), (cg < ca).any(axis=0)
    weak = (bg <= ba) & (rg <= ra) & cle
    earlier = np.arange(F)[None, :] < np.arange(F)[:, None]  # g < a
    strict = (bg < ba) | (rg < ra) | clt | earlier
    ok = ~(weak & strict).any(axis=-1)
    dom = np.argmax(weak & ok[..., None, :], axis=-1)
    dom = np.where(ok, np.arange(F), dom)
    return ok, dom


def pareto_mask(nbytes: np.ndarray, cost: np.ndarray, read: np.ndarray | None = None) -> np.ndarray:
    """The undominated candidates of one item (see `pareto`)."""
    return pareto(np.asarray(nbytes), np.asarray(cost), read)[0]


def lower_hull(nbytes: np.ndarray, cost: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the (bytes, cost) points, by increasing bytes: the only
    candidates a Lagrangian price on bytes can pick (min cost + lambda * bytes)."""
    order = sorted(range(len(nbytes)), key=lambda i: (nbytes[i], cost[i]))
    hull: list[int] = []
    for i in order:
        if hull and cost[i] >= cost[hull[-1]]:
            continue  # dominated: no fewer bytes and no lower cost than a hull point
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a -> i
            if (cost[b] - cost[a]) * (nbytes[i] - nbytes[a]) >= (cost[i] - cost[a]) * (nbytes[b] - nbytes[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


# ---------------------------------------------------------------------------------------------
# the problem

@dataclass
class Problem:
    inventory: Inventory
    profile: Profile
    budget: Budget
    target: Target
    formats: tuple[str, ...]  # the menu, F entries
    speed: Speed | None
    items: list[Item]
    layers: list[MoELayer]
    kinds: tuple[str, ...]  # expert tensor kinds, J entries
    n_group: int  # expert groups of group-limited routing (1: none)
    topk_group: int  # groups a token may use
    top_k: int  # the model's original top-k
    fixed_bytes: int  # tensors never quantized, except router rows (those go with their experts)
    fixed_read: int  # bytes read per token that no decision changes: fixed tensors + KV cache at full context
    fixed_params: int  # parameters of the fixed tensors
    # arrays the solvers read
    item_bytes: np.ndarray  # (n, F) int64
    item_damage: np.ndarray  # (n, F)
    item_read: np.ndarray  # (n, F) int64
    item_params: np.ndarray  # (n,) int64
    exp_bytes: np.ndarray  # (L, J, F) int64: one expert's tensor of kind j in format f
    exp_damage: np.ndarray  # (L, E, J, F)
    removal: np.ndarray  # (L, E) KL of removing the expert
    router_bytes: np.ndarray  # (L,) int64 F32 router bytes per kept expert
    topk_values: np.ndarray  # (K,) every k some layer may use, increasing
    topk_cost: np.ndarray  # (L, K) cost of k in layer l, +inf where k is not an option
    notes: list[str] = field(default_factory=list)

    # ---- construction ----
    @classmethod
    def build(cls, inventory: Inventory, profile: Profile, budget: Budget, target: Target | str = Target.FREE,
              formats: Sequence[str] | str | None = None, speed: Speed | None = None,
              check_fingerprint: bool = True) -> "Problem":
        target = Target(target)
        if check_fingerprint:
            profile.check_against(inventory)
        menu = _menu(formats, profile)
        F = len(menu)
        cfg = inventory.config

        # MoE layers: experts of a layer share shapes; every layer has the same kinds and count
        moe = inventory.moe_layers
        et = inventory.expert_tensors()
        kinds: tuple[str, ...] = ()
        n_exp = 0
        if moe:
            first = sorted(et[(moe[0], inventory.experts_in_layer(moe[0])[0])], key=lambda t: _kind_order(t.kind))
            kinds = tuple(t.kind for t in first)
            n_exp = len(inventory.experts_in_layer(moe[0]))
        layers: list[MoELayer] = []
        L, J = len(moe), len(kinds)
        exp_bytes = np.zeros((L, J, F), dtype=np.int64)
        exp_damage = np.zeros((L, n_exp, J, F))
        removal = np.zeros((L, n_exp))
        router_bytes = np.zeros(L, dtype=np.int64)
        routers = {}
        for t in inventory.tensors:
            if t.role is Role.ROUTER and t.layer is not None:
                routers.setdefault(t.layer, []).append(t)
        all_k: set[int] = set()
        opts_by_layer = []
        for li, layer in enumerate(moe):
            ids = inventory.experts_in_layer(layer)
            if ids != list(range(n_exp)):
                raise ValueError(f"MoE layer {layer} has experts {ids[:3]}..{ids[-1]} ({len(ids)}); every MoE layer "
                                 f"must have experts 0..{n_exp - 1} (mixed expert counts are not supported)")
            names = []
            shapes = None
            for e in ids:
                ts = sorted(et[(layer, e)], key=lambda t: _kind_order(t.kind))
                if tuple(t.kind for t in ts) != kinds:
                    raise ValueError(f"expert {e} of layer {layer} has tensors {[t.kind for t in ts]}, expected {list(kinds)}")
                sh = tuple(t.shape for t in ts)
                if shapes is None:
                    shapes = sh
                elif sh != shapes:
                    raise ValueError(f"expert {e} of layer {layer} has shapes {sh}, expert 0 has {shapes}: the "
                                     "experts of a layer must have equal shapes")
                names.append(tuple(t.name for t in ts))
                dmg = _damage_rows(profile, ts, menu)
                exp_damage[li, e] = dmg
            stored = []
            for j, t in enumerate(sorted(et[(layer, 0)], key=lambda t: _kind_order(t.kind))):
                exp_bytes[li, j] = [t.nbytes(f, target, cfg) for f in menu]
                stored.append(tuple(tuple(t.stored_format(f, target, cfg)) for f in menu))
            stats = profile.experts.get(layer)
            if stats is None:
                raise ValueError(f"the profile has no expert statistics for MoE layer {layer}; re-run `moeplan profile`")
            if stats.n_experts != n_exp:
                raise ValueError(f"the profile has {stats.n_experts} experts for layer {layer}, the model {n_exp}")
            removal[li] = stats.removal_kl
            rb = sum(t.nbytes("F32") for t in routers.get(layer, []))
            if rb % n_exp:
                raise ValueError(f"router tensors of layer {layer} ({rb} bytes) do not split evenly over {n_exp} experts")
            router_bytes[li] = rb // n_exp
            opts = profile.topk_cost.get(layer) or {inventory.top_k: 0.0}
            opts = {int(k): float(c) for k, c in opts.items() if 1 <= int(k) <= n_exp}
            if not opts:
                raise ValueError(f"the profile's top-k costs for layer {layer} allow no k in 1..{n_exp}")
            opts_by_layer.append(opts)
            all_k.update(opts)
            layers.append(MoELayer(layer, li, n_exp, tuple(names), shapes, tuple(stored), tuple(sorted(opts)), int(rb // n_exp),
                                   sum(math.prod(s) for s in shapes)))
        topk_values = np.array(sorted(all_k), dtype=np.int64)
        topk_cost = np.full((L, len(topk_values)), np.inf)
        for li, opts in enumerate(opts_by_layer):
            for ki, k in enumerate(topk_values):
                if int(k) in opts:
                    topk_cost[li, ki] = opts[int(k)]

        # non-expert items and fixed tensors
        items: list[Item] = []
        ib, idm, ird, ipar = [], [], [], []
        fixed = fixed_params = 0
        moe_set = set(moe)
        for t in inventory.tensors:
            if t.role is Role.ROUTED_EXPERT or (t.role is Role.ROUTER and t.layer in moe_set):
                continue  # routed experts are decided per layer; router rows go with their experts
            if not t.quantizable:
                fixed += t.nbytes("F32")
                fixed_params += t.numel
                continue
            b = [t.nbytes(f, target, cfg) for f in menu]
            rows = t.shape[0] if t.role is Role.EMBEDDING else 1  # a token reads one embedding row
            items.append(Item(len(items), t.name, t.role, t.layer, t.kind, t.shape,
                              tuple(tuple(t.stored_format(f, target, cfg)) for f in menu)))
            ib.append(b)
            ird.append([x // rows for x in b])
            idm.append(_damage_rows(profile, [t], menu)[0])
            ipar.append(t.numel)

        n_group = inventory.n_group
        topk_group = inventory.topk_group
        if n_group > 1 and n_exp % n_group:
            raise ValueError(f"{n_exp} experts do not split into n_group={n_group} equal groups")
        if n_group > 1 and n_exp // n_group < 2:
            raise ValueError(f"groups of {n_exp // n_group} expert(s): group-limited routing needs at least 2 per group")
        kv_read = budget.kv_cache  # decode reads the whole cache once per token (at full context)
        p = cls(inventory, profile, budget, target, menu, speed, items, layers, kinds, n_group, topk_group,
                inventory.top_k or 1, fixed, fixed + kv_read, fixed_params,
                np.array(ib, dtype=np.int64).reshape(len(items), F), np.array(idm, dtype=np.float64).reshape(len(items), F),
                np.array(ird, dtype=np.int64).reshape(len(items), F), np.array(ipar, dtype=np.int64),
                exp_bytes, exp_damage, removal, router_bytes, topk_values, topk_cost)
        if profile.synthetic:
            p.notes.append("SYNTHETIC profile: predicted damage comes from generated, not measured, costs")
        return p

    # ---- sizes ----
    @property
    def F(self) -> int:
        return len(self.formats)

    @property
    def L(self) -> int:
        return len(self.layers)

    @property
    def E(self) -> int:
        return self.exp_damage.shape[1] if self.layers else 0

    @property
    def J(self) -> int:
        return len(self.kinds)

    @property
    def group_size(self) -> int:
        return self.E // self.n_group if self.n_group > 1 else self.E

    def fmt_index(self, fmt: str) -> int:
        name = fmts.get(fmt).name
        try:
            return self.formats.index(name)
        except ValueError:
            raise ValueError(f"{name} is not in this problem's format menu {list(self.formats)}") from None

    def candidates(self, item: Item | int) -> list[Candidate]:
        i = item.index if isinstance(item, Item) else int(item)
        it = self.items[i]
        return [Candidate(f, it.stored[fi], int(self.item_bytes[i, fi]), float(self.item_damage[i, fi]),
                          int(self.item_read[i, fi])) for fi, f in enumerate(self.formats)]

    # ---- structural options ----
    def kept_per_group_options(self, k: int) -> list[int]:
        """Kept experts per group (or per layer without groups) that allow top-k = k."""
        if self.n_group > 1:
            lo = max(2, -(-k // self.topk_group))
            return list(range(lo, self.group_size + 1))
        return list(range(max(k, 1), self.E + 1))

    def kept_count(self, m: int) -> int:
        """Experts kept in a layer with m kept per group."""
        return m * self.n_group if self.n_group > 1 else m

    def global_topk_options(self) -> list[int]:
        """k that every MoE layer allows (the gguf target uses one k)."""
        ok = np.isfinite(self.topk_cost).all(axis=0)
        return [int(k) for k, good in zip(self.topk_values, ok) if good]

    def topk_index(self, k: int) -> int:
        idx = np.searchsorted(self.topk_values, k)
        if idx >= len(self.topk_values) or self.topk_values[idx] != k:
            raise ValueError(f"top-k {k} is not an option (options: {self.topk_values.tolist()})")
        return int(idx)

    # ---- accounting ----
    def expert_total_bytes(self, a: Assignment) -> np.ndarray:
        """(L, E) bytes of each kept expert's tensors (0 for pruned)."""
        if self.L == 0:
            return np.zeros((0, 0), dtype=np.int64)
        f = np.where(a.keep[..., None], a.expert_fmt, 0)
        li = np.arange(self.L)[:, None, None]
        ji = np.arange(self.J)[None, None, :]
        b = self.exp_bytes[li, ji, f]  # (L, E, J)
        return np.where(a.keep, b.sum(-1), 0)

    def read_per_token(self, a: Assignment) -> int:
        n = self.fixed_read + int(self.item_read[np.arange(len(self.items)), a.item_fmt].sum())
        if self.L:
            eb = self.expert_total_bytes(a)
            n += int((a.keep.sum(1) * self.router_bytes).sum())
            n += int((a.topk * eb.max(axis=1)).sum())
        return n

    def evaluate(self, a: Assignment) -> Totals:
        ii = np.arange(len(self.items))
        by_role: dict[str, int] = {}
        for it, b in zip(self.items, self.item_bytes[ii, a.item_fmt]):
            by_role[it.role.value] = by_role.get(it.role.value, 0) + int(b)
        dq = float(self.item_damage[ii, a.item_fmt].sum())
        params = int(self.item_params.sum()) + self.fixed_params
        dp = dt = 0.0
        kept = 0
        if self.L:
            eb = self.expert_total_bytes(a)
            by_role[Role.ROUTED_EXPERT.value] = int(eb.sum())
            by_role[Role.ROUTER.value] = int((a.keep.sum(1) * self.router_bytes).sum())
            f = np.where(a.keep[..., None], a.expert_fmt, 0)
            li = np.arange(self.L)[:, None, None]
            ei = np.arange(self.E)[None, :, None]
            ji = np.arange(self.J)[None, None, :]
            dq += float(np.where(a.keep[..., None], self.exp_damage[li, ei, ji, f], 0.0).sum())
            dp = float(self.removal[~a.keep].sum())
            kidx = np.searchsorted(self.topk_values, a.topk)
            bad = (kidx >= len(self.topk_values)) | (self.topk_values[np.minimum(kidx, len(self.topk_values) - 1)] != a.topk)
            if bad.any():
                li = int(np.flatnonzero(bad)[0])
                raise ValueError(f"layer {self.layers[li].layer} has top-k {int(a.topk[li])}, which is not an option "
                                 f"(options: {self.topk_values.tolist()}): it has no cost to evaluate")
            dt = float(self.topk_cost[np.arange(self.L), kidx].sum())
            kept = int(a.keep.sum())
            params += sum(int(a.keep[l.index].sum()) * (l.params_per_expert + l.router_bytes_per_expert // 4)
                          for l in self.layers)
        by_role["fixed"] = self.fixed_bytes
        total = sum(by_role.values())
        return Totals(total, by_role, params, 8.0 * total / max(params, 1), self.read_per_token(a),
                      dq + dp + dt, dq, dp, dt, kept, self.L * self.E)


    def objective(self, a: Assignment) -> float:
        return self.evaluate(a).damage

    def check(self, a: Assignment) -> list[str]:
        """Every violated constraint, in words (empty: the assignment is a valid plan). Independent of
        any solver's formulation: this is the definition the tests hold the solvers to."""
        out: list[str] = []
        n, F = len(self.items), self.F
        if a.item_fmt.shape != (n,) or ((a.item_fmt < 0) | (a.item_fmt >= F)).any():
            out.append("one_format: every non-expert tensor needs one format of the menu")
        if self.L:
            if a.keep.shape != (self.L, self.E) or a.expert_fmt.shape != (self.L, self.E, self.J) or a.topk.shape != (self.L,):
                return out + ["shape: assignment arrays do not match the problem"]
            if (np.where(a.keep[..., None], (a.expert_fmt < 0) | (a.expert_fmt >= F), a.expert_fmt != -1)).any():
                out.append("expert_format: a kept expert's tensor needs one format, a pruned expert none")
            for li, lay in enumerate(self.layers):
                k = int(a.topk[li])
                if k not in lay.topk_options:
                    out.append(f"topk_choice: layer {lay.layer} top-k {k} is not an option {lay.topk_options}")
                kept = int(a.keep[li].sum())
                if kept < k:
                    out.append(f"keep_ge_topk: layer {lay.layer} keeps {kept} experts < top-k {k}")
                if self.n_group > 1:
                    per = a.keep[li].reshape(self.n_group, -1).sum(1)
                    if len(set(per.tolist())) != 1:
                        out.append(f"groups: layer {lay.layer} keeps {per.tolist()} experts per group (must be equal)")
                    elif per[0] < 2:
                        out.append(f"groups: layer {lay.layer} keeps {per[0]} per group (at least 2)")
                    elif k > self.topk_group * per[0]:
                        out.append(f"group_reach: layer {lay.layer} top-k {k} > topk_group {self.topk_group} x {per[0]} kept per group")
            if self.target is Target.GGUF:
                for li, lay in enumerate(self.layers):
                    for j in range(self.J):
                        fs = set(a.expert_fmt[li, a.keep[li], j].tolist())
                        if len(fs) > 1:
                            out.append(f"gguf_uniform: layer {lay.layer} {self.kinds[j]} stacks experts in formats "
                                       f"{sorted(self.formats[f] for f in fs)}")
                counts = set(a.keep.sum(1).tolist())
                if len(counts) > 1:
                    out.append(f"gguf_count: kept experts per layer differ {sorted(counts)} (llama.cpp needs one count)")
                if len(set(a.topk.tolist())) > 1:
                    out.append(f"gguf_topk: top-k differs between layers {sorted(set(a.topk.tolist()))}")
        if not out:
            tot = self.evaluate(a)
            if tot.weight_bytes > self.budget.weights:
                out.append(f"memory: {tot.weight_bytes:,} bytes > weight budget {self.budget.weights:,}")
            if self.speed is not None and tot.read_per_token > self.speed.max_read:
                out.append(f"speed: {tot.read_per_token:,} bytes read per token > {self.speed.max_read:,}")
        return out

    # ---- the smallest plan ----
    def minimum(self) -> Assignment:
        """The plan with the fewest bytes (and the fewest bytes read per token): every tensor in its
        smallest format, the smallest top-k, and the fewest kept experts it allows (those with the
        highest removal cost)."""
        item_fmt = self.item_bytes.argmin(axis=1) if len(self.items) else np.zeros(0, dtype=np.int64)
        keep = np.zeros((self.L, self.E), dtype=bool)
        efmt = np.full((self.L, self.E, self.J), -1, dtype=np.int64)
        topk = np.zeros(self.L, dtype=np.int64)
        if self.L:
            ks = self.global_topk_options() if self.target is Target.GGUF else None
            for li, lay in enumerate(self.layers):
                k = min(ks) if ks is not None else min(lay.topk_options)
                m = self.kept_per_group_options(k)[0]
                topk[li] = k
                keep[li] = self._keep_top(self.removal[li], m)
                small = self.exp_bytes[li].argmin(axis=1)  # (J,)
                efmt[li][keep[li]] = small
        return Assignment(item_fmt.astype(np.int64), keep, efmt, topk)

    def _keep_top(self, score: np.ndarray, m: int) -> np.ndarray:
        """Keep the m highest-scoring experts of each group (of the layer without groups)."""
        keep = np.zeros(self.E, dtype=bool)
        g = self.n_group if self.n_group > 1 else 1
        size = self.E // g
        for gi in range(g):
            idx = np.argsort(-score[gi * size:(gi + 1) * size], kind="stable")[:m]
            keep[gi * size + idx] = True
        return keep

    def check_feasible(self) -> None:
        """Raise InfeasibleBudget, with the smallest feasible size, when no plan fits."""
        a = self.minimum()
        tot = self.evaluate(a)
        over = self.budget.memory - self.budget.weights
        if tot.weight_bytes > self.budget.weights:
            raise InfeasibleBudget(
                f"no {self.target.value} plan with formats {','.join(self.formats)} fits {fmt_bytes(self.budget.weights)} "
                f"of weights ({fmt_bytes(self.budget.memory)} memory - KV cache - reserve): the smallest feasible plan "
                f"needs {fmt_bytes(tot.weight_bytes)} of weights, i.e. at least {fmt_bytes(tot.weight_bytes + over)} "
                f"of device memory ({tot.weight_bytes + over:,} bytes) at context {self.budget.context}. "
                f"Raise --memory, lower --context/--reserve, or add smaller formats to --formats.",
                tot.weight_bytes, tot.weight_bytes + over, tot.read_per_token)
        if self.speed is not None and tot.read_per_token > self.speed.max_read:
            best = self.speed.bandwidth / tot.read_per_token
            raise InfeasibleBudget(
                f"the speed target of {self.speed.tokens_per_s:g} tokens/s at {self.speed.bandwidth / 1e9:g} GB/s "
                f"allows {self.speed.max_read:,} bytes read per token; the smallest plan reads {tot.read_per_token:,}, "
                f"so at most {best:.2f} tokens/s is reachable with formats {','.join(self.formats)}",
                tot.weight_bytes, tot.weight_bytes + over, tot.read_per_token)

    def describe(self) -> str:
        n_bin = len(self.items) * self.F + self.L * self.E * (1 + self.J * self.F)
        lines = [f"model {self.inventory.model_type} ({self.inventory.fingerprint}), target {self.target.value}, "
                 f"formats {','.join(self.formats)}",
                 f"{len(self.items)} non-expert tensors, {self.L} MoE layers x {self.E} experts x {self.J} tensors, "
                 f"top-k options {self.topk_values.tolist()}, groups {self.n_group} (a token uses {self.topk_group}); "
                 f"about {n_bin:,} binary choices",
                 self.budget.split()]
        if self.speed is not None:
            lines.append(f"speed: {self.speed.tokens_per_s:g} tok/s at {self.speed.bandwidth / 1e9:g} GB/s -> at most "
                         f"{fmt_bytes(self.speed.max_read)} read per token")
        lines += self.notes
        return "\n".join(lines)

    def replace(self, **changes) -> "Problem":
        """The same problem with another budget / speed (the data arrays are shared, not copied)."""
        import dataclasses

        return dataclasses.replace(self, **changes)


def _kind_order(kind: str) -> tuple:
    order = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}
    return (order.get(kind, 9), kind)


def _menu(formats, profile: Profile) -> tuple[str, ...]:
    if formats is None:
        menu = list(profile.formats)
    elif isinstance(formats, str):
        menu = [f.strip() for f in formats.split(",") if f.strip()]
    else:
        menu = list(formats)
    if not menu:
        raise ValueError("the format menu is empty: pass e.g. --formats Q2_K,Q3_K,Q4_K,Q6_K,Q8_0")
    names = []
    for f in menu:
        name = fmts.get(f).name  # unknown names fail here with the list of known formats
        if name in names:
            raise ValueError(f"format {name} appears twice in the menu")
        names.append(name)
    missing = [f for f in names if f not in profile.formats]
    if missing:
        raise ValueError(f"the profile has no damage for formats {missing} (it has {profile.formats}); "
                         "drop them from --formats or profile them")
    return tuple(names)


def _damage_rows(profile: Profile, tensors: Iterable[TensorInfo], menu: Sequence[str]) -> np.ndarray:
    rows = []
    for t in tensors:
        d = profile.tensor_damage.get(t.name)
        if d is None:
            raise ValueError(f"the profile has no damage for tensor {t.name!r}; was it measured on this model?")
        try:
            rows.append([d[f] for f in menu])
        except KeyError as exc:
            raise ValueError(f"the profile has no damage for tensor {t.name!r} in format {exc.args[0]}; "
                             "drop the format from --formats or re-profile") from None
    return np.array(rows, dtype=np.float64)
