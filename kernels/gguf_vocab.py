"""A checkpoint's byte-level BPE vocabulary (tokenizer.json + tokenizer_config.json) in the form
llama.cpp's "gpt2" tokenizer reads from a GGUF file, with its pre-tokenizer recognized by its regexes."""


from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import read_json


def _normalize_regex(s: str) -> str:
    # tokenizer.json files spell CR/LF inside regexes either as the characters or as \r \n escapes
    return s.replace("\r", "\\r").replace("\n", "\\n")


# llama.cpp pre-tokenizer name -> the Split regexes of tokenizer.json's pre_tokenizer (in order),
# each followed by a ByteLevel step without its own regex (llama-vocab.cpp keeps the same regexes).
_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "deepseek-v3": (
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    ),
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}


def detect_pre_tokenizer(pre: Mapping | None) -> str:
    """The llama.cpp pre-tokenizer name (tokenizer.ggml.pre) for a tokenizer.json pre_tokenizer.

    A lone ByteLevel step with its built-in regex is GPT-2's (llama.cpp "gpt-2"); Split sequences are
    matched against the regexes llama.cpp implements."""
    if not pre:
        raise ValueError("tokenizer.json has no pre_tokenizer; pass tokenizer_pre=... (a llama.cpp pre-tokenizer name)")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        if steps[0].get("add_prefix_space"):
            raise ValueError("ByteLevel pre-tokenizer with add_prefix_space=true has no llama.cpp equivalent")
        return "gpt-2"
    if steps and steps[-1].get("type") == "ByteLevel" and not steps[-1].get("use_regex", True):
        regexes = []
        for s in steps[:-1]:
            if s.get("type") != "Split" or "Regex" not in s.get("pattern", {}) or s.get("behavior", "Isolated") != "Isolated" or s.get("invert"):
                break
            regexes.append(_normalize_regex(s["pattern"]["Regex"]))
        else:
            for name, known in _PRE_TOKENIZERS.items():
                if tuple(regexes) == tuple(_normalize_regex(k) for k in known):
                    return name
    raise ValueError(
        "tokenizer.json's pre_tokenizer matches none of the pre-tokenizers this writer recognizes "
        f"(gpt-2, {', '.join(_PRE_TOKENIZERS)}); pass tokenizer_pre=... with the llama.cpp name whose regex it uses"
    )


def _special_token_id(value: Any, token_to_id: Mapping[str, int]) -> int | None:
    if isinstance(value, Mapping):
        value = value.get("content")
    if isinstance(value, str):
        return token_to_id.get(value)
    return None


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool | None
    add_eos: bool | None
    chat_template: str | None


def read_tokenizer(model_dir: str | os.PathLike, vocab_size: int, config: Mapping,
                   tokenizer_pre: str | None = None) -> Vocab:
    """Byte-level BPE vocabulary from tokenizer.json (+ tokenizer_config.json) in llama.cpp's "gpt2" form."""
    import gguf

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json; llama.cpp needs the vocabulary in the GGUF file")
    tj = read_json(path, "tokenizer")
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json has a {model.get('type')!r} model; only byte-level BPE is supported")
    pre = tokenizer_pre or detect_pre_tokenizer(tj.get("pre_tokenizer"))
    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special_ids: set[int] = set()
    user_ids: set[int] = set()
    for tok in tj.get("added_tokens") or []:
        id_to_token[int(tok["id"])] = tok["content"]
        (special_ids if tok.get("special") else user_ids).add(int(tok["id"]))
    if id_to_token and max(id_to_token) >= vocab_size:
        raise ValueError(f"tokenizer.json has token id {max(id_to_token)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(id_to_token[i])
            types.append(int(gguf.TokenType.CONTROL if i in special_ids else
                             gguf.TokenType.USER_DEFINED if i in user_ids else gguf.TokenType.NORMAL))
    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        else:
            a, b = m
            if " " in a or " " in b:
                raise ValueError(f"merge {m!r} holds a space; a byte-level vocabulary never does")
            merges.append(f"{a} {b}")
    if not merges:
        raise ValueError("tokenizer.json has no merges; llama.cpp's BPE tokenizer needs them")

    token_to_id = {t: i for i, t in enumerate(tokens)}
    tcfg_path = model_dir / "tokenizer_config.json"
    tcfg = read_json(tcfg_path, "tokenizer config") if tcfg_path.exists() else {}
    special: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = _special_token_id(tcfg.get(f"{kind}_token"), token_to_id)
        if tid is None:
            cid = config.get(f"{kind}_token_id")
            if isinstance(cid, list):
                cid = cid[0] if cid else None
            tid = int(cid) if cid is not None else None
        if tid is not None:
            if not 0 <= tid < vocab_size:
                raise ValueError(f"{kind} token id {tid} is outside the vocabulary of {vocab_size}")
            special[kind] = tid
    chat_template = tcfg.get("chat_template") if isinstance(tcfg.get("chat_template"), str) else None
    if chat_template is None and (model_dir / "chat_template.jinja").exists():
        chat_template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    add_bos = tcfg.get("add_bos_token") if isinstance(tcfg.get("add_bos_token"), bool) else None
    add_eos = tcfg.get("add_eos_token") if isinstance(tcfg.get("add_eos_token"), bool) else None
    return Vocab(tokens, types, merges, pre, special, add_bos, add_eos, chat_template)


def add_vocab(w, v: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id, "pad": w.add_pad_token_id}
    for kind, tid in v.special.items():
        adders[kind](tid)
    if v.add_bos is not None:
        w.add_add_bos_token(v.add_bos)
    if v.add_eos is not None:
        w.add_add_eos_token(v.add_eos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)
