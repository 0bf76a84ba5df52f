"""The probe stage of one dataset and seed: every SAE variant's probe, the hidden-state and
TF-IDF baselines, k-sparse probes, the decision tree and the K-fold CV blocks.

The fits are independent tasks run in `probe.threads` threads (XLA, numpy and sklearn's
trees release the GIL; one probe alone keeps about 1.2 of 2 cores busy). Every task is a
pure function of the features; the rows, the fitted probes and the result-file writes are
assembled afterwards in the one fixed order of a single-threaded run, so the number of
threads changes no result and no file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools

import numpy as np

from mosaic_jax import results
from mosaic_jax.experiments import assets, image_run
from mosaic_jax.probing import evaluation, feature_selection
from mosaic_jax.probing.evaluation import ProbeResult
from mosaic_jax.variants import SAEKey, Variant

# A second thread holds a second variant and its fit's temporaries (Gram, eigenbasis) at
# once: only where one dense variant is small (1,000 texts x 16k: 62.5 MiB). From 4,000 texts x
# 16k (250 MiB) and for 65k SAEs the stage runs in one thread, as bench/store_memory.py measured
# (peak RSS 4,000 vs 1,000 texts, 65k x 5,000 texts within 8 GB).
MAX_THREADED_VARIANT_BYTES = 128 * 2**20


def row(prep, kind: str, res: ProbeResult | None = None, *, headline: str = '',
        **kw) -> dict:
    """One summary row; a result adds its C, seconds, test metrics and selection score."""
    out = dict(dataset=prep.ds.name, n_train=len(prep.splits[0]), n_test=len(prep.splits[2]),
               kind=kind, **kw)
    if res is not None:
        out.update(C=res.C, seconds=res.seconds, select_score=res.val.get(headline, np.nan),
                   **res.test, **{results.Y_TEST: prep.ds.labels[prep.splits[2]],
                                  results.PROBA: res.test_proba})
    return out


def variant_row(prep, kind: str, v: Variant, res=None, *, headline: str = '', **kw) -> dict:
    return row(prep, kind, res, headline=headline, layer=v.layer, width=v.width,
               variant=v.name, pooling=v.pooling, top_n=v.top_n, binarized=v.binarized, **kw)


@dataclasses.dataclass
class _Tail:
    """What follows the variant fits of one SAE (all but `fitted` from one task)."""
    fitted: dict          # Variant -> ProbeResult, in grid order
    best: ProbeResult     # the best variant by the selection score (ties: the first)
    sparse: list          # k-sparse rows
    tree: ProbeResult | None
    cv: dict


class _Inline:
    """The executor of one thread: runs each task when it is submitted."""

    def submit(self, fn, *args, **kwargs):
        fut = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # re-raised by .result(), as a pool's future does
            fut.set_exception(e)
        return fut

    def shutdown(self, **_):
        pass


def threads(ctx, prep) -> int:
    """config.probe.threads, or 1 when one dense variant of the widest SAE exceeds
    MAX_THREADED_VARIANT_BYTES (the memory bound of wide SAEs over many texts comes first)."""
    want = int(ctx.config.probe.threads)
    widest = max((int(s.width) for s in ctx.saes.values()), default=0)
    if len(prep.ds.labels) * widest * 4 > MAX_THREADED_VARIANT_BYTES:
        return 1
    return max(1, want)


def hidden_opts(ctx) -> evaluation.ProbeOptions:
    """The run's probe options for hidden-state baselines: standardised unless
    config.probe.hidden_standardize is off."""
    return ctx.opts.replace(standardize=bool(ctx.config.probe.hidden_standardize))


def _hidden(ctx, prep, feats, layer: int) -> dict[str, ProbeResult]:
    """pooling -> result of the hidden-state baselines at one config layer."""
    opts = hidden_opts(ctx)
    return {hv.pooling: evaluation.fit_variant(hv, feats[hv], prep.ds.labels, prep.splits,
                                               opts, num_classes=prep.num_classes,
                                               groups=prep.groups)
            for hv, _ in ctx.spec.hidden if hv.layer == layer}


def _fit(ctx, prep, feats, v: Variant) -> ProbeResult:
    return evaluation.fit_variant(v, feats[v], prep.ds.labels, prep.splits, ctx.opts,
                                  num_classes=prep.num_classes, groups=prep.groups)


def _sparse(ctx, prep, x: np.ndarray, v: Variant) -> list[dict]:
    """k-sparse probes of one variant: k latents chosen on the training rows only."""
    pc, y, tr = ctx.config.probe, prep.ds.labels, prep.splits[0]
    rows = []
    for k in pc.sparse_k:
        idx = feature_selection.select_features(x[tr], y[tr], int(k), method=pc.sparse_method,
                                                num_classes=prep.num_classes)
        res = evaluation.fit_variant(v, x[:, idx], y, prep.splits, ctx.opts,
                                     num_classes=prep.num_classes, groups=prep.groups)
        rows.append(variant_row(prep, 'sparse', v, res, headline=ctx.opts.headline,
                                k=len(idx)))
    return rows


def _cv(ctx, prep, feats, best: ProbeResult, hidden: dict) -> dict:
    """K-fold CV blocks of the chosen SAE and hidden probes (empty when cv_folds = 0)."""
    k = ctx.config.cv_folds
    if not k:
        return {}
    kw = dict(k=k, num_classes=prep.num_classes, groups=prep.groups)
    y = prep.ds.labels
    cv = dict(sae=evaluation.cross_validate_variant(best, feats[best.key], y, prep.splits,
                                                    ctx.opts, **kw))
    if hidden:
        main = hidden.get('last') or next(iter(hidden.values()))
        cv['hidden'] = evaluation.cross_validate_variant(main, feats[main.key], y, prep.splits,
                                                         hidden_opts(ctx), **kw)
    return cv


def _tail(ctx, prep, feats, fits: dict, hidden_fut) -> _Tail:
    """Best variant of one SAE by the selection score, then its k-sparse probes, the tree
    and (for the result files) the CV blocks. `fits`: Variant -> future of its result."""
    head = ctx.opts.headline
    fitted = {v: f.result() for v, f in fits.items()}
    best = max(fitted.values(), key=lambda r: r.val[head])  # ties: the first variant
    x = feats[best.key]
    sparse = _sparse(ctx, prep, x, best.key)
    tree = None
    if 'decision_tree' in ctx.config.baselines:
        tree = evaluation.fit_tree(best.key, x, prep.ds.labels, prep.splits, ctx.opts,
                                   num_classes=prep.num_classes, groups=prep.groups)
    cv = _cv(ctx, prep, feats, best, hidden_fut.result()) if ctx.writer else {}
    return _Tail(fitted, best, sparse, tree, cv)


def _submit_all(pool, ctx, prep, feats) -> tuple[dict, dict, object]:
    """Futures of every task, hidden probes first, then variants, then per-SAE tails: a
    tail waits only on tasks already started (the pool takes tasks in order), never
    on one queued behind it."""
    layers = [int(layer) for layer in ctx.config.layers]
    hidden = {layer: pool.submit(_hidden, ctx, prep, feats, layer) for layer in layers}
    tfidf = (pool.submit(evaluation.fit_tfidf, prep.ds.texts, prep.ds.labels, prep.splits,
                         ctx.opts, num_classes=prep.num_classes, groups=prep.groups)
             if 'tfidf' in ctx.config.baselines else None)
    keys = [k for layer in layers for k in assets.sae_grid(ctx.config) if k.layer == layer]
    fits = {k: {v: pool.submit(_fit, ctx, prep, feats, v)
                for v in ctx.spec.variants if v.sae == k} for k in keys}
    tails = {k: pool.submit(_tail, ctx, prep, feats, fits[k], hidden[k.layer]) for k in keys}
    return hidden, tails, tfidf


def _sae_rows(ctx, prep, key: SAEKey, tail: _Tail, hidden: dict, meta: dict) -> list[dict]:
    """The rows of one SAE (variants, sparse, tree); records its fits and result files."""
    head = ctx.opts.headline
    rows = [variant_row(prep, 'sae', v, r, headline=head) for v, r in tail.fitted.items()]
    rows += tail.sparse
    if tail.tree is not None:
        rows.append(variant_row(prep, 'tree', tail.best.key, tail.tree, headline=head))
        rows[-1]['C'] = None
    if ctx.writer:
        for v, r in tail.fitted.items():
            ctx.fitted['sae', v.layer, v.width, v.name] = r
        folder = results.run_dir(ctx.config.workdir, ctx.config.model.name, prep.ds.name,
                                 key.layer, key.width, ctx.run_id)
        files = results.VariantFiles(run=ctx.meta, ds=prep.ds, key=key,
                                     y_test=prep.ds.labels[prep.splits[2]], best=tail.best,
                                     fitted=tail.fitted, tree=tail.tree, hidden=hidden,
                                     cv=tail.cv, meta=meta)
        ctx.pending.append(functools.partial(results.write_variant_files, folder, files))
    return rows


def probe_dataset(ctx, prep, feats, meta: dict) -> list[dict]:
    """Cached training: every variant x C grid, hidden baselines, TF-IDF, decision tree;
    rows in grid order (per config layer: hidden, then each SAE's variants, sparse, tree;
    then TF-IDF and pixels)."""
    n = threads(ctx, prep)
    pool = _Inline() if n == 1 else concurrent.futures.ThreadPoolExecutor(n)
    head = ctx.opts.headline
    try:
        hidden, tails, tfidf = _submit_all(pool, ctx, prep, feats)
        rows = []
        for layer, fut in hidden.items():
            hid = fut.result()
            for pooling, res in hid.items():
                rows.append(row(prep, 'hidden', res, headline=head, layer=layer, width='-',
                                variant=res.key.name, pooling=pooling, binarized=False))
                if ctx.writer:
                    ctx.fitted['hidden', layer, '-', res.key.name] = res
            for key, tail in tails.items():
                if key.layer == layer:
                    rows += _sae_rows(ctx, prep, key, tail.result(), hid, meta)
        if tfidf is not None:
            res = tfidf.result()
            rows.append(row(prep, 'tfidf', res, headline=head, layer='-', width='-',
                            variant='tfidf'))
            if ctx.writer:
                ctx.fitted['tfidf', '-', '-', 'tfidf'] = res
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if 'pixels' in ctx.config.baselines:
        rows.append(row(prep, 'pixels', image_run.fit_pixels(ctx.config, prep, ctx.opts),
                        headline=head, layer='-', width='-', variant='pixels'))
    return rows
