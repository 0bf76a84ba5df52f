"""claims.py: verdicts from intervals, and the markdown from a summary.csv."""
import csv

from mosaic_jax import results
from mosaic_jax.experiments import claims


def _row(ds, kind, f1, lo, hi, **kw):
    return dict(dataset=ds, kind=kind, macro_f1=str(f1), macro_f1_lo=str(lo),
                macro_f1_hi=str(hi), selected=kw.pop('selected', 'True'),
                layer=kw.pop('layer', '8'), width=kw.pop('width', '4k'),
                variant=kw.pop('variant', 'mean'), binarized=kw.pop('binarized', 'False'),
                k=kw.pop('k', ''), select_score=str(kw.pop('val', f1)), **kw)


def test_verdicts():
    assert claims.verdict([1, 1, 0]) == 'holds'
    assert claims.verdict([1, 0, 0, 0]) == 'inconclusive'   # one win in four
    assert claims.verdict([1, -1]) == 'inconclusive'        # a loss rules out 'holds'
    assert claims.verdict([-1, -1, 0]) == 'does not hold'
    assert claims.compare(_row('d', 'sae', .8, .75, .85), _row('d', 'tfidf', .6, .5, .7)) == 1
    assert claims.compare(_row('d', 'sae', .8, .65, .85), _row('d', 'tfidf', .6, .5, .7)) == 0


def test_markdown_from_summary(tmp_path):
    rows = []
    for ds, sae, tf in (('a', (.9, .85, .95), (.6, .5, .7)), ('b', (.8, .7, .9), (.75, .7, .8))):
        rows += [_row(ds, 'sae', *sae), _row(ds, 'tfidf', *tf, layer='-', width='-',
                                               variant='tfidf'),
                 _row(ds, 'hidden', .5, .4, .6, variant='hidden_last', width='-'),
                 _row(ds, 'sae', .85, .8, .9, selected='False', variant='mean+bin',
                      binarized='True'),
                 _row(ds, 'sparse', .7, .6, .8, k='16')]
    path = tmp_path / 'summary.csv'
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = claims.markdown(results.read_csv(str(path)), str(path))
    assert '## SAE probe beats TF-IDF: **holds**' in md  # a wins, b overlaps
    assert '## SAE probe beats the last-token hidden-state probe: **holds**' in md
    assert '| a | 0.900 [0.850, 0.950] | 0.600 [0.500, 0.700] | A wins |' in md
    assert '- layer 8: a, b' in md
