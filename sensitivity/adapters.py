"""Model adapters: how moeplan looks inside a transformers MoE model, one small class per family.

Supported families (``config.model_type``): deepseek_v3, qwen3_moe, qwen2_moe, mixtral, olmoe.

Expert storage (transformers 5). In memory every family keeps its routed experts fused in one
module ``layers.L.mlp.experts`` with two 3-D parameters:

    gate_up_proj  (E, 2*I, H)   rows [0, I) are expert e's gate_proj, rows [I, 2I) its up_proj
    down_proj     (E, H, I)

each slice in nn.Linear orientation (out_features, in_features). Checkpoints on disk (and what
``save_pretrained`` writes back) hold one tensor per expert. When loading, transformers'
conversion mapping (transformers/conversion_mapping.py) stacks the per-expert tensors along a new
axis 0 (``MergeModulelist(dim=0)``) and concatenates gate then up along axis 1
(``Concatenate(dim=1)``); saving reverts it. Checkpoint names per family:

    deepseek_v3, qwen3_moe, qwen2_moe, olmoe:
        model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight
    mixtral (its mapping also renames ``.block_sparse_moe.`` <-> ``.mlp.`` for the whole block):
        model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight    (w1 gate, w3 up, w2 down)
        model.layers.L.block_sparse_moe.gate.weight

The adapter speaks checkpoint names everywhere (``tensors()``, ``linear_tensors()``), so they match
the safetensors headers of HF checkpoints, and gives views into the fused storage for each expert.

Routing. Every family's router module (``mlp.gate``) returns ``(router_logits (T, E), weights (T, k),
indices (T, k))`` and the block passes weights and indices unchanged to ``mlp.experts``.
``record_routing``, the one routing recorder (profiler, reference-model training, tests), hooks
both: logits from the router's output (detached, or in the autograd graph for a balance loss),
indices and weights from the experts' input (exactly what the experts compute with), and optionally
per-expert statistics (tokens, routing-weight sums, REAP sums, and the sum of x**2 per input column
of gate/up and of down: the importance vectors of weighted quantization).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

import torch
from torch import nn

from moeplan.kernels.inventory import Role

__all__ = [
    "ExpertInputStats",
    "ExpertKind",
    "LayerRouting",
    "MoEAdapter",
    "RoutingRecord",
    "RoutingSpec",
    "ScoreFunction",
    "SharedExpert",
    "TensorRef",
    "TensorRole",
    "SUPPORTED_FAMILIES",
    "adapter_for",
    "record_routing",
]


class ScoreFunction(str, Enum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


# one set of tensor roles for the whole package: the inventory's
TensorRole = Role


class ExpertKind(str, Enum):
    GATE = "gate"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class RoutingSpec:
    """How one MoE layer turns router logits (T, E) into the experts a token uses."""

    score_function: ScoreFunction
    n_experts: int
    top_k: int
    norm_topk_prob: bool  # selected weights divided by their sum
    routed_scaling_factor: float = 1.0  # applied after normalization (DeepSeek)
    n_group: int = 1  # group-limited routing (DeepSeek): experts in n_group contiguous groups
    topk_group: int = 1  # groups a token may use
    has_correction_bias: bool = False  # DeepSeek's e_score_correction_bias: added for choice only


@dataclass(frozen=True)
class SharedExpert:
    mlp: nn.Module  # a dense gated MLP with gate_proj / up_proj / down_proj
    gate: nn.Module | None = None  # Qwen2-MoE scales its output by sigmoid(gate(x)), a (1, H) Linear


@dataclass(frozen=True)
class TensorRef:
    """One tensor of the model under its checkpoint name, with a getter and a setter.

    ``get()`` returns a view of the live storage (no copy); ``set(value)`` copies ``value`` into it
    (casting to the stored dtype). Routed-expert tensors are slices of the fused 3-D parameters.
    """

    name: str
    role: TensorRole
    shape: tuple[int, ...]
    dtype: torch.dtype
    layer: int | None = None
    expert: int | None = None
    kind: ExpertKind | None = None
    _get: Callable[[], torch.Tensor] = field(repr=False, compare=False, default=None)

    def get(self) -> torch.Tensor:
        return self._get()

    def set(self, value: torch.Tensor) -> None:
        _copy_checked(self._get(), value, self.name)


def _check_replacement(dst: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(dst.shape):
        raise ValueError(f"{what}: shape {tuple(value.shape)} does not match the stored {tuple(dst.shape)}")


def _copy_checked(dst: torch.Tensor, value: torch.Tensor, what: str) -> None:
    _check_replacement(dst, value, what)
    with torch.no_grad():
        dst.copy_(value)


# --------------------------------------------------------------------------------------------
# the adapter


class MoEAdapter:
    """Base adapter; a family subclass sets the class variables below (and little else)."""

    model_type: ClassVar[str]
    score_function: ClassVar[ScoreFunction] = ScoreFunction.SOFTMAX
    expert_count_attr: ClassVar[str]  # config attribute holding the routed-expert count
    shared_expert_attr: ClassVar[str | None] = None  # attribute of the MoE block
    shared_expert_gate_attr: ClassVar[str | None] = None
    checkpoint_mlp_name: ClassVar[str] = "mlp"  # name of the MoE block in checkpoint names
    checkpoint_expert_names: ClassVar[Mapping[ExpertKind, str]] = {
        ExpertKind.GATE: "gate_proj",
        ExpertKind.UP: "up_proj",
        ExpertKind.DOWN: "down_proj",
    }

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self._layers_name, self._layers = _find_decoder_layers(model)
        self._moe_layers = [i for i, layer in enumerate(self._layers) if _is_moe_block(getattr(layer, "mlp", None))]
        if not self._moe_layers:
            raise ValueError(f"{type(model).__name__}: no decoder layer has routed experts (mlp.experts.gate_up_proj)")
        for i in self._moe_layers:
            _check_expert_layout(self._experts(i), f"{self._layers_name}.{i}.mlp.experts")

    # ---- structure ---------------------------------------------------------------------------

    def moe_layers(self) -> list[int]:
        """Indices of the decoder layers with routed experts."""
        return list(self._moe_layers)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""
        return self._layers

    @property
    def layers_prefix(self) -> str:
        """Parameter-name prefix of the decoder layers ("model.layers")."""
        return self._layers_name

    def checkpoint_name(self, name: str, layer: int | None) -> str:
        """The checkpoint's name for the in-memory parameter `name` of decoder layer `layer`."""
        return self._checkpoint_name(name, layer)

    def n_layers(self) -> int:
        return len(self._layers)

    def n_experts(self, layer: int) -> int:
        experts = self._experts(layer)
        n = experts.gate_up_proj.shape[0]
        assert experts.num_experts == n == self.router(layer).weight.shape[0], "expert counts out of sync"
        return n

    def top_k(self, layer: int) -> int:
        return int(self.router(layer).top_k)

    def moe_block(self, layer: int) -> nn.Module:
        self._check_moe_layer(layer)
        return self._layers[layer].mlp

    def router(self, layer: int) -> nn.Module:
        """The gate module; its ``weight`` (E, H) gives the router logits x @ weight.T."""
        return self.moe_block(layer).gate

    def router_weight(self, layer: int) -> nn.Parameter:
        return self.router(layer).weight

    def experts_module(self, layer: int) -> nn.Module:
        return self._experts(layer)

    def e_score_correction_bias(self, layer: int) -> torch.Tensor | None:
        """DeepSeek's per-expert bias (E,), added to the scores for the choice only; None elsewhere."""
        return getattr(self.router(layer), "e_score_correction_bias", None)

    def shared_expert(self, layer: int) -> SharedExpert | None:
        if self.shared_expert_attr is None:
            return None
        block = self.moe_block(layer)
        gate = getattr(block, self.shared_expert_gate_attr) if self.shared_expert_gate_attr else None
        return SharedExpert(mlp=getattr(block, self.shared_expert_attr), gate=gate)

    def routing_spec(self, layer: int) -> RoutingSpec:
        r = self.router(layer)
        return RoutingSpec(
            score_function=self.score_function,
            n_experts=self.n_experts(layer),
            top_k=self.top_k(layer),
            norm_topk_prob=bool(getattr(r, "norm_topk_prob", True)),
            routed_scaling_factor=float(getattr(r, "routed_scaling_factor", 1.0)),
            n_group=int(getattr(r, "num_group", 1) or 1),
            topk_group=int(getattr(r, "topk_group", 1) or 1),
            has_correction_bias=self.e_score_correction_bias(layer) is not None,
        )

    # ---- expert weights --------------------------------------------------------------------

    def expert_weights(self, layer: int, expert: int) -> dict[ExpertKind, torch.Tensor]:
        """Views (no copies) of expert ``expert``'s weights, each (out_features, in_features):
        gate (I, H), up (I, H), down (H, I). Writing into them writes the model's storage."""
        experts = self._experts(layer)
        self._check_expert(layer, expert)
        inter = experts.down_proj.shape[-1]
        gate_up = experts.gate_up_proj.detach()[expert]  # (2I, H)
        return {
            ExpertKind.GATE: gate_up[:inter],
            ExpertKind.UP: gate_up[inter:],
            ExpertKind.DOWN: experts.down_proj.detach()[expert],  # (H, I)
        }

    def set_expert_weights(self, layer: int, expert: int, weights: Mapping[str | ExpertKind, torch.Tensor]) -> None:
        """Copy new values (e.g. dequantized weights) into expert ``expert``; keys: gate / up / down."""
        views = self.expert_weights(layer, expert)
        writes = []
        for key, value in weights.items():  # check everything before the first write
            try:
                kind = ExpertKind(key)
            except ValueError:
                raise KeyError(f"unknown expert weight {key!r}; use one of {[k.value for k in ExpertKind]}") from None
            _check_replacement(views[kind], value, f"layer {layer} expert {expert} {kind.value}")
            writes.append((views[kind], value))
        with torch.no_grad():
            for view, value in writes:
                view.copy_(value)

    # ---- every tensor under its checkpoint name ----------------------------------------------

    def tensors(self, layer: int | None = None) -> Iterator[TensorRef]:
        """Every tensor ``save_pretrained`` writes, under its checkpoint name, in module order
        (``layer``: those of that decoder layer only).

        The fused expert parameters expand to one entry per (expert, kind). Tied weights appear
        once (under the first name, as in the saved file); non-persistent buffers are skipped.
        """
        seen: set[int] = set()
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        experts_modules = {id(self._experts(i)) for i in self._moe_layers}
        if layer is None:
            modules = self.model.named_modules()
        else:
            modules = self._layers[layer].named_modules(prefix=f"{self._layers_name}.{layer}")
        for mod_name, module in modules:
            if id(module) in experts_modules:
                yield from self._expert_refs(self._layer_of(mod_name))
                continue
            for local, tensor in _own_tensors(module):
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                name = f"{mod_name}.{local}" if mod_name else local
                layer = self._layer_of(name)
                role = self._role(name, module, layer, head)
                yield TensorRef(
                    name=self._checkpoint_name(name, layer),
                    role=role,
                    shape=tuple(tensor.shape),
                    dtype=tensor.dtype,
                    layer=layer,
                    _get=tensor.detach,
                )

    def linear_tensors(self, layer: int | None = None) -> Iterator[TensorRef]:
        """The 2-D weights among ``tensors(layer)`` (what gets a quantization format)."""
        return (t for t in self.tensors(layer) if len(t.shape) == 2)

    def expert_tensor_name(self, layer: int, expert: int, kind: ExpertKind | str) -> str:
        kind = ExpertKind(kind)
        mlp = self.checkpoint_mlp_name
        return f"{self._layers_name}.{layer}.{mlp}.experts.{expert}.{self.checkpoint_expert_names[kind]}.weight"

    def _expert_refs(self, layer: int) -> Iterator[TensorRef]:
        for e in range(self.n_experts(layer)):
            views = self.expert_weights(layer, e)
            for kind in ExpertKind:
                view = views[kind]
                yield TensorRef(
                    name=self.expert_tensor_name(layer, e, kind),
                    role=TensorRole.ROUTED_EXPERT,
                    shape=tuple(view.shape),
                    dtype=view.dtype,
                    layer=layer,
                    expert=e,
                    kind=kind,
                    _get=(lambda layer=layer, e=e, kind=kind: self.expert_weights(layer, e)[kind]),
                )

    def _checkpoint_name(self, name: str, layer: int | None) -> str:
        if layer is None or layer not in self._moe_layers or self.checkpoint_mlp_name == "mlp":
            return name
        prefix = f"{self._layers_name}.{layer}.mlp."
        if name.startswith(prefix):
            return f"{self._layers_name}.{layer}.{self.checkpoint_mlp_name}." + name[len(prefix):]
        return name

    def _role(self, name: str, module: nn.Module, layer: int | None, head: nn.Module | None) -> TensorRole:
        if "norm" in type(module).__name__.lower():
            return TensorRole.NORM
        if isinstance(module, nn.Embedding):
            return TensorRole.EMBEDDING
        if head is not None and module is head:
            return TensorRole.HEAD
        if layer is not None:
            lp = f"{self._layers_name}.{layer}."
            rest = name[len(lp):]
            if rest.startswith("self_attn."):
                return TensorRole.ATTENTION
            if rest.startswith("mlp."):
                if layer not in self._moe_layers:
                    return TensorRole.DENSE_MLP
                sub = rest[len("mlp."):].split(".", 1)[0]
                if sub == "gate":
                    return TensorRole.ROUTER
                if sub in (self.shared_expert_attr, self.shared_expert_gate_attr):
                    return TensorRole.SHARED_EXPERT
        raise ValueError(
            f"{self.model_type} adapter has no role for tensor {name!r} ({type(module).__name__}); "
            "the model has a module the adapter does not know: extend MoEAdapter._role"
        )

    def _layer_of(self, name: str) -> int | None:
        prefix = self._layers_name + "."
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix):].split(".", 1)[0])

    # ---- routing --------------------------------------------------------------------------------

    def route(self, layer: int, logits: torch.Tensor, top_k: int | None = None,
              exclude: int | Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's selection rule applied to router logits (T, E): (weights (T, k), indices (T, k)).

        Same rule as the model's router (softmax or sigmoid scores, DeepSeek's correction bias and
        group limit, normalization, scaling) for what-if analyses with another ``top_k``; the
        order of the k columns may differ from the model's. ``exclude``: experts (an index or a
        sequence) that are never chosen, as if removed (softmax scores renormalize over the others;
        with group-limited routing the groups stay as they are, the experts' choice scores pushed
        down as by a -1e9 correction bias).
        """
        spec = self.routing_spec(layer)
        k = spec.top_k if top_k is None else top_k
        self._check_top_k(layer, k, spec)
        logits = logits.float()
        if exclude is not None:
            exclude = [int(exclude)] if isinstance(exclude, int) else [int(e) for e in exclude]
            for e in exclude:
                self._check_expert(layer, e)
        if spec.score_function is ScoreFunction.SOFTMAX:
            if exclude is not None:
                logits = logits.clone()
                logits[:, exclude] = float("-inf")
            scores = torch.softmax(logits, dim=-1)
            choice = scores
        else:
            scores = torch.sigmoid(logits)
            bias = self.e_score_correction_bias(layer)
            choice = scores + bias.float() if bias is not None else scores
            if exclude is not None:
                choice = choice.clone()
                choice[:, exclude] -= 1e9
        if spec.n_group > 1:
            t, e = choice.shape
            grouped = choice.view(t, spec.n_group, e // spec.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # (T, n_group): sum of each group's best two
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(spec.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(e // spec.n_group, dim=1), float("-inf"))
        indices = choice.topk(k, dim=-1).indices
        weights = scores.gather(1, indices)
        if spec.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * spec.routed_scaling_factor, indices

    def set_top_k(self, layer: int, k: int) -> None:
        """Activate ``k`` routed experts per token in ``layer`` only.

        The config's ``num_experts_per_tok`` follows when every MoE layer has the same k; with
        different k per layer it keeps its old value (transformers has no per-layer field).
        """
        self._check_top_k(layer, k, self.routing_spec(layer))
        self.router(layer).top_k = k
        block = self.moe_block(layer)
        if hasattr(block, "top_k"):  # Mixtral keeps a copy on the block
            block.top_k = k
        self._sync_config()

    def _check_top_k(self, layer: int, k: int, spec: RoutingSpec) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"layer {layer}: top-k must be a positive int, got {k!r}")
        reachable = spec.topk_group * (spec.n_experts // spec.n_group)
        if k > reachable:
            how = (
                f"topk_group={spec.topk_group} groups of {spec.n_experts // spec.n_group} experts"
                if spec.n_group > 1
                else f"{spec.n_experts} experts"
            )
            raise ValueError(f"layer {layer}: top-k {k} exceeds the {reachable} experts a token can reach ({how})")

    # ---- pruning ---------------------------------------------------------------------------------

    def remove_experts(self, layer: int, keep: Sequence[int]) -> list[int]:
        """Physically remove every routed expert of ``layer`` not in ``keep``.

        Slices the fused expert tensors, the router rows and (DeepSeek) the correction bias, and
        updates the modules' counts; kept experts are renumbered 0..len(keep)-1 in ascending order
        of their old index, which is returned. The config's expert count follows when every MoE
        layer has the same count. Softmax routers renormalize over the kept experts: without
        ``norm_topk_prob`` a token's weights grow by 1 / (1 - removed experts' probability).
        """
        kept = self._validated_keep(layer, keep)
        experts, gate = self._experts(layer), self.router(layer)
        idx = torch.tensor(kept, dtype=torch.long, device=experts.gate_up_proj.device)
        with torch.no_grad():
            for module, pname in ((experts, "gate_up_proj"), (experts, "down_proj"), (gate, "weight")):
                old = getattr(module, pname)
                sliced = old.detach().index_select(0, idx.to(old.device)).contiguous()
                setattr(module, pname, nn.Parameter(sliced, requires_grad=old.requires_grad))
            bias = self.e_score_correction_bias(layer)
            if bias is not None:
                gate.e_score_correction_bias = bias.index_select(0, idx.to(bias.device)).contiguous()
        experts.num_experts = len(kept)
        gate.num_experts = len(kept)
        self._sync_config()
        return kept

    def _validated_keep(self, layer: int, keep: Sequence[int]) -> list[int]:
        n = self.n_experts(layer)
        try:
            kept = sorted(int(e) for e in keep)
        except (TypeError, ValueError):
            raise TypeError(f"layer {layer}: keep must be a sequence of expert indices, got {keep!r}") from None
        if len(set(kept)) != len(kept):
            raise ValueError(f"layer {layer}: keep lists an expert twice: {kept}")
        bad = [e for e in kept if not 0 <= e < n]
        if bad:
            raise ValueError(f"layer {layer}: experts {bad} out of range; the layer has {n} experts (0..{n - 1})")
        spec = self.routing_spec(layer)
        if spec.n_group > 1:
            size = n // spec.n_group
            per_group = [sum(1 for e in kept if g * size <= e < (g + 1) * size) for g in range(spec.n_group)]
            if len(set(per_group)) != 1:
                detail = ", ".join(f"group {g} (experts {g * size}..{(g + 1) * size - 1}): {c}" for g, c in enumerate(per_group))
                raise ValueError(
                    f"layer {layer}: group-limited routing needs the same number of kept experts in each of the "
                    f"{spec.n_group} groups, got {detail}"
                )
            if per_group[0] < 2:
                raise ValueError(
                    f"layer {layer}: each of the {spec.n_group} groups must keep at least 2 experts "
                    f"(a group's score is the sum of its best two), got {per_group[0]}"
                )
            reachable = spec.topk_group * per_group[0]
        else:
            reachable = len(kept)
        if reachable < spec.top_k:
            raise ValueError(
                f"layer {layer}: keeping {len(kept)} experts leaves {reachable} reachable per token, fewer than "
                f"top-k {spec.top_k}; lower it with set_top_k first"
            )
        return kept

    def _sync_config(self) -> None:
        counts = {self.n_experts(i) for i in self._moe_layers}
        ks = {self.top_k(i) for i in self._moe_layers}
        if len(counts) == 1:
            setattr(self.config, self.expert_count_attr, counts.pop())
            if hasattr(self.model, "num_experts"):  # CausalLM copies for the auxiliary loss
                self.model.num_experts = getattr(self.config, self.expert_count_attr)
        if len(ks) == 1:
            self.config.num_experts_per_tok = ks.pop()
            if hasattr(self.model, "num_experts_per_tok"):
                self.model.num_experts_per_tok = self.config.num_experts_per_tok

    # ---- helpers ------------------------------------------------------------------------------

    def _check_moe_layer(self, layer: int) -> None:
        if layer not in self._moe_layers:
            raise ValueError(f"layer {layer} has no routed experts; MoE layers are {self._moe_layers}")

    def _check_expert(self, layer: int, expert: int) -> None:
        n = self._experts(layer).gate_up_proj.shape[0]
        if not 0 <= expert < n:
            raise IndexError(f"layer {layer}: expert {expert} out of range (0..{n - 1})")

    def _experts(self, layer: int) -> nn.Module:
        self._check_moe_layer(layer)
        return self._layers[layer].mlp.experts


def _find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n in ("layers", "model.layers")]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: expected one decoder ModuleList at model.layers, found {[n for n, _ in found]}")
    return found[0]


def _is_experts_module(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3


def _is_moe_block(mlp: nn.Module | None) -> bool:
    experts = getattr(mlp, "experts", None)
    return isinstance(experts, nn.Module) and _is_experts_module(experts) and hasattr(mlp, "gate")


def _check_expert_layout(experts: nn.Module, name: str) -> None:
    layout = {
        "is_transposed": getattr(experts, "is_transposed", False),
        "is_concatenated": getattr(experts, "is_concatenated", True),
        "has_gate": getattr(experts, "has_gate", True),
        "has_bias": getattr(experts, "has_bias", False),
    }
    if layout != {"is_transposed": False, "is_concatenated": True, "has_gate": True, "has_bias": False}:
        raise ValueError(
            f"{name}: expert layout {layout} is not supported; the adapters handle gate_up_proj (E, 2I, H) "
            "with gate rows before up rows, down_proj (E, H, I), no biases"
        )


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's own parameters and persistent buffers (what its state_dict holds)."""
    for name, p in module.named_parameters(recurse=False):
        yield name, p
    for name, b in module.named_buffers(recurse=False):
        if b is not None and name not in module._non_persistent_buffers_set:
            yield name, b


