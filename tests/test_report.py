"""report.build on a synthetic workdir written with results.py's own writers."""
import os
import re

import numpy as np
import pytest

from configs import tiny
from mosaic_jax import report
from mosaic_jax import results

DATASETS = ('95_toxic_is', 'ag<news>&co')  # the second checks HTML escaping
CLASSES = {'95_toxic_is': ['0', '1'], 'ag<news>&co': ['world', 'sports', 'sci<tech>']}
LAYERS = (1, 2)
POOLS = ('mosaic', 'mean', 'max')
F = 64  # SAE features in the synthetic probe weights
GEMMA = dict(model='google_gemma-2-2b', path='google/gemma-2-2b', widths=('16k', '65k'),
             source='google/gemma-scope-2b-pt-res/layer_{layer}/width_{width}/canonical')
OWN = dict(model='tiny', path='/models/tiny', widths=('64', '128'),
           source='/saes/tiny/sae_layer_{layer}')


def _config(spec, layers, datasets):
    c = tiny.get_config()
    c.model.name, c.model.path = spec['model'], spec['path']
    c.sae.source, c.sae.widths = spec['source'], spec['widths']
    c.layers, c.data.datasets = layers, datasets
    return c


def _planted(layer, wi):
    """First feature index planted in the probe weights of SAE (layer, width #wi)."""
    return 8 * (2 * (layer - 1) + wi)


def _coef(num_classes, base):
    """Probe weights [F, C'] whose top features per class are known by construction."""
    rng = np.random.default_rng(base)
    if num_classes == 2:
        w = rng.uniform(-1, 1, (F, 1))
        w[base + 1, 0], w[base + 2, 0] = 5.0, -5.0  # class '1' top, class '0' top
        return w
    w = rng.uniform(-1, 1, (F, num_classes))
    for c in range(num_classes):
        w[base + 1 + c, c] = 5.0
    return w


def _scores(layer, wi, pool, b):
    """(val, test) macro-F1. Test rises with layer and width, but validation prefers
    layer 1, the first width, 'max' pooling raw: the report must select on validation."""
    test = 0.6 + 0.05 * layer + 0.02 * wi + 0.01 * POOLS.index(pool) + 0.005 * b
    val = 0.95 if (layer, wi, pool, b) == (1, 0, 'max', False) else test - 0.1
    return val, test


def write_run(workdir, spec, run_id, *, layers=LAYERS, datasets=DATASETS, widths=None,
              baselines=True):
    """One finished run of `spec`'s model: summary.csv, config/timings, per-SAE JSONs."""
    widths = widths or spec['widths']
    config = _config(spec, layers, datasets)
    rows, rng = [], np.random.default_rng(0)
    for ds in datasets:
        names = CLASSES[ds]
        y = np.arange(20) % len(names)
        proba = rng.dirichlet(np.ones(len(names)), size=20)
        common = dict(dataset=ds, n_train=70, n_test=20, seconds=0.5)
        for layer in layers:
            hidden = {}
            if baselines:
                for k, pool in enumerate(('last', 'mean')):
                    f1 = 0.7 + 0.01 * layer + 0.02 * k
                    hidden[pool] = dict(C=1.0, val=dict(macro_f1=f1), test=dict(macro_f1=f1))
                    rows.append(dict(common, layer=layer, width='-', kind='hidden',
                                     variant=f'hidden_{pool}', pooling=pool, binarized=False,
                                     C=1.0, macro_f1=f1, accuracy=f1, roc_auc=f1 + 0.1))
            for wi, width in enumerate(widths):
                variants = {}
                for pool in POOLS:
                    for b in (False, True):
                        val, test = _scores(layer, wi, pool, b)
                        variants[pool + ('/bin' if b else '')] = dict(
                            C=0.1, val=dict(macro_f1=val), test=dict(macro_f1=test), seconds=1.0)
                        rows.append(dict(common, layer=layer, width=width, kind='sae',
                                         variant=pool + ('+bin' if b else ''), pooling=pool,
                                         binarized=b, C=0.1, macro_f1=test, accuracy=test,
                                         roc_auc=float('nan') if len(names) > 2 else test))
                if baselines:
                    rows.append(dict(common, layer=layer, width=width, kind='tree',
                                     variant='max', C=None, macro_f1=0.5 + 0.01 * layer,
                                     accuracy=0.5, roc_auc=0.5))
                folder = results.run_dir(workdir, spec['model'], ds, layer, width, run_id)
                best = max(variants, key=lambda k: variants[k]['val']['macro_f1'])
                meta = results.metadata(config, dataset=ds, layer=layer, width=width,
                                        hidden=False, class_names=names,
                                        extra=dict(best_variant=f'layer_{layer}/{width}/{best}'))
                probe = results.linear_probe_block(y, proba, names,
                                                   _coef(len(names), _planted(layer, wi)))
                results.write_json(folder, 'sae_classifier_results.json', dict(
                    metadata=meta, models=dict(linearProbe=probe), variants=variants))
                if hidden:
                    meta = results.metadata(config, dataset=ds, layer=layer, width=width,
                                            hidden=True, class_names=names, extra={})
                    results.write_json(folder, 'hidden_classifier_results.json', dict(
                        metadata=meta, models=dict(linearProbe=probe), variants=hidden))
        if baselines:
            rows.append(dict(common, layer='-', width='-', kind='tfidf', variant='tfidf',
                             C=None, macro_f1=0.66, accuracy=0.7, roc_auc=0.8))
    run_folder = os.path.join(workdir, results.safe_name(spec['model']), '_runs', run_id)
    results.write_summary(os.path.join(run_folder, 'summary.csv'), rows)
    results.write_json(run_folder, 'config.json', config.to_dict())
    results.write_json(run_folder, 'timings.json', {'load_model_and_saes': 1.5, 'total': 9.0})
    return run_folder


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('work'))
    write_run(workdir, GEMMA, '20250101_000000')
    write_run(workdir, OWN, '20250101_000000', datasets=DATASETS[:1])  # fewer PNGs to draw
    path = report.build(workdir)
    with open(path) as f:
        return workdir, path, f.read()


