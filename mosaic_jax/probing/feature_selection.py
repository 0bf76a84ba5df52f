"""k-sparse feature selection for SAE-latent probes (SAEBench / `sae-probes` style).

A k-sparse probe is an ordinary probe trained on only k of the F features (SAE latents),
chosen from the TRAINING rows alone. Two selectors:

'mean_diff' (the reference one). SAEBench (`evals/sparse_probing/probe_training.py`,
  `get_top_k_mean_diff_mask`) and the `sae-probes` code of Kantamneni et al. 2025, "Are
  sparse autoencoders useful? A case study in sparse probing" (`utils_sae.py`:
  `X_train_diff = X_train[y == 1].mean(0) - X_train[y == 0].mean(0)`, then
  `argsort(|X_train_diff|, descending)[:k]`) rank latents by the absolute difference of the
  class means on the training rows and keep the top k. Binary problems here use exactly that
  score, `|mean(x_f | y=1) - mean(x_f | y=0)|`.

  Multiclass: both references only ever select for BINARY tasks; SAEBench turns a multiclass
  dataset into one one-vs-rest task per class (positives = that class, negatives drawn from
  all other classes) and selects k latents per task. Our probe is ONE multiclass probe over
  one index set, so we score each feature by the best one-vs-rest difference over classes,
      score_f = max_c |mean(x_f | y = c) - mean(x_f | y != c)|,
  (classes absent from the training rows are skipped). Why max and not a mean over classes:
  a latent that singles out one class (the typical SAE latent) keeps its full one-vs-rest
  score instead of being diluted by the classes it says nothing about, so the top-k set is
  the union-like set of the strongest per-class detectors; for C = 2 both one-vs-rest
  differences equal the binary score, so the definition reduces exactly to the reference.
  The "rest" mean is over all other training rows (the reference draws a class-balanced
  random sample of them; we use all of them so the result is deterministic).

'l1' (an L1-regularised logistic path, an alternative also used in the sparse-probing
  literature). Features are z-scored with the training mean / std (std 0 -> 1) so the penalty
  treats them alike (`l1_standardize=False` to skip). C runs along a geometric grid
  `C_j = c_min * ratio**j`, starting just above sklearn's `l1_min_c` (where every coefficient
  is zero) and growing until the model has MORE than k non-zero features; the model at the
  previous grid point (the largest C with at most k non-zero features, i.e. "decrease C
  until at most k are non-zero") supplies the first picks, by largest |coef|. Walking up
  from the sparse end gives the same model on the grid as walking down and is much cheaper
  (small C fits converge fast). If that model has fewer than k non-zero features, the
  remaining slots go to the largest |coef| of the next (over-k) model, then to the
  'mean_diff' score. Solver: liblinear (deterministic with random_state=0; it penalises
  the intercept through `intercept_scaling`, which does not change which features enter).
  Binary problems are one fit on y == 1; multiclass problems fit one binary one-vs-rest
  model per present class (same convention as 'mean_diff') and a feature's |coef| is its
  max over classes.

Common rules: `k == 0` or `k >= F` selects all features (`arange(F)`); otherwise the k
indices come back best first; ties go to the lower feature index. Everything is computed in
float64 numpy on the host, deterministically.
"""
from __future__ import annotations

import inspect
import numbers
import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.svm import l1_min_c

METHODS = ('mean_diff', 'l1')
# sklearn >= 1.8 deprecates `penalty=` (L1 is l1_ratio=1); before 1.8 l1_ratio is ignored
# unless penalty='elasticnet', so the L1 model is spelled per version.
_PENALTY_DEPRECATED = (
    inspect.signature(LogisticRegression).parameters['penalty'].default == 'deprecated')


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------

def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f'k must be an integer, got {k!r}')
    if k < 0:
        raise ValueError(f'k must be >= 0 (0 means all features), got {k}')
    return int(k)


