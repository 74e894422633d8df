"""The shipped reference MoE models: they load, they model text, their routing is healthy, and
their validation / calibration / training documents are disjoint."""

import hashlib
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeplan.sensitivity import reference
from moeplan.sensitivity.adapters import adapter_for
from moeplan.sensitivity.factory import data
from moeplan.sensitivity.factory.train import MODEL_SPECS, eval_stream, evaluate

MODELS = ["tiny-deepseek-v3", "tiny-qwen3-moe"]
# Perplexity bounds on the first 8 windows of 256 tokens of valid.txt: about twice what
# `python -m moeplan.sensitivity.factory.train card` measured on that split (results/model-card-<name>.md).
PPL_BOUND = {"tiny-deepseek-v3": 130.0, "tiny-qwen3-moe": 190.0}
TEST_WINDOWS = 8


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    name = request.param
    model, tok = reference.load_reference_model(name)
    return name, model, tok


def test_both_models_are_shipped():
    assert reference.list_reference_models() == MODELS
    assert set(MODELS) == set(MODEL_SPECS)


@pytest.mark.parametrize("name", MODELS)
def test_plain_from_pretrained_loads_bf16(name):
    path = reference.reference_model_path(name)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert type(model).__name__ == {"tiny-deepseek-v3": "DeepseekV3ForCausalLM", "tiny-qwen3-moe": "Qwen3MoeForCausalLM"}[name]
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    n = sum(p.numel() for p in model.parameters())
    assert 8e6 <= n <= 16e6, n
    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == data.VOCAB_SIZE == cfg["vocab_size"]


def test_shapes_exercise_k_quants_and_fallbacks(loaded):
    name, model, _ = loaded
    cfg = model.config
    assert cfg.hidden_size % 256 == 0 and cfg.moe_intermediate_size % 256 == 0
    adapter = adapter_for(model)
    for layer in adapter.moe_layers():
        gate = adapter.router(layer)
        assert gate.top_k == 4 and gate.num_experts == 16
    widths = {n: p.shape[-1] for n, p in model.named_parameters() if p.dim() >= 2}
    expert = [w for n, w in widths.items() if ".experts." in n]
    assert expert and all(w % 256 == 0 for w in expert)
    if name == "tiny-deepseek-v3":
        assert cfg.first_k_dense_replace == 1 and cfg.n_group == 4 and cfg.topk_group == 2 and cfg.n_shared_experts == 1
        odd = {n.split(".")[-2] for n, w in widths.items() if w % 256}
        assert {"q_b_proj", "kv_b_proj", "o_proj"} <= odd
        bias = model.model.layers[1].mlp.gate.e_score_correction_bias
        assert bias.dtype == torch.float32 and bias.abs().max() > 0  # trained, not the zero init


def test_tokenizer_round_trips(loaded):
    _, _, tok = loaded
    texts = [d.text for d in reference.reference_documents("valid")[:6]]
    texts.append("def f(x):\n\treturn x ** 2  # ünïcödé, 中文, emoji \U0001f600\r\n\n    trailing   ")
    for t in texts:
        ids = tok(t)["input_ids"]
        assert tok.eos_token_id not in ids
        assert tok.decode(ids) == t
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == data.EOS_TOKEN


@pytest.fixture(scope="module")
def measured(loaded):
    name, model, tok = loaded
    stream = eval_stream(tok, reference.reference_documents(name, "valid"))
    return name, evaluate(model, stream, seq_len=256, max_windows=TEST_WINDOWS)


def test_perplexity_is_far_below_vocabulary(measured):
    name, ev = measured
    assert ev["tokens"] == TEST_WINDOWS * 255
    assert math.isfinite(ev["ppl"])
    assert ev["ppl"] < PPL_BOUND[name] < data.VOCAB_SIZE / 10


def test_every_expert_is_used_and_importance_differs(measured):
    _, ev = measured
    assert len(ev["expert_share"]) >= 3
    spread = []
    for layer, shares in ev["expert_share"].items():
        assert len(shares) == 16
        assert abs(sum(shares) - 16) < 1e-3
        assert min(shares) >= 0.25 and max(shares) <= 4.0, (layer, shares)
        spread.append(max(shares) / min(shares))
    assert max(spread) > 1.2  # experts are not interchangeable


