"""Probe evaluation: fit a C grid, choose on validation, score test, cross-validate.

Takes arrays and a small frozen `ProbeOptions`, never the whole config, so notebooks and
tests call it directly. Test rows are only ever scored, never used to choose anything.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np

from mosaic_jax import metrics
from mosaic_jax import probe


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    """What fitting and choosing a probe needs (from config.probe / config.metrics)."""
    Cs: tuple[float, ...]
    metric_names: tuple[str, ...]       # the first one chooses C (and variants)
    class_weight: str | None = 'balanced'
    standardize: bool = False
    solver: str = 'lbfgs'
    max_iter: int = 500
    seed: int = 0

    @classmethod
    def from_config(cls, config) -> 'ProbeOptions':
        p = config.probe
        return cls(Cs=tuple(float(c) for c in p.Cs), metric_names=tuple(config.metrics),
                   class_weight=p.class_weight or None, standardize=bool(p.standardize),
                   solver=p.solver, max_iter=int(p.max_iter), seed=int(config.seed))

    @property
    def headline(self) -> str:
        return self.metric_names[0]

    def fit_kwargs(self) -> dict:
        return dict(class_weight=self.class_weight, standardize=self.standardize,
                    solver=self.solver, max_iter=self.max_iter, seed=self.seed)


@dataclasses.dataclass
class ProbeResult:
    """One trained variant: chosen C, validation and test metrics, what result files need."""
    key: Any                # the Variant / HiddenVariant it was trained on
    C: float
    val: dict
    test: dict
    test_proba: np.ndarray
    params: Any
    seconds: float


def scores(y: np.ndarray, proba, names: Sequence[str]) -> dict[str, float]:
    """Metric name -> float for labels int[N] and probabilities [N, C]."""
    return {k: float(v) for k, v in metrics.compute(y, np.asarray(proba), names=names).items()}


def fit_variant(key, x: np.ndarray, y: np.ndarray, splits, opts: ProbeOptions, *,
                num_classes: int) -> ProbeResult:
    """Fits every C in one vmapped call, picks the best on validation, scores test.

    Args:
      x: [N, F] features of every row; y: int[N]; splits: (train, val, test) indices.
    """
    tr, va, te = splits
    t0 = time.perf_counter()
    x = np.asarray(x, np.float32)
    grid = probe.fit_grid(x[tr], y[tr], opts.Cs, num_classes=num_classes, **opts.fit_kwargs())
    best, _ = probe.select_C(grid, opts.Cs, x[va], y[va], metric=opts.headline)
    params = probe.take(grid, best)
    val = scores(y[va], probe.predict_proba(params, x[va]), opts.metric_names)
    proba = np.asarray(probe.predict_proba(params, x[te]))
    return ProbeResult(key, float(opts.Cs[best]), val, scores(y[te], proba, opts.metric_names),
                       proba, jax.device_get(params), time.perf_counter() - t0)


def cross_validate_variant(res: ProbeResult, x: np.ndarray, y: np.ndarray, splits,
                           opts: ProbeOptions, *, k: int, num_classes: int) -> dict:
    """MOSAIC's `performance.cross_validation`: stratified K-fold scores of the chosen C
    on train + validation rows (test rows are never touched)."""
    rows = np.concatenate([splits[0], splits[1]])

    def fit_fn(x_tr, y_tr):
        p = probe.fit(np.asarray(x_tr, np.float32), y_tr, num_classes=num_classes, C=res.C,
                      **opts.fit_kwargs())
        return lambda x_te: probe.predict_proba(p, np.asarray(x_te, np.float32))

    cv = metrics.cross_validate(fit_fn, x[rows], y[rows], k=k, seed=opts.seed)
    out = dict(mean_accuracy=cv['accuracy']['mean'], std_accuracy=cv['accuracy']['std'],
               fold_scores=cv['accuracy']['folds'])
    out.update({f'{n}_mean': v['mean'] for n, v in cv.items()})
    return out


def coef(params) -> np.ndarray:
    """Probe weights on the raw feature space (standardisation undone): [F, C']."""
    return probe.raw_coef(params)[0]
