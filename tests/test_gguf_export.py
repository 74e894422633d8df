"""GGUF export: round trip through gguf's reader and decoder, llama.cpp against transformers on the
same compressed weights, pruning, input errors before any byte, determinism, interrupted writes."""

from __future__ import annotations

import json
import textwrap
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from moeplan import kernels
from moeplan.kernels import formats as fmts
from moeplan.kernels import gguf_export as ge
from moeplan.kernels.gguf_families import family_of
from moeplan.kernels.gguf_reader import read_back
from moeplan.kernels.inventory import Target, build_inventory

gguf = pytest.importorskip("gguf")

AVAILABLE = set(kernels.available_formats())


def _pick(*names: str) -> str:
    """The first format of `names` that has a kernel in this build."""
    for n in names:
        if n in AVAILABLE:
            return n
    raise AssertionError(f"none of {names} is built")


VOCAB = 384
PY_TEXT = textwrap.dedent('''\
    def wrap(text, width=70, **kwargs):
        """Wrap a single paragraph of text, returning a list of wrapped lines."""
        w = TextWrapper(width=width, **kwargs)
        return w.wrap(text)
    ''')


# ---------------------------------------------------------------------------------------------
# tiny models


def _train_tokenizer(out: Path) -> None:
    """Byte-level BPE trained on a few KB of the Python standard library's own sources."""
    import heapq
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "".join(Path(m.__file__).read_text()[:6000] for m in (textwrap, string, heapq))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    assert tok.get_vocab_size() == VOCAB
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}))


def _randomize(model, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms around 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g) / max(1.0, p.shape[-1] / 256) ** 0.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def _deepseek_config(**over):
    from transformers import DeepseekV3Config

    kw = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
              num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8,
              num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
              q_lora_rank=128, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
              routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=4096,
              bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    kw.update(over)
    return DeepseekV3Config(**kw)


def _qwen_config(**over):
    from transformers import Qwen3MoeConfig

    kw = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=6,
              num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=4096,
              bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    kw.update(over)
    return Qwen3MoeConfig(**kw)


def _build(out: Path, cfg, seed: int = 0, dtype=torch.bfloat16, scale: float = 0.08) -> Path:
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    _randomize(model, seed, scale)
    model.to(dtype).save_pretrained(out)
    _train_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("ds") / "tiny-deepseek", _deepseek_config())


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("qw") / "tiny-qwen3moe", _qwen_config(), seed=1, dtype=torch.float32)


def _ckpt(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


# format plans: "float" keeps every weight in a float or 8-bit type, "quant" mixes low-bit formats
# (with llama.cpp's fallback where rows are not a multiple of the block)

def _plan_float(inv) -> dict[str, str]:
    out = {}
    for t in inv:
        if not t.quantizable:
            continue
        if t.expert is not None:
            out[t.name] = "Q8_0" if t.layer % 2 else "F16"
        elif t.kind in ("o_proj", "kv_b_proj", "q_proj"):
            out[t.name] = "F16"
        elif t.kind == "lm_head" or t.name.startswith("lm_head"):
            out[t.name] = "Q8_0"
    return out  # the rest: BF16 (default)


def _plan_quant(inv) -> dict[str, str]:
    q4k, q5k, q6k = _pick("Q4_K", "Q4_0"), _pick("Q5_K", "Q5_1"), _pick("Q6_K", "Q8_0")
    out = {}
    for t in inv:
        if not t.quantizable:
            continue
        if t.expert is not None:
            out[t.name] = {"gate_proj": q4k, "up_proj": _pick("TQ2_0", "Q4_1"), "down_proj": q5k}[t.kind]
            if t.layer == 1 and t.kind == "up_proj":
                out[t.name] = _pick("Q4_1")
        elif t.role.value == "embedding":
            out[t.name] = q6k
        elif t.role.value == "head":
            out[t.name] = "Q8_0"
        elif t.kind in ("kv_b_proj", "o_proj", "q_b_proj"):
            out[t.name] = q4k  # k_b rows are 64, v_b 256, o 128, q_b 128: fallbacks and fits
        elif t.kind in ("q_proj", "k_proj", "v_proj"):
            out[t.name] = _pick("Q5_0")
        else:
            out[t.name] = _pick("Q4_0")
    return out


def _with_codebook(inv, formats: dict[str, str]) -> tuple[dict[str, str], dict[str, np.ndarray] | None]:
    """The last MoE layer's down experts in IQ2_XXS (with importance) when the codebook kernels are built."""
    if "IQ2_XXS" not in AVAILABLE:
        return formats, None
    last = max(t.layer for t in inv if t.expert is not None)
    rng = np.random.default_rng(1)
    importance = {}
    for t in inv:
        if t.expert is not None and t.layer == last and t.kind == "down_proj":
            formats[t.name] = "IQ2_XXS"
            importance[t.name] = rng.uniform(0.5, 2.0, t.shape[-1]).astype(np.float32)
    return formats, importance


def _write(model_dir: Path, out: Path, formats, **kw) -> ge.GGUFReport:
    return ge.write_gguf(model_dir, out, formats, progress=False, **kw)


# ---------------------------------------------------------------------------------------------
# round trip through the gguf package


def _gguf_decode(raw, type_id, shape):
    return np.asarray(gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType(type_id)), dtype=np.float32).reshape(shape)


