"""The HTML page of a results workdir: `<workdir>/report.html` plus its PNGs in `report_files/`.

Everything it shows comes from `report.read` (the workdir's files, parsed) and is drawn by
`report.plots` / `report.transfer`; this module only lays it out.
"""
from __future__ import annotations

import datetime
import hashlib
import html
import math
import os
import re
from typing import Any

from matplotlib.figure import Figure

from mosaic_jax import checkpoint
from mosaic_jax.report import plots as report_plots
from mosaic_jax.report import read
from mosaic_jax.report import transfer as report_transfer


class _Html(str):
    """Text that is already HTML (escaped pieces + our tags); `_cell` leaves it alone."""


def _cell(x: Any) -> str:
    return x if isinstance(x, _Html) else html.escape(str(x))


def _table(header: list[str], rows: list[list[Any]], cls: str = '') -> str:
    head = ''.join(f'<th>{_cell(h)}</th>' for h in header)
    body = ''.join('<tr>' + ''.join(f'<td>{_cell(c)}</td>' for c in r) + '</tr>' for r in rows)
    return f'<table class="{html.escape(cls)}"><tr>{head}</tr>{body}</table>'


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return '-'
    return f'{v:.3f}' if isinstance(v, float) else str(v)


def _fmt_score(r: dict, metric: str) -> str:
    """'0.812 [0.760, 0.861]' when the row has an interval for `metric`, else '0.812'."""
    iv = report_plots.interval(r, metric)
    if iv is None or math.isnan(r[metric]):
        return _fmt(r[metric])
    return f'{r[metric]:.3f} [{iv[0]:.3f}, {iv[1]:.3f}]'


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


class _Page:
    """Collects HTML pieces and writes each figure once under report_files/."""

    def __init__(self, files_dir: str):
        self.files_dir = files_dir
        self.parts: list[str] = []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def figure(self, fig: Figure | None, stem: str, alt: str, missing: str) -> None:
        if fig is None:
            self.add(_missing(missing))
            return
        name = re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:80]
        # Two names can slug alike ('a/b', 'a_b'): a hash of the raw stem keeps them apart.
        name += '-' + hashlib.sha1(stem.encode()).hexdigest()[:8] + '.png'
        report_plots.write_png(fig, os.path.join(self.files_dir, name))
        src = html.escape(f'{read.FILES_DIR}/{name}')
        self.add(f'<figure><img src="{src}" alt="{html.escape(alt)}"></figure>')


def _headline_html(heads: list[dict]) -> str:
    """The headline table, then the interval-overlap sentences when the run has intervals."""
    rows = []
    for h in heads:
        r = h['row']
        if r is None:
            why = ('no selection score (never chosen on test)' if h['basis'] == 'unscored'
                   else 'not in this run')
            rows.append([h['method']] + ['-'] * 7 + [why])
            continue
        C = '-' if r['C'] is None else f"{r['C']:g}"
        rows.append([h['method'], _fmt(r['layer']), _fmt(r['width']), r['variant'] or '-', C,
                     *(_fmt_score(r, m) for m in read.METRICS), read.BASIS_TEXT[h['basis']]])
    out = _table(['method', 'layer', 'width', 'variant', 'C',
                  *(read.METRIC_NAMES[m] for m in read.METRICS), 'selected on'], rows, 'headline')
    notes = read.overlap_notes(heads)
    if notes:
        out += ('<p>Macro-F1 intervals against the SAE probe:</p><ul class="overlap">'
                + ''.join(f'<li>{html.escape(n)}</li>' for n in notes) + '</ul>')
    return out


