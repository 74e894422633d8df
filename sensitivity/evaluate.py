"""Evaluation of a (compressed) causal LM against the original model on held-out text.

Metrics, over every predicted token of the evaluation text:
- perplexity of the evaluated model;
- KL divergence KL(P_original || P_model) of the next-token distributions, mean and 99th percentile
  (nats/token);
- top-1 agreement: the fraction of positions where both models put their maximum on the same token.

The original model's log-probabilities can be computed once (`ReferenceLogits`) and reused for every
plan of a sweep.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from moeplan.kernels.checkpoint import checkpoint_shards, finite, read_safetensors_header
from moeplan.kernels.inventory import resolve_model


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    kld_mean: float
    kld_p99: float
    top1_agreement: float
    n_tokens: int
    reference_perplexity: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a long text (no special tokens); the tokenizer's model_max_length is about single
    model inputs, not about a corpus that is cut into windows afterwards."""
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e12)
    try:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        tokenizer.model_max_length = saved


def load_text_ids(model, text: str | None, split: str, purpose: str, option: str):
    """(checkpoint dir, token ids) for `purpose` ("profiling", "evaluation"): `text`, or else the
    checkpoint's shipped split file (calib.txt / valid.txt), tokenized by the checkpoint's tokenizer.
    Every shard's header is checked; no weight is read."""
    from transformers import AutoTokenizer

    path = resolve_model(model)
    if not path.is_dir():
        raise ValueError(f"{purpose} needs weights: {path} is not a checkpoint directory")
    if text is None:
        split_file = path / f"{split}.txt"
        if not split_file.exists():
            raise FileNotFoundError(f"{path} ships no {split}.txt; pass {option} FILE")
        text = split_file.read_text()
    for shard in checkpoint_shards(path):  # every header checked before transformers reads one
        read_safetensors_header(shard)
    tok = AutoTokenizer.from_pretrained(str(path))
    return path, encode_text(tok, text)


def load_model_and_text(model, text: str | None, split: str, purpose: str, option: str):
    """(checkpoint dir, float32 model, token ids) for `purpose` ("profiling", "evaluation"): `text`,
    or else the checkpoint's shipped split file (calib.txt / valid.txt)."""
    from transformers import AutoModelForCausalLM

    path, ids = load_text_ids(model, text, split, purpose, option)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    check_finite_weights(model, path)
    return path, model, ids


def check_finite_weights(model: torch.nn.Module, source) -> None:
    """Refuse a model with a NaN or infinite weight, naming the tensor (every figure computed from it
    would be meaningless)."""
    for name, p in model.state_dict().items():
        if p.is_floating_point():
            finite(name, p, f"{source}: ")


class NonFiniteOutput(ValueError):
    """A model whose outputs are NaN / infinite: no perplexity or KL can be reported for it."""


def _check_finite(lp: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(lp).all()):
        n = int((~torch.isfinite(lp)).any(-1).sum())
        raise NonFiniteOutput(f"{what} gives non-finite log-probabilities at {n} positions (NaN/Inf weights or "
                              "overflow): no perplexity or KL can be reported")


def chunk_tokens(token_ids: Sequence[int] | torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, seq_len) windows of the token stream.

    With `max_tokens` below the stream's length, the max_tokens // seq_len windows are spread evenly
    over the whole stream rather than taken from its start: a text made of documents of several
    kinds (prose, code) is then sampled in all of them, not only in the first few documents."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    total = ids.numel() // seq_len
    if total == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: total * seq_len].view(total, seq_len)
    if max_tokens is None or max_tokens >= total * seq_len:
        return windows
    n = max_tokens // seq_len
    if n == 0:
        raise ValueError(f"max_tokens={max_tokens} is less than one window of {seq_len} tokens")
    pick = (torch.arange(n, dtype=torch.float64) * total / n).long()  # evenly spaced, distinct
    return windows[pick].contiguous()


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, windows.shape[0], batch_size):
        yield windows[i : i + batch_size]


@torch.inference_mode()
def _log_probs(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=batch, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return _next_token_log_probs(logits)


def _next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): predicts tokens 1..T-1