# --------------------------------------------------------------------------------------------
# families


class DeepseekV3Adapter(MoEAdapter):
    model_type = "deepseek_v3"
    score_function = ScoreFunction.SIGMOID
    expert_count_attr = "n_routed_experts"
    shared_expert_attr = "shared_experts"


class Qwen3MoeAdapter(MoEAdapter):
    model_type = "qwen3_moe"
    expert_count_attr = "num_experts"


class Qwen2MoeAdapter(MoEAdapter):
    model_type = "qwen2_moe"
    expert_count_attr = "num_experts"
    shared_expert_attr = "shared_expert"
    shared_expert_gate_attr = "shared_expert_gate"


class MixtralAdapter(MoEAdapter):
    model_type = "mixtral"
    expert_count_attr = "num_local_experts"
    checkpoint_mlp_name = "block_sparse_moe"
    checkpoint_expert_names = {ExpertKind.GATE: "w1", ExpertKind.UP: "w3", ExpertKind.DOWN: "w2"}


class OlmoeAdapter(MoEAdapter):
    model_type = "olmoe"
    expert_count_attr = "num_experts"


_FAMILIES: dict[str, type[MoEAdapter]] = {
    cls.model_type: cls for cls in (DeepseekV3Adapter, Qwen3MoeAdapter, Qwen2MoeAdapter, MixtralAdapter, OlmoeAdapter)
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def adapter_for(model: nn.Module) -> MoEAdapter:
    """The adapter for ``model``'s family, chosen by ``model.config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"no moeplan adapter for model_type {model_type!r} ({type(model).__name__}); "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return _FAMILIES[model_type](model)


# --------------------------------------------------------------------------------------------
# routing and expert-input recording: the one recorder (profiler, training, tests)


@dataclass
class LayerRouting:
    """What one MoE layer did for every token seen, in call order (T tokens in all)."""

    score_function: ScoreFunction
    indices: torch.Tensor  # (T, k) int64: experts the token was sent to
    weights: torch.Tensor  # (T, k) float32: factors the experts' outputs were multiplied by
    logits: torch.Tensor | None  # (T, E) float32: router logits, None unless kept

    @property
    def scores(self) -> torch.Tensor:
        """Full router scores (T, E): softmax or sigmoid of the logits (before any correction bias)."""
        if self.logits is None:
            raise ValueError("router logits were not kept: record with keep_logits=True")
        if self.score_function is ScoreFunction.SOFTMAX:
            return torch.softmax(self.logits, dim=-1)
        return torch.sigmoid(self.logits)

    def counts(self, n_experts: int) -> torch.Tensor:
        """(E,) how many tokens selected each expert."""
        return torch.bincount(self.indices.reshape(-1), minlength=n_experts)

    def weight_sums(self, n_experts: int) -> torch.Tensor:
        """(E,) float64: the sum of the routing weights of the tokens that selected each expert, added
        one (token, slot) at a time in call order."""
        sums = torch.zeros(n_experts, dtype=torch.float64, device=self.weights.device)
        return sums.index_add_(0, self.indices.reshape(-1), self.weights.reshape(-1).double())


@dataclass
class ExpertInputStats:
    """Per-expert statistics of one MoE layer, over the tokens routed to each expert. Each call adds
    its sums per expert (in float32, over the call's tokens) to float64 totals."""

    tokens: torch.Tensor  # (E,) float64: tokens routed to the expert
    sum_sq_in: torch.Tensor  # (E, H) float64: sum of x**2 of the gate/up input, per column
    sum_sq_mid: torch.Tensor | None  # (E, I) float64: same for the down input act(gate(x)) * up(x)
    weight_sum: torch.Tensor | None = None  # (E,) float64: sum of the routing weights of those tokens
    reap_sum: torch.Tensor | None = None  # (E,) float64: sum of weight * ||expert output|| (REAP), with reap=True
    gram_in: torch.Tensor | None = None  # (E, H, H) float64: sum of x x^T of the gate/up input, with importance='gram'
    gram_mid: torch.Tensor | None = None  # (E, I, I) float64: same for the down input, with importance='gram'
    seen: int = 0  # tokens the layer saw, routed to any expert

    def mean_sq_in(self) -> torch.Tensor:
        """(E, H) importance vectors of gate_proj / up_proj (zero rows for unused experts)."""
        return self.sum_sq_in / self.tokens.clamp(min=1).unsqueeze(1)

    def mean_sq_mid(self) -> torch.Tensor:
        """(E, I) importance vectors of down_proj."""
        if self.sum_sq_mid is None:
            raise ValueError("down_proj inputs were not recorded: record with importance='gate_up_down'")
        return self.sum_sq_mid / self.tokens.clamp(min=1).unsqueeze(1)


class RoutingRecord:
    """Filled by ``record_routing`` while its hooks are on; read ``routing(layer)`` and
    ``stats(layer)``. A context manager (the hooks come off at its end), or ``close()`` them."""

    def __init__(self, adapter: MoEAdapter, keep_logits: bool, importance: str | None, device: torch.device | str,
                 logits_grad: bool = False, reap: bool = False, layers: Sequence[int] | None = None,
                 inputs: bool = False):
        self.adapter = adapter
        moe = adapter.moe_layers()
        self._layers = list(moe) if layers is None else [int(l) for l in layers]
        if not_moe := [l for l in self._layers if l not in moe]:
            raise ValueError(f"layer {not_moe[0]} has no routed experts; MoE layers are {moe}")
        self.inputs = inputs
        self.keep_logits = keep_logits
        self.logits_grad = logits_grad
        self.importance = importance
        self.reap = reap
        self.device = torch.device(device)
        self._handles: list = []
        self.reset()

    def layers(self) -> list[int]:
        return list(self._layers)

    def reset(self) -> None:
        """Forget everything recorded so far (the hooks stay on)."""
        self._indices: dict[int, list[torch.Tensor]] = {i: [] for i in self._layers}
        self._weights: dict[int, list[torch.Tensor]] = {i: [] for i in self._layers}
        self._logits: dict[int, list[torch.Tensor]] = {i: [] for i in self._layers}
        self._inputs: dict[int, list[tuple[torch.Tensor, ...]]] = {i: [] for i in self._layers}
        self._stats: dict[int, ExpertInputStats] = {}

    def _check_recorded(self, layer: int) -> None:
        if layer not in self._indices:
            raise ValueError(f"layer {layer} has no routed experts; MoE layers are {self.layers()}")
        if not self._indices[layer]:
            raise ValueError(f"layer {layer}: no forward pass was recorded")

    def routing(self, layer: int) -> LayerRouting:
        self._check_recorded(layer)
        return LayerRouting(
            score_function=self.adapter.score_function,
            indices=torch.cat(self._indices[layer]),
            weights=torch.cat(self._weights[layer]),
            logits=torch.cat(self._logits[layer]) if self.keep_logits else None,
        )

    def expert_inputs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)): the experts module's inputs as
        it received them (dtype and device kept, not detached), the passes concatenated; with
        ``inputs=True``."""
        if not self.inputs:
            raise ValueError("the experts' inputs were not kept: record with inputs=True")
        self._check_recorded(layer)
        return tuple(torch.cat([t.reshape(-1, t.shape[-1]) for t in parts])
                     for parts in zip(*self._inputs[layer]))

    def stats(self, layer: int) -> ExpertInputStats:
        if self.importance is None:
            raise ValueError("expert inputs were not recorded: record with importance='gate_up' or 'gate_up_down'")
        if layer not in self._stats:
            raise ValueError(f"layer {layer}: no forward pass was recorded (MoE layers are {self.layers()})")
        return self._stats[layer]

    # hooks

    def _attach(self) -> None:
        for layer in self._layers:
            self._handles.append(self.adapter.router(layer).register_forward_hook(
                lambda mod, args, out, layer=layer: self._on_router(layer, out)))

            def pre_hook(mod, args, kwargs, layer=layer):
                self._on_experts(layer, mod, *_experts_args(args, kwargs))

            self._handles.append(self.adapter.experts_module(layer).register_forward_pre_hook(pre_hook,
                                                                                               with_kwargs=True))

    def close(self) -> None:
        """Take the hooks off (what was recorded stays readable)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> RoutingRecord:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_router(self, layer: int, output) -> None:
        if not (isinstance(output, tuple) and len(output) == 3):
            raise ValueError(f"layer {layer}: the router returns {type(output).__name__}, not (logits, weights, "
                             "indices); moeplan cannot record or re-route this family's routing")
        if self.keep_logits:
            logits = output[0] if self.logits_grad else output[0].detach()
            self._logits[layer].append(logits.float().to(self.device))

    def _on_experts(self, layer: int, module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
        if self.inputs:
            self._inputs[layer].append((hidden, index, weights))
        self._indices[layer].append(index.detach().to(self.device, torch.long))
        self._weights[layer].append(weights.detach().float().to(self.device))
        if self.importance is None:
            return
        with torch.no_grad():
            x = hidden.detach().reshape(-1, hidden.shape[-1]).float()  # (T, H)
            index = index.reshape(x.shape[0], -1)
            weights = weights.detach().reshape(x.shape[0], -1).float()
            st = self._stats.get(layer)
            if st is None:
                n_exp, inter = module.gate_up_proj.shape[0], module.down_proj.shape[-1]
                z = dict(dtype=torch.float64, device=x.device)
                mid = self.importance in ("gate_up_down", "gram")
                gram = self.importance == "gram"
                st = self._stats[layer] = ExpertInputStats(
                    tokens=torch.zeros(n_exp, **z),
                    sum_sq_in=torch.zeros(n_exp, x.shape[1], **z),
                    sum_sq_mid=torch.zeros(n_exp, inter, **z) if mid else None,
                    weight_sum=torch.zeros(n_exp, **z),
                    reap_sum=torch.zeros(n_exp, **z) if self.reap else None,
                    gram_in=torch.zeros(n_exp, x.shape[1], x.shape[1], **z) if gram else None,
                    gram_mid=torch.zeros(n_exp, inter, inter, **z) if gram else None,
                )
            st.seen += x.shape[0]
            for e in torch.unique(index).tolist():
                tok, slot = torch.nonzero(index == e, as_tuple=True)  # the tokens routed to e, in order
                xe = x[tok]
                we = weights[tok, slot]
                st.tokens[e] += tok.numel()
                st.weight_sum[e] += we.sum().item()
                st.sum_sq_in[e] += (xe * xe).sum(0).double()
                if st.gram_in is not None:
                    st.gram_in[e] += (xe.T @ xe).double()
                if st.sum_sq_mid is None:
                    continue
                w = self.adapter.expert_weights(layer, e)
                mid = module.act_fn(xe @ w[ExpertKind.GATE].float().T) * (xe @ w[ExpertKind.UP].float().T)  # (T_e, I)
                if st.reap_sum is not None:
                    out = mid @ w[ExpertKind.DOWN].float().T  # (T_e, H): the expert's output
                    st.reap_sum[e] += (we * out.norm(dim=-1)).sum().item()
                st.sum_sq_mid[e] += (mid * mid).sum(0).double()
                if st.gram_mid is not None:
                    st.gram_mid[e] += (mid.T @ mid).double()


_IMPORTANCE_MODES = (None, "gate_up", "gate_up_down", "gram")


def record_routing(
    model: nn.Module,
    *,
    keep_logits: bool = True,
    importance: str | None = None,
    device: torch.device | str = "cpu",
    logits_grad: bool = False,
    reap: bool = False,
    layers: Sequence[int] | None = None,
    inputs: bool = False,
) -> RoutingRecord:
    """Record, for every MoE layer and every token of the forward passes run while the hooks are on
    (``with record_routing(model) as rec:``, or until ``rec.close()``), the selected experts and their
    weights (and the router logits when ``keep_logits``).

    ``logits_grad``: the logits are kept as the router computed them, in the autograd graph (for a
    loss on the routing, such as DeepSeek-V3's sequence-wise balance loss); otherwise detached.
    ``importance='gate_up'`` also accumulates, per expert, the number of tokens routed to it, the sum
    of their routing weights and the sum of x**2 per input column; ``'gate_up_down'`` adds the same
    for the down_proj input, recomputing act(gate(x)) * up(x) for the expert's tokens (about the cost
    of the experts' own gate/up projection); ``'gram'`` adds to those the whole second moments,
    sum x x^T of both inputs per expert (E (H^2 + I^2) float64s per layer; kernels.refine's input);
    ``reap`` (with 'gate_up_down') adds the sum of
    weight * ||expert output|| (REAP). Routing tensors are stored on ``device``; the input
    statistics stay on the activations' device. ``layers``: only these MoE layers (default: every
    one). ``inputs``: also keep the experts' inputs as they were passed (``expert_inputs``; the
    layer-streaming profiler re-runs a layer's experts on them).
    """
    if importance not in _IMPORTANCE_MODES:
        raise ValueError(f"importance must be one of {_IMPORTANCE_MODES}, got {importance!r}")
    if logits_grad and not keep_logits:
        raise ValueError("logits_grad=True keeps the router logits: it needs keep_logits=True")
    if reap and importance not in ("gate_up_down", "gram"):
        raise ValueError("reap=True needs the down_proj inputs: record with importance='gate_up_down'")
    adapter = model if isinstance(model, MoEAdapter) else adapter_for(model)
    record = RoutingRecord(adapter, keep_logits, importance, device, logits_grad, reap, layers, inputs)
    try:
        record._attach()
    except BaseException:
        record.close()
        raise
    return record


def _experts_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
    return tuple(values)  # type: ignore[return-value]
