"""docs/claims.md + claims.json: the paper's claims, paired per dataset, counted across datasets.

  python -m mosaic_jax.experiments.claims --workdir=runs/benchmark --run_id=benchmark

Reads a finished run's summary.csv and predictions/ (a benchmark or a classify run). Every
number is a TEST macro-F1 of rows chosen on validation / CV (the run's `selected` marks),
never on test. Per claim, regime and dataset, A and B are compared by the paired bootstrap
of their difference on the same test rows (probing/paired.py): a win when the 95% interval
of Δ = A - B lies above 0, a loss when below, else a tie. Across datasets:
  * "A beats B" holds when the two-sided sign test on wins vs losses gives p < 0.05 with
    more wins, does not hold when p < 0.05 with more losses, else is inconclusive;
  * "A matches B" holds when the interval of the mean Δ lies within ±MATCH_MARGIN, does not
    hold when the sign test is significant (p < 0.05), else is inconclusive.
Each claim states the smallest mean Δ its datasets could detect (paired.min_detectable_delta).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from mosaic_jax import checkpoint
from mosaic_jax import results
from mosaic_jax.probing import paired

METRIC = 'macro_f1'
ALPHA = 0.05
MATCH_MARGIN = 0.02   # macro-F1: "matches" = mean Δ within ±2 points
N_RESAMPLES = 1000    # paired bootstrap per dataset (the runs' own intervals use 1000)


def _f(r: dict, k: str) -> float:
    return results.to_float(r.get(k))


def selected(rows: Sequence[dict]) -> dict | None:
    """The row the run marked `selected` among `rows` (one kind of one dataset), else the
    same choice made here (results.best_row: validation / CV, never test)."""
    marked = [r for r in rows if r.get('selected') == 'True']
    return marked[0] if len(marked) == 1 else results.best_row(marked or rows)


def _pick(rows, **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _hidden(d: list[dict], variant: str) -> dict | None:
    return results.best_row([r for r in _pick(d, kind='hidden') if r['variant'] == variant])


def _binarized_vs_sparse(d: list[dict]):
    """At the chosen SAE: its best binarized variant vs the 16-feature sparse probe."""
    sel = selected(_pick(d, kind='sae'))
    if sel is None:
        return None, None
    same = _pick(d, kind='sae', layer=sel['layer'], width=sel['width'], binarized='True')
    return results.best_row(same), results.best_row(
        _pick(d, kind='sparse', k='16', layer=sel['layer'], width=sel['width']))


def _width(d: list[dict]):
    """Layer 8: the 16k SAE's row with the variant chosen for 4k, vs that 4k row."""
    sel = results.best_row(_pick(d, kind='sae', layer='8', width='4k'))
    if sel is None:
        return None, None
    big = _pick(d, kind='sae', layer='8', width='16k', variant=sel['variant'])
    return (big[0] if big else None), sel


@dataclasses.dataclass(frozen=True)
class Claim:
    name: str
    pick: Callable[[list[dict]], tuple]   # one dataset + regime's rows -> (A row, B row)
    kind: str = 'beats'                   # 'beats' | 'matches'
    literature: str = ''                  # what MOSAIC / sae-probes report
    expected: str = ''                    # the verdict that agrees with it ('' = none)


_SAE_PROBES = ('sae-probes (Kantamneni et al. 2025) finds that SAE probes do not beat '
               'probes on the model\'s activations in any regime')
CLAIMS = (
    Claim('SAE probe beats the last-token hidden-state probe',
          lambda d: (selected(_pick(d, kind='sae')), _hidden(d, 'hidden_last')),
          literature='MOSAIC reports SAE-feature probes at or above hidden-state probes; '
          + _SAE_PROBES, expected='holds'),
    Claim('SAE probe beats the mean-pooled hidden-state probe',
          lambda d: (selected(_pick(d, kind='sae')), _hidden(d, 'hidden_mean')),
          literature='MOSAIC reports SAE-feature probes at or above hidden-state probes; '
          + _SAE_PROBES, expected='holds'),
    Claim('SAE probe beats TF-IDF',
          lambda d: (selected(_pick(d, kind='sae')), selected(_pick(d, kind='tfidf')))),
    Claim('binarized features match a 16-feature sparse probe (A: binarized, B: k=16)',
          _binarized_vs_sparse, kind='matches'),
    Claim('16k width beats 4k at layer 8 (same pooling as the 4k choice)', _width),
)