def _check_labels(y_train, n_rows: int, num_classes: int | None) -> tuple[np.ndarray, int]:
    """int64[N] labels in 0..num_classes-1 and num_classes (default max(y) + 1, >= 2)."""
    y = np.asarray(y_train)
    if y.ndim != 1:
        raise ValueError(f'y_train must be 1-D [N], got shape {y.shape}')
    if y.shape[0] != n_rows:
        raise ValueError(f'y_train has {y.shape[0]} labels but x_train has {n_rows} rows')
    if y.dtype == bool:
        y = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating):
        if not (np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise ValueError('y_train must hold integer class labels')
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f'y_train must hold integer class labels, got dtype {y.dtype}')
    y = y.astype(np.int64)
    if num_classes is None:
        num_classes = max(2, int(y.max()) + 1)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f'num_classes must be an integer, got {num_classes!r}')
    if num_classes < 2:
        raise ValueError(f'num_classes must be >= 2, got {num_classes}')
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f'labels must lie in 0..{num_classes - 1}, '
                         f'got range {int(y.min())}..{int(y.max())}')
    if np.unique(y).size < 2:
        raise ValueError('selection needs at least two classes present in y_train')
    return y, int(num_classes)


def _check_inputs(x_train, y_train, num_classes) -> tuple[np.ndarray, np.ndarray, int]:
    """Validated (x [N, F] numpy, y int64[N], num_classes)."""
    x = np.asarray(x_train)
    if x.ndim != 2:
        raise ValueError(f'x_train must be 2-D [N, F], got shape {x.shape}')
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f'x_train needs at least 2 rows and 1 feature, got {x.shape}')
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f'x_train must be numeric, got dtype {x.dtype}')
    if np.iscomplexobj(x):
        raise ValueError('x_train must be real-valued')
    if not np.all(np.isfinite(x)):
        raise ValueError('x_train contains NaN or inf')
    y, num_classes = _check_labels(y_train, x.shape[0], num_classes)
    return x, y, num_classes


# ----------------------------------------------------------------------------------------
# Scores and ranking
# ----------------------------------------------------------------------------------------

def _top_k(keys: list[np.ndarray], k: int) -> np.ndarray:
    """Indices of the k best features; `keys` are scores, most important first, each
    'higher is better'; the final tie-break is the lower feature index."""
    idx = np.arange(keys[0].shape[0])
    # np.lexsort sorts by its LAST key first, ascending: negate the scores.
    order = np.lexsort([idx] + [-np.asarray(s, np.float64) for s in reversed(keys)])
    return order[:k].astype(np.int64)


