"""claims.py: paired verdicts across datasets, claims.json, the markdown and the figures."""
import json

import numpy as np

from mosaic_jax import results
from mosaic_jax.experiments import claims
from mosaic_jax.probing import metrics
from mosaic_jax.probing import paired


def _predictions(rng, y, errors):
    pred = y.copy()
    pred[errors] ^= 1
    return np.eye(2, dtype=np.float32)[pred]


def _dataset_rows(name, rng, n=200, regime='standard', setting=None):
    """SAE errs on 20 rows, the last-token probe on those and 14 more (paired win,
    overlapping marginal intervals); TF-IDF errs on 20 other rows (a tie or so)."""
    y = rng.integers(0, 2, n)
    order = rng.permutation(n)
    probas = dict(sae=_predictions(rng, y, order[:20]),
                  hidden=_predictions(rng, y, order[:34]),
                  tfidf=_predictions(rng, y, order[100:120]))
    rows = []
    for kind, variant in (('sae', 'mean'), ('hidden', 'hidden_last'), ('tfidf', 'tfidf')):
        test = metrics.compute_with_intervals(y, probas[kind], ['macro_f1'])
        rows.append(dict(dataset=name, kind=kind, layer='8' if kind != 'tfidf' else '-',
                         width='16k' if kind == 'sae' else '-', variant=variant,
                         binarized='False', selected=True, seed=0, select_score=0.5,
                         regime=regime, setting=setting, **test,
                         **{results.Y_TEST: y, results.PROBA: probas[kind]}))
    return rows


def _run(tmp_path, n_datasets=6):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_datasets):
        rows += _dataset_rows(f'd{i}', rng) + _dataset_rows(f'd{i}', rng, regime='scarcity',
                                                            setting=16)
    folder = tmp_path / 'w' / 'm' / '_runs' / 'r'
    results.write_summary(str(folder / 'summary.csv'), rows)
    results.write_predictions(str(folder), rows)
    return rows


def test_paired_verdict_where_marginal_intervals_overlap(tmp_path):
    rows = _run(tmp_path)
    sae, hid = rows[0], rows[1]
    assert sae['macro_f1_lo'] < hid['macro_f1_hi']   # the old rule called this a tie
    out = tmp_path / 'docs' / 'claims.md'
    claims.main(['--workdir', str(tmp_path / 'w'), '--run_id', 'r', '--model', 'm',
                 '--out', str(out)])
    records = json.load(open(tmp_path / 'docs' / 'claims.json'))
    rec = next(r for r in records if r['claim'].startswith('SAE probe beats the last')
               and r['regime'] == 'standard')
    assert (rec['datasets'], rec['wins'], rec['ties'], rec['losses']) == (6, 6, 0, 0)
    assert rec['sign_test_p'] == 2 / 2 ** 6 and rec['verdict'] == 'holds'
    assert {'claim', 'regime', 'datasets', 'wins', 'ties', 'losses', 'sign_test_p',
            'mean_delta', 'mean_delta_lo', 'mean_delta_hi', 'per_dataset'} <= rec.keys()
    first = rec['per_dataset'][0]
    assert set(first) >= {'dataset', 'delta', 'delta_lo', 'delta_hi', 'outcome'}
    # The per-dataset Δ is the paired bootstrap of the stored test predictions.
    want = paired.paired_delta(rows[0][results.Y_TEST], rows[0][results.PROBA],
                               rows[1][results.PROBA])
    assert (first['dataset'], first['delta'], first['delta_lo']) == ('d0', want.delta, want.lo)
    assert {r['regime'] for r in records} == {'standard', 'scarcity=16'}
    md = out.read_text()
    assert '## SAE probe beats the last-token hidden-state probe: **holds**' in md
    assert '| scarcity=16 | 6 | 6 / 0 / 0 |' in md
    assert 'which agrees with MOSAIC' in md and 'Smallest mean Δ' in md
    # A claim without its rows in this run says so instead of guessing.
    assert '## 16k width beats 4k at layer 8 (same pooling as the 4k choice): **no data**' in md
    for png in ('claims_win_rates.png', 'claims_deltas.png'):
        assert open(tmp_path / 'docs' / png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_verdicts_from_counts():
    beats, match = claims.CLAIMS[0], claims.CLAIMS[3]
    a = lambda **kw: paired.Across(**dict(dict(  # noqa: E731
        datasets=8, wins=0, ties=8, losses=0, sign_test_p=1.0, wilcoxon_p=1.0,
        mean_delta=0.0, mean_delta_lo=-0.01, mean_delta_hi=0.01, min_detectable=0.02), **kw))
    assert claims.verdict(beats, a(wins=7, ties=1, sign_test_p=0.016)) == 'holds'
    assert claims.verdict(beats, a(losses=7, ties=1, sign_test_p=0.016)) == 'does not hold'
    assert claims.verdict(beats, a(wins=3, ties=5, sign_test_p=0.25)) == 'inconclusive'
    assert claims.verdict(match, a()) == 'holds'                     # within ±0.02
    assert claims.verdict(match, a(mean_delta_hi=0.05)) == 'inconclusive'
    assert claims.verdict(beats, a(datasets=0)) == 'no data'


def test_classify_runs_without_regimes_count_as_standard():
    assert claims.regime_name(dict(dataset='d')) == 'standard'
    assert claims.regime_name(dict(regime='noise', setting='0.3000')) == 'noise=0.3'