def _model_sections(text):
    """model folder name -> the HTML of its <h2> section."""
    parts = re.split(r'<h2>', text)[1:]
    return {p.split(' ', 1)[0]: p for p in parts}


def test_report_embeds_valid_pngs_for_every_dataset(built):
    workdir, path, text = built
    assert path == os.path.join(workdir, 'report.html')
    srcs = re.findall(r'<img src="([^"]+)"', text)
    # (2 + 1 datasets) x (by-layer, bars, heatmap, top features).
    assert len(srcs) == 12 and len(set(srcs)) == 12
    for src in srcs:
        assert src.startswith('report_files/')
        with open(os.path.join(workdir, src), 'rb') as f:
            png = f.read()
        assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000, src
    sections = _model_sections(text)
    assert '95_toxic_is' in sections['tiny'] and '95_toxic_is' in sections['google_gemma-2-2b']
    assert 'ag&lt;news&gt;&amp;co' in sections['google_gemma-2-2b']
    # Dataset and class names (headings, table cells) all went through html.escape.
    assert 'class sci&lt;tech&gt;' in text
    assert '<news>' not in text and '<tech>' not in text


def test_neuronpedia_links_exactly_for_gemma_scope(built):
    _, _, text = built
    sections = _model_sections(text)
    assert 'neuronpedia' not in sections['tiny']
    gemma = sections['google_gemma-2-2b']
    links = re.findall(r'href="(https://www\.neuronpedia\.org/[^"]+)"', gemma)
    assert len(links) == 10 * (2 + 3)  # top 10 per class: binary + 3-class dataset
    # Validation selects layer 1 / 16k (see _scores): its planted features, linked there.
    base = 'https://www.neuronpedia.org/gemma-2-2b/1-gemmascope-res-16k/'
    assert all(l.startswith(base) for l in links)
    p = _planted(1, 0)
    binary, multi = gemma.split('ag&lt;news&gt;&amp;co', 1)
    top_row = re.search(r'<td>1</td>(.*?)</tr>', binary.split('Top SAE features')[1]).group(1)
    # Class '0' votes with negative weights; its top feature is the planted -5.
    assert re.findall(r'/(\d+)">', top_row) == [str(p + 2), str(p + 1)]
    top_row = re.search(r'<td>1</td>(.*?)</tr>', multi.split('Top SAE features')[1]).group(1)
    assert re.findall(r'/(\d+)">', top_row) == [str(p + 1), str(p + 2), str(p + 3)]


def test_headline_selects_on_validation_not_test(built):
    workdir, _, _ = built
    run = next(r for r in report.load(workdir) if r.model == 'tiny')
    view = report.dataset_views(workdir, run)[0]
    table = {h['method']: h for h in report.headline(view)}
    sae = table['SAE probe (best variant)']
    assert (sae['row']['layer'], sae['row']['width'], sae['row']['variant']) == (1, '64', 'max')
    assert sae['basis'] == 'validation'
    assert table['hidden_mean']['row']['layer'] == 2  # val rises with layer
    tree = table['decision tree (SAE features)']['row']
    assert (tree['layer'], tree['width']) == (1, '64')  # the tree of the selected SAE
    assert table['TF-IDF']['row']['macro_f1'] == pytest.approx(0.66)  # written as '0.6600'