def _mean_diff(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(y, minlength=num_classes)
    sums = np.zeros((num_classes, x.shape[1]), np.float64)
    for c in np.flatnonzero(counts):
        sums[c] = x[y == c].sum(axis=0, dtype=np.float64)
    if num_classes == 2:  # the reference score exactly: mean(pos) - mean(neg)
        return np.abs(sums[1] / counts[1] - sums[0] / counts[0])
    total, n = sums.sum(axis=0), int(counts.sum())
    score = np.zeros(x.shape[1], np.float64)
    for c in np.flatnonzero(counts):
        rest = (total - sums[c]) / (n - counts[c])  # n > counts[c]: >= 2 classes present
        score = np.maximum(score, np.abs(sums[c] / counts[c] - rest))
    return score


def mean_diff_scores(x_train, y_train, *, num_classes: int | None = None) -> np.ndarray:
    """f64[F] selection score: |mean(pos) - mean(neg)| for binary problems, the max over
    present classes of |mean(x | y=c) - mean(x | y!=c)| for multiclass (module docstring)."""
    x, y, num_classes = _check_inputs(x_train, y_train, num_classes)
    return _mean_diff(x, y, num_classes)


def _standardise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    return (x - mean) / np.where(std > 0, std, 1.0)


def _l1_model(C: float, max_iter: int, tol: float) -> LogisticRegression:
    """An L1 liblinear logistic model, spelled for the installed sklearn."""
    kw: dict[str, Any] = dict(C=C, solver='liblinear', max_iter=max_iter, tol=tol,
                              random_state=0)
    if _PENALTY_DEPRECATED:
        return LogisticRegression(l1_ratio=1.0, **kw)
    return LogisticRegression(penalty='l1', **kw)


def _l1_targets(y: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Binary targets: y == 1 for binary problems, one-vs-rest per present class else."""
    if num_classes == 2:
        return [(y == 1).astype(np.int64)]
    return [(y == c).astype(np.int64) for c in np.unique(y)]


def _l1_importance(z, targets, C: float, max_iter: int, tol: float) -> np.ndarray:
    """f64[F] max over the one-vs-rest targets of |coef| of the L1 fit at C."""
    imp = np.zeros(z.shape[1], np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ConvergenceWarning)
        for t in targets:
            coef = _l1_model(C, max_iter, tol).fit(z, t).coef_
            imp = np.maximum(imp, np.abs(coef).max(axis=0))
    return imp


def _l1_path(z, y, num_classes, k, *, ratio, max_steps, max_iter, tol):
    """(|coef| at the largest grid C with <= k non-zero features, |coef| at the next grid C
    with > k); either is zeros when the grid has no such point."""
    targets = _l1_targets(y, num_classes)
    c_min = min(l1_min_c(z, t, loss='log') for t in targets)
    under = np.zeros(z.shape[1], np.float64)
    over = np.zeros(z.shape[1], np.float64)
    for j in range(1, max_steps + 1):
        imp = _l1_importance(z, targets, c_min * ratio ** j, max_iter, tol)
        if np.count_nonzero(imp) > k:
            over = imp
            break
        under = imp
    return under, over


def _select_l1(x, y, num_classes, k, *, standardize, ratio, max_steps, max_iter, tol):
    z = _standardise(x) if standardize else np.asarray(x, np.float64)
    under, over = _l1_path(z, y, num_classes, k, ratio=ratio, max_steps=max_steps,
                           max_iter=max_iter, tol=tol)
    return _top_k([under, over, _mean_diff(x, y, num_classes)], k)


def select_features(x_train, y_train, k: int, *, method: str = 'mean_diff',
                    num_classes: int | None = None, l1_standardize: bool = True,
                    l1_ratio: float = 10 ** 0.125, l1_max_steps: int = 96,
                    l1_max_iter: int = 1000, l1_tol: float = 1e-4) -> np.ndarray:
    """Indices of the k features a k-sparse probe uses, chosen from training rows only.

    Args:
      x_train: [N, F] features (numpy or jax); y_train: int[N] labels in 0..num_classes-1.
      k: number of features; 0 or >= F means all of them.
      method: 'mean_diff' (class-mean difference, SAEBench / sae-probes) or 'l1' (L1
        logistic path); definitions in the module docstring.
      num_classes: default max(y) + 1 (at least 2).
      l1_*: the 'l1' path only: z-score first, grid ratio between consecutive C, number
        of grid points, and liblinear's max_iter / tol.
    Returns:
      int64[k] feature indices, best first (ties: lower index), or arange(F) when k == 0
      or k >= F.
    Raises:
      ValueError on bad shapes, k < 0, labels outside 0..num_classes-1, fewer than two
      classes present, non-finite features or an unknown method.
    """
    k = _check_k(k)
    if method not in METHODS:
        raise ValueError(f'unknown selection method {method!r}; expected one of {METHODS}')
    x, y, num_classes = _check_inputs(x_train, y_train, num_classes)
    n_features = x.shape[1]
    if k == 0 or k >= n_features:
        return np.arange(n_features, dtype=np.int64)
    if method == 'mean_diff':
        return _top_k([_mean_diff(x, y, num_classes)], k)
    if not (l1_ratio > 1.0 and l1_max_steps >= 1):
        raise ValueError('l1_ratio must be > 1 and l1_max_steps >= 1')
    return _select_l1(x, y, num_classes, k, standardize=l1_standardize, ratio=l1_ratio,
                      max_steps=l1_max_steps, max_iter=l1_max_iter, tol=l1_tol)


def take_features(x, idx) -> Any:
    """x[:, idx] after checking idx (e.g. to apply a training-set selection to test rows);
    keeps x's array type (numpy or jax)."""
    idx = np.asarray(idx)
    if not hasattr(x, 'ndim'):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f'x must be 2-D [N, F], got shape {x.shape}')
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError('idx must be a 1-D integer array of feature indices')
    if idx.size and (idx.min() < 0 or idx.max() >= x.shape[1]):
        raise ValueError(f'feature indices must lie in 0..{x.shape[1] - 1}')
    return x[:, idx]
