"""The report's matplotlib figures: object API with the Agg canvas, no pyplot global state.

Every plot takes typed summary rows (`report._parse_row`: 'kind', 'variant', 'layer',
'width', 'pooling', 'top_n', 'binarized', '<metric>', '<metric>_lo', '<metric>_hi') and
returns a Figure, or None when there is nothing to draw. Rows with a finite
'<metric>_lo' and '<metric>_hi' get error bars; rows without them are drawn as before.
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mosaic_jax import checkpoint
from mosaic_jax import variants

METRIC = 'macro_f1'  # the paper's headline metric: what every plot shows
MAX_BAR_CLASSES = 6  # classes drawn in the feature bar chart (the report's table lists all)
HIDDEN_VARIANTS = (('hidden_last', 's'), ('hidden_mean', 'D'))  # name, line marker
KIND_COLORS = {'sae': 'tab:blue', 'fused': 'tab:cyan', 'hidden': 'tab:orange',
               'tfidf': 'tab:gray', 'tree': 'tab:green', 'pixels': 'tab:brown'}
# Model-free baselines drawn as one line / bar each: TF-IDF (texts), pixels (images).
BASELINE_LABELS = {'tfidf': 'TF-IDF', 'pixels': 'pixels'}


def interval(row: dict, metric: str = METRIC) -> tuple[float, float] | None:
    """The row's (lo, hi) for `metric`, or None when the run recorded no finite interval."""
    lo, hi = row.get(f'{metric}_lo'), row.get(f'{metric}_hi')
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return None
    return lo, hi


def layer_sort(values) -> list:
    return sorted({v for v in values if v is not None})


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=100, layout='constrained')
    FigureCanvasAgg(fig)
    return fig


def _mpl(s: Any) -> str:
    return str(s).replace('$', r'\$')  # '$' pairs would start matplotlib mathtext


def _error_bars(ax, positions: list, rows: list[dict], color: str,
                horizontal: bool = False) -> None:
    """Draws [lo, hi] of METRIC at `positions` for the rows that have an interval."""
    pts = [(p, r[METRIC], interval(r)) for p, r in zip(positions, rows)
           if interval(r) is not None and not math.isnan(r[METRIC])]
    if not pts:
        return
    pos = [p for p, _, _ in pts]
    vals = [v for _, v, _ in pts]
    # Clipped at 0: matplotlib refuses negative lengths (an interval beside its estimate).
    err = np.array([[max(v - lo, 0.0), max(hi - v, 0.0)] for _, v, (lo, hi) in pts]).T
    if horizontal:
        ax.errorbar(vals, pos, xerr=err, fmt='none', ecolor=color, capsize=3, lw=1)
    else:
        ax.errorbar(pos, vals, yerr=err, fmt='none', ecolor=color, capsize=3, lw=1)


def _line(ax, pts: list[tuple[int, dict]], **kw) -> None:
    """One line of METRIC against layer, with its error bars where rows have intervals."""
    pts = sorted(pts, key=lambda p: p[0])
    xs, rows = [p[0] for p in pts], [p[1] for p in pts]
    (line,) = ax.plot(xs, [r[METRIC] for r in rows], **kw)
    _error_bars(ax, xs, rows, line.get_color())


def plot_by_layer(name: str, rows: list[dict],
                  cells: dict[tuple[int, str], dict]) -> Figure | None:
    """Test macro-F1 against layer: one line per SAE width, hidden baselines dashed.

    Args:
      name: the dataset (title).
      rows: all rows of the dataset (hidden and TF-IDF rows are drawn from these).
      cells: (layer, width) -> the selected probe row of that SAE.
    """
    if not cells:
        return None
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot()
    for width in sorted({w for _, w in cells}, key=variants.width_order):
        _line(ax, [(l, r) for (l, w), r in cells.items() if w == width], marker='o',
              label=_mpl(f'SAE {width}'))
    for variant, marker in HIDDEN_VARIANTS:
        pts = [(r['layer'], r) for r in rows if r['kind'] == 'hidden'
               and r['variant'] == variant and r['layer'] is not None]
        if pts:
            _line(ax, pts, ls='--', marker=marker, label=variant)
    for r in rows:
        if r['kind'] in BASELINE_LABELS and not math.isnan(r[METRIC]):
            color = KIND_COLORS[r['kind']]
            ax.axhline(r[METRIC], ls=':', color=color, label=BASELINE_LABELS[r['kind']])
            if interval(r):
                ax.axhspan(*interval(r), color=color, alpha=0.15, lw=0)
    ax.set_xticks(layer_sort(l for l, _ in cells))
    ax.set(xlabel='layer', ylabel='test macro-F1', title=_mpl(name))
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small', loc='best')
    return fig


