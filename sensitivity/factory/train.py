"""Train, ship and describe moeplan's two reference MoE language models.

    python -m moeplan.sensitivity.factory.train --model tiny-deepseek-v3 --minutes 20     # train, write sensitivity/models/<name>/
    python -m moeplan.sensitivity.factory.train --model tiny-qwen3-moe --steps 600         # a fixed number of steps instead
    python -m moeplan.sensitivity.factory.train card --model tiny-deepseek-v3             # measure the shipped model, write its card

Both are transformers' own classes (DeepseekV3ForCausalLM, Qwen3MoeForCausalLM), so every code
path that serves a real checkpoint serves these. Expert tensors have input widths that are
multiples of 256 (the K-quant super-block); the DeepSeek model's low-rank attention tensors
(q_b_proj 128, kv_b_proj 64, o_proj 128 inputs) are not, as in DeepSeek-V3, so format fallbacks
are exercised.

Routing balance. DeepSeek: the auxiliary-loss-free method of DeepSeek-V3 (arXiv 2412.19437,
section 2.1.2): after every step each MoE layer's e_score_correction_bias moves by
gamma * sign(mean load - expert load), plus the paper's small sequence-wise balance loss.
Qwen3-MoE: its own Switch-style router auxiliary loss (output_router_logits=True,
router_aux_loss_coef, transformers' load_balancing_loss_func), applied to every layer separately.
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: on a machine whose cores are shared, spinning worker threads that lose
# their core stall every parallel region (measured: 6x slower steps with the default policy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moeplan.kernels.inventory import MODELS_DIR
from moeplan.kernels.outputs import output_file, write_text

from . import data as corpus
from ..adapters import RoutingRecord, record_routing

RESULTS_DIR = Path(__file__).resolve().parents[2] / "results"
TEST_WINDOWS = 8  # windows of valid.txt that tests/test_reference_models.py evaluates
DEFAULT_DATA = Path(os.environ.get("MOEPLAN_CORPUS", Path.home() / ".cache" / "moeplan" / "corpus"))


# ------------------------------------------------------------------------------------ models


def _deepseek_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=corpus.VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,  # the dense first layer
        moe_intermediate_size=256,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        # MLA: q 256 -> 128 -> 4 x (32 + 16); kv 256 -> 64 (+16 rope) -> 4 x (32 + 32); o 128 -> 256
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=0,  # no multi-token-prediction weights are trained or shipped
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=True,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )


def _qwen3_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=corpus.VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,  # unused: every layer is sparse
        moe_intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "deepseek_v3" | "qwen3_moe"
    description: str


MODEL_SPECS = {
    "tiny-deepseek-v3": ModelSpec(
        "tiny-deepseek-v3",
        "deepseek_v3",
        "DeepseekV3ForCausalLM: MLA attention, 1 dense + 3 MoE layers, 16 routed experts in 4 groups "
        "(top-2 groups), top-4 sigmoid routing with e_score_correction_bias, 1 shared expert",
    ),
    "tiny-qwen3-moe": ModelSpec(
        "tiny-qwen3-moe",
        "qwen3_moe",
        "Qwen3MoeForCausalLM: GQA attention with q/k norm, 4 MoE layers, 16 experts, top-4 softmax routing",
    ),
}


def model_config(name: str):
    spec = _spec(name)
    return _deepseek_config() if spec.family == "deepseek_v3" else _qwen3_config()


def model_class(family: str):
    from transformers import DeepseekV3ForCausalLM, Qwen3MoeForCausalLM

    return {"deepseek_v3": DeepseekV3ForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM}[family]


def _spec(name: str) -> ModelSpec:
    if name not in MODEL_SPECS:
        raise KeyError(f"unknown reference model {name!r}; choose one of {sorted(MODEL_SPECS)}")
    return MODEL_SPECS[name]


def parameter_counts(model) -> dict:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    routed = shared = 0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            routed += p.numel()
        elif ".mlp.shared_experts." in name:
            shared += p.numel()
    n_exp = getattr(cfg, "n_routed_experts", None) or cfg.num_experts
    k = cfg.num_experts_per_tok
    embed = model.model.embed_tokens.weight.numel()
    active = total - routed + routed * k // n_exp - embed  # the embedding row lookup is not a matmul
    return {"total": total, "routed_experts": routed, "shared_experts": shared, "embedding": embed, "active_per_token_matmul": active}


# -------------------------------------------------------------------------------- tokens / data


def _tokenizer_digest(tok_dir: Path) -> str:
    return hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()[:16]


def train_tokens(data_dir: Path, tokenizer, docs: list[corpus.Document]) -> np.ndarray:
    """The train split as one uint16 stream, EOS before every document; cached next to the corpus."""
    cache = data_dir / f"train_tokens-{_tokenizer_digest(data_dir / 'tokenizer')}.npy"
    if cache.exists():
        return np.load(cache)
    eos = tokenizer.eos_token_id
    parts = []
    for ids in corpus.encode_documents(tokenizer, docs):
        parts.append(np.asarray([eos, *ids], dtype=np.uint16))
    arr = np.concatenate(parts)
    with output_file(cache, "token cache") as tmp:
        np.save(tmp, arr)
    return arr


@dataclass
class EvalStream:
    ids: torch.Tensor  # (T,) int64
    domain: np.ndarray  # (T,) domain index per token
    source: np.ndarray  # (T,) source index per token
    domains: list[str]
    sources: list[str]


def eval_stream(tokenizer, docs: list[corpus.Document]) -> EvalStream:
    """Documents concatenated, each preceded by EOS, with each token tagged by its document's domain and source."""
    domains = sorted({d.domain for d in docs})
    sources = sorted({d.source for d in docs})
    ids, dom, src = [], [], []
    for d, toks in zip(docs, corpus.encode_documents(tokenizer, docs)):
        n = len(toks) + 1
        ids.extend([tokenizer.eos_token_id, *toks])
        dom.extend([domains.index(d.domain)] * n)
        src.extend([sources.index(d.source)] * n)
    return EvalStream(torch.tensor(ids, dtype=torch.long), np.asarray(dom), np.asarray(src), domains, sources)