@pytest.mark.parametrize("name", MODELS)
def test_splits_are_disjoint_and_verified(name):
    man = reference.reference_manifest(name)
    ids = {s: [e["id"] for e in man["splits"][s]] for s in ("valid", "calib")}
    ids["train"] = [i for i, _ in man["splits"]["train"]]
    hashes = {s: [e["sha256"] for e in man["splits"][s]] for s in ("valid", "calib")}
    hashes["train"] = [h for _, h in man["splits"]["train"]]
    for s in ids:
        assert len(set(ids[s])) == len(ids[s]) and len(set(hashes[s])) == len(hashes[s])
    for a, b in (("train", "valid"), ("train", "calib"), ("valid", "calib")):
        assert not set(ids[a]) & set(ids[b]), (a, b)
        assert not set(hashes[a]) & set(hashes[b]), (a, b)
    for split in ("valid", "calib"):
        docs = reference.reference_documents(name, split)  # raises if any text differs from its hash
        assert [d.doc_id for d in docs] == ids[split]
        assert {d.domain for d in docs} == {"prose", "code"}
        # only permissively licensed / public-domain text ships
        assert all(data.SOURCES[d.source].permissive for d in docs)
        assert 50_000 < len(reference.reference_text(name, split).encode()) < 400_000


def test_every_model_ships_the_same_text():
    for split in ("valid", "calib"):
        digests = {hashlib.sha256(reference.reference_text(n, split).encode()).hexdigest() for n in MODELS}
        assert len(digests) == 1
        assert reference.reference_text(split) == reference.reference_text(MODELS[1], split)


def test_shipped_size_budget():
    total = sum(p.stat().st_size for n in MODELS for p in reference.reference_model_path(n).iterdir())
    assert total < 62e6, total


def test_reference_api_errors():
    with pytest.raises(KeyError, match="tiny-deepseek-v3"):
        reference.reference_model_path("tiny-llama")
    with pytest.raises(ValueError, match="train split is not shipped"):
        reference.reference_text("tiny-qwen3-moe", "train")
    with pytest.raises(TypeError, match="dtype"):
        reference.load_reference_model("tiny-qwen3-moe", dtype="float32")


# ---------------------------------------------------------------- corpus logic, on synthetic documents


def _synthetic_docs():
    docs = []
    for src in data.SOURCES:
        for i in range(60):
            body = f"{src} document {i}\n" + ("word " * (50 + 37 * i % 400))
            docs.append(data.Document.make(src, f"doc{i}", body))
    return docs


def test_split_is_deterministic_disjoint_and_licence_aware():
    docs = _synthetic_docs()
    a = data.split_documents(docs)
    b = data.split_documents(list(reversed(docs)))
    assert {s: [d.doc_id for d in a[s]] for s in a} == {s: [d.doc_id for d in b[s]] for s in b}
    seen = [d.doc_id for s in a for d in a[s]]
    assert sorted(seen) == sorted(d.doc_id for d in docs)  # every document exactly once
    for split in ("valid", "calib"):
        assert a[split], split
        assert all(data.SOURCES[d.source].permissive for d in a[split])
        for src in data.SOURCES:
            assert sum(len(d.text) for d in a[split] if d.source == src) <= data.SHIPPED_CHARS_PER_SOURCE
    assert all(d.source != "handbook" for s in ("valid", "calib") for d in a[s])


def test_split_round_trips_through_disk(tmp_path):
    docs = data.split_documents(_synthetic_docs())["valid"]
    entries = data.write_split(tmp_path / "valid.txt", docs)
    back = data.read_split(tmp_path / "valid.txt", entries)
    assert [(d.doc_id, d.text, d.sha256) for d in back] == [(d.doc_id, d.text, d.sha256) for d in docs]
    entries[0]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="does not match its sha256"):
        data.read_split(tmp_path / "valid.txt", entries)


def test_handbook_html_to_text():
    page = (
        '<html><head><title>T</title></head><body><div id="banner">Download</div>'
        '<ul class="docnav"><li>Prev</li></ul><div class="para">APT  is\n\t a <code>tool</code>.</div>'
        "<pre>  apt update\n  apt install x</pre><ul class=\"docnav\"><li>Next</li></ul></body></html>"
    )
    p = data._HandbookText()
    p.feed(page)
    assert p.text() == "APT is a tool.\n\n  apt update\n  apt install x\n"
