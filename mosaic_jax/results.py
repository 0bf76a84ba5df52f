"""Results files in MOSAIC's dashboard layout, plus our additions.

  <workdir>/<model>/<dataset>/layer_<L>/<width>/<run_id>/sae_classifier_results.json
  <workdir>/<model>/<dataset>/layer_<L>/<width>/<run_id>/hidden_classifier_results.json
  <workdir>/<model>/_runs/<run_id>/{summary.csv, config.json, timings.json, splits/,
                                  transfer.csv, feature_overlap.csv, correctness.csv}

MOSAIC's keys (`metadata.{model,dataset,training,args,timestamp,class_names}`,
`models.linearProbe.{performance,class_metrics,aggregated_metrics,feature_analysis}`,
`models.decisionTree`) are kept; ours are added beside them (`variants`, `mosaic_jax`).
Every write is atomic (checkpoint.atomic_write_*). This module owns every path of a run and
the one CSV reader / writer; `best_row` is the one choice among result rows (the run marks it
`selected`; the report, the claims table and the transfer matrices read that choice).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib.metadata
import io
import os
from typing import Any, Callable, Sequence

import numpy as np
from sklearn import metrics as skm

from mosaic_jax import checkpoint
from mosaic_jax.probing import metrics
from mosaic_jax.probing import probe

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'scikit-learn',
            'transformers', 'datasets', 'mosaic_jax')


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = 'not installed'
    return out


def new_run_id() -> str:
    """MOSAIC's run folder naming: a UTC timestamp, 20241121_202159."""
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d_%H%M%S')


def safe_name(name: str) -> str:
    """Dataset / model ids as path parts, the way MOSAIC writes them ('/' -> '_')."""
    return name.replace('sae_probes:', '').replace('/', '_').replace(':', '_')


RUNS = '_runs'  # <workdir>/<model>/_runs/<run_id>: a run's own files


def run_dir(workdir: str, model: str, dataset: str, layer: int, width: str, run_id: str) -> str:
    """<workdir>/<model>/<dataset>/layer_<L>/<width>/<run_id>: one SAE's result JSONs."""
    return os.path.join(workdir, safe_name(model), safe_name(dataset), f'layer_{layer}',
                        str(width), run_id)


def runs_dir(workdir: str, model: str) -> str:
    """<workdir>/<model>/_runs: every run of a model (`model` as written: a safe name)."""
    return os.path.join(workdir, safe_name(model), RUNS)


def store_dir(workdir: str) -> str:
    """<workdir>/_features: a workdir's default feature store (store.py)."""
    return os.path.join(workdir, '_features')


def explanations_path(run_folder: str, dataset: str, layer, width) -> str:
    """<run>/features/<dataset>_layer_<L>_<width>.json: a selected probe's explained features."""
    return os.path.join(run_folder, 'features',
                        f'{safe_name(dataset)}_layer_{layer}_{width}.json')


def run_folder(workdir: str, model: str, run_id: str) -> str:
    """<workdir>/<model>/_runs/<run_id>: summary, config, timings, splits, transfer, ..."""
    return os.path.join(runs_dir(workdir, model), run_id)


# ----------------------------------------------------------------------------------------
# CSV files and the one row choice
# ----------------------------------------------------------------------------------------

