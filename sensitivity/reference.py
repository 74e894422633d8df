"""moeplan's shipped reference MoE models and their validation / calibration text.

    >>> from moeplan.sensitivity import reference
    >>> reference.list_reference_models()
    ['tiny-deepseek-v3', 'tiny-qwen3-moe']
    >>> model, tok = reference.load_reference_model("tiny-deepseek-v3")
    >>> text = reference.reference_text("calib")

Each model folder (sensitivity/models/<name>/) is a plain transformers checkpoint (config.json,
model.safetensors in bfloat16, tokenizer.json) plus valid.txt / calib.txt and documents.json,
which lists every document of the valid, calib and train splits with its SHA-256.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from moeplan.kernels.inventory import MODELS_DIR

from .factory.data import Document, read_split

TEXT_SPLITS = ("valid", "calib")


def list_reference_models() -> list[str]:
    """Names of the shipped reference models (folders with a config.json)."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file())


def reference_model_path(name: str) -> Path:
    """The folder of a shipped model, usable with `from_pretrained`."""
    names = list_reference_models()
    if name not in names:
        raise KeyError(f"no reference model named {name!r}; shipped models: {names or 'none'} (in {MODELS_DIR})")
    return MODELS_DIR / name


def load_reference_model(name: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a shipped model, in eval mode, with weights cast to `dtype`."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32 or torch.bfloat16, not {dtype!r}")
    path = reference_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    return model, tok


def _resolve(name_or_split: str, split: str | None) -> tuple[str, str]:
    if name_or_split in TEXT_SPLITS:
        if split is not None and split != name_or_split:
            raise ValueError(f"reference_text({name_or_split!r}, split={split!r}): give the split once")
        models = list_reference_models()
        if not models:
            raise FileNotFoundError(f"no reference models are shipped in {MODELS_DIR}")
        return models[0], name_or_split  # every model ships the same valid / calib text
    split = split or "valid"
    if split not in TEXT_SPLITS:
        raise ValueError(f"split must be one of {TEXT_SPLITS}, not {split!r} (the train split is not shipped)")
    reference_model_path(name_or_split)  # clear error for an unknown name
    return name_or_split, split


def reference_text(name_or_split: str = "valid", split: str | None = None) -> str:
    """Shipped text: `reference_text("valid")`, `reference_text("calib")`, or a model's own copy,
    `reference_text("tiny-qwen3-moe")` (valid) / `reference_text("tiny-qwen3-moe", "calib")`.
    Documents are separated by a blank line; `reference_documents` gives them one by one."""
    name, split = _resolve(name_or_split, split)
    with open(MODELS_DIR / name / f"{split}.txt", encoding="utf-8", newline="") as f:
        return f.read()


@lru_cache(maxsize=8)
def _manifest(name: str) -> dict:
    return json.loads((reference_model_path(name) / "documents.json").read_text(encoding="utf-8"))


def reference_documents(name_or_split: str = "valid", split: str | None = None) -> list[Document]:
    """The documents of a shipped split, each with id, source, domain ("prose" / "code") and
    SHA-256 (checked against the text on reading)."""
    name, split = _resolve(name_or_split, split)
    return read_split(MODELS_DIR / name / f"{split}.txt", _manifest(name)["splits"][split])


def reference_manifest(name: str) -> dict:
    """documents.json of a model: sources with licences, split statistics, every document's id and hash."""
    return json.loads(json.dumps(_manifest(name)))
