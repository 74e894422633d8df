"""The layer-streaming profiler: exact local measurements, sane costs, resumption, bounded memory, imatrix."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moeplan.kernels.inventory import MODELS_DIR, build_inventory

ROOT = Path(__file__).resolve().parents[1]
QWEN = MODELS_DIR / "tiny-qwen3-moe"
DSV3 = MODELS_DIR / "tiny-deepseek-v3"
MENU = ["IQ2_XXS", "Q4_K", "Q8_0"]


def _ids(path: Path, n: int = 4096) -> list[int]:
    from transformers import AutoTokenizer

    from moeplan.sensitivity.evaluate import encode_text

    return encode_text(AutoTokenizer.from_pretrained(str(path)), (path / "calib.txt").read_text())[:n]


def _profile(path: Path, **kw):
    from moeplan.sensitivity.layerwise import LayerwiseProfiler

    kw = {"seq_len": 64, "max_tokens": 512, "formats": MENU, "progress": False} | kw
    return LayerwiseProfiler(path, _ids(path), **kw).run(build_inventory(path).fingerprint)


@pytest.fixture(scope="module")
def qwen_profile():
    # every window in the gain and joint-correction streams: the exactness properties below hold as stated
    return _profile(QWEN, stream_share=1.0)


def test_profile_is_complete_finite_and_ordered(qwen_profile):
    prof, importance = qwen_profile
    inv = build_inventory(QWEN)
    quantizable = {t.name for t in inv if t.quantizable and len(t.shape) == 2}
    assert set(prof.tensor_damage) == quantizable
    for name, d in prof.tensor_damage.items():
        assert set(d) == set(MENU) and all(np.isfinite(v) and v >= 0 for v in d.values()), name
    # a coarser format costs more, for (nearly) every tensor
    worse = sum(d["IQ2_XXS"] > d["Q4_K"] > d["Q8_0"] for d in prof.tensor_damage.values())
    assert worse >= 0.95 * len(prof.tensor_damage)
    for layer, st in prof.experts.items():
        assert len(st.removal_kl) == st.n_experts and all(v > 0 for v in st.removal_kl)
        k0 = max(prof.topk_cost[layer])
        costs = [prof.topk_cost[layer][k] for k in range(1, k0 + 1)]
        assert costs[-1] == 0 and all(a > b for a, b in zip(costs, costs[1:]))  # fewer experts, more damage
    m = prof.meta
    assert m["profiler"] == "layerwise" and m["calibration_tokens"] == 8 * 63
    # the reference pass and the joint-correction streams (two per format) alone are 1 + 2 F full passes;
    # the 16 x 4 expert-removal streams run through 16 x (3 + 2 + 1) layers, 24 full passes
    assert 1 + 2 * len(MENU) + 24 <= m["full_pass_equivalents"] <= 100
    assert m["removal"] == "streams"
    assert set(importance) == quantizable


def test_profile_predicts_a_uniform_plan_exactly(qwen_profile):
    """The joint correction makes a plan that quantizes one class uniformly come out at its measured KL:
    re-measured here with the in-memory model."""
    from transformers import AutoModelForCausalLM

    from moeplan.sensitivity.compress import Decision, apply_decision
    from moeplan.sensitivity.evaluate import ReferenceLogits, chunk_tokens, evaluate

    prof, importance = qwen_profile
    model = AutoModelForCausalLM.from_pretrained(str(QWEN), dtype=torch.float32).eval()
    ref = ReferenceLogits(model, chunk_tokens(_ids(QWEN), 64, 512))
    formats = {n: ("Q4_K" if ".experts." in n else "BF16") for n in prof.tensor_damage}
    measured = evaluate(apply_decision(copy.deepcopy(model), Decision(formats=formats), importance), ref).kld_mean
    predicted = sum(prof.tensor_damage[n]["Q4_K"] for n in prof.tensor_damage if ".experts." in n)
    assert predicted == pytest.approx(measured, rel=0.02)


def test_streams_on_a_share_of_the_windows(qwen_profile):
    """The gain and joint-correction streams on a quarter of the windows (the default): less forward
    work, the same profile up to the sampling of the windows."""
    from scipy.stats import spearmanr

    whole, _ = qwen_profile
    prof, _ = _profile(QWEN)
    m = prof.meta
    assert m["stream_windows"] == 2 and whole.meta["stream_windows"] == 8
    # the 2 F joint-correction streams and the gain streams are a quarter as long; the reference, the
    # local runs and the 16 x 4 expert-removal streams are not
    assert m["full_pass_equivalents"] < whole.meta["full_pass_equivalents"] - 2 * len(MENU) * 0.75 + 1e-9
    names = sorted(prof.tensor_damage)
    for f in MENU:
        a = np.array([whole.tensor_damage[n][f] for n in names])
        b = np.array([prof.tensor_damage[n][f] for n in names])
        assert spearmanr(a, b)[0] > 0.9, f
        # the level: the joint correction's KL on 126 positions; Q8_0's (about 1e-4 nats) is at the noise
        # of so few positions, the coarser formats' is not
        assert f == "Q8_0" or 0.5 < b.sum() / a.sum() < 2, f
    for l, st in prof.experts.items():  # expert removal: its own streams over every window, unchanged
        assert st.removal_kl == pytest.approx(whole.experts[l].removal_kl, rel=0.05)


def test_swapped_tensors_come_back_bit_for_bit(tmp_path):
    """A tensor swapped for its quantized values is read back from the checkpoint afterwards: bit for bit
    what loading wrote (BF16 and FP8 with its block scales), and no float copy of it is kept."""
    from moeplan import kernels
    from moeplan.sensitivity.adapters import ExpertKind, TensorRole
    from moeplan.sensitivity.factory.generated import write_random_checkpoint
    from moeplan.sensitivity.layerwise import EXPERTS, OTHER, LayerwiseProfiler, _Group, _kind_view, _Quantized

    cfg = json.loads((DSV3 / "config.json").read_text())
    for dtype in ("BF16", "F8_E4M3"):
        d = write_random_checkpoint(tmp_path / dtype, cfg, dtype=dtype)
        p = LayerwiseProfiler(d, _ids(DSV3), seq_len=32, max_tokens=64, formats=["Q4_K"], progress=False)
        l = p.ad.moe_layers()[0]
        layer = p.sm.layers[l]
        with p.sm.loaded(layer):
            before = {k: v.detach().clone() for k, v in layer.state_dict().items()}
            ex = _kind_view(p.ad.experts_module(l), ExpertKind.UP)
            other = next(r for r in p.ad.linear_tensors(l) if r.role is not TensorRole.ROUTED_EXPERT)
            live_other = other.get()
            ex_before, other_before = ex.clone(), live_other.clone()
            q_ex = _Quantized.of(ex, "IQ2_XXS", np.ones((ex.shape[0], ex.shape[-1]), np.float32), "up")
            q_other = _Quantized.of(live_other, "Q4_K", None, other.name)
            swaps = [(_Group(f"{l}/experts/up", EXPERTS, [], "experts"), ex, q_ex),
                     (_Group(other.name, OTHER, [other.name], "layer"), live_other, q_other)]
            with p._swapped(l, swaps):
                for live, q, old in ((ex, q_ex, ex_before), (live_other, q_other, other_before)):
                    want = np.stack([kernels.dequantize(q.data[e], q.stored, q.shape[1:]) for e in range(q.shape[0])]) \
                        if len(q.shape) == 3 else kernels.dequantize(q.data, q.stored, q.shape)
                    assert torch.equal(live, torch.from_numpy(want)) and not torch.equal(live, old)
            after = layer.state_dict()
            for k, v in before.items():
                assert torch.equal(after[k], v), (dtype, k)


def test_matrices_are_quantized_and_read_a_chunk_of_rows_at_a_time(tmp_path, monkeypatch):
    """An embedding or a head is quantized, dequantized and read from the checkpoint in chunks of rows:
    the same bytes and values as all at once (BF16, and FP8 with chunks on its scale blocks)."""
    from moeplan import kernels
    from moeplan.kernels.checkpoint import Checkpoint
    from moeplan.sensitivity import layerwise
    from moeplan.sensitivity.factory.generated import write_random_checkpoint
    from moeplan.sensitivity.streaming import StreamingModel

    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((37, 512)).astype(np.float32))
    stack = torch.from_numpy(rng.standard_normal((3, 9, 256)).astype(np.float32))
    imp = rng.uniform(0.1, 2.0, 512).astype(np.float32)
    whole = {f: layerwise._Quantized.of(w, f, imp, "w") for f in ("Q4_K", "IQ2_XXS")}
    monkeypatch.setattr(layerwise, "_ROW_CHUNK_BYTES", 4 * 512 * 5)  # 5 rows a chunk
    for f, q0 in whole.items():
        q = layerwise._Quantized.of(w, f, imp, "w")
        assert np.array_equal(q.data, kernels.quantize(w, f, imp)) and np.array_equal(q.data, q0.data), f
        live = torch.empty_like(w)
        q.write_into(live)
        deq = torch.from_numpy(kernels.dequantize(q.data, f, tuple(w.shape)))
        assert torch.equal(live, deq)
        ids = np.array([36, 0, 5, 5, 11])
        assert torch.equal(q.rows(ids), deq[ids])
    qs = layerwise._Quantized.of(stack, "Q4_K", None, "stack")
    assert np.array_equal(qs.data, np.stack([kernels.quantize(m, "Q4_K") for m in stack]))
    out = torch.empty_like(stack)
    qs.write_into(out)
    assert torch.equal(out, torch.from_numpy(np.stack([kernels.dequantize(d, "Q4_K", (9, 256)) for d in qs.data])))

    cfg = json.loads((DSV3 / "config.json").read_text())
    for dtype in ("BF16", "F8_E4M3"):
        d = write_random_checkpoint(tmp_path / dtype, cfg, dtype=dtype)
        sm = StreamingModel(d)
        emb, head = sm.model.get_input_embeddings(), sm.model.get_output_embeddings()
        with sm.loaded(emb), sm.loaded(head):
            want = {m: m.weight.detach().clone() for m in (emb, head)}
        with monkeypatch.context() as mp:
            mp.setattr(Checkpoint, "row_chunk", lambda self, name, chunk_bytes=0: 128 if self.fp8_block else 100)
            with sm.loaded(emb), sm.loaded(head):
                for m in (emb, head):
                    assert torch.equal(m.weight, want[m]), (dtype, m)
                    src = sm.checkpoint_source(m)
                    assert src in sm.ckpt and m.weight.shape[0] > 128
                    with torch.no_grad():
                        m.weight.zero_()
                    sm.reread(m.weight, -1, name=src)
                    assert torch.equal(m.weight, want[m]), (dtype, src)
        sm.close()


@pytest.mark.parametrize("path", [QWEN, DSV3], ids=["qwen3-moe", "deepseek-v3"])
def test_removal_energy_is_the_output_change_of_the_pruned_model(path):
    """The re-routing of the local measurement equals a model with the expert physically removed
    (DeepSeek: its choice score pushed down, the group limit kept, as the in-memory profiler does)."""
    from transformers import AutoModelForCausalLM

    from moeplan.sensitivity.adapters import adapter_for
    from moeplan.sensitivity.layerwise import LayerwiseProfiler

    p = LayerwiseProfiler(path, _ids(path), seq_len=32, max_tokens=128, formats=["Q8_0"], progress=False)
    ad = p.ad
    layer = ad.moe_layers()[0]
    p._embedding()
    for l in range(layer):
        p._layer(l)
    h_in = [h.clone() for h in p.share.ref]
    p._layer(layer)
    energies = p.m["removal_energy"][str(layer)]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    mad = adapter_for(model)
    for e in (0, 5):
        m2 = copy.deepcopy(model)
        a2 = adapter_for(m2)
        if a2.routing_spec(layer).n_group > 1:
            a2.e_score_correction_bias(layer)[e] = -1e9
        else:
            a2.remove_experts(layer, [x for x in range(mad.n_experts(layer)) if x != e])
        want = 0.0
        with torch.inference_mode():
            for b, h in enumerate(h_in):
                ref = model.model.layers[layer](h, **p.share.kw[b])
                new = m2.model.layers[layer](h, **p.share.kw[b])
                ref, new = (x[0] if isinstance(x, tuple) else x for x in (ref, new))
                want += float(((new - ref).double() ** 2).sum())
        assert energies[e] == pytest.approx(want, rel=1e-4, abs=1e-9)


def test_unrouted_experts_are_never_free(tmp_path):
    """An expert calibration never routes to gets the layer's mean costs, stated in the profile."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(DSV3, d, ignore=shutil.ignore_patterns("profile*"))
    st = load_file(str(d / "model.safetensors"))
    st["model.layers.1.mlp.gate.e_score_correction_bias"][3] = -100.0  # never chosen
    save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})
    prof, importance = _profile(d, max_tokens=256)
    assert prof.meta["unrouted_experts"].get("1") == [3]
    s = prof.experts[1]
    assert s.freq[3] == 0
    routed = [r for e, r in enumerate(s.removal_kl) if e != 3]
    assert s.removal_kl[3] == pytest.approx(np.mean(routed))
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert prof.tensor_damage[name]["IQ2_XXS"] > 0 and importance[name].max() > 0