def plot_bars(name: str, rows: list[dict], cells: dict[tuple[int, str], dict],
              kind: str = 'sae') -> Figure | None:
    """Horizontal bars: best SAE variant per layer/width, hidden baselines per layer, TF-IDF.

    Args:
      name: the dataset (title).
      rows: all rows of the dataset.
      cells: (layer, width) -> the selected `kind` row of that SAE.
      kind: 'sae' or 'fused', the probe kind of `cells` (bar colour).
    """
    bars = []
    for (layer, width), r in sorted(cells.items(), key=lambda kv: (
            kv[0][0], variants.width_order(kv[0][1]))):
        bars.append((f'SAE L{layer} {width} ({r["variant"]})', r, kind))
    for r in sorted((r for r in rows if r['kind'] == 'hidden'),
                    key=lambda r: (r['variant'], r['layer'] or 0)):
        bars.append((f"{r['variant']} L{r['layer']}", r, 'hidden'))
    bars += [(BASELINE_LABELS[r['kind']], r, r['kind']) for r in rows
             if r['kind'] in BASELINE_LABELS]
    if not bars:
        return None
    fig = _figure(6.4, 1.2 + 0.32 * len(bars))
    ax = fig.add_subplot()
    y = np.arange(len(bars))[::-1]  # first bar on top
    vals = np.array([b[1][METRIC] for b in bars], float)
    ax.barh(y, np.nan_to_num(vals), color=[KIND_COLORS[b[2]] for b in bars])
    _error_bars(ax, list(y), [b[1] for b in bars], 'black', horizontal=True)
    for yi, v, (_, r, _) in zip(y, vals, bars):
        right = max(np.nan_to_num(v), (interval(r) or (0.0, 0.0))[1])
        ax.text(right + 0.01, yi, '-' if math.isnan(v) else f'{v:.3f}', va='center',
                fontsize=8)
    ax.set_yticks(y, [_mpl(b[0]) for b in bars], fontsize=8)
    ax.set(xlim=(0, 1.15), xlabel='test macro-F1', title=_mpl(name))
    ax.grid(axis='x', alpha=0.3)
    return fig


def _pooling_label(r: dict) -> str:
    """A heatmap row: the pooling, with top_n when the run recorded one ('mosaic top20')."""
    return str(r['pooling']) + (f" top{r['top_n']}" if r.get('top_n') else '')


def plot_sparse_curve(name: str, rows: list[dict]) -> Figure | None:
    """Test macro-F1 of the k-sparse probes against k (log scale), one line per SAE
    (its chosen variant), each with its interval; None without sparse rows."""
    sparse = [r for r in rows if r['kind'] == 'sparse' and r.get('k')]
    if not sparse:
        return None
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot()
    for layer, width in sorted({(r['layer'], r['width']) for r in sparse}, key=str):
        mine = [(r['k'], r) for r in sparse if (r['layer'], r['width']) == (layer, width)]
        _line(ax, mine, marker='o', label=_mpl(f'layer {layer}, {width}'))
    ax.set_xscale('log')
    ax.set(xlabel='k (features kept)', ylabel='test macro-F1', title=_mpl(name))
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small', loc='best')
    return fig