def _expected_stored(model_dir: Path, report: ge.GGUFReport, config: dict, importance=None) -> dict[str, np.ndarray]:
    """What each GGUF tensor must decode to: the checkpoint tensor (split / stacked as llama.cpp lays it
    out) quantized by moeplan's kernels directly and dequantized again."""
    sd = _ckpt(model_dir)
    importance = importance or {}
    out = {}
    for t in report.tensors:
        src = [sd[n].float() for n in t.sources]
        imp = None
        if t.name.endswith("_exps.weight"):
            x = torch.stack(src)
            if t.sources[0] in importance:
                imp = np.stack([importance[n] for n in t.sources])
        elif ".attn_k_b." in t.name or ".attn_v_b." in t.name:
            h, nope, v = config["num_attention_heads"], config["qk_nope_head_dim"], config["v_head_dim"]
            kv = src[0].view(h, nope + v, -1)
            if ".attn_k_b." in t.name:
                x = kv[:, :nope].transpose(1, 2).contiguous()
            else:
                x = kv[:, nope:].contiguous()
                imp = importance.get(t.sources[0])
        else:
            x = src[0]
            imp = importance.get(t.sources[0])
            if t.shape != tuple(x.shape):  # router rows / exp_probs_b of kept experts
                raise AssertionError(f"unexpected shape change for {t.name}")
        x = x.contiguous()
        if t.type == "F32":
            out[t.name] = x.numpy()
        else:
            out[t.name] = kernels.dequantize(kernels.quantize(x, t.type, imp), t.type, tuple(x.shape))
    return out


def _check_roundtrip(model_dir: Path, path: Path, report: ge.GGUFReport, formats: dict, importance=None):
    config = json.loads((model_dir / "config.json").read_text())
    inv = build_inventory(model_dir)
    reader = gguf.GGUFReader(str(path))

    # layout: standard GGUF v3, 32-byte aligned tensor data, tensors as the report says
    assert reader.fields["GGUF.version"].contents() == 3
    assert reader.alignment == 32 and reader.data_offset % 32 == 0
    by_name = report.by_name()
    assert [t.name for t in reader.tensors] == [t.name for t in report.tensors]
    for t in reader.tensors:
        rt = by_name[t.name]
        assert t.tensor_type.name == rt.type, t.name
        assert tuple(reversed(t.shape.tolist())) == rt.shape, t.name
        assert t.n_bytes == rt.nbytes == fmts.get(rt.type).nbytes(rt.shape), t.name
        assert (t.data_offset - reader.data_offset) % 32 == 0
        # the stored type is the requested one after llama.cpp's fallback, by the stored row length
        for src in rt.sources:
            want = formats.get(src, "BF16") if inv[src].quantizable else "F32"
            assert rt.type == fmts.resolve(want, rt.shape[-1]).name, (t.name, want)
    # sizes: the tensors' bytes are what the inventory predicts for the gguf target
    predicted = sum(inv[n].nbytes(formats.get(n, "BF16"), Target.GGUF, config)
                    for n in {s for t in report.tensors for s in t.sources})
    assert report.total_tensor_bytes == predicted
    assert report.file_size == path.stat().st_size
    last = reader.tensors[-1]
    assert report.file_size == last.data_offset + last.n_bytes

    # values: gguf's decoder == moeplan's decoder == the checkpoint quantized directly
    expected = _expected_stored(model_dir, report, config, importance)
    for t in reader.tensors:
        shape = by_name[t.name].shape
        ours = kernels.dequantize(np.ascontiguousarray(t.data).view(np.uint8).reshape(-1), int(t.tensor_type), shape)
        theirs = _gguf_decode(t.data, int(t.tensor_type), shape)
        np.testing.assert_array_equal(ours, theirs, err_msg=t.name)
        np.testing.assert_array_equal(ours, expected[t.name], err_msg=t.name)

    # read_back undoes the split and the stacking: the checkpoint's names and shapes again
    cfg, state, kept = read_back(path, config)
    sd = _ckpt(model_dir)
    names = set(sd) - {n for n in sd if n.startswith("model.layers.") and int(n.split(".")[2]) >= config["num_hidden_layers"]}
    assert set(state) == names
    for n, x in state.items():
        assert x.shape == tuple(sd[n].shape), n
    return reader