def expert_shares(rec: RoutingRecord) -> dict[int, np.ndarray]:
    """Per MoE layer: each expert's share of the routed assignments recorded, divided by the uniform share 1/E."""
    out = {}
    for layer in rec.layers():
        c = rec.routing(layer).counts(rec.adapter.n_experts(layer)).double()
        out[layer] = (c / c.sum() * len(c)).numpy()
    return out


@torch.no_grad()
def evaluate(model, stream: EvalStream, seq_len: int = 256, max_windows: int | None = None, batch: int = 8) -> dict:
    """Perplexity over non-overlapping windows of the stream, overall / per domain / per source,
    and the expert load (share relative to uniform) of every MoE layer on the same tokens."""
    model.eval()
    n_win = (len(stream.ids) - 1) // seq_len
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    if n_win < 1:
        raise ValueError(f"evaluation text too short: {len(stream.ids)} tokens for windows of {seq_len}")
    rec = record_routing(model, keep_logits=False)
    nll_sum = np.zeros(len(stream.ids))
    counted = np.zeros(len(stream.ids), dtype=bool)
    n_exp = rec.adapter.n_experts(rec.layers()[0])
    # per layer, routed-assignment counts split by the domain of the token routed: (D, E)
    dom_counts = {i: np.zeros((len(stream.domains), n_exp)) for i in rec.layers()}
    try:
        for b0 in range(0, n_win, batch):
            wins = range(b0, min(n_win, b0 + batch))
            x = torch.stack([stream.ids[w * seq_len : (w + 1) * seq_len] for w in wins])
            logits = model(input_ids=x).logits.float()
            tok_dom = np.concatenate([stream.domain[w * seq_len : (w + 1) * seq_len] for w in wins])  # (B*L,)
            for layer in rec.layers():
                idx = rec.routing(layer).indices[-x.numel():]  # this batch's tokens, (B*L, k)
                k = idx.shape[-1]
                np.add.at(dom_counts[layer], (np.repeat(tok_dom, k), idx.reshape(-1).numpy()), 1)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
            nll = nll.view(len(wins), seq_len - 1).numpy()
            for j, w in enumerate(wins):
                pos = slice(w * seq_len + 1, (w + 1) * seq_len)
                nll_sum[pos] = nll[j]
                counted[pos] = True
    finally:
        rec.close()

    def agg(mask):
        m = counted & mask
        n = int(m.sum())
        mean = float(nll_sum[m].sum() / n) if n else float("nan")
        return {"tokens": n, "nll": mean, "ppl": math.exp(mean) if n else float("nan")}

    out = agg(np.ones_like(counted))
    out["per_domain"] = {d: agg(stream.domain == i) for i, d in enumerate(stream.domains)}
    out["per_source"] = {s: agg(stream.source == i) for i, s in enumerate(stream.sources)}
    shares = expert_shares(rec)
    out["expert_share"] = {str(i): [round(float(v), 4) for v in s] for i, s in shares.items()}
    out["expert_share_per_domain"] = {
        str(i): {d: [round(float(v), 4) for v in c[j] / max(c[j].sum(), 1) * n_exp] for j, d in enumerate(stream.domains)}
        for i, c in dom_counts.items()
    }
    routing = {i: rec.routing(i) for i in rec.layers()}
    out["expert_mean_weight"] = {
        str(i): [round(float(w / c), 4) if c else 0.0 for w, c in zip(r.weight_sums(n_exp), r.counts(n_exp).double())]
        for i, r in routing.items()
    }
    return out


