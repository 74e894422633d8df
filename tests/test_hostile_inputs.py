"""Broken and hostile inputs through the command line: one line `moeplan COMMAND: ...` and exit code 2,
never a traceback, never a silently wrong output, nothing left half written, no planted link followed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moeplan.allocator.cli import main
from moeplan.kernels.inventory import MODELS_DIR

MODEL = "tiny-deepseek-v3"
pytestmark = pytest.mark.skipif(not (MODELS_DIR / MODEL / "profile.json").exists(),
                                reason=f"the shipped {MODEL} model is not in this checkout")
PROFILE = str(MODELS_DIR / MODEL / "profile.json")
SOLVE = ["--profile", PROFILE, "--memory", "8MB", "--context", "256", "--reserve", "0", "--target", "gguf"]


def run(capsys, *argv) -> tuple[int, str]:
    """The CLI in-process: (exit code, stderr); argparse's own errors count as exit code 2."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, command: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"moeplan {command}: "), err
    for w in words:
        assert w in last, (w, last)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A private copy of the reference checkpoint (tests break copies of it)."""
    d = tmp_path_factory.mktemp("ckpt") / MODEL
    shutil.copytree(MODELS_DIR / MODEL, d)
    return d


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["solve", MODEL, *SOLVE, "--out", str(out)]) == 0
    return out


def broken_copy(ckpt: Path, tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(ckpt, d)
    return d


def write_safetensors(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edited_plan(plan_file: Path, tmp_path: Path, edit) -> Path:
    obj = json.loads(plan_file.read_text())
    edit(obj)
    p = tmp_path / "edited.json"
    p.write_text(json.dumps(obj))
    return p


def nothing_left(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


# ---- plans that do not describe the model, or not within their budget -----------------------------

def test_hand_edited_plan_over_its_budget_is_refused_before_writing(capsys, plan_file, tmp_path):
    def q8_everywhere(obj):
        obj["tensors"] = {k: "Q8_0" for k in obj["tensors"]}
        obj["stacked"] = {k: "Q8_0" for k in obj["stacked"]}
    p = edited_plan(plan_file, tmp_path, q8_everywhere)
    code, err = run(capsys, "materialize", MODEL, p, "--gguf", tmp_path / "m.gguf")
    assert_user_error(code, err, "materialize", "more than its weight budget")
    assert not (tmp_path / "m.gguf").exists() and not nothing_left(tmp_path)


def test_incomplete_plans_are_refused(capsys, plan_file, tmp_path):
    def drop_layer(o):
        gone = o["layers"].pop()
        o["totals"]["kept_experts"] -= len(gone["kept"])

    def extra_layer(o):
        o["layers"].append(dict(o["layers"][0], layer=99))
        o["totals"]["kept_experts"] += len(o["layers"][0]["kept"])

    cases = {
        "no entry for MoE layer": drop_layer,
        "has no format for": lambda o: o["tensors"].pop(sorted(o["tensors"])[0]),
        "not an MoE layer of this model": extra_layer,
    }
    for words, edit in cases.items():
        p = edited_plan(plan_file, tmp_path, edit)
        code, err = run(capsys, "materialize", MODEL, p, "--gguf", tmp_path / "m.gguf")
        assert_user_error(code, err, "materialize", words)
        assert not (tmp_path / "m.gguf").exists()


def test_deeply_nested_json_plan_is_a_message(capsys, tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 1_000_000 + "]" * 1_000_000)
    code, err = run(capsys, "evaluate", MODEL, "--plan", p)
    assert_user_error(code, err, "evaluate")


# ---- checkpoints that disagree with themselves, or lie ---------------------------------------------

def test_config_that_disagrees_with_the_weights_is_refused(capsys, ckpt, plan_file, tmp_path):
    d = broken_copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] *= 2
    (d / "config.json").write_text(json.dumps(cfg))
    code, err = run(capsys, "materialize", d, plan_file, "--gguf", tmp_path / "m.gguf")
    assert code == 2 and "Traceback" not in err
    assert not (tmp_path / "m.gguf").exists()


def _set_first_value(d: Path, name_part: str, value: float) -> str:
    """Overwrite the first element of the first tensor whose name contains name_part (BF16 or F32)."""
    from moeplan.kernels.checkpoint import read_safetensors_header

    shard = sorted(d.glob("*.safetensors"))[0]
    header, _ = read_safetensors_header(shard)
    name = sorted(n for n in header if name_part in n)[0]
    t = header[name]
    raw = np.array([value], np.float32).tobytes() if t.dtype == "F32" else \
        (np.array([value], np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    with open(shard, "r+b") as f:
        f.seek(t.start)
        f.write(raw)
    return name


def test_nan_weight_is_named_by_materialize_and_evaluate(capsys, ckpt, tmp_path):
    d = broken_copy(ckpt, tmp_path)
    name = _set_first_value(d, "input_layernorm", float("nan"))  # a tensor kept as F32
    plan = tmp_path / "plan.json"
    assert main(["solve", str(d), *SOLVE, "--out", str(plan)]) == 0
    capsys.readouterr()
    code, err = run(capsys, "materialize", d, plan, "--gguf", tmp_path / "m.gguf")
    assert_user_error(code, err, "materialize", name, "non-finite")
    assert not (tmp_path / "m.gguf").exists() and not nothing_left(tmp_path)
    code, err = run(capsys, "evaluate", d, "--tokens", "256")
    assert_user_error(code, err, "evaluate", name)
    assert "perplexity" not in err


def test_weight_beyond_its_formats_range_is_named(capsys, ckpt, plan_file, tmp_path):
    d = broken_copy(ckpt, tmp_path)
    name = _set_first_value(d, "mlp.experts.3.up_proj", 1e30)
    code, err = run(capsys, "materialize", d, plan_file, "--gguf", tmp_path / "m.gguf", "--hf", tmp_path / "hf")
    assert_user_error(code, err, "materialize", name, "outside")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_profile_with_nan_or_negative_cost_is_refused(capsys, tmp_path):
    for bad in (float("nan"), -1.0):
        prof = json.loads(Path(PROFILE).read_text())
        first = sorted(prof["tensor_damage"])[0]
        prof["tensor_damage"][first][0] = bad
        p = tmp_path / "profile.json"
        p.write_text(json.dumps(prof))  # json writes NaN as the (invalid) token NaN; Python reads it
        code, err = run(capsys, "solve", MODEL, *SOLVE[2:], "--profile", p, "--out", tmp_path / "plan.json")
        assert_user_error(code, err, "solve", first)
        assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("edit", [
    lambda p: p.update(experts=[1, 2]),
    lambda p: p["tensor_damage"].update({"x": "cheap"}),
    lambda p: p["topk_cost"].update({"1": {"two": 0.1}}),
    lambda p: p.update(formats=["Q9_K"] + p["formats"][1:]),
])
def test_malformed_profiles_are_one_line(capsys, tmp_path, edit):
    prof = json.loads(Path(PROFILE).read_text())
    edit(prof)
    p = tmp_path / "profile.json"
    p.write_text(json.dumps(prof))
    code, err = run(capsys, "solve", MODEL, *SOLVE[2:], "--profile", p)
    assert_user_error(code, err, "solve", str(p))


def test_os_errors_are_one_line_with_a_hint():
    import errno

    from moeplan.allocator.cli import error_line

    line = error_line(OSError(errno.ENOSPC, "No space left on device", "/data/m.gguf"))
    assert line == "/data/m.gguf: No space left on device (free some space or write elsewhere)"


def test_json_outputs_refuse_non_finite_numbers():
    from moeplan.kernels.outputs import json_text

    with pytest.raises(ValueError, match="a.1"):
        json_text({"a": [0.0, float("nan")]})


@pytest.mark.parametrize("case", ["negative shape", "beyond the file", "not an object", "shape is a string",
                                  "unknown dtype", "overlap"])
def test_malformed_safetensors_headers(capsys, ckpt, tmp_path, case):
    d = broken_copy(ckpt, tmp_path)
    for p in d.glob("*.safetensors"):
        p.unlink()
    good = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    header = {
        "negative shape": {"w": {**good, "shape": [-2, -2]}},
        "beyond the file": {"w": {**good, "shape": [200, 2], "data_offsets": [0, 1600]}},
        "not an object": [1, 2, 3],
        "shape is a string": {"w": {**good, "shape": "2x2"}},
        "unknown dtype": {"w": {**good, "dtype": "Q4"}},
        "overlap": {"w": good, "v": {**good, "data_offsets": [8, 24]}},
    }[case]
    write_safetensors(d / "model.safetensors", header, bytes(32))
    for command in (["inventory", d], ["evaluate", d, "--tokens", "256"]):
        code, err = run(capsys, *command)
        assert_user_error(code, err, command[0], "model.safetensors")


def test_shard_names_stay_inside_the_checkpoint(capsys, ckpt, tmp_path):
    d = broken_copy(ckpt, tmp_path)
    for target in ("../outside.safetensors", "/etc/hostname"):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target}}))
        code, err = run(capsys, "inventory", d)
        assert_user_error(code, err, "inventory", "not a file name inside the checkpoint")


def test_a_fifo_shard_is_refused_without_hanging(ckpt, tmp_path):
    d = broken_copy(ckpt, tmp_path)
    os.mkfifo(d / "fifo.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "fifo.safetensors"}}))
    r = subprocess.run([sys.executable, "-m", "moeplan.allocator.cli", "inventory", str(d)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a regular file" in r.stderr and "Traceback" not in r.stderr


def test_an_importance_path_that_is_not_a_file_is_named(capsys, plan_file, tmp_path):
    """--importance: a directory or a FIFO is refused before any work, naming what it is, by every
    command that takes it (a FIFO would block the reader; run in a subprocess with a timeout)."""
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for argv in (["evaluate", MODEL, "--plan", plan_file, "--tokens", "256"],
                 ["materialize", MODEL, plan_file, "--gguf", tmp_path / "m.gguf"]):
        code, err = run(capsys, *argv, "--importance", tmp_path / "dir")
        assert_user_error(code, err, argv[0], "is a directory", "the file itself")
        r = subprocess.run([sys.executable, "-m", "moeplan.allocator.cli", *map(str, argv), "--importance",
                            str(tmp_path / "fifo")], capture_output=True, text=True, timeout=120)
        assert_user_error(r.returncode, r.stderr, argv[0], "not a regular file", "the file itself")
    assert not (tmp_path / "m.gguf").exists()


# ---- flags ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,words", [
    (["solve", MODEL, *SOLVE[:2], "--memory=1e400", *SOLVE[4:]], "larger than any machine"),
    (["solve", MODEL, *SOLVE, "--rel-gap", "-1"], "--rel-gap"),
    (["sweep", MODEL, "--profile", PROFILE, "--budgets", ","], "names no memory size"),
    (["evaluate", MODEL, "--seq-len", "0"], "--seq-len"),
    (["profile", MODEL, "--out", "p.json", "--tokens", "-5"], "--tokens"),
    (["sweep", MODEL, "--profile", PROFILE, "--from", "1MB", "--to", "2MB", "--steps", "0"], "--steps"),
])
def test_bad_flags_are_one_line(capsys, argv, words):
    command = argv[0]
    code, err = run(capsys, *argv)
    assert_user_error(code, err, command, words)


# ---- output paths --------------------------------------------------------------------------------

def test_output_paths_are_checked_before_any_work(capsys, plan_file, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    (tmp_path / "afile").write_text("x")
    cases = [
        (["materialize", MODEL, plan_file, "--gguf", tmp_path / "m.gguf", "--hf", tmp_path / "hf"], "not empty"),
        (["materialize", MODEL, plan_file, "--gguf", "/dev/null"], "not a regular file"),
        (["materialize", MODEL, plan_file, "--gguf", tmp_path / ("x" * 300 + ".gguf")], "longer than"),
        (["materialize", MODEL, plan_file, "--gguf", tmp_path / "afile" / "m.gguf"], "not a directory"),
        (["solve", MODEL, *SOLVE, "--out", tmp_path / ("y" * 300)], "longer than"),
    ]
    for argv, words in cases:
        t0 = time.perf_counter()
        code, err = run(capsys, *argv)
        assert_user_error(code, err, argv[0], words)
        assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "m.gguf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "hf"]


def test_planted_symlinks_at_temp_names_are_not_followed(capsys, plan_file, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    pid = os.getpid()
    for name in ("m.gguf", "plan.json"):  # every temp name earlier versions used
        for tmp in (f".{name}.{pid}.partial", f".{name}.tmp{pid}", f".{name}.tmp"):
            os.symlink(victim, out / tmp)
    os.symlink(victim, out / f".moeplan-{pid}-guess.partial")
    assert main(["solve", MODEL, *SOLVE, "--out", str(out / "plan.json")]) == 0
    assert main(["materialize", MODEL, str(out / "plan.json"), "--gguf", str(out / "m.gguf")]) == 0
    assert victim.read_text() == "precious"
    assert (out / "m.gguf").stat().st_size > 1000 and not (out / "m.gguf").is_symlink()


def test_an_output_that_is_a_symlink_is_replaced_not_followed(plan_file, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "plan.json")
    assert main(["solve", MODEL, *SOLVE, "--out", str(tmp_path / "plan.json")]) == 0
    assert victim.read_text() == "precious" and not (tmp_path / "plan.json").is_symlink()


def _materialize_proc(plan_file: Path, out: Path):
    return subprocess.Popen([sys.executable, "-m", "moeplan.allocator.cli", "materialize", MODEL, str(plan_file),
                             "--gguf", str(out / "m.gguf")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temp(out: Path, proc, timeout: float = 120) -> None:
    t0 = time.time()
    while not any(p.name.startswith(".moeplan-") for p in out.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.01)


def test_sigterm_leaves_nothing_and_sigkill_debris_is_removed_next_time(plan_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _materialize_proc(plan_file, out)
    _wait_for_temp(out, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(out.iterdir()) == []

    proc = _materialize_proc(plan_file, out)
    _wait_for_temp(out, proc)
    proc.kill()
    proc.wait(timeout=60)
    (stale,) = [p for p in out.iterdir() if p.name.startswith(".moeplan-")]
    proc = _materialize_proc(plan_file, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"removed {stale}" in err
    assert sorted(p.name for p in out.iterdir()) == ["m.gguf"]
