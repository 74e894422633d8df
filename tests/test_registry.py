"""The format registry against the `gguf` package and the C kernels' own block sizes."""

import gguf
import pytest

from moeplan.kernels import formats


@pytest.mark.parametrize("name", list(formats.FORMATS))
def test_registry_matches_gguf_sizes(name):
    f = formats.FORMATS[name]
    qt = gguf.GGMLQuantizationType[name]
    assert int(qt) == int(f.type_id)
    assert gguf.GGML_QUANT_SIZES[qt] == (f.block_size, f.type_size)


def test_c_block_sizes_match_registry():
    from moeplan.kernels import _C

    table = _C.format_table()
    assert table, "the C extension exports no formats"
    for type_id, name, block_size, type_size, needs_imp in table:
        f = formats.get(type_id)
        assert (f.name, f.block_size, f.type_size, f.needs_importance) == (name, block_size, type_size, bool(needs_imp))


def test_fallbacks_follow_llama_cpp():
    # DeepSeek-V3's attn_k_b rows have 128 values (qk_nope_head_dim), kv_a_proj 576 outputs etc.
    assert formats.resolve("Q4_K", 128).name == "Q5_0"
    assert formats.resolve("Q5_K", 128).name == "Q5_1"
    assert formats.resolve("Q6_K", 128).name == "Q8_0"
    assert formats.resolve("Q2_K", 128).name == "Q4_0"
    assert formats.resolve("Q3_K", 128).name == "Q4_0"
    assert formats.resolve("IQ2_XXS", 128).name == "IQ4_NL"
    assert formats.resolve("IQ4_XS", 96).name == "IQ4_NL"
    assert formats.resolve("TQ1_0", 64).name == "Q4_0"
    assert formats.resolve("Q4_K", 100).name == "F16"  # neither 256 nor 32 divides
    assert formats.resolve("Q8_0", 7168).name == "Q8_0"


def test_nbytes_exact():
    assert formats.get("Q4_K").nbytes((7168, 2048)) == 7168 * 8 * 144
    assert formats.get("Q8_0").nbytes((256, 7, 64)) == 256 * 7 * 2 * 34
    with pytest.raises(ValueError, match="multiple of 256.*Q5_0"):
        formats.get("Q4_K").nbytes((10, 128))


def test_get_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown format 'Q9_K'"):
        formats.get("Q9_K")
    assert formats.get("q4_k").name == "Q4_K"
    assert formats.get(12).name == "Q4_K"
