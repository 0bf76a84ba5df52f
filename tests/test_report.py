"""report.page.build on a synthetic workdir written with results.py's own writers."""
import csv
import math
import os
import re

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from configs import tiny
from mosaic_jax import results
from mosaic_jax import variants
from mosaic_jax.report import page as report_page
from mosaic_jax.report import plots as report_plots
from mosaic_jax.report import read as report_read

DATASETS = ('95_toxic_is', 'ag<news>&co')  # the second checks HTML escaping
CLASSES = {'95_toxic_is': ['0', '1'], 'ag<news>&co': ['world', 'sports', 'sci<tech>']}
LAYERS = (1, 2)
POOLS = ('mosaic', 'mean', 'max')
TOP_N = {'mosaic': 20}  # the new-format fixture's top_n per pooling (0 elsewhere)
# summary.csv columns before top_n / selected / <metric>_lo/_hi (old workdirs).
OLD_FIELDS = ('dataset', 'layer', 'width', 'kind', 'variant', 'pooling', 'binarized', 'C',
              'macro_f1', 'accuracy', 'roc_auc', 'n_train', 'n_test', 'seconds')
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


def _names(layer, width, pool, b, old_format):
    """(summary variant, JSON `variants` key, top_n) of one SAE variant.

    New format: both are `Variant.name` ('mosaic_top20', 'max+bin'). Old workdirs: the
    summary said 'max+bin' but the JSON said 'max/bin', and no top_n.
    """
    if old_format:
        return pool + ('+bin' if b else ''), pool + ('/bin' if b else ''), None
    top_n = TOP_N.get(pool, 0)
    name = variants.Variant(variants.SAEKey(layer, width), pool, top_n, b).name
    return name, name, top_n


def _write_summary(path, rows, old_format):
    if not old_format:
        results.write_summary(path, rows)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=OLD_FIELDS, extrasaction='ignore')
        w.writeheader()
        for r in rows:
            w.writerow({k: f'{v:.4f}' if isinstance(v, float) else v for k, v in r.items()})


def _add_intervals(rows, half):
    """macro_f1_lo / _hi = macro_f1 -/+ `half` on every row."""
    for r in rows:
        r['macro_f1_lo'], r['macro_f1_hi'] = r['macro_f1'] - half, r['macro_f1'] + half


