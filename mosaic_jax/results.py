"""Results files in MOSAIC's dashboard layout, plus our additions.

  <workdir>/<model>/<dataset>/layer_<L>/<width>/<run_id>/sae_classifier_results.json
  <workdir>/<model>/<dataset>/layer_<L>/<width>/<run_id>/hidden_classifier_results.json
  <workdir>/<model>/_runs/<run_id>/{summary.csv, config.json, timings.json}

MOSAIC's keys (`metadata.{model,dataset,training,args,timestamp,class_names}`,
`models.linearProbe.{performance,class_metrics,aggregated_metrics,feature_analysis}`,
`models.decisionTree`) are kept; ours are added beside them (`variants`, `mosaic_jax`).
Every write is atomic (checkpoint.atomic_write_*).
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
import os
from typing import Any

import numpy as np
from sklearn import metrics as skm

from mosaic_jax import checkpoint

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


def run_dir(workdir: str, model: str, dataset: str, layer: int, width: str, run_id: str) -> str:
    return os.path.join(workdir, safe_name(model), safe_name(dataset), f'layer_{layer}',
                        str(width), run_id)


def linear_probe_block(y_true: np.ndarray, proba: np.ndarray, class_names: list,
                       coef: np.ndarray | None, *, cv: dict | None = None,
                       top_k: int = 10) -> dict:
    """MOSAIC's `models.linearProbe` block from test labels and probabilities.

    Args:
      y_true: int[N] test labels; proba: float[N, C].
      coef: float[F, C'] probe weights in the original feature space (C' = 1 binary).
    """
    y_pred = proba.argmax(-1)
    labels = list(range(len(class_names)))
    rep = skm.classification_report(y_true, y_pred, labels=labels, output_dict=True,
                                    zero_division=0)
    class_metrics = {}
    for i, name in enumerate(class_names):
        r = rep[str(i)]
        class_metrics[str(name)] = dict(precision=r['precision'], recall=r['recall'],
                                        f1_score=r['f1-score'], support=float(r['support']))
    agg = {}
    for k in ('macro avg', 'weighted avg'):
        r = rep[k]
        agg[k] = dict(precision=r['precision'], recall=r['recall'], f1_score=r['f1-score'],
                      support=float(r['support']))
    block: dict[str, Any] = dict(
        performance=dict(accuracy=float(skm.accuracy_score(y_true, y_pred))),
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
    """MOSAIC's `models.decisionTree` block from a fitted sklearn DecisionTreeClassifier."""
    t = tree.tree_
    imp = tree.feature_importances_
    top = np.argsort(-imp)[:top_k]
    return dict(
        performance=dict(accuracy=float(skm.accuracy_score(y_true, y_pred)),
                         macro_f1=float(skm.f1_score(y_true, y_pred, average='macro'))),
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


def metadata(config, *, dataset: str, layer: int, width: str, hidden: bool,
             class_names: list, extra: dict) -> dict:
    """MOSAIC's `metadata` block, with the resolved config and our fields added."""
    frac = tuple(config.data.fractions)
    return dict(
        model=dict(name=config.model.path, layer=layer, type='llm'),
        dataset=dict(name=dataset, hidden=hidden),
        training=dict(test_size=frac[2], val_size=frac[1], random_state=config.seed,
                      cv_folds=config.cv_folds),
        args=dict(model_name=config.model.path, layer=','.join(map(str, config.layers)),
                  width=width, dataset_name=dataset, top_n=config.features.top_n,
                  linear_c_values=list(config.probe.Cs),
                  layer_convention=config.model.layer_convention),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        class_names=[str(c) for c in class_names],
        mosaic_jax=dict(config=config.to_dict(), versions=package_versions(),
                        seed=config.seed, **extra))


def write_json(folder: str, name: str, obj: dict) -> str:
    path = os.path.join(folder, name)
    checkpoint.atomic_write_json(path, obj)
    return path


SUMMARY_FIELDS = ('dataset', 'layer', 'width', 'kind', 'variant', 'pooling', 'binarized', 'C',
                  'macro_f1', 'accuracy', 'roc_auc', 'n_train', 'n_test', 'seconds')


def write_summary(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction='ignore')
    w.writeheader()
    for r in rows:
        w.writerow({k: (f'{v:.4f}' if isinstance(v, float) else v) for k, v in r.items()})
    checkpoint.atomic_write_text(path, buf.getvalue())


def format_table(rows: list[dict]) -> str:
    """The summary printed at the end of a run: one line per probe / baseline."""
    head = f"{'dataset':<22} {'layer':>5} {'width':>6} {'kind':<9} {'variant':<16} " \
           f"{'C':>6} {'macroF1':>8} {'acc':>6} {'AUC':>6}"
    lines = [head, '-' * len(head)]
    for r in rows:
        def f(k):
            v = r.get(k)
            return f'{v:.3f}' if isinstance(v, float) and np.isfinite(v) else '  -  '
        c = r.get('C')
        lines.append(f"{str(r['dataset'])[:22]:<22} {str(r.get('layer', '')):>5} "
                     f"{str(r.get('width', '')):>6} {r['kind']:<9} {str(r['variant'])[:16]:<16} "
                     f"{(f'{c:g}' if isinstance(c, float) else '-'):>6} {f('macro_f1'):>8} "
                     f"{f('accuracy'):>6} {f('roc_auc'):>6}")
    return '\n'.join(lines)
