"""A results workdir -> `<workdir>/report.html` plus matplotlib PNGs in `report_files/`.

Reads only what `results` writes: `<model>/_runs/<run_id>/{summary.csv, config.json,
timings.json}` and the MOSAIC-layout `sae_/hidden_classifier_results.json` of each
dataset x layer x width. One section per model (its latest run) and dataset; the figures
are drawn by `report.plots`. Variant names (`variants.Variant.name`, in summary.csv and
the JSON `variants` keys alike) are only compared whole: layer, width, pooling, top_n,
binarization, `selected` and `<metric>_lo/_hi` are read from their own summary columns.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np

from mosaic_jax import checkpoint
from mosaic_jax import results
from mosaic_jax import variants
from mosaic_jax.report import plots as report_plots

REPORT_NAME = 'report.html'
FILES_DIR = 'report_files'
HEADLINE = report_plots.METRIC  # the paper's headline metric (macro-F1)
METRICS = ('macro_f1', 'accuracy', 'roc_auc')
METRIC_NAMES = {'macro_f1': 'macro-F1', 'accuracy': 'accuracy', 'roc_auc': 'AUC'}
TOP_K = 10  # features listed per class
MAX_HEATMAP_PANELS = 12  # beyond this, only the selected layer/width gets a heatmap
GEMMA_SCOPE_PREFIX = 'google/gemma-scope-'
NEURONPEDIA = 'https://www.neuronpedia.org/{model}/{layer}-gemmascope-res-{width}/{index}'
HIDDEN_NAMES = tuple(v for v, _ in report_plots.HIDDEN_VARIANTS)  # 'hidden_last', ...
BASIS_TEXT = {'validation': 'validation macro-F1', 'run': 'marked selected by the run',
              'only': 'the only row of its kind'}
TRUE = ('True', 'true', '1')  # how a bool reads back from summary.csv


# ----------------------------------------------------------------------------------------
# Reading a workdir
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """One finished run of one model: its summary rows, config and timings."""
    model: str        # folder name under the workdir (results.safe_name of model.name)
    run_id: str
    folder: str       # <workdir>/<model>/_runs/<run_id>
    rows: list[dict]  # typed summary.csv rows (see _parse_row)
    config: dict      # config.json; {} when absent
    timings: dict     # timings.json; {} when absent


@dataclasses.dataclass
class DatasetView:
    """Everything the report shows for one dataset of one run."""
    name: str
    rows: list[dict]
    sae_json: dict[tuple[int, str], dict]  # (layer, width) -> sae_classifier_results.json
    hidden_json: dict[int, dict]           # layer -> hidden_classifier_results.json


def _int_or_none(s: str) -> int | None:
    try:
        return int(s)
    except (TypeError, ValueError):
        return None  # '-' (TF-IDF has no layer) or ''


def _parse_row(r: dict) -> dict:
    """A summary.csv row (all strings) -> typed values; '-' / '' become None or NaN.

    Optional columns, absent from older summaries: `top_n` (None), `selected` (False: the
    report then selects itself) and `<metric>_lo` / `<metric>_hi` (NaN: no interval).
    """
    width = r.get('width') or ''
    pooling = r.get('pooling') or ''
    return dict(
        dataset=r['dataset'], kind=r['kind'], variant=r.get('variant') or '',
        layer=_int_or_none(r.get('layer')),
        width=None if width in ('', '-') else width,
        pooling=None if pooling in ('', '-') else pooling,
        top_n=_int_or_none(r.get('top_n')), k=_int_or_none(r.get('k')),
        binarized=r.get('binarized') in TRUE, selected=r.get('selected') in TRUE,
        C=None if math.isnan(results.to_float(r.get('C'))) else results.to_float(r.get('C')),
        n_train=_int_or_none(r.get('n_train')), n_test=_int_or_none(r.get('n_test')),
        seconds=results.to_float(r.get('seconds')),
        select_score=results.to_float(r.get('select_score')),
        **{m: results.to_float(r.get(m)) for m in METRICS},
        **{f'{m}_{end}': results.to_float(r.get(f'{m}_{end}')) for m in METRICS for end in ('lo', 'hi')})


def read_summary(path: str) -> list[dict]:
    return [_parse_row(r) for r in results.read_csv(path, required=('dataset', 'kind'))]


def _read_json_or_empty(path: str) -> dict:
    return checkpoint.read_json(path) if os.path.exists(path) else {}


def load(workdir: str, run_id: str | None = None) -> list[Run]:
    """The runs a report covers: per model folder, run `run_id` or else its latest.

    "Latest" is the finished run (one with a summary.csv) whose summary.csv was written
    last; the run id breaks ties, and default run ids are UTC timestamps.
    """
    if not os.path.isdir(workdir):
        raise ValueError(f'report: workdir {workdir!r} does not exist')
    runs, seen_ids = [], set()
    for model in sorted(os.listdir(workdir)):
        runs_dir = os.path.join(workdir, model, results.RUNS)
        if not os.path.isdir(runs_dir):
            continue
        finished = {}
        for rid in os.listdir(runs_dir):
            summary = os.path.join(runs_dir, rid, 'summary.csv')
            if os.path.isfile(summary):
                finished[rid] = os.path.getmtime(summary)
        seen_ids.update(finished)
        if run_id is not None:
            chosen = run_id if run_id in finished else None
        else:
            chosen = max(finished, key=lambda r: (finished[r], r), default=None)
        if chosen is None:
            continue
        folder = os.path.join(runs_dir, chosen)
        runs.append(Run(model=model, run_id=chosen, folder=folder,
                        rows=read_summary(os.path.join(folder, 'summary.csv')),
                        config=_read_json_or_empty(os.path.join(folder, 'config.json')),
                        timings=_read_json_or_empty(os.path.join(folder, 'timings.json'))))
    if not runs:
        if run_id is not None and seen_ids:
            raise ValueError(f'report: no run {run_id!r} under {workdir!r}; finished runs: '
                             f'{sorted(seen_ids)}')
        raise ValueError(f'report: no finished run under {workdir!r} (expected '
                         f'<workdir>/<model>/_runs/<run_id>/summary.csv, written at the end '
                         f'of a classify run)')
    return runs


def dataset_views(workdir: str, run: Run) -> list[DatasetView]:
    """One view per dataset of `run`, in summary order, with the JSON files that exist."""
    names = list(dict.fromkeys(r['dataset'] for r in run.rows))
    views = []
    for name in names:
        rows = [r for r in run.rows if r['dataset'] == name]
        sae_json, hidden_json = {}, {}
        for layer, width in dict.fromkeys((r['layer'], r['width']) for r in rows
                                          if r['kind'] == 'sae'):
            folder = results.run_dir(workdir, run.model, name, layer, width, run.run_id)
            for fname, store, key in (('sae_classifier_results.json', sae_json, (layer, width)),
                                      ('hidden_classifier_results.json', hidden_json, layer)):
                path = os.path.join(folder, fname)
                if key not in store and os.path.exists(path):
                    store[key] = checkpoint.read_json(path)
        views.append(DatasetView(name, rows, sae_json, hidden_json))
    return views


# ----------------------------------------------------------------------------------------
# What the tables and plots show
# ----------------------------------------------------------------------------------------

def _hidden_name(layer: int, key: str) -> str:
    """A hidden JSON `variants` key as its summary name; older workdirs wrote 'last'."""
    return key if key.startswith('hidden_') else variants.HiddenVariant(layer, key).name


def _val_scores(view: DatasetView) -> dict[tuple, float]:
    """(kind, layer, width, variant) -> validation macro-F1, from the JSON `variants`."""
    out = {}
    for (layer, width), js in view.sae_json.items():
        for name, v in js.get('variants', {}).items():
            out['sae', layer, width, name] = results.to_float(v.get('val', {}).get(HEADLINE))
    for layer, js in view.hidden_json.items():
        for key, v in js.get('variants', {}).items():
            out['hidden', layer, None, _hidden_name(layer, key)] = results.to_float(
                v.get('val', {}).get(HEADLINE))
    return out


def _key(r: dict) -> tuple:
    return r['kind'], r['layer'], r['width'], r['variant']


def select(rows: list[dict], val: dict[tuple, float]) -> tuple[dict | None, str]:
    """The best row by its validation macro-F1 (the per-variant JSONs), else by the run's
    `select_score` (summary.csv: validation or CV mean). Never by a test score: rows with
    neither are not ranked (ties: the first row).

    Returns:
      (row, 'validation'); (row, 'only') for a single row without a score; (None, '') for
      no rows; (None, 'unscored') when none of several rows has a selection score.
    """
    if not rows:
        return None, ''

    def score(r: dict) -> float:
        v = val.get(_key(r), math.nan)
        return r.get('select_score', math.nan) if math.isnan(v) else v
    best = results.best_row(rows, score)
    if best is None:  # one row is no choice; among several, none without a score
        return (rows[0], 'only') if len(rows) == 1 else (None, 'unscored')
    return best, 'validation'


def _choose(rows: list[dict], val: dict[tuple, float], marked: bool) -> tuple[dict | None, str]:
    """`select`, unless the run marked rows of this kind `selected`: then its mark wins.

    Returns:
      (row or None, 'run' | 'validation' | 'only' | 'unscored' | '').
    """
    chosen = [r for r in rows if r['selected']] if marked else []
    if chosen:  # more than one mark per kind: our rule among the marked rows
        return (chosen[0] if len(chosen) == 1 else select(chosen, val)[0]), 'run'
    return select(rows, val)


def best_per_cell(view: DatasetView, kind: str = 'sae') -> dict[tuple[int, str], dict]:
    """(layer, width) -> the selected `kind` row of that SAE (the run's best variant)."""
    val = _val_scores(view)
    cells: dict[tuple[int, str], list[dict]] = {}
    for r in view.rows:
        if r['kind'] == kind:
            cells.setdefault((r['layer'], r['width']), []).append(r)
    chosen = {k: select(v, val)[0] for k, v in cells.items()}
    return {k: r for k, r in chosen.items() if r is not None}


def probe_kind(view: DatasetView) -> str:
    """'sae' (cached training: many variants) or, for a fused-only run, 'fused'."""
    return 'sae' if any(r['kind'] == 'sae' for r in view.rows) else 'fused'


def headline(view: DatasetView) -> list[dict]:
    """The headline table: one entry per method, each its best row over layers/widths.

    Where summary.csv marks rows `selected` (one per kind and dataset), the entry of that
    kind is the marked row: hidden states then get one entry per marked row, named by its
    variant. Kinds without marks are selected here (`select`).

    Returns:
      dicts with 'method', 'row' (None when the run has no such result) and 'basis'
      ('run' | 'validation': who or what chose the layer/width/variant; 'only' for a lone
      unscored row; 'unscored' when no row has a selection score, so none is chosen:
      never on test).
    """
    val = _val_scores(view)
    marked = {r['kind'] for r in view.rows if r['selected']}
    of = {k: [r for r in view.rows if r['kind'] == k] for k in
          ('sae', 'fused', 'hidden', 'tfidf', 'tree', 'pixels')}
    out = []

    def add(method, kind, rows):
        row, basis = _choose(rows, val, kind in marked)
        out.append(dict(method=method, row=row, basis=basis))
        return row, basis

    sae, sae_basis = add('SAE probe (best variant)', 'sae', of['sae'])
    if of['fused']:
        add('SAE fused probe', 'fused', of['fused'])
    if 'hidden' in marked:
        out += [dict(method=r['variant'] or 'hidden', row=r, basis='run')
                for r in of['hidden'] if r['selected']]
    else:
        for v in HIDDEN_NAMES:
            add(v, 'hidden', [r for r in of['hidden'] if r['variant'] == v])
    add('TF-IDF', 'tfidf', of['tfidf'])
    if of['pixels']:  # image datasets: logistic regression on downsampled pixels
        add('pixels (downsampled)', 'pixels', of['pixels'])
    # The tree is interpretable only next to the probe it explains: same layer/width.
    same = [t for t in of['tree']
            if sae and (t['layer'], t['width']) == (sae['layer'], sae['width'])]
    if same and 'tree' not in marked:
        out.append(dict(method='decision tree (SAE features)', row=same[0], basis=sae_basis))
    else:
        add('decision tree (SAE features)', 'tree', of['tree'])
    return out


overlap_notes = report_plots.overlap_notes  # the headline's interval sentences


def neuronpedia_model_id(model_path: str, sae_source: str) -> str | None:
    """Neuronpedia's model id ('gemma-2-2b') when the SAE is a Gemma Scope SAE, else None."""
    source = str(sae_source or '')
    if not source.startswith(GEMMA_SCOPE_PREFIX):
        return None
    path = str(model_path or '').rstrip('/')
    model_id = os.path.basename(path).lower()  # 'google/gemma-2-9b-it' -> 'gemma-2-9b-it'
    if model_id.startswith('gemma-'):
        return model_id
    # A local model folder: Gemma Scope's repo name says which model it was trained on.
    m = re.match(re.escape(GEMMA_SCOPE_PREFIX) + r'(\d+b)-(pt|it)-', source)
    return f"gemma-2-{m.group(1)}{'-it' if m.group(2) == 'it' else ''}" if m else None


def explanations(run: Run, dataset: str, layer, width) -> dict | None:
    """The run's feature explanations of one SAE (experiments/explain.py), or None."""
    path = results.explanations_path(run.folder, dataset, layer, width)
    return checkpoint.read_json(path) if os.path.isfile(path) else None


def top_features(linear_probe: dict, class_names: list[str], k: int = TOP_K
                 ) -> dict[str, list[tuple[int, float]]]:
    """Top-`k` SAE features by probe weight for each class.

    Args:
      linear_probe: MOSAIC's `models.linearProbe` block; `feature_analysis.
        importance_scores` is f[C', F] (C' = 1 for a binary probe: positive weights vote
        for class 1, so class 0's top features are the most negative ones).
    Returns:
      class name -> [(feature index, weight toward that class)], largest first; for a
      binary probe one entry 'towards <class 1>': the k largest |weights|, signed.
    """
    scores = linear_probe.get('feature_analysis', {}).get('importance_scores')
    if not scores:
        return {}
    w = np.asarray(scores, np.float64)  # [C', F]
    if w.shape[0] == 1 and len(class_names) == 2:
        per_class = {class_names[0]: -w[0], class_names[1]: w[0]}
    elif w.shape[0] == len(class_names):
        per_class = dict(zip(class_names, w))
    else:
        raise ValueError(f'importance_scores has {w.shape[0]} rows for '
                         f'{len(class_names)} classes')
    if w.shape[0] == 1:  # one logit: one signed column towards the positive class
        v = w[0]
        return {f'towards {class_names[1]}': [(int(i), float(v[i])) for i in
                                              np.argsort(-np.abs(v), kind='stable')[:k]]}
    return {c: [(int(i), float(v[i])) for i in np.argsort(-v, kind='stable')[:k]]
            for c, v in per_class.items()}