def _decoder_parts(model: torch.nn.Module):
    """(decoder layers, final norm, output head) of a transformers causal LM, or None where the
    model is not laid out as base.layers / base.norm / output embeddings."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers, norm = getattr(base, "layers", None), getattr(base, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(layers, torch.nn.ModuleList) or norm is None or head is None:
        return None
    return layers, norm, head


class LayerInputs:
    """Every decoder layer's input on the reference windows (hidden states and the keyword arguments
    the model passed: mask, rotary embeddings), and the final norm's input.

    A change confined to layers >= l (a tensor of layer l, an expert removal or top-k change in
    layer l) leaves the inputs of layers 0..l unchanged, so the changed model's output follows from
    running layers l.. only; `ReferenceLogits.evaluate_from(model, l)` does that. Costs
    n_layers x tokens x hidden x 4 bytes."""

    def __init__(self):
        self.hidden: list[list[torch.Tensor]] = []  # per batch, per layer (+ the final norm's input)
        self.kwargs: list[list[dict]] = []

    @staticmethod
    def nbytes_estimate(model: torch.nn.Module, n_tokens: int) -> int:
        cfg = model.config
        return int((cfg.num_hidden_layers + 1) * n_tokens * cfg.hidden_size * 4)

    def capture(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """One reference forward pass over `batch` that records the layers' inputs; returns the logits."""
        layers, norm, _ = _decoder_parts(model)
        hidden: list = [None] * (len(layers) + 1)
        kwargs: list = [None] * len(layers)
        handles = []

        def on_layer(mod, args, kw, i):
            hidden[i] = args[0] if args else kw["hidden_states"]
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}

        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(lambda m, a, k, i=i: on_layer(m, a, k, i), with_kwargs=True))
        handles.append(norm.register_forward_pre_hook(lambda m, a: hidden.__setitem__(len(layers), a[0])))
        try:
            out = model(input_ids=batch, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if any(h is None for h in hidden):
            raise RuntimeError(f"{type(model).__name__}: not every decoder layer ran; layer inputs cannot be cached")
        self.hidden.append(hidden)
        self.kwargs.append(kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    @torch.inference_mode()
    def log_probs_from(self, model: torch.nn.Module, b: int, start: int) -> torch.Tensor:
        """Batch b's next-token log-probabilities of `model`, recomputed from layer `start` on."""
        layers, norm, head = _decoder_parts(model)
        h = self.hidden[b][start]
        for i in range(start, len(layers)):
            out = layers[i](h, **self.kwargs[b][i])
            h = out[0] if isinstance(out, tuple) else out
        return _next_token_log_probs(head(norm(h)))


class ReferenceLogits:
    """The original model's next-token log-probabilities on fixed windows (computed once; every
    evaluated plan is compared against them). Kept in float32: float16 storage alone would add
    about 1e-4 nats/token of spurious KL, the size of the effects being measured."""

    def __init__(self, model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8,
                 progress: Callable[[int], None] | None = None, cache_layer_inputs: bool = False):
        self.windows = windows
        self.batch_size = batch_size
        self.layer_inputs = LayerInputs() if cache_layer_inputs and _decoder_parts(model) is not None else None
        chunks = []
        top1 = []
        nll = 0.0
        n = 0
        for batch in _batches(windows, batch_size):
            if self.layer_inputs is not None:
                with torch.inference_mode():
                    lp = _next_token_log_probs(self.layer_inputs.capture(model, batch))
            else:
                lp = _log_probs(model, batch)
            _check_finite(lp, "the reference model")
            tgt = batch[:, 1:]
            nll -= lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
            n += tgt.numel()
            chunks.append(lp)
            top1.append(lp.argmax(-1))
            if progress:
                progress(batch.shape[0])
        self.log_probs = chunks
        self.top1 = top1
        self.perplexity = float(np.exp(nll / n))
        self.n_tokens = n


@torch.inference_mode()
def evaluate(model: torch.nn.Module, reference: ReferenceLogits, start_layer: int | None = None) -> EvalResult:
    """Perplexity, KL to the reference and top-1 agreement of `model` on the reference's windows.

    `start_layer`: the model differs from the reference only in decoder layers >= start_layer, so
    only those are run, from the cached layer inputs (needs `cache_layer_inputs=True` on the
    reference; without the cache the whole model runs)."""
    cache = reference.layer_inputs if start_layer is not None else None
    kls = []
    agree = 0
    nll = 0.0
    n = 0
    for b, (batch, ref_lp, ref_top1) in enumerate(zip(_batches(reference.windows, reference.batch_size),
                                                       reference.log_probs, reference.top1)):
        lp = cache.log_probs_from(model, b, start_layer) if cache is not None else _log_probs(model, batch)
        _check_finite(lp, "the evaluated model")
        ref = ref_lp
        kl = (ref.exp() * (ref - lp)).sum(-1).clamp_min(0.0)  # KL(P_ref || P) per position
        kls.append(kl.flatten())
        agree += (lp.argmax(-1) == ref_top1).sum().item()
        tgt = batch[:, 1:]
        nll -= lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        n += tgt.numel()
    kl_all = torch.cat(kls).double()
    return EvalResult(
        perplexity=float(np.exp(nll / n)),
        kld_mean=float(kl_all.mean()),
        kld_p99=float(torch.quantile(kl_all, 0.99)),
        top1_agreement=agree / n,
        n_tokens=n,
        reference_perplexity=reference.perplexity,
    )