def to_float(v: Any) -> float:
    """A number as read back from a CSV cell ('' / None / text: NaN)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float('nan')


def read_csv(path: str, required: Sequence[str] = ()) -> list[dict]:
    """Rows of a CSV this module wrote, as strings (column -> cell).

    Raises:
      ValueError: when the header lacks a `required` column (naming the file and them).
    """
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        if missing := set(required) - set(reader.fieldnames or ()):
            raise ValueError(f'{path}: not a results.write_csv file of this kind (no '
                             f'columns {sorted(missing)})')
        return list(reader)


def write_csv(path: str, rows: list[dict], fields: Sequence[str], *,
              float_format: str = '.4f') -> None:
    """An atomic CSV with columns `fields`, then every other key a row has (nothing a row
    carries is dropped); floats as `float_format` (scores: 4 decimals; probabilities
    '.9g', float32 exactly), missing values empty."""
    fields = list(fields)
    known = set(fields)
    for r in rows:
        fields += [k for k in r if k not in known and not known.add(k)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval='')
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v, float_format) for k, v in r.items()})
    checkpoint.atomic_write_text(path, buf.getvalue())


def best_row(rows: Sequence[dict], score: Callable[[dict], float] | None = None
             ) -> dict | None:
    """THE choice among result rows: the highest selection score (`select_score`: the
    headline metric on validation or the CV mean, never a test score); ties: the first
    row; rows without a score are never chosen (None when no row has one)."""
    score = score or (lambda r: to_float(r.get('select_score')))
    best, best_s = None, float('nan')
    for r in rows:
        s = score(r)
        if s == s and (best is None or s > best_s):
            best, best_s = r, s
    return best


def mark_selected(rows: list[dict], by: Sequence[str] = ('kind',)) -> list[dict]:
    """Copies of `rows` with `selected`: True on the `best_row` of each group of rows that
    agree on the `by` columns (per kind: the one row per method a headline compares)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    chosen = {id(best_row(g)) for g in groups.values()}
    return [{**r, 'selected': id(r) in chosen} for r in rows]


def linear_probe_block(y_true: np.ndarray, proba: np.ndarray, class_names: list,
                       coef: np.ndarray | None, *, cv: dict | None = None,
                       top_k: int = 10) -> dict:
    """MOSAIC's `models.linearProbe` block from test labels and probabilities.

    Per-class rows come from sklearn's classification_report over all classes; accuracy
    and macro F1 (`performance.macro_f1` = `aggregated_metrics['macro avg'].f1_score`)
    come from the metrics module, the project's one definition.

    Args:
      y_true: int[N] test labels; proba: float[N, C], C = len(class_names).
      coef: float[F, C'] probe weights in the original feature space (C' = 1 binary).
    """
    proba = np.asarray(proba)
    if proba.ndim != 2 or proba.shape[1] != len(class_names):
        raise ValueError(f'proba {proba.shape} needs one column per class '
                         f'({len(class_names)} names)')
    y_pred = proba.argmax(-1)
    labels = list(range(len(class_names)))
    rep = skm.classification_report(y_true, y_pred, labels=labels, output_dict=True,
                                    zero_division=0)
    class_metrics = {}
    for i, name in enumerate(class_names):
        r = rep[str(i)]
        class_metrics[str(name)] = dict(precision=r['precision'], recall=r['recall'],
                                        f1_score=r['f1-score'], support=float(r['support']))
    perf = metrics.compute(y_true, proba, names=('accuracy', 'macro_f1'))
    agg = {}
    for k in ('macro avg', 'weighted avg'):
        r = rep[k]
        agg[k] = dict(precision=r['precision'], recall=r['recall'], f1_score=r['f1-score'],
                      support=float(r['support']))
    agg['macro avg']['f1_score'] = perf['macro_f1']
    block: dict[str, Any] = dict(
        performance=dict(accuracy=perf['accuracy'], macro_f1=perf['macro_f1']),
        class_metrics=class_metrics, aggregated_metrics=agg)
    if cv:
        block['performance']['cross_validation'] = cv
    fa: dict[str, Any] = {}
    if coef is not None:
        coef = np.asarray(coef, np.float64)
        fa['importance_scores'] = coef.T.tolist()  # MOSAIC: [classes, features]
        score = np.abs(coef).max(axis=1)
        top = np.argsort(-score)[:top_k]
        fa['top_features'] = [dict(index=int(i), score=float(score[i]), name=f'Feature {i}')
                              for i in top]
    if len(class_names) == 2:
        fpr, tpr, _ = skm.roc_curve(y_true, proba[:, 1])
        fa['roc_analysis'] = dict(fpr=fpr.tolist(), tpr=tpr.tolist())
    block['feature_analysis'] = fa
    return block


