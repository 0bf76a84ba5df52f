"""`run(config)`: load -> split -> extract -> evaluate -> write, per dataset.

The orchestration layer: it reads the config, calls the stages (data, assets, steps,
evaluation, baselines) and hands what they return to `results` and `report`. The stages
themselves never see the config.
"""
from __future__ import annotations

import dataclasses
import os
import time

from absl import logging
import numpy as np

from mosaic_jax import assets
from mosaic_jax import baselines
from mosaic_jax import checks
from mosaic_jax import data
from mosaic_jax import evaluation
from mosaic_jax import parallel
from mosaic_jax import probe
from mosaic_jax import report
from mosaic_jax import results
from mosaic_jax import splits as splits_lib
from mosaic_jax import steps
from mosaic_jax.checks import UserError
from mosaic_jax.evaluation import ProbeOptions, ProbeResult
from mosaic_jax.variants import SAEKey, Variant


@dataclasses.dataclass
class Context:
    """What every dataset of a run shares (built once by `run`)."""
    config: object
    model: object
    tokenizer: object
    saes: dict
    spec: steps.FeatureSpec
    devices: parallel.Devices
    extractor: steps.Extractor
    opts: ProbeOptions
    run_id: str
    writer: bool

    def batches(self, ids, subset=None):
        sel = ids if subset is None else [ids[i] for i in subset]
        m = self.config.model
        return data.batches(sel, m.batch_size, pad_id=self.tokenizer.pad_token_id,
                            pad_side=m.pad_side, multiple_of=self.devices.count)

    def extract(self, ids, subset=None, progress=True):
        n = len(ids) if subset is None else len(subset)
        return steps.extract(self.extractor, self.batches(ids, subset), n,
                             bos_id=self.tokenizer.bos_token_id,
                             include_special=self.config.features.include_special,
                             progress=progress)


@dataclasses.dataclass
class Prepared:
    """One dataset, loaded, split and tokenised."""
    ds: data.LabeledTexts
    splits: tuple
    ids: list
    n_truncated: int

    @property
    def num_classes(self) -> int:
        return len(self.ds.label_names)


def feature_spec(config, saes) -> steps.FeatureSpec:
    f = config.features
    hidden = tuple(checks.HIDDEN_BASELINES[b] for b in config.baselines
                   if b in checks.HIDDEN_BASELINES)
    return steps.FeatureSpec.build(
        layers=assets.model_layers(config), config_layers=tuple(config.layers), saes=saes,
        pooling=tuple(f.pooling), binarize=tuple(f.binarize), top_n=f.top_n,
        threshold=f.threshold, chunk_size=config.sae.chunk_size, hidden=hidden)


def _context(config, timings: dict, t0: float) -> Context:
    devices = parallel.Devices(config.parallel.mode)
    if config.model.batch_size % devices.count:
        raise UserError(f'model.batch_size={config.model.batch_size} must be divisible by '
                        f'the {devices.count} devices of parallel.mode={devices.mode.value}')
    run_id = parallel.sync_run_id(config.run_id or results.new_run_id())
    model, tokenizer = assets.load_model(config)
    saes = assets.load_saes(config, model.config.embed_dim)
    timings['load_model_and_saes'] = time.perf_counter() - t0
    spec = feature_spec(config, saes)
    return Context(config, model, tokenizer, saes, spec, devices,
                   steps.Extractor(model, saes, spec, devices),
                   ProbeOptions.from_config(config), run_id, parallel.is_writer())


def run(config) -> list[dict]:
    """Runs the configured experiment; returns the summary rows (also written to disk)."""
    checks.validate(config)
    if config.mode == 'report':
        return _report_only(config)
    parallel.configure_process(config)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ctx = _context(config, timings, t0)
    rows: list[dict] = []
    for name in config.data.datasets:
        rows += _dataset(ctx, name, timings)
    timings['total'] = time.perf_counter() - t0
    print(results.format_table(rows, ctx.opts.metric_names), flush=True)
    if ctx.writer:
        run_folder = os.path.join(config.workdir, results.safe_name(config.model.name), '_runs',
                                  ctx.run_id)
        results.write_summary(os.path.join(run_folder, 'summary.csv'), rows, ctx.opts.metric_names)
        results.write_json(run_folder, 'config.json', config.to_dict())
        results.write_json(run_folder, 'timings.json', timings)
        if config.report:
            logging.info('report written to %s', report.build(config.workdir))
    logging.info('timings (s): %s', {k: round(v, 2) for k, v in timings.items()})
    return rows


