"""metrics.py against direct scikit-learn calls, the registry, the bootstrap intervals and
stratified K-fold CV."""
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from mosaic_jax.probing import metrics


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


@pytest.mark.parametrize('c', [2, 3])
def test_compute_equals_the_registered_sklearn_functions_with_ties(c):
    # compute() takes the vectorised path; the registered functions are sklearn calls.
    y, proba = _random_task(40, c, seed=20 + c)
    proba = np.round(proba, 1)  # tied scores and tied argmax rows
    got = metrics.compute(y, proba, ALL)
    for name in ALL:
        np.testing.assert_allclose(got[name], metrics.get(name)(y, proba), rtol=0,
                                   atol=1e-12, err_msg=name)


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


def _absent_class_task():
    """4 classes; class 3 is neither in y_true nor predicted, class 2 only predicted."""
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    pred = np.array([0, 0, 1, 1, 1, 2, 0, 1])
    return y, np.eye(4)[pred]


def test_macro_f1_averages_over_all_classes_and_present_is_separate():
    y, proba = _absent_class_task()
    pred = proba.argmax(-1)
    got = metrics.compute(y, proba, names=['macro_f1', 'macro_f1_present'])
    all_classes = skm.f1_score(y, pred, labels=range(4), average='macro', zero_division=0)
    present = skm.f1_score(y, pred, average='macro', zero_division=0)
    # The same sklearn calls: exact up to float rounding.
    assert got['macro_f1'] == pytest.approx(all_classes, abs=1e-12)
    assert got['macro_f1_present'] == pytest.approx(present, abs=1e-12)
    # 3 present classes out of 4, absent one scores 0: the two differ by the factor 3/4.
    assert got['macro_f1'] == pytest.approx(0.75 * got['macro_f1_present'], abs=1e-12)


def test_macro_f1_present_is_opt_in():
    y, proba = _random_task(50, 3, seed=0)
    assert 'macro_f1_present' in metrics.METRICS
    assert 'macro_f1_present' not in metrics.compute(y, proba)
    assert metrics.default_names() == ('macro_f1', 'accuracy', 'balanced_accuracy', 'roc_auc')


# ----------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------

ALL = ('macro_f1', 'macro_f1_present', 'accuracy', 'balanced_accuracy', 'roc_auc')


@pytest.mark.parametrize('c', [2, 3, 4])
def test_resample_statistics_equal_sklearn_on_the_resampled_rows(c):
    y, proba = _random_task(30, c, seed=10 + c)
    proba = np.round(proba, 1)  # many tied scores: the AUC tie rule is exercised
    idx = metrics.resample_indices(len(y), 40, seed=5)
    got = metrics.resample_statistics(y, proba, ALL, idx)
    for name in ALL:
        fn = metrics.get(name)  # the registered sklearn definition
        want = np.array([fn(y[i], proba[i]) for i in idx])
        # Same counts, different summation order (and AUC via Mann-Whitney vs sklearn's
        # trapezoid): agreement to a few float64 ulps.
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-12, equal_nan=True,
                                   err_msg=name)


def test_resample_statistics_nan_for_degenerate_auc_resamples():
    y = np.array([0] * 19 + [1])  # one positive: most resamples lack it
    proba = np.stack([1 - np.linspace(0, 1, 20), np.linspace(0, 1, 20)], 1)
    idx = metrics.resample_indices(20, 200, seed=0)
    auc = metrics.resample_statistics(y, proba, ['roc_auc'], idx)['roc_auc']
    has_pos = (idx == 19).any(1)
    np.testing.assert_array_equal(np.isnan(auc), ~has_pos)
    assert np.all(auc[has_pos] == 1.0)  # the positive has the top score: exact
    lo, hi = metrics.bootstrap(y, proba, ['roc_auc'], n_resamples=200)['roc_auc']
    assert lo == hi == 1.0  # degenerate resamples ignored; every other one is perfect


def test_all_degenerate_gives_nan_interval():
    y = np.zeros(10, np.int64)
    proba = _random_task(10, 2, seed=0)[1]
    out = metrics.bootstrap(y, proba, ['roc_auc', 'accuracy'], n_resamples=50)
    assert all(np.isnan(v) for v in out['roc_auc'])
    assert np.isfinite(out['accuracy']).all()


