"""Cross-group (e.g. cross-lingual) transfer: train on some groups, test on every group.

For a grouped dataset (`LabeledTexts.groups`, from `data.group_field` or combined parts)
and each training group g (config.data.train_groups, default every group):
  * probes train and choose (C, variant) on g's train / val rows of the one
    duplicate-safe split of the whole dataset;
  * they are scored on g's own test rows and on ALL rows of every other group h, except
    rows whose normalised text also occurs in g's train / val rows (logged);
  * per class, the share of the probe's top-k features that stay top-k when the chosen
    variant is refitted (same C) on h's train rows: how language-specific the features are.
Returns the rows of `_runs/<run_id>/transfer.csv` and `feature_overlap.csv` (written by
`results.write_csv`, columns `TRANSFER_FIELDS` / `OVERLAP_FIELDS`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from absl import logging
import numpy as np

from mosaic_jax.data import splits as splits_lib
from mosaic_jax.probing import evaluation
from mosaic_jax.probing import probe
from mosaic_jax.probing.evaluation import ProbeOptions, ProbeResult

TRANSFER_FIELDS = ('dataset', 'train_group', 'test_group', 'layer', 'width', 'kind', 'variant',
                   'top_n', 'macro_f1', 'macro_f1_lo', 'macro_f1_hi', 'accuracy', 'n_test',
                   'select_score')
OVERLAP_FIELDS = ('dataset', 'train_group', 'refit_group', 'layer', 'width', 'variant',
                  'class', 'k', 'overlap')
TOP_K = 10  # features per class compared between groups


@dataclasses.dataclass(frozen=True)
class GroupRows:
    """Rows of one training group and the test rows of every group."""
    train_group: str
    splits: tuple               # (train, val, own test) rows of the training group
    tests: dict                 # test group -> rows it is scored on
    refit: dict                 # other group -> its train rows (feature overlap refits)


def group_rows(groups: Sequence[str], texts: Sequence[str], split, train_group: str
               ) -> GroupRows:
    """The rows a training group trains, chooses and is tested on (see module docstring)."""
    g = np.asarray(groups)
    tr, va, te = (np.asarray(a) for a in split)
    mine = lambda rows: rows[g[rows] == train_group]  # noqa: E731
    seen = {splits_lib.normalise_text(texts[i]) for i in np.concatenate([mine(tr), mine(va)])}
    tests = {train_group: mine(te)}
    refit = {}
    for h in sorted(set(g.tolist()) - {train_group}):
        rows = np.flatnonzero(g == h)
        keep = np.asarray([splits_lib.normalise_text(texts[i]) not in seen for i in rows], bool)
        if (~keep).any():
            logging.info('transfer %s -> %s: %d test rows skipped (their text is in %s '
                         'training rows)', train_group, h, int((~keep).sum()), train_group)
        tests[h] = rows[keep]
        refit[h] = tr[g[tr] == h]
    return GroupRows(train_group, (mine(tr), mine(va), mine(te)), tests, refit)


def _scores(y, proba, rows, opts: ProbeOptions) -> dict:
    return evaluation.test_scores(y[rows], proba, opts) if len(rows) else {}


def transfer_rows(res: ProbeResult, predict, y: np.ndarray, gr: GroupRows, opts: ProbeOptions,
                  **ident) -> list[dict]:
    """One transfer.csv row per test group for one fitted method.

    Args:
      predict: rows -> proba [len(rows), C] of the fitted method.
      ident: dataset, layer, width, kind, variant, top_n.
    """
    out = []
    for h, rows in gr.tests.items():
        if len(rows) == 0:
            continue
        out.append(dict(ident, train_group=gr.train_group, test_group=h, n_test=len(rows),
                        select_score=res.val.get(opts.headline, float('nan')),
                        **_scores(y, predict(rows), rows, opts)))
    return out


def top_features(coef: np.ndarray, k: int = TOP_K) -> list[set]:
    """Per class, the k features with the largest weight towards it.

    Args:
      coef: [F, C'] raw-space weights (C' = 1 for binary: class 1 is +w, class 0 is -w).
    """
    cols = [-coef[:, 0], coef[:, 0]] if coef.shape[1] == 1 else [coef[:, c] for c in
                                                                 range(coef.shape[1])]
    return [set(np.argsort(-c, kind='stable')[:k].tolist()) for c in cols]


def feature_overlap(res: ProbeResult, x: np.ndarray, y: np.ndarray, gr: GroupRows,
                    opts: ProbeOptions, class_names: Sequence[str], num_classes: int,
                    **ident) -> list[dict]:
    """Top-k features per class of the probe vs the same variant refitted on each group."""
    base = top_features(probe.raw_coef(res.params)[0])
    out = []
    for h, rows in gr.refit.items():
        if len(np.unique(y[rows])) < 2:
            logging.warning('feature overlap: group %s has one class in train; skipped', h)
            continue
        p = probe.fit(np.asarray(x[rows], np.float32), y[rows], num_classes=num_classes,
                      C=res.C, **opts.fit_kwargs())
        other = top_features(probe.raw_coef(p)[0])
        for c, (a, b) in enumerate(zip(base, other)):
            out.append(dict(ident, train_group=gr.train_group, refit_group=h,
                            **{'class': class_names[c]}, k=TOP_K, overlap=len(a & b) / TOP_K))
    return out


def train_groups(groups: Sequence[str], requested: Sequence[str]) -> list[str]:
    """The training groups of a run: `requested`, checked, or every group."""
    present = sorted(set(groups))
    bad = [g for g in requested if g not in present]
    if bad:
        raise ValueError(f'data.train_groups {bad} not in the data; groups: {present}')
    if len(present) < 2:
        raise ValueError(f'a transfer run needs >= 2 groups; found {present}')
    return list(requested) or present