def _report_only(config) -> list[dict]:
    try:
        path = report.build(config.workdir)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f'report of {config.workdir!r}: {e}') from e
    logging.info('report written to %s', path)
    return []


def _dataset(ctx: Context, name: str, timings: dict) -> list[dict]:
    """One dataset end to end; timings gain '<name>/load_tokenize', '/extract', ..."""
    config = ctx.config
    t = time.perf_counter()
    try:
        ds = data.load(name, text_field=config.data.text_field,
                       label_field=config.data.label_field, max_rows=config.data.max_rows,
                       seed=config.seed)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UserError(f'dataset {name!r}: {e}') from e
    splits = tuple(splits_lib.split(ds.labels, seed=config.seed,
                                    fractions=tuple(config.data.fractions)))
    ids, n_trunc = data.tokenize(ds.texts, ctx.tokenizer, config.model.max_length)
    if n_trunc:
        logging.info('%s: %d of %d texts truncated to %d tokens', name, n_trunc, len(ids),
                     config.model.max_length)
    prep = Prepared(ds, splits, ids, n_trunc)
    timings[f'{name}/load_tokenize'] = time.perf_counter() - t
    if config.probe.train == 'fused':
        t = time.perf_counter()
        rows = _fused_dataset(ctx, prep)
        timings[f'{name}/fused'] = time.perf_counter() - t
        return rows
    t = time.perf_counter()
    feats = ctx.extract(ids)
    timings[f'{name}/extract'] = time.perf_counter() - t
    n_tokens = int(sum(len(i) for i in ids))
    logging.info('%s: extracted %d texts (%d tokens) in %.1fs', name, len(ids), n_tokens,
                 timings[f'{name}/extract'])
    t = time.perf_counter()
    meta = dict(n_texts=len(ids), n_tokens=n_tokens, n_truncated=n_trunc,
                split_sizes=[len(s) for s in splits],
                extract_seconds=timings[f'{name}/extract'])
    rows = _probe_dataset(ctx, prep, feats, meta)
    timings[f'{name}/probes'] = time.perf_counter() - t
    return rows


def _row(prep: Prepared, kind: str, res: ProbeResult | None = None, **kw) -> dict:
    """One summary row; a probe result adds its C, seconds and test metrics."""
    out = dict(dataset=prep.ds.name, n_train=len(prep.splits[0]), n_test=len(prep.splits[2]),
               kind=kind, **kw)
    if res is not None:
        out.update(C=res.C, seconds=res.seconds, **res.test)
    return out


def _variant_row(prep, kind: str, v: Variant, **kw) -> dict:
    return _row(prep, kind, layer=v.layer, width=v.width, variant=v.name, pooling=v.pooling,
                top_n=v.top_n, binarized=v.binarized, **kw)


def _hidden_probes(ctx: Context, prep: Prepared, feats, layer: int) -> dict[str, ProbeResult]:
    """pooling -> result of the hidden-state baselines at one config layer."""
    out = {}
    for hv, _ in ctx.spec.hidden:
        if hv.layer == layer:
            out[hv.pooling] = evaluation.fit_variant(hv, feats[hv], prep.ds.labels,
                                                     prep.splits, ctx.opts,
                                                     num_classes=prep.num_classes)
    return out


def _tree(ctx: Context, prep: Prepared, x: np.ndarray):
    """The depth-limited decision tree on the chosen variant's features (or None)."""
    if 'decision_tree' not in ctx.config.baselines:
        return None
    tr, _, te = prep.splits
    y = prep.ds.labels
    return baselines.run('decision_tree', x[tr], y[tr], x[te], num_classes=prep.num_classes,
                         seed=ctx.config.seed)


def _cv(ctx: Context, prep: Prepared, feats, best: ProbeResult, hidden: dict) -> dict:
    """K-fold CV blocks of the chosen SAE and hidden probes (empty when cv_folds = 0)."""
    k = ctx.config.cv_folds
    if not k:
        return {}
    kw = dict(k=k, num_classes=prep.num_classes)
    y = prep.ds.labels
    cv = dict(sae=evaluation.cross_validate_variant(best, feats[best.key], y, prep.splits,
                                                    ctx.opts, **kw))
    if hidden:
        main = hidden.get('last') or next(iter(hidden.values()))
        cv['hidden'] = evaluation.cross_validate_variant(main, feats[main.key], y, prep.splits,
                                                         ctx.opts, **kw)
    return cv


