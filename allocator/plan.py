"""The plan file: what to keep, which format every tensor gets, and what it is predicted to cost.

A plan is the materializer's only input besides the checkpoint. It is declarative JSON, versioned,
schema-checked on load (errors name the field), and written canonically (sorted keys, one
indentation, a final newline), so that writing what was read gives identical bytes.

The typed model below (pydantic) is the one definition; allocator/schema/plan.schema.json is
generated from it (`python -m moeplan.allocator.plan --write-schema`) for tools in other languages, and a
test keeps the two in step.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeplan.kernels import formats as fmts
from moeplan.kernels.checkpoint import parse_json, regular_file
from moeplan.kernels.gguf_layout import gguf_arch, gguf_names, stacked_name, tensor_order_key
from moeplan.kernels.inventory import Role, Target
from moeplan.kernels.outputs import json_text, write_text

from .problem import Assignment

PLAN_FORMAT = "moeplan-plan"
PLAN_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schema" / "plan.schema.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelRef(_Strict):
    model_type: str
    fingerprint: str = Field(min_length=1, description="Inventory.fingerprint of the model the plan is for")
    source: str = ""


class BudgetSplit(_Strict):
    memory_bytes: int = Field(gt=0)
    context: int = Field(ge=0)
    kv_bytes_per_token: int = Field(ge=0)
    kv_cache_bytes: int = Field(ge=0)
    reserve_bytes: int = Field(ge=0)
    weight_budget_bytes: int

    @model_validator(mode="after")
    def _arithmetic(self):
        if self.kv_cache_bytes != self.context * self.kv_bytes_per_token:
            raise ValueError(f"kv_cache_bytes {self.kv_cache_bytes} != context x kv_bytes_per_token "
                             f"({self.context} x {self.kv_bytes_per_token})")
        if self.weight_budget_bytes != self.memory_bytes - self.kv_cache_bytes - self.reserve_bytes:
            raise ValueError("weight_budget_bytes must equal memory_bytes - kv_cache_bytes - reserve_bytes")
        return self


class SpeedTarget(_Strict):
    bandwidth_bytes_per_s: float = Field(gt=0)
    tokens_per_s: float = Field(gt=0)
    max_read_bytes_per_token: int = Field(gt=0)


class ProfileRef(_Strict):
    fingerprint: str
    synthetic: bool = Field(description="true: the damage figures come from a generated, not measured, profile")
    label: str = ""


class LayerPlan(_Strict):
    layer: int = Field(ge=0)
    n_experts: int = Field(gt=0, description="routed experts the layer has in the checkpoint")
    kept: list[int] = Field(description="indices of the kept routed experts, increasing")
    top_k: int = Field(gt=0, description="experts activated per token")

    @model_validator(mode="after")
    def _consistent(self):
        if any(b <= a for a, b in zip(self.kept, self.kept[1:])):
            raise ValueError(f"layer {self.layer}: kept experts must be increasing and distinct")
        if self.kept and not (0 <= self.kept[0] and self.kept[-1] < self.n_experts):
            raise ValueError(f"layer {self.layer}: kept experts must be in 0..{self.n_experts - 1}")
        if self.top_k > len(self.kept):
            raise ValueError(f"layer {self.layer}: top_k {self.top_k} > {len(self.kept)} kept experts")
        return self


class PlanTotals(_Strict):
    weight_bytes: int = Field(ge=0)
    bytes_by_role: dict[str, int]
    params: int = Field(ge=0)
    bits_per_weight: float = Field(ge=0)
    read_per_token_bytes: int = Field(ge=0)
    kept_experts: int = Field(ge=0)
    total_experts: int = Field(ge=0)


class Damage(_Strict):
    unit: Literal["KL nats/token"] = "KL nats/token"
    total: float
    quantization: float
    pruning: float
    top_k: float
    synthetic: bool = Field(description="true: predicted from a synthetic profile")

    @model_validator(mode="after")
    def _sum(self):
        parts = self.quantization + self.pruning + self.top_k
        if not math.isclose(parts, self.total, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"damage total {self.total} != quantization + pruning + top_k ({parts})")
        return self


class SolverReport(_Strict):
    solver: str
    status: Literal["optimal", "feasible", "infeasible", "no_solution", "baseline"]
    objective: Optional[float] = None
    bound: Optional[float] = None
    gap: Optional[float] = None
    wall_s: float = Field(ge=0)
    hint_s: float = Field(default=0.0, ge=0)
    time_limit_s: Optional[float] = None
    threads: Optional[int] = None


def _check_format(name: str) -> str:
    f = fmts.FORMATS.get(name)
    if f is None:
        raise ValueError(f"unknown format {name!r} (known: {', '.join(fmts.FORMATS)})")
    return name


class Plan(_Strict):
    """A compression plan (see the module docstring)."""

    format: Literal["moeplan-plan"] = PLAN_FORMAT
    version: Literal[1] = PLAN_VERSION
    model: ModelRef
    target: Literal["free", "gguf"]
    formats: list[str] = Field(min_length=1, description="the format menu the plan was solved with")
    budget: BudgetSplit
    speed: Optional[SpeedTarget] = None
    profile: ProfileRef
    layers: list[LayerPlan] = Field(description="every MoE layer: kept experts and top-k")
    tensors: dict[str, str] = Field(description="checkpoint tensor name -> format asked for (pruned experts absent)")
    stacked: dict[str, str] = Field(default_factory=dict,
                                    description="gguf: stacked expert tensor (blk.N.ffn_*_exps.weight) -> format")
    totals: PlanTotals
    damage: Damage
    solver: SolverReport

    @field_validator("formats")
    @classmethod
    def _formats_known(cls, v):
        for f in v:
            _check_format(f)
        return v

    @field_validator("tensors", "stacked")
    @classmethod
    def _tensor_formats_known(cls, v):
        for name, f in v.items():
            if f not in fmts.FORMATS:
                raise ValueError(f"tensor {name!r}: unknown format {f!r}")
        return v

    @model_validator(mode="after")
    def _target_rules(self):
        layers = [l.layer for l in self.layers]
        if len(set(layers)) != len(layers):
            raise ValueError("a layer appears twice in layers")
        if self.target == "gguf" and self.layers:
            counts = {len(l.kept) for l in self.layers}
            if len(counts) > 1:
                raise ValueError(f"target gguf needs the same kept expert count in every layer, got {sorted(counts)}")
            ks = {l.top_k for l in self.layers}
            if len(ks) > 1:
                raise ValueError(f"target gguf needs one top_k for every layer, got {sorted(ks)}")
            if not self.stacked:
                raise ValueError("target gguf needs the stacked expert tensor formats")
        kept_total = sum(len(l.kept) for l in self.layers)
        if kept_total != self.totals.kept_experts:
            raise ValueError(f"totals.kept_experts {self.totals.kept_experts} != {kept_total} experts kept in layers")
        return self

    # ---- files ----
    def to_json_text(self) -> str:
        return json_text(self.model_dump(mode="json"), indent=1, sort_keys=True, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, self.to_json_text(), "plan")

    @classmethod
    def from_json_text(cls, text: str, source: str = "plan") -> "Plan":
        try:
            obj = parse_json(text, source)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        return cls.from_obj(obj, source)

    @classmethod
    def from_obj(cls, obj, source: str = "plan") -> "Plan":
        if not isinstance(obj, dict):
            raise PlanError(f"{source}: a plan is a JSON object, got {type(obj).__name__}")
        if obj.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: field 'format' must be {PLAN_FORMAT!r}, got {obj.get('format')!r}")
        if obj.get("version") != PLAN_VERSION:
            raise PlanError(f"{source}: field 'version' is {obj.get('version')!r}; this moeplan reads version "
                            f"{PLAN_VERSION}: re-run `moeplan solve`")
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            raise PlanError(_explain(exc, source)) from None

    @classmethod
    def load(cls, path: str | os.PathLike, inventory=None) -> "Plan":
        """Read and validate a plan; with `inventory`, also check it was made for that model."""
        path = Path(path)
        regular_file(path, "plan")
        plan = cls.from_json_text(path.read_bytes(), str(path))
        if inventory is not None:
            plan.check_model(inventory)
        return plan

    def check_model(self, inventory) -> None:
        """Refuse a plan that does not describe this model completely and within its own budget: another
        fingerprint, layers or tensors the model does not have, MoE layers or tensors the plan leaves
        out, or tensors whose exact bytes exceed the plan's weight budget (a hand-edited plan). Runs
        before anything is written."""
        if inventory.fingerprint != self.model.fingerprint:
            raise PlanError(f"plan field 'model.fingerprint' is {self.model.fingerprint}, but this model's is "
                            f"{inventory.fingerprint}: the plan was made for another model (or another checkpoint "
                            "of it); re-run `moeplan solve` on this one")
        unknown = [n for n in self.tensors if n not in inventory]
        if unknown:
            raise PlanError(f"plan field 'tensors' names {len(unknown)} tensors this model does not have, "
                            f"e.g. {unknown[0]!r}")
        moe = list(inventory.moe_layers)
        by_layer = {l.layer: l for l in self.layers}
        extra = sorted(set(by_layer) - set(moe))
        if extra:
            raise PlanError(f"plan field 'layers' has layer {extra[0]}, which is not an MoE layer of this model "
                            f"(its MoE layers: {_ranges(moe)})")
        missing_layers = [l for l in moe if l not in by_layer]
        if missing_layers:
            raise PlanError(f"plan field 'layers' has no entry for MoE layer {missing_layers[0]} "
                            f"({len(missing_layers)} missing): the plan is incomplete; re-run `moeplan solve`")
        for layer in moe:
            n = len(inventory.experts_in_layer(layer))
            if by_layer[layer].n_experts != n:
                raise PlanError(f"plan field 'layers': layer {layer} says {by_layer[layer].n_experts} experts, the "
                                f"model has {n}")
        kept = {(l.layer, e) for l in self.layers for e in l.kept}
        needed, pruned_named = [], []
        for t in inventory:
            if not t.quantizable or (t.role is Role.ROUTER and t.layer in by_layer):
                continue
            if t.role is Role.ROUTED_EXPERT and (t.layer, t.expert) not in kept:
                if t.name in self.tensors:
                    pruned_named.append(t.name)
                continue
            if t.name not in self.tensors:
                needed.append(t.name)
        if needed:
            raise PlanError(f"plan field 'tensors' has no format for {len(needed)} tensors of this model, e.g. "
                            f"{needed[0]!r}: the plan is incomplete; re-run `moeplan solve`")
        if pruned_named:
            raise PlanError(f"plan field 'tensors' names {pruned_named[0]!r}, an expert the plan prunes "
                            f"({len(pruned_named)} such tensors): keep the expert or drop its tensors")
        if self.target == "gguf":
            kinds = sorted({t.kind for t in inventory if t.role is Role.ROUTED_EXPERT})
            want = {stacked_name(l, k) for l in moe for k in kinds}
            if set(self.stacked) != want:
                odd = sorted(set(self.stacked) ^ want)
                raise PlanError(f"plan field 'stacked' does not match this model's stacked expert tensors "
                                f"(e.g. {odd[0]!r}); re-run `moeplan solve --target gguf`")
        need = self.weight_bytes(inventory)
        if need > self.budget.weight_budget_bytes:
            raise PlanError(f"the plan's tensors take {need:,} bytes, more than its weight budget of "
                            f"{self.budget.weight_budget_bytes:,} (field 'budget.weight_budget_bytes'): the formats "
                            "were edited by hand? re-run `moeplan solve`, or solve for a larger --memory")
        if need != self.totals.weight_bytes:
            raise PlanError(f"the plan's tensors take {need:,} bytes but field 'totals.weight_bytes' says "
                            f"{self.totals.weight_bytes:,}: the plan was edited by hand; re-run `moeplan solve`")

    def weight_bytes(self, inventory) -> int:
        """The exact bytes this plan stores for `inventory`: every tensor in its format (with llama.cpp's
        row-length fallbacks for the plan's target), the fixed F32 tensors, and the router rows of the
        kept experts."""
        by_layer = {l.layer: l for l in self.layers}
        total = 0
        for t in inventory:
            if t.role is Role.ROUTER and t.layer in by_layer:
                lp = by_layer[t.layer]
                total += t.nbytes("F32") * len(lp.kept) // lp.n_experts
            elif not t.quantizable:
                total += t.nbytes("F32")
            elif t.name in self.tensors:
                total += t.nbytes(self.tensors[t.name], self.target, inventory.config)
        return total

    # ---- exports ----
    def llama_quantize_args(self) -> str:
        """llama-quantize arguments (one per line): a --tensor-type REGEX=TYPE per GGUF tensor and the
        metadata overrides for the expert counts. Use as
        `llama-quantize $(grep -v '^#' FILE) in-bf16.gguf out.gguf TYPE`. llama-quantize cannot remove
        experts: a plan that prunes is refused (PlanError); its GGUF comes from `moeplan materialize`."""
        if self.target != "gguf":
            uniform = all(len({self.tensors[n] for n in _expert_names_of(self, l)}) <= 1 for l in self.layers)
            counts = {len(l.kept) for l in self.layers}
            if not uniform or len(counts) > 1 or len({l.top_k for l in self.layers}) > 1:
                raise PlanError("this plan (target free) gives experts of one layer different formats, counts or "
                                "top-k, which a GGUF file cannot hold; solve with --target gguf")
        pruned = next((l for l in self.layers if len(l.kept) != l.n_experts), None)
        if pruned is not None:
            raise PlanError(f"this plan removes experts (layer {pruned.layer} keeps {len(pruned.kept)} of "
                            f"{pruned.n_experts}) and llama-quantize cannot: it keeps every expert tensor, so "
                            "its file would not load; write the GGUF with `moeplan materialize MODEL PLAN --gguf "
                            "OUT.gguf` instead")
        arch = gguf_arch(self.model.model_type)
        lines = [f"# moeplan plan for {self.model.model_type} (fingerprint {self.model.fingerprint}), target {self.target}",
                 "# usage: llama-quantize $(grep -v '^#' THIS_FILE) model-bf16.gguf model-out.gguf Q4_K"]
        if self.profile.synthetic:
            lines.append("# damage figures of this plan are SYNTHETIC (generated profile, not measured)")
        types: dict[str, str] = {}
        for name, f in self.tensors.items():
            for g in gguf_names(name, self.model.model_type):
                if "_exps." in g:
                    continue
                types[g] = f
        if self.stacked:
            types.update(self.stacked)
        else:  # free target with uniform experts: one type per stacked tensor
            for name, f in self.tensors.items():
                for g in gguf_names(name, self.model.model_type):
                    if "_exps." in g:
                        types[g] = f
        for g in sorted(types, key=tensor_order_key):
            lines.append(f"--tensor-type ^{re.escape(g)}$={types[g]}")
        if self.layers:
            lines.append(f"--override-kv {arch}.expert_count=int:{len(self.layers[0].kept)}")
            lines.append(f"--override-kv {arch}.expert_used_count=int:{self.layers[0].top_k}")
        return "\n".join(lines) + "\n"


class PlanError(ValueError):
    """A plan file that is malformed, or made for another model."""


def _explain(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors()[:20]:
        loc = ".".join(str(x) for x in err["loc"]) or "(plan)"
        lines.append(f"{source}: field '{loc}': {err['msg']}")
    more = len(exc.errors()) - 20
    if more > 0:
        lines.append(f"... and {more} more")
    return "\n".join(lines)


def _expert_names_of(plan: Plan, layer: LayerPlan) -> list[str]:
    pat = f"model.layers.{layer.layer}.mlp.experts."
    return [n for n in plan.tensors if n.startswith(pat)]


def _ranges(xs: list[int]) -> str:
    return f"{xs[0]}..{xs[-1]}" if xs and xs == list(range(xs[0], xs[-1] + 1)) else ", ".join(map(str, xs))


def schema() -> dict:
    """The plan's JSON schema (generated from the model above)."""
    s = Plan.model_json_schema()
    s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    s["$id"] = "https://moeplan/schema/plan.schema.json"
    return s


def schema_text() -> str:
    return json.dumps(schema(), indent=1, sort_keys=True) + "\n"


def validate_json_schema(obj) -> list[str]:
    """Errors of `obj` against the shipped schema file, each naming the field (empty: valid)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    return [f"field '{'.'.join(str(p) for p in e.absolute_path) or '(plan)'}': {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


# ---------------------------------------------------------------------------------------------
# from a solved problem

def make_plan(problem, assignment, report: dict, synthetic: bool | None = None) -> Plan:
    """The plan of `assignment` for `problem`, with the solver's `report` (Solution.report())."""
    p, a = problem, assignment
    tot = p.evaluate(a)
    synthetic = p.profile.synthetic if synthetic is None else synthetic
    tensors = {it.name: p.formats[int(f)] for it, f in zip(p.items, a.item_fmt)}
    stacked = {}
    layers = []
    for li, lay in enumerate(p.layers):
        kept = [int(e) for e in range(p.E) if a.keep[li, e]]
        layers.append(LayerPlan(layer=lay.layer, n_experts=lay.n_experts, kept=kept, top_k=int(a.topk[li])))
        for e in kept:
            for j, name in enumerate(lay.tensor_names[e]):
                tensors[name] = p.formats[int(a.expert_fmt[li, e, j])]
        if p.target is Target.GGUF and kept:
            for j, kind in enumerate(p.kinds):
                stacked[stacked_name(lay.layer, kind)] = p.formats[int(a.expert_fmt[li, kept[0], j])]
    rep = {k: v for k, v in report.items() if k in SolverReport.model_fields}
    return Plan(
        model=ModelRef(model_type=p.inventory.model_type, fingerprint=p.inventory.fingerprint,
                       source=str(p.inventory.source)),
        target=p.target.value, formats=list(p.formats), budget=BudgetSplit(**p.budget.to_json()),
        speed=SpeedTarget(**p.speed.to_json()) if p.speed is not None else None,
        profile=ProfileRef(fingerprint=p.profile.fingerprint, synthetic=bool(p.profile.synthetic),
                           label=str(p.profile.meta.get("label", "")) if p.profile.synthetic else ""),
        layers=layers, tensors=tensors, stacked=stacked, totals=PlanTotals(**tot.to_json()),
        damage=Damage(total=tot.damage, quantization=tot.damage_quant, pruning=tot.damage_prune, top_k=tot.damage_topk,
                      synthetic=bool(synthetic)),
        solver=SolverReport(**rep),
    )


def assignment_from_plan(problem, plan: Plan):
    """The plan as an assignment of `problem` (same model, target and a menu with its formats)."""
    import numpy as np

    p = problem
    if plan.model.fingerprint != p.inventory.fingerprint:
        raise PlanError("plan and problem are for different models")
    if plan.target != p.target.value:
        raise PlanError(f"plan target {plan.target} != problem target {p.target.value}")
    item_fmt = np.array([p.fmt_index(plan.tensors[it.name]) for it in p.items], dtype=np.int64)
    keep = np.zeros((p.L, p.E), dtype=bool)
    efmt = np.full((p.L, p.E, p.J), -1, dtype=np.int64)
    topk = np.zeros(p.L, dtype=np.int64)
    by_layer = {l.layer: l for l in plan.layers}
    for li, lay in enumerate(p.layers):
        lp = by_layer.get(lay.layer)
        if lp is None:
            raise PlanError(f"plan field 'layers' has no entry for MoE layer {lay.layer}")
        keep[li, lp.kept] = True
        topk[li] = lp.top_k
        for e in lp.kept:
            for j, name in enumerate(lay.tensor_names[e]):
                efmt[li, e, j] = p.fmt_index(plan.tensors[name])
    return Assignment(item_fmt, keep, efmt, topk)


if __name__ == "__main__":  # python -m moeplan.allocator.plan --write-schema
    if sys.argv[1:] == ["--write-schema"]:
        SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
        SCHEMA_PATH.write_text(schema_text())
        print(f"wrote {SCHEMA_PATH}")
    else:
        print("usage: python -m moeplan.allocator.plan --write-schema", file=sys.stderr)
        sys.exit(2)