def _features_html(page: _Page, run: read.Run, view: read.DatasetView, best: dict | None,
                   stem: str) -> None:
    """Top features of `best` (the headline SAE probe row) per class: table and chart."""
    page.add('<h4>Top SAE features per class</h4>')
    if best is None:
        page.add(_missing('No cached-training SAE probe in this run: no feature weights.'))
        return
    js = view.sae_json.get((best['layer'], best['width']))
    if js is None:
        page.add(_missing('No sae_classifier_results.json for the selected layer/width: '
                          'no feature weights to show.'))
        return
    meta = js.get('metadata', {})
    lp = js.get('models', {}).get('linearProbe', {})
    tops = read.top_features(lp, [str(c) for c in meta.get('class_names', [])])
    if not tops:
        page.add(_missing('The probe block has no importance_scores.'))
        return
    cfg = meta.get('mosaic_jax', {}).get('config') or run.config
    model_id = read.neuronpedia_model_id(cfg.get('model', {}).get('path'),
                                         cfg.get('sae', {}).get('source'))
    where = f"layer {best['layer']}, width {best['width']}, variant {best['variant']}"
    page.add(f'<p>Linear-probe weights of {html.escape(where)}. ' + (
        f'Gemma Scope SAE: feature indices link to Neuronpedia ({html.escape(model_id)}).'
        if model_id else 'Not a Gemma Scope SAE: no Neuronpedia pages.') + '</p>')

    def link(i: int, w: float | None = None) -> _Html:
        text = html.escape(f'#{i}' if w is None else f'#{i} ({w:+.3g})')
        if not model_id:
            return _Html(text)
        # The SAE's layer is the config layer filled into sae.source, whatever the
        # layer_convention (assets.resolve_sae_source).
        url = read.NEURONPEDIA.format(model=model_id, layer=best['layer'], width=best['width'],
                                 index=i)
        return _Html(f'<a href="{html.escape(url)}">{text}</a>')

    classes = list(tops)
    table = [[rank + 1] + [link(*tops[c][rank]) if rank < len(tops[c]) else '' for c in classes]
             for rank in range(max(len(v) for v in tops.values()))]
    page.add(_table(['rank'] + [c if c.startswith('towards ') else f'class {c}'
                                for c in classes], table, 'features'))
    if len(classes) > report_plots.MAX_BAR_CLASSES:
        page.add(_missing(f'The chart shows the first {report_plots.MAX_BAR_CLASSES} of '
                          f'{len(classes)} classes; the table lists all.'))
    page.figure(report_plots.plot_top_features(tops, f'{view.name}: {where}'),
                f'{stem}-features', f'top features {view.name}', 'No features to plot.')
    _explanations_html(page, read.explanations(run, view.name, best['layer'], best['width']),
                       link)


def _example_html(x: dict) -> str:
    """One top-activating context, the firing token highlighted."""
    c, (a, b) = x['context'], x['token_span']
    return (f"{html.escape(c[:a])}<mark>{html.escape(c[a:b])}</mark>{html.escape(c[b:])} "
            f"<small>({x['activation']:.3g}, text {x['text_index']})</small>")


def _explanations_html(page: _Page, ex: dict | None, name) -> None:
    """Each top feature with the training contexts where it fires most (explain.py)."""
    page.add('<h4>What the top features respond to (training texts)</h4>')
    if not ex:
        page.add(_missing('No feature explanations in this run (explain.enabled).'))
        return
    page.add(f"<p>Ranked by weight x mean pooled value; weight {html.escape(ex['weight_sign'])}. "
             'Density: share of training texts where the feature fires.</p>')
    for label, entries in ex['classes'].items():
        rows = [[_Html(name(e['feature'])), f"{e['weight']:+.3g}", f"{e['density']:.2f}",
                 ', '.join(f'{k}: {v:.3g}' for k, v in e['class_means'].items()
                           if v is not None),
                 _Html('<br>'.join(_example_html(x) for x in e['examples']))]
                for e in entries]
        page.add(f'<h5>towards {html.escape(label)}</h5>')
        page.add(_table(['feature', 'weight', 'density', 'mean per class', 'top contexts'],
                        rows, 'features') if rows else _missing('No feature pushes this way.'))


def _plots_html(page: _Page, view: read.DatasetView, best: dict | None, stem: str) -> None:
    """The by-layer lines, the method bars and the pooling heatmaps of one dataset."""
    kind = read.probe_kind(view)
    cells = read.best_per_cell(view, kind)
    page.add('<h4>Macro-F1 by layer and width</h4>')
    layers = report_plots.layer_sort(r['layer'] for r in view.rows
                                     if r['kind'] in ('sae', 'fused'))
    if len(layers) == 1:
        page.add(_missing(f'Only layer {layers[0]} was run: no trend across layers.'))
    page.figure(report_plots.plot_by_layer(view.name, view.rows, cells), f'{stem}-by_layer',
                f'macro-F1 by layer {view.name}', 'No SAE probe results to plot by layer.')
    page.add('<h4>SAE vs hidden states vs TF-IDF</h4>')
    page.figure(report_plots.plot_bars(view.name, view.rows, cells, kind), f'{stem}-bars',
                f'method comparison {view.name}', 'No results to compare.')
    page.add('<h4>Pooling x binarization</h4>')
    n_cells = len(read.best_per_cell(view))
    only = None
    if n_cells > read.MAX_HEATMAP_PANELS and best is not None:
        only = (best['layer'], best['width'])
        page.add(_missing(f'{n_cells} layer/width pairs: showing only the selected one '
                          f'(layer {only[0]}, {only[1]}).'))
    page.figure(report_plots.plot_heatmaps(view.name, view.rows, only), f'{stem}-heatmap',
                f'pooling heatmap {view.name}',
                'No SAE probe variants (cached training) to show.')
    if any(r['kind'] == 'sparse' for r in view.rows):
        page.add('<h4>k-sparse probes: macro-F1 against k</h4>')
        page.figure(report_plots.plot_sparse_curve(view.name, view.rows), f'{stem}-sparse',
                    f'k-sparse curve {view.name}', 'No k-sparse probe rows.')


