"""Feature store: peak memory of whole runs at 1,000 vs 4,000 texts (store on / off, side
by side), a 65k-wide SAE (the shipped 16k SAE's features x 4) over 5,000 texts, and the
store's size on disk against dense float32. Real Gemma 3 270M, the real binary set 106_hate_hate (5,000 tweets).

  python bench/store_memory.py [--out bench/store_memory.json] [--skip_65k | --only_65k]

Each measurement is one `main.py` run in a fresh process, which reports its own peak RSS. The
runs share one persistent compile cache, so compile time does not differ between them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = 'sae_probes:106_hate_hate'
COMMON = ('--config=configs/gemma3_270m.py', f"--config.data.datasets=('{DATASET}',)",
          '--config.layers=(8,)', "--config.features.pooling=('mosaic','max','mean')",
          "--config.baselines=('hidden_last',)", '--config.cv_folds=0', '--config.report=False',
          '--config.n_bootstrap=200')


def _run(workdir: str, *extra: str) -> dict:
    """One run in a fresh process: wall seconds and the child's peak RSS (GiB)."""
    cmd = [sys.executable, '-c', _CHILD, *COMMON, f'--config.workdir={workdir}', *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f'run failed ({" ".join(extra)}):\n{r.stderr[-3000:]}')
    rss = float(r.stdout.strip().splitlines()[-1])
    return dict(args=list(extra), seconds=round(wall, 1), peak_rss_gib=round(rss / 2**30, 3))


# The child reports its own peak RSS (bytes) as the last stdout line.
_CHILD = '''
import resource, sys
sys.argv = ['main.py'] + sys.argv[1:]
from mosaic_jax import cli
try:
    cli.run()
except SystemExit as e:
    if e.code:
        raise
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
'''


def _wide_sae(folder: str, copies: int = 4) -> str:
    """A 65k-wide SAE with a real SAE's sparsity: the shipped layer-8 16k SAE's features,
    repeated `copies` times (a random SAE fires on most features of every text, which no
    trained SAE does, so it would measure dense storage, not this path), as params.npz."""
    from mosaic_jax.sae import loading as sae_loading  # pylint: disable=g-import-not-at-top
    p = sae_loading.load_sae(os.path.join(ROOT, 'checkpoints', 'gemma3_270m',
                                          'layer_8_width_16k'), d_model=640)
    tile = lambda a, axis: np.concatenate([np.asarray(a)] * copies, axis=axis)  # noqa: E731
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, 'params.npz'), W_enc=tile(p.w_enc, 1),
             b_enc=tile(p.b_enc, 0), threshold=tile(p.threshold, 0), W_dec=tile(p.w_dec, 0),
             b_dec=np.asarray(p.b_dec))
    return folder


def _store_size(root: str) -> dict:
    from mosaic_jax import store  # pylint: disable=g-import-not-at-top
    groups = store.describe(root)
    return dict(bytes=sum(g['bytes'] for g in groups),
                dense_float32=sum(g['dense_float32'] for g in groups),
                groups=[dict(what=g['info'].get('sae') or 'hidden', texts=g['texts'],
                             bytes=g['bytes'], dense_float32=g['dense_float32'])
                        for g in groups])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=os.path.join(ROOT, 'bench', 'store_memory.json'))
    ap.add_argument('--skip_65k', action='store_true')
    ap.add_argument('--only_65k', action='store_true', help='just the 65k / 5,000-text run')
    a = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for store_on in (() if a.only_65k else (True, False)):
            for n in (1000, 4000):
                tag = f"{'store' if store_on else 'memory'}_{n}"
                out[tag] = _run(os.path.join(tmp, tag), f'--config.data.max_rows={n}',
                                "--config.sae.widths=('16k',)",
                                f'--config.store.enabled={store_on}')
                print(tag, out[tag], flush=True)
        if not a.only_65k:
            for kind in ('store', 'memory'):
                out[f'{kind}_rss_ratio_4000_vs_1000'] = round(
                    out[f'{kind}_4000']['peak_rss_gib'] / out[f'{kind}_1000']['peak_rss_gib'],
                    3)
            out['store_size_4000_texts'] = _store_size(os.path.join(tmp, 'store_4000',
                                                                    '_features'))
        if not a.skip_65k:
            sae = _wide_sae(os.path.join(tmp, 'sae65k', 'layer_8_width_65k'))
            out['store_65k_5000'] = _run(
                os.path.join(tmp, 'w65k'), '--config.data.max_rows=5000',
                "--config.sae.widths=('65k',)", '--config.sae.exclude=()',
                f'--config.sae.source={os.path.dirname(sae)}/layer_{{layer}}_width_{{width}}')
            out['store_size_65k_5000_texts'] = _store_size(os.path.join(tmp, 'w65k',
                                                                        '_features'))
            print('65k', out['store_65k_5000'], flush=True)
    if (a.only_65k or a.skip_65k) and os.path.exists(a.out):
        with open(a.out) as f:  # a partial run updates its own entries only
            out = {**json.load(f), **out}
    with open(a.out, 'w') as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == '__main__':
    main()