def tree_block(tree, y_true: np.ndarray, y_pred: np.ndarray, class_names: list,
               top_k: int = 10) -> dict:
    """MOSAIC's `models.decisionTree` block from a fitted sklearn DecisionTreeClassifier.

    Args:
      y_true, y_pred: int[N] test labels and tree predictions in 0..len(class_names)-1.
    """
    t = tree.tree_
    imp = tree.feature_importances_
    top = np.argsort(-imp)[:top_k]
    # One-hot "probabilities" whose argmax is y_pred: the metrics module's definitions.
    onehot = np.eye(len(class_names))[np.asarray(y_pred)]
    perf = metrics.compute(y_true, onehot, names=('accuracy', 'macro_f1'))
    return dict(
        performance=perf,
        feature_analysis=dict(
            top_features=[dict(index=int(i), score=float(imp[i]), name=f'Feature {i}')
                          for i in top if imp[i] > 0]),
        tree_structure=dict(
            topology=dict(children_left=t.children_left.tolist(),
                          children_right=t.children_right.tolist(),
                          feature_indices=t.feature.tolist(),
                          feature_names=[f'Feature {i}' for i in t.feature.tolist()]),
            node_data=dict(thresholds=t.threshold.tolist(), samples=t.n_node_samples.tolist(),
                           impurity=t.impurity.tolist(), values=t.value.tolist())),
        class_names=[str(c) for c in class_names])


@dataclasses.dataclass(frozen=True)
class RunMeta:
    """What the `metadata` block of every result JSON records about the run: read from the
    config once (`from_config`), so writing results never sees the config itself."""
    model_path: str
    layers: tuple[int, ...]
    top_n: tuple[int, ...]
    Cs: tuple[float, ...]
    layer_convention: str
    fractions: tuple[float, ...]
    seed: int
    cv_folds: int
    binarize_threshold: float
    config: dict = dataclasses.field(default_factory=dict)  # the resolved config, verbatim

    @classmethod
    def from_config(cls, config) -> 'RunMeta':
        return cls(model_path=config.model.path, layers=tuple(int(l) for l in config.layers),
                   top_n=tuple(int(n) for n in config.features.top_n),
                   Cs=tuple(float(c) for c in config.probe.Cs),
                   layer_convention=config.model.layer_convention,
                   fractions=tuple(float(f) for f in config.data.fractions),
                   seed=int(config.seed), cv_folds=int(config.cv_folds),
                   binarize_threshold=float(config.features.threshold),
                   config=config.to_dict())


def metadata(run: RunMeta, *, dataset: str, layer: int, width: str, hidden: bool,
             class_names: list, extra: dict) -> dict:
    """MOSAIC's `metadata` block, with the resolved config and our fields added."""
    frac = run.fractions
    return dict(
        model=dict(name=run.model_path, layer=layer, type='llm'),
        dataset=dict(name=dataset, hidden=hidden),
        training=dict(test_size=frac[2], val_size=frac[1], random_state=run.seed,
                      cv_folds=run.cv_folds),
        args=dict(model_name=run.model_path, layer=','.join(map(str, run.layers)),
                  width=width, dataset_name=dataset, top_n=list(run.top_n),
                  linear_c_values=list(run.Cs), layer_convention=run.layer_convention),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        class_names=[str(c) for c in class_names],
        mosaic_jax=dict(config=run.config, versions=package_versions(), seed=run.seed,
                        **extra))


def write_json(folder: str, name: str, obj: dict) -> str:
    path = os.path.join(folder, name)
    checkpoint.atomic_write_json(path, obj)
    return path


SUMMARY_METRICS = ('macro_f1', 'accuracy', 'roc_auc')  # write_summary's default metrics
SUMMARY_IDENTITY = ('dataset', 'layer', 'width', 'kind', 'variant', 'pooling', 'binarized',
                    'top_n', 'k', 'selected', 'seed', 'C')
