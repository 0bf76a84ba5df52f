"""Classification metrics chosen by name (each defined by a scikit-learn call, computed by
its vectorised form, below) and bootstrap confidence intervals (K-fold CV is `evaluation.cross_validate`, on `splits.grouped_folds`).

Every metric is `fn(y_true int[N], proba f32[N, C]) -> float`; predictions are
`argmax(proba)` and the number of classes is C = proba.shape[1], the dataset's classes.

Macro-F1, the project's one definition ('macro_f1', the headline number): the unweighted
mean of the per-class F1 over ALL C classes of the dataset (sklearn `labels=range(C)`,
`zero_division=0`), so a class that is neither in the test labels nor predicted counts 0.
summary.csv, model selection and the results JSON (results.linear_probe_block and
results.tree_block call this module) all report this number. MOSAIC's figure, the mean
over the classes present in y_true or the predictions (sklearn's default labels), is the
separate metric 'macro_f1_present'; the two agree whenever every class occurs in the test
labels or the predictions. 'macro_f1_present' is registered with default=False: it is
computed only when named, not by `compute(names=None)`.

Bootstrap (`bootstrap`, `compute_with_intervals`): a seeded percentile bootstrap over test
rows. Each resample draws N row indices with replacement; the per-resample statistics of
the built-in metrics are vectorised over resamples (`resample_statistics`):
  * macro_f1, macro_f1_present, accuracy, balanced_accuracy: one bincount gives the
    confusion matrix of every resample of a block;
  * roc_auc: a weighted Mann-Whitney statistic (ties count 1/2, as sklearn's trapezoidal
    AUC) with the rows sorted once per class and cumulative weighted negatives per resample;
    multiclass is the registry's one-vs-rest macro mean over all C columns, looping only
    over classes.
A metric without a vectorised form (e.g. one added with `register`) falls back to calling
its function on each resample's rows (a Python loop over resamples). Degenerate resamples,
where a statistic is undefined (for AUC: some class of 0..C-1 absent from the resample, or
only one class for binary), give NaN for that resample and are left out of the
percentiles; an interval is (NaN, NaN) only when every resample is degenerate.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
from sklearn import metrics as skm

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {}
_OPT_IN: set[str] = set()  # registered with default=False: computed only when named
# name -> (the registered fn it reproduces, fn(_Block) -> float64[B]); used only while
# METRICS[name] is still that fn, so re-registering a name never mixes two definitions.
_VECTORISED: dict[str, tuple[Callable, Callable]] = {}
# Resamples are processed in blocks of about this many drawn rows (B * N), which bounds
# the memory of the [B, N] index / weight arrays (~32 MiB each) for any test-set size.
_BLOCK_ELEMS = 1 << 22


def register(name: str, *, default: bool = True):
    """Decorator adding `fn(y_true, proba) -> float` to `METRICS` under `name`.

    default=False: selectable by name but left out of `compute(names=None)`.
    """
    def deco(fn):
        METRICS[name] = fn
        (_OPT_IN.discard if default else _OPT_IN.add)(name)
        return fn
    return deco


def get(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    if name not in METRICS:
        raise ValueError(f'unknown metric {name!r}; valid: {sorted(METRICS)}')
    return METRICS[name]


def default_names() -> tuple[str, ...]:
    """The metrics `compute(names=None)` reports: every registered one except opt-ins."""
    return tuple(n for n in METRICS if n not in _OPT_IN)


@register('macro_f1')
def macro_f1(y_true, proba) -> float:
    """Unweighted mean F1 over all C = proba.shape[1] classes (the module docstring's one
    definition); a class absent from y_true and never predicted counts 0."""
    c = np.shape(proba)[1]
    return float(skm.f1_score(y_true, np.argmax(proba, -1), labels=np.arange(c),
                              average='macro', zero_division=0))


@register('macro_f1_present', default=False)
def macro_f1_present(y_true, proba) -> float:
    """MOSAIC's macro-F1: the mean over the classes present in y_true or the predictions
    (sklearn's default average='macro'); differs from 'macro_f1' only when some class is
    neither in the test labels nor predicted."""
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


def _names(names: Sequence[str] | None) -> tuple[str, ...]:
    names = default_names() if names is None else tuple(names)
    for n in names:
        get(n)  # unknown names fail before any work
    return names


def compute(y_true, proba, names: Sequence[str] | None = None) -> dict[str, float]:
    """{name: value} for `names` (default: `default_names()`): each built-in metric by its
    vectorised form (equal to the registered sklearn function to float64 rounding, as
    tests/test_metrics.py checks), any other by its function.

    Args:
      y_true: int[N] in 0..C-1; proba: f32[N, C] class probabilities (or scores).
    """
    y_true, proba = _check(y_true, proba)
    names = _names(names)
    if not len(y_true):
        return {n: get(n)(y_true, proba) for n in names}
    # The point value is the bootstrap's statistic on the identity resample: one definition
    # for values and intervals, and ~1 ms instead of sklearn's ~15 ms of input checks per
    # call (model selection scores every candidate on every fold).
    stats = resample_statistics(y_true, proba, names, np.arange(len(y_true))[None])
    return {n: float(v[0]) for n, v in stats.items()}


# ----------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------

class _Block:
    """B resamples of the test rows: idx int[B, N] row indices drawn with replacement."""

    def __init__(self, y: np.ndarray, proba: np.ndarray, idx: np.ndarray):
        self.y, self.proba, self.idx = y, proba, idx
        self.pred = np.argmax(proba, -1)
        self.b, self.n = idx.shape
        self.c = proba.shape[1]

    @functools.cached_property
    def confusion(self) -> np.ndarray:
        """float64[B, C, C] per-resample confusion (row = true, column = predicted)."""
        cc = self.c * self.c
        cell = (self.y * self.c + self.pred)[self.idx]                   # [B, N]
        flat = (np.arange(self.b)[:, None] * cc + cell).ravel()
        counts = np.bincount(flat, minlength=self.b * cc)
        return counts.reshape(self.b, self.c, self.c).astype(np.float64)

    @functools.cached_property
    def weights(self) -> np.ndarray:
        """float64[B, N]: how many times each test row was drawn in each resample."""
        flat = (np.arange(self.b)[:, None] * self.n + self.idx).ravel()
        counts = np.bincount(flat, minlength=self.b * self.n)
        return counts.reshape(self.b, self.n).astype(np.float64)


def vectorised(name: str):
    """Decorator registering `fn(_Block) -> float64[B]` as the resample form of the metric
    currently registered under `name`."""
    def deco(fn):
        _VECTORISED[name] = (METRICS[name], fn)
        return fn
    return deco


def _f1_per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 [B, C] = 2 tp / (n_true + n_pred), 0 where both are 0 (zero_division=0), and
    the mask [B, C] of classes present in the labels or the predictions."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denom = cm.sum(2) + cm.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1, denom > 0


@vectorised('macro_f1')
def _macro_f1_v(blk: _Block) -> np.ndarray:
    return _f1_per_class(blk.confusion)[0].mean(1)


@vectorised('macro_f1_present')
def _macro_f1_present_v(blk: _Block) -> np.ndarray:
    f1, present = _f1_per_class(blk.confusion)
    return f1.sum(1) / present.sum(1)  # N >= 1 rows, so some class is always present


@vectorised('accuracy')
def _accuracy_v(blk: _Block) -> np.ndarray:
    return np.trace(blk.confusion, axis1=1, axis2=2) / blk.n


@vectorised('balanced_accuracy')
def _balanced_accuracy_v(blk: _Block) -> np.ndarray:
    cm = blk.confusion
    support = cm.sum(2)
    recall = np.divide(np.diagonal(cm, axis1=1, axis2=2), support,
                       out=np.zeros_like(support), where=support > 0)
    return recall.sum(1) / (support > 0).sum(1)  # classes present in y_true, as sklearn


def _weighted_auc(w: np.ndarray, pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """float64[B] Mann-Whitney AUC of `score` for positives `pos` bool[N] with row
    weights w [B, N]; ties count 1/2. NaN where a resample has no positive or negative."""
    order = np.argsort(score, kind='stable')
    s, w, pos = score[order], w[:, order], pos[order]
    n = len(s)
    first = np.r_[True, s[1:] != s[:-1]]          # row starts a run of tied scores
    starts = np.flatnonzero(first)
    group = np.cumsum(first) - 1                  # tie-run id of each sorted row
    ends = np.r_[starts[1:], n]
    cneg = np.zeros((w.shape[0], n + 1))
    np.cumsum(w * ~pos, axis=1, out=cneg[:, 1:])  # weighted negatives before each row
    p = np.flatnonzero(pos)
    below = cneg[:, starts[group[p]]]             # negatives strictly below each positive
    tied = cneg[:, ends[group[p]]] - below        # negatives tied with it
    wp = w[:, p]
    n_pos, n_neg = wp.sum(1), cneg[:, -1]
    num = (wp * (below + 0.5 * tied)).sum(1)
    ok = (n_pos > 0) & (n_neg > 0)
    return np.divide(num, n_pos * n_neg, out=np.full(len(num), np.nan), where=ok)


@vectorised('roc_auc')
def _roc_auc_v(blk: _Block) -> np.ndarray:
    proba = np.asarray(blk.proba, np.float64)
    classes = [1] if blk.c == 2 else range(blk.c)
    # A class absent from a resample makes its AUC NaN, so the mean is NaN: as roc_auc.
    aucs = [_weighted_auc(blk.weights, blk.y == k, proba[:, k]) for k in classes]
    return np.mean(aucs, axis=0)


def _index_blocks(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """int[B, N] row-index blocks of all resamples, drawn in order from one generator."""
    rng = np.random.default_rng(seed)
    per_block = max(1, _BLOCK_ELEMS // n)
    for start in range(0, n_resamples, per_block):
        yield rng.integers(0, n, size=(min(per_block, n_resamples - start), n))


def resample_indices(n: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """int[R, N]: the rows `bootstrap(..., n_resamples=R, seed=seed)` draws for N rows."""
    return np.concatenate(list(_index_blocks(n, n_resamples, seed)))


def resample_statistics(y_true, proba, names: Sequence[str] | None,
                        idx: np.ndarray) -> dict[str, np.ndarray]:
    """{name: float64[R]}: each metric on the rows idx[r] of every resample r.

    Vectorised for the built-in metrics; any other metric is called once per resample.
    """
    y_true, proba = _check(y_true, proba)
    blk = _Block(y_true, proba, np.asarray(idx))
    out = {}
    for name in _names(names):
        fn = get(name)
        ref, vec = _VECTORISED.get(name, (None, None))
        if vec is not None and ref is fn:
            out[name] = np.asarray(vec(blk), np.float64)
        else:  # no vectorised form: loop over resamples
            out[name] = np.array([fn(y_true[i], proba[i]) for i in blk.idx], np.float64)
    return out


def bootstrap(y_true, proba, names: Sequence[str] | None = None, *,
              n_resamples: int = 1000, level: float = 0.95,
              seed: int = 0) -> dict[str, tuple[float, float]]:
    """{name: (lo, hi)}: seeded percentile-bootstrap interval over test rows.

    Args:
      y_true: int[N]; proba: [N, C]; names: metrics (default `default_names()`).
      n_resamples: R resamples of N rows with replacement; level: central coverage.
    Resamples where a metric is undefined (NaN) are left out of its percentiles.
    """
    y_true, proba = _check(y_true, proba)
    names = _names(names)
    if not len(y_true):
        raise ValueError('bootstrap needs at least one test row')
    if n_resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f'need n_resamples >= 1 and 0 < level < 1, got {n_resamples}, '
                         f'{level}')
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for idx in _index_blocks(len(y_true), n_resamples, seed):
        for n, v in resample_statistics(y_true, proba, names, idx).items():
            parts[n].append(v)
    q = (50.0 * (1.0 - level), 50.0 * (1.0 + level))
    out = {}
    for n, v in parts.items():
        v = np.concatenate(v)
        v = v[~np.isnan(v)]
        lo, hi = np.percentile(v, q) if v.size else (np.nan, np.nan)
        out[n] = (float(lo), float(hi))
    return out


def compute_with_intervals(y_true, proba, names: Sequence[str] | None = None,
                           **kw) -> dict[str, float]:
    """{name: value, name_lo: lo, name_hi: hi} per metric; `kw` goes to `bootstrap`."""
    point = compute(y_true, proba, names)
    ci = bootstrap(y_true, proba, list(point), **kw)
    out = {}
    for n, v in point.items():
        out[n], out[f'{n}_lo'], out[f'{n}_hi'] = v, *ci[n]
    return out


# ----------------------------------------------------------------------------------------
# Confusion matrix and cross-validation
# ----------------------------------------------------------------------------------------

def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """int64[C, C]: row = true class, column = predicted class; absent classes give zeros."""
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))