def _dataset_html(page: _Page, run: read.Run, view: read.DatasetView) -> None:
    stem = f'{run.model}-{run.run_id}-{view.name}'
    page.add(f'<h3 id="{html.escape(stem)}">{html.escape(view.name)}</h3>')
    n = next((r for r in view.rows if r['n_test'] is not None), None)
    if n:
        page.add(f"<p>{n['n_train']} training / {n['n_test']} test texts.</p>")
    heads = read.headline(view)
    page.add(_headline_html(heads))
    missing = [v for v in (*read.HIDDEN_NAMES, 'tfidf', 'tree')
               if not any(r['variant'] == v or r['kind'] == v for r in view.rows)]
    if missing:
        page.add(_missing(f"Not in this run: {', '.join(missing)}."))
    best = heads[0]['row']  # the SAE probe (cached training) of the headline
    _plots_html(page, view, best, stem)
    _features_html(page, run, view, best, stem)
    all_rows = [[r['layer'] if r['layer'] is not None else '-', r['width'] or '-', r['kind'],
                 r['variant'], '-' if r['C'] is None else f"{r['C']:g}",
                 *(_fmt_score(r, m) for m in read.METRICS), _fmt(r['seconds']),
                 'yes' if r['selected'] else ''] for r in view.rows]
    page.add('<details><summary>All results of this dataset</summary>' + _table(
        ['layer', 'width', 'kind', 'variant', 'C', *(read.METRIC_NAMES[m] for m in read.METRICS),
         'seconds', 'selected'], all_rows, 'all') + '</details>')


def _run_html(page: _Page, workdir: str, run: read.Run) -> None:
    page.add(f'<h2>{html.escape(run.model)} <small>run {html.escape(run.run_id)}</small></h2>')
    cfg = run.config
    facts = [('model', cfg.get('model', {}).get('path')),
             ('SAE source', cfg.get('sae', {}).get('source')),
             ('layers', cfg.get('layers')), ('widths', cfg.get('sae', {}).get('widths')),
             ('layer convention', cfg.get('model', {}).get('layer_convention')),
             ('probe training', cfg.get('probe', {}).get('train'))]
    facts = [(k, v) for k, v in facts if v not in (None, '')]
    page.add(_table(['setting', 'value'], facts, 'facts') if facts
             else _missing('No config.json in this run.'))
    page.add('<h4>Timings (seconds)</h4>')
    page.add(_table(['step', 'seconds'],
                    [[k, f'{v:.2f}' if isinstance(v, (int, float)) else v]
                     for k, v in run.timings.items()], 'timings')
             if run.timings else _missing('No timings.json in this run.'))
    report_transfer.section(page, run.folder)
    views = read.dataset_views(workdir, run)
    if not views:
        page.add(_missing('summary.csv of this run has no rows.'))
    for view in views:
        _dataset_html(page, run, view)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
.missing { color: #8a4b00; font-style: italic; }
figure { margin: 0.5em 0; } img { max-width: 100%; }
h2 { border-bottom: 2px solid #333; margin-top: 2em; } small { color: #666; font-weight: normal; }
"""


def build(workdir: str, *, run_id: str | None = None) -> str:
    """Writes `<workdir>/report.html` (+ PNGs in `<workdir>/report_files/`).

    Args:
      workdir: a results workdir (config.workdir of `experiment.run`).
      run_id: report this run of every model that has it; None = each model's latest.
    Returns:
      the path of the written report.html.
    Raises:
      ValueError: no finished run (or no run `run_id`) under `workdir`.
    """
    runs = read.load(workdir, run_id)
    files_dir = os.path.join(workdir, read.FILES_DIR)
    os.makedirs(files_dir, exist_ok=True)
    page = _Page(files_dir)
    now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    page.add(f'<h1>mosaic_jax report</h1><p>{html.escape(os.path.abspath(workdir))}, '
             f'generated {now}. Headline metric: test macro-F1; the layer, width and '
             f'variant of each method are the ones the run marked selected, else selected '
             f'here on validation macro-F1 when the run recorded it. Brackets give the '
             f'uncertainty interval the run recorded for a score.</p>')
    page.add('<ul>' + ''.join(f'<li>{html.escape(r.model)} (run {html.escape(r.run_id)}): '
                              f'{len({x["dataset"] for x in r.rows})} dataset(s)</li>'
                              for r in runs) + '</ul>')
    for run in runs:
        _run_html(page, workdir, run)
    text = ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>mosaic_jax report'
            f'</title><style>{_CSS}</style></head><body>\n' + '\n'.join(page.parts)
            + '\n</body></html>\n')
    path = os.path.join(workdir, read.REPORT_NAME)
    checkpoint.atomic_write_text(path, text)
    return path
