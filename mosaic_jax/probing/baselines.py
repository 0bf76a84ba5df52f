"""Non-SAE baselines chosen by name: TF-IDF bag of words, a shallow decision tree and
logistic regression on downsampled pixels (image datasets).

Every baseline is `fn(x_train, y_train, *, num_classes=None, seed=0, **options) -> model`
(the fitted scikit-learn object); `predict_proba(model, x, num_classes)` scores any rows.
Choosing options and scoring splits is `evaluation`'s job. The hidden-state probes
(MOSAIC's last-token and mean-pooled baselines) are not here: the feature step pools hidden
states and fits them with `probe`, like the SAE features.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
import scipy.sparse

from mosaic_jax.probing import probe

BASELINES: dict[str, Callable[..., Any]] = {}


def register(name: str):
    def deco(fn):
        BASELINES[name] = fn
        return fn
    return deco


def get(name: str) -> Callable[..., Any]:
    if name not in BASELINES:
        raise ValueError(f'unknown baseline {name!r}; valid: {sorted(BASELINES)}')
    return BASELINES[name]


def fit(name: str, x_train, y_train, **options) -> Any:
    """Baseline `name` fitted on the training rows: the scikit-learn model."""
    return get(name)(x_train, y_train, **options)


def predict_proba(model, x, num_classes: int) -> np.ndarray:
    """f32[N, C] class probabilities; classes absent from training get probability 0."""
    p = model.predict_proba(x)
    out = np.zeros((p.shape[0], num_classes), dtype=np.float32)
    out[:, np.asarray(model.classes_, dtype=np.int64)] = p
    return out


def _labels(y_train, num_classes: int | None) -> tuple[np.ndarray, int]:
    y = np.asarray(y_train, dtype=np.int64)
    if y.ndim != 1 or len(np.unique(y)) < 2:
        raise ValueError(f'y_train must be int[N] with >= 2 classes, got shape {y.shape} and '
                         f'classes {np.unique(y).tolist()}')
    c = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f'labels must lie in 0..{c - 1}, got {y.min()}..{y.max()}')
    return y, c


@register('tfidf')
def tfidf(x_train: Sequence[str], y_train, *, num_classes: int | None = None, seed: int = 0,
          ngram_range: tuple[int, int] = (1, 2), max_features: int = 20_000,
          stop_words: str | None = 'english', C: float = 1.0, max_iter: int = 1000) -> Any:
    """TF-IDF of word uni+bigrams -> class-balanced logistic regression (a Pipeline).

    x_train: list of texts; y_train: int[N_train] in 0..C-1.
    """
    return tfidf_grid(x_train, y_train, (C,), num_classes=num_classes, seed=seed,
                      ngram_range=ngram_range, max_features=max_features,
                      stop_words=stop_words, max_iter=max_iter)[0]


def tfidf_grid(x_train: Sequence[str], y_train, Cs: Sequence[float], *,
               num_classes: int | None = None, seed: int = 0,
               ngram_range: tuple[int, int] = (1, 2), max_features: int = 20_000,
               stop_words: str | None = 'english', max_iter: int = 1000) -> list[Any]:
    """One TF-IDF pipeline per C in `Cs`, sharing one vectorizer fitted on x_train.

    The logistic regression is sklearn's (class-balanced, L2, unpenalised intercept) solved
    by `probe.fit_grid` (its sklearn parity is tested, on this very TF-IDF too), whose
    reduced solve of rows < features costs a Gram matrix instead of sklearn's L-BFGS over
    20k columns per C. Each fit is returned as a sklearn Pipeline (vectorizer + a
    LogisticRegression holding the coefficients), the object saved probes rebuild.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    y, _ = _labels(y_train, num_classes)
    vec = TfidfVectorizer(ngram_range=tuple(ngram_range), max_features=max_features,
                          stop_words=stop_words)
    try:
        x = vec.fit_transform(list(x_train))
    except ValueError as e:
        if 'empty vocabulary' not in str(e):
            raise
        # Texts of stop words and 1-character tokens only (e.g. 'What is 3 + 4?'): keep
        # every word of any length instead of failing.
        logging.warning('tfidf: empty vocabulary with stop_words=%r; refitting with all '
                        'tokens of any length', stop_words)
        vec = TfidfVectorizer(ngram_range=tuple(ngram_range), max_features=max_features,
                              token_pattern=r'(?u)\b\w+\b')
        x = vec.fit_transform(list(x_train))
    classes, yk = np.unique(y, return_inverse=True)  # sklearn fits the classes present
    grid = probe.fit_grid(x.toarray().astype(np.float32), yk, tuple(Cs),
                          num_classes=len(classes), class_weight='balanced',
                          max_iter=max_iter, seed=seed)
    out = []
    for i in range(len(Cs)):
        coef, intercept = probe.raw_coef(probe.take(grid, i))   # [F, C'], [C']
        lr = LogisticRegression(C=float(Cs[i]), class_weight='balanced', max_iter=max_iter)
        lr.coef_ = np.asarray(coef, np.float64).T
        lr.intercept_ = np.asarray(intercept, np.float64)
        lr.classes_ = classes
        lr.n_features_in_ = x.shape[1]
        out.append(make_pipeline(vec, lr))
    return out