_KILL_PROBE = r"""
import sys
from moeplan.sensitivity.profiler import profile_model
profile_model(sys.argv[1], out=sys.argv[2], formats=["IQ2_XXS", "Q4_K", "Q8_0"], max_tokens=512, seq_len=64,
              progress=False)
"""


def _strip(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    d["meta"].pop("seconds")
    d["meta"].pop("activations")  # the RAM budget follows the memory available at the start, like the seconds
    return d


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_profile(tmp_path):
    from moeplan.sensitivity.profiler import state_path

    whole = tmp_path / "whole.json"
    subprocess.run([sys.executable, "-c", _KILL_PROBE, str(QWEN), str(whole)], check=True, timeout=900)
    out = tmp_path / "resumed.json"
    state = state_path(out)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_PROBE, str(QWEN), str(out)])
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if state.exists():
                from safetensors import safe_open

                try:
                    with safe_open(str(state), "pt") as f:
                        done = json.loads(f.metadata()["m"])["done"]
                except Exception:
                    done = -2
                if done >= 1:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the profile finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert state.exists() and not out.exists()
    subprocess.run([sys.executable, "-c", _KILL_PROBE, str(QWEN), str(out)], check=True, timeout=900)
    assert not state.exists()
    # the same numbers, up to the last bits of sums taken in another order after a restart
    assert _close(_strip(json.loads(out.read_text())), _strip(json.loads(whole.read_text())))


