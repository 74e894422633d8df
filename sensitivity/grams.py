"""The routed experts' input second moments (grams), what kernels.refine quantizes for.

An importance vector holds, per input column, the mean of x^2 over the calibration tokens routed to
an expert: the diagonal of the gram sum x x^T. `expert_input_grams` measures the whole gram of each
expert's two inputs (x for gate_proj / up_proj, act(gate(x)) * up(x) for down_proj) on calibration
text, with the float model in memory; `moeplan materialize --refine` hands them to kernels.refine.

Memory: one (H, H) and one (I, I) float64 matrix per routed expert of every MoE layer (the bundled
miniatures: 50 MB). A model whose grams do not fit is refused before any forward pass, with the size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .activations import available_ram
from .adapters import ExpertKind, adapter_for, record_routing
from .evaluate import chunk_tokens, load_model_and_text

#: calibration tokens and window length by default. Each expert sees about top_k / experts of them, and
#: an (n, n) gram wants many more than n: on the bundled DeepSeek-V3 miniature (n = 256, 4 of 16
#: experts a token) the refined file's KLD fell from 0.01127 at 2,048 tokens to 0.01051 at 8,192 and
#: 0.01030 at 57,344 (results/vs-llama-quantize-variants.md)
GRAM_TOKENS = 65536
GRAM_SEQ_LEN = 128


@dataclass
class ExpertGram:
    gram: np.ndarray  # (n, n) float64: sum of x x^T over the tokens routed to the expert
    tokens: int  # how many tokens that is


def expert_input_grams(model: str | os.PathLike, text: str | None = None, *, tokens: int = GRAM_TOKENS,
                       seq_len: int = GRAM_SEQ_LEN, progress: bool = False) -> dict[str, ExpertGram]:
    """Checkpoint name of each routed expert matrix -> its input gram, measured on `text` (default: the
    checkpoint's calib.txt), the first `tokens` tokens in windows of `seq_len`."""
    if tokens < seq_len or seq_len < 1:
        raise ValueError(f"--refine-tokens must be at least one window ({seq_len} tokens); got {tokens}")
    _, lm, ids = load_model_and_text(model, text, "calib", "refinement", "--refine-text")
    ad = adapter_for(lm)
    need = 0
    for layer in ad.moe_layers():
        w = ad.expert_weights(layer, 0)
        h, i = w[ExpertKind.GATE].shape[1], w[ExpertKind.DOWN].shape[1]
        need += ad.n_experts(layer) * (h * h + i * i) * 8
    free = available_ram()
    if free and need > free // 2:
        raise ValueError(f"the experts' input grams need {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is "
                          "free: materialize without --refine, or on a machine with more memory")
    windows = chunk_tokens(ids, seq_len, tokens)
    if windows.shape[0] == 0:
        raise ValueError(f"the calibration text has {len(ids)} tokens, less than one window of {seq_len}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(windows.shape[0]), unit="window", desc="grams")
    out: dict[str, ExpertGram] = {}
    try:
        with torch.no_grad(), record_routing(ad, keep_logits=False, importance="gram") as rec:
            for i in range(0, windows.shape[0], 8):
                lm(windows[i:i + 8])
                if bar is not None:
                    bar.update(int(windows[i:i + 8].shape[0]))
            for layer in ad.moe_layers():
                st = rec.stats(layer)
                for e in range(ad.n_experts(layer)):
                    n = int(st.tokens[e])
                    for kind, gram in ((ExpertKind.GATE, st.gram_in), (ExpertKind.UP, st.gram_in),
                                       (ExpertKind.DOWN, st.gram_mid)):
                        out[ad.expert_tensor_name(layer, e, kind)] = ExpertGram(gram[e].cpu().numpy(), n)
    finally:
        if bar is not None:
            bar.close()
    return out
