"""experiments/explain.py: feature ranking, the explanation pass against the full extraction,
and the explanations a run writes."""
import csv
import glob
import json

from types import SimpleNamespace

import numpy as np
import pytest

from mosaic_jax import features
from mosaic_jax.data import batching
from mosaic_jax.experiments import explain
from mosaic_jax.probing import probe
from mosaic_jax.variants import PeakPosition, SAEKey, Variant
from tests import test_pipeline
from tests.test_pipeline import loaded, tiny  # noqa: F401  (fixtures)


def test_ranked_binary_signs_and_multiclass():
    coef = np.array([[2.0], [-3.0], [0.5], [1.0]])    # one logit: towards class 1
    mean = np.array([1.0, 1.0, 4.0, 0.0])             # feature 3 never fires: no push
    got = explain.ranked(coef, mean, ['neg', 'pos'], k=3)
    assert [j for j, _, _ in got['pos']] == [0, 2] and [j for j, _, _ in got['neg']] == [1]
    assert got['neg'][0][1] == -3.0  # the weight stays signed towards the positive class
    multi = explain.ranked(np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), np.ones(2), 'abc', 2)
    assert [j for j, _, _ in multi['a']] == [0] and multi['c'] == []


@pytest.mark.parametrize('pad_side', ['right', 'left'])
def test_token_pass_matches_the_extracted_max_pooling(loaded, pad_side):  # noqa: F811
    key = SAEKey(2, str(test_pipeline.WIDTH))
    spec = loaded['spec']
    block = spec.layers[dict(spec.saes)[key]]
    feats = test_pipeline._extract(loaded, 'single')
    full = feats[Variant(key, 'max')]
    chosen = [int(j) for j in np.argsort(-full.max(0))[:6]]
    rows = np.arange(0, len(loaded['ids']), 3)
    batches = batching.batches([loaded['ids'][i] for i in rows], 16,
                               pad_id=loaded['tok'].pad_token_id, pad_side=pad_side)
    got = explain.token_activations(loaded['model'], loaded['saes'][key], block, chosen,
                                  batches, len(rows), bos_id=loaded['tok'].bos_token_id,
                                  include_special=False)
    # Same forward and encoder columns: equal up to float32 rounding of different programs.
    np.testing.assert_allclose(got['max'], full[rows][:, chosen], rtol=1e-5, atol=1e-5)
    assert (got['tokens'] == [len(loaded['ids'][i]) - 1 for i in rows]).all()  # BOS left out
    fired = got['max'] > 0
    assert fired.any() and (got['argmax'][fired] >= 1).all()  # in the text's ids, never BOS
    for r, i in enumerate(rows):  # positions lie inside the text
        ids = np.asarray(loaded['ids'][i])
        assert (got['argmax'][r][fired[r]] < len(ids)).all()
    # The positions the extraction records beside its max pooling are the pass's argmax
    # (whatever the padding side of either), and 0 where the feature never fires.
    peaks = feats[PeakPosition(key)][rows][:, chosen]
    np.testing.assert_array_equal(peaks[fired], got['argmax'][fired])
    assert (peaks[~fired] == 0).all() and peaks.dtype == np.int16


def test_max_and_position_equals_max_pooling_and_argmax():
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.normal(size=(3, 7, 5)), 0).astype(np.float32)
    acts[1] = 0.0                                   # a text where nothing fires
    mask = np.ones((3, 7), bool)
    mask[0, :2] = False                             # left padding: the text starts at 2
    mask[2, 5:] = False                             # right padding
    first = np.argmax(mask, axis=1)
    m, at = features.max_and_position(acts, mask, first)
    np.testing.assert_array_equal(m, features.pool(acts, mask, 'max'))
    for b in (0, 2):
        for f in range(5):
            masked = np.where(mask[b], acts[b, :, f], -np.inf)
            want = np.argmax(masked) - first[b] if masked.max() > 0 else 0
            assert at[b, f] == want
    assert (np.asarray(at[1]) == 0).all()