SUMMARY_TAIL = ('select_score', 'n_train', 'n_test', 'seconds')
# Short column titles in format_table; other metrics are titled by their name.
TABLE_TITLES = {'macro_f1': 'macroF1', 'accuracy': 'acc', 'roc_auc': 'AUC',
                'balanced_accuracy': 'balAcc', 'macro_f1_present': 'F1pres'}


def summary_fields(metric_names=SUMMARY_METRICS) -> tuple[str, ...]:
    """summary.csv columns: identity columns and C, then per metric `m, m_lo, m_hi`
    (its bootstrap interval), then n_train, n_test, seconds."""
    cols = [c for m in metric_names for c in (m, f'{m}_lo', f'{m}_hi')]
    return SUMMARY_IDENTITY + tuple(cols) + SUMMARY_TAIL


SUMMARY_FIELDS = summary_fields()


def _cell(v, float_format: str = '.4f') -> str:
    """A CSV value: floats as `float_format` (4 decimals; NaN stays 'nan'), None empty."""
    if v is None:
        return ''
    if isinstance(v, (float, np.floating)):
        return format(float(v), float_format)
    return str(v.item() if isinstance(v, np.generic) else v)


def write_summary(path: str, rows: list[dict], metric_names=SUMMARY_METRICS) -> None:
    """One CSV row per probe / baseline: `summary_fields(metric_names)`, then every other
    key a row has (`train_group`, `regime`, ...) in order of first appearance; the arrays
    a row carries (`PREDICTIONS` keys) go to `write_predictions` instead."""
    write_csv(path, [{k: v for k, v in r.items() if k not in PREDICTIONS} for r in rows],
              summary_fields(metric_names))


# ----------------------------------------------------------------------------------------
# Test predictions per summary row (the paired statistics of probing/paired.py need them)
# ----------------------------------------------------------------------------------------

# Row keys holding a row's test labels int[N] and class probabilities f32[N, C].
Y_TEST, PROBA = '_y_test', '_test_proba'
PREDICTIONS = (Y_TEST, PROBA)
# The summary columns that tell two rows of one dataset apart (cells as summary.csv has them).
PREDICTION_KEY = ('kind', 'layer', 'width', 'variant', 'k', 'seed', 'train_group', 'regime',
                  'setting')


def prediction_key(row: dict) -> str:
    """The npz key of a row: its PREDICTION_KEY cells, the same from a row in memory and
    from its summary.csv line."""
    return '|'.join(_cell(row.get(c)) for c in PREDICTION_KEY)


def predictions_path(run_folder: str, dataset: str) -> str:
    """<run>/predictions/<dataset>.npz: every row's test labels and probabilities."""
    return os.path.join(run_folder, 'predictions', f'{safe_name(dataset)}.npz')


def write_predictions(run_folder: str, rows: list[dict]) -> list[str]:
    """One npz per dataset of the rows that carry predictions: 'y/<key>' int[N] and
    'proba/<key>' float32[N, C] per `prediction_key`; returns the paths written."""
    per: dict[str, dict[str, np.ndarray]] = {}
    for r in rows:
        if PROBA in r:
            key = prediction_key(r)
            arrays = per.setdefault(str(r['dataset']), {})
            if f'y/{key}' in arrays:
                raise ValueError(f'two rows of {r["dataset"]} share the key {key!r}')
            arrays[f'y/{key}'] = np.asarray(r[Y_TEST], np.int64)
            arrays[f'proba/{key}'] = np.asarray(r[PROBA], np.float32)
    paths = []
    for ds, arrays in per.items():
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        paths.append(predictions_path(run_folder, ds))
        checkpoint.atomic_write_bytes(paths[-1], buf.getvalue())
    return paths


