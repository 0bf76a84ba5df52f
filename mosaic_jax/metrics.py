"""Classification metrics chosen by name (scikit-learn underneath), and stratified K-fold CV.

Every metric is `fn(y_true int[N], proba f32[N, C]) -> float`; predictions are
`argmax(proba)`. 'macro_f1' is the headline number (as in MOSAIC).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
from sklearn import metrics as skm
from sklearn.model_selection import StratifiedKFold

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {}


def register(name: str):
    """Decorator adding `fn(y_true, proba) -> float` to `METRICS` under `name`."""
    def deco(fn):
        METRICS[name] = fn
        return fn
    return deco


def get(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    if name not in METRICS:
        raise ValueError(f'unknown metric {name!r}; valid: {sorted(METRICS)}')
    return METRICS[name]


@register('macro_f1')
def macro_f1(y_true, proba) -> float:
    """Unweighted mean F1 over the classes present in y_true or the predictions
    (sklearn's average='macro'); a class never predicted and absent counts 0."""
    return float(skm.f1_score(y_true, np.argmax(proba, -1), average='macro',
                              zero_division=0))


@register('accuracy')
def accuracy(y_true, proba) -> float:
    return float(skm.accuracy_score(y_true, np.argmax(proba, -1)))


@register('balanced_accuracy')
def balanced_accuracy(y_true, proba) -> float:
    """Mean recall over the classes present in y_true (predicting an absent class is
    simply wrong here, so sklearn's warning about it is silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='y_pred contains classes not in y_true')
        return float(skm.balanced_accuracy_score(y_true, np.argmax(proba, -1)))


@register('roc_auc')
def roc_auc(y_true, proba) -> float:
    """Binary: AUC of proba[:, 1]. Multiclass: one-vs-rest macro AUC over all C columns.

    NaN (no error) when some class of 0..C-1 is absent from y_true: its one-vs-rest AUC is
    undefined, and averaging over the others would silently change the metric.
    """
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, np.float64)
    c = proba.shape[1]
    if np.any(np.bincount(y_true, minlength=c)[:c] == 0):
        return float('nan')
    if c == 2:
        return float(skm.roc_auc_score(y_true, proba[:, 1]))
    # The mean of per-class binary AUCs is sklearn's multi_class='ovr', average='macro',
    # computed directly so rows need not sum to exactly 1 (sklearn checks that).
    return float(np.mean([skm.roc_auc_score(y_true == k, proba[:, k]) for k in range(c)]))


def _check(y_true, proba) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    proba = np.asarray(proba)
    if proba.ndim != 2 or y_true.shape != proba.shape[:1]:
        raise ValueError(f'need y_true [N] and proba [N, C], got {y_true.shape} and '
                         f'{proba.shape}')
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f'y_true must hold integer class ids, got dtype {y_true.dtype}')
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= proba.shape[1]):
        raise ValueError(f'labels must lie in 0..{proba.shape[1] - 1}, got '
                         f'{y_true.min()}..{y_true.max()}')
    return y_true, proba


def compute(y_true, proba, names: Sequence[str] | None = None) -> dict[str, float]:
    """{name: value} for `names` (default: every registered metric).

    Args:
      y_true: int[N] in 0..C-1; proba: f32[N, C] class probabilities (or scores).
    """
    y_true, proba = _check(y_true, proba)
    fns = {n: get(n) for n in (METRICS if names is None else names)}
    return {n: fn(y_true, proba) for n, fn in fns.items()}


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """int64[C, C]: row = true class, column = predicted class; absent classes give zeros."""
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))


def cross_validate(fit_fn: Callable, x, y, k: int = 5, seed: int = 0,
                   names: Sequence[str] | None = None) -> dict[str, dict]:
    """Stratified K-fold CV of `fit_fn(x_train, y_train) -> predict_proba(x) -> [N, C]`.

    Args:
      x: [N, ...] indexable by row arrays; y: int[N].
    Returns:
      {metric: {'mean': float, 'std': float (population, ddof=0), 'folds': [k floats]}}.
    """
    y = np.asarray(y)
    x = np.asarray(x) if not hasattr(x, 'shape') else x
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores: dict[str, list[float]] = {}
    for tr, te in folds.split(np.zeros(len(y)), y):
        predict_proba = fit_fn(x[tr], y[tr])
        for name, v in compute(y[te], np.asarray(predict_proba(x[te])), names).items():
            scores.setdefault(name, []).append(v)
    return {n: {'mean': float(np.mean(v)), 'std': float(np.std(v)), 'folds': v}
            for n, v in scores.items()}