def test_missing_pieces_are_reported_not_fatal(tmp_path):
    workdir = str(tmp_path)
    write_run(workdir, OWN, 'r1', layers=(1,), datasets=('95_toxic_is',), widths=('64',),
              baselines=False)
    with open(report.build(workdir)) as f:
        text = f.read()
    assert 'Only layer 1 was run' in text
    assert 'Not in this run: hidden_last, hidden_mean, tfidf, tree.' in text
    assert text.count('not in this run') == 4  # hidden_last, hidden_mean, TF-IDF, tree rows
    assert len(re.findall(r'<img src=', text)) == 4


def test_latest_run_by_default_and_run_id_on_request(tmp_path):
    workdir = str(tmp_path)
    old = write_run(workdir, OWN, 'zz_old', layers=(1,), datasets=('95_toxic_is',))
    write_run(workdir, OWN, 'aa_new', layers=(1,), datasets=('ag<news>&co',))
    # The older run's id sorts last; latest must mean "summary written last".
    os.utime(os.path.join(old, 'summary.csv'), (1e9, 1e9))
    with open(report.build(workdir)) as f:
        text = f.read()
    assert 'ag&lt;news&gt;' in text and '95_toxic_is' not in text
    with open(report.build(workdir, run_id='zz_old')) as f:
        text = f.read()
    assert '95_toxic_is' in text and 'ag&lt;news&gt;' not in text
    with pytest.raises(ValueError, match=r"no run 'nope'.*aa_new"):
        report.build(workdir, run_id='nope')


def test_empty_or_missing_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match='no finished run under'):
        report.build(str(tmp_path))
    with pytest.raises(ValueError, match='does not exist'):
        report.build(str(tmp_path / 'absent'))


def test_top_features_binary_signs_and_multiclass():
    lp = dict(feature_analysis=dict(importance_scores=[[0.5, -2.0, 1.0, 0.0]]))
    tops = report.top_features(lp, ['neg', 'pos'], k=2)
    assert tops == {'neg': [(1, 2.0), (3, -0.0)], 'pos': [(2, 1.0), (0, 0.5)]}
    lp = dict(feature_analysis=dict(importance_scores=[[0, 3, 1], [2, 0, 1], [0, 0, 9]]))
    assert [v[0][0] for v in report.top_features(lp, ['a', 'b', 'c'], k=1).values()] == [1, 0, 2]
    with pytest.raises(ValueError, match='2 rows for 3 classes'):
        report.top_features(dict(feature_analysis=dict(importance_scores=[[1], [2]])),
                            ['a', 'b', 'c'])


@pytest.mark.parametrize('path, source, want', [
    ('google/gemma-2-9b-it', 'google/gemma-scope-9b-it-res/layer_9/width_16k/canonical',
     'gemma-2-9b-it'),
    ('/data/local_weights/', 'google/gemma-scope-2b-pt-res/layer_{layer}', 'gemma-2-2b'),
    ('google/gemma-2-2b', '/saes/ours/layer_{layer}', None),
    ('google/gemma-2-2b', 'gemma-scope-2b-pt-res-canonical', None),
])
def test_neuronpedia_model_id(path, source, want):
    assert report.neuronpedia_model_id(dict(model=dict(path=path),
                                            sae=dict(source=source))) == want


def test_fused_only_run(tmp_path):
    """probe.train='fused' writes summary rows but no per-SAE JSON files."""
    workdir = str(tmp_path)
    common = dict(dataset='95_toxic_is', n_train=70, n_test=20, pooling='mean', binarized=False,
                  C=1.0, kind='fused', variant='mean')
    rows = [dict(common, layer=1, width='64', macro_f1=0.61, accuracy=0.7, roc_auc=0.8),
            dict(common, layer=2, width='64', macro_f1=0.63, accuracy=0.7, roc_auc=0.8)]
    results.write_summary(os.path.join(workdir, 'tiny', '_runs', 'r', 'summary.csv'), rows)
    with open(report.build(workdir)) as f:
        text = f.read()
    assert 'No config.json in this run.' in text and 'No timings.json in this run.' in text
    assert 'No cached-training SAE probe in this run' in text
    assert 'No SAE probe variants (cached training) to show.' in text
    assert len(re.findall(r'<img src=', text)) == 2  # by-layer and bars, from the fused rows
    fused = [h for h in report.headline(report.dataset_views(workdir, report.load(workdir)[0])[0])
             if h['method'] == 'SAE fused probe'][0]
    assert fused['row']['layer'] == 2 and fused['basis'] == 'test'
