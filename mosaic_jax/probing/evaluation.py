"""Probe evaluation: fit candidates, choose on validation (or grouped K-fold CV), score test.

Takes arrays and small frozen option dataclasses, never the whole config, so notebooks and
tests call it directly. Test rows are only ever scored, never used to choose anything:

  * `Selection.VAL`: every candidate (a C of the grid, a tree setting) is fitted on train
    and scored on the validation split; the best is the train fit, scored on test.
  * `Selection.CV`: candidates are scored by stratified K-fold CV over train + val rows,
    with copies of a text kept in one fold (`groups`); the best is refitted on train + val
    and scored on test.
Test metrics carry seeded bootstrap intervals (`metrics.compute_with_intervals`).
"""
from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mosaic_jax.data import splits as splits_lib
from mosaic_jax.probing import baselines
from mosaic_jax.probing import metrics
from mosaic_jax.probing import probe

# A candidate fitted on some rows: (model object, rows -> proba [len(rows), C]).
Fitted = tuple[Any, Callable[[np.ndarray], np.ndarray]]


class Selection(str, enum.Enum):
    """How candidates (C values, variants, tree settings) are chosen (config.probe.select)."""
    VAL = 'val'
    CV = 'cv'


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
    select: Selection = Selection.VAL
    cv_k: int = 5                       # folds of Selection.CV
    n_bootstrap: int = 1000             # resamples of the test intervals (0: none)

    @classmethod
    def from_config(cls, config, *, standardize: bool | None = None) -> 'ProbeOptions':
        p = config.probe
        return cls(Cs=tuple(float(c) for c in p.Cs), metric_names=tuple(config.metrics),
                   class_weight=p.class_weight or None,
                   standardize=bool(p.standardize if standardize is None else standardize),
                   solver=p.solver, max_iter=int(p.max_iter), seed=int(config.seed),
                   select=Selection(p.select), cv_k=int(p.select_folds),
                   n_bootstrap=int(config.n_bootstrap))

    @property
    def headline(self) -> str:
        return self.metric_names[0]

    def fit_kwargs(self) -> dict:
        return dict(class_weight=self.class_weight, standardize=self.standardize,
                    solver=self.solver, max_iter=self.max_iter, seed=self.seed)

    def replace(self, **kw) -> 'ProbeOptions':
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass
class ProbeResult:
    """One evaluated method: chosen candidate, selection and test scores, the model."""
    key: Any                # the Variant / HiddenVariant / name it was trained on
    C: float | None         # the chosen C (None for non-probe candidates)
    val: dict               # selection metrics of the chosen candidate (val split or CV mean)
    test: dict              # test metrics with <m>_lo / <m>_hi intervals
    test_proba: np.ndarray
    params: Any             # ProbeParams, or the fitted sklearn model
    seconds: float
    choice: Any = None      # the chosen candidate itself


def scores(y: np.ndarray, proba, names: Sequence[str]) -> dict[str, float]:
    """Metric name -> float for labels int[N] and probabilities [N, C]."""
    return {k: float(v) for k, v in metrics.compute(y, np.asarray(proba), names=names).items()}


def test_scores(y: np.ndarray, proba, opts: ProbeOptions) -> dict[str, float]:
    """Test metrics, each with its bootstrap interval when opts.n_bootstrap > 0."""
    if not opts.n_bootstrap:
        return scores(y, proba, opts.metric_names)
    out = metrics.compute_with_intervals(y, np.asarray(proba), opts.metric_names,
                                         n_resamples=opts.n_bootstrap, seed=opts.seed)
    return {k: float(v) for k, v in out.items()}


