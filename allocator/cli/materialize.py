"""Materialize a plan: the compressed model as GGUF (llama.cpp) and/or safetensors (transformers).

    moeplan materialize MODEL plan.json --gguf OUT.gguf [--hf OUTDIR]

The plan is checked against the model (fingerprint) before anything is written. Both outputs are
written to temporary paths next to the destination and renamed at the end, so an interrupted run
leaves no partial output.

GGUF: quantized with moeplan's kernels by kernels.gguf_export (needs a `gguf`-target plan: llama.cpp
has one type per stacked expert tensor, one expert count and one top-k).
safetensors: the dequantized weights of the compressed model (pruned experts removed) in float32 --
exactly the values the quantized model computes with -- read, quantized and written one checkpoint
tensor at a time (never the whole model in memory), plus the per-layer top-k and kept experts
under the config's "moeplan" key. `load_compressed(OUTDIR)` reloads it (it is also a plain
`from_pretrained` checkpoint when every MoE layer keeps the same number of experts and top-k).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeplan.allocator.plan import Plan
from moeplan.kernels.checkpoint import Checkpoint, write_safetensors
from moeplan.kernels.formats import resolve
from moeplan.kernels.gguf_export import write_gguf
from moeplan.kernels.gguf_layout import KvBSplit
from moeplan.kernels.inventory import (
    EXPERT_RE,
    FUSED_EXPERT_RE,
    Target,
    build_inventory,
    check_config_matches,
    checkpoint_shards,
    resolve_model,
)
from moeplan.kernels.outputs import check_output, output_dir
from moeplan.kernels.refine import refinable
from moeplan.sensitivity.importance import importance_vectors

from .args import Command, read_text_arg


@dataclass
class MaterializeReport:
    gguf: Any = None  # kernels.gguf_export.GGUFReport
    hf_dir: Path | None = None
    predicted_bytes: int | None = None
    refined: int = 0  # routed expert matrices refined for their inputs' grams (--refine)
    notes: list[str] = field(default_factory=list)


def materialize(model: str | os.PathLike, plan, *, gguf_out: str | os.PathLike | None = None,
                hf_out: str | os.PathLike | None = None, importance_file: str | os.PathLike | None = None,
                progress: bool = True, refine: bool = False, refine_text: str | os.PathLike | None = None,
                refine_tokens: int | None = None) -> MaterializeReport:
    """Write the compressed model of `plan` (a Plan or a plan file) for checkpoint `model`.

    `refine`: the routed experts' matrices in a format kernels.refine improves (IQ1_S, IQ2_XXS) are refined for
    the gram of their inputs, measured on `refine_text` (a text file; default the checkpoint's
    calib.txt), its first `refine_tokens` tokens (default GRAM_TOKENS), with the float model in memory."""
    if gguf_out is None and hf_out is None:
        raise ValueError("nothing to write: give gguf_out and/or hf_out")
    if gguf_out is not None:  # every output path is checked before any work
        check_output(gguf_out, "--gguf")
    if hf_out is not None:
        check_output(hf_out, "--hf", directory=True)
    if not refine and (refine_text is not None or refine_tokens is not None):
        raise ValueError("--refine-text / --refine-tokens set how --refine measures its grams: add --refine")
    model_dir = resolve_model(model)
    if not model_dir.is_dir():
        raise ValueError(f"materializing needs weights: {model_dir} is not a checkpoint directory")
    inv = build_inventory(model_dir)
    check_config_matches(inv)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan, inv)
    plan.check_model(inv)
    if gguf_out is not None and plan.target != "gguf":
        raise ValueError(
            f"the plan's target is {plan.target!r}: llama.cpp stores one type per stacked expert tensor and one "
            "expert count, which only a plan solved with --target gguf guarantees; re-solve with --target gguf "
            "or write --hf only"
        )
    _, importance = importance_vectors(model_dir, importance_file or None, "--importance")
    report = MaterializeReport(predicted_bytes=plan.totals.weight_bytes)
    grams = None
    if refine:
        grams, few = _refinement_grams(model_dir, plan, refine_text, refine_tokens, progress)
        if few:
            report.notes.append(f"{few} expert matrices saw fewer calibration tokens than they have columns and were "
                                "not refined (their gram is singular); more --refine-tokens reach them")
    if gguf_out is not None:
        top_k = {l.top_k for l in plan.layers}
        report.gguf = write_gguf(
            model_dir, gguf_out, dict(plan.tensors),
            kept_experts={l.layer: list(l.kept) for l in plan.layers},
            top_k=top_k.pop() if top_k else None, importance=importance, progress=progress, grams=grams)
        report.refined = report.gguf.refined
    if hf_out is not None:
        refined: list[str] = []
        report.hf_dir = write_hf(model_dir, plan, hf_out, importance, grams, refined)
        if gguf_out is not None and len(refined) != report.refined:
            raise AssertionError(f"--refine: the GGUF writer refined {report.refined} matrices, the safetensors one "
                                 f"{len(refined)}")
        report.refined = len(refined)
    if grams and report.refined != len(grams):  # a writer that did not find a matrix by its gram's name
        raise AssertionError(f"--refine: {report.refined} of the {len(grams)} matrices with a gram were refined")
    return report


def _refinement_grams(model_dir: Path, plan, text, tokens: int | None, progress: bool) -> tuple[dict, int]:
    """(routed expert tensor name -> its inputs' gram, for the plan's expert matrices in a refinable
    format whose gram was measured on at least as many tokens as the matrix has columns; how many
    were left out for fewer: their gram is singular, and they stay as the quantizer writes them)."""
    from moeplan.sensitivity.grams import GRAM_TOKENS, expert_input_grams

    text_value = None if text is None else read_text_arg(str(text), "--refine-text")
    wanted = {name: fmt for name, fmt in plan.tensors.items() if EXPERT_RE.search(name)}
    if not any(refinable(fmt) for fmt in wanted.values()):
        return {}, 0
    grams = expert_input_grams(model_dir, text_value, tokens=GRAM_TOKENS if tokens is None else tokens,
                               progress=progress)
    fit = {name: g for name, g in grams.items() if name in wanted and refinable(resolve(wanted[name], g.gram.shape[0]))}
    kept = {name: g.gram for name, g in fit.items() if g.tokens >= g.gram.shape[0]}
    return kept, len(fit) - len(kept)


def write_hf(model_dir: Path, plan, out_dir: str | os.PathLike, importance=None, grams=None,
             refined: list | None = None) -> Path:
    """The compressed model as a transformers checkpoint (float32 dequantized weights), streamed: one
    checkpoint tensor is read, pruned, quantized and dequantized, and written at a time, so the
    process holds about one tensor, never the model. The values are those of `apply_decision` on the
    loaded model (tests check the logits are identical)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from moeplan.sensitivity.adapters import ExpertKind, adapter_for
    from moeplan.sensitivity.compress import (
        Decision,
        prune_and_set_top_k,
        quantize_dequantize,
        quantize_dequantize_kv_b,
    )

    out_dir = check_output(out_dir, "--hf", directory=True)
    decision = Decision.from_plan(plan)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    # the architecture on the meta device: names, counts and the config after pruning, no weights
    hf_config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_config)
    ad = adapter_for(meta)
    module_names = {id(m): n for n, m in meta.named_modules()}
    kept = {layer: sorted(decision.kept_experts.get(layer, range(ad.n_experts(layer)))) for layer in ad.moe_layers()}
    routers = {}  # checkpoint name of a router weight / correction bias -> the kept rows
    for layer in ad.moe_layers():
        gate = ad.checkpoint_name(module_names[id(ad.router(layer))], layer)
        routers[f"{gate}.weight"] = routers[f"{gate}.e_score_correction_bias"] = kept[layer]
    prune_and_set_top_k(ad, kept, decision.top_k)
    gguf_target = Target(decision.target) is Target.GGUF

    def compress(name: str, w: torch.Tensor) -> torch.Tensor:
        fmt = decision.formats.get(name)
        if fmt is None:
            return w
        imp = None if importance is None else importance.get(name)
        if gguf_target and KvBSplit.applies(name, config):
            return quantize_dequantize_kv_b(w, fmt, config, imp, name)
        gram = None if grams is None else grams.get(name)
        if gram is not None and refined is not None and refinable(resolve(fmt, w.shape[-1])):
            refined.append(name)
        return quantize_dequantize(w, fmt, imp, name, gram)

    ckpt = Checkpoint(Path(model_dir), config)
    specs = []  # (output name, shape, producer)
    for name in ckpt.names():
        if EXPERT_RE.search(name) or FUSED_EXPERT_RE.search(name) or name.endswith("_scale_inv"):
            continue  # experts below; FP8 scales are folded into the float32 weights
        shape = ckpt.shape(name)
        if name in routers:
            shape = (len(routers[name]), *shape[1:])
        specs.append((name, shape, lambda name=name: _router_rows(compress(name, ckpt.read(name).float()),
                                                                    routers.get(name))))
    for layer in ad.moe_layers():
        prefix = ad.expert_tensor_name(layer, 0, ExpertKind.GATE).split(".experts.")[0] + ".experts"
        for new, old in enumerate(kept[layer]):
            for kind in ExpertKind:
                src = ad.expert_tensor_name(layer, old, kind)
                ckpt_kind = ad.checkpoint_expert_names[kind]
                rows, cols = ad.expert_weights(layer, new)[kind].shape
                specs.append((ad.expert_tensor_name(layer, new, kind), (rows, cols),
                              lambda src=src, pre=prefix, old=old, ck=ckpt_kind: compress(src, ckpt.expert(pre, old, ck).float())))

    try:
        with output_dir(out_dir, "--hf") as tmp:
            write_safetensors(tmp / "model.safetensors", [(n, "F32", s, p) for n, s, p in specs])
            meta.config.moeplan = {
                "plan_fingerprint": plan.model.fingerprint,
                "target": plan.target,
                "layers": {str(l.layer): {"kept": list(l.kept), "top_k": l.top_k} for l in plan.layers},
            }
            meta.config.dtype = "float32"
            meta.config.save_pretrained(str(tmp))
            if (Path(model_dir) / "generation_config.json").exists():
                shutil.copy2(Path(model_dir) / "generation_config.json", tmp / "generation_config.json")
            try:
                AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(tmp))
            except (OSError, ValueError):
                pass  # a checkpoint without a tokenizer stays without one
    finally:
        ckpt.close()
    return out_dir


