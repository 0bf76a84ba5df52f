"""results.py: the JSON blocks use metrics.py's one macro-F1; summary.csv / table columns."""
import csv

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.tree import DecisionTreeClassifier

from mosaic_jax import results
from mosaic_jax.probing import metrics
from mosaic_jax.report import read as report_read

NAMES = ['a', 'b', 'c', 'd']


def _absent_class_predictions():
    """4 classes; class 3 never occurs in the test labels nor the predictions."""
    r = np.random.default_rng(0)
    y = r.integers(0, 3, size=60)
    logits = r.normal(size=(60, 4)) + 2.0 * np.eye(4)[y]
    logits[:, 3] = -10.0  # class 3 is never predicted
    return y, np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def test_linear_probe_block_macro_f1_is_the_metrics_definition():
    y, proba = _absent_class_predictions()
    block = results.linear_probe_block(y, proba, NAMES, coef=None)
    want = metrics.compute(y, proba)['macro_f1']
    assert block['aggregated_metrics']['macro avg']['f1_score'] == want  # the same call
    assert block['performance']['macro_f1'] == want
    assert block['performance']['accuracy'] == metrics.compute(y, proba)['accuracy']
    # The test is meaningful: the present-classes figure is different here.
    present = metrics.compute(y, proba, ['macro_f1_present'])['macro_f1_present']
    assert want == pytest.approx(0.75 * present, abs=1e-12)  # 3 of 4 classes; float rounding
    assert block['class_metrics']['d'] == dict(precision=0.0, recall=0.0, f1_score=0.0,
                                               support=0.0)


def test_linear_probe_block_needs_one_column_per_class():
    y, proba = _absent_class_predictions()
    with pytest.raises(ValueError, match='one column per class'):
        results.linear_probe_block(y, proba[:, :3], NAMES, coef=None)


def test_tree_block_macro_f1_is_the_metrics_definition():
    r = np.random.default_rng(1)
    x = r.normal(size=(80, 5))
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)  # classes 0..2; 3 absent
    tree = DecisionTreeClassifier(max_depth=3, random_state=0).fit(x[:60], y[:60])
    y_pred = tree.predict(x[60:])
    block = results.tree_block(tree, y[60:], y_pred, NAMES)
    onehot = np.eye(4)[y_pred]
    assert block['performance'] == metrics.compute(y[60:], onehot, ['accuracy', 'macro_f1'])
    want = skm.f1_score(y[60:], y_pred, labels=range(4), average='macro', zero_division=0)
    assert block['performance']['macro_f1'] == pytest.approx(want, abs=1e-12)  # same sklearn
    assert block['performance']['macro_f1'] < skm.f1_score(y[60:], y_pred, average='macro')


def _row(**kw):
    return dict(dict(dataset='ds', layer=1, width='16k', kind='sae', variant='max+bin',
                     pooling='max', binarized=True, C=0.1, macro_f1=0.8123, accuracy=0.9,
                     roc_auc=float('nan'), n_train=70, n_test=20, seconds=1.25), **kw)


def _read(path):
    with open(path, newline='') as f:
        rd = csv.DictReader(f)
        return rd.fieldnames, list(rd)


def test_write_summary_default_columns(tmp_path):
    path = str(tmp_path / 'summary.csv')
    results.write_summary(path, [_row(top_n=32, seed=0, train_group='en'),
                                 _row(kind='tfidf', C=None, binarized=np.bool_(False))])
    fields, rows = _read(path)
    assert fields == ['dataset', 'layer', 'width', 'kind', 'variant', 'pooling', 'binarized',
                      'top_n', 'k', 'selected', 'seed', 'C',
                      'macro_f1', 'macro_f1_lo', 'macro_f1_hi', 'accuracy', 'accuracy_lo',
                      'accuracy_hi', 'roc_auc', 'roc_auc_lo', 'roc_auc_hi',
                      'select_score', 'n_train', 'n_test', 'seconds', 'train_group']
    assert tuple(fields[:-1]) == results.SUMMARY_FIELDS  # then every other key a row has
    assert rows[0]['train_group'] == 'en' and rows[1]['train_group'] == ''
    assert rows[0]['macro_f1'] == '0.8123' and rows[0]['macro_f1_lo'] == ''  # missing: empty
    assert rows[0]['top_n'] == '32' and rows[0]['seed'] == '0' and rows[0]['selected'] == ''
    assert rows[0]['roc_auc'] == 'nan' and rows[0]['binarized'] == 'True'
    assert rows[1]['C'] == '' and rows[1]['binarized'] == 'False'
    # The report still reads it.
    parsed = report_read.read_summary(path)
    assert parsed[0]['macro_f1'] == pytest.approx(0.8123, abs=1e-12)  # written to 4 places


