"""The out-of-core path: one decoder layer in memory at a time, the same numbers as the whole model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moeplan.kernels.checkpoint import Checkpoint
from moeplan.kernels.inventory import MODELS_DIR, build_inventory

REFERENCE = ["tiny-deepseek-v3", "tiny-qwen3-moe"]


def _batch():
    return (torch.arange(2 * 48).view(2, 48) * 7) % 4000


@pytest.mark.parametrize("name", REFERENCE)
def test_streaming_forward_equals_the_in_memory_model_bit_for_bit(name):
    from transformers import AutoModelForCausalLM

    from moeplan.sensitivity.evaluate import _log_probs
    from moeplan.sensitivity.streaming import StreamingModel

    d = MODELS_DIR / name
    sm = StreamingModel(d)
    a = sm.log_probs(_batch())
    b = _log_probs(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval(), _batch())
    assert torch.equal(a, b)
    # every part went back to the meta device: nothing of the weights stays in memory
    assert all(p.is_meta for p in sm.model.parameters())


def _small_config(**kw) -> dict:
    cfg = json.loads((MODELS_DIR / "tiny-qwen3-moe" / "config.json").read_text())
    cfg.update({"num_hidden_layers": 3, **kw})
    return cfg


def test_generated_sharded_checkpoint_reads_back_and_runs(tmp_path):
    from moeplan.sensitivity.factory.generated import write_random_checkpoint
    from moeplan.sensitivity.streaming import StreamingModel

    d = write_random_checkpoint(tmp_path / "gen", _small_config(), shard_bytes=2 << 20)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    inv = build_inventory(d)
    assert len(inv) == len(index["weight_map"])
    lp = StreamingModel(d).log_probs(_batch())
    assert torch.isfinite(lp).all()


def test_fp8_checkpoint_is_dequantized_by_blocks(tmp_path):
    from moeplan.sensitivity.factory.generated import write_random_checkpoint

    d = write_random_checkpoint(tmp_path / "fp8", _small_config(hidden_size=320), dtype="F8_E4M3")
    cfg = json.loads((d / "config.json").read_text())
    ck = Checkpoint(d, cfg)
    name = "model.layers.1.self_attn.q_proj.weight"  # (256, 320): 2 x 3 blocks, the last one partial
    raw = ck._raw(name, (0, ck.shape(name)[0]))
    scale = ck._raw(name + "_scale_inv", (0, 2)).float()
    assert raw.dtype == torch.float8_e4m3fn and tuple(scale.shape) == (2, 3)
    want = raw.float() * scale.repeat_interleave(128, 0)[:256].repeat_interleave(128, 1)[:, :320]
    assert torch.equal(ck.read(name), want)
    # row chunks on block boundaries give the same values
    assert torch.equal(ck.read(name, rows=(128, 256)), want[128:256])


def test_layers_beyond_the_config_are_never_read(tmp_path):
    """DeepSeek-V3's multi-token-prediction layer sits in the checkpoint after the last decoder layer."""
    import shutil

    from safetensors.torch import save_file

    from moeplan.sensitivity.streaming import StreamingModel

    d = tmp_path / "m"
    shutil.copytree(MODELS_DIR / "tiny-deepseek-v3", d)
    n = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    save_file({f"model.layers.{n}.eh_proj.weight": torch.full((8, 8), float("nan"))}, str(d / "model-mtp.safetensors"))
    sm = StreamingModel(d)
    assert torch.isfinite(sm.log_probs(_batch())).all()


_RSS_PROBE = r"""
import resource, sys, torch
from moeplan.sensitivity.streaming import StreamingModel
sm = StreamingModel(sys.argv[1])
batch = (torch.arange(2 * 32).view(2, 32) * 7) % 4000
sm.log_probs(batch)  # warm up allocators and import paths
base = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current size
sm.log_probs(batch)
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(peak - base)
"""


@pytest.mark.slow
def test_peak_memory_is_one_layer_not_the_model(tmp_path):
    from moeplan.sensitivity.factory.generated import write_random_checkpoint

    cfg = _small_config(num_hidden_layers=8, hidden_size=512, moe_intermediate_size=512, num_local_experts=32)
    d = write_random_checkpoint(tmp_path / "big", cfg)
    inv = build_inventory(d)
    model_f32 = 2 * inv.bytes_uniform("BF16")
    layer_f32 = max(sum(t.numel for t in inv if t.layer == i) for i in range(8)) * 4
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("this kernel does not allow resetting the peak RSS (/proc/self/clear_refs)")
    r = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(d)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.strip().splitlines()[-1])
    assert layer_f32 * 8 <= model_f32 * 1.2  # the model really is several layers
    assert growth < 3 * layer_f32 + (64 << 20), (growth, layer_f32, model_f32)
    assert growth < model_f32 / 2
