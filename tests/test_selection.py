"""probing.feature_selection: k-sparse feature selection (mean_diff / l1), ties, k >= F, input checks, and
an end-to-end 3-feature probe on planted data (mosaic_jax.probe)."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import f1_score

from mosaic_jax.probing import feature_selection
from mosaic_jax.probing import probe

PLANTED = (3, 17, 40)
F = 60


def _noise(r, n):
    """Gaussian features with per-feature scales in [0.5, 3] (SAE latents differ in scale)."""
    return r.normal(size=(n, F)) * r.uniform(0.5, 3.0, size=F)


def _planted_binary(seed, n=600):
    """Binary labels; only features 3, 17, 40 carry them (mean shifted by 2 when y = 1)."""
    r = np.random.default_rng(seed)
    y = r.integers(0, 2, size=n)
    x = _noise(r, n)
    x[:, list(PLANTED)] = r.normal(size=(n, 3)) + 2.0 * y[:, None]
    return x.astype(np.float32), y


def _planted_multiclass(seed, n=900):
    """3 classes; class c raises feature PLANTED[c] by 2.5, all other features are noise."""
    r = np.random.default_rng(seed)
    y = r.integers(0, 3, size=n)
    x = _noise(r, n)
    x[:, list(PLANTED)] = r.normal(size=(n, 3)) + 2.5 * np.eye(3)[y]
    return x.astype(np.float32), y


@pytest.mark.parametrize('method', feature_selection.METHODS)
def test_planted_binary_recovered(method):
    x, y = _planted_binary(0)
    idx = feature_selection.select_features(x, y, 3, method=method, num_classes=2)
    assert idx.dtype == np.int64 and idx.shape == (3,)
    assert sorted(idx.tolist()) == list(PLANTED)
    # A larger k keeps the planted features on top.
    idx10 = feature_selection.select_features(x, y, 10, method=method, num_classes=2)
    assert idx10.shape == (10,) and len(set(idx10.tolist())) == 10
    assert sorted(idx10[:3].tolist()) == list(PLANTED)


@pytest.mark.parametrize('method', feature_selection.METHODS)
def test_planted_multiclass_recovered(method):
    x, y = _planted_multiclass(1)
    idx = feature_selection.select_features(x, y, 3, method=method, num_classes=3)
    assert sorted(idx.tolist()) == list(PLANTED)


def test_mean_diff_matches_direct_numpy_binary():
    r = np.random.default_rng(2)
    x = r.normal(size=(400, 80)) + 0.3 * r.normal(size=80)
    y = r.integers(0, 2, size=400)
    x[:, :20] += r.normal(size=20) * y[:, None]  # some real signal, varied strength
    direct = np.abs(x[y == 1].mean(0) - x[y == 0].mean(0))
    np.testing.assert_allclose(feature_selection.mean_diff_scores(x, y, num_classes=2), direct,
                               rtol=1e-12, atol=1e-14)
    idx = feature_selection.select_features(x, y, 15, num_classes=2)
    np.testing.assert_array_equal(idx, np.argsort(-direct, kind='stable')[:15])


def test_mean_diff_multiclass_is_max_one_vs_rest():
    x, y = _planted_multiclass(3)
    x = x.astype(np.float64)
    direct = np.max([np.abs(x[y == c].mean(0) - x[y != c].mean(0)) for c in range(3)], 0)
    scores = feature_selection.mean_diff_scores(x, y, num_classes=3)
    np.testing.assert_allclose(scores, direct, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(feature_selection.select_features(x, y, 7, num_classes=3),
                                  np.argsort(-direct, kind='stable')[:7])
    # A declared class with no training rows is skipped, not a NaN.
    scores4 = feature_selection.mean_diff_scores(x, y, num_classes=4)
    np.testing.assert_allclose(scores4, scores, rtol=1e-12)


@pytest.mark.parametrize('method', feature_selection.METHODS)
def test_deterministic_and_array_type_independent(method):
    x, y = _planted_multiclass(4)
    a = feature_selection.select_features(x, y, 5, method=method, num_classes=3)
    b = feature_selection.select_features(x, y, 5, method=method, num_classes=3)
    c = feature_selection.select_features(jnp.asarray(x), jnp.asarray(y), 5, method=method,
                                          num_classes=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_ties_go_to_lower_index():
    r = np.random.default_rng(5)
    y = np.tile([0, 1], 50)
    x = np.zeros((100, 10))
    x[:, 7] = x[:, 2] = y + 0.1 * r.normal(size=100)   # identical columns: identical scores
    assert feature_selection.select_features(x, y, 1).tolist() == [2]
    assert feature_selection.select_features(x, y, 2).tolist() == [2, 7]
    # The 8 all-zero columns tie at score 0: lower indices first.
    assert feature_selection.select_features(x, y, 5).tolist() == [2, 7, 0, 1, 3]


@pytest.mark.parametrize('method', feature_selection.METHODS)
@pytest.mark.parametrize('k', [0, F, F + 5])
def test_k_zero_or_at_least_F_means_all(method, k):
    x, y = _planted_binary(6, n=200)
    np.testing.assert_array_equal(feature_selection.select_features(x, y, k, method=method),
                                  np.arange(F))


def test_l1_path_is_really_sparse():
    """The L1 model is built for this sklearn (no silent L2) and the chosen path point has
    between 1 and k non-zero features."""
    x, y = _planted_binary(7)
    z = feature_selection._standardise(x)
    under, over = feature_selection._l1_path(z, y, 2, 3, ratio=10 ** 0.125, max_steps=96,
                                             max_iter=1000, tol=1e-4)
    assert 1 <= np.count_nonzero(under) <= 3
    assert np.count_nonzero(over) > 3
    assert set(np.flatnonzero(under).tolist()) <= set(PLANTED)
    coef = feature_selection._l1_model(0.05, 1000, 1e-4).fit(z, y).coef_
    assert np.count_nonzero(coef == 0.0) > F // 2


def test_l1_fills_from_mean_diff_when_path_stays_sparse():
    """With a one-step grid the path never exceeds k; the rest comes from mean_diff."""
    x, y = _planted_binary(8)
    idx = feature_selection.select_features(x, y, 6, method='l1', l1_max_steps=1)
    md = feature_selection.select_features(x, y, 6)
    assert idx.shape == (6,) and len(set(idx.tolist())) == 6
    assert set(idx.tolist()) == set(md.tolist())


@pytest.mark.parametrize('x_shape,y,k,kw,match', [
    ((10,), None, 2, {}, '2-D'),
    ((10, 4), np.zeros((10, 1)), 2, {}, '1-D'),
    ((10, 4), np.tile([0, 1], 4), 2, {}, 'labels but x_train has'),
    ((10, 4), None, -1, {}, 'k must be >= 0'),
    ((10, 4), None, 1.5, {}, 'k must be an integer'),
    ((10, 4), None, True, {}, 'k must be an integer'),
    ((10, 4), np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3]), 2, {'num_classes': 3}, 'labels must'),
    ((10, 4), np.array([-1, 1] * 5), 2, {}, 'labels must'),
    ((10, 4), np.array([0.5, 1.0] * 5), 2, {}, 'integer class labels'),
    ((10, 4), np.array(['a', 'b'] * 5), 2, {}, 'integer class labels'),
    ((10, 4), np.zeros(10, int), 2, {}, 'two classes'),
    ((10, 4), None, 2, {'num_classes': 1}, 'num_classes must be >= 2'),
    ((10, 4), None, 2, {'method': 'lasso'}, 'unknown selection method'),
    ((10, 4), None, 2, {'method': 'l1', 'l1_ratio': 1.0}, 'l1_ratio'),
])
def test_input_checks(x_shape, y, k, kw, match):
    x = np.random.default_rng(0).normal(size=x_shape)
    y = np.tile([0, 1], 5) if y is None else y
    with pytest.raises(ValueError, match=match):
        feature_selection.select_features(x, y, k, **kw)


def test_non_finite_features_rejected():
    x = np.ones((6, 3))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match='NaN or inf'):
        feature_selection.select_features(x, np.array([0, 1] * 3), 1)


def test_take_features_checks_indices():
    x = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(feature_selection.take_features(x, [3, 0]), x[:, [3, 0]])
    with pytest.raises(ValueError, match='lie in'):
        feature_selection.take_features(x, [4])
    with pytest.raises(ValueError, match='integer'):
        feature_selection.take_features(x, [0.5])


def _macro_f1(params, x, y):
    pred = np.asarray(jnp.argmax(probe.predict_proba(params, jnp.asarray(x)), -1))
    return f1_score(y, pred, average='macro')


def test_end_to_end_three_feature_probe():
    x, y = _planted_binary(10, n=1200)
    x_tr, y_tr, x_te, y_te = x[:600], y[:600], x[600:], y[600:]
    fit_fn = functools.partial(probe.fit, num_classes=2, C=1.0, standardize=True)
    idx = feature_selection.select_features(x_tr, y_tr, 3, num_classes=2)
    params = fit_fn(feature_selection.take_features(x_tr, idx), y_tr)
    assert sorted(idx.tolist()) == list(PLANTED)
    f1_sparse = _macro_f1(params, feature_selection.take_features(x_te, idx), y_te)
    # A random 3-feature subset of the uninformative features.
    rest = np.setdiff1d(np.arange(F), PLANTED)
    rand = np.random.default_rng(11).choice(rest, size=3, replace=False)
    f1_rand = _macro_f1(fit_fn(x_tr[:, rand], y_tr), x_te[:, rand], y_te)
    assert f1_sparse > 0.9
    assert f1_rand < 0.65 and f1_sparse - f1_rand > 0.3
