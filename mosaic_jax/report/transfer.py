"""The report's transfer section: train-group x test-group macro-F1 heat maps.

Reads `_runs/<run_id>/transfer.csv` (transfer.py). Per dataset and kind (sae / hidden /
tfidf), each training group's method is the one with the best `select_score` (its own
validation split, never a test group); its test macro-F1 on every group fills one row.
"""
from __future__ import annotations

import os

import numpy as np

from mosaic_jax import results
from mosaic_jax.report import plots as report_plots

KINDS = ('sae', 'hidden', 'tfidf')


def matrices(rows: list[dict]) -> dict[tuple[str, str], tuple[list, list, np.ndarray]]:
    """(dataset, kind) -> (train groups, test groups, macro-F1 [train, test])."""
    out = {}
    for ds in dict.fromkeys(r['dataset'] for r in rows):
        for kind in KINDS:
            mine = [r for r in rows if r['dataset'] == ds and r['kind'] == kind]
            if not mine:
                continue
            trains = sorted({r['train_group'] for r in mine})
            tests = sorted({r['test_group'] for r in mine})
            m = np.full((len(trains), len(tests)), np.nan)
            for i, g in enumerate(trains):
                cand = [r for r in mine if r['train_group'] == g]
                best = results.best_row(cand)  # chosen on g's validation rows, never test
                if best is None:
                    continue
                key = (best['layer'], best['width'], best['variant'])
                for r in cand:
                    if (r['layer'], r['width'], r['variant']) == key:
                        m[i, tests.index(r['test_group'])] = results.to_float(r['macro_f1'])
            out[ds, kind] = (trains, tests, m)
    return out


def plot(trains, tests, m, title: str):
    fig = report_plots._figure(1.2 + 0.8 * len(tests), 1.0 + 0.5 * len(trains))
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=0, vmax=1, cmap='viridis')
    ax.set_xticks(range(len(tests)), [report_plots._mpl(t) for t in tests])
    ax.set_yticks(range(len(trains)), [report_plots._mpl(t) for t in trains])
    ax.set_xlabel('test group')
    ax.set_ylabel('train group')
    for (i, j), v in np.ndenumerate(m):
        if np.isfinite(v):
            ax.text(j, i, f'{v:.2f}', ha='center', va='center', color='w', fontsize=8)
    ax.set_title(report_plots._mpl(title), fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def section(page, run_folder: str) -> None:
    """Adds the heat maps of a run's transfer.csv to `page` (nothing when absent)."""
    path = os.path.join(run_folder, 'transfer.csv')
    if not os.path.exists(path):
        return
    rows = results.read_csv(path)
    page.add('<h3>Transfer: train group x test group (test macro-F1)</h3>')
    for (ds, kind), (trains, tests, m) in matrices(rows).items():
        page.figure(plot(trains, tests, m, f'{ds}: {kind}'), f'transfer-{ds}-{kind}',
                    f'{ds} {kind} transfer heat map', '')
