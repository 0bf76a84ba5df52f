"""The claims figures as sae-probes draws them: win rates per regime, Δ per dataset sorted.

Both take claims.json records (experiments/claims.py: per claim and regime the wins / ties /
losses and the per-dataset paired Δ with its 95% interval).
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from mosaic_jax.report import plots

OUTCOME_COLORS = (('wins', 'tab:green'), ('ties', 'lightgray'), ('losses', 'tab:red'))


def _short(name: str, n: int = 38) -> str:
    return plots._mpl(name if len(name) <= n else name[:n - 1] + '…')


def win_rates(records: list[dict]) -> Figure | None:
    """One panel per claim: per regime the fraction of datasets A wins / ties / loses."""
    claims = list(dict.fromkeys(r['claim'] for r in records if r['datasets']))
    if not claims:
        return None
    fig = plots._figure(4.2 * len(claims), 3.6)
    axes = fig.subplots(1, len(claims), squeeze=False)[0]
    for ax, claim in zip(axes, claims):
        recs = [r for r in records if r['claim'] == claim and r['datasets']]
        x = np.arange(len(recs))
        bottom = np.zeros(len(recs))
        for key, color in OUTCOME_COLORS:
            share = np.asarray([r[key] / r['datasets'] for r in recs])
            ax.bar(x, share, bottom=bottom, color=color, label=key)
            bottom += share
        ax.set_xticks(x, [plots._mpl(r['regime']) for r in recs], rotation=45, ha='right',
                      fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(_short(claim), fontsize=9)
    axes[0].set_ylabel('fraction of datasets (A vs B)')
    axes[0].legend(fontsize=8, loc='lower left')
    return fig


def deltas(record: dict) -> Figure | None:
    """Δ = A - B per dataset, sorted, with its paired 95% interval; colour = outcome."""
    if not record['per_dataset']:
        return None
    fig = plots._figure(_width(record), 3.4)
    _draw_deltas(fig, record)
    return fig


def _width(record: dict) -> float:
    return max(5.0, 0.12 * len(record['per_dataset']) + 2.0)


def write(records: list[dict], folder: str) -> list[str]:
    """claims_win_rates.png and claims_deltas.png (the standard regime, one panel per
    claim with data) in `folder`; returns the paths written."""
    out = []
    fig = win_rates(records)
    if fig is not None:
        out.append(os.path.join(folder, 'claims_win_rates.png'))
        plots.write_png(fig, out[-1])
    std = [r for r in records if r['regime'] == 'standard' and r['per_dataset']]
    if std:
        big = plots._figure(max(_width(r) for r in std), 3.4 * len(std))
        for sub, r in zip(big.subfigures(len(std), 1, squeeze=False)[:, 0], std):
            _draw_deltas(sub, r)
        out.append(os.path.join(folder, 'claims_deltas.png'))
        plots.write_png(big, out[-1])
    return out


def _draw_deltas(sub, record: dict) -> None:
    """The sorted-Δ panel of one record on a Figure or SubFigure."""
    per = sorted(record['per_dataset'], key=lambda p: p['delta'])
    ax = sub.subplots()
    x = np.arange(len(per))
    d = np.asarray([p['delta'] for p in per])
    err = np.asarray([[p['delta'] - p['delta_lo'] for p in per],
                      [p['delta_hi'] - p['delta'] for p in per]])
    colors = {'win': 'tab:green', 'tie': 'gray', 'loss': 'tab:red'}
    ax.errorbar(x, d, yerr=err, fmt='none', ecolor='lightgray', lw=1)
    ax.scatter(x, d, c=[colors[p['outcome']] for p in per], s=12, zorder=3)
    ax.axhline(0, color='black', lw=0.8)
    ax.set_xticks([])
    ax.set_xlabel(f"{len(per)} datasets, sorted by Δ")
    ax.set_ylabel('Δ macro-F1 (A - B)')
    ax.set_title(f"{_short(record['claim'], 60)} ({plots._mpl(record['regime'])}): "
                 f"{record['wins']} / {record['ties']} / {record['losses']}", fontsize=9)