def regime_name(r: dict) -> str:
    """'standard' (also for classify runs, which have no regime), 'scarcity=16', ..."""
    regime, setting = r.get('regime') or 'standard', r.get('setting') or ''
    return f'{regime}={float(setting):g}' if setting else regime


def verdict(claim: Claim, a: paired.Across) -> str:
    if not a.datasets:
        return 'no data'
    significant = a.sign_test_p < ALPHA
    if claim.kind == 'matches':
        if -MATCH_MARGIN <= a.mean_delta_lo and a.mean_delta_hi <= MATCH_MARGIN:
            return 'holds'
        return 'does not hold' if significant else 'inconclusive'
    if significant and a.wins != a.losses:
        return 'holds' if a.wins > a.losses else 'does not hold'
    return 'inconclusive'


def _groups(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """regime name -> dataset -> rows (the first seed of each dataset only)."""
    first = {}
    for r in rows:
        first.setdefault(r['dataset'], r.get('seed', ''))
    out: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        if r.get('seed', '') == first[r['dataset']]:
            out.setdefault(regime_name(r), {}).setdefault(r['dataset'], []).append(r)
    return out


def evaluate(rows: list[dict], predictions: Callable[[str], dict]) -> list[dict]:
    """Per claim and regime the claims.json record (module docstring), with the per-dataset
    paired Δs. `predictions(dataset)` is results.read_predictions of the run."""
    groups = _groups(rows)
    cache: dict[str, dict] = {}
    out = []
    for claim in CLAIMS:
        for regime, per_ds in groups.items():
            deltas, per = [], []
            for ds, d in per_ds.items():
                a, b = claim.pick(d)
                if a is None or b is None:
                    continue
                stored = cache.setdefault(ds, predictions(ds))
                ka, kb = results.prediction_key(a), results.prediction_key(b)
                if ka not in stored or kb not in stored:
                    continue
                (ya, pa), (yb, pb) = stored[ka], stored[kb]
                if not np.array_equal(ya, yb):
                    raise ValueError(f'{ds}: A and B were tested on different rows')
                p = paired.paired_delta(ya, pa, pb, metric=METRIC, n_resamples=N_RESAMPLES)
                deltas.append(p)
                per.append(dict(dataset=ds, delta=p.delta, delta_lo=p.lo, delta_hi=p.hi,
                                outcome=p.outcome, a=_f(a, METRIC), b=_f(b, METRIC)))
            acr = paired.across(deltas)
            half = [(p.hi - p.lo) / 2 for p in deltas]
            out.append(dict(claim=claim.name, regime=regime, datasets=acr.datasets,
                            wins=acr.wins, ties=acr.ties, losses=acr.losses,
                            sign_test_p=acr.sign_test_p, wilcoxon_p=acr.wilcoxon_p,
                            mean_delta=acr.mean_delta, mean_delta_lo=acr.mean_delta_lo,
                            mean_delta_hi=acr.mean_delta_hi,
                            min_detectable_delta=acr.min_detectable,
                            median_dataset_halfwidth=float(np.median(half)) if half else None,
                            verdict=verdict(claim, acr), per_dataset=per))
    return out


def _num(v, fmt='.3f') -> str:
    return format(v, fmt) if v is not None and np.isfinite(v) else '-'


def markdown(records: list[dict], source: str, run_info: str = '') -> str:
    lines = ['# The paper\'s claims on Gemma 3 270M (offline) and our SAEs', '',
             f'Generated by `python -m mosaic_jax.experiments.claims` from `{source}`'
             + (f' ({run_info})' if run_info else '') + '. Test macro-F1 of rows chosen on '
             'validation / CV; per dataset A and B are compared by the paired bootstrap of '
             'Δ = A - B on the same test rows (win / loss: the 95% interval excludes 0); '
             'across datasets by the sign test on wins vs losses (ties left out) and the mean '
             'Δ with an interval from resampling datasets (see '
             '`mosaic_jax/experiments/claims.py`). Figures: `claims_win_rates.png`, '
             '`claims_deltas.png`; numbers: `claims.json`.', '']
    for claim in CLAIMS:
        recs = [r for r in records if r['claim'] == claim.name and r['datasets']]
        std = next((r for r in recs if r['regime'] == 'standard'), recs[0] if recs else None)
        head = std['verdict'] if std else 'no data'
        lines += [f'## {claim.name}: **{head}**', '']
        if claim.literature:
            agree = ('agrees with MOSAIC' if head == claim.expected else
                     'neither confirms nor refutes either' if head in ('inconclusive', 'no data')
                     else 'disagrees with MOSAIC and sides with sae-probes')
            lines += [f'Literature: {claim.literature}. Ours ({std["regime"] if std else "-"}'
                      f'): **{head}**, which {agree}.', '']
        if not recs:
            lines += ['No dataset of this run has both A and B.', '']
            continue
        lines += [f"Smallest mean Δ these {std['datasets']} datasets could detect (5% level, "
                  f"80% power): {_num(std['min_detectable_delta'])}; median half-width of a "
                  f"single dataset's Δ interval: {_num(std['median_dataset_halfwidth'])}.", '',
                  '| regime | datasets | wins / ties / losses | sign test p | Wilcoxon p | '
                  'mean Δ [95%] | verdict |', '|---|---|---|---|---|---|---|']
        for r in recs:
            lines.append(f"| {r['regime']} | {r['datasets']} | {r['wins']} / {r['ties']} / "
                         f"{r['losses']} | {_num(r['sign_test_p'], '.3g')} | "
                         f"{_num(r['wilcoxon_p'], '.3g')} | {_num(r['mean_delta'], '+.3f')} "
                         f"[{_num(r['mean_delta_lo'], '+.3f')}, "
                         f"{_num(r['mean_delta_hi'], '+.3f')}] | {r['verdict']} |")
        lines += ['', f"Per dataset ({std['regime']}):", '',
                  '| dataset | A | B | Δ [95%] | outcome |', '|---|---|---|---|---|']
        for p in sorted(std['per_dataset'], key=lambda p: -p['delta']):
            lines.append(f"| {p['dataset']} | {_num(p['a'])} | {_num(p['b'])} | "
                         f"{p['delta']:+.3f} [{p['delta_lo']:+.3f}, {p['delta_hi']:+.3f}] | "
                         f"{p['outcome']} |")
        lines.append('')
    return '\n'.join(lines)


def _run_info(folder: str) -> str:
    """The run's wall time and machine, from benchmark.json / timings.json when present."""
    for name, key in (('benchmark.json', 'wall_seconds'), ('timings.json', 'total')):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            info = checkpoint.read_json(path)
            machine = info.get('machine', '') if isinstance(info, dict) else ''
            return f'wall time {info[key] / 60:.1f} min' + (f' on {machine}' if machine else '')
    return ''


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--workdir', required=True)
    p.add_argument('--run_id', required=True)
    p.add_argument('--model', default='google_gemma-3-270m')
    p.add_argument('--out', default='docs/claims.md')
    a = p.parse_args(argv)
    folder = results.run_folder(a.workdir, a.model, a.run_id)
    path = os.path.join(folder, 'summary.csv')
    if not os.path.exists(path):
        raise SystemExit(f'error: no summary at {path}; run configs/benchmark.py first')
    records = evaluate(results.read_csv(path), lambda ds: results.read_predictions(folder, ds))
    out_dir = os.path.dirname(os.path.abspath(a.out))
    checkpoint.atomic_write_json(os.path.join(out_dir, 'claims.json'), records)
    from mosaic_jax.report import claims_plots  # matplotlib only when writing figures
    claims_plots.write(records, out_dir)
    checkpoint.atomic_write_text(a.out, markdown(records, path, _run_info(folder)))
    return a.out


if __name__ == '__main__':
    print(main())