def _router_rows(w, rows):
    return w if rows is None or len(rows) == w.shape[0] else w[rows].contiguous()


def load_compressed(path: str | os.PathLike, dtype=None):
    """Load a checkpoint written by write_hf, restoring per-layer expert counts and top-k."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from moeplan.sensitivity.adapters import adapter_for
    from moeplan.sensitivity.compress import prune_and_set_top_k

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    layers = {int(k): v for k, v in (cfg.get("moeplan") or {}).get("layers", {}).items()}
    counts = {len(v["kept"]) for v in layers.values()}
    if len(counts) <= 1:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    else:
        # per-layer expert counts: build with the checkpoint's largest count, shrink each layer, then load
        config = AutoConfig.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        ad = adapter_for(model)
        shapes = {}  # layer -> the first len(kept) / groups experts of every group: the right shapes
        for layer, v in layers.items():
            n, groups = ad.n_experts(layer), ad.routing_spec(layer).n_group
            per, keep_per = n // groups, len(v["kept"]) // groups
            shapes[layer] = [g * per + i for g in range(groups) for i in range(keep_per)]
        prune_and_set_top_k(ad, shapes, {layer: v["top_k"] for layer, v in layers.items()})
        state = {}
        for shard in checkpoint_shards(path):
            state.update(load_file(str(shard)))
        # experts stored one tensor each on disk go into the fused in-memory tensors
        from moeplan.sensitivity.adapters import ExpertKind

        filled = set()
        for layer in ad.moe_layers():
            for e in range(ad.n_experts(layer)):
                names = {k: ad.expert_tensor_name(layer, e, k) for k in ExpertKind}
                if all(n in state for n in names.values()):
                    ad.set_expert_weights(layer, e, {k: state.pop(n) for k, n in names.items()})
                    filled.add(layer)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{path}: unexpected tensors {unexpected[:3]}")
        prefixes = tuple(f"{ad.expert_tensor_name(l, 0, 'gate').split('.experts.')[0]}.experts." for l in filled)
        missing = [k for k in missing if not k.startswith(prefixes)]
        if missing:
            raise ValueError(f"{path}: tensors missing from the checkpoint: {missing[:3]}")
    ad = adapter_for(model)
    for layer, v in layers.items():
        if ad.top_k(layer) != v["top_k"]:
            ad.set_top_k(layer, v["top_k"])
    return model.eval()


# ---- CLI -------------------------------------------------------------------------------------

def _args(ap) -> None:
    ap.add_argument("model", metavar="MODEL", help="checkpoint directory or a shipped reference model name")
    ap.add_argument("plan", metavar="PLAN", help="plan JSON from `moeplan solve`")
    ap.add_argument("--gguf", metavar="OUT.gguf", help="write a GGUF file for llama.cpp (needs a gguf-target plan)")
    ap.add_argument("--hf", metavar="OUTDIR", help="write a transformers checkpoint (dequantized weights)")
    ap.add_argument("--importance", metavar="FILE", help="importance vectors: a .safetensors from `moeplan profile` "
                    "or a llama-imatrix file (GGUF or legacy .dat) (default: the model's shipped "
                    "profile.importance.safetensors, if any)")
    ap.add_argument("--refine", action="store_true",
                    help="refine the routed experts' IQ1_S / IQ2_XXS matrices for their inputs' whole second moment on "
                    "calibration text, not only its diagonal (the importance): lower KL divergence, same types "
                    "and sizes; runs the float model over the text (needs it in memory)")
    ap.add_argument("--refine-text", metavar="FILE", help="calibration text for --refine (default: the model's calib.txt)")
    ap.add_argument("--refine-tokens", metavar="N", type=int,
                    help="calibration tokens for --refine (default: the text's first 65,536, in windows of 128; "
                    "more tokens, a better measured gram, a lower KL divergence)")


def _run(args) -> int:
    rep = materialize(args.model, args.plan, gguf_out=args.gguf, hf_out=args.hf, importance_file=args.importance,
                      refine=args.refine, refine_text=args.refine_text, refine_tokens=args.refine_tokens)
    if args.refine:
        print(f"refined   {rep.refined} routed expert matrices for their inputs' grams")
    for note in rep.notes:
        print(f"note      {note}")
    if rep.gguf is not None:
        print(f"GGUF      {rep.gguf.path}: {rep.gguf.file_size:,} bytes "
              f"(tensor data {rep.gguf.total_tensor_bytes:,}; the plan predicted {rep.predicted_bytes:,})")
    if rep.hf_dir is not None:
        print(f"safetensors checkpoint  {rep.hf_dir}")
    return 0


COMMAND = Command("materialize", "write the compressed model of a plan as GGUF and/or safetensors", _args, _run)
