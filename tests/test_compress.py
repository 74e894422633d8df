"""sensitivity.compress: quantize-dequantize in memory, with importance checked per tensor."""

import numpy as np
import pytest
import torch

from moeplan.sensitivity.compress import quantize_dequantize, quantize_dequantize_kv_b

MLA = {"num_attention_heads": 4, "num_key_value_heads": 1, "qk_nope_head_dim": 32, "v_head_dim": 16, "kv_lora_rank": 64}
KV_B = "model.layers.1.self_attn.kv_b_proj.weight"


def test_importance_of_the_wrong_length_is_an_error_naming_the_tensor():
    """An importance vector that does not have one value per input column was silently dropped."""
    w = torch.randn(8, 64)
    name = "model.layers.0.mlp.down_proj.weight"
    assert quantize_dequantize(w, "Q8_0", np.ones(64, np.float32), name).shape == w.shape
    with pytest.raises(ValueError, match=r"importance of model\.layers\.0\.mlp\.down_proj\.weight has shape \(32,\)"):
        quantize_dequantize(w, "Q8_0", np.ones(32, np.float32), name)
    with pytest.raises(ValueError, match=r"importance of model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        quantize_dequantize_kv_b(torch.randn(4 * 48, 64), "Q8_0", MLA, np.ones(32, np.float32), KV_B)