def write_run(workdir, spec, run_id, *, layers=LAYERS, datasets=DATASETS, widths=None,
              baselines=True, old_format=False, intervals=None, mark=None):
    """One finished run of `spec`'s model: summary.csv, config/timings, per-SAE JSONs.

    Args:
      old_format: write what workdirs held before variant names were unified: '/bin' SAE
        JSON keys, hidden JSON keys 'last'/'mean', tree variant 'max/bin', no new columns.
      intervals: half-width of a macro_f1_lo/_hi interval on every row (None: no columns).
      mark: row -> bool, the summary's `selected` column (None: not written).
    """
    widths = widths or spec['widths']
    config = _config(spec, layers, datasets)
    run_meta = results.RunMeta.from_config(config)
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
                    name = variants.HiddenVariant(layer, pool).name
                    hidden[pool if old_format else name] = dict(
                        C=1.0, val=dict(macro_f1=f1), test=dict(macro_f1=f1))
                    rows.append(dict(common, layer=layer, width='-', kind='hidden',
                                     variant=name, pooling=pool, binarized=False,
                                     C=1.0, macro_f1=f1, accuracy=f1, roc_auc=f1 + 0.1))
            for wi, width in enumerate(widths):
                json_variants = {}
                for pool in POOLS:
                    for b in (False, True):
                        val, test = _scores(layer, wi, pool, b)
                        name, key, top_n = _names(layer, width, pool, b, old_format)
                        json_variants[key] = dict(
                            C=0.1, val=dict(macro_f1=val), test=dict(macro_f1=test), seconds=1.0)
                        rows.append(dict(common, layer=layer, width=width, kind='sae',
                                         variant=name, pooling=pool, top_n=top_n,
                                         binarized=b, C=0.1, macro_f1=test, accuracy=test,
                                         roc_auc=float('nan') if len(names) > 2 else test))
                if baselines:
                    rows.append(dict(common, layer=layer, width=width, kind='tree',
                                     variant='max/bin' if old_format else 'max+bin',
                                     pooling='max', binarized=True, C=None,
                                     macro_f1=0.5 + 0.01 * layer, accuracy=0.5, roc_auc=0.5))
                folder = results.run_dir(workdir, spec['model'], ds, layer, width, run_id)
                best = max(json_variants, key=lambda k: json_variants[k]['val']['macro_f1'])
                meta = results.metadata(run_meta, dataset=ds, layer=layer, width=width,
                                        hidden=False, class_names=names,
                                        extra=dict(best_variant=f'layer_{layer}/{width}/{best}'))
                probe = results.linear_probe_block(y, proba, names,
                                                   _coef(len(names), _planted(layer, wi)))
                results.write_json(folder, 'sae_classifier_results.json', dict(
                    metadata=meta, models=dict(linearProbe=probe), variants=json_variants))
                if hidden:
                    meta = results.metadata(run_meta, dataset=ds, layer=layer, width=width,
                                            hidden=True, class_names=names, extra={})
                    results.write_json(folder, 'hidden_classifier_results.json', dict(
                        metadata=meta, models=dict(linearProbe=probe), variants=hidden))
        if baselines:
            rows.append(dict(common, layer='-', width='-', kind='tfidf', variant='tfidf',
                             C=None, macro_f1=0.66, accuracy=0.7, roc_auc=0.8))
    if intervals is not None:
        _add_intervals(rows, intervals)
    if mark is not None:
        for r in rows:
            r['selected'] = bool(mark(r))
    run_folder = os.path.join(workdir, results.safe_name(spec['model']), '_runs', run_id)
    _write_summary(os.path.join(run_folder, 'summary.csv'), rows, old_format)
    results.write_json(run_folder, 'config.json', config.to_dict())
    results.write_json(run_folder, 'timings.json', {'load_model_and_saes': 1.5, 'total': 9.0})
    return run_folder


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('work'))
    write_run(workdir, GEMMA, '20250101_000000')
    write_run(workdir, OWN, '20250101_000000', datasets=DATASETS[:1])  # fewer PNGs to draw
    path = report_page.build(workdir)
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
    assert len(links) == 10 * (1 + 3)  # binary: one signed column; 3-class: one per class
    # Validation selects layer 1 / 16k (see _scores): its planted features, linked there.
    base = 'https://www.neuronpedia.org/gemma-2-2b/1-gemmascope-res-16k/'
    assert all(l.startswith(base) for l in links)
    p = _planted(1, 0)
    binary, multi = gemma.split('ag&lt;news&gt;&amp;co', 1)
    table = binary.split('Top SAE features')[1]
    # One logit: the largest |weights|, signed towards class '1' (ties: lower index first).
    first = re.search(r'<td>1</td>(.*?)</tr>', table).group(1)
    second = re.search(r'<td>2</td>(.*?)</tr>', table).group(1)
    assert re.findall(r'/(\d+)">', first) == [str(p + 1)] and '+5' in first
    assert re.findall(r'/(\d+)">', second) == [str(p + 2)] and '-5' in second
    assert 'towards 1' in table.split('</table>')[0]
    top_row = re.search(r'<td>1</td>(.*?)</tr>', multi.split('Top SAE features')[1]).group(1)
    assert re.findall(r'/(\d+)">', top_row) == [str(p + 1), str(p + 2), str(p + 3)]


def test_headline_selects_on_validation_not_test(built):
    workdir, _, _ = built
    run = next(r for r in report_read.load(workdir) if r.model == 'tiny')
    view = report_read.dataset_views(workdir, run)[0]
    table = {h['method']: h for h in report_read.headline(view)}
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
    with open(report_page.build(workdir)) as f:
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
    with open(report_page.build(workdir)) as f:
        text = f.read()
    assert 'ag&lt;news&gt;' in text and '95_toxic_is' not in text
    with open(report_page.build(workdir, run_id='zz_old')) as f:
        text = f.read()
    assert '95_toxic_is' in text and 'ag&lt;news&gt;' not in text
    with pytest.raises(ValueError, match=r"no run 'nope'.*aa_new"):
        report_page.build(workdir, run_id='nope')


def test_empty_or_missing_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match='no finished run under'):
        report_page.build(str(tmp_path))
    with pytest.raises(ValueError, match='does not exist'):
        report_page.build(str(tmp_path / 'absent'))


