"""llama.cpp imatrix files (GGUF and legacy .dat) read as moeplan importance, mapped to checkpoint names."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeplan.kernels.gguf_layout import gguf_names
from moeplan.sensitivity.importance import load_importance_file
from moeplan.kernels import imatrix as im
from moeplan.kernels.inventory import build_inventory
from moeplan.sensitivity.importance import load_importance, save_importance

ROOT = Path(__file__).resolve().parent.parent
QWEN = ROOT / "sensitivity" / "models" / "tiny-qwen3-moe"
DS = ROOT / "sensitivity" / "models" / "tiny-deepseek-v3"


def _layout(model_dir: Path, seed: int = 0):
    """GGUF name -> (sums (nmat, cols), counts (nmat,)) for every 2-D weight llama-imatrix records
    (no token_embd), and the importance those mean: checkpoint name -> (cols,)."""
    rng = np.random.default_rng(seed)
    inv = build_inventory(model_dir)
    stacked: dict[str, dict[int, int]] = {}
    entries, want = {}, {}
    for t in inv:
        if len(t.shape) != 2 or t.name == "model.embed_tokens.weight":
            continue
        try:
            g = gguf_names(t.name)
        except ValueError:
            continue
        if t.expert is not None:
            stacked.setdefault(g[0], {})[t.expert] = t.shape[-1]
            continue
        if t.kind == "kv_b_proj":
            continue  # below
        cols = t.shape[-1]
        sums = (rng.uniform(0.5, 4.0, (1, cols)) * 64).astype(np.float32).astype(np.float64)  # as stored
        entries[g[0]] = (sums, np.array([64.0]))
        want[t.name] = (sums[0] / 64).astype(np.float32)
    for g, experts in stacked.items():
        n, cols = len(experts), next(iter(experts.values()))
        counts = rng.integers(1, 200, n).astype(np.float64)
        counts[1] = 0  # an expert the calibration text never routed to: ones (llama-quantize's reading)
        sums = (rng.uniform(0.5, 4.0, (n, cols)) * counts[:, None]).astype(np.float32).astype(np.float64)
        entries[g] = (sums, counts)
        layer = g.split(".")[1]
        kind = g.split(".")[2].removeprefix("ffn_").removesuffix("_exps") + "_proj"
        for e in range(n):
            v = np.ones(cols) if counts[e] == 0 else sums[e] / counts[e]
            want[f"model.layers.{layer}.mlp.experts.{e}.{kind}.weight"] = v.astype(np.float32)
    return entries, want


def _write_legacy(path: Path, entries, ncall: int = 7) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name in sorted(entries):
            sums, counts = entries[name]
            vals = []
            for s, c in zip(np.atleast_2d(sums), counts):
                vals.append(np.ones_like(s) * ncall if c == 0 else s / c * ncall)
            v = np.concatenate(vals).astype("<f4")
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, v.size) + v.tobytes())
        f.write(struct.pack("<i", 3))
        ds = b"calib.txt"
        f.write(struct.pack("<i", len(ds)) + ds)


def _check(got, want):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, err_msg=k)
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape


def test_gguf_imatrix_round_trip(tmp_path):
    entries, want = _layout(QWEN)
    path = tmp_path / "imatrix.gguf"
    im.write_imatrix_gguf(path, entries, chunk_count=3, chunk_size=128, datasets=["calib.txt"])
    import gguf

    r = gguf.GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    t = {x.name: x for x in r.tensors}
    n, cols = entries["blk.0.ffn_down_exps.weight"][0].shape
    assert n > 1  # ggml order (ne0 = cols, nmat = experts), as llama-imatrix writes it
    assert [int(d) for d in t["blk.0.ffn_down_exps.weight.in_sum2"].shape] == [cols, n]
    assert [int(d) for d in t["blk.0.ffn_down_exps.weight.counts"].shape] == [1, n]
    assert im.is_imatrix(path)
    data = im.read_imatrix(path)
    assert not data.legacy and data.chunk_count == 3 and data.chunk_size == 128 and data.datasets == ["calib.txt"]
    _check(load_importance_file(path, QWEN), want)


def test_legacy_dat_round_trip(tmp_path):
    entries, want = _layout(QWEN, seed=1)
    path = tmp_path / "imatrix.dat"
    _write_legacy(path, entries)
    assert im.is_imatrix(path)
    data = im.read_imatrix(path)
    assert data.legacy and data.chunk_count == 3 and data.datasets == ["calib.txt"]
    _check(load_importance_file(path, QWEN), want)


def test_deepseek_kv_b_takes_v_b_pooled_over_heads(tmp_path):
    entries, want = _layout(DS)
    inv = build_inventory(DS)
    kvb = next(t for t in inv if t.kind == "kv_b_proj")
    layer = kvb.layer
    heads, cols = 4, kvb.shape[-1]
    rng = np.random.default_rng(3)
    # llama-imatrix's layout for a per-head (3-D) weight: one row of heads x cols sums, one count
    sums = rng.uniform(1, 2, (heads, cols)).astype(np.float32).astype(np.float64) * 64
    entries[f"blk.{layer}.attn_v_b.weight"] = (sums.reshape(1, -1), np.array([64.0]))
    entries[f"blk.{layer}.attn_k_b.weight"] = (np.ones((1, heads * 7)), np.array([64.0]))  # no checkpoint tensor
    path = tmp_path / "imatrix.gguf"
    im.write_imatrix_gguf(path, entries)
    got = load_importance_file(path, DS)
    np.testing.assert_allclose(got[kvb.name], sums.mean(0) / 64, rtol=2e-6)
    # per-head counts (one per matrix): weighted by the rows each head saw
    counts = np.array([10.0, 20.0, 30.0, 40.0])
    entries[f"blk.{layer}.attn_v_b.weight"] = (sums * counts[:, None], counts)
    im.write_imatrix_gguf(path, entries)
    got = load_importance_file(path, DS)
    np.testing.assert_allclose(got[kvb.name], (sums * counts[:, None]).sum(0) / counts.sum(), rtol=2e-5)


def test_safetensors_passes_through(tmp_path):
    src = QWEN / "profile.importance.safetensors"
    got = load_importance_file(src, QWEN)
    ref = load_importance(src)
    assert set(got) == set(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)


def test_neither_format_is_a_clear_error(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not an importance file\n")
    with pytest.raises(im.ImportanceFileError, match="neither a moeplan importance file.*nor a llama.cpp imatrix"):
        load_importance_file(junk, QWEN)
    import gguf

    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(model), "qwen3moe")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(im.ImportanceFileError, match="GGUF file but not an imatrix"):
        load_importance_file(model, QWEN)
    assert not im.is_imatrix(model) and not im.is_imatrix(junk)


def test_materialize_accepts_an_imatrix(tmp_path):
    """--importance IMATRIX gives the same GGUF as the same importance in moeplan's .safetensors."""
    from moeplan.allocator import cli
    from moeplan.allocator.cli.materialize import materialize

    inv = build_inventory(QWEN)
    bf16 = inv.bytes_uniform("BF16")
    plan = tmp_path / "plan.json"
    assert cli.main(["solve", str(QWEN), "--profile", str(QWEN / "profile.json"), "--memory", str(int(0.2 * bf16)),
                     "--reserve", "0", "--context", "0", "--target", "gguf", "--out", str(plan)]) == 0
    entries, want = _layout(QWEN, seed=5)
    imat = tmp_path / "imatrix.gguf"
    im.write_imatrix_gguf(imat, entries)
    st = tmp_path / "imp.safetensors"
    save_importance(want, st)
    a = materialize(QWEN, plan, gguf_out=tmp_path / "a.gguf", importance_file=imat, progress=False)
    b = materialize(QWEN, plan, gguf_out=tmp_path / "b.gguf", importance_file=st, progress=False)
    assert a.gguf.file_size == b.gguf.file_size
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    # the command line says what is wrong with a file that is neither
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    rc = cli.main(["materialize", str(QWEN), str(plan), "--gguf", str(tmp_path / "c.gguf"), "--importance", str(junk)])
    assert rc == 2 and not (tmp_path / "c.gguf").exists()


