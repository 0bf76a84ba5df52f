"""Saved probes (what a classify run writes) and `mode='predict'` (what applies them).

A classify run saves each dataset's selected SAE probe and its selected hidden-state and
TF-IDF baselines under `<run folder>/probes/<dataset>/<kind>/` (probing.saved). Then

  main.py --config=<the run's config> --config.mode=predict \\
      --config.predict.probe=<workdir>/<model>/_runs/<run_id> \\
      --config.data.datasets="('new.csv',)" [--config.predict.dataset=<name>] \\
      [--config.predict.kind=sae|hidden|tfidf]

writes `predictions.csv` in a new run folder: the input row, `predicted_label` (spelled as
in the training data), `p_<label>` per class and, for SAE probes, the `predict.top_k`
features that pushed the text most towards its prediction with their contributions. A
label column, when present, is scored (scores.json). Features go through the feature store,
so texts the run saw are not extracted again. Every check that the input alone can fail
(probe folder, model / SAE identity, text column) runs before the model loads.
"""
from __future__ import annotations

import os

from absl import logging
import numpy as np

from mosaic_jax import parallel
from mosaic_jax import results
from mosaic_jax import steps
from mosaic_jax import store as store_lib
from mosaic_jax.checks import UserError
from mosaic_jax.data import batching
from mosaic_jax.data import loading as data_loading
from mosaic_jax.experiments import assets
from mosaic_jax.probing import baselines
from mosaic_jax.probing import metrics
from mosaic_jax.probing import probe
from mosaic_jax.probing import saved as saved_lib
from mosaic_jax.sae import loading as sae_loading
from mosaic_jax.variants import HiddenVariant, SAEKey, Variant

# ----------------------------------------------------------------------------------------
# Saving what a run chose
# ----------------------------------------------------------------------------------------


def _variant_dict(v: Variant) -> dict:
    return dict(layer=v.layer, width=v.width, pooling=v.pooling, top_n=v.top_n,
                binarized=v.binarized, name=v.name)


def saved_probes(config, rows: list[dict], fitted: dict, ds, test_rows: np.ndarray,
                 spec: steps.FeatureSpec, fingerprints: tuple, bos_id) -> list[tuple]:
    """(folder, SavedProbe) for each selected sae / hidden / tfidf row of one dataset."""
    model_fp, sae_fps = fingerprints
    base = dict(dataset=ds.name, label_names=list(ds.label_names),
                model=dict(path=config.model.path, name=config.model.name,
                           fingerprint=model_fp, dtype=config.model.dtype,
                           matmul_precision=config.model.matmul_precision,
                           layer_convention=config.model.layer_convention),
                tokenizer=dict(max_length=int(config.model.max_length),
                               pad_side=config.model.pad_side, bos_id=bos_id,
                               include_special=bool(config.features.include_special)),
                text_field=config.data.text_field)
    out = []
    for r in rows:
        if not r.get('selected') or r['kind'] not in saved_lib.KINDS:
            continue
        res = fitted[(r['kind'], r['layer'], r['width'], r['variant'])]
        info = dict(base, kind=r['kind'], C=res.C, select_score=r.get('select_score'),
                    test={m: r.get(m) for m in config.metrics})
        if r['kind'] == 'sae':
            key = res.key.sae
            info.update(variant=_variant_dict(res.key), sae=dict(
                source=assets.resolve_sae_source(config.sae.source, key.layer, key.width),
                fingerprint=sae_fps[key]),
                features=dict(threshold=spec.threshold, chunk_size=spec.chunk_size,
                              block=spec.layers[dict(spec.saes)[key]],
                              variants=[_variant_dict(v) for v in spec.variants
                                        if v.sae == key]))
        elif r['kind'] == 'hidden':
            li = dict(spec.hidden)[res.key]
            info.update(hidden=dict(layer=res.key.layer, pooling=res.key.pooling),
                        features=dict(block=spec.layers[li], poolings=[
                            hv.pooling for hv, i in spec.hidden if i == li]))
        out.append((r['kind'], saved_lib.SavedProbe(info, res.params, test_rows,
                                                    res.test_proba)))
    return out


