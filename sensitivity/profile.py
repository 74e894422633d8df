"""The profile: measured (or, clearly labelled, synthetic) costs of every compression decision.

All costs are in one unit, the predicted increase of the KL divergence of the model's next-token
distribution against the original model, in nats per token, so that the integer program's objective
(a sum of them) means something:

- tensor_damage[name][format]: quantizing that tensor to that format (llama.cpp's fallback already
  applied: the cost is of what is actually stored);
- experts[layer].removal_kl[e]: removing routed expert e of that layer;
- topk_cost[layer][k]: activating k experts instead of the original top-k (0 at the original k).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from moeplan.kernels import formats as kfmts
from moeplan.kernels.checkpoint import read_json
from moeplan.kernels.outputs import json_text, write_text

PROFILE_VERSION = 1


@dataclass
class ExpertStats:
    """Per routed expert of one MoE layer (lists indexed by expert)."""

    freq: list[float]  # f_e: fraction of routed (token, slot) assignments that go to e
    mean_score: list[float]  # s_e: mean routing weight of e when selected
    paper_importance: list[float]  # I_e = 0.5 f_e + 0.5 s_e (arXiv 2509.25689)
    reap: list[float]  # mean over routed tokens of gate value x expert output norm
    removal_kl: list[float]  # measured KL (nats/token) of removing e alone

    def __post_init__(self):
        n = len(self.freq)
        for name in ("mean_score", "paper_importance", "reap", "removal_kl"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"expert stats: {name} has {len(getattr(self, name))} entries, freq has {n}")

    @property
    def n_experts(self) -> int:
        return len(self.freq)


@dataclass
class Profile:
    fingerprint: str  # Inventory.fingerprint of the model it was measured on
    formats: list[str]  # the format menu measured (names from kernels.formats)
    tensor_damage: dict[str, dict[str, float]]  # tensor name -> format -> KL nats/token
    experts: dict[int, ExpertStats]  # MoE layer -> stats
    topk_cost: dict[int, dict[int, float]]  # MoE layer -> k -> KL nats/token
    synthetic: bool = False  # True: generated, not measured (never to be reported as a measurement)
    meta: dict = field(default_factory=dict)  # how it was made: calibration text, tokens, time, method
    version: int = PROFILE_VERSION

    def damage(self, tensor: str, fmt: str) -> float:
        try:
            return self.tensor_damage[tensor][fmt]
        except KeyError:
            raise KeyError(f"the profile has no damage for tensor {tensor!r} in format {fmt}") from None

    def check_against(self, inventory) -> None:
        """Raise when this profile was measured on another model than `inventory`."""
        if self.fingerprint != inventory.fingerprint:
            raise ValueError(
                f"profile fingerprint {self.fingerprint} does not match the model's {inventory.fingerprint}: "
                "it was measured on another model; run `moeplan profile` on this one"
            )

    # ---- files ----
    def to_json(self) -> dict:
        fmts = list(self.formats)
        return {
            "version": self.version,
            "fingerprint": self.fingerprint,
            "synthetic": self.synthetic,
            "meta": self.meta,
            "formats": fmts,
            # one row per tensor, aligned with `formats`; null where a format was not measured
            "tensor_damage": {n: [_num(d.get(f)) for f in fmts] for n, d in sorted(self.tensor_damage.items())},
            "experts": {str(l): vars(s) for l, s in sorted(self.experts.items())},
            "topk_cost": {str(l): {str(k): c for k, c in sorted(v.items())} for l, v in sorted(self.topk_cost.items())},
        }

    @classmethod
    def from_json(cls, d: dict, source: str = "profile") -> "Profile":
        """A profile from its JSON object, every field checked: costs are finite and non-negative
        (a damage is a KL divergence increase), lists have one entry per expert, formats are known."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a profile is a JSON object, got {type(d).__name__}")
        if d.get("version") != PROFILE_VERSION:
            raise ValueError(f"{source}: profile version {d.get('version')!r} is not {PROFILE_VERSION}; "
                             "re-run `moeplan profile`")
        for key, typ in (("fingerprint", str), ("formats", list), ("tensor_damage", dict), ("experts", dict),
                         ("topk_cost", dict)):
            if not isinstance(d.get(key), typ):
                raise ValueError(f"{source}: field {key!r} is missing or not a {typ.__name__}")
        fmts = d["formats"]
        for f in fmts:
            if not isinstance(f, str) or f not in kfmts.FORMATS:
                raise ValueError(f"{source}: field 'formats' names an unknown format {f!r}")
        damage = {}
        for name, row in d["tensor_damage"].items():
            where = f"{source}: tensor_damage[{name!r}]"
            if not isinstance(row, list) or len(row) != len(fmts):
                raise ValueError(f"{where} must be a list of {len(fmts)} values, one per format")
            damage[name] = {f: _cost(v, f"{where}[{f}]") for f, v in zip(fmts, row) if v is not None}
        experts = {}
        for layer, s in d["experts"].items():
            where = f"{source}: experts[{layer}]"
            if not isinstance(s, dict) or set(s) != set(ExpertStats.__dataclass_fields__):
                raise ValueError(f"{where} needs exactly the fields {sorted(ExpertStats.__dataclass_fields__)}")
            fields = {}
            for k, v in s.items():
                if not isinstance(v, list):
                    raise ValueError(f"{where}.{k} must be a list (one value per expert)")
                fields[k] = [_cost(x, f"{where}.{k}[{i}]") for i, x in enumerate(v)]
            experts[_index(layer, where)] = ExpertStats(**fields)
        topk = {}
        for layer, v in d["topk_cost"].items():
            where = f"{source}: topk_cost[{layer}]"
            if not isinstance(v, dict):
                raise ValueError(f"{where} must map k to a cost")
            topk[_index(layer, where)] = {_index(k, where): _cost(c, f"{where}[{k}]") for k, c in v.items()}
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{source}: field 'meta' must be an object")
        return cls(d["fingerprint"], list(fmts), damage, experts, topk, bool(d.get("synthetic", False)), meta)

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, json_text(self.to_json(), separators=(",", ":"), sort_keys=True) + "\n", "profile")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        return cls.from_json(read_json(path, "profile"), f"profile {path}")


def _num(v):
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v):
        raise ValueError("profile costs must be finite")
    return v


def _cost(v, where: str) -> float:
    """A finite, non-negative number from a profile file."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{where} is {v!r}; costs are finite non-negative numbers: re-run `moeplan profile`")
    return float(v)


def _index(v, where: str) -> int:
    try:
        i = int(v)
    except (TypeError, ValueError):
        i = -1
    if i < 0 or str(i) != str(v):
        raise ValueError(f"{where}: {v!r} is not a layer index / expert count (a non-negative integer)")
    return i