def test_every_command_resolves_importance_the_same_way(tmp_path):
    """materialize, evaluate (and the curves and the demo, through the evaluator) resolve --importance
    in one place: an imatrix is read as materialize reads it, no file means the shipped one, a
    missing file is named with its option."""
    from moeplan.allocator import cli
    from moeplan.allocator.cli.model_commands import evaluate_plan
    from moeplan.sensitivity.importance import importance_vectors

    entries, want = _layout(QWEN, seed=6)
    imat = tmp_path / "imatrix.gguf"
    im.write_imatrix_gguf(imat, entries)
    st = tmp_path / "imp.safetensors"
    save_importance(want, st)
    p, got = importance_vectors(QWEN, imat, "--importance")
    assert p == imat
    _check(got, want)
    p, shipped = importance_vectors(QWEN, None)
    assert p == QWEN / "profile.importance.safetensors" and shipped
    with pytest.raises(FileNotFoundError, match="--importance .*nope does not exist"):
        importance_vectors(QWEN, tmp_path / "nope", "--importance")

    bf16 = build_inventory(QWEN).bytes_uniform("BF16")
    plan = tmp_path / "plan.json"
    assert cli.main(["solve", str(QWEN), "--profile", str(QWEN / "profile.json"), "--memory", str(int(0.2 * bf16)),
                     "--reserve", "0", "--context", "0", "--target", "gguf", "--out", str(plan)]) == 0
    a = evaluate_plan(str(QWEN), str(plan), tokens=256, seq_len=64, importance_file=str(imat))
    b = evaluate_plan(str(QWEN), str(plan), tokens=256, seq_len=64, importance_file=str(st))
    assert a.as_dict() == b.as_dict() and a.kld_mean > 0


# ---------------------------------------------------------------------------------------------
# a real file from llama-imatrix (skipped unless benchmarks/llama_tools.py has built the tools)

def _tools():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from llama_tools import find_llama_tools
    finally:
        sys.path.pop(0)
    return find_llama_tools()


@pytest.mark.skipif(_tools() is None, reason="llama.cpp's tools are not built (python benchmarks/llama_tools.py)")
def test_real_llama_imatrix_file(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from llama_tools import NO_REPACK, convert_hf_to_gguf
    finally:
        sys.path.pop(0)
    tools = _tools()
    f32 = convert_hf_to_gguf(tools, QWEN, tmp_path / "f32.gguf")
    out = tmp_path / "imatrix.gguf"
    subprocess.run([str(tools.imatrix), "-m", str(f32), "-f", str(QWEN / "calib.txt"), "-o", str(out), "-c", "128",
                    "--chunks", "4", "-t", "2", "--process-output", *NO_REPACK["llama-imatrix"]],
                   check=True, capture_output=True)
    data = im.read_imatrix(out)
    assert not data.legacy and data.chunk_count == 4
    imp = load_importance_file(out, QWEN)
    inv = build_inventory(QWEN)
    experts = [t for t in inv if t.expert is not None]
    assert all(t.name in imp for t in experts)
    assert "lm_head.weight" in imp and "model.embed_tokens.weight" not in imp
    for t in inv:
        if t.name in imp:
            assert imp[t.name].shape == (t.shape[-1],) and np.all(imp[t.name] > 0), t.name
