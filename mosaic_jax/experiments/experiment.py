"""`run(config)`: load -> split -> extract -> evaluate -> write, per dataset.

The orchestration layer: it reads the config, calls the stages (data, assets, steps,
evaluation, baselines) and hands what they return to `results` and `report`. The stages
themselves never see the config.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable

from absl import logging
import numpy as np

from mosaic_jax import checkpoint
from mosaic_jax import checks
from mosaic_jax import parallel
from mosaic_jax import results
from mosaic_jax import steps
from mosaic_jax import store as store_lib
from mosaic_jax.checks import UserError
from mosaic_jax.data import batching
from mosaic_jax.data import loading as data_loading
from mosaic_jax.data import splits as splits_lib
from mosaic_jax.experiments import assets
from mosaic_jax.experiments import correctness
from mosaic_jax.experiments import explain as explain_lib
from mosaic_jax.experiments import image_run
from mosaic_jax.experiments import inputs
from mosaic_jax.experiments import predict
from mosaic_jax.experiments import probe_stage
from mosaic_jax.experiments import transfer as transfer_lib
from mosaic_jax.experiments.inputs import audit_texts
from mosaic_jax.probing import baselines
from mosaic_jax.probing import evaluation
from mosaic_jax.probing import probe
from mosaic_jax.probing import saved as saved_lib
from mosaic_jax.probing.evaluation import ProbeOptions, ProbeResult
from mosaic_jax.report import page as report_page
from mosaic_jax.variants import PeakPosition, Variant


@dataclasses.dataclass
class Context:
    """What every dataset of a run shares (built once by `run`)."""
    config: object
    model: object
    tokenizer: object
    saes: dict
    spec: steps.FeatureSpec
    devices: parallel.Devices
    extractor_for: Callable    # spec -> steps.Extractor, built on first use (steps.extractors)
    opts: ProbeOptions
    meta: results.RunMeta
    run_id: str
    writer: bool
    store: store_lib.StoreOptions = store_lib.StoreOptions()
    store_groups: tuple = ()
    fingerprints: tuple = ({}, {})   # (model, {SAEKey: SAE}) for the store and saved probes
    # (kind, layer, width, variant) -> ProbeResult of the first seed: saved when selected.
    fitted: dict = dataclasses.field(default_factory=dict)
    # Result writes of this run, done only after every dataset succeeded (a failed run
    # leaves none of its own files behind).
    pending: list = dataclasses.field(default_factory=list)

    def batches(self, ids, subset=None):
        sel = ids if subset is None else [ids[i] for i in subset]
        m = self.config.model
        return batching.batches(sel, m.batch_size, pad_id=self.tokenizer.pad_token_id,
                                pad_side=m.pad_side, multiple_of=self.devices.count)

    def extract(self, ids, subset=None, progress=True):
        """Features of `ids` (or of rows `subset`): through the feature store when it is
        on, else computed in memory."""
        n = len(ids) if subset is None else len(subset)
        if self.store.enabled and subset is None:
            return steps.extract_stored(
                self.spec, self.extractor_for, self.store_groups, self.store,
                ids, self.batches(ids), bos_id=self.tokenizer.bos_token_id,
                include_special=self.config.features.include_special, progress=progress)
        return steps.extract(self.extractor_for(self.spec), self.batches(ids, subset), n,
                             bos_id=self.tokenizer.bos_token_id,
                             include_special=self.config.features.include_special,
                             progress=progress, total=-(-n // self.config.model.batch_size))


@dataclasses.dataclass
class Prepared:
    """One dataset, loaded, split and tokenised."""
    ds: data_loading.LabeledTexts
    splits: tuple
    ids: list
    n_truncated: int
    groups: np.ndarray       # int[N] text-copy ids (copies share one; grouped CV folds)

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


def context(config, timings: dict) -> Context:
    t0 = time.perf_counter()
    devices = parallel.Devices(config.parallel.mode)
    if config.model.batch_size % devices.count:
        raise UserError(f'model.batch_size={config.model.batch_size} must be divisible by '
                        f'the {devices.count} devices of parallel.mode={devices.mode.value}')
    run_id = parallel.sync_run_id(config.run_id or results.new_run_id())
    model, tokenizer = assets.load_model(config)
    saes = assets.load_saes(config, model.config.embed_dim)
    timings['load_model_and_saes'] = time.perf_counter() - t0
    spec = feature_spec(config, saes)
    fps = (assets.model_fingerprint(config), assets.sae_fingerprints(config))
    groups = steps.store_groups(spec, *fps, bos_id=tokenizer.bos_token_id,
                                include_special=config.features.include_special)
    return Context(config, model, tokenizer, saes, spec, devices,
                   steps.extractors(model, saes, devices),
                   ProbeOptions.from_config(config), results.RunMeta.from_config(config),
                   run_id, parallel.is_writer(),
                   store_lib.StoreOptions.from_config(config, parallel.single_process()),
                   tuple(groups), fps)


def run(config) -> list[dict]:
    """Runs the configured experiment; returns the summary rows (also written to disk)."""
    checks.validate(config)
    if config.mode == 'report':
        return _report_only(config)
    if config.mode == 'benchmark':  # sae-probes' datasets and regimes (benchmark.py)
        from mosaic_jax.experiments import benchmark  # imports this module
        return benchmark.run(config)
    if config.mode == 'predict':
        inputs.check_workdir(config.workdir)
        parallel.configure_process(parallel.ProcessOptions.from_config(config))
        folder = run_folder(config, parallel.sync_run_id(config.run_id or results.new_run_id()))
        rows = predict.run(config, folder)
        results.write_json(folder, 'config.json', config.to_dict())
        return rows
    if config.mode == 'label_correctness':
        inputs.check_workdir(config.workdir)
        parallel.configure_process(parallel.ProcessOptions.from_config(config))
        run_id = parallel.sync_run_id(config.run_id or results.new_run_id())
        correctness.label(config, run_folder(config, run_id))
        return []
    t0 = time.perf_counter()
    # Everything cheap first: a bad dataset or workdir fails before the model loads.
    inputs.check_workdir(config.workdir)
    assets.check_saes(config)
    datasets = {name: inputs.load(config, name) for name in inputs.dataset_names(config)}
    for ds in datasets.values():  # rare classes, empty splits: input-only problems
        for seed in inputs.seeds(config):
            inputs.split_or_error(config, ds, seed)
    parallel.configure_process(parallel.ProcessOptions.from_config(config))
    timings: dict[str, float] = {'load_datasets': time.perf_counter() - t0}
    ctx = context(config, timings)
    rows: list[dict] = []
    transfer: tuple[list, list] = ([], [])
    for name, ds in datasets.items():
        rows += _dataset(ctx, name, ds, timings, transfer)
    timings['total'] = time.perf_counter() - t0
    print(results.format_table(rows, ctx.opts.metric_names), flush=True)
    if ctx.writer:
        for write in ctx.pending:
            write()
        folder = _run_folder(ctx)
        results.write_summary(os.path.join(folder, 'summary.csv'), rows, ctx.opts.metric_names)
        results.write_predictions(folder, rows)
        if transfer[0]:
            results.write_csv(os.path.join(folder, 'transfer.csv'), transfer[0],
                              transfer_lib.TRANSFER_FIELDS)
            results.write_csv(os.path.join(folder, 'feature_overlap.csv'), transfer[1],
                              transfer_lib.OVERLAP_FIELDS)
        if len(inputs.seeds(config)) > 1:
            results.write_seed_summary(os.path.join(folder, 'seeds.csv'), rows,
                                       ctx.opts.metric_names)
        results.write_json(folder, 'config.json', config.to_dict())
        results.write_json(folder, 'timings.json', timings)
        print(f'results: {folder}', flush=True)
        if config.report:
            print(f'report: {report_page.build(config.workdir)}', flush=True)
    logging.info('timings (s): %s', {k: round(v, 2) for k, v in timings.items()})
    return rows


def _report_only(config) -> list[dict]:
    try:
        path = report_page.build(config.workdir)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f'report of {config.workdir!r}: {e}') from e
    logging.info('report written to %s', path)
    return []


def run_folder(config, run_id: str) -> str:
    """<workdir>/<model>/_runs/<run_id> (results.run_folder) of this config."""
    return results.run_folder(config.workdir, config.model.name, run_id)


def _run_folder(ctx: Context) -> str:
    return run_folder(ctx.config, ctx.run_id)


def _split(ctx: Context, ds: data_loading.LabeledTexts, seed: int, *, write: bool,
           tag: str = '') -> splits_lib.Split:
    """The duplicate-safe split, logged and written for audit (splits/<dataset><tag>.csv)."""
    sp = inputs.split_or_error(ctx.config, ds, seed)
    a = sp.audit
    logging.info('%s: %d rows, %d repeat an earlier text (%d texts repeated, %d with '
                 'conflicting labels); duplicates=%s, %d rows dropped', ds.name, a.n_rows,
                 a.n_duplicate_rows, a.n_duplicate_groups, a.n_conflicting_groups, a.mode,
                 a.n_dropped)
    if write:
        path = os.path.join(_run_folder(ctx), 'splits',
                            f'{results.safe_name(ds.name)}{tag}.csv')
        rows = splits_lib.split_rows(sp, ds.labels, audit_texts(ds), ds.label_names)
        ctx.pending.append(functools.partial(results.write_csv, path, rows,
                                             splits_lib.SPLIT_FIELDS))
    return sp


def _dataset(ctx: Context, name: str, ds: data_loading.LabeledTexts, timings: dict,
             transfer: tuple[list, list]) -> list[dict]:
    """One dataset end to end: extraction once, then split + probes for every seed (result
    JSONs for the first seed); timings gain '<name>/load_tokenize', '/extract', ..."""
    config = ctx.config
    compiled = parallel.compile_seconds()
    if image_run.is_images(ds):  # captioned images come back as 'text' + 'image' groups
        ds, ids, n_trunc, groups, feats = image_run.features(ctx, name, ds, timings)
    else:
        ids, n_trunc, groups, feats = _text_features(ctx, name, ds, timings)
    if ds.groups is not None:
        if feats is None:
            raise UserError(f'dataset {name!r} is grouped (transfer): use probe.train=cached')
        t = time.perf_counter()
        rows = _transfer_dataset(ctx, ds, feats, transfer)
        timings[f'{name}/transfer'] = time.perf_counter() - t
        timings[f'{name}/compile'] = parallel.compile_seconds() - compiled
        return rows
    seeds = inputs.seeds(config)
    rows = []
    t = time.perf_counter()
    for i, seed in enumerate(seeds):
        sctx = dataclasses.replace(ctx, opts=ctx.opts.replace(seed=seed),
                                   writer=ctx.writer and i == 0)
        sp = _split(sctx, ds, seed, write=ctx.writer,
                    tag=f'_seed{seed}' if len(seeds) > 1 else '')
        prep = Prepared(ds, tuple(sp), ids, n_trunc, groups)
        if feats is None:
            seed_rows = _fused_dataset(sctx, prep)
        else:
            meta = dict(n_texts=len(ids), n_tokens=int(sum(len(i) for i in ids)),
                        n_truncated=n_trunc, split_sizes=[len(s) for s in prep.splits],
                        split_audit=dataclasses.asdict(sp.audit),
                        selection=ctx.opts.select.value,
                        extract_seconds=timings[f'{name}/extract'])
            seed_rows = probe_stage.probe_dataset(sctx, prep, feats, meta)
        rows += mark_selected(seed_rows, seed)
        if sctx.writer and feats is not None and not image_run.is_images(ds):  # text-only
            t_explain = time.perf_counter()
            _explain(sctx, prep, rows[-len(seed_rows):], feats)
            timings[f'{name}/explain'] = time.perf_counter() - t_explain
            _save_probes(sctx, prep, rows[-len(seed_rows):])
    timings[f'{name}/{"fused" if feats is None else "probes"}'] = time.perf_counter() - t
    timings[f'{name}/compile'] = parallel.compile_seconds() - compiled
    return rows


def _text_features(ctx: Context, name: str, ds, timings: dict) -> tuple:
    """(token ids, n truncated, copy groups, features or None when fused) of a text
    dataset; timings gain '<name>/load_tokenize' and '<name>/extract'."""
    config = ctx.config
    t = time.perf_counter()
    ids, n_trunc = batching.tokenize(ds.texts, ctx.tokenizer, config.model.max_length)
    if n_trunc:
        logging.info('%s: %d of %d texts truncated to %d tokens', name, n_trunc, len(ids),
                     config.model.max_length)
    groups = splits_lib.text_groups(ds.texts)
    timings[f'{name}/load_tokenize'] = time.perf_counter() - t
    feats = None
    if config.probe.train == 'cached':
        t = time.perf_counter()
        feats = ctx.extract(ids)
        timings[f'{name}/extract'] = time.perf_counter() - t
        done = (feats.n_computed if isinstance(feats, store_lib.StoredFeatures) else len(ids))
        logging.info('%s: extracted %d texts (%d in the dataset, %d tokens) in %.1fs', name,
                     done, len(ids), sum(len(i) for i in ids), timings[f'{name}/extract'])
    return ids, n_trunc, groups, feats


def _explain(ctx: Context, prep: Prepared, rows: list[dict], feats) -> None:
    """Queues the feature explanations of the dataset's selected SAE probe (explain.py)."""
    e = ctx.config.explain
    chosen = [r for r in rows if r['kind'] == 'sae' and r.get('selected')]
    if not e.enabled or not chosen:
        return
    r = chosen[0]
    res = ctx.fitted['sae', r['layer'], r['width'], r['variant']]
    key = res.key.sae
    max_v = Variant(key, 'max')
    out = explain_lib.explain(
        ctx.model, ctx.tokenizer, ctx.saes[key], ctx.spec.layers[dict(ctx.spec.saes)[key]],
        res, feats[res.key], prep.ids, prep.ds.labels, prep.splits[0], prep.ds.label_names,
        lambda rows: ctx.batches(prep.ids, rows), bos_id=ctx.tokenizer.bos_token_id,
        include_special=ctx.config.features.include_special, k=int(e.top_k),
        examples=int(e.examples), max_pooled=feats[max_v] if max_v in feats else None,
        peaks=feats[PeakPosition(key)] if PeakPosition(key) in feats else None,
        groups=prep.groups)
    path = results.explanations_path(_run_folder(ctx), prep.ds.name, key.layer, key.width)
    ctx.pending.append(functools.partial(checkpoint.atomic_write_json, path,
                                         dict(out, dataset=prep.ds.name, layer=key.layer,
                                              width=key.width)))