def test_state_of_another_run_is_refused(tmp_path):
    from moeplan.sensitivity.layerwise import LayerwiseProfiler

    state = tmp_path / "p.state.safetensors"
    p = LayerwiseProfiler(QWEN, _ids(QWEN), seq_len=32, max_tokens=64, formats=["Q8_0"], progress=False,
                          state_path=state)
    fp = build_inventory(QWEN).fingerprint
    p._embedding()
    p._save(p._settings(fp), -1)
    q = LayerwiseProfiler(QWEN, _ids(QWEN), seq_len=32, max_tokens=64, formats=["Q4_K"], progress=False,
                          state_path=state)
    with pytest.raises(ValueError, match="from another run.*formats.*remove it"):
        q.run(fp)


def _close(a, b, rel=1e-12) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-300
    return a == b


_RSS_PROBE = r"""
import resource, sys
import torch, transformers, numpy  # the libraries' own memory, before the baseline
from moeplan.sensitivity.profiler import profile_model
from moeplan.sensitivity.streaming import StreamingModel
StreamingModel(sys.argv[1]).close()  # the model family's code imported: a constant, not the model
base = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
open("/proc/self/clear_refs", "w").write("5")
profile_model(sys.argv[1], out=sys.argv[2], formats=["Q4_K", "Q8_0"], max_tokens=256, seq_len=64, progress=False,
              removal=sys.argv[3])
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(base, peak)
"""


