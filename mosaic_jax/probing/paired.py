"""Paired comparisons of two methods: per dataset, then across datasets.

Per dataset (`paired_delta`): methods A and B are scored on the SAME test rows, so their
difference is bootstrapped pairwise: every resample draws one set of row indices and scores
both A and B on it (`metrics.resample_statistics`, the project's one macro-F1). The
interval of Δ = metric(A) - metric(B) is far narrower than two marginal intervals whenever
A and B err on mostly the same rows; Δ's interval excluding 0 is a win (above) or loss.

Across datasets (`across`): win / tie / loss counts, the two-sided sign test on wins vs
losses (ties left out), the Wilcoxon signed-rank p of the Δs, the mean Δ with a percentile
interval from resampling datasets, and the minimum mean Δ the set of datasets could detect
(`min_detectable_delta`). sae-probes (Kantamneni et al. 2025) and SAEBench report counts and
mean differences across datasets in this way.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats

from mosaic_jax.probing import metrics

WIN, TIE, LOSS = 'win', 'tie', 'loss'
# Rows of [R, N] resample indices scored at a time: bounds memory for large test sets.
_BLOCK_ELEMS = 1 << 22


@dataclasses.dataclass(frozen=True)
class PairedDelta:
    """Δ = metric(A) - metric(B) on one dataset's test rows, with its paired interval."""
    delta: float
    lo: float
    hi: float
    outcome: str            # WIN (lo > 0), LOSS (hi < 0) or TIE


def outcome(lo: float, hi: float) -> str:
    """WIN when the interval lies wholly above 0, LOSS when wholly below, else TIE."""
    if lo > 0:
        return WIN
    if hi < 0:
        return LOSS
    return TIE


def _percentiles(v: np.ndarray, level: float) -> tuple[float, float]:
    v = v[~np.isnan(v)]
    if not v.size:
        return float('nan'), float('nan')
    lo, hi = np.percentile(v, (50.0 * (1.0 - level), 50.0 * (1.0 + level)))
    return float(lo), float(hi)


def paired_delta(y_true, proba_a, proba_b, *, metric: str = 'macro_f1',
                 n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> PairedDelta:
    """The paired percentile bootstrap of metric(A) - metric(B).

    Args:
      y_true: int[N] test labels; proba_a, proba_b: [N, C] class probabilities of A and B
        on the same N rows, in the same order.
      n_resamples: R resamples of N rows with replacement, the same rows for A and B.
    """
    y_true = np.asarray(y_true)
    proba_a, proba_b = np.asarray(proba_a), np.asarray(proba_b)
    if proba_a.shape != proba_b.shape:
        raise ValueError(f'A and B must be scored on the same rows: {proba_a.shape} vs '
                         f'{proba_b.shape}')
    if not len(y_true) or n_resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f'need N >= 1 rows, n_resamples >= 1, 0 < level < 1; got '
                         f'{len(y_true)}, {n_resamples}, {level}')
    point = (metrics.compute(y_true, proba_a, [metric])[metric]
             - metrics.compute(y_true, proba_b, [metric])[metric])
    idx = metrics.resample_indices(len(y_true), n_resamples, seed)
    step = max(1, _BLOCK_ELEMS // len(y_true))
    diffs = []
    for s in range(0, n_resamples, step):
        block = idx[s:s + step]
        a = metrics.resample_statistics(y_true, proba_a, [metric], block)[metric]
        b = metrics.resample_statistics(y_true, proba_b, [metric], block)[metric]
        diffs.append(a - b)
    lo, hi = _percentiles(np.concatenate(diffs), level)
    return PairedDelta(float(point), lo, hi, outcome(lo, hi))


@dataclasses.dataclass(frozen=True)
class Across:
    """One comparison over D datasets (see the module docstring)."""
    datasets: int
    wins: int
    ties: int
    losses: int
    sign_test_p: float      # two-sided binomial test of wins vs losses (ties left out)
    wilcoxon_p: float       # two-sided Wilcoxon signed-rank of the Δs (NaN: all Δ = 0)
    mean_delta: float
    mean_delta_lo: float    # percentile interval of the mean over resampled datasets
    mean_delta_hi: float
    min_detectable: float   # smallest mean Δ detectable at 5% / 80% power (NaN: D < 2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p of `wins` vs `losses` (1.0 when both are 0)."""
    n = wins + losses
    return float(stats.binomtest(wins, n, 0.5).pvalue) if n else 1.0


def wilcoxon(deltas: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p of the Δs (zeros dropped); NaN when all are 0."""
    d = np.asarray(deltas, np.float64)
    if not np.any(d != 0):
        return float('nan')
    return float(stats.wilcoxon(d, zero_method='wilcox').pvalue)


def min_detectable_delta(deltas: Sequence[float], *, alpha: float = 0.05,
                         power: float = 0.8) -> float:
    """(z_{1-alpha/2} + z_power) * sd(Δ) / sqrt(D): the smallest true mean Δ a two-sided
    test at level alpha detects with probability `power`, given the spread of Δ across
    the D datasets (the normal approximation of the paired t-test)."""
    d = np.asarray(deltas, np.float64)
    if d.size < 2:
        return float('nan')
    z = stats.norm.ppf(1.0 - alpha / 2.0) + stats.norm.ppf(power)
    return float(z * d.std(ddof=1) / math.sqrt(d.size))


def across(per_dataset: Sequence[PairedDelta], *, n_resamples: int = 10_000,
           level: float = 0.95, seed: int = 0) -> Across:
    """Counts, sign test, Wilcoxon p and the mean Δ over datasets (one PairedDelta each)."""
    d = np.asarray([p.delta for p in per_dataset], np.float64)
    out = [p.outcome for p in per_dataset]
    wins, ties, losses = out.count(WIN), out.count(TIE), out.count(LOSS)
    if d.size:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(1)
        mean, (lo, hi) = float(d.mean()), _percentiles(means, level)
    else:
        mean = lo = hi = float('nan')
    return Across(int(d.size), wins, ties, losses, sign_test(wins, losses), wilcoxon(d),
                  mean, lo, hi, min_detectable_delta(d))