def selection_folds(y: np.ndarray, splits, opts: ProbeOptions,
                    groups: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, score rows) pairs that choose candidates; never a test row.

    Args:
      groups: int[N] text-copy ids (splits.text_groups); CV folds keep each group whole.
    """
    tr, va, _ = splits
    if opts.select is Selection.VAL:
        return [(np.asarray(tr), np.asarray(va))]
    return splits_lib.grouped_folds(y, np.concatenate([tr, va]), groups, opts.cv_k, opts.seed)


def choose(fit_all: Callable[[np.ndarray], list[Fitted]], y: np.ndarray, folds,
           names: Sequence[str]) -> tuple[int, list[dict], list[Fitted]]:
    """Scores every candidate on every fold; the best by the mean of names[0].

    Args:
      fit_all: fit rows -> one Fitted per candidate.
    Returns:
      (best index (ties: the first), mean metrics per candidate, the last fold's fits).
    """
    per: list[dict[str, list[float]]] = []
    fits: list[Fitted] = []
    for fit_rows, score_rows in folds:
        fits = fit_all(fit_rows)
        if not per:
            per = [dict() for _ in fits]
        for i, (_, proba) in enumerate(fits):
            for k, v in scores(y[score_rows], proba(score_rows), names).items():
                per[i].setdefault(k, []).append(v)
    means = [{k: float(np.nanmean(v)) for k, v in d.items()} for d in per]
    head = np.asarray([m[names[0]] for m in means], np.float64)
    best = int(np.nanargmax(np.where(np.isnan(head), -np.inf, head)))
    return best, means, fits


def evaluate(key, candidates: Sequence, fit_all: Callable[..., list[Fitted]],
             y: np.ndarray, splits, opts: ProbeOptions, folds, *,
             refit: bool = False) -> ProbeResult:
    """Chooses among `candidates` on `folds`, (re)fits the choice, scores test.

    Args:
      fit_all: `(rows, only=None) -> [Fitted]`, one per candidate (only: just that one).
      refit: refit the choice on train + val in VAL mode too (CV mode always does).
    """
    t0 = time.perf_counter()
    tr, va, te = splits
    best, means, fits = choose(fit_all, y, folds, opts.metric_names)
    if refit or opts.select is Selection.CV:  # the choice on every non-test row
        model, proba_fn = fit_all(np.sort(np.concatenate([tr, va])), only=best)[0]
    else:
        model, proba_fn = fits[best]
    proba = np.asarray(proba_fn(np.asarray(te)))
    choice = candidates[best]
    return ProbeResult(key, float(choice) if isinstance(choice, float) else None, means[best],
                       test_scores(y[te], proba, opts), proba, model,
                       time.perf_counter() - t0, choice)


def probe_fitter(x: np.ndarray, y: np.ndarray, opts: ProbeOptions, num_classes: int,
                 shared_rows: np.ndarray | None = None):
    """fit_all for the logistic probe: the whole C grid per call.

    shared_rows: the rows every fit draws from (train + val for CV selection); when the
    problem is wide (fewer of them than features), unstandardised and L-BFGS, one
    `probe.RowBasis` of them serves every fold and the refit (one Gram, one factorisation).
    """
    x = np.asarray(x, np.float32)
    basis = None
    if (shared_rows is not None and not opts.standardize and opts.solver == 'lbfgs'
            and len(shared_rows) < x.shape[1]):
        shared_rows = np.sort(np.asarray(shared_rows))
        basis = probe.RowBasis(x, shared_rows)

    def fit_grid(rows, Cs):
        if basis is None:
            return probe.fit_grid(x[rows], y[rows], Cs, num_classes=num_classes,
                                  **opts.fit_kwargs())
        pos = np.searchsorted(shared_rows, rows)
        if not np.array_equal(shared_rows[np.minimum(pos, len(shared_rows) - 1)], rows):
            raise ValueError('probe_fitter: a fit asked for rows outside shared_rows')
        return basis.fit_grid(pos, y[rows], Cs, num_classes=num_classes,
                              class_weight=opts.class_weight, max_iter=opts.max_iter)

    def fit_all(rows, only: int | None = None) -> list[Fitted]:
        Cs = opts.Cs if only is None else (opts.Cs[only],)
        grid = fit_grid(np.asarray(rows), Cs)
        out = []
        for i in range(len(Cs)):
            params = jax.device_get(probe.take(grid, i))
            out.append((params, lambda r, p=params: np.asarray(probe.predict_proba(p, x[r]))))
        return out
    return fit_all


def fit_variant(key, x: np.ndarray, y: np.ndarray, splits, opts: ProbeOptions, *,
                num_classes: int, groups: np.ndarray | None = None) -> ProbeResult:
    """A probe on features x [N, F]: C chosen on validation / CV, scored on test."""
    folds = selection_folds(y, splits, opts, groups)
    shared = np.concatenate(splits[:2]) if opts.select is Selection.CV else None
    return evaluate(key, opts.Cs, probe_fitter(x, y, opts, num_classes, shared), y, splits,
                    opts, folds)


def fit_tfidf(texts: Sequence[str], y: np.ndarray, splits, opts: ProbeOptions, *,
              num_classes: int, groups: np.ndarray | None = None) -> ProbeResult:
    """TF-IDF + logistic regression, its C chosen exactly like the probes' C."""
    return _fit_baseline('tfidf', lambda rows: [texts[i] for i in rows], y, splits, opts,
                         num_classes, groups)


def fit_pixels(x: np.ndarray, y: np.ndarray, splits, opts: ProbeOptions, *,
               num_classes: int, groups: np.ndarray | None = None) -> ProbeResult:
    """The 'pixels' baseline on x f32[N, side * side * 3]: C chosen like the probes' C."""
    return _fit_baseline('pixels', lambda rows: x[rows], y, splits, opts, num_classes, groups)


def _fit_baseline(name: str, take: Callable, y: np.ndarray, splits, opts: ProbeOptions,
                  num_classes: int, groups: np.ndarray | None) -> ProbeResult:
    """A C-parametrised `baselines` entry on the inputs `take(rows)`, C chosen on
    validation / CV like the probes'."""
    def fit_all(rows, only: int | None = None) -> list[Fitted]:
        Cs = opts.Cs if only is None else (opts.Cs[only],)
        models = baselines.fit_grid(name, take(rows), y[rows], Cs, num_classes=num_classes,
                                    seed=opts.seed)
        return [(m, lambda r, m=m: baselines.predict_proba(m, take(r), num_classes))
                for m in models]
    return evaluate(name, opts.Cs, fit_all, y, splits, opts,
                    selection_folds(y, splits, opts, groups))


# MOSAIC's tree search space (src/classifiers.py grid-searches depth / split / leaf).
TREE_GRID = tuple((d, leaf) for d in (3, 5, 10) for leaf in (1, 5))


def fit_tree(key, x: np.ndarray, y: np.ndarray, splits, opts: ProbeOptions, *,
             num_classes: int, groups: np.ndarray | None = None) -> ProbeResult:
    """The decision tree on SAE features: (max_depth, min_samples_leaf) chosen on
    validation / CV, then refitted on train + val (MOSAIC's recipe) and scored on test."""
    x = baselines.tree_matrix(x)  # sparse once, not per fit

    def fit_all(rows, only: int | None = None) -> list[Fitted]:
        grid = TREE_GRID if only is None else (TREE_GRID[only],)
        out = []
        for depth, leaf in grid:
            m = baselines.fit('decision_tree', x[rows], y[rows], num_classes=num_classes,
                              seed=opts.seed, max_depth=depth, min_samples_leaf=leaf)
            out.append((m, lambda r, m=m: baselines.predict_proba(m, x[r], num_classes)))
        return out
    return evaluate(key, TREE_GRID, fit_all, y, splits, opts,
                    selection_folds(y, splits, opts, groups), refit=True)


def cross_validate_variant(res: ProbeResult, x: np.ndarray, y: np.ndarray, splits,
                           opts: ProbeOptions, *, k: int, num_classes: int,
                           groups: np.ndarray | None = None) -> dict:
    """MOSAIC's `performance.cross_validation`: stratified K-fold scores of the chosen C
    on train + validation rows (test rows are never touched), folds from the same grouped
    builder as selection (copies of a text never on both sides of a fold)."""
    folds = splits_lib.grouped_folds(y, np.concatenate([splits[0], splits[1]]), groups, k,
                                     opts.seed)

    def fit_fn(x_tr, y_tr):
        p = probe.fit(np.asarray(x_tr, np.float32), y_tr, num_classes=num_classes, C=res.C,
                      **opts.fit_kwargs())
        return lambda x_te: probe.predict_proba(p, np.asarray(x_te, np.float32))

    cv = cross_validate(fit_fn, x, y, folds)
    out = dict(mean_accuracy=cv['accuracy']['mean'], std_accuracy=cv['accuracy']['std'],
               fold_scores=cv['accuracy']['folds'])
    out.update({f'{n}_mean': v['mean'] for n, v in cv.items()})
    return out


def cross_validate(fit_fn: Callable, x, y, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                   names: Sequence[str] | None = None) -> dict[str, dict]:
    """Scores of `fit_fn(x_train, y_train) -> predict_proba(x) -> [N, C]` on given folds.

    Args:
      x: [N, ...] indexable by row arrays; y: int[N].
      folds: (fit rows, score rows) pairs from `splits.grouped_folds` (the one fold builder).
      names: metric names (`metrics` registry; default: its defaults).
    Returns:
      {metric: {'mean': float, 'std': float (population, ddof=0), 'folds': [k floats]}}.
    """
    y = np.asarray(y)
    x = np.asarray(x) if not hasattr(x, 'shape') else x
    scores: dict[str, list[float]] = {}
    for tr, te in folds:
        predict_proba = fit_fn(x[tr], y[tr])
        for name, v in metrics.compute(y[te], np.asarray(predict_proba(x[te])), names).items():
            scores.setdefault(name, []).append(v)
    return {n: {'mean': float(np.mean(v)), 'std': float(np.std(v)), 'folds': v}
            for n, v in scores.items()}