def read_predictions(run_folder: str, dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """prediction_key -> (y_test int[N], proba float32[N, C]) of one dataset ({} if none)."""
    path = predictions_path(run_folder, dataset)
    if not os.path.exists(path):
        return {}
    with np.load(path) as z:
        return {k[2:]: (z[k], z[f'proba/{k[2:]}']) for k in z.files if k.startswith('y/')}


SEED_KEY = ('dataset', 'kind', 'layer', 'width', 'variant')


def seed_summary(rows: list[dict], metric_names=SUMMARY_METRICS) -> list[dict]:
    """Mean and sample std (ddof=1) of every test metric over seeds, per method/variant.

    Returns:
      one dict per (dataset, kind, layer, width, variant): those keys, n_seeds,
      n_selected (seeds whose selection chose this row) and <m>_mean / <m>_std.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in SEED_KEY), []).append(r)
    out = []
    for key, rs in groups.items():
        agg = dict(zip(SEED_KEY, key), n_seeds=len(rs),
                   n_selected=sum(bool(r.get('selected')) for r in rs))
        for m in metric_names:
            v = np.asarray([float(r.get(m, np.nan)) for r in rs], np.float64)
            agg[f'{m}_mean'] = float(np.nanmean(v)) if np.isfinite(v).any() else np.nan
            agg[f'{m}_std'] = float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else np.nan
        out.append(agg)
    return out


def write_seed_summary(path: str, rows: list[dict], metric_names=SUMMARY_METRICS) -> None:
    """seeds.csv: `seed_summary` of a multi-seed run's rows."""
    fields = list(SEED_KEY) + ['n_seeds', 'n_selected'] + [
        f'{m}_{s}' for m in metric_names for s in ('mean', 'std')]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, restval='', extrasaction='ignore')
    w.writeheader()
    for r in seed_summary(rows, metric_names):
        w.writerow({k: _cell(v) for k, v in r.items()})
    checkpoint.atomic_write_text(path, buf.getvalue())


def _num(v) -> str:
    return f'{v:.3f}' if isinstance(v, (float, np.floating)) and np.isfinite(v) else '  -  '


def _with_interval(r: dict, m: str) -> str:
    """'0.812 [0.760, 0.861]' when r holds a finite m_lo and m_hi, else just the value."""
    lo, hi = r.get(f'{m}_lo'), r.get(f'{m}_hi')
    if all(isinstance(v, (float, np.floating)) and np.isfinite(v) for v in (lo, hi)):
        return f'{_num(r.get(m))} [{lo:.3f}, {hi:.3f}]'
    return _num(r.get(m))


def format_table(rows: list[dict], metric_names=SUMMARY_METRICS) -> str:
    """The summary printed at the end of a run: one line per probe / baseline, a column
    per metric; macro-F1 shows its bootstrap interval where the row has one."""
    shown = {m: (_with_interval if m == 'macro_f1' else (lambda r, k: _num(r.get(k))))
             for m in metric_names}
    cells = [{m: fn(r, m) for m, fn in shown.items()} for r in rows]
    widths = {m: max([len(TABLE_TITLES.get(m, m)), 6] + [len(c[m]) for c in cells])
              for m in metric_names}
    if 'macro_f1' in widths:
        widths['macro_f1'] = max(widths['macro_f1'], 8)  # the table's historic width
    head = f"{'dataset':<22} {'layer':>5} {'width':>6} {'kind':<9} {'variant':<16} " \
           f"{'C':>6}" + ''.join(f' {TABLE_TITLES.get(m, m):>{widths[m]}}'
                                 for m in metric_names)
    lines = [head, '-' * len(head)]
    for r, cell in zip(rows, cells):
        c = r.get('C')
        lines.append(f"{str(r['dataset'])[:22]:<22} {str(r.get('layer', '')):>5} "
                     f"{str(r.get('width', '')):>6} {r['kind']:<9} {str(r['variant'])[:16]:<16} "
                     f"{(f'{c:g}' if isinstance(c, float) else '-'):>6}"
                     + ''.join(f' {cell[m]:>{widths[m]}}' for m in metric_names))
    return '\n'.join(lines)


