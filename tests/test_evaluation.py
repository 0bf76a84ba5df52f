"""Choosing candidates: folds never split a text's copies, and nothing reads test labels."""
import numpy as np

from mosaic_jax.probing import evaluation
from mosaic_jax.probing import metrics
from mosaic_jax.data import splits


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
    real = metrics.cross_validate
    monkeypatch.setattr(metrics, 'cross_validate',
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