def _save_probes(ctx: Context, prep: Prepared, rows: list[dict]) -> None:
    """Queues the selected SAE / hidden / TF-IDF probes of a dataset (probes/<dataset>/)."""
    for kind, saved in predict.saved_probes(ctx.config, rows, ctx.fitted, prep.ds,
                                            prep.splits[2], ctx.spec, ctx.fingerprints,
                                            ctx.tokenizer.bos_token_id):
        path = saved_lib.folder(_run_folder(ctx), results.safe_name(prep.ds.name), kind)
        ctx.pending.append(functools.partial(saved_lib.save, path, saved))
    ctx.fitted.clear()


def mark_selected(rows: list[dict], seed: int, by=('kind',)) -> list[dict]:
    """`selected` on the best row of each kind (results.best_row: the headline metric on
    validation or the CV mean, never test), the one choice everything downstream reads;
    adds `seed`."""
    return [dict(r, seed=seed) for r in results.mark_selected(rows, by)]


def _fused_dataset(ctx: Context, prep: Prepared) -> list[dict]:
    """Fused training of one variant per SAE on the training split (seeded, shuffled
    epochs), scored on validation (the selection score) and test."""
    tr, va, te = prep.splits
    y = prep.ds.labels
    pcfg, m = ctx.config.probe, ctx.config.model
    C = prep.num_classes
    weights = probe.class_weights(y[tr], C) if pcfg.class_weight else np.ones(C, np.float32)
    held = ctx.extract(prep.ids, np.concatenate([va, te]), progress=False)
    train_ids = [prep.ids[i] for i in tr]

    def batches_fn(epoch):
        return steps.epoch_batches(train_ids, m.batch_size, seed=ctx.opts.seed, epoch=epoch,
                                   pad_id=ctx.tokenizer.pad_token_id, pad_side=m.pad_side,
                                   multiple_of=ctx.devices.count)
    rows = []
    for key in ctx.saes:
        v = Variant(key, pcfg.fused_variant, _top_n(ctx, pcfg.fused_variant),
                    bool(pcfg.fused_binarize))
        t = time.perf_counter()
        trainer = steps.FusedTrainer(ctx.model, ctx.saes, ctx.spec, v, ctx.devices,
                                     C=pcfg.fused_C, lr=pcfg.fused_lr, n_train=len(tr),
                                     num_classes=C)
        steps.train_fused(trainer, batches_fn, y[tr], weights, epochs=pcfg.fused_epochs,
                          bos_id=ctx.tokenizer.bos_token_id,
                          include_special=ctx.config.features.include_special)
        proba = np.asarray(probe.predict_proba(trainer.params, held[v]))
        val = evaluation.scores(y[va], proba[:len(va)], ctx.opts.metric_names)
        res = ProbeResult(v, float(pcfg.fused_C), val,
                          evaluation.test_scores(y[te], proba[len(va):], ctx.opts),
                          proba[len(va):], trainer.params, time.perf_counter() - t)
        rows.append(probe_stage.variant_row(prep, 'fused', v, res, headline=ctx.opts.headline))
    return rows