def plot_heatmaps(name: str, rows: list[dict],
                  only: tuple[int, str] | None = None) -> Figure | None:
    """Test macro-F1 of every pooling x binarization, one panel per layer/width that has an
    SAE (a grid cell without one stays empty)."""
    rows = [r for r in rows if r['kind'] == 'sae'
            and (only is None or (r['layer'], r['width']) == only)]
    if not rows:
        return None
    layers = layer_sort(r['layer'] for r in rows)
    widths = sorted({r['width'] for r in rows}, key=variants.width_order)
    pools = list(dict.fromkeys(_pooling_label(r) for r in rows))
    bins = sorted({r['binarized'] for r in rows})
    vals = [r[METRIC] for r in rows if not math.isnan(r[METRIC])]
    vmin, vmax = (min(vals), max(vals)) if vals else (0.0, 1.0)
    fig = _figure(1.2 + 2.3 * len(widths) * max(1, len(bins)) / 2,
                  0.9 + (0.45 * len(pools) + 0.6) * len(layers))
    axes = fig.subplots(len(layers), len(widths), squeeze=False)
    present = {(r['layer'], r['width']) for r in rows}
    image = None
    for i, layer in enumerate(layers):
        for j, width in enumerate(widths):
            ax = axes[i][j]
            if (layer, width) not in present:  # no SAE of this width at this layer
                ax.set_visible(False)
                continue
            grid = np.full((len(pools), len(bins)), np.nan)
            for r in rows:
                if (r['layer'], r['width']) == (layer, width):
                    grid[pools.index(_pooling_label(r)), bins.index(r['binarized'])] = r[METRIC]
            image = ax.imshow(np.ma.masked_invalid(grid), vmin=vmin, vmax=vmax + 1e-9,
                              cmap='viridis', aspect='auto')
            for (a, b), v in np.ndenumerate(grid):
                if not math.isnan(v):
                    ax.text(b, a, f'{v:.3f}', ha='center', va='center', fontsize=8,
                            color='white' if v < (vmin + vmax) / 2 else 'black')
            ax.set_xticks(range(len(bins)), ['binarized' if b else 'raw' for b in bins],
                          fontsize=8)
            ax.set_yticks(range(len(pools)), [_mpl(p) for p in pools], fontsize=8)
            ax.set_title(_mpl(f'layer {layer}, {width}'), fontsize=9)
    fig.colorbar(image, ax=axes, label='test macro-F1', shrink=0.8)
    fig.suptitle(_mpl(name), fontsize=10)
    return fig


def plot_top_features(tops: dict[str, list[tuple[int, float]]], title: str) -> Figure | None:
    """Bars of the top probe weights of the first MAX_BAR_CLASSES classes."""
    classes = list(tops)[:MAX_BAR_CLASSES]
    if not classes:
        return None
    ncols = min(len(classes), 3)
    nrows = -(-len(classes) // ncols)
    fig = _figure(3.3 * ncols, 0.6 + 2.9 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(classes):]:
        ax.set_axis_off()
    for ax, c in zip(axes.flat, classes):
        feats = tops[c]
        y = np.arange(len(feats))[::-1]
        ax.barh(y, [w for _, w in feats], color='tab:blue')
        ax.set_yticks(y, [f'#{i}' for i, _ in feats], fontsize=8)
        ax.set_title(_mpl(f'class {c}'), fontsize=9)
        ax.set_xlabel('probe weight', fontsize=8)
        ax.tick_params(axis='x', labelsize=7)
    fig.suptitle(_mpl(title), fontsize=10)
    return fig


def write_png(fig: Figure, path: str) -> None:
    """The figure as a PNG at `path`, written atomically (checkpoint.atomic_write_bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    checkpoint.atomic_write_bytes(path, buf.getvalue())


def overlap_notes(heads: list[dict]) -> list[str]:
    """One sentence per other method: does its macro-F1 interval overlap the SAE probe's?

    The reference is the SAE probe row, or the fused probe's in a fused-only run. Returns
    [] when no headline row has an interval (runs that did not record them).
    """
    rows = [h['row'] for h in heads if h['row'] is not None]
    if not any(interval(r) for r in rows):
        return []
    ref = next((h for h in heads[:2] if h['row'] is not None
                and h['method'].startswith('SAE')), None)
    ref_iv = interval(ref['row']) if ref else None
    if ref_iv is None:
        return ['The SAE probe has no macro-F1 interval: no overlap check.']
    notes = []
    for h in heads:
        if h is ref or h['row'] is None:
            continue
        iv = interval(h['row'])
        if iv is None:
            notes.append(f"{h['method']}: no macro-F1 interval to compare.")
        elif iv[0] <= ref_iv[1] and ref_iv[0] <= iv[1]:
            notes.append(f"{h['method']} vs {ref['method']}: intervals overlap: "
                         f"the difference is within noise.")
        else:
            side = 'higher' if iv[0] > ref_iv[1] else 'lower'
            notes.append(f"{h['method']} vs {ref['method']}: no overlap ({h['method']} "
                         f"is {side}).")
    return notes