@pytest.mark.slow
def test_peak_memory_stays_well_below_the_checkpoint(tmp_path):
    from moeplan.sensitivity.factory.generated import write_random_checkpoint

    cfg = json.loads((QWEN / "config.json").read_text())
    cfg.update(num_hidden_layers=24, hidden_size=512, moe_intermediate_size=256, num_local_experts=16)
    d = write_random_checkpoint(tmp_path / "big", cfg)
    inv = build_inventory(d)
    bf16 = inv.bytes_uniform("BF16")
    layer_f32 = max(sum(t.numel for t in inv if t.layer == i) for i in range(24)) * 4
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("this kernel does not allow resetting the peak RSS (/proc/self/clear_refs)")
    r = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(d), str(tmp_path / "p.json"), "fisher"],
                       capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    base, peak = map(int, r.stdout.split()[-2:])
    assert bf16 > 300 << 20  # the checkpoint is really several hundred MB, 24 layers
    # one layer in float32 and its quantized copies, the activations and streams: not the model
    assert peak - base < 5 * layer_f32 + (128 << 20), (peak - base, layer_f32)
    assert peak - base < bf16 * 0.8, (peak - base, bf16)


def test_imatrix_round_trips_through_gguf(qwen_profile, tmp_path):
    from moeplan.kernels import imatrix as im

    prof, importance = qwen_profile
    # counts from a fresh small run (the fixture's profiler object is gone)
    from moeplan.sensitivity.layerwise import LayerwiseProfiler

    p = LayerwiseProfiler(QWEN, _ids(QWEN), seq_len=64, max_tokens=512, formats=MENU, progress=False)
    _, imp = p.run(build_inventory(QWEN).fingerprint)
    out = tmp_path / "imatrix.gguf"
    im.write_profile_imatrix(out, imp, p.token_counts, build_inventory(QWEN), 512, 64)
    import gguf

    r = gguf.GGUFReader(str(out))
    assert r.fields["general.type"].contents() == "imatrix"
    from moeplan.sensitivity.importance import load_importance_file

    back = load_importance_file(out, QWEN)
    assert "model.embed_tokens.weight" not in back  # a lookup: llama-imatrix records none either
    for name, v in back.items():
        np.testing.assert_allclose(v, imp[name], rtol=1e-5, atol=1e-12)
    assert len(back) == len(imp) - 1