def test_metric_without_vectorised_form_falls_back_to_a_loop():
    @metrics.register('error_rate')
    def error_rate(y_true, proba):
        return float(np.mean(np.argmax(proba, -1) != y_true))
    # A re-registered built-in name must not use the old vectorised form.
    old = metrics.METRICS['accuracy']
    metrics.register('accuracy')(lambda y_true, proba: 0.25)
    try:
        y, proba = _random_task(50, 3, seed=4)
        idx = metrics.resample_indices(50, 20, seed=1)
        got = metrics.resample_statistics(y, proba, ['error_rate', 'accuracy'], idx)
        want = [np.mean(proba[i].argmax(-1) != y[i]) for i in idx]
        np.testing.assert_allclose(got['error_rate'], want, rtol=0, atol=0)  # same code
        assert np.all(got['accuracy'] == 0.25)
    finally:
        del metrics.METRICS['error_rate']
        metrics.register('accuracy')(old)


@pytest.mark.parametrize('c', [2, 4])
def test_bootstrap_interval_brackets_point_and_shrinks_with_rows(c):
    y, proba = _random_task(2000, c, seed=20 + c)
    names = list(ALL)
    small = metrics.compute_with_intervals(y[:100], proba[:100], names)
    large = metrics.compute_with_intervals(y, proba, names)
    for out in (small, large):
        for n in names:
            assert out[f'{n}_lo'] <= out[n] <= out[f'{n}_hi'], (n, out)
    for n in names:
        w_small = small[f'{n}_hi'] - small[f'{n}_lo']
        w_large = large[f'{n}_hi'] - large[f'{n}_lo']
        # Width ~ 1/sqrt(N): 20x the rows should give ~4.5x narrower; 2x is a safe margin.
        assert w_large < 0.5 * w_small, (n, w_small, w_large)
    assert list(large) == [k for n in names for k in (n, f'{n}_lo', f'{n}_hi')]


def test_bootstrap_deterministic_per_seed_and_independent_of_blocking(monkeypatch):
    y, proba = _random_task(300, 3, seed=7)
    a = metrics.bootstrap(y, proba, ALL, n_resamples=200, seed=3)
    assert metrics.bootstrap(y, proba, ALL, n_resamples=200, seed=3) == a
    assert metrics.bootstrap(y, proba, ALL, n_resamples=200, seed=4) != a
    monkeypatch.setattr(metrics, '_BLOCK_ELEMS', 300 * 7)  # blocks of 7 resamples
    assert metrics.bootstrap(y, proba, ALL, n_resamples=200, seed=3) == a
    np.testing.assert_array_equal(metrics.resample_indices(300, 200, 3),
                                  np.random.default_rng(3).integers(0, 300, (200, 300)))


def test_bootstrap_level_and_argument_checks():
    y, proba = _random_task(200, 2, seed=8)
    wide = metrics.bootstrap(y, proba, ['accuracy'], level=0.99)['accuracy']
    narrow = metrics.bootstrap(y, proba, ['accuracy'], level=0.5)['accuracy']
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    with pytest.raises(ValueError, match='0 < level < 1'):
        metrics.bootstrap(y, proba, level=1.0)
    with pytest.raises(ValueError, match="unknown metric 'f2'"):
        metrics.bootstrap(y, proba, ['f2'])
    with pytest.raises(ValueError, match='at least one test row'):
        metrics.bootstrap(y[:0], proba[:0])


@pytest.mark.parametrize('c', [2, 4])
def test_bootstrap_is_vectorised_not_a_sklearn_loop(c, monkeypatch):
    # Speed is a bench's business; what makes it fast is checkable: 1,000 resamples are
    # scored in a few vectorised blocks, never one sklearn metric call per resample.
    y, proba = _random_task(1000, c, seed=c)
    calls = {'blocks': 0, 'sklearn': 0}
    real = metrics.resample_statistics

    def counted(*a, **kw):
        calls['blocks'] += 1
        return real(*a, **kw)

    def no_sklearn(*a, **kw):
        calls['sklearn'] += 1
        raise AssertionError('sklearn metric called inside the bootstrap')
    monkeypatch.setattr(metrics, 'resample_statistics', counted)
    for name in ('f1_score', 'accuracy_score', 'roc_auc_score'):
        monkeypatch.setattr(metrics.skm, name, no_sklearn)
    out = metrics.bootstrap(y, proba, ALL, n_resamples=1000)
    assert calls['sklearn'] == 0 and 1 <= calls['blocks'] <= 20
    assert set(out) == set(ALL) and all(lo <= hi for lo, hi in out.values())
