"""evaluate(): KL 0 and top-1 agreement 1 for an unmodified model; KL > 0 once weights change."""

import copy

import pytest
import torch

from moeplan.sensitivity.evaluate import ReferenceLogits, chunk_tokens, evaluate


@pytest.fixture(scope="module")
def tiny_moe():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_unmodified_model_has_zero_kl(tiny_moe):
    windows = chunk_tokens(torch.randint(0, 128, (4 * 33,), generator=torch.Generator().manual_seed(1)), 33)
    ref = ReferenceLogits(tiny_moe, windows, batch_size=3)
    r = evaluate(tiny_moe, ref)
    assert r.n_tokens == 4 * 32
    assert r.top1_agreement == 1.0
    assert r.kld_mean == 0.0 and r.kld_p99 == 0.0
    assert r.perplexity == pytest.approx(ref.perplexity, rel=1e-5)


def test_perturbed_model_has_positive_kl(tiny_moe):
    windows = chunk_tokens(torch.randint(0, 128, (4 * 33,), generator=torch.Generator().manual_seed(1)), 33)
    ref = ReferenceLogits(tiny_moe, windows)
    other = copy.deepcopy(tiny_moe)
    with torch.no_grad():
        w = other.model.layers[1].self_attn.o_proj.weight
        w.add_(torch.randn_like(w) * w.std() * 2)
    r = evaluate(other, ref)
    assert r.kld_mean > 1e-4
    assert r.kld_p99 >= r.kld_mean
    assert r.top1_agreement < 1.0


def test_too_short_text_errors():
    with pytest.raises(ValueError, match="fewer than one window"):
        chunk_tokens([1, 2, 3], 16)


def test_windows_spread_over_the_whole_text():
    ids = torch.arange(100 * 10)
    w = chunk_tokens(ids, 10, 40)  # 4 of the 100 windows, evenly spaced
    assert w.shape == (4, 10)
    assert w[:, 0].tolist() == [0, 250, 500, 750]
    assert torch.equal(chunk_tokens(ids, 10, 5000), ids.view(100, 10))  # everything when it fits
    assert torch.equal(chunk_tokens(ids[:95], 10), ids[:90].view(9, 10))  # the short tail is dropped
    with pytest.raises(ValueError, match="less than one window"):
        chunk_tokens(ids, 10, 5)


@pytest.mark.parametrize("start", [0, 1, 2])
def test_rerun_from_cached_layer_inputs_equals_full_forward(tiny_moe, start):
    windows = chunk_tokens(torch.randint(0, 128, (4 * 33,), generator=torch.Generator().manual_seed(2)), 33)
    ref = ReferenceLogits(tiny_moe, windows, batch_size=3, cache_layer_inputs=True)
    plain = ReferenceLogits(tiny_moe, windows, batch_size=3)
    assert ref.perplexity == pytest.approx(plain.perplexity, rel=1e-6)
    assert evaluate(tiny_moe, ref, start_layer=start).kld_mean < 1e-9  # unchanged model
    other = copy.deepcopy(tiny_moe)
    layer = min(start, 1)
    with torch.no_grad():
        w = other.model.layers[layer].self_attn.o_proj.weight
        w.add_(torch.randn_like(w, generator=torch.Generator().manual_seed(3)) * w.std())
        if start == 2:  # a change in the head only
            other = copy.deepcopy(tiny_moe)
            h = other.lm_head.weight
            h.add_(torch.randn_like(h, generator=torch.Generator().manual_seed(4)) * h.std())
    full = evaluate(other, plain)
    fast = evaluate(other, ref, start_layer=start)
    assert full.kld_mean > 1e-4
    assert fast.kld_mean == pytest.approx(full.kld_mean, rel=1e-4)
    assert fast.top1_agreement == pytest.approx(full.top1_agreement, abs=1e-3)