def _tools():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from llama_tools import find_llama_tools
    finally:
        sys.path.pop(0)
    return find_llama_tools()


@pytest.mark.skipif(_tools() is None, reason="llama.cpp's tools are not built (python benchmarks/llama_tools.py)")
def test_llama_quantize_accepts_the_imatrix(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from llama_tools import convert_hf_to_gguf
    finally:
        sys.path.pop(0)
    from moeplan.allocator import cli

    tools = _tools()
    imat = tmp_path / "imatrix.gguf"
    rc = cli.main(["profile", str(DSV3), "--out", str(tmp_path / "p.json"), "--tokens", "256", "--seq-len", "64",
                   "--formats", "IQ2_XXS,Q8_0", "--imatrix", str(imat)])
    assert rc == 0 and imat.exists()
    f32 = convert_hf_to_gguf(tools, DSV3, tmp_path / "f32.gguf")
    out = tmp_path / "q.gguf"
    r = subprocess.run([str(tools.quantize), "--imatrix", str(imat), str(f32), str(out), "IQ2_XXS", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "loaded" in r.stdout + r.stderr and out.stat().st_size > 0


def test_cli_profile_layerwise_and_its_errors(tmp_path, capsys):
    from moeplan.allocator import cli

    out = tmp_path / "p.json"
    rc = cli.main(["profile", "tiny-qwen3-moe", "--out", str(out), "--tokens", "128", "--seq-len", "32",
                   "--formats", "Q4_K,Q8_0", "--threads", "1", "--stream-share", "0.5", "--error-rows", "16"])
    assert rc == 0
    prof = json.loads(out.read_text())
    assert prof["meta"]["profiler"] == "layerwise" and prof["meta"]["threads"] == 1
    assert prof["meta"]["stream_windows"] == 2 and prof["meta"]["error_sampling"]["rows"] == 16
    # 16 rows of the 4096-row embedding and head: sampled until the standard error is within 5% (or exact)
    assert prof["meta"]["error_sampling"]["max_relative_se"] <= 0.05
    assert (tmp_path / "p.importance.safetensors").exists() and not (tmp_path / "p.state.safetensors").exists()
    capsys.readouterr()
    for bad, what in ((["--device", "tpu"], "cpu, cuda or cuda:N"),
                      (["--stream-share", "0"], "share of the windows in (0, 1]"),
                      (["--error-rows", "-3"], "whole number of rows >= 0"),
                      (["--method", "passes", "--error-rows", "8"], "are for --method layerwise"),
                      (["--method", "passes", "--imatrix", str(tmp_path / "i.gguf")], "--imatrix needs")):
        with pytest.raises(SystemExit) if bad[0] in ("--device", "--stream-share", "--error-rows") else _nothing():
            rc = cli.main(["profile", "tiny-qwen3-moe", "--out", str(tmp_path / "q.json"), *bad])
            assert rc == 2
        err = capsys.readouterr().err
        assert what in err, err
    assert not (tmp_path / "q.json").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA path is checked where one is")
def test_cuda_profile_matches_the_cpu_profile(qwen_profile):
    prof_cpu, _ = qwen_profile
    prof_gpu, _ = _profile(QWEN, device="cuda", dtype=torch.float32)
    a = np.array([prof_cpu.tensor_damage[n][f] for n in sorted(prof_cpu.tensor_damage) for f in MENU])
    b = np.array([prof_gpu.tensor_damage[n][f] for n in sorted(prof_cpu.tensor_damage) for f in MENU])
    np.testing.assert_allclose(b, a, rtol=0.05)
