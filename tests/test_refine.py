"""kernels.refine (output-aware refinement of IQ1_S blocks), the experts' input grams it is given, and
`moeplan materialize --refine` end to end."""

import copy

import numpy as np
import pytest
import torch

from moeplan.kernels import dequantize, quantize
from moeplan.kernels.inventory import MODELS_DIR
from moeplan.kernels.refine import DAMPING, refinable, refine

MODEL = "tiny-deepseek-v3"


def _correlated(rows: int, cols: int, tokens: int, seed: int):
    """A weight matrix and the gram of inputs that are correlated and share a mean direction, as
    normalized hidden states are."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols)
    x = rng.standard_normal((tokens, cols)) @ mix + rng.standard_normal(cols) * 0.7
    x *= np.exp(rng.standard_normal(cols) * 0.5)  # columns of unequal scale
    return w, x.T @ x, x


def _output_error(w, blocks, gram, fmt="IQ1_S"):
    q = dequantize(blocks, fmt).astype(np.float64)
    r = q - w
    h = gram / np.mean(np.diag(gram)) + DAMPING * np.eye(gram.shape[0])
    return float(np.einsum("ri,ij,rj->", r, h, r))


@pytest.mark.parametrize("fmt", ["IQ1_S", "IQ2_XXS"])
@pytest.mark.parametrize("seed", range(3))
def test_refinement_lowers_the_output_error_and_writes_plain_blocks(fmt, seed):
    import gguf.quants

    w, gram, x = _correlated(24, 512, 3000, seed)  # two super-blocks a row
    start = quantize(w, fmt, np.diag(gram) / x.shape[0])
    out = refine(start, fmt, w, gram)
    assert out.shape == start.shape and out.dtype == np.uint8
    before, after = _output_error(w, start, gram, fmt), _output_error(w, out, gram, fmt)
    assert after < 0.8 * before  # correlated inputs: the diagonal misses most of the output's error
    # the blocks are ordinary GGUF blocks: gguf-py's decoder reads the same values as moeplan's
    ref = gguf.quants.dequantize(out, getattr(gguf.GGMLQuantizationType, fmt))
    np.testing.assert_array_equal(ref, dequantize(out, fmt))
    # and the output error on the inputs themselves falls with it
    err = lambda b: np.mean(((dequantize(b, fmt) - w) @ x.T) ** 2)  # noqa: E731
    assert err(out) < err(start)


@pytest.mark.parametrize("fmt", ["IQ1_S", "IQ2_XXS"])
def test_refinement_reads_and_writes_the_blocks_exactly(fmt):
    # with nothing to gain (the blocks decoded, parsed and encoded again), the bytes come back unchanged
    from moeplan.kernels.refine import _REFINERS

    w, gram, _ = _correlated(16, 512, 800, 5)
    start = quantize(w, fmt, np.diag(gram) / 800)
    r = _REFINERS[fmt](start, w.astype(np.float64), np.eye(512))
    np.testing.assert_array_equal(r.q, dequantize(start, fmt))
    assert np.array_equal(r.encode(), start)


@pytest.mark.parametrize("fmt", ["IQ1_S", "IQ2_XXS"])
@pytest.mark.parametrize("seed", range(2))
def test_refinement_never_raises_the_error_it_descends_on(fmt, seed):
    # independent inputs (a diagonal gram, the importance's own objective) and a gram of fewer
    # tokens than columns: every change is kept only when the loss goes down
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    for gram in (np.diag(rng.uniform(0.1, 3.0, 256)), _correlated(1, 256, 40, seed)[1]):
        start = quantize(w, fmt, np.diag(gram).astype(np.float32))
        out = refine(start, fmt, w, gram)
        assert _output_error(w, out, gram, fmt) <= _output_error(w, start, gram, fmt) * (1 + 1e-12)


def test_refinement_is_deterministic_and_leaves_other_formats_alone():
    w, gram, x = _correlated(8, 256, 500, 0)
    imp = np.diag(gram) / 500
    start = quantize(w, "IQ1_S", imp)
    assert np.array_equal(refine(start, "IQ1_S", w, gram), refine(start.copy(), "IQ1_S", w, gram))
    for fmt in ("Q4_K", "IQ2_XS", "IQ3_XXS", "Q8_0"):
        assert not refinable(fmt)
        blocks = quantize(w, fmt, imp)
        assert refine(blocks, fmt, w, gram) is blocks
    # an expert no token reached: nothing to refine for
    assert np.array_equal(refine(start, "IQ1_S", w, np.zeros((256, 256))), start)


def test_refinement_refuses_what_does_not_fit():
    w, gram, _ = _correlated(4, 256, 300, 1)
    start = quantize(w, "IQ1_S", np.ones(256, np.float32))
    with pytest.raises(ValueError, match="gram has shape"):
        refine(start, "IQ1_S", w, gram[:128, :128])
    with pytest.raises(ValueError, match="blocks have shape"):
        refine(start[:, :40], "IQ1_S", w, gram)
    with pytest.raises(ValueError, match="one matrix"):
        refine(start, "IQ1_S", w[None], gram)
    bad = gram.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        refine(start, "IQ1_S", w, bad)


needs_model = pytest.mark.skipif(not (MODELS_DIR / MODEL / "profile.json").exists(),
                                 reason=f"the shipped {MODEL} model is not in this checkout")


@needs_model
def test_expert_grams_hold_the_importance_on_their_diagonal():
    from transformers import AutoModelForCausalLM

    from moeplan.sensitivity.adapters import ExpertKind, adapter_for, record_routing
    from moeplan.sensitivity.evaluate import chunk_tokens, load_text_ids
    from moeplan.sensitivity.grams import expert_input_grams

    grams = expert_input_grams(MODEL, tokens=512, seq_len=128)
    model = AutoModelForCausalLM.from_pretrained(str(MODELS_DIR / MODEL), dtype=torch.float32).eval()
    ad = adapter_for(model)
    _, ids = load_text_ids(MODEL, None, "calib", "profiling", "--calib")
    with torch.no_grad(), record_routing(ad, keep_logits=False, importance="gate_up_down") as rec:
        model(chunk_tokens(ids, 128, 512))
    layer = ad.moe_layers()[0]
    st = rec.stats(layer)
    assert len(grams) == 3 * sum(ad.n_experts(l) for l in ad.moe_layers())
    for e in range(ad.n_experts(layer)):
        gate = grams[ad.expert_tensor_name(layer, e, ExpertKind.GATE)]
        down = grams[ad.expert_tensor_name(layer, e, ExpertKind.DOWN)]
        assert gate.tokens == down.tokens == int(st.tokens[e])
        np.testing.assert_allclose(np.diag(gate.gram), st.sum_sq_in[e].numpy(), rtol=1e-4)
        np.testing.assert_allclose(np.diag(down.gram), st.sum_sq_mid[e].numpy(), rtol=1e-4)
        assert np.allclose(gate.gram, gate.gram.T)


@pytest.fixture(scope="module")
def iq1s_plan():
    """A gguf plan of the bundled DeepSeek-V3 miniature (30% of BF16) with every routed expert as IQ1_S."""
    from moeplan.allocator import solve
    from moeplan.allocator.plan import make_plan
    from moeplan.allocator.sweep import ProblemFactory
    from moeplan.kernels.inventory import EXPERT_RE, build_inventory
    from moeplan.sensitivity.profile import Profile

    path = MODELS_DIR / MODEL
    inv = build_inventory(path)
    p = ProblemFactory(inv, Profile.load(path / "profile.json"), target="gguf", context=0, reserve=0)(
        int(0.3 * inv.bytes_uniform("BF16")))
    sol = solve(p, "lagrangian")
    a = sol.assignment.copy()
    formats = [f.name if hasattr(f, "name") else str(f) for f in p.formats]
    a.expert_fmt[a.keep] = formats.index("IQ1_S")
    plan = make_plan(p, a, sol.report())
    marked = [n for n in plan.tensors if EXPERT_RE.search(n)]
    assert {plan.tensors[n] for n in marked} == {"IQ1_S"}
    return plan, marked


@needs_model
def test_materialize_refine_lowers_the_kl_of_the_same_bytes(tmp_path, iq1s_plan):
    # the routed experts as IQ1_S: --refine changes those tensors only, keeps every size, and the model
    # computes closer to the original (KL on held-out text)
    from moeplan.allocator.cli.materialize import load_compressed, materialize
    from moeplan.sensitivity.evaluate import ReferenceLogits, chunk_tokens, evaluate, load_model_and_text

    plan, marked = iq1s_plan
    path, original, ids = load_model_and_text(MODEL, None, "valid", "evaluation", "--text")
    ref = ReferenceLogits(original, chunk_tokens(ids, 128, 1024))
    kl = {}
    for refined in (False, True):
        out = tmp_path / f"refined-{refined}"
        rep = materialize(str(path), plan, gguf_out=out.with_suffix(".gguf"), hf_out=out, progress=False,
                          refine=refined, refine_tokens=16384 if refined else None)
        assert rep.refined == (len(marked) if refined else 0)
        kl[refined] = evaluate(load_compressed(out), ref).kld_mean
    assert kl[True] < 0.92 * kl[False]  # measured: 0.00820 -> 0.00686

    import gguf

    plain, better = (gguf.GGUFReader(str(tmp_path / f"refined-{r}.gguf")) for r in (False, True))
    changed = set()
    for a, b in zip(plain.tensors, better.tensors):
        assert (a.name, a.tensor_type, a.n_bytes) == (b.name, b.tensor_type, b.n_bytes)
        if not np.array_equal(np.asarray(a.data), np.asarray(b.data)):
            changed.add(a.name)
    layers = [l.layer for l in plan.layers]
    assert changed == {f"blk.{layer}.ffn_{k}_exps.weight" for layer in layers for k in ("gate", "up", "down")}


@needs_model
def test_refine_leaves_experts_with_fewer_tokens_than_columns_as_quantized(tmp_path, iq1s_plan):
    # one window of 128 tokens: every expert saw fewer than its 256 columns; nothing is refined, and
    # the report says why
    import gguf

    from moeplan.allocator.cli.materialize import materialize

    plan, marked = iq1s_plan
    plain = materialize(MODEL, plan, gguf_out=tmp_path / "plain.gguf", progress=False)
    rep = materialize(MODEL, plan, gguf_out=tmp_path / "few.gguf", progress=False, refine=True, refine_tokens=128)
    assert plain.refined == rep.refined == 0
    assert any(f"{len(marked)} expert matrices saw fewer calibration tokens" in n for n in rep.notes)
    a, b = (gguf.GGUFReader(str(tmp_path / f)) for f in ("plain.gguf", "few.gguf"))
    assert all(np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(a.tensors, b.tensors))


@needs_model
def test_refine_options_without_refine_are_refused(tmp_path):
    from moeplan.allocator.cli.materialize import materialize

    with pytest.raises(ValueError, match="add --refine"):
        materialize(MODEL, MODELS_DIR / MODEL / "missing-plan.json", gguf_out=tmp_path / "x.gguf", refine_tokens=512)
    assert not (tmp_path / "x.gguf").exists()
