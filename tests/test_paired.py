"""probing/paired.py against direct computations (sklearn per resample, exact enumeration)."""
import itertools
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mosaic_jax.probing import metrics
from mosaic_jax.probing import paired


def _onehot(pred, c=2):
    return np.eye(c, dtype=np.float32)[pred]


def _pair(n=200, a_errors=20, extra_b_errors=14, seed=0):
    """Labels and predictions where B errs on every row A errs on, and on some more."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    wrong = rng.permutation(n)
    pa, pb = y.copy(), y.copy()
    pa[wrong[:a_errors]] ^= 1
    pb[wrong[:a_errors + extra_b_errors]] ^= 1
    return y, _onehot(pa), _onehot(pb)


def test_paired_delta_matches_sklearn_on_the_same_resampled_rows():
    y, a, b = _pair(n=60, a_errors=10, extra_b_errors=5)
    got = paired.paired_delta(y, a, b, n_resamples=300, seed=3)
    idx = metrics.resample_indices(len(y), 300, seed=3)
    f1 = lambda p, i: skm.f1_score(y[i], p.argmax(1)[i], labels=[0, 1], average='macro',  # noqa: E731
                                   zero_division=0)
    diffs = np.array([f1(a, i) - f1(b, i) for i in idx])
    lo, hi = np.percentile(diffs, (2.5, 97.5))
    everything = np.arange(len(y))
    # float64 both sides; the vectorised confusion counts equal sklearn's exactly.
    assert got.delta == pytest.approx(f1(a, everything) - f1(b, everything), abs=1e-12)
    assert (got.lo, got.hi) == pytest.approx((lo, hi), abs=1e-12)


def test_marginal_intervals_overlap_but_the_paired_interval_excludes_zero():
    y, a, b = _pair()
    ia = metrics.bootstrap(y, a, ['macro_f1'], seed=0)['macro_f1']
    ib = metrics.bootstrap(y, b, ['macro_f1'], seed=0)['macro_f1']
    assert ia[0] < ib[1]            # the old rule: overlap, a tie
    got = paired.paired_delta(y, a, b, seed=0)
    assert got.lo > 0 and got.outcome == paired.WIN
    back = paired.paired_delta(y, b, a, seed=0)
    assert back.outcome == paired.LOSS and back.delta == pytest.approx(-got.delta)


def test_identical_methods_tie_with_a_zero_interval():
    y, a, _ = _pair()
    got = paired.paired_delta(y, a, a)
    assert (got.delta, got.lo, got.hi, got.outcome) == (0.0, 0.0, 0.0, paired.TIE)


def test_paired_delta_refuses_methods_scored_on_different_rows():
    y, a, _ = _pair(n=50)
    with pytest.raises(ValueError, match='same rows'):
        paired.paired_delta(y, a, a[:40])


def _pd(delta, outcome):
    return paired.PairedDelta(delta, delta - 0.01, delta + 0.01, outcome)


def test_across_counts_sign_test_and_mean_interval_by_direct_computation():
    deltas = [0.05, 0.02, -0.01, 0.03, 0.0, 0.04, -0.02]
    outs = [paired.WIN, paired.WIN, paired.TIE, paired.WIN, paired.TIE, paired.WIN,
            paired.LOSS]
    got = paired.across([_pd(d, o) for d, o in zip(deltas, outs)], n_resamples=2000, seed=1)
    assert (got.datasets, got.wins, got.ties, got.losses) == (7, 4, 2, 1)
    # Exact two-sided sign test of 4 wins vs 1 loss: 2 * P(X >= 4), X ~ Bin(5, 1/2).
    assert got.sign_test_p == pytest.approx(2 * (math.comb(5, 4) + 1) / 2 ** 5)
    d = np.asarray(deltas)
    rng = np.random.default_rng(1)
    means = np.array([d[rng.integers(0, 7, 7)].mean() for _ in range(2000)])
    assert got.mean_delta == pytest.approx(d.mean())
    # Same generator, same draws, row-wise means: equal up to float64 summation order.
    assert (got.mean_delta_lo, got.mean_delta_hi) == pytest.approx(
        tuple(np.percentile(means, (2.5, 97.5))), abs=1e-12)
    assert got.min_detectable == pytest.approx(2.8016 * d.std(ddof=1) / math.sqrt(7),
                                               rel=1e-4)  # z_.975 + z_.8 = 2.80155


def test_wilcoxon_matches_exact_enumeration_of_signs():
    d = np.array([0.3, -0.1, 0.5, 0.2, 0.7, -0.4])   # distinct |d|: ranks 1..6
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    w_pos = ranks[d > 0].sum()
    sums = [sum(r for r, s in zip(ranks, signs) if s)
            for signs in itertools.product((0, 1), repeat=len(d))]
    mean = ranks.sum() / 2
    p = np.mean([abs(s - mean) >= abs(w_pos - mean) for s in sums])
    assert paired.wilcoxon(d) == pytest.approx(p)
    assert math.isnan(paired.wilcoxon([0.0, 0.0]))


def test_across_of_nothing_is_empty_not_an_error():
    got = paired.across([])
    assert (got.datasets, got.wins, got.sign_test_p) == (0, 0, 1.0)
    assert math.isnan(got.mean_delta)