def test_top_features_binary_signs_and_multiclass():
    lp = dict(feature_analysis=dict(importance_scores=[[0.5, -2.0, 1.0, 0.0]]))
    tops = report_read.top_features(lp, ['neg', 'pos'], k=3)
    # One logit: one column, the largest |weights| signed towards the positive class.
    assert tops == {'towards pos': [(1, -2.0), (2, 1.0), (0, 0.5)]}
    lp = dict(feature_analysis=dict(importance_scores=[[0, 3, 1], [2, 0, 1], [0, 0, 9]]))
    assert [v[0][0] for v in report_read.top_features(lp, ['a', 'b', 'c'], k=1).values()] == [1, 0, 2]
    with pytest.raises(ValueError, match='2 rows for 3 classes'):
        report_read.top_features(dict(feature_analysis=dict(importance_scores=[[1], [2]])),
                                 ['a', 'b', 'c'])


@pytest.mark.parametrize('path, source, want', [
    ('google/gemma-2-9b-it', 'google/gemma-scope-9b-it-res/layer_9/width_16k/canonical',
     'gemma-2-9b-it'),
    ('/data/local_weights/', 'google/gemma-scope-2b-pt-res/layer_{layer}', 'gemma-2-2b'),
    ('google/gemma-2-2b', '/saes/ours/layer_{layer}', None),
    ('google/gemma-2-2b', 'gemma-scope-2b-pt-res-canonical', None),
])
def test_neuronpedia_model_id(path, source, want):
    assert report_read.neuronpedia_model_id(path, source) == want


def test_fused_only_run(tmp_path):
    """probe.train='fused' writes summary rows but no per-SAE JSON files."""
    workdir = str(tmp_path)
    common = dict(dataset='95_toxic_is', n_train=70, n_test=20, pooling='mean', binarized=False,
                  C=1.0, kind='fused', variant='mean')
    rows = [dict(common, layer=1, width='64', macro_f1=0.61, accuracy=0.7, roc_auc=0.8),
            dict(common, layer=2, width='64', macro_f1=0.63, accuracy=0.7, roc_auc=0.8)]
    results.write_summary(os.path.join(workdir, 'tiny', '_runs', 'r', 'summary.csv'), rows)
    with open(report_page.build(workdir)) as f:
        text = f.read()
    assert 'No config.json in this run.' in text and 'No timings.json in this run.' in text
    assert 'No cached-training SAE probe in this run' in text
    assert 'No SAE probe variants (cached training) to show.' in text
    assert len(re.findall(r'<img src=', text)) == 2  # by-layer and bars, from the fused rows
    fused = [h for h in report_read.headline(report_read.dataset_views(workdir, report_read.load(workdir)[0])[0])
             if h['method'] == 'SAE fused probe'][0]
    # No validation score and no select_score: nothing is chosen (never on test).
    assert fused['row'] is None and fused['basis'] == 'unscored'
    assert 'no selection score (never chosen on test)' in text


def _view(workdir, model='tiny'):
    run = next(r for r in report_read.load(workdir) if r.model == model)
    return report_read.dataset_views(workdir, run)[0]


def test_old_format_workdir_still_renders(tmp_path):
    """A workdir written before variant names were unified: '/bin' JSON keys, hidden keys
    'last'/'mean', tree 'max/bin', none of the new summary columns."""
    workdir = str(tmp_path)
    write_run(workdir, OWN, 'old', datasets=('95_toxic_is',), old_format=True)
    with open(report_page.build(workdir)) as f:
        text = f.read()
    assert len(re.findall(r'<img src=', text)) == 4
    assert '<td>max/bin</td>' in text
    assert '[' not in text.split('class="headline"')[1].split('</table>')[0]
    view = _view(workdir)
    assert all(r['top_n'] is None and r['selected'] is False and math.isnan(r['macro_f1_lo'])
               for r in view.rows)
    table = {h['method']: h for h in report_read.headline(view)}
    # Hidden JSON keys 'last'/'mean' still give validation scores.
    assert table['hidden_last']['basis'] == 'validation'
    assert table['hidden_mean']['row']['layer'] == 2
    # The old '/bin' SAE keys no longer name a summary variant and the old summary has no
    # select_score: those rows are not ranked; the choice is among rows with a validation
    # score, never by test macro-F1.
    sae = table['SAE probe (best variant)']
    val = report_read._val_scores(view)
    assert sae['basis'] == 'validation' and not math.isnan(val[report_read._key(sae['row'])])
    assert any(math.isnan(val.get(report_read._key(r), math.nan)) for r in view.rows
               if r['kind'] == 'sae')
    assert report_read.overlap_notes(report_read.headline(view)) == []