def _sae_probes(ctx: Context, prep: Prepared, feats, key: SAEKey, hidden: dict,
                meta: dict) -> list[dict]:
    """Every variant of one SAE: probes, the tree on the chosen one, CV, result files."""
    y, te = prep.ds.labels, prep.splits[2]
    fitted = {}
    rows = []
    for v in ctx.spec.variants:
        if v.sae != key:
            continue
        fitted[v] = evaluation.fit_variant(v, feats[v], y, prep.splits, ctx.opts,
                                           num_classes=prep.num_classes)
        rows.append(_variant_row(prep, 'sae', v, res=fitted[v]))
    best = max(fitted.values(), key=lambda r: r.val[ctx.opts.headline])
    tree = _tree(ctx, prep, feats[best.key])
    if tree is not None:
        rows.append(_variant_row(prep, 'tree', best.key, C=None,
                                 **evaluation.scores(y[te], tree['proba'],
                                                     ctx.opts.metric_names)))
    if ctx.writer:
        folder = results.run_dir(ctx.config.workdir, ctx.config.model.name, prep.ds.name,
                                 key.layer, key.width, ctx.run_id)
        files = results.VariantFiles(config=ctx.config, ds=prep.ds, key=key, y_test=y[te],
                                     best=best, fitted=fitted, tree=tree, hidden=hidden,
                                     cv=_cv(ctx, prep, feats, best, hidden), meta=meta)
        results.write_variant_files(folder, files)
    return rows


def _probe_dataset(ctx: Context, prep: Prepared, feats, meta: dict) -> list[dict]:
    """Cached training: every variant x C grid, hidden baselines, TF-IDF, decision tree."""
    rows = []
    for layer in ctx.config.layers:
        hidden = _hidden_probes(ctx, prep, feats, int(layer))
        for pooling, res in hidden.items():
            rows.append(_row(prep, 'hidden', res, layer=int(layer), width='-',
                             variant=res.key.name, pooling=pooling, binarized=False))
        for key in assets.sae_grid(ctx.config):
            if key.layer == int(layer):
                rows += _sae_probes(ctx, prep, feats, key, hidden, meta)
    if 'tfidf' in ctx.config.baselines:
        rows.append(_tfidf_row(ctx, prep))
    return rows


def _tfidf_row(ctx: Context, prep: Prepared) -> dict:
    tr, _, te = prep.splits
    texts, y = prep.ds.texts, prep.ds.labels
    t = time.perf_counter()
    out = baselines.run('tfidf', [texts[i] for i in tr], y[tr], [texts[i] for i in te],
                        num_classes=prep.num_classes, seed=ctx.config.seed)
    return _row(prep, 'tfidf', layer='-', width='-', variant='tfidf', C=None,
                seconds=time.perf_counter() - t,
                **evaluation.scores(y[te], out['proba'], ctx.opts.metric_names))


def _fused_dataset(ctx: Context, prep: Prepared) -> list[dict]:
    """Fused training of one variant per SAE on the training split, scored on test."""
    tr, _, te = prep.splits
    y = prep.ds.labels
    pcfg = ctx.config.probe
    C = prep.num_classes
    weights = probe.class_weights(y[tr], C) if pcfg.class_weight else np.ones(C, np.float32)
    test_feats = ctx.extract(prep.ids, te, progress=False)
    rows = []
    for key in ctx.saes:
        v = Variant(key, pcfg.fused_variant, _top_n(ctx, pcfg.fused_variant),
                    bool(pcfg.fused_binarize))
        t = time.perf_counter()
        trainer = steps.FusedTrainer(ctx.model, ctx.saes, ctx.spec, v, ctx.devices,
                                     C=pcfg.fused_C, lr=pcfg.fused_lr, n_train=len(tr),
                                     num_classes=C)
        steps.train_fused(trainer, lambda epoch: ctx.batches(prep.ids, tr), y[tr], weights,
                          epochs=pcfg.fused_epochs, bos_id=ctx.tokenizer.bos_token_id,
                          include_special=ctx.config.features.include_special)
        proba = np.asarray(probe.predict_proba(trainer.params, test_feats[v]))
        rows.append(_variant_row(prep, 'fused', v, C=float(pcfg.fused_C),
                                 seconds=time.perf_counter() - t,
                                 **evaluation.scores(y[te], proba, ctx.opts.metric_names)))
    return rows


def _top_n(ctx: Context, pooling: str) -> int:
    """The (first) configured top_n of a pooling that reads it, else 0."""
    tops = {v.top_n for v in ctx.spec.variants if v.pooling == pooling}
    return min(tops) if tops else 0