@dataclasses.dataclass
class VariantFiles:
    """What the two per-SAE result files of one dataset hold (see write_variant_files)."""
    run: RunMeta
    ds: Any                    # data.loading.LabeledTexts
    key: Any                   # variants.SAEKey
    y_test: np.ndarray
    best: Any                  # evaluation.ProbeResult of the chosen variant
    fitted: dict               # Variant -> ProbeResult
    tree: Any                  # evaluation.ProbeResult of the tree (choice: depth, leaf)
    hidden: dict               # pooling -> ProbeResult of the hidden baselines
    cv: dict                   # 'sae' / 'hidden' -> cross_validation block
    meta: dict                 # dataset facts: n_texts, n_tokens, split sizes, ...


def _coef(params) -> np.ndarray:
    """Probe weights on the raw feature space (standardisation undone): [F, C']."""
    return probe.raw_coef(params)[0]


def _sae_json(f: VariantFiles) -> dict:
    v = f.best.key
    names = f.ds.label_names
    extra = dict(best_variant=v.full_name, variant=v.name, C=f.best.C, pooling=v.pooling,
                 binarized=v.binarized, binarize_threshold=f.run.binarize_threshold,
                 top_n=v.top_n, probe_seconds=f.best.seconds, **f.meta)
    out = dict(
        metadata=metadata(f.run, dataset=f.ds.name, layer=f.key.layer, width=f.key.width,
                          hidden=False, class_names=names, extra=extra),
        models=dict(linearProbe=linear_probe_block(f.y_test, f.best.test_proba, names,
                                                   _coef(f.best.params), cv=f.cv.get('sae'))),
        variants={k.name: dict(C=r.C, val=r.val, test=r.test, seconds=r.seconds,
                               pooling=k.pooling, top_n=k.top_n, binarized=k.binarized)
                  for k, r in f.fitted.items()})
    out['models']['linearProbe']['performance']['intervals'] = _intervals(f.best.test)
    if f.tree is not None:
        t = f.tree
        block = tree_block(t.params, f.y_test, np.asarray(t.test_proba).argmax(-1), names)
        depth, leaf = t.choice
        block['performance'].update(intervals=_intervals(t.test), test=t.test, val=t.val)
        block['selection'] = dict(max_depth=depth, min_samples_leaf=leaf,
                                  refit='train+val')
        out['models']['decisionTree'] = block
    return out


def _intervals(test: dict) -> dict:
    """{metric: [lo, hi]} from a test dict holding <m>, <m>_lo, <m>_hi (95% bootstrap)."""
    return {k: [test[f'{k}_lo'], test[f'{k}_hi']] for k in test
            if f'{k}_lo' in test and f'{k}_hi' in test}


def _hidden_json(f: VariantFiles) -> dict:
    main = f.hidden.get('last') or next(iter(f.hidden.values()))
    names = f.ds.label_names
    out = dict(
        metadata=metadata(f.run, dataset=f.ds.name, layer=f.key.layer, width=f.key.width,
                          hidden=True, class_names=names,
                          extra=dict(C=main.C, pooling=main.key.pooling, **f.meta)),
        models=dict(linearProbe=linear_probe_block(f.y_test, main.test_proba, names,
                                                   _coef(main.params), cv=f.cv.get('hidden'))),
        variants={r.key.name: dict(C=r.C, val=r.val, test=r.test) for r in f.hidden.values()})
    out['models']['linearProbe']['performance']['intervals'] = _intervals(main.test)
    return out


def write_variant_files(folder: str, f: VariantFiles) -> None:
    """`sae_classifier_results.json` (+ `hidden_classifier_results.json` when hidden
    baselines ran) in MOSAIC's layout, plus every variant's validation and test scores."""
    write_json(folder, 'sae_classifier_results.json', _sae_json(f))
    if f.hidden:
        write_json(folder, 'hidden_classifier_results.json', _hidden_json(f))