def test_new_columns_are_read_from_the_summary(tmp_path):
    workdir = str(tmp_path)
    write_run(workdir, OWN, 'r', layers=(1,), datasets=('95_toxic_is',), widths=('64',),
              intervals=0.05, mark=lambda r: r['kind'] == 'tfidf')
    rows = {(r['kind'], r['variant']): r for r in _view(workdir).rows}
    mosaic = rows['sae', 'mosaic_top20']
    assert (mosaic['pooling'], mosaic['top_n'], mosaic['binarized']) == ('mosaic', 20, False)
    assert rows['sae', 'max+bin']['binarized'] is True
    assert rows['tfidf', 'tfidf']['selected'] and not mosaic['selected']
    assert mosaic['macro_f1_lo'] == pytest.approx(mosaic['macro_f1'] - 0.05)
    assert math.isnan(mosaic['accuracy_lo'])  # only macro-F1 has an interval here


@pytest.fixture(scope='module')
def with_intervals(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('intervals'))
    write_run(workdir, OWN, 'r', datasets=('95_toxic_is',), intervals=0.05)
    with open(report_page.build(workdir)) as f:
        return workdir, f.read()


def test_intervals_in_tables(with_intervals):
    workdir, text = with_intervals
    head = text.split('class="headline"')[1].split('</table>')[0]
    # Validation selects layer 1 / 64 / max (see _scores): test macro-F1 0.67.
    assert '<td>0.670 [0.620, 0.720]</td>' in head
    assert '<td>0.660 [0.610, 0.710]</td>' in head  # TF-IDF
    assert '<td>0.700</td>' in head  # accuracy: no interval recorded, value alone
    every = text.split('<details>')[1]
    assert every.count(' [') == len(_view(workdir).rows)  # each row's macro-F1


def test_overlap_sentence_per_baseline(with_intervals):
    workdir, text = with_intervals
    notes = report_read.overlap_notes(report_read.headline(_view(workdir)))
    ref = 'vs SAE probe (best variant)'
    # SAE [0.62, 0.72]; hidden_last L2 [0.67, 0.77], hidden_mean L2 [0.69, 0.79],
    # TF-IDF [0.61, 0.71]; the tree of layer 1 [0.46, 0.56].
    overlap = 'intervals overlap: the difference is within noise.'
    assert notes == [f'hidden_last {ref}: {overlap}', f'hidden_mean {ref}: {overlap}',
                     f'TF-IDF {ref}: {overlap}',
                     f'decision tree (SAE features) {ref}: no overlap '
                     f'(decision tree (SAE features) is lower).']
    assert all(n in text for n in notes)
    assert text.index('class="overlap"') > text.index('class="headline"')


def test_overlap_notes_edge_cases():
    def head(method, lo=math.nan, hi=math.nan):
        return dict(method=method, basis='test',
                    row=dict(macro_f1=(lo + hi) / 2, macro_f1_lo=lo, macro_f1_hi=hi))
    assert report_read.overlap_notes([head('SAE probe (best variant)'), head('TF-IDF')]) == []
    notes = report_read.overlap_notes([head('SAE probe (best variant)', 0.5, 0.6),
                                       head('TF-IDF', 0.7, 0.8), head('hidden_last'),
                                       dict(method='TF-IDF', row=None, basis='')])
    assert notes == ['TF-IDF vs SAE probe (best variant): no overlap (TF-IDF is higher).',
                     'hidden_last: no macro-F1 interval to compare.']
    assert report_read.overlap_notes([head('SAE probe (best variant)'),
                                      head('TF-IDF', 0.7, 0.8)]) == [
        'The SAE probe has no macro-F1 interval: no overlap check.']