def test_explain_from_recorded_positions_equals_the_pass(loaded):  # noqa: F811
    # explain() with the recorded positions runs no pass and writes what the pass finds.
    key = SAEKey(2, str(test_pipeline.WIDTH))
    spec, tok = loaded['spec'], loaded['tok']
    feats = test_pipeline._extract(loaded, 'single')
    x = feats[Variant(key, 'mean')]
    n = len(loaded['ids'])
    labels = np.arange(n) % 2
    w = np.where(np.arange(x.shape[1]) % 2, 1.0, -1.0)[:, None]  # a fixed binary probe
    res = SimpleNamespace(key=Variant(key, 'mean'), params=probe.ProbeParams(
        w=w, b=np.zeros(1), mean=np.zeros(x.shape[1]), scale=np.ones(x.shape[1])))
    train = np.flatnonzero(np.arange(n) % 3 != 2)
    kw = dict(bos_id=tok.bos_token_id, include_special=False, k=4, examples=2,
              max_pooled=feats[Variant(key, 'max')])
    batches_fn = lambda rows: batching.batches([loaded['ids'][i] for i in rows], 8,  # noqa
                                               pad_id=tok.pad_token_id)
    args = (loaded['model'], tok, loaded['saes'][key], spec.layers[dict(spec.saes)[key]],
            res, x, loaded['ids'], labels, train, ['a', 'b'], batches_fn)
    passed = explain.explain(*args, **kw)
    recorded = explain.explain(*args, **kw, peaks=feats[PeakPosition(key)])
    assert passed['n_pass_texts'] > 0 and recorded['n_pass_texts'] == 0
    assert any(e['examples'] for v in recorded['classes'].values() for e in v)
    got, want = json.loads(json.dumps(recorded['classes'])), passed['classes']
    for c in want:
        for a, b in zip(got[c], want[c]):
            for ea, eb in zip(a.pop('examples'), b.pop('examples')):
                assert ea.pop('activation') == pytest.approx(eb.pop('activation'), rel=1e-5)
                assert ea == eb
            assert a == b and None not in a['class_means'].values()


@pytest.mark.parametrize('pooling', ["('mosaic','mean','max')", "('mean',)"])
def test_run_writes_explanations_from_training_texts(tiny, tmp_path, pooling):  # noqa: F811
    # With a max-pooled variant no pass runs; without, the pass reads every training text.
    r = test_pipeline._main(tiny, tmp_path, '--config.run_id=e', '--config.cv_folds=0',
                            "--config.baselines=('tfidf',)", '--config.explain.examples=3',
                            '--config.report=True', f'--config.features.pooling={pooling}')
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / 'tiny' / '_runs' / 'e'
    files = glob.glob(str(run / 'features' / '95_toxic_is_layer_*_*.json'))
    assert len(files) == 1, files
    out = json.load(open(files[0]))
    split = list(csv.DictReader(open(run / 'splits' / '95_toxic_is.csv')))
    train = {int(s['index']) for s in split if s['split'] == 'train'}
    text = {int(s['index']): ' '.join(s['text'].split()).casefold() for s in split}
    entries = [e for v in out['classes'].values() for e in v]
    assert entries and len(out['classes']) == 2
    n_texts = {e['examples'][0]['text_index'] for e in entries if e['examples']}
    if 'max' in pooling:  # the extraction recorded where max pooling peaks: no pass
        assert out['n_pass_texts'] == 0
    else:
        assert out['n_pass_texts'] == out['n_train'] and n_texts
    for e in entries:
        assert 0 <= e['density'] <= 1 and set(e['class_means']) == set(out['classes'])
        assert len(e['examples']) <= 3
        acts = [x['activation'] for x in e['examples']]
        assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
        for x in e['examples']:
            assert x['text_index'] in train  # explanations never read test texts
            a, b = x['token_span']
            assert x['context'][a:b] == x['token']
        # One example per distinct text: copies of a text count once.
        assert len({text[x['text_index']] for x in e['examples']}) == len(e['examples'])
    page = open(tmp_path / 'report.html').read()  # the report shows them, token marked
    assert 'What the top features respond to' in page and '<mark>' in page
    timings = json.load(open(run / 'timings.json'))
    assert '95_toxic_is/explain' in ' '.join(timings)