# ----------------------------------------------------------------------------------------
# mode='predict'
# ----------------------------------------------------------------------------------------

def _probe_folder(config) -> str:
    """The saved probe this predict run applies, checked (UserError when absent)."""
    p = config.predict
    run = os.path.expanduser(p.probe)
    root = os.path.join(run, 'probes')
    if not p.probe or not os.path.isdir(root):
        raise UserError(f'predict.probe={p.probe!r} holds no saved probes (no {root}); pass '
                        f'the run folder of a classify run: <workdir>/<model>/_runs/<run_id>')
    names = sorted(os.listdir(root))
    name = p.dataset or (names[0] if len(names) == 1 else '')
    if name not in names:
        raise UserError(f'predict.dataset={p.dataset!r}: the run saved probes for {names}; '
                        f'name one with --config.predict.dataset=<name>')
    return saved_lib.folder(run, name, p.kind)


def _check_identity(config, saved: saved_lib.SavedProbe) -> None:
    """The model (and SAE) the probe was trained on are the ones this run would load."""
    m = saved.info['model']
    if m['path'] != config.model.path:
        raise UserError(f"the probe was trained on model {m['path']!r}, but model.path is "
                        f"{config.model.path!r}; pass --config.model.path={m['path']}")
    if m['fingerprint'] != assets.model_fingerprint(config):
        raise UserError(f"model {m['path']!r} is not the one the probe was trained on (its "
                        f'files changed since; fingerprints differ): retrain the probe')
    if saved.kind == 'sae':
        s = saved.info['sae']
        if s['fingerprint'] != store_lib.path_fingerprint(s['source']):
            raise UserError(f"SAE {s['source']!r} is missing or differs from the one the "
                            f'probe was trained on (fingerprints differ): retrain the probe')


def _spec(saved: saved_lib.SavedProbe) -> tuple[steps.FeatureSpec, object]:
    """The feature step of the probe's training run (same variants: same store group)."""
    f = saved.info['features']
    if saved.kind == 'sae':
        key = SAEKey(int(saved.info['variant']['layer']), str(saved.info['variant']['width']))
        variants = tuple(Variant(key, v['pooling'], int(v['top_n']), bool(v['binarized']))
                         for v in f['variants'])
        v = saved.info['variant']
        mine = Variant(key, v['pooling'], int(v['top_n']), bool(v['binarized']))
        return steps.FeatureSpec(layers=(int(f['block']),), saes=((key, 0),),
                                 variants=variants, hidden=(), threshold=float(f['threshold']),
                                 chunk_size=int(f['chunk_size'])), mine
    h = saved.info['hidden']
    hidden = tuple((HiddenVariant(int(h['layer']), p), 0) for p in f['poolings'])
    return steps.FeatureSpec(layers=(int(f['block']),), saes=(), variants=(), hidden=hidden,
                             threshold=0.0, chunk_size=0), HiddenVariant(int(h['layer']),
                                                                        h['pooling'])


def _features(config, saved, texts: list[str]) -> tuple[np.ndarray, object]:
    """(features of the texts for the probe's variant, the variant)."""
    spec, variant = _spec(saved)
    model, tokenizer = assets.load_model(config)
    saes = {}
    if saved.kind == 'sae':
        try:
            saes = {spec.saes[0][0]: sae_loading.load_sae(saved.info['sae']['source'],
                                                          d_model=model.config.embed_dim)}
        except (ValueError, FileNotFoundError, OSError) as e:
            raise UserError(f"SAE {saved.info['sae']['source']}: {e}") from e
    tok = saved.info['tokenizer']
    ids, _ = batching.tokenize(texts, tokenizer, int(tok['max_length']))
    devices = parallel.Devices(config.parallel.mode)
    batches = batching.batches(ids, config.model.batch_size, pad_id=tokenizer.pad_token_id,
                               pad_side=tok['pad_side'], multiple_of=devices.count)
    opts = store_lib.StoreOptions.from_config(config, parallel.single_process())
    kw = dict(bos_id=tokenizer.bos_token_id, include_special=tok['include_special'])
    if opts.enabled:
        sae_fps = {k: saved.info['sae']['fingerprint'] for k in saes}
        groups = steps.store_groups(spec, assets.model_fingerprint(config), sae_fps, **kw)
        feats = steps.extract_stored(spec, steps.extractors(model, saes, devices), groups,
                                     opts, ids, batches, **kw)
    else:
        feats = steps.extract(steps.Extractor(model, saes, spec, devices), batches, len(ids),
                              **kw)
    return np.asarray(feats[variant]), variant