# ----------------------------------------------------------------------------------- training


@dataclass
class TrainArgs:
    model: str
    minutes: float | None = 20.0
    steps: int | None = None
    seq_len: int = 256
    batch: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    threads: int = 2
    eval_every_s: float = 240.0
    eval_windows: int = 32
    bias_update_rate: float = 2e-3  # DeepSeek: gamma of the bias update
    seq_aux_coef: float = 1e-3  # DeepSeek: alpha of the sequence-wise balance loss
    experts_implementation: str = "grouped_mm"
    data: str = str(DEFAULT_DATA)
    out: str = ""
    work: str = ""


def _lr_at(a: TrainArgs, step: int, progress: float) -> float:
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    p = min(1.0, max(0.0, progress))
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _deepseek_seq_balance_loss(rec: RoutingRecord, batch: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20: sum over experts of f_i * P_i per sequence, averaged, summed over layers
    (the logits recorded with their gradient)."""
    total = 0.0
    for layer in rec.layers():
        routing = rec.routing(layer)
        logits = routing.logits
        n_exp = logits.shape[-1]
        s = torch.sigmoid(logits.float())
        s = (s / s.sum(-1, keepdim=True)).view(batch, -1, n_exp)  # (B, L, E) normalized affinities
        seq_len = s.shape[1]
        idx = routing.indices.view(batch, -1)  # (B, L*k)
        f = torch.zeros(batch, n_exp).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        f = f * n_exp / (top_k * seq_len)
        total = total + (f * s.mean(1)).sum(-1).mean()
    return total


def cpu_description() -> str:
    name = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or 'unknown CPU'}, {os.cpu_count()} logical cores visible"


def train(a: TrainArgs) -> Path:
    spec = _spec(a.model)
    torch.set_num_threads(a.threads)
    data_dir = Path(a.data)
    if not (data_dir / "documents.json").exists() or not (data_dir / "tokenizer" / "tokenizer.json").exists():
        print(f"building the corpus in {data_dir}", flush=True)
        corpus.prepare(data_dir)
    manifest, splits = corpus.load_corpus(data_dir)
    tok = corpus.load_tokenizer(data_dir / "tokenizer")
    stream = train_tokens(data_dir, tok, splits["train"])
    valid = eval_stream(tok, splits["valid"])
    out = Path(a.out) if a.out else MODELS_DIR / a.model
    work = Path(a.work) if a.work else Path("/tmp") / f"moeplan-train-{a.model}"
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "log.jsonl"
    log_f = open(log_path, "w", encoding="utf-8")

    def log(rec: dict) -> None:
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
        print(json.dumps(rec), flush=True)

    torch.manual_seed(a.seed)
    cfg = model_config(a.model)
    cfg._experts_implementation = a.experts_implementation
    cfg._attn_implementation = "sdpa"
    is_ds = spec.family == "deepseek_v3"
    if not is_ds:
        cfg.output_router_logits = True
    model = model_class(spec.family)(cfg)
    model.train()
    if not is_ds:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func as qwen_load_balancing_loss
    counts = parameter_counts(model)
    top_k = cfg.num_experts_per_tok

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    rec = record_routing(model, keep_logits=is_ds, logits_grad=is_ds)
    rng = np.random.default_rng(a.seed)
    n_tok = len(stream)
    log({"event": "start", "model": a.model, "params": counts, "train_tokens_available": int(n_tok), "valid_tokens": int(len(valid.ids)), "args": asdict(a)})

    budget_s = a.minutes * 60 if a.minutes else None
    t0 = time.time()
    last_eval = t0
    step = 0
    tokens_seen = 0
    losses: list[float] = []
    history: list[dict] = []
    val_history: list[dict] = []
    while True:
        elapsed = time.time() - t0
        if a.steps is not None and step >= a.steps:
            break
        if a.steps is None and elapsed >= budget_s:
            break
        progress = step / a.steps if a.steps else elapsed / budget_s
        lr = _lr_at(a, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, n_tok - a.seq_len - 1, size=a.batch)
        x = torch.from_numpy(np.stack([stream[s : s + a.seq_len].astype(np.int64) for s in starts]))
        rec.reset()
        outp = model(input_ids=x)
        logits = outp.logits
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        if is_ds:
            aux = _deepseek_seq_balance_loss(rec, a.batch, top_k)
            loss = ce + a.seq_aux_coef * aux
        else:
            # transformers' Switch-style loss, applied to each layer on its own and averaged: pooled
            # over layers (as the model's forward does) it lets one layer's overload cancel another's.
            aux = sum(qwen_load_balancing_loss((lg,), cfg.num_experts, top_k) for lg in outp.router_logits) / len(outp.router_logits)
            loss = ce + cfg.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        if is_ds:
            # Auxiliary-loss-free balancing: push each expert's bias toward the mean load.
            with torch.no_grad():
                for layer in rec.layers():
                    load = rec.routing(layer).counts(rec.adapter.n_experts(layer)).float()
                    bias = rec.adapter.e_score_correction_bias(layer)
                    bias += a.bias_update_rate * torch.sign(load.mean() - load)
        step += 1
        tokens_seen += a.batch * a.seq_len
        losses.append(ce.item())
        if step % 10 == 0:
            sh = expert_shares(rec)
            rec_ = {
                "event": "train",
                "step": step,
                "t": round(time.time() - t0, 1),
                "tokens": tokens_seen,
                "lr": round(lr, 6),
                "loss": round(float(np.mean(losses[-10:])), 4),
                "aux": round(float(aux.detach()), 4),
                "grad_norm": round(float(gnorm), 3),
                "share_min": round(float(min(s.min() for s in sh.values())), 3),
                "share_max": round(float(max(s.max() for s in sh.values())), 3),
                "tok_per_s": round(tokens_seen / (time.time() - t0), 1),
            }
            history.append(rec_)
            log(rec_)
        if time.time() - last_eval >= a.eval_every_s:
            rec.close()
            ev = evaluate(model, valid, a.seq_len, max_windows=a.eval_windows)
            rec = record_routing(model, keep_logits=is_ds, logits_grad=is_ds)
            model.train()
            last_eval = time.time()
            v = {"event": "valid", "step": step, "t": round(last_eval - t0, 1), "tokens": tokens_seen, "ppl": round(ev["ppl"], 3), "per_domain": {k: round(d["ppl"], 3) for k, d in ev["per_domain"].items()}}
            val_history.append(v)
            log(v)
    train_wall = time.time() - t0
    rec.close()
    ev = evaluate(model, valid, a.seq_len)
    final = {
        "event": "final",
        "step": step,
        "tokens": tokens_seen,
        "train_wall_s": round(train_wall, 1),
        "final_train_loss": round(float(np.mean(losses[-50:])), 4),
        "valid_ppl_fp32": round(ev["ppl"], 3),
        "valid_per_domain_fp32": {k: round(d["ppl"], 3) for k, d in ev["per_domain"].items()},
        "expert_share_min": min(min(v) for v in ev["expert_share"].values()),
        "expert_share_max": max(max(v) for v in ev["expert_share"].values()),
    }
    val_history.append({"event": "valid", "step": step, "t": round(train_wall, 1), "tokens": tokens_seen, "ppl": round(ev["ppl"], 3), "per_domain": final["valid_per_domain_fp32"], "windows": "all"})
    log(final)
    training_log = {
        "model": a.model,
        "command": f"python -m moeplan.sensitivity.factory.train --model {a.model} " + (f"--steps {a.steps}" if a.steps else f"--minutes {a.minutes:g}"),
        "args": asdict(a),
        "hardware": cpu_description(),
        "torch": torch.__version__,
        "threads": a.threads,
        "precision": "float32 (bf16 autocast measured slower on this CPU)",
        "parameters": counts,
        "train_tokens_available": int(n_tok),
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_wall_s": round(train_wall, 1),
        "tokens_per_s": round(tokens_seen / train_wall, 1),
        "final_train_loss": final["final_train_loss"],
        "final_valid_ppl_fp32": final["valid_ppl_fp32"],
        "history": history,
        "valid_history": val_history,
    }
    ship(model, tok, data_dir, manifest, out, training_log)
    log({"event": "shipped", "dir": str(out)})
    log_f.close()
    return out


# ---------------------------------------------------------------------------------- shipping


def ship(model, tokenizer, data_dir: Path, manifest: dict, out: Path, training_log: dict) -> None:
    """Write the shipped artifacts: bf16 safetensors (the correction bias stays fp32, as in
    DeepSeek-V3's checkpoint), tokenizer, valid / calib text with their document manifest, data card."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    cfg = model.config
    if hasattr(cfg, "output_router_logits"):
        cfg.output_router_logits = False
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.bfloat16)
    for name, b in model.named_buffers():
        if b.is_floating_point() and not name.endswith("e_score_correction_bias") and "inv_freq" not in name:
            b.data = b.data.to(torch.bfloat16)
    cfg.dtype = torch.bfloat16
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)
    tokenizer.save_pretrained(str(out))
    for split in ("valid", "calib"):
        shutil.copyfile(data_dir / f"{split}.txt", out / f"{split}.txt")
    shipped_manifest = {
        "corpus_version": manifest["corpus_version"],
        "split_salt": manifest["split_salt"],
        "sources": manifest["sources"],
        "stats": manifest["stats"],
        "splits": {
            "valid": manifest["splits"]["valid"],
            "calib": manifest["splits"]["calib"],
            # train text does not ship; its document ids and hashes do, to check disjointness
            "train": [[e["id"], e["sha256"]] for e in manifest["splits"]["train"]],
        },
    }
    write_text(out / "documents.json", json.dumps(shipped_manifest, separators=(",", ":")) + "\n")
    write_text(out / "training_log.json", json.dumps(training_log, indent=1) + "\n")
    write_text(out / "DATA.md", _data_card(training_log["model"], manifest))