def _top_n(ctx: Context, pooling: str) -> int:
    """The (first) configured top_n of a pooling that reads it, else 0."""
    tops = {v.top_n for v in ctx.spec.variants if v.pooling == pooling}
    return min(tops) if tops else 0


def _transfer_methods(ctx: Context, ds, feats, gr) -> list[tuple[dict, ProbeResult, object]]:
    """(identity, result, rows -> proba) of every method trained on one group: the chosen
    variant of each SAE, each hidden baseline, TF-IDF."""
    y, C, opts = ds.labels, ds.num_classes, ctx.opts
    hopts = probe_stage.hidden_opts(ctx)
    fit = lambda key, o: evaluation.fit_variant(key, feats[key], y, gr.splits, o,  # noqa: E731
                                                num_classes=C)
    out = []
    for key in ctx.saes:
        cands = [fit(v, opts) for v in ctx.spec.variants if v.sae == key]
        best = max(cands, key=lambda r: r.val[opts.headline])
        v = best.key
        out.append((dict(layer=v.layer, width=v.width, kind='sae', variant=v.name,
                         top_n=v.top_n), best, _prober(best, feats[v])))
    for hv, _ in ctx.spec.hidden:
        res = fit(hv, hopts)
        out.append((dict(layer=hv.layer, width='-', kind='hidden', variant=hv.name), res,
                      _prober(res, feats[hv])))
    if 'tfidf' in ctx.config.baselines:
        res = evaluation.fit_tfidf(ds.texts, y, gr.splits, opts, num_classes=C)
        out.append((dict(layer='-', width='-', kind='tfidf', variant='tfidf'), res,
                    lambda r, m=res.params: baselines.predict_proba(
                        m, [ds.texts[i] for i in r], C)))
    return out


