"""Choosing candidates: folds never split a text's copies, and nothing reads test labels."""
import numpy as np
import pytest

from mosaic_jax.data import splits
from mosaic_jax.probing import evaluation


def _data(n=160, seed=0):
    r = np.random.default_rng(seed)
    texts = [f'text {int(i)}' for i in r.integers(0, 60, n)]
    code = np.asarray([int(t.split()[1]) for t in texts])
    y = (code % 2).astype(np.int64)
    x = (r.normal(size=(n, 12)) + y[:, None] * 0.6).astype(np.float32)
    sp = tuple(splits.split(y, 0, texts=texts))
    return x, y, sp, splits.text_groups(texts)


def test_cross_validate_variant_uses_grouped_folds(monkeypatch):
    x, y, sp, groups = _data()
    opts = evaluation.ProbeOptions(Cs=(1.0,), metric_names=('macro_f1',), n_bootstrap=0)
    res = evaluation.fit_variant('v', x, y, sp, opts, num_classes=2, groups=groups)
    seen = []
    real = evaluation.cross_validate
    monkeypatch.setattr(evaluation, 'cross_validate',
                        lambda fn, x, y, folds, **kw: seen.extend(folds) or real(fn, x, y, folds))
    out = evaluation.cross_validate_variant(res, x, y, sp, opts, k=3, num_classes=2,
                                            groups=groups)
    assert len(out['fold_scores']) == 3 and len(seen) == 3
    test = set(sp[2])
    for fit, score in seen:
        assert not set(groups[fit]) & set(groups[score])
        assert not (set(fit) | set(score)) & test


def test_choice_does_not_move_when_test_labels_are_scrambled():
    x, y, sp, groups = _data(seed=1)
    y2 = y.copy()
    y2[sp[2]] = np.random.default_rng(5).permutation(y[sp[2]])[::-1]
    for select in (evaluation.Selection.VAL, evaluation.Selection.CV):
        opts = evaluation.ProbeOptions(Cs=(0.001, 10.0), metric_names=('macro_f1',),
                                       n_bootstrap=0, select=select, cv_k=3)
        a = evaluation.fit_variant('v', x, y, sp, opts, num_classes=2, groups=groups)
        b = evaluation.fit_variant('v', x, y2, sp, opts, num_classes=2, groups=groups)
        assert a.C == b.C and a.val == b.val, select


def test_cross_validate_scores_the_given_folds():
    r = np.random.default_rng(0)
    x = r.normal(size=(200, 5))
    y = (x[:, 0] + 0.5 * r.normal(size=200) > 0).astype(np.int64)

    def fit_fn(x_tr, y_tr):
        from sklearn.linear_model import LogisticRegression
        return LogisticRegression(C=1.0).fit(x_tr, y_tr).predict_proba

    from sklearn.model_selection import StratifiedKFold
    folds = list(StratifiedKFold(4, shuffle=True, random_state=3).split(x, y))
    got = evaluation.cross_validate(fit_fn, x, y, folds, names=['macro_f1', 'roc_auc'])
    from sklearn import metrics as sk_metrics
    want = {'macro_f1': [], 'roc_auc': []}
    for tr, te in folds:
        p = fit_fn(x[tr], y[tr])(x[te])
        want['macro_f1'].append(sk_metrics.f1_score(y[te], p.argmax(-1), average='macro'))
        want['roc_auc'].append(sk_metrics.roc_auc_score(y[te], p[:, 1]))
    for k, v in want.items():
        np.testing.assert_allclose(got[k]['folds'], v, rtol=1e-12)  # same folds, same fits
        assert got[k]['mean'] == pytest.approx(np.mean(v), rel=1e-12)
        assert got[k]['std'] == pytest.approx(np.std(v), rel=1e-12)
    assert got['roc_auc']['mean'] > 0.8  # the folds really trained something


# ----------------------------------------------------------------------------------------
# One macro-F1 definition
# ----------------------------------------------------------------------------------------