def _prediction_rows(saved, proba: np.ndarray, index: np.ndarray, x, top_k: int) -> tuple:
    names = saved.label_names
    pred = proba.argmax(1)
    rows = [dict(index=int(i), predicted_label=names[c],
                 **{f'p_{n}': float(p) for n, p in zip(names, pr)})
            for i, c, pr in zip(index, pred, proba)]
    fields = ['index', 'predicted_label'] + [f'p_{n}' for n in names]
    if saved.kind == 'sae' and top_k:
        idx, contrib = saved_lib.contributions(saved.params, x, pred, top_k)
        for r, fi, co in zip(rows, idx, contrib):
            for j in range(idx.shape[1]):
                r[f'feature_{j + 1}'], r[f'contribution_{j + 1}'] = int(fi[j]), float(co[j])
        fields += [f'{p}_{j + 1}' for j in range(idx.shape[1])
                   for p in ('feature', 'contribution')]
    return rows, fields


def _scores(saved, labels: list, proba: np.ndarray, n_bootstrap: int) -> dict | None:
    """Metrics on the rows whose label the probe knows (None without a label column)."""
    if labels is None:
        return None
    names = saved.label_names
    code = {n: k for k, n in enumerate(names)}
    y = np.asarray([code.get(str(v), -1) for v in labels])
    known = y >= 0
    if not known.any():
        logging.warning('predict: no label of the dataset is one of the probe\'s %s', names)
        return dict(n_scored=0)
    out = metrics.compute_with_intervals(y[known], proba[known], n_resamples=n_bootstrap)
    return dict(out, n_scored=int(known.sum()), n_unknown_label=int((~known).sum()))


def run(config, run_folder: str) -> list[dict]:
    """mode='predict' (module docstring); returns the prediction rows."""
    path = _probe_folder(config)
    try:
        saved = saved_lib.load(path)
    except ValueError as e:
        raise UserError(str(e)) from e
    if len(config.data.datasets) != 1:
        raise UserError(f'mode=predict reads one dataset; data.datasets has '
                        f'{len(config.data.datasets)}: {tuple(config.data.datasets)}')
    try:
        name, texts, index, labels = data_loading.read_texts(
            config.data.datasets[0], text_field=saved.info['text_field'],
            label_field=config.data.label_field, encoding=config.data.encoding)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f'dataset {config.data.datasets[0]!r}: {e}') from e
    if saved.kind == 'tfidf':
        x = None
        proba = baselines.predict_proba(saved.params, texts, len(saved.label_names))
    else:
        _check_identity(config, saved)
        x, _ = _features(config, saved, texts)
        proba = np.asarray(probe.predict_proba(saved.params, np.asarray(x, np.float32)))
    rows, fields = _prediction_rows(saved, proba, index, x, int(config.predict.top_k))
    results.write_csv(os.path.join(run_folder, 'predictions.csv'), rows, fields,
                      float_format='.9g')
    scored = _scores(saved, labels, proba, int(config.n_bootstrap))
    results.write_json(run_folder, 'predict.json', dict(
        probe=path, dataset=name, n=len(rows), kind=saved.kind, scores=scored))
    print(f'predictions: {len(rows)} texts of {name} -> '
          f"{os.path.join(run_folder, 'predictions.csv')}", flush=True)
    if scored and scored.get('n_scored') and 'macro_f1_lo' in scored:
        print(f"macro-F1 {scored['macro_f1']:.4f} [{scored['macro_f1_lo']:.4f}, "
              f"{scored['macro_f1_hi']:.4f}] on {scored['n_scored']} labelled rows", flush=True)
    return rows