def test_headline_uses_the_rows_the_run_selected(tmp_path):
    workdir = str(tmp_path)
    picked = {('sae', 2, '128', 'mean+bin'), ('hidden', 1, None, 'hidden_last'),
              ('tfidf', None, None, 'tfidf')}

    def mark(r):
        width = None if r['width'] == '-' else r['width']
        layer = None if r['layer'] == '-' else r['layer']
        return (r['kind'], layer, width, r['variant']) in picked

    write_run(workdir, OWN, 'r', datasets=('95_toxic_is',), mark=mark)
    heads = report_read.headline(_view(workdir))
    got = [(h['method'], h['basis'], (h['row']['layer'], h['row']['width'], h['row']['variant']))
           for h in heads]
    # Validation alone would pick layer 1 / 64 / max and hidden_mean at layer 2 (see
    # test_headline_selects_on_validation_not_test); the run's marks win, hidden_mean is
    # not a headline row, and the tree unmarked follows the selected SAE.
    assert got == [('SAE probe (best variant)', 'run', (2, '128', 'mean+bin')),
                   ('hidden_last', 'run', (1, None, 'hidden_last')),
                   ('TF-IDF', 'run', (None, None, 'tfidf')),
                   ('decision tree (SAE features)', 'run', (2, '128', 'max+bin'))]
    with open(report_page.build(workdir)) as f:
        text = f.read()
    assert 'marked selected by the run' in text
    assert 'Linear-probe weights of layer 2, width 128, variant mean+bin.' in text


def test_report_plots_draw_error_bars_and_write_pngs(with_intervals, tmp_path):
    workdir, _ = with_intervals
    view = _view(workdir)
    cells = report_read.best_per_cell(view)
    plain = [{k: v for k, v in r.items() if not k.endswith(('_lo', '_hi'))} for r in view.rows]
    figs = {'by_layer': report_plots.plot_by_layer(view.name, view.rows, cells),
            'bars': report_plots.plot_bars(view.name, view.rows, cells),
            'heatmap': report_plots.plot_heatmaps(view.name, view.rows),
            'plain_bars': report_plots.plot_bars(view.name, plain, {})}

    def error_bars(fig):
        return sum(isinstance(c, ErrorbarContainer) for c in fig.axes[0].containers)

    assert error_bars(figs['by_layer']) == 2 + 2  # two SAE widths, two hidden poolings
    assert error_bars(figs['bars']) == 1 and error_bars(figs['plain_bars']) == 0
    heat_labels = [t.get_text() for t in figs['heatmap'].axes[0].get_yticklabels()]
    assert heat_labels == ['mosaic top20', 'mean', 'max']  # top_n from its own column
    for name, fig in figs.items():
        path = str(tmp_path / f'{name}.png')
        report_plots.write_png(fig, path)
        with open(path, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
    assert report_plots.plot_by_layer('x', [], {}) is None
    assert report_plots.plot_bars('x', [], {}) is None
    assert os.listdir(tmp_path) and not any(n.startswith('.tmp-') for n in os.listdir(tmp_path))
    # A layer/width cell without an SAE draws no panel (only the colorbar and real panels).
    sae_cells = {(r['layer'], r['width']) for r in view.rows if r['kind'] == 'sae'}
    drop = sorted(sae_cells, key=str)[0]
    gone = [r for r in view.rows if not (r['kind'] == 'sae' and (r['layer'], r['width']) == drop)]
    cells_left = sae_cells - {drop}
    grid = len({l for l, _ in cells_left}) * len({w for _, w in cells_left})
    assert grid > len(cells_left)  # the grid has a hole where the dropped SAE was
    fig = report_plots.plot_heatmaps(view.name, gone)
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(shown) == len(cells_left) and all('layer' in ax.get_title() for ax in shown)


def test_sparse_curve_one_line_per_sae_over_k():
    rows = [dict(kind='sparse', layer=l, width='4k', k=k, macro_f1=0.5 + 0.01 * k + 0.1 * l,
                 macro_f1_lo=0.4, macro_f1_hi=0.9)
            for l in (3, 8) for k in (1, 5, 16)] + [dict(kind='sae', layer=3, width='4k', k=None,
                                                          macro_f1=0.9)]
    fig = report_plots.plot_sparse_curve('ds', rows)
    lines = fig.axes[0].get_lines()
    xs = sorted(tuple(int(x) for x in line.get_xdata()) for line in lines
                if line.get_marker() == 'o')
    assert xs == [(1, 5, 16), (1, 5, 16)]  # one line per SAE, every k
    assert sum(isinstance(c, ErrorbarContainer) for c in fig.axes[0].containers) == 2
    assert report_plots.plot_sparse_curve('ds', rows[-1:]) is None