def test_write_summary_follows_the_configured_metrics(tmp_path):
    y, proba = _absent_class_predictions()
    names = ('macro_f1', 'balanced_accuracy', 'macro_f1_present')
    scores = metrics.compute_with_intervals(y, proba, names, n_resamples=200)
    path = str(tmp_path / 'summary.csv')
    row = {k: v for k, v in _row(selected=True, **scores).items()
           if k not in ('accuracy', 'roc_auc')}  # only the configured metrics, as a run's rows
    results.write_summary(path, [row], metric_names=names)
    fields, rows = _read(path)
    metric_cols = [c for m in names for c in (m, f'{m}_lo', f'{m}_hi')]
    assert fields == list(results.SUMMARY_IDENTITY) + metric_cols + ['select_score', 'n_train',
                                                                    'n_test', 'seconds']
    assert 'accuracy' not in fields and rows[0]['selected'] == 'True'
    for c in metric_cols:
        assert float(rows[0][c]) == pytest.approx(scores[c], abs=5e-5)  # 4 decimals


def test_format_table_shows_the_macro_f1_interval():
    plain = results.format_table([_row()])
    assert plain.splitlines()[0].split()[-3:] == ['macroF1', 'acc', 'AUC']
    assert ' 0.812  0.900    -' in plain
    with_ci = results.format_table([_row(macro_f1_lo=0.76, macro_f1_hi=0.861), _row()])
    lines = with_ci.splitlines()
    assert '0.812 [0.760, 0.861]' in lines[2]
    assert len({len(l) for l in lines[2:]}) == 1  # columns stay aligned
    custom = results.format_table([_row(balanced_accuracy=0.5)], ('balanced_accuracy',))
    assert custom.splitlines()[0].split()[-1] == 'balAcc' and '0.500' in custom


def test_seed_summary_mean_and_sample_std_per_variant():
    rows = [dict(dataset='d', kind='sae', layer=8, width='4k', variant='mean', macro_f1=v,
                 selected=sel, seed=s) for s, (v, sel) in enumerate([(0.7, True), (0.8, False),
                                                                      (0.9, True)])]
    rows.append(dict(dataset='d', kind='tfidf', layer='-', width='-', variant='tfidf',
                     macro_f1=0.6, selected=True, seed=0))
    agg = {a['kind']: a for a in results.seed_summary(rows, ('macro_f1',))}
    assert agg['sae']['n_seeds'] == 3 and agg['sae']['n_selected'] == 2
    assert agg['sae']['macro_f1_mean'] == pytest.approx(0.8)
    assert agg['sae']['macro_f1_std'] == pytest.approx(0.1)  # ddof=1 of 0.7, 0.8, 0.9
    assert np.isnan(agg['tfidf']['macro_f1_std'])              # one seed: no spread


# ----------------------------------------------------------------------------------------
# The one choice: everything downstream reads the run's `selected` mark
# ----------------------------------------------------------------------------------------

TEST_COLS = ('macro_f1', 'macro_f1_lo', 'macro_f1_hi', 'accuracy')


def _candidate_rows(seed=0):
    """Summary rows of two datasets x (sae variants, hidden, tfidf) x two training groups,
    validation scores and test scores drawn independently."""
    r = np.random.default_rng(seed)
    out = []
    for ds in ('a', 'b'):
        for group in ('en', 'xx'):
            for layer, width, kind, variant in (
                    (1, '4k', 'sae', 'max'), (1, '4k', 'sae', 'mean+bin'), (2, '16k', 'sae', 'max'),
                    (2, '16k', 'sae', 'sum'), (1, None, 'hidden', 'hidden_last'),
                    (2, None, 'hidden', 'hidden_last'), (None, None, 'tfidf', 'tfidf')):
                f1 = float(r.uniform(0.4, 0.9))
                out.append(dict(dataset=ds, train_group=group, test_group=group, layer=layer,
                                width=width, kind=kind, variant=variant,
                                select_score=float(r.uniform(0.4, 0.9)), macro_f1=f1,
                                macro_f1_lo=f1 - 0.05, macro_f1_hi=f1 + 0.05, accuracy=f1))
    return out


