"""Generated checkpoints: random weights with a real architecture's shapes, for scale tests and benchmarks.

    write_random_checkpoint(out_dir, config, dtype="BF16", shard_bytes=512 << 20)

The tensors are those a config.json's architecture has, under checkpoint names (one tensor per
routed expert), written shard by shard with model.safetensors.index.json, one tensor in memory at a
time, so a checkpoint larger than the machine's memory can be made. dtype "F8_E4M3" writes the
2-D weights as DeepSeek-V3's release does (float8_e4m3fn with a float32 `weight_scale_inv` per
128 x 128 block, `quantization_config.quant_method = "fp8"`). The tokenizer files of a shipped
reference model are copied when the vocabularies agree, so the result can be profiled and run.
Values: N(0, 0.02) weights (scaled by 1/sqrt(2 * layers) for output projections), unit norms,
zero router correction biases -- random, so measured damages mean nothing beyond speed and memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from moeplan.kernels.checkpoint import ST_ITEMSIZE, write_safetensors
from moeplan.kernels.inventory import MODELS_DIR, _from_config
from moeplan.kernels.outputs import json_text, output_dir

FP8_BLOCK = 128


def _values(name: str, shape: tuple[int, ...], gen: torch.Generator, n_layers: int) -> torch.Tensor:
    if "norm" in name:
        return torch.ones(shape)
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape)
    std = 0.02 / (math.sqrt(2 * n_layers) if any(k in name for k in ("o_proj", "down_proj")) else 1.0)
    return torch.randn(shape, generator=gen) * std


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv per 128 x 128 block) with w ~= fp8 * scale_inv."""
    r, c = w.shape
    br, bc = -(-r // FP8_BLOCK), -(-c // FP8_BLOCK)
    pad = torch.zeros(br * FP8_BLOCK, bc * FP8_BLOCK)
    pad[:r, :c] = w
    blocks = pad.view(br, FP8_BLOCK, bc, FP8_BLOCK).abs().amax(dim=(1, 3))
    scale_inv = (blocks / 448.0).clamp_min(1e-12)  # 448: float8_e4m3fn's largest finite value
    s = scale_inv.repeat_interleave(FP8_BLOCK, 0)[:r].repeat_interleave(FP8_BLOCK, 1)[:, :c]
    return (w / s).to(torch.float8_e4m3fn), scale_inv.float()


def write_random_checkpoint(out_dir: str | os.PathLike, config: dict, *, dtype: str = "BF16", seed: int = 0,
                            shard_bytes: int = 512 << 20) -> Path:
    if dtype not in ("BF16", "F16", "F32", "F8_E4M3"):
        raise ValueError(f"dtype {dtype!r}: use BF16, F16, F32 or F8_E4M3")
    config = dict(config)
    if dtype == "F8_E4M3":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    inv = _from_config(config, "generated")
    n_layers = int(config["num_hidden_layers"])
    gen = torch.Generator().manual_seed(seed)
    # (name, dtype, shape, produce) per tensor, split into shards of about shard_bytes
    shards: list[list] = [[]]
    size = 0
    for t in inv.tensors:
        fp8 = dtype == "F8_E4M3" and len(t.shape) == 2 and t.quantizable and "embed" not in t.name \
            and "lm_head" not in t.name
        if dtype != "F8_E4M3":
            stored = dtype
        elif fp8:
            stored = "F8_E4M3"
        else:  # what DeepSeek's FP8 release keeps unquantized: F32 correction biases, BF16 the rest
            stored = "F32" if "e_score_correction_bias" in t.name else "BF16"
        nbytes = int(np.prod(t.shape)) * ST_ITEMSIZE[stored]
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        size += nbytes
        if fp8:
            cache = {}

            def weight(t=t, cache=cache):
                cache["q"], cache["s"] = _fp8(_values(t.name, t.shape, gen, n_layers))
                return cache.pop("q")

            grid = (-(-t.shape[0] // FP8_BLOCK), -(-t.shape[1] // FP8_BLOCK))
            shards[-1].append((t.name, "F8_E4M3", t.shape, weight))
            shards[-1].append((t.name + "_scale_inv", "F32", grid, lambda cache=cache: cache.pop("s")))
        else:
            shards[-1].append((t.name, stored, t.shape, lambda t=t: _values(t.name, t.shape, gen, n_layers)))
    with output_dir(out_dir, "checkpoint") as tmp:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for name, specs in zip(names, shards):
            write_safetensors(tmp / name, specs)
            weight_map.update({s[0]: name for s in specs})
        (tmp / "model.safetensors.index.json").write_text(json_text({"metadata": {}, "weight_map": weight_map},
                                                                    indent=1) + "\n")
        (tmp / "config.json").write_text(json_text(config, indent=1) + "\n")
        for ref in sorted(MODELS_DIR.glob("*/config.json")):
            if json.loads(ref.read_text()).get("vocab_size") == config.get("vocab_size"):
                for f in ("tokenizer.json", "tokenizer_config.json", "calib.txt", "valid.txt"):
                    if (ref.parent / f).exists():
                        shutil.copy2(ref.parent / f, tmp / f)
                break
    return Path(out_dir)
