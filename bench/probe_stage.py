"""The probe stage against extraction, and compilation on a second identical run: the
demo config on 1,000 texts of the 4-class sae-probes set 102_twt_emotion.

  python bench/probe_stage.py [--texts 1000] [--out bench/probe_stage.json]

Two `main.py` runs of the same command in fresh processes and fresh workdirs (so the second
extracts again: the feature store is per workdir), sharing one new, empty persistent
compile cache. Every figure comes from the runs' own `timings.json`:
  probe_vs_extraction   <dataset>/probes / <dataset>/extract of the first run (target <= 0.2)
  probe_seconds         <dataset>/probes of the first run (target <= 30 s on 2 cores)
  compile_second_vs_first  <dataset>/compile of run 2 / run 1 (target <= 0.1)
plus each run's whole timings and wall seconds.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = 'sae_probes:102_twt_emotion'


def _run(workdir: str, cache: str, texts: int) -> dict:
    cmd = [sys.executable, 'main.py', '--config=configs/gemma3_270m.py',
           f"--config.data.datasets=('{DATASET}',)", f'--config.data.max_rows={texts}',
           f'--config.workdir={workdir}', f'--config.compile_cache={cache}']
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f'run failed:\n{r.stderr[-3000:]}')
    path, = glob.glob(os.path.join(workdir, '*', '_runs', '*', 'timings.json'))
    with open(path) as f:
        timings = json.load(f)
    return dict(wall_seconds=round(wall, 1), timings=timings)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--texts', type=int, default=1000)
    ap.add_argument('--out', default=os.path.join(ROOT, 'bench', 'probe_stage.json'))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, 'xla')
        runs = [_run(os.path.join(tmp, f'run{i}'), cache, a.texts) for i in (1, 2)]
    t1, t2 = (r['timings'] for r in runs)
    key = lambda stage: f'{DATASET}/{stage}'  # noqa: E731
    out = dict(dataset=DATASET, texts=a.texts, cpus=os.cpu_count(), runs=runs,
               probe_seconds=t1[key('probes')], extraction_seconds=t1[key('extract')],
               probe_vs_extraction=t1[key('probes')] / t1[key('extract')],
               compile_first=t1[key('compile')], compile_second=t2[key('compile')],
               compile_second_vs_first=t2[key('compile')] / max(t1[key('compile')], 1e-9))
    print(f"probe_vs_extraction {out['probe_vs_extraction']:.2f} (probes "
          f"{out['probe_seconds']:.1f} s, extraction {out['extraction_seconds']:.1f} s; "
          f"targets <= 0.20 and <= 30 s)")
    print(f"compile_second_vs_first {out['compile_second_vs_first']:.2f} "
          f"({out['compile_second']:.1f} s vs {out['compile_first']:.1f} s; target <= 0.10)")
    print(f"wall_seconds run 1 {runs[0]['wall_seconds']}, run 2 {runs[1]['wall_seconds']}")
    with open(a.out, 'w') as f:
        json.dump(out, f, indent=1)
    print(f'wrote {a.out}')


if __name__ == '__main__':
    main()
