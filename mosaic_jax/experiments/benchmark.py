"""mode='benchmark': every classification dataset of the installed sae-probes collection,
sae-probes' regimes from one extraction per dataset (configs/benchmark.py).

  <run>/datasets/<dataset>.csv     the dataset's summary rows (its presence: done)
  <run>/predictions/<dataset>.npz  their test labels and probabilities (paired statistics)
  <run>/summary.csv                every finished dataset's rows, `regime` + `setting` columns
  <run>/benchmark.json             done / failed / skipped datasets, timings, texts per minute

Resumable: a dataset whose CSV exists is not recomputed, and the feature store serves the
texts of an interrupted one. A dataset (or one regime of it) that fails is logged, listed
in benchmark.json and skipped; it is never silently dropped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time

from absl import logging
import numpy as np

from mosaic_jax import checkpoint
from mosaic_jax import parallel
from mosaic_jax import results
from mosaic_jax.checks import UserError
from mosaic_jax.data import batching
from mosaic_jax.data import loading as data_loading
from mosaic_jax.data import splits as splits_lib
from mosaic_jax.experiments import assets
from mosaic_jax.experiments import experiment
from mosaic_jax.experiments import inputs
from mosaic_jax.experiments import probe_stage
from mosaic_jax.experiments import regimes as regimes_lib
from mosaic_jax.experiments.regimes import Kind, Regime

TASKS = {'binary': 'Binary Classification', 'multiclass': 'Multiclass Classification'}
CONTINUOUS = 'Continuous Data'
# Config fields a resumed run may change: which datasets it covers, and the run's report.
_RESUME_FREE = (('benchmark', 'datasets'), ('benchmark', 'tasks'), ('report',))


@dataclasses.dataclass(frozen=True)
class Options:
    """config.benchmark, checked."""
    tasks: tuple[str, ...]
    datasets: tuple[str, ...]           # () = every dataset of `tasks`
    regimes: regimes_lib.Options

    @classmethod
    def from_config(cls, config) -> 'Options':
        b = config.benchmark
        bad = [t for t in b.tasks if t not in TASKS]
        kinds = [k for k in b.regimes if k not in {k.value for k in Kind}]
        if bad or kinds or not b.tasks or not b.regimes:
            raise UserError(f'benchmark.tasks={tuple(b.tasks)} / benchmark.regimes='
                            f'{tuple(b.regimes)}: tasks from {sorted(TASKS)}, regimes from '
                            f'{[k.value for k in Kind]}, neither empty')
        opts = regimes_lib.Options(
            kinds=tuple(Kind(k) for k in b.regimes),
            train_sizes=tuple(int(n) for n in b.train_sizes),
            positive_fractions=tuple(float(f) for f in b.positive_fractions),
            noise_fractions=tuple(float(f) for f in b.noise_fractions),
            min_class_rows=int(config.probe.select_folds))
        subsampled = set(opts.kinds) - {Kind.STANDARD, Kind.OOD}
        if subsampled and config.probe.select != 'cv':
            raise UserError(f'benchmark.regimes {sorted(k.value for k in subsampled)} train '
                            'on a subsample without a validation split: use probe.select=cv')
        return cls(tuple(b.tasks), tuple(b.datasets), opts)


def plan(opts: Options) -> tuple[list[str], list[str]]:
    """(datasets to run, continuous-target datasets skipped) of the installed collection."""
    tasks = data_loading.sae_probes_tasks()
    if opts.datasets:
        unknown = [d for d in opts.datasets if d not in tasks]
        if unknown:
            raise UserError(f'benchmark.datasets: {unknown} are not sae-probes datasets')
        names = list(opts.datasets)
    else:
        names = list(tasks)
    wanted = {TASKS[t] for t in opts.tasks}
    return ([n for n in names if tasks[n] in wanted],
            [n for n in names if tasks[n] == CONTINUOUS])


def _dataset_csv(folder: str, name: str) -> str:
    return os.path.join(folder, 'datasets', f'{results.safe_name(name)}.csv')


def _check_resume(folder: str, config) -> None:
    """A run folder holds one benchmark: resuming with another config is refused."""
    def strip(d):
        d = json.loads(json.dumps(d, default=str))  # tuples -> lists, as config.json has them
        for *parents, leaf in _RESUME_FREE:
            node = d
            for p in parents:
                node = node.get(p, {})
            node.pop(leaf, None)
        return d
    path = os.path.join(folder, 'config.json')
    if os.path.exists(path) and strip(checkpoint.read_json(path)) != strip(config.to_dict()):
        raise UserError(f'{folder} holds a benchmark with another config; resume with the '
                        'same config or pass a new --config.run_id')


def _eta(done_s: list[float], left: int) -> str:
    if not done_s:
        return '?'
    s = int(np.mean(done_s) * left)
    return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


def run(config) -> list[dict]:
    """The benchmark; returns every finished dataset's summary rows (also on disk)."""
    opts = Options.from_config(config)
    inputs.check_workdir(config.workdir)
    assets.check_saes(config)
    names, continuous = plan(opts)
    run_id = config.run_id or results.new_run_id()
    folder = experiment.run_folder(config, run_id)
    _check_resume(folder, config)
    results.write_json(folder, 'config.json', config.to_dict())
    todo = [n for n in names if not os.path.exists(_dataset_csv(folder, n))]
    print(f'benchmark {run_id}: {len(names)} datasets ({len(names) - len(todo)} done '
          f'before), {len(continuous)} continuous-target ones skipped', flush=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    failed: list[dict] = []
    seconds: list[float] = []
    texts = 0
    if todo:
        parallel.configure_process(parallel.ProcessOptions.from_config(config))
        ctx = dataclasses.replace(experiment.context(config, timings), writer=False)
        for i, name in enumerate(todo):
            t = time.perf_counter()
            try:
                rows, n_texts, problems = _dataset(ctx, opts, name, timings)
            except Exception as e:  # noqa: BLE001 -- reported and skipped, never dropped
                logging.exception('benchmark: dataset %s failed', name)
                failed.append(dict(dataset=name, regime='*', error=f'{type(e).__name__}: {e}'))
                print(f'[{i + 1}/{len(todo)}] {name}: FAILED ({failed[-1]["error"]})',
                      flush=True)
                continue
            failed += problems
            results.write_predictions(folder, rows)
            results.write_summary(_dataset_csv(folder, name), rows, ctx.opts.metric_names)
            seconds.append(time.perf_counter() - t)
            texts += n_texts
            print(f'[{i + 1}/{len(todo)}] {name}: {n_texts} texts, {len(rows)} rows, '
                  f'{seconds[-1]:.0f}s; ETA {_eta(seconds, len(todo) - i - 1)}', flush=True)
    rows = [r for n in names if os.path.exists(_dataset_csv(folder, n))
            for r in results.read_csv(_dataset_csv(folder, n))]
    results.write_summary(os.path.join(folder, 'summary.csv'), rows, tuple(config.metrics))
    wall = time.perf_counter() - t0
    done = sorted({r['dataset'] for r in rows})
    results.write_json(folder, 'benchmark.json', dict(
        machine=f'{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}',
        datasets=names, done=done, failed=failed, skipped_continuous=continuous,
        wall_seconds=wall, computed=len(seconds), texts_computed=texts,
        texts_per_minute=60.0 * texts / wall if texts else None,
        seconds_per_dataset=float(np.mean(seconds)) if seconds else None, timings=timings))
    print(f'benchmark: {len(done)} of {len(names)} datasets done, {len(failed)} failures '
          f'(benchmark.json), {wall:.0f}s; results: {folder}', flush=True)
    return rows


def _dataset(ctx: experiment.Context, opts: Options, name: str, timings: dict
             ) -> tuple[list[dict], int, list[dict]]:
    """One dataset: one extraction, then every regime's probes. Returns (rows, texts
    extracted or read, failures of single regimes)."""
    config = ctx.config
    ds = inputs.load(config, data_loading.SAE_PROBES_PREFIX + name)
    ids, n_trunc = batching.tokenize(ds.texts, ctx.tokenizer, config.model.max_length)
    t = time.perf_counter()
    feats = ctx.extract(ids, progress=False)
    timings[f'{name}/extract'] = time.perf_counter() - t
    sp = inputs.split_or_error(config, ds, config.seed)
    groups = splits_lib.text_groups(ds.texts)
    ood = data_loading.sae_probes_ood_path(ds.name)
    rows, problems, n_texts = [], [], len(ids)
    t = time.perf_counter()
    for regime in opts.regimes.regimes(ds.num_classes, ood is not None):
        try:
            if regime.kind is Kind.OOD:
                prep, rfeats = _ood(ctx, ds, tuple(sp), ids, feats, ood)
                n_texts += len(prep.ids) - len(ids)
            else:
                prep = _prepared(ds, tuple(sp), ids, n_trunc, groups, regime, opts.regimes,
                                 config.seed)
                rfeats = feats
            got = probe_stage.probe_dataset(ctx, prep, rfeats, {})
        except (ValueError, UserError) as e:
            problems.append(dict(dataset=name, regime=regime.name, error=str(e)))
            logging.warning('benchmark: %s, regime %s skipped: %s', name, regime.name, e)
            continue
        rows += [dict(r, regime=regime.kind.value, setting=regime.setting)
                 for r in experiment.mark_selected(got, config.seed)]
    timings[f'{name}/probes'] = time.perf_counter() - t
    return rows, n_texts, problems


def _prepared(ds, split: tuple, ids, n_trunc, groups, regime: Regime,
              opts: regimes_lib.Options, seed: int) -> experiment.Prepared:
    """The standard split, or the regime's training rows (train + val pool) with the test
    rows unchanged; label noise only on training rows."""
    if regime.kind is Kind.STANDARD:
        return experiment.Prepared(ds, split, ids, n_trunc, groups)
    tr, va, te = split
    pool = np.sort(np.concatenate([tr, va]))
    y, empty = ds.labels, np.zeros(0, np.int64)
    if regime.kind is Kind.SCARCITY:
        train = regimes_lib.scarce_rows(y, pool, int(regime.setting), seed, opts.min_class_rows)
    elif regime.kind is Kind.IMBALANCE:
        train = regimes_lib.imbalanced_rows(y, pool, float(regime.setting), seed,
                                            opts.min_class_rows)
    else:
        train = pool
        ds = dataclasses.replace(ds, labels=regimes_lib.noisy_labels(
            y, pool, float(regime.setting), ds.num_classes, seed))
    return experiment.Prepared(ds, (train, empty, te), ids, n_trunc, groups)


def _ood(ctx: experiment.Context, ds, split: tuple, base_ids: list, feats, path: str):
    """Base rows (train + val) and the shifted test file's rows as one dataset: prep with
    test = the OOD rows, features stacked ({variant: [N + M, F]})."""
    shifted = data_loading.load(path, text_field=ctx.config.data.text_field,
                                label_field=ctx.config.data.label_field)
    index = {n: i for i, n in enumerate(ds.label_names)}
    unknown = sorted(set(shifted.label_names) - set(index))
    if unknown:
        raise ValueError(f'OOD labels {unknown} are not classes of the base dataset '
                         f'{ds.label_names}')
    to_base = np.asarray([index[n] for n in shifted.label_names])
    ids, n_trunc = batching.tokenize(shifted.texts, ctx.tokenizer, ctx.config.model.max_length)
    extra = ctx.extract(ids, progress=False)
    keys = list(ctx.spec.variants) + [hv for hv, _ in ctx.spec.hidden]
    stacked = {k: np.concatenate([np.asarray(feats[k]), np.asarray(extra[k])]) for k in keys}
    n = len(ds)
    both = dataclasses.replace(ds, texts=ds.texts + shifted.texts,
                               labels=np.concatenate([ds.labels, to_base[shifted.labels]]))
    tr, va, _ = split
    prep = experiment.Prepared(both, (tr, va, n + np.arange(len(shifted))), base_ids + ids,
                               n_trunc, splits_lib.text_groups(both.texts))
    return prep, stacked
