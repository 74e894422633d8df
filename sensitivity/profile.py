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

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

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
    def from_json(cls, d: dict) -> "Profile":
        if d.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version {d.get('version')!r} is not {PROFILE_VERSION}; re-run `moeplan profile`")
        for key in ("fingerprint", "formats", "tensor_damage", "experts", "topk_cost"):
            if key not in d:
                raise ValueError(f"profile file has no {key!r} field")
        fmts = list(d["formats"])
        damage = {}
        for name, row in d["tensor_damage"].items():
            if len(row) != len(fmts):
                raise ValueError(f"profile: tensor_damage[{name!r}] has {len(row)} values for {len(fmts)} formats")
            damage[name] = {f: float(v) for f, v in zip(fmts, row) if v is not None}
        experts = {int(l): ExpertStats(**s) for l, s in d["experts"].items()}
        topk = {int(l): {int(k): float(c) for k, c in v.items()} for l, v in d["topk_cost"].items()}
        return cls(d["fingerprint"], fmts, damage, experts, topk, bool(d.get("synthetic", False)), d.get("meta", {}))

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                json.dump(self.to_json(), f, separators=(",", ":"), sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        with open(path) as f:
            return cls.from_json(json.load(f))


def _num(v):
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v):
        raise ValueError("profile costs must be finite")
    return v
