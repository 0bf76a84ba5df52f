"""metrics.py against direct scikit-learn calls, the registry, and stratified K-fold CV."""
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from mosaic_jax import metrics


def _random_task(n, c, seed):
    r = np.random.default_rng(seed)
    y = r.integers(0, c, size=n)
    logits = r.normal(size=(n, c)) + 1.5 * np.eye(c)[y]  # informative but imperfect
    proba = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return y, proba.astype(np.float32)


@pytest.mark.parametrize('c', [2, 4])
def test_compute_matches_sklearn(c):
    y, proba = _random_task(300, c, seed=c)
    pred = proba.argmax(-1)
    got = metrics.compute(y, proba)
    assert list(got) == ['macro_f1', 'accuracy', 'balanced_accuracy', 'roc_auc']
    want_auc = (skm.roc_auc_score(y, proba[:, 1]) if c == 2 else
                skm.roc_auc_score(y, proba, multi_class='ovr', average='macro'))
    want = dict(macro_f1=skm.f1_score(y, pred, average='macro'),
                accuracy=skm.accuracy_score(y, pred),
                balanced_accuracy=skm.balanced_accuracy_score(y, pred), roc_auc=want_auc)
    for k, v in want.items():
        # The same sklearn calls (our multiclass AUC averages sklearn's per-class binary
        # AUCs itself): only the order of a 4-term mean may differ.
        np.testing.assert_allclose(got[k], v, rtol=1e-12, err_msg=k)
    assert 0.5 < got['accuracy'] < 1.0  # the task is neither trivial nor random
    assert all(isinstance(v, float) for v in got.values())


def test_compute_subset_and_unknown_name():
    y, proba = _random_task(50, 3, seed=0)
    assert list(metrics.compute(y, proba, names=['accuracy'])) == ['accuracy']
    with pytest.raises(ValueError, match=r"unknown metric 'f2'.*'accuracy'.*'macro_f1'"):
        metrics.compute(y, proba, names=['f2'])
    with pytest.raises(ValueError, match='labels must lie in 0..2'):
        metrics.compute(np.array([0, 3]), proba[:2])
    with pytest.raises(ValueError, match=r'need y_true \[N\] and proba \[N, C\]'):
        metrics.compute(y[:3], proba[:4])


def test_register_adds_a_metric():
    @metrics.register('error_rate')
    def error_rate(y_true, proba):
        return float(np.mean(np.argmax(proba, -1) != y_true))
    try:
        y, proba = _random_task(80, 2, seed=1)
        out = metrics.compute(y, proba, names=['error_rate', 'accuracy'])
        assert out['error_rate'] == pytest.approx(1 - out['accuracy'], abs=1e-12)  # exact
        assert metrics.get('error_rate') is error_rate
    finally:
        del metrics.METRICS['error_rate']


def test_roc_auc_is_nan_without_crash_when_a_class_is_absent():
    y, proba = _random_task(60, 3, seed=2)
    y = np.where(y == 2, 0, y)  # class 2 never occurs in y_true
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # and no warning either
        out = metrics.compute(y, proba, names=['roc_auc'])
        only_one = metrics.compute(np.zeros(5, np.int64), _random_task(5, 2, 3)[1])
    assert np.isnan(out['roc_auc']) and np.isnan(only_one['roc_auc'])
    # The other metrics still work on the same inputs.
    assert 0.0 <= metrics.compute(y, proba, names=['macro_f1'])['macro_f1'] <= 1.0


def test_confusion_matches_sklearn_with_absent_class():
    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0, 2])
    got = metrics.confusion(y_true, y_pred, num_classes=4)
    np.testing.assert_array_equal(got, [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0],
                                        [0, 0, 0, 0]])
    np.testing.assert_array_equal(
        got, skm.confusion_matrix(y_true, y_pred, labels=np.arange(4)))


def test_cross_validate_equals_a_manual_stratified_kfold():
    r = np.random.default_rng(0)
    x = r.normal(size=(200, 5))
    y = (x[:, 0] + 0.5 * r.normal(size=200) > 0).astype(np.int64)

    def fit_fn(x_tr, y_tr):
        return LogisticRegression(C=1.0).fit(x_tr, y_tr).predict_proba

    got = metrics.cross_validate(fit_fn, x, y, k=4, seed=3, names=['macro_f1', 'roc_auc'])
    want = {'macro_f1': [], 'roc_auc': []}
    for tr, te in StratifiedKFold(4, shuffle=True, random_state=3).split(x, y):
        p = fit_fn(x[tr], y[tr])(x[te])
        want['macro_f1'].append(skm.f1_score(y[te], p.argmax(-1), average='macro'))
        want['roc_auc'].append(skm.roc_auc_score(y[te], p[:, 1]))
    for k, v in want.items():
        np.testing.assert_allclose(got[k]['folds'], v, rtol=1e-12)  # same folds, same fits
        assert got[k]['mean'] == pytest.approx(np.mean(v), rel=1e-12)
        assert got[k]['std'] == pytest.approx(np.std(v), rel=1e-12)
    assert got['roc_auc']['mean'] > 0.8  # the folds really trained something