def _prober(res: ProbeResult, x: np.ndarray):
    return lambda rows: np.asarray(probe.predict_proba(res.params, np.asarray(x[rows],
                                                                            np.float32)))


def _transfer_dataset(ctx: Context, ds, feats, out: tuple[list, list]) -> list[dict]:
    """Train on each training group, test on every group (transfer.py); summary rows are
    the in-group results."""
    config = ctx.config
    try:
        groups = transfer_lib.train_groups(ds.groups, tuple(config.data.train_groups))
    except ValueError as e:
        raise UserError(f'dataset {ds.name!r}: {e}') from e
    sp = _split(ctx, ds, config.seed, write=ctx.writer)
    rows = []
    for g in groups:
        gr = transfer_lib.group_rows(ds.groups, ds.texts, tuple(sp), g)
        prep = Prepared(ds, gr.splits, [], 0, splits_lib.text_groups(ds.texts))
        for ident, res, prober in _transfer_methods(ctx, ds, feats, gr):
            ident = dict(ident, dataset=ds.name)
            out[0].extend(transfer_lib.transfer_rows(res, prober, ds.labels, gr, ctx.opts,
                                                     **ident))
            if ident['kind'] == 'sae':
                out[1].extend(transfer_lib.feature_overlap(
                    res, feats[res.key], ds.labels, gr, ctx.opts, ds.label_names,
                    ds.num_classes, **ident))
            kind = ident.pop('kind')
            ident.pop('dataset')
            rows.append(probe_stage.row(prep, kind, res, headline=ctx.opts.headline, **ident,
                             train_group=g))
    # Each training group is its own experiment: one choice per kind and group.
    return mark_selected(rows, config.seed, by=('kind', 'train_group'))