def _scramble_test_scores(rows, seed=1):
    """The same rows with every test column permuted across rows (as if the test labels
    were scrambled): validation scores untouched."""
    perm = np.random.default_rng(seed).permutation(len(rows))
    return [dict(r, **{c: rows[j][c] for c in TEST_COLS}) for r, j in zip(rows, perm)]


def _as_csv(rows):
    """What a reader gets back from summary.csv / transfer.csv: strings."""
    return [{k: results._cell(v) for k, v in r.items()} for r in rows]


def _ident(r):
    return tuple(str(r[k]) for k in ('dataset', 'train_group', 'layer', 'width', 'kind',
                                      'variant'))


def test_scrambled_test_labels_move_no_selection_downstream():
    from mosaic_jax.experiments import claims
    from mosaic_jax.report import transfer as report_transfer
    rows = _candidate_rows()
    scrambled = _scramble_test_scores(rows)
    assert [r['macro_f1'] for r in rows] != [r['macro_f1'] for r in scrambled]
    by = ('dataset', 'train_group', 'kind')
    marked = results.mark_selected(rows, by)
    marked_s = results.mark_selected(scrambled, by)
    chosen = [_ident(r) for r in marked if r['selected']]
    assert chosen == [_ident(r) for r in marked_s if r['selected']]
    assert len(chosen) == 2 * 2 * 3  # one per dataset x group x kind
    for r in marked:  # the chosen row has the best validation score of its group
        if r['selected']:
            peers = [x for x in rows if all(x[k] == r[k] for k in by)]
            assert r['select_score'] == max(x['select_score'] for x in peers)
    # The claims table reads the marks: the same rows whatever the test scores.
    ca, cb = _as_csv(marked), _as_csv(marked_s)
    for ds in ('a', 'b'):
        for kind in ('sae', 'hidden', 'tfidf'):
            pick = lambda rs: claims.selected(  # noqa: E731
                [r for r in rs if r['dataset'] == ds and r['kind'] == kind
                 and r['train_group'] == 'en'])
            assert _ident(pick(ca)) == _ident(pick(cb))
    # The transfer matrices show, per training group, the validation choice's test scores.
    for src in (rows, scrambled):
        for (ds, kind), (trains, tests, m) in report_transfer.matrices(_as_csv(src)).items():
            for i, g in enumerate(trains):
                cand = [r for r in src
                        if r['dataset'] == ds and r['kind'] == kind and r['train_group'] == g]
                best = max(cand, key=lambda r: r['select_score'])
                for j, t in enumerate(tests):
                    want = [r['macro_f1'] for r in cand
                            if r['test_group'] == t and _ident(r)[2:] == _ident(best)[2:]]
                    if want:
                        assert m[i, j] == pytest.approx(want[0], abs=1e-4)
    assert results.best_row([dict(select_score='nan'), dict(select_score='')]) is None


def test_predictions_round_trip_keyed_by_the_summary_row(tmp_path):
    """The arrays a row carries go to predictions/<dataset>.npz, not summary.csv, and the
    row read back from summary.csv finds them under the same key."""
    y, proba = _absent_class_predictions()
    rows = [dict(dataset='sae_probes:d1', kind=kind, layer=8, width='4k', variant=v, k=k,
                 seed=0, regime='scarcity', setting=16, macro_f1=0.5,
                 **{results.Y_TEST: y, results.PROBA: proba * (i + 1)})
            for i, (kind, v, k) in enumerate([('sae', 'max', None), ('sparse', 'max', 16)])]
    run = str(tmp_path / 'run')
    results.write_summary(f'{run}/summary.csv', rows)
    assert results.write_predictions(run, rows) == [results.predictions_path(run, 'd1')]
    back = results.read_csv(f'{run}/summary.csv')
    assert not set(results.PREDICTIONS) & set(back[0])
    stored = results.read_predictions(run, 'sae_probes:d1')
    assert len(stored) == 2
    for i, r in enumerate(back):
        y_back, p_back = stored[results.prediction_key(r)]
        np.testing.assert_array_equal(y_back, y)
        np.testing.assert_array_equal(p_back, (proba * (i + 1)).astype(np.float32))
    with pytest.raises(ValueError, match='share the key'):
        results.write_predictions(run, rows + rows[:1])
