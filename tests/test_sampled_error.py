"""kernels.sampled_quant_error: the error kernel on a seeded sample of rows, with a standard error."""

import numpy as np
import pytest
import torch

from moeplan import kernels


def _matrix(rows=512, cols=256, seed=0):
    rng = np.random.default_rng(seed)
    # rows of very different energy (a lognormal scale per row), heavy-tailed values
    scale = np.exp(rng.normal(0, 0.3, size=(rows, 1)))
    return (rng.standard_t(5, size=(rows, cols)) * scale).astype(np.float32)


@pytest.mark.parametrize("rows", [0, 128, 512, 1000])  # 128: a quarter of the rows, not worth sampling
def test_all_rows_is_quant_error_exactly(rows):
    x = _matrix()
    imp = np.random.default_rng(1).uniform(0.1, 2, 256).astype(np.float32)
    full = kernels.quant_error(x, ["Q4_K", "IQ2_XXS"], imp)
    s = kernels.sampled_quant_error(x, ["Q4_K", "IQ2_XXS"], imp, rows=rows)
    np.testing.assert_allclose(s.err, full.err, rtol=1e-12)  # threads sum in any order
    assert not s.se.any() and s.sampled == s.rows == 512


def test_the_error_kernel_gives_the_same_bits_on_any_number_of_threads():
    """Each row's sums are added in row order after the parallel loop: the same bits on 1, 2 or 3
    threads and from run to run (a profile is reproducible), equal to the row-order sum of the rows
    measured alone."""
    x = _matrix(rows=768).reshape(3, 256, 256)
    imp = np.random.default_rng(3).uniform(0.1, 2, (3, 256)).astype(np.float32)
    fmts = ["IQ2_XXS", "Q4_K", "Q8_0"]
    runs = [kernels.quant_error(x, fmts, imp, threads=t) for t in (1, 2, 3, 2, 3, 2)]
    for r in runs[1:]:
        assert np.array_equal(r.err, runs[0].err) and np.array_equal(r.norm, runs[0].norm)
    alone = kernels.quant_error(x.reshape(768, 1, 256), fmts, np.repeat(imp, 256, axis=0), threads=2)
    for g in range(3):
        want_err, want_norm = [0.0] * len(fmts), 0.0
        for r in range(g * 256, (g + 1) * 256):
            want_norm += float(alone.norm[r])
            for i in range(len(fmts)):
                want_err[i] += float(alone.err[i, r])
        assert runs[0].norm[g] == want_norm and list(runs[0].err[:, g]) == want_err


def test_sample_is_the_same_rows_measured_alone():
    x = _matrix(rows=300)
    imp = np.random.default_rng(2).uniform(0.1, 2, 256).astype(np.float32)
    s = kernels.sampled_quant_error(x, ["Q3_K"], imp, rows=40, seed=7)
    idx = np.random.default_rng(7).permutation(300)[:40]
    per_row = [kernels.quant_error(x[i:i + 1], ["Q3_K"], imp).err[0, 0] for i in idx]
    assert s.err[0, 0] == pytest.approx(np.mean(per_row) * 300, rel=1e-12)
    assert s.se[0, 0] == pytest.approx(np.std(per_row, ddof=1) * 300 / np.sqrt(40) * np.sqrt(1 - 40 / 300), rel=1e-9)


def test_standard_error_covers_the_exact_error():
    """Over many seeds the exact error lies within 2 standard errors about 95% of the time (a wrong
    scale or a wrong standard error fails this), and the mean estimate is unbiased."""
    x = _matrix()
    imp = np.random.default_rng(3).uniform(0.1, 2, 256).astype(np.float32)
    fmts = ["Q2_K", "Q4_K", "IQ2_XXS"]
    exact = kernels.quant_error(x, fmts, imp).err[:, 0]
    z, est = [], []
    for seed in range(60):
        s = kernels.sampled_quant_error(x, fmts, imp, rows=48, seed=seed)
        z.append((s.err[:, 0] - exact) / s.se[:, 0])
        est.append(s.err[:, 0])
    z = np.array(z)
    inside = (np.abs(z) < 2).mean(axis=0)
    assert (inside > 0.85).all(), inside
    assert (np.abs(z).max(axis=0) < 5).all()
    # the mean of 60 estimates: its own standard error is about se / sqrt(60)
    rel_bias = np.abs(np.mean(est, axis=0) / exact - 1)
    one = np.std(np.array(est) / exact, axis=0)  # the spread of a single estimate
    assert (rel_bias < 4 * one / np.sqrt(60)).all(), (rel_bias, one)


def test_stacked_experts_with_their_own_importance_and_torch_views():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(np.stack([_matrix(rows=320, seed=s) for s in range(3)]))
    imp = rng.uniform(0.1, 2, (3, 256)).astype(np.float32)
    view = torch.cat([x, x], dim=1)[:, :320, :]  # a non-contiguous view, as the profiler's gate / up stacks
    s = kernels.sampled_quant_error(view, ["Q4_K"], imp, rows=32, seed=11)
    idx = np.random.default_rng(11).permutation(320)[:32]
    for g in range(3):
        alone = kernels.quant_error(x[g, idx].contiguous(), ["Q4_K"], imp[g]).err[0, 0]
        assert s.err[0, g] == pytest.approx(alone / 32 * 320, rel=1e-12)
    assert s.relative_se().shape == (1, 3) and (s.relative_se() > 0).all()


def test_the_sample_grows_until_the_standard_error_meets_the_target():
    rng = np.random.default_rng(5)
    # rows of wildly different energy: 64 rows give a relative standard error far above 5%
    x = (rng.standard_normal((4096, 256)) * np.exp(rng.normal(0, 0.5, size=(4096, 1)))).astype(np.float32)
    imp = np.ones(256, np.float32)
    first = kernels.sampled_quant_error(x, ["Q4_K", "Q8_0"], imp, rows=64, seed=3)
    assert first.sampled == 64 and first.relative_se().max() > 0.05
    grown = kernels.sampled_quant_error(x, ["Q4_K", "Q8_0"], imp, rows=64, seed=3, target_rse=0.05)
    assert grown.sampled in (128, 256, 512, 1024) and grown.relative_se().max() <= 0.05
    # the rows measured first are kept: the grown sample is the permutation's longer prefix
    again = kernels.sampled_quant_error(x, ["Q4_K", "Q8_0"], imp, rows=grown.sampled, seed=3)
    np.testing.assert_allclose(again.err, grown.err, rtol=1e-12)
    exact = kernels.quant_error(x, ["Q4_K", "Q8_0"], imp).err
    assert (np.abs(grown.err / exact - 1) < 4 * grown.relative_se()).all()
    # a target no sample below a quarter of the rows meets: every row, exactly
    tight = kernels.sampled_quant_error(x, ["Q4_K", "Q8_0"], imp, rows=64, seed=3, target_rse=1e-6)
    assert tight.sampled == 4096 and not tight.se.any()
    np.testing.assert_allclose(tight.err, exact, rtol=1e-12)