GRIDS: dict[str, Callable[..., list[Any]]] = {'tfidf': tfidf_grid}


def fit_grid(name: str, x_train, y_train, Cs: Sequence[float], **options) -> list[Any]:
    """Baseline `name` fitted once per C (one shared vectorizer where it has a grid fitter)."""
    if name in GRIDS:
        return GRIDS[name](x_train, y_train, Cs, **options)
    return [fit(name, x_train, y_train, C=C, **options) for C in Cs]


SPARSE_FIT_DENSITY = 0.1  # trees fit on a CSC copy below this fraction of nonzeros


def tree_matrix(x: np.ndarray, block: int = 1024):
    """x as the trees read it: a CSR matrix when under SPARSE_FIT_DENSITY of it is nonzero
    (built `block` rows at a time, so no dense temporary of the whole matrix), else x.
    Index its rows (`m[rows]`) for each fit instead of copying dense rows."""
    x = np.asarray(x)
    nnz = sum(int(np.count_nonzero(x[a:a + block])) for a in range(0, len(x), block))
    if x.ndim != 2 or nnz >= SPARSE_FIT_DENSITY * x.size:
        return x
    return scipy.sparse.vstack([scipy.sparse.csr_matrix(x[a:a + block])
                                for a in range(0, len(x), block)], format='csr')


@register('decision_tree')
def decision_tree(x_train, y_train, *, num_classes: int | None = None, seed: int = 0,
                  max_depth: int = 5, min_samples_leaf: int = 1) -> Any:
    """Class-balanced decision tree on feature matrices (depth 5 by default; the experiment
    chooses depth and leaf size on validation, see evaluation.fit_tree). Its few splits make
    it the readable baseline MOSAIC reports (`results.tree_block` lists its top features).

    x_train: f32[N, F] (e.g. pooled SAE features) or `tree_matrix`'s CSR rows; y_train:
    int[N_train] in 0..C-1.
    """
    from sklearn.tree import DecisionTreeClassifier
    y, _ = _labels(y_train, num_classes)
    if scipy.sparse.issparse(x_train):  # tree_matrix's CSR rows
        x_train = scipy.sparse.csc_matrix(x_train)
    else:
        x_train = np.asarray(x_train)
    if x_train.ndim != 2 or x_train.shape[0] != len(y):
        raise ValueError(f'x_train must be [N, F] with N={len(y)} rows, got {x_train.shape}')
    model = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=min_samples_leaf,
                                   class_weight='balanced', random_state=seed)
    if scipy.sparse.issparse(x_train):
        return model.fit(x_train, y)
    if np.count_nonzero(x_train) < SPARSE_FIT_DENSITY * x_train.size:
        # Pooled SAE features are mostly zeros: sklearn's sparse splitter sorts only the
        # nonzeros of each column (720 x 16k top-20 counts, depth 5: 0.46 s -> 0.04 s). It
        # scores the same splits; only exact ties between features may resolve differently.
        return model.fit(scipy.sparse.csc_matrix(x_train), y)
    return model.fit(x_train, y)


@register('pixels')
def pixels(x_train, y_train, *, num_classes: int | None = None, seed: int = 0, C: float = 1.0,
           max_iter: int = 1000) -> Any:
    """Standardised, class-balanced logistic regression on pixels: the image study's "how
    much is there before any model" baseline (a Pipeline).

    x_train: f32[N, side * side * 3] (`images.downsampled_pixels`); y_train: int[N_train].
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    y, _ = _labels(y_train, num_classes)
    x_train = np.asarray(x_train, np.float32)
    if x_train.ndim != 2 or x_train.shape[0] != len(y):
        raise ValueError(f'x_train must be [N, F] with N={len(y)} rows, got {x_train.shape}')
    model = make_pipeline(StandardScaler(), LogisticRegression(
        C=C, class_weight='balanced', max_iter=max_iter, random_state=seed))
    return model.fit(x_train, y)