def _data_card(name: str, manifest: dict) -> str:
    lines = [
        f"# {name}: data and licences",
        "",
        "Weights were trained from scratch by `python -m moeplan.sensitivity.factory.train` on the train split of the corpus",
        "built by `python -m moeplan.sensitivity.factory.data prepare`. The files valid.txt and calib.txt in this folder are",
        "the validation and calibration splits; they contain only PSF-licensed and public-domain text.",
        "The train split is not shipped; documents.json lists its document ids and SHA-256 hashes.",
        "",
        "| source | domain | licence | shipped text | what |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n, s in manifest["sources"].items():
        lines.append(f"| {n} | {s['domain']} | {s['licence']} | {'valid, calib' if s['shipped'] else 'none (train only)'} | {s['description']} |")
    lines += ["", "Documents (count / MB of UTF-8) per split:", "", "| split | " + " | ".join(manifest["sources"]) + " |", "| --- |" + " --- |" * len(manifest["sources"])]
    for split, per in manifest["stats"].items():
        cells = [f"{per[s]['documents']} / {per[s]['bytes'] / 1e6:.3f}" if s in per else "0" for s in manifest["sources"]]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Python standard library and documentation: Copyright Python Software Foundation, PSF License",
        "Version 2 (https://docs.python.org/3/license.html). King James Version (1611): public domain.",
        "The Debian Administrator's Handbook (Raphaël Hertzog, Roland Mas; GPL-2.0+ or CC-BY-SA-3.0) was",
        "used for training only; none of its text is included here.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- card


def write_card(name: str, out: Path | None = None, seq_len: int = 256) -> Path:
    from .. import reference

    spec = _spec(name)
    path = reference.reference_model_path(name)
    tlog = json.loads((path / "training_log.json").read_text(encoding="utf-8"))
    model, tok = reference.load_reference_model(name, dtype=torch.float32)
    cfg = model.config
    counts = parameter_counts(model)
    docs = {s: reference.reference_documents(name, s) for s in ("valid", "calib")}
    streams = {s: eval_stream(tok, d) for s, d in docs.items()}
    t0 = time.time()
    ev = {s: evaluate(model, st, seq_len) for s, st in streams.items()}
    eval_s = time.time() - t0
    # the text tests/test_reference_models.py measures: the first TEST_WINDOWS windows of valid
    ev_test = evaluate(model, streams["valid"], seq_len, max_windows=TEST_WINDOWS)
    sizes = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    cmd = f"python -m moeplan.sensitivity.factory.train card --model {name}"
    manifest = json.loads((path / "documents.json").read_text(encoding="utf-8"))
    lines = [
        f"# Model card: {name}",
        "",
        f"{spec.description}. Trained from scratch on CPU for moeplan's quantization and pruning experiments;",
        f"shipped in `sensitivity/models/{name}/` (load with `moeplan.sensitivity.reference.load_reference_model({name!r})`",
        "or `from_pretrained` on that folder).",
        "",
        f"Every number below under \"measured\" was produced by `{cmd}` on the shipped bf16 weights",
        "(loaded as float32); numbers under \"training\" were recorded by the training run",
        f"`{tlog['command']}` in `training_log.json` next to the weights.",
        "",
        "## Architecture (config.json)",
        "",
        "| field | value |",
        "| --- | --- |",
    ]
    fields = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "moe_intermediate_size", "intermediate_size", "num_experts_per_tok"]
    if spec.family == "deepseek_v3":
        fields += ["n_routed_experts", "n_shared_experts", "n_group", "topk_group", "first_k_dense_replace", "routed_scaling_factor", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
    else:
        fields += ["num_experts", "head_dim", "norm_topk_prob", "router_aux_loss_coef"]
    for f in fields:
        lines.append(f"| {f} | {getattr(cfg, f)} |")
    lines += [
        "",
        f"## Parameters (measured: `{cmd}`)",
        "",
        "| part | parameters |",
        "| --- | --- |",
        f"| total | {counts['total']:,} |",
        f"| routed experts | {counts['routed_experts']:,} |",
        f"| shared experts | {counts['shared_experts']:,} |",
        f"| token embedding | {counts['embedding']:,} |",
        f"| used per token in matmuls (non-expert + top-k experts + lm_head) | {counts['active_per_token_matmul']:,} |",
        "",
        "Shipped files (bytes):",
        "",
        "| file | bytes |",
        "| --- | --- |",
    ] + [f"| {k} | {v:,} |" for k, v in sizes.items()] + [f"| total | {sum(sizes.values()):,} |", ""]
    lines += [
        "## Data",
        "",
        "Built by `python -m moeplan.sensitivity.factory.data prepare --out DIR`; documents are split by a keyed SHA-256 of their id.",
        "",
        "| source | domain | licence | shipped text |",
        "| --- | --- | --- | --- |",
    ] + [f"| {n} | {s['domain']} | {s['licence']} | {'valid, calib' if s['shipped'] else 'none (train only)'} |" for n, s in manifest["sources"].items()]
    lines += ["", "| split | documents | MB (UTF-8) | tokens |", "| --- | --- | --- | --- |"]
    for split, per in manifest["stats"].items():
        ndoc = sum(v["documents"] for v in per.values())
        mb = sum(v["bytes"] for v in per.values()) / 1e6
        ntok = tlog["train_tokens_available"] if split == "train" else len(streams[split].ids)
        tok_note = f"{ntok:,}" + (" (training run)" if split == "train" else "")
        lines.append(f"| {split} | {ndoc} | {mb:.2f} | {tok_note} |")
    hist = tlog["valid_history"]
    lines += [
        "",
        f"## Training (recorded by `{tlog['command']}`)",
        "",
        f"- hardware: {tlog['hardware']}; torch {tlog['torch']}, {tlog['threads']} threads, {tlog['precision']}",
        f"- optimizer: AdamW (betas 0.9/0.95, weight decay {tlog['args']['weight_decay']}), peak LR {tlog['args']['lr']}, "
        f"{tlog['args']['warmup_steps']} warm-up steps, cosine to {tlog['args']['min_lr_ratio']}x "
        f"({'over the wall-clock budget' if not tlog['args']['steps'] else 'over the step count'}), batch {tlog['args']['batch']} x {tlog['args']['seq_len']} tokens, seed {tlog['args']['seed']}",
    ]
    if spec.family == "deepseek_v3":
        lines.append(f"- balance: bias update rate {tlog['args']['bias_update_rate']} (auxiliary-loss-free), sequence-wise balance loss coefficient {tlog['args']['seq_aux_coef']}")
    else:
        lines.append(f"- balance: router auxiliary loss (transformers' load_balancing_loss_func, per layer, averaged), coefficient {cfg.router_aux_loss_coef}")
    lines += [
        f"- steps: {tlog['steps']:,}; tokens seen: {tlog['tokens_seen']:,} ({tlog['tokens_seen'] / tlog['train_tokens_available']:.2f} epochs of the train split)",
        f"- wall time: {tlog['train_wall_s'] / 60:.1f} min ({tlog['tokens_per_s']:.0f} tokens/s)",
        f"- final train loss (mean of the last 50 steps): {tlog['final_train_loss']:.3f} (perplexity {math.exp(tlog['final_train_loss']):.1f})",
        "",
        "Validation perplexity during training (first windows of valid.txt, fp32 weights; the last row is all of it):",
        "",
        "| step | tokens seen | valid ppl |",
        "| --- | --- | --- |",
    ] + [f"| {h['step']} | {h['tokens']:,} | {h['ppl']:.2f} |" for h in hist]
    lines += [
        "",
        f"## Perplexity of the shipped weights (measured: `{cmd}`, {eval_s:.0f} s)",
        "",
        f"Non-overlapping windows of {seq_len} tokens over the whole split, documents joined with the EOS token.",
        "",
        "| split | all | " + " | ".join(ev["valid"]["per_domain"]) + " | " + " | ".join(ev["valid"]["per_source"]) + " |",
        "| --- | --- |" + " --- |" * (len(ev["valid"]["per_domain"]) + len(ev["valid"]["per_source"])),
    ]
    for split, e in ev.items():
        cells = [f"{e['ppl']:.2f} ({e['tokens']:,} tok)"] + [f"{v['ppl']:.2f}" for v in e["per_domain"].values()] + [f"{v['ppl']:.2f}" for v in e["per_source"].values()]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Expert load on valid.txt (measured: `{cmd}`)",
        "",
        "Share of routed assignments per expert divided by the uniform share 1/E (1.0 = uniform).",
        "",
        "| layer | min share | max share | max/min | mean routing weight min..max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for layer, sh in ev["valid"]["expert_share"].items():
        w = ev["valid"]["expert_mean_weight"][layer]
        lines.append(f"| {layer} | {min(sh):.3f} | {max(sh):.3f} | {(max(sh) / min(sh)) if min(sh) > 0 else float('inf'):.2f} | {min(w):.3f}..{max(w):.3f} |")
    lines += ["", "Per expert (share relative to uniform), layer by layer:", ""]
    for layer, sh in ev["valid"]["expert_share"].items():
        lines.append(f"- layer {layer}: " + " ".join(f"{v:.2f}" for v in sh))
    doms = list(ev["valid"]["per_domain"])
    lines += [
        "",
        "Domain specialization: each expert's share among the assignments of tokens of one domain",
        "(relative to uniform); the expert each domain uses most, and the largest code/prose ratio.",
        "",
        "| layer | " + " | ".join(f"top expert for {d} (share)" for d in doms) + " | max ratio code/prose or prose/code |",
        "| --- |" + " --- |" * (len(doms) + 1),
    ]
    for layer, per in ev["valid"]["expert_share_per_domain"].items():
        tops = [f"{int(np.argmax(per[d]))} ({max(per[d]):.2f})" if sum(per[d]) else "n/a" for d in doms]
        a, b = np.asarray(per[doms[0]]), np.asarray(per[doms[-1]])
        if a.sum() and b.sum():
            a, b = np.maximum(a, 0.01), np.maximum(b, 0.01)  # shares below 1% of uniform count as 1%
            ratio = f"{float(np.max(np.maximum(a / b, b / a))):.1f}"
        else:
            ratio = "n/a"
        lines.append(f"| {layer} | " + " | ".join(tops) + f" | {ratio} |")
    shares_t = [v for sh in ev_test["expert_share"].values() for v in sh]
    lines += [
        "",
        f"## The text the unit tests use (measured: `{cmd}`)",
        "",
        f"tests/test_reference_models.py evaluates the first {TEST_WINDOWS} windows of {seq_len} tokens of valid.txt:",
        f"perplexity {ev_test['ppl']:.2f} on {ev_test['tokens']:,} predicted tokens; expert shares {min(shares_t):.3f}..{max(shares_t):.3f} x uniform.",
        "",
    ]
    out = out or RESULTS_DIR / f"model-card-{name}.md"
    write_text(out, "\n".join(lines))
    metrics = {"valid": {k: v for k, v in ev["valid"].items()}, "calib": {k: v for k, v in ev["calib"].items() if k != "expert_mean_weight"}, "parameters": counts, "sizes": sizes}
    write_text(out.with_suffix(".json"), json.dumps(metrics, indent=1) + "\n")
    return out


# ---------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "card":
        p = argparse.ArgumentParser(prog="python -m moeplan.sensitivity.factory.train card", description="measure a shipped reference model and write results/model-card-<name>.md")
        p.add_argument("--model", required=True, choices=sorted(MODEL_SPECS))
        p.add_argument("--out", type=Path, default=None)
        p.add_argument("--threads", type=int, default=2)
        a = p.parse_args(argv[1:])
        torch.set_num_threads(a.threads)
        print(write_card(a.model, a.out))
        return 0
    p = argparse.ArgumentParser(prog="python -m moeplan.sensitivity.factory.train", description="train a reference MoE model and ship it to sensitivity/models/<name>/")
    p.add_argument("--model", required=True, choices=sorted(MODEL_SPECS))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, default=None, help="wall-clock budget; the cosine schedule runs over it (default 20)")
    g.add_argument("--steps", type=int, default=None, help="a fixed number of steps (fully reproducible schedule)")
    for f, v in asdict(TrainArgs(model="")).items():
        if f in ("model", "minutes", "steps"):
            continue
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    ns = vars(p.parse_args(argv))
    if ns["minutes"] is None and ns["steps"] is None:
        ns["minutes"] = 20.0
    a = TrainArgs(**ns)
    if a.steps is not None and a.steps < 1:
        p.error("--steps must be at least 1")
    if a.minutes is not None and a.minutes <= 0:
        p.error("--minutes must be positive")
    print(train(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
