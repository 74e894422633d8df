"""Distributed profiling on Ray: the single-process profile from 1 or 2 workers, through a worker's death."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from moeplan.kernels.inventory import MODELS_DIR, build_inventory

QWEN = MODELS_DIR / "tiny-qwen3-moe"
DSV3 = MODELS_DIR / "tiny-deepseek-v3"
MENU = ["IQ2_XXS", "Q4_K", "Q8_0"]
# 16 windows of 32 tokens: two batches of 8, one per worker
SETTINGS = {"seq_len": 32, "max_tokens": 512, "formats": MENU, "threads": 1}
# Up to the order of the sums: the double-precision sums (errors, energies, importance, gains, so every
# tensor damage) agree to 1e-12; the costs of routing changes are float32 KLs of small changes measured on
# re-routed token subsets whose size differs between shares (another blocking of the same products), 1e-4.
# meta: the per-layer gains among others, float32 KLs of streams over a quarter of the windows, whose
# blocking differs with the tokens a worker holds (2.1e-4 seen between 2 workers and one process)
TOL = {"tensor_damage": 1e-12, "experts": 1e-4, "topk_cost": 1e-4, "meta": 1e-3}


def _ids(path):
    from transformers import AutoTokenizer

    from moeplan.sensitivity.evaluate import encode_text

    return encode_text(AutoTokenizer.from_pretrained(str(path)), (path / "calib.txt").read_text())[:4096]


@pytest.fixture(scope="module")
def cluster():
    from moeplan.sensitivity.distributed import local_cluster_env

    local_cluster_env()  # services on 127.0.0.1 only
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # threads=1 below sets torch's global count
    yield
    torch.set_num_threads(n)


def _single(path, **kw):
    from moeplan.sensitivity.layerwise import LayerwiseProfiler

    kw = SETTINGS | {"progress": False} | kw
    return LayerwiseProfiler(path, _ids(path), **kw).run(build_inventory(path).fingerprint)


def _ray(path, workers, **kw):
    from moeplan.sensitivity.distributed import profile_on_ray

    return profile_on_ray(path, _ids(path), build_inventory(path).fingerprint, workers=workers, progress=False,
                          **(SETTINGS | kw))


def _plain(prof) -> dict:
    d = json.loads(json.dumps(prof.to_json()))
    for k in ("seconds", "activations", "ray", "threads"):
        d["meta"].pop(k, None)
    return d


def _worst(a, b, path=()) -> dict[str, float]:
    """The largest relative difference per top-level section; structure must match exactly."""
    out: dict[str, float] = {}

    def walk(x, y, p):
        if isinstance(x, dict):
            assert isinstance(y, dict) and x.keys() == y.keys(), ("/".join(p), set(x) ^ set(y))
            for k in x:
                walk(x[k], y[k], p + (str(k),))
        elif isinstance(x, list):
            assert isinstance(y, list) and len(x) == len(y), "/".join(p)
            for u, v in zip(x, y):
                walk(u, v, p)
        elif isinstance(x, float) and isinstance(y, (int, float)):
            r = abs(x - y) / max(abs(x), abs(y), 1e-300)
            out[p[0]] = max(out.get(p[0], 0.0), r)
        else:
            assert x == y, ("/".join(p), x, y)

    walk(a, b, tuple(path))
    return out


def _assert_same(a, b, tol=TOL):
    worst = _worst(_plain(a), _plain(b))
    for section, r in worst.items():
        assert r <= tol.get(section, 1e-12), (section, r)
    return worst


def test_one_worker_is_the_single_process_profile_bit_for_bit(cluster):
    prof, imp, counts = _ray(QWEN, 1)
    ref, ref_imp = _single(QWEN)
    assert set(_worst(_plain(prof), _plain(ref)).values()) <= {0.0}
    assert imp.keys() == ref_imp.keys() and all((imp[n] == ref_imp[n]).all() for n in imp)
    assert prof.meta["ray"]["workers"] == 1 and prof.meta["ray"]["restarts"] == [0]


@pytest.fixture(scope="module")
def qwen_two(cluster):
    return _ray(QWEN, 2)


def test_two_workers_give_the_single_process_profile(qwen_two):
    prof, imp, counts = qwen_two
    ref, ref_imp = _single(QWEN)
    worst = _assert_same(prof, ref)
    assert 0 < max(worst.values())  # two shares really added their sums (another order)
    for n in imp:
        np.testing.assert_allclose(imp[n], ref_imp[n], rtol=1e-6, atol=0)
    m = prof.meta["ray"]
    assert m["workers"] == 2 and m["shares"] == [[0, 8], [8, 16]] and m["restarts"] == [0, 0]
    assert m["sum_bytes_to_coordinator"] > 0 and all(p > 0 for p in m["peak_rss"])
    assert prof.meta["calibration_tokens"] == ref.meta["calibration_tokens"] == 16 * 31
    assert counts["model.layers.0.self_attn.q_proj.weight"] == 16 * 32  # every token of both shares


def test_a_killed_worker_is_restarted_and_the_profile_is_the_same(cluster, qwen_two):
    """ray.kill on one worker mid-run (Ray restarts it): it resumes from its state, same profile."""
    killed = {}

    def kill_later(actors, coordinator):
        def go():
            deadline = time.time() + 300
            while time.time() < deadline:
                if len(cluster.get(coordinator.progress.remote())["sums"]) >= 2:  # two layers summed
                    cluster.kill(actors[1], no_restart=False)
                    killed["after"] = len(cluster.get(coordinator.progress.remote())["sums"])
                    return
                time.sleep(0.05)

        threading.Thread(target=go, daemon=True).start()

    from moeplan.sensitivity.distributed import profile_on_ray

    prof, _, _ = profile_on_ray(QWEN, _ids(QWEN), build_inventory(QWEN).fingerprint, workers=2, progress=False,
                                on_start=kill_later, **SETTINGS)
    assert "after" in killed, "the worker was not killed"
    # killed before the run's end (the head's sum needs it), restarted once, resumed from its state
    assert killed["after"] < prof.meta["ray"]["sums"]
    assert prof.meta["ray"]["restarts"] == [0, 1] and prof.meta["ray"]["resumed"] == [False, True]
    # the restarted worker resumed from its state: the same sums in the same order as without the kill
    _assert_same(prof, qwen_two[0], tol={})


@pytest.mark.slow
def test_fisher_removal_does_not_depend_on_the_worker_count(cluster):
    """The backward sweep (removal fisher) per share, its samples seeded per batch: 2 workers = 1 process."""
    prof, _, _ = _ray(DSV3, 2, removal="fisher")
    ref, _ = _single(DSV3, removal="fisher")
    assert prof.meta["removal"] == ref.meta["removal"] == "fisher"
    _assert_same(prof, ref)


def test_shares_and_work_split(cluster):
    from moeplan.sensitivity.distributed import add_sums, split_windows, split_work

    assert split_windows(16, 8, 2) == [(0, 8), (8, 16)]
    assert split_windows(20, 8, 2) == [(0, 16), (16, 20)]
    assert split_windows(20, 8, 3) == [(0, 8), (8, 16), (16, 20)]
    with pytest.raises(ValueError, match="--workers 3: .* 2 batches .* at most 2 workers"):
        split_windows(16, 8, 3)
    owner = split_work({"a": 10, "b": 6, "c": 5, "d": 1}, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert add_sums([{"x": [1.0, 2.0], "y": 1}, {"x": [3.0, 4.0], "z": 2}]) == {"x": [4.0, 6.0], "y": 1, "z": 2}


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    import sys

    from moeplan.allocator import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    rc = cli.main(["profile", "tiny-qwen3-moe", "--out", str(tmp_path / "p.json"), "--ray", "--workers", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install -e '.[ray]'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.json").exists()


def test_cli_ray_flag_errors(tmp_path, capsys):
    from moeplan.allocator import cli

    out = tmp_path / "p.json"
    (tmp_path / "p.state.safetensors").write_bytes(b"")
    for extra, what in ((["--workers", "2"], "--workers is for --ray"),
                        (["--ray", "--method", "passes"], "--ray needs --method layerwise"),
                        (["--ray"], "does not resume it")):
        rc = cli.main(["profile", "tiny-qwen3-moe", "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and what in err, err
    assert not out.exists()


def test_cli_profile_on_ray(cluster, tmp_path, capsys):
    from moeplan.allocator import cli

    out = tmp_path / "p.json"
    rc = cli.main(["profile", "tiny-qwen3-moe", "--out", str(out), "--tokens", "512", "--seq-len", "32",
                   "--formats", "Q4_K,Q8_0", "--ray", "--workers", "2", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    prof = json.loads(out.read_text())
    assert prof["meta"]["ray"]["workers"] == 2 and (tmp_path / "p.importance.safetensors").exists()
    assert "2 Ray worker(s)" in capsys.readouterr().err


def test_more_workers_than_the_cluster_holds_is_refused(cluster):
    with pytest.raises(ValueError, match="--workers 2 x 2 thread.*2 CPUs"):
        _ray(QWEN, 2, threads=2)
    # 16 windows of 32 tokens; the streams carry 4 of them, so the batches are 4 windows each: 4 batches
    with pytest.raises(ValueError, match="--workers 5: .* 4 batches"):
        _ray(QWEN, 5)
