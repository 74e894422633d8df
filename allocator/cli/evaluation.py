"""Evaluating plans: a checkpoint's original model, its reference log-probabilities on held-out text,
and every plan applied to a copy of it and compared with it.

The one evaluator of the command line: `moeplan evaluate` (model_commands.evaluate_plan), the
measured curves (`pareto.measure`, `moeplan sweep --measure`) and step 5 of `moeplan demo` all go
through `Evaluator`. Each plan is applied in memory (`sensitivity.compress.apply_decision`: the
dequantized weights a runtime reading the quantized file computes with, pruned experts removed,
top-k set) and `sensitivity.evaluate.evaluate` gives its perplexity, KL divergence to the original
(mean, 99th percentile) and top-1 agreement.

- `Evaluator(model, ...)`: loads checkpoint `model`, its held-out text and importance vectors;
  `Evaluator.of_model(...)`: the same for a model and windows already loaded.
- `held_out_windows(ids, seq_len, eval_tokens, sample)`: the windows it evaluates on.
- importance vectors: resolved by `sensitivity.importance.importance_vectors` (a given file, a
  llama-imatrix file, or the checkpoint's shipped one).
- `decision_key(plan)`: what a plan does to the model, as a digest (identical plans are evaluated once).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

from moeplan.kernels.inventory import Inventory, build_inventory, resolve_model
from moeplan.sensitivity.importance import importance_vectors


class Evaluator:
    """The original model of checkpoint `model`, its next-token log-probabilities on `eval_tokens`
    tokens of held-out text (the checkpoint's valid.txt, or `eval_text`) in windows of `seq_len`, and
    the importance vectors the quantizers use (`importance`: a path, a loaded dict, or None for the
    checkpoint's shipped profile.importance.safetensors when there is one). Calling it on a Plan
    returns the plan's EvalResult; identical plans are evaluated once.

    `sample="spread"` (default) takes the windows evenly spaced over the whole text, so that a few
    thousand tokens still cover every kind of document in it (the shipped valid.txt holds code,
    documentation and prose, one after the other); "head" takes the first eval_tokens tokens."""

    def __init__(self, model, *, eval_tokens: int = 4096, eval_text: str | None = None, seq_len: int = 128,
                 importance=None, batch_size: int = 8, sample: str = "spread"):
        from moeplan.sensitivity.evaluate import load_model_and_text

        if eval_tokens < seq_len:
            raise ValueError(f"eval_tokens ({eval_tokens}) must be at least one window of seq_len={seq_len} tokens")
        if sample not in ("spread", "head"):
            raise ValueError(f"sample must be 'spread' or 'head', got {sample!r}")
        path = resolve_model(model)
        if not path.is_dir():
            raise ValueError(f"measuring plans needs a checkpoint with weights; {path} is not a checkpoint directory "
                             "(give the directory that holds config.json and the *.safetensors weights)")
        t0 = time.perf_counter()
        model_dir, original, ids = load_model_and_text(path, eval_text, "valid", "evaluation", "--eval-text")
        inventory = build_inventory(model_dir)
        self._start(model_dir, original, held_out_windows(ids, seq_len, eval_tokens, sample), batch_size, inventory)
        self.sample = sample
        self.importance_file, self.importance = importance_vectors(self.model_dir, importance)
        self.seconds = time.perf_counter() - t0

    @classmethod
    def of_model(cls, model_dir: Path, original, windows, importance: tuple = (None, None), batch_size: int = 8,
                 inventory: Inventory | None = None) -> Evaluator:
        """An Evaluator of a model already loaded (`original`, from checkpoint `model_dir`) on the (n,
        seq_len) token `windows`, with `importance` = (file, vectors) already loaded
        (importance_vectors) and, when already built, the checkpoint's inventory."""
        t0 = time.perf_counter()
        self = cls.__new__(cls)
        self._start(Path(model_dir), original, windows, batch_size, inventory)
        self.sample = None
        self.importance_file, self.importance = importance
        self.seconds = time.perf_counter() - t0
        return self

    def _start(self, model_dir: Path, original, windows, batch_size: int, inventory: Inventory | None) -> None:
        from moeplan.sensitivity.evaluate import ReferenceLogits

        self.model_dir, self.original = model_dir, original
        self._inventory = inventory
        self.reference = ReferenceLogits(self.original, windows, batch_size)
        self.evaluations = 0  # plans actually applied and evaluated (cache misses)
        self._cache: dict[str, object] = {}

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = build_inventory(self.model_dir)
        return self._inventory

    @property
    def n_tokens(self) -> int:
        return self.reference.n_tokens

    @property
    def reference_perplexity(self) -> float:
        return self.reference.perplexity

    def compressed(self, plan):
        """A copy of the original model with `plan` applied (with this evaluator's importance vectors)."""
        from moeplan.sensitivity.compress import Decision, apply_decision

        return apply_decision(copy.deepcopy(self.original), Decision.from_plan(plan), self.importance)

    def evaluate(self, model=None):
        """The EvalResult of `model` (default: the original model itself) on the reference windows."""
        from moeplan.sensitivity.evaluate import evaluate

        return evaluate(self.original if model is None else model, self.reference)

    def __call__(self, plan):
        plan.check_model(self.inventory)
        key = decision_key(plan)
        if key not in self._cache:
            model = self.compressed(plan)
            self._cache[key] = self.evaluate(model)
            self.evaluations += 1
            del model
        return self._cache[key]


def held_out_windows(ids, seq_len: int, eval_tokens: int, sample: str = "spread"):
    """(n, seq_len) windows with n = eval_tokens // seq_len: spread evenly over the whole text
    (sensitivity.evaluate.chunk_tokens) or, with sample="head", the first ones."""
    from moeplan.sensitivity.evaluate import chunk_tokens

    if sample == "head":
        return chunk_tokens(list(ids)[:eval_tokens], seq_len)
    return chunk_tokens(ids, seq_len, eval_tokens)


def decision_key(plan) -> str:
    """A digest of what a plan does to the model (formats, kept experts, top-k, target)."""
    obj = {"target": plan.target, "tensors": sorted(plan.tensors.items()),
           "layers": [(l.layer, l.kept, l.top_k) for l in sorted(plan.layers, key=lambda l: l.layer)]}
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()