def test_roundtrip_deepseek(ds_dir, tmp_path):
    inv = build_inventory(ds_dir)
    formats = _plan_quant(inv)
    sd = _ckpt(ds_dir)
    rng = np.random.default_rng(0)
    importance = {n: rng.uniform(0.1, 2.0, sd[n].shape[-1]).astype(np.float32)
                  for n in ("model.layers.1.self_attn.kv_b_proj.weight", "model.layers.0.mlp.down_proj.weight")}
    for e in range(8):
        n = f"model.layers.2.mlp.experts.{e}.down_proj.weight"
        importance[n] = rng.uniform(0.1, 2.0, sd[n].shape[-1]).astype(np.float32)
        formats[n] = _pick("IQ2_XXS", formats[n])  # a codebook format where built: it needs the importance
    path = tmp_path / "ds.gguf"
    report = _write(ds_dir, path, formats, importance=importance)
    reader = _check_roundtrip(ds_dir, path, report, formats, importance)
    names = {t.name for t in reader.tensors}
    # MLA layout: kv_b split into k_b (H, kv_lora, nope) and v_b (H, v, kv_lora); experts stacked
    assert report.by_name()["blk.1.attn_k_b.weight"].shape == (2, 256, 64)
    assert report.by_name()["blk.1.attn_v_b.weight"].shape == (2, 64, 256)
    assert report.by_name()["blk.2.ffn_gate_exps.weight"].shape == (8, 256, 256)
    assert "blk.1.attn_kv_b.weight" not in names and "blk.1.exp_probs_b.bias" in names
    assert report.by_name()["blk.1.ffn_gate_inp.weight"].type == "F32"
    kv = {f.name: f for f in reader.fields.values()}
    want = {"general.architecture": "deepseek2", "deepseek2.block_count": 3, "deepseek2.expert_count": 8,
            "deepseek2.expert_used_count": 2, "deepseek2.expert_group_count": 2, "deepseek2.expert_group_used_count": 1,
            "deepseek2.expert_gating_func": 2, "deepseek2.leading_dense_block_count": 1, "deepseek2.attention.head_count_kv": 1,
            "deepseek2.attention.kv_lora_rank": 256, "deepseek2.attention.q_lora_rank": 128,
            "deepseek2.attention.key_length": 288, "deepseek2.attention.value_length": 256,
            "deepseek2.attention.key_length_mla": 96, "deepseek2.attention.value_length_mla": 64,
            "deepseek2.rope.dimension_count": 32, "deepseek2.expert_shared_count": 1, "deepseek2.expert_weights_norm": True,
            "deepseek2.expert_feed_forward_length": 256, "deepseek2.vocab_size": VOCAB, "deepseek2.context_length": 4096,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.eos_token_id": 1, "general.name": "tiny-deepseek"}
    for k, v in want.items():
        assert kv[k].contents() == v, k
    assert kv["deepseek2.expert_weights_scale"].contents() == pytest.approx(2.5)
    assert kv["general.quantization_version"].contents() == 2
    assert kv["general.file_type"].contents() in {int(t) for t in gguf.LlamaFileType}
    assert len(kv["tokenizer.ggml.tokens"].contents()) == VOCAB
    assert kv["tokenizer.ggml.token_type"].contents()[:2] == [3, 3]  # the special tokens are CONTROL
    assert len(kv["tokenizer.ggml.merges"].contents()) == VOCAB - 256 - 2


def test_roundtrip_qwen(qwen_dir, tmp_path):
    inv = build_inventory(qwen_dir)
    formats = _plan_quant(inv)
    path = tmp_path / "qw.gguf"
    report = _write(qwen_dir, path, formats)
    reader = _check_roundtrip(qwen_dir, path, report, formats)
    kv = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.ggml.")}
    assert kv["general.architecture"] == "qwen3moe"
    assert (kv["qwen3moe.expert_count"], kv["qwen3moe.expert_used_count"]) == (6, 2)
    assert (kv["qwen3moe.attention.head_count"], kv["qwen3moe.attention.head_count_kv"]) == (4, 2)
    assert kv["qwen3moe.attention.key_length"] == kv["qwen3moe.attention.value_length"] == 64
    assert report.by_name()["blk.0.attn_q_norm.weight"].type == "F32"
    assert report.by_name()["blk.1.ffn_down_exps.weight"].shape == (6, 256, 256)


def test_fused_expert_checkpoint_gives_the_same_file(qwen_dir, tmp_path):
    """A checkpoint that stores experts fused (gate_up_proj (E, 2I, H), down_proj (E, H, I)) writes
    the same bytes as the per-expert one."""
    from safetensors.torch import save_file

    fused_dir = tmp_path / "tiny-qwen3moe"
    fused_dir.mkdir()
    sd = _ckpt(qwen_dir)
    out = {}
    for n, x in sd.items():
        if ".mlp.experts." not in n:
            out[n] = x
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        gate = torch.stack([sd[f"{p}.{e}.gate_proj.weight"] for e in range(6)])
        up = torch.stack([sd[f"{p}.{e}.up_proj.weight"] for e in range(6)])
        out[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        out[f"{p}.down_proj"] = torch.stack([sd[f"{p}.{e}.down_proj.weight"] for e in range(6)]).contiguous()
    save_file(out, str(fused_dir / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (fused_dir / f).write_bytes((qwen_dir / f).read_bytes())
    formats = _plan_quant(build_inventory(qwen_dir))
    a = _write(qwen_dir, tmp_path / "a.gguf", formats)
    b = _write(fused_dir, tmp_path / "b.gguf", formats)
    assert a.tensors == b.tensors
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_streams_one_expert_or_row_chunk_at_a_time(qwen_dir, tmp_path, monkeypatch):
    """No quantize call sees a stacked expert tensor or more than a chunk of rows, and chunking does
    not change a byte."""
    import moeplan.kernels.api  # noqa: F401 (loads kernels.api)

    formats = _plan_quant(build_inventory(qwen_dir))
    whole = _write(qwen_dir, tmp_path / "whole.gguf", formats)
    real = kernels.api.quantize
    shapes = []

    def recording(x, *a, **k):
        shapes.append(tuple(x.shape))
        return real(x, *a, **k)

    monkeypatch.setattr(kernels.api, "quantize", recording)
    monkeypatch.setattr(ge, "CHUNK_BYTES", 64 * 1024)  # 64 rows of 256 float32
    chunked = _write(qwen_dir, tmp_path / "chunked.gguf", formats)
    assert chunked.tensors == whole.tensors
    assert (tmp_path / "whole.gguf").read_bytes() == (tmp_path / "chunked.gguf").read_bytes()
    assert all(len(s) == 2 for s in shapes)  # experts one by one
    assert max(s[0] * s[1] for s in shapes) == 256 * 256  # one expert; embeddings / head in 64-row chunks
    assert shapes.count((64, 256)) >= 2 * VOCAB // 64


def test_skips_multi_token_prediction_layers(ds_dir, tmp_path):
    """DeepSeek-V3 checkpoints carry the MTP block as layer num_hidden_layers; llama.cpp's converter
    leaves it out, and so does this writer."""
    from safetensors.torch import save_file

    d = tmp_path / "tiny-deepseek"
    d.mkdir()
    for f in ds_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    extra = {"model.layers.3.eh_proj.weight": torch.zeros(256, 512), "model.layers.3.enorm.weight": torch.ones(256),
             "model.layers.3.mlp.experts.0.gate_proj.weight": torch.zeros(256, 256)}
    save_file(extra, str(d / "model-mtp.safetensors"))
    a = _write(ds_dir, tmp_path / "a.gguf", {})
    b = _write(d, tmp_path / "b.gguf", {"model.layers.3.eh_proj.weight": "Q8_0"})
    assert sorted(b.skipped) == sorted(extra)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_fp8_checkpoint_is_dequantized_blockwise(ds_dir, tmp_path):
    """DeepSeek-V3's released weights are float8_e4m3fn with one float32 weight_scale_inv per
    128x128 block (quantization_config.quant_method = fp8)."""
    from safetensors.torch import save_file

    sd = _ckpt(ds_dir)
    out, expected = {}, {}
    for n, x in sd.items():
        linear = x.dim() == 2 and n.endswith("proj.weight") or ".experts." in n
        if not linear:
            out[n] = x
            continue
        w = x.float()
        r, c = w.shape
        br, bc = -(-r // 128), -(-c // 128)
        pad = torch.zeros(br * 128, bc * 128)
        pad[:r, :c] = w
        blocks = pad.view(br, 128, bc, 128)
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0 + 1e-12  # (br, bc)
        q = (blocks / scale[:, None, :, None]).view(br * 128, bc * 128)[:r, :c].to(torch.float8_e4m3fn)
        out[n] = q.contiguous()
        out[n + "_scale_inv"] = scale.float().contiguous()
        full = scale.repeat_interleave(128, 0)[:r].repeat_interleave(128, 1)[:, :c]
        expected[n] = (q.float() * full).numpy()
    d = tmp_path / "tiny-deepseek"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"))
    cfg = json.loads((ds_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((ds_dir / f).read_bytes())
    report = _write(d, tmp_path / "fp8.gguf", {}, default_format="F32")
    assert not any(s.endswith("_scale_inv") for t in report.tensors for s in t.sources)
    _, state, _ = read_back(tmp_path / "fp8.gguf", cfg)
    assert expected.keys() <= state.keys()
    for n, want in expected.items():
        np.testing.assert_array_equal(state[n], want, err_msg=n)


def test_deepseek_v3_metadata_from_its_config():
    """The bundled DeepSeek-V3 config passes the checks and gives llama.cpp's keys (YaRN included)."""
    import gguf as g

    from moeplan.kernels.inventory import BUNDLED_CONFIGS

    cfg = json.loads(BUNDLED_CONFIGS["deepseek-v3"].read_text())
    fam = family_of(cfg)
    fam.validate(cfg)

    class Keys(g.GGUFWriter):
        def __init__(self):
            super().__init__(None, "deepseek2")

    w = Keys()
    fam.metadata(w, cfg, 192, 6)
    kv = {k: v.value for k, v in w.kv_data[0].items()}
    a = "deepseek2."
    assert kv[a + "block_count"] == 61 and kv[a + "leading_dense_block_count"] == 3
    assert (kv[a + "expert_count"], kv[a + "expert_used_count"]) == (192, 6)
    assert (kv[a + "expert_group_count"], kv[a + "expert_group_used_count"]) == (8, 4)
    assert kv[a + "attention.key_length"] == 576 and kv[a + "attention.value_length"] == 512
    assert kv[a + "attention.key_length_mla"] == 192 and kv[a + "attention.value_length_mla"] == 128
    assert kv[a + "rope.scaling.type"] == "yarn" and kv[a + "rope.scaling.factor"] == 40
    assert kv[a + "rope.scaling.original_context_length"] == 4096
    assert kv[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)
    assert kv[a + "expert_gating_func"] == 2 and kv[a + "expert_weights_scale"] == 2.5


# ---------------------------------------------------------------------------------------------
# errors before any byte; determinism; interrupted writes


def _no_output(tmp_path: Path) -> None:
    assert [p.name for p in tmp_path.iterdir()] == []


def test_errors_before_any_byte(ds_dir, tmp_path):
    out = tmp_path / "x.gguf"
    e0 = "model.layers.1.mlp.experts.0.gate_proj.weight"
    with pytest.raises(ValueError, match="does not have.*no_such"):
        _write(ds_dir, out, {"model.layers.1.no_such.weight": "Q8_0"})
    with pytest.raises(ValueError, match="unknown format 'Q9_9'"):
        _write(ds_dir, out, {e0: "Q9_9"})
    with pytest.raises(ValueError, match="unknown format"):
        _write(ds_dir, out, {}, default_format="bogus")
    with pytest.raises(ValueError, match=r"layer 1 gate_proj.*one tensor.*ffn_gate_exps.*F16.*Q8_0"):
        _write(ds_dir, out, {e0: "F16", "model.layers.1.mlp.experts.1.gate_proj.weight": "Q8_0"}, default_format="Q8_0")
    with pytest.raises(ValueError, match=r"one expert count.*keeps 4 in layer 1, 6 in layer 2"):
        _write(ds_dir, out, {}, kept_experts={1: [0, 1, 4, 5], 2: [0, 1, 2, 4, 5, 6]})
    with pytest.raises(ValueError, match=r"layer 1 keeps \[3, 1\] experts in its 2 routing groups"):
        _write(ds_dir, out, {}, kept_experts={1: [0, 1, 2, 4], 2: [0, 1, 4, 5]})
    with pytest.raises(ValueError, match="at least 2 per group"):
        _write(ds_dir, out, {}, kept_experts={1: [0, 4], 2: [1, 5]})
    with pytest.raises(ValueError, match="outside 0..7"):
        _write(ds_dir, out, {}, kept_experts={1: [0, 1, 8, 5], 2: [0, 1, 4, 5]})
    with pytest.raises(ValueError, match="not MoE layers"):
        _write(ds_dir, out, {}, kept_experts={0: [0, 1, 4, 5]})
    with pytest.raises(ValueError, match="top_k=5 is not possible"):
        _write(ds_dir, out, {}, top_k=5)  # one group of 4 experts is selected
    with pytest.raises(ValueError, match="stored as F32"):
        _write(ds_dir, out, {"model.layers.1.mlp.gate.weight": "Q8_0"})
    with pytest.raises(ValueError, match="importance.*shape"):
        _write(ds_dir, out, {}, importance={e0: np.ones(7)})
    with pytest.raises(ValueError, match="importance is given for some experts"):
        _write(ds_dir, out, {}, importance={e0: np.ones(256)})
    iq = [f for f in ("IQ2_XXS", "IQ2_XS", "IQ3_S") if f in AVAILABLE]
    if iq:
        with pytest.raises(ValueError, match="needs importance"):
            _write(ds_dir, out, {"model.layers.0.mlp.gate_proj.weight": iq[0]})
    _no_output(tmp_path)


def test_qwen_config_that_llama_cpp_cannot_express(qwen_dir, tmp_path):
    cfg = json.loads((qwen_dir / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in qwen_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": False}))
    with pytest.raises(ValueError, match="norm_topk_prob=false"):
        _write(bad, tmp_path / "x.gguf", {})
    assert not (tmp_path / "x.gguf").exists()


def test_deterministic(qwen_dir, tmp_path):
    formats = _plan_float(build_inventory(qwen_dir))
    _write(qwen_dir, tmp_path / "a.gguf", formats)
    ge.write_gguf(qwen_dir, tmp_path / "b.gguf", formats, progress=True)  # the progress bar changes nothing
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_no_file(qwen_dir, tmp_path, monkeypatch, exc):
    import moeplan.kernels.api  # noqa: F401 (loads kernels.api)

    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")  # an earlier file stays as it was
    real = kernels.api.quantize
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise exc("injected")
        return real(*a, **k)

    monkeypatch.setattr(kernels.api, "quantize", failing)
    with pytest.raises(exc, match="injected"):
        _write(qwen_dir, out, {})
    assert len(calls) == 5
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ---------------------------------------------------------------------------------------------
# llama.cpp runs the file: its logits against transformers' on the same compressed weights
#
# llama.cpp's CPU matmuls first round the activations to the weight type's "vec_dot_type"
# (ggml-cpu.c: f16 for F16, bf16 for BF16, 8-bit blocks for the quantized types); transformers runs
# float32. In a tiny random MoE such rounding flips routing decisions and, once one rounding step
# differs, later ones cascade: even transformers with llama.cpp's rounding emulated exactly agrees
# with itself run in float64 only to ~4e-4 (F16), ~4e-3 (BF16), 2e-2 to 3e-1 (Q8_0) of the logit
# scale. So the tight checks use files whose matmul weights are F32 (no activation rounding): the
# architecture, names, layouts, split, stacking, pruning and metadata are checked to ~1e-6. That
# llama.cpp decodes each format's bytes as moeplan does is checked tightly through the token
# embedding (a row lookup, no activation rounding), and files mixing many formats are checked
# within the bounds the rounding allows.

try:
    import llama_cpp  # noqa: F401

    _HAVE_LLAMA = True
except ImportError:  # pragma: no cover
    _HAVE_LLAMA = False

needs_llama = pytest.mark.skipif(not _HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install moeplan[llama])")
pytestmark = pytest.mark.usefixtures("llama_no_repack")  # llama.cpp's weight repacking off (conftest.py)

TIGHT_TOL = 1e-4  # max |llama.cpp - transformers| / max |logit| without activation rounding (measured ~3e-6)
MIXED_MEDIAN_TOL = 0.1  # the median position's max |diff| / max |logit| with rounding (measured 0.8e-2 to 4.7e-2)
MIXED_TOP1 = 0.75  # top-1 agreement with rounding (measured 0.85 to 0.975)


def _hf_compressed(path: Path, model_dir: Path, tmp: Path):
    """transformers' float32 model of what the GGUF file holds (dequantized weights, pruned experts, top-k)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    cfg, state, kept = read_back(path, config)
    d = tmp / f"hf-{path.stem}"
    d.mkdir()
    save_file({n: torch.from_numpy(np.ascontiguousarray(x)) for n, x in state.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({**cfg, "dtype": "float32"}))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _tokens(model_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(PY_TEXT).ids[:40]


def _llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)  # F32 KV cache: no rounding inside attention either
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@dataclass
class Agreement:
    max_err: float  # max over positions and vocabulary of |llama.cpp - transformers| / max |transformers logit|
    median_err: float  # median over positions of the per-position max
    top1: float  # fraction of positions with the same argmax

    def __str__(self):
        return f"max|diff|/max|logit| {self.max_err:.1e}, median position {self.median_err:.1e}, top-1 {self.top1:.3f}"


def _agreement(got: np.ndarray, ref: np.ndarray) -> Agreement:
    scale = float(np.abs(ref).max())
    per_pos = np.abs(got - ref).max(-1) / scale
    return Agreement(float(per_pos.max()), float(np.median(per_pos)), float(np.mean(got.argmax(-1) == ref.argmax(-1))))


def _compare(path: Path, model_dir: Path, tmp: Path) -> Agreement:
    tokens = _tokens(model_dir)
    got = _llama_logits(path, tokens)
    with torch.no_grad():
        ref = _hf_compressed(path, model_dir, tmp)(torch.tensor([tokens])).logits[0].float().numpy()
    return _agreement(got, ref)


def _assert_tight(a: Agreement) -> None:
    assert a.max_err < TIGHT_TOL and a.top1 == 1.0, str(a)


def _assert_mixed(a: Agreement) -> None:
    assert a.median_err < MIXED_MEDIAN_TOL and a.top1 >= MIXED_TOP1, str(a)


def _model_dir(family: str, ds_dir: Path, qwen_dir: Path, tmp: Path) -> Path:
    if family == "deepseek":
        return ds_dir
    if family == "qwen":
        return qwen_dir
    if family == "deepseek-rope-halves":  # rope_interleave=false: rope rows reordered for llama.cpp
        return _build(tmp / "ds-halves", _deepseek_config(rope_interleave=False), seed=3)
    if family == "deepseek-yarn":  # DeepSeek-V3's own rope scaling
        return _build(tmp / "ds-yarn", _deepseek_config(max_position_embeddings=163840, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}), seed=4)
    raise AssertionError(family)


@pytest.mark.llama
@needs_llama
@pytest.mark.parametrize("family", ["deepseek", "qwen", "deepseek-rope-halves", "deepseek-yarn"])
def test_llama_cpp_matches_transformers_exactly_in_f32(family, ds_dir, qwen_dir, tmp_path):
    model_dir = _model_dir(family, ds_dir, qwen_dir, tmp_path)
    path = tmp_path / "f32.gguf"
    _write(model_dir, path, {}, default_format="F32")
    a = _compare(path, model_dir, tmp_path)
    print(f"{family} F32: {a}")
    _assert_tight(a)


@pytest.mark.llama
@needs_llama
def test_llama_cpp_decodes_every_format_like_moeplan(qwen_dir, tmp_path):
    """Each format as the token embedding (llama.cpp dequantizes the looked-up rows, no activation
    rounding), the rest F32: llama.cpp's logits equal transformers' on moeplan's dequantized values."""
    from transformers import AutoModelForCausalLM

    tokens = _tokens(qwen_dir)
    model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.float32, attn_implementation="eager").eval()
    emb = "model.embed_tokens.weight"
    w = _ckpt(qwen_dir)[emb].float().contiguous()
    checked = []
    imp = np.random.default_rng(0).uniform(0.5, 2.0, w.shape[-1]).astype(np.float32)
    for fmt in kernels.available_formats():
        if fmt == "F32":
            continue
        importance = {emb: imp} if fmts.get(fmt).needs_importance else None
        path = tmp_path / f"{fmt}.gguf"
        _write(qwen_dir, path, {emb: fmt}, default_format="F32", importance=importance)
        with torch.no_grad():
            deq = kernels.dequantize(kernels.quantize(w, fmt, importance and imp), fmt, tuple(w.shape))
            model.model.embed_tokens.weight.copy_(torch.from_numpy(deq))
            ref = model(torch.tensor([tokens])).logits[0].numpy()
        a = _agreement(_llama_logits(path, tokens), ref)
        print(f"token_embd {fmt}: {a}")
        _assert_tight(a)
        checked.append(fmt)
        path.unlink()
    assert {"F16", "BF16", "Q8_0"} <= set(checked)


@pytest.mark.llama
@needs_llama
@pytest.mark.parametrize("plan", ["float", "quant"])
@pytest.mark.parametrize("family", ["deepseek", "qwen"])
def test_llama_cpp_runs_mixed_format_files(family, plan, ds_dir, qwen_dir, tmp_path):
    model_dir = _model_dir(family, ds_dir, qwen_dir, tmp_path)
    inv = build_inventory(model_dir)
    path = tmp_path / "mixed.gguf"
    formats, importance = (_plan_float(inv), None) if plan == "float" else _with_codebook(inv, _plan_quant(inv))
    report = _write(model_dir, path, formats, importance=importance)
    assert len(report.bytes_by_type()) >= 3
    a = _compare(path, model_dir, tmp_path)
    print(f"{family} {plan} mix {sorted(report.bytes_by_type())}: {a}")
    _assert_mixed(a)


@pytest.mark.llama
@needs_llama
@pytest.mark.parametrize("family", ["deepseek", "qwen"])
def test_pruned_file_runs_in_llama_cpp(family, ds_dir, qwen_dir, tmp_path):
    model_dir = _model_dir(family, ds_dir, qwen_dir, tmp_path)
    # DeepSeek: 2 of the 4 experts in each of the 2 routing groups; Qwen: 4 of 6
    kept = {1: [1, 3, 4, 6], 2: [0, 2, 5, 7]} if family == "deepseek" else {0: [0, 2, 3, 5], 1: [1, 2, 4, 5]}
    top_k = 2 if family == "deepseek" else 3
    n_routed = 8 if family == "deepseek" else 6
    inv = build_inventory(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    formats = _plan_quant(inv)
    layer = min(kept)
    pruned = next(e for e in range(n_routed) if e not in kept[layer])
    formats[f"model.layers.{layer}.mlp.experts.{pruned}.gate_proj.weight"] = "F16"  # pruned: does not split the type
    path = tmp_path / "pruned.gguf"
    report = _write(model_dir, path, formats, kept_experts=kept, top_k=top_k)
    assert (report.expert_count, report.expert_used_count) == (4, top_k)
    # bytes: the inventory's prediction over the kept experts, with the router's rows (and
    # exp_probs_b) cut to the 4 kept
    predicted = 0
    for t in inv:
        if t.expert is not None and t.expert not in kept[t.layer]:
            continue
        b = t.nbytes(formats.get(t.name, "BF16"), Target.GGUF, config)
        if t.layer in kept and (t.kind == "gate" or "e_score_correction_bias" in t.name):
            b = b * 4 // n_routed
        predicted += b
    assert report.total_tensor_bytes == predicted
    reader = gguf.GGUFReader(str(path))
    assert reader.fields[f"{report.arch}.expert_count"].contents() == 4
    assert reader.fields[f"{report.arch}.expert_used_count"].contents() == top_k
    for layer, ks in kept.items():
        assert reader.fields[f"moeplan.kept_experts.{layer}"].contents() == ks
    # the stacked experts, router rows and correction biases are the kept ones, in order
    sd = _ckpt(model_dir)
    cfg, state, kept_back = read_back(path, config)
    assert kept_back == kept and cfg["num_experts_per_tok"] == top_k
    for layer, ks in kept.items():
        np.testing.assert_array_equal(state[f"model.layers.{layer}.mlp.gate.weight"],
                                      sd[f"model.layers.{layer}.mlp.gate.weight"].float().numpy()[ks])
        if family == "deepseek":
            bias = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
            np.testing.assert_array_equal(state[bias], sd[bias].float().numpy()[ks])
    a = _compare(path, model_dir, tmp_path)
    print(f"{family} pruned, mixed formats: {a}")
    _assert_mixed(a)
    # and exactly, with F32 weights
    path32 = tmp_path / "pruned32.gguf"
    _write(model_dir, path32, {}, default_format="F32", kept_experts=kept, top_k=top_k)
    a = _compare(path32, model_dir, tmp_path)
    print(f"{family} pruned, F32: {a}")
    _assert_tight(a)


@pytest.mark.llama
@needs_llama
def test_llama_cpp_tokenizes_like_the_checkpoint(qwen_dir, tmp_path):
    import llama_cpp
    from tokenizers import Tokenizer

    path = tmp_path / "m.gguf"
    _write(qwen_dir, path, {}, default_format="Q8_0")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        hf = Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
        for text in (PY_TEXT, "x = [1, 22, 333]  # it's   spaced\n\n\tdone", "naïve café — ünïcode"):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf.encode(text).ids, text
        assert llm.token_bos() == 0 and llm.token_eos() == 1
    finally:
        llm.close()


def _converter_size_label(reader) -> str:
    """general.size_label as llama.cpp's converter computes it: shared parameters plus one expert's,
    times the expert count ("6x1.2M"), from the tensors in the file."""
    shared = expert = 0
    counts = []
    for t in reader.tensors:
        n = int(np.prod([int(d) for d in t.shape]))
        if "_exps." in t.name and len(t.shape) >= 3:
            e = int(t.shape[-1])  # GGUF order: (cols, rows, experts)
            expert += n // e
            counts.append(e)
        else:
            shared += n
    return gguf.size_label(shared + expert * (sum(counts) // max(len(counts), 1)), shared, expert,
                           sum(counts) // max(len(counts), 1))


@pytest.mark.parametrize("kept", [None, {0: [0, 2, 3, 5], 1: [1, 2, 4, 5]}])
def test_general_type_and_size_label(qwen_dir, tmp_path, kept):
    inv = build_inventory(qwen_dir)
    path = tmp_path / "qw.gguf"
    _write(qwen_dir, path, _plan_quant(inv), kept_experts=kept, top_k=None if kept is None else 2)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.type"].contents() == "model"
    label = reader.fields["general.size_label"].contents()
    assert label == _converter_size_label(reader)
    assert re.fullmatch(r"\d+x\d+(\.\d+)?[KMBT]", label), label
    assert label.startswith("6x" if kept is None else "4x")


@needs_llama
def test_llama_cpp_loads_without_weight_repacking(qwen_dir, tmp_path):
    """The llama_no_repack fixture reaches llama.cpp: no tensor goes to the CPU_REPACK (or AMX) buffer."""
    import llama_cpp

    inv = build_inventory(qwen_dir)
    path = tmp_path / "q4.gguf"
    _write(qwen_dir, path, {t.name: "Q4_0" for t in inv if t.quantizable})  # Q4_0 repacks on x86 with AVX2
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=16, verbose=False)
    try:
        assert llm.model_params.use_extra_bufts is False
    finally:
        llm.close()


def test_tensor_data_goes_through_gguf_py_writer(qwen_dir, tmp_path, monkeypatch):
    """Each tensor's bytes are handed to GGUFWriter.write_tensor_data, in file order (not written to
    the writer's file object behind its back)."""
    import gguf

    real = gguf.GGUFWriter.write_tensor_data
    calls = []

    def counting(self, tensor, *a, **k):
        calls.append(tensor.nbytes)
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", counting)
    report = _write(qwen_dir, tmp_path / "a.gguf", {}, default_format="Q8_0")
    assert calls == [t.nbytes for t in report.tensors]
