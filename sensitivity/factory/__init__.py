"""The reference-model factory: what makes the models and checkpoints moeplan is tested on, as opposed
to what measures a model (the rest of moeplan.sensitivity).

- `data`: the text sources of the two shipped reference models, their document splits and their
  tokenizer (`python -m moeplan.sensitivity.factory.data prepare --out DIR` builds the corpus).
- `train`: trains the two reference models (tiny-deepseek-v3, tiny-qwen3-moe), ships them to
  sensitivity/models/<name>/ and writes their model cards
  (`python -m moeplan.sensitivity.factory.train --model NAME`, `... train card --model NAME`).
- `generated`: random-weight checkpoints of real architectures (BF16 or FP8, sharded) for scale tests
  and benchmarks.

The shipped models themselves are read through `moeplan.sensitivity.reference`.
"""
