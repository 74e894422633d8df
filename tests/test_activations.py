"""Hidden states beyond the RAM budget go to files: exact round trip, nothing left behind, same profile."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from moeplan.kernels.inventory import MODELS_DIR, build_inventory
from moeplan.sensitivity.activations import OnDisk, SpillBudget, SpillDict
from test_layerwise import _close  # nested profile values compared at a relative tolerance

QWEN = MODELS_DIR / "tiny-qwen3-moe"


def _batches(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 8, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_spilled_entries_come_back_bit_for_bit_and_leave_no_file(tmp_path, dtype):
    budget = SpillBudget(ram_bytes=0, directory=tmp_path)
    d = SpillDict(budget)
    want = _batches(0, dtype)
    d["a"] = want
    assert isinstance(d["a"], OnDisk) and len(d["a"]) == 3
    for got, w in zip(d["a"], want):
        assert got.dtype == dtype and torch.equal(got, w)
    assert torch.equal(d["a"][1], want[1]) and [torch.equal(x, y) for x, y in zip(d["a"][1:], want[1:])] == [True] * 2
    # the private directory holds no file (each is unlinked once open), only the directory itself
    (private,) = list(tmp_path.iterdir())
    assert private.name.startswith("moeplan-activations-") and list(private.iterdir()) == []
    assert (private.stat().st_mode & 0o777) == 0o700
    assert budget.on_disk == sum(t.numel() * t.element_size() for t in want) and budget.in_ram == 0
    d["a"] = _batches(1, dtype)  # replacing an entry returns its space
    del d["a"]
    assert budget.on_disk == 0 and budget.peak_on_disk == sum(t.numel() * t.element_size() for t in want)
    budget.close()
    assert list(tmp_path.iterdir()) == []


def test_entries_stay_in_ram_within_the_budget(tmp_path):
    one = sum(t.numel() * t.element_size() for t in _batches(0))
    budget = SpillBudget(ram_bytes=one, directory=tmp_path)
    d = SpillDict(budget, {"a": _batches(0)})
    d["b"] = _batches(1)
    assert isinstance(d["a"], list) and isinstance(d["b"], OnDisk)
    assert budget.in_ram == one and budget.on_disk == one
    d.clear()
    assert budget.in_ram == 0 and budget.on_disk == 0


def test_a_missing_directory_is_a_clear_error(tmp_path):
    d = SpillDict(SpillBudget(ram_bytes=0, directory=tmp_path / "nope"))
    with pytest.raises(ValueError, match="does not exist.*--activations-dir"):
        d["a"] = _batches(0)


def test_a_planted_symlink_is_not_followed(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    budget = SpillBudget(ram_bytes=0, directory=tmp_path)
    private = budget.where()
    d = SpillDict(budget)
    # whatever name the next file would get, a symlink there must not be written through
    for i in range(1, 5):
        os.symlink(target, private / f"stream-{os.getpid()}-{i:x}.bin")
    d["a"] = _batches(0)
    assert target.read_bytes() == b"keep" and budget.files == 5
    assert all(torch.equal(x, y) for x, y in zip(d["a"], _batches(0)))


def _profile(**kw):
    from transformers import AutoTokenizer

    from moeplan.sensitivity.evaluate import encode_text
    from moeplan.sensitivity.layerwise import LayerwiseProfiler

    ids = encode_text(AutoTokenizer.from_pretrained(str(QWEN)), (QWEN / "calib.txt").read_text())[:256]
    p = LayerwiseProfiler(QWEN, ids, seq_len=32, max_tokens=128, formats=["Q4_K"], progress=False, **kw)
    prof, imp = p.run(build_inventory(QWEN).fingerprint)
    d = json.loads(json.dumps(prof.to_json()))
    d["meta"].pop("seconds")
    return d, imp, d["meta"].pop("activations")


@pytest.mark.parametrize("removal", ["streams", "fisher"])
def test_a_profile_with_every_stream_on_disk_is_the_same_profile(tmp_path, removal):
    in_ram, imp, a = _profile(removal=removal, activations_ram=1 << 40)
    spilled, imp2, b = _profile(removal=removal, activations_ram=0, activations_dir=tmp_path)
    assert a["peak_bytes_on_disk"] == 0 and b["peak_bytes_on_disk"] > 0
    assert b["directory"] == str(tmp_path) and list(tmp_path.iterdir()) == []
    # the same values: the hidden states come back bit for bit; a run differs from a rerun of itself only in
    # the last bits of multithreaded sums (measured, relative: 2e-15 with removal streams; 9e-7 in the
    # Fisher values, whose gradients are float32 sums in the backward sweep)
    assert _close(spilled, in_ram, 1e-12 if removal == "streams" else 1e-5)
    assert imp.keys() == imp2.keys() and all(np.array_equal(imp[k], imp2[k]) for k in imp)


def test_cli_spills_to_the_directory_it_is_given_and_refuses_bad_values(tmp_path, capsys):
    from moeplan.allocator import cli

    spill = tmp_path / "spill"
    spill.mkdir()
    out = tmp_path / "p.json"
    assert cli.main(["profile", "tiny-qwen3-moe", "--out", str(out), "--tokens", "128", "--seq-len", "32",
                     "--formats", "Q4_K", "--activations-ram", "0", "--activations-dir", str(spill)]) == 0
    assert "on disk in " + str(spill) in capsys.readouterr().err
    assert json.loads(out.read_text())["meta"]["activations"]["peak_bytes_on_disk"] > 0
    assert list(spill.iterdir()) == []
    for bad, what in ((["--activations-ram", "-1"], "number of GB >= 0"),
                      (["--activations-ram", "nan"], "number of GB >= 0"),
                      (["--activations-dir", str(tmp_path / "none")], "is not a directory"),
                      (["--method", "passes", "--activations-ram", "1"], "are for --method layerwise")):
        try:
            rc = cli.main(["profile", "tiny-qwen3-moe", "--out", str(tmp_path / "q.json"), *bad])
        except SystemExit as exc:
            rc = exc.code
        assert rc == 2
        err = capsys.readouterr().err
        assert what in err.strip().splitlines()[-1], err  # the last line says what is wrong
    assert not (tmp_path / "q.json").exists()
