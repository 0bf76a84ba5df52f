"""Saved probes and mode=predict: a run's selected probes, reloaded, reproduce its test
predictions; a label column is scored; bad input is one error: line before the model loads."""
import csv
import json

import numpy as np
import pytest

from mosaic_jax.probing import saved as saved_lib
from tests import test_errors
from tests import test_pipeline

FAST = ("--config.baselines=('hidden_last','tfidf')", '--config.cv_folds=0',
        "--config.features.pooling=('mosaic','max')")


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A classify run of the tiny model, and its test split written as a new CSV."""
    root = tmp_path_factory.mktemp('predict')
    tiny = test_pipeline._build(str(root / 'assets'))
    work = root / 'work'
    r = test_pipeline._main(tiny, work, *FAST, '--config.run_id=r')
    assert r.returncode == 0, r.stderr[-3000:]
    run = work / 'tiny' / '_runs' / 'r'
    split = {int(s['index']): s for s in csv.DictReader(open(run / 'splits' / '95_toxic_is.csv'))}
    test_index = saved_lib.load(str(run / 'probes' / '95_toxic_is' / 'sae')).test_index
    rows = [split[int(i)] for i in test_index]
    with open(root / 'new.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['prompt', 'target'])
        w.writerows([(s['text'], s['label']) for s in rows])
    with open(root / 'unlabelled.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['prompt'])
        w.writerows([(s['text'],) for s in rows])
    return dict(tiny=tiny, work=work, run=run, root=root)


def _predict(t, workdir, *extra, data='new.csv'):
    return test_pipeline._main(t['tiny'], workdir, *FAST, '--config.mode=predict',
                               f"--config.predict.probe={t['run']}",
                               f"--config.data.datasets=('{t['root'] / data}',)", *extra)


@pytest.mark.parametrize('kind', ['sae', 'hidden', 'tfidf'])
def test_predict_reproduces_the_runs_test_predictions(trained, kind):
    t = trained
    saved = saved_lib.load(str(t['run'] / 'probes' / '95_toxic_is' / kind))
    assert saved.info['format'] == 'mosaic_jax.probe' and saved.info['version'] == 1
    r = _predict(t, t['work'], f'--config.predict.kind={kind}', f'--config.run_id=p_{kind}',
                 '--verbosity=1')
    assert r.returncode == 0, r.stderr[-3000:]
    if kind != 'tfidf':  # the run's texts are in the feature store: nothing is extracted
        assert 'nothing extracted' in r.stderr and 'extract:' not in r.stderr
    out = t['work'] / 'tiny' / '_runs' / f'p_{kind}'
    pred = list(csv.DictReader(open(out / 'predictions.csv')))
    names = saved.label_names
    proba = np.asarray([[float(p[f'p_{n}']) for n in names] for p in pred])
    assert [int(p['index']) for p in pred] == list(range(len(saved.test_index)))
    np.testing.assert_array_equal(proba.argmax(1), saved.test_proba.argmax(1))
    np.testing.assert_allclose(proba, saved.test_proba, atol=1e-5)
    assert [p['predicted_label'] for p in pred] == [names[k] for k in proba.argmax(1)]
    scores = json.load(open(out / 'predict.json'))['scores']
    summary = [s for s in csv.DictReader(open(t['run'] / 'summary.csv'))
               if s['kind'] == kind and s['selected'] == 'True']
    assert scores['n_scored'] == len(pred)
    assert scores['macro_f1'] == pytest.approx(float(summary[0]['macro_f1']), abs=1e-4)
    if kind == 'sae':  # the three features behind each prediction, largest first
        c = np.asarray([[float(p[f'contribution_{j}']) for j in (1, 2, 3)] for p in pred])
        assert (np.diff(c, axis=1) <= 0).all() and {'feature_1', 'feature_3'} <= pred[0].keys()


def test_predict_without_a_label_column(trained):
    t = trained
    r = _predict(t, t['work'], '--config.run_id=unl', data='unlabelled.csv')
    assert r.returncode == 0, r.stderr[-3000:]
    out = t['work'] / 'tiny' / '_runs' / 'unl'
    assert json.load(open(out / 'predict.json'))['scores'] is None
    assert len(list(csv.DictReader(open(out / 'predictions.csv')))) > 0


def test_bad_predict_inputs_are_one_error_line(trained, tmp_path):
    t = trained
    r = _predict(t, tmp_path / 'a', '--config.predict.probe=/nowhere/run')
    test_errors._check(r, tmp_path / 'a', '/nowhere/run', 'probes')
    r = _predict(t, tmp_path / 'b', '--config.predict.kind=sae',
                 f"--config.model.path={t['root'] / 'other_model'}")
    test_errors._check(r, tmp_path / 'b', 'trained on model')
    bad = t['root'] / 'no_text.csv'
    bad.write_text('sentence,target\nhello,0\n')
    r = _predict(t, tmp_path / 'c', data='no_text.csv')
    test_errors._check(r, tmp_path / 'c', "no column 'prompt'")
    r = _predict(t, tmp_path / 'd', '--config.predict.dataset=nope')
    test_errors._check(r, tmp_path / 'd', "'nope'", '95_toxic_is')
