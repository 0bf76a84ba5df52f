"""The compiled pipeline: device modes agree, fused == cached, one program, main.py end to end.

Uses a tiny random Gemma-2 (transformers, saved with save_pretrained), a BPE tokenizer
trained on the texts, and random JumpReLU SAEs whose thresholds are set from the tiny
model's own pre-activations so that codes are sparse but not empty.
"""
import csv
import glob
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mosaic_jax import models
from mosaic_jax import parallel
from mosaic_jax import steps
from mosaic_jax.data import batching
from mosaic_jax.data import loading as data_loading
from mosaic_jax.probing import probe
from mosaic_jax.sae import loading as sae_loading
from mosaic_jax.variants import PeakPosition, SAEKey, Variant
from tests import tiny_assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = (1, 2)
WIDTH = 128
N_ROWS = 200


def _build(folder: str) -> dict:
    import torch
    import transformers

    ds = data_loading.load('sae_probes:95_toxic_is', max_rows=N_ROWS, seed=0)
    model_dir = os.path.join(folder, 'model')
    tiny_assets.save_tiny_tokenizer(model_dir, ds.texts, vocab_size=384)
    cfg = transformers.Gemma2Config(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
        query_pre_attn_scalar=24, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    transformers.Gemma2ForCausalLM(cfg).eval().save_pretrained(model_dir)

    model = models.load_model(model_dir, dtype='float32')
    tok = models.load_tokenizer(model_dir)
    ids, _ = batching.tokenize(ds.texts[:32], tok, 32)
    b = next(iter(batching.batches(ids, 32, pad_id=tok.pad_token_id)))
    resid = np.asarray(model.residuals(b.input_ids, b.attention_mask, LAYERS))
    for i, layer in enumerate(LAYERS):
        arrays = tiny_assets.random_sae_arrays(64, WIDTH, seed=layer)
        x = resid[i][np.asarray(b.attention_mask, bool)]           # [tokens, D]
        pre = x @ arrays['W_enc'] + arrays['b_enc']
        # ~30% of tokens fire each latent: sparse but informative codes.
        arrays['threshold'] = np.quantile(pre, 0.7, axis=0).clip(1e-3).astype(np.float32)
        sae_dir = os.path.join(folder, f'sae_layer_{layer}')
        os.makedirs(sae_dir)
        np.savez(os.path.join(sae_dir, 'params.npz'), **arrays)
    return dict(folder=folder, model_dir=model_dir, ds=ds)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return _build(str(tmp_path_factory.mktemp('tiny')))


@pytest.fixture(scope='module')
def loaded(tiny):
    model = models.load_model(tiny['model_dir'], dtype='float32')
    tok = models.load_tokenizer(tiny['model_dir'])
    saes = {SAEKey(l, str(WIDTH)): sae_loading.load_sae(
        os.path.join(tiny['folder'], f'sae_layer_{l}'), d_model=64) for l in LAYERS}
    spec = steps.FeatureSpec.build(
        layers=LAYERS, config_layers=LAYERS, saes=saes,
        pooling=('mosaic', 'mean', 'max'), binarize=(False, True), top_n=0, threshold=0.5,
        chunk_size=0, hidden=('last', 'mean'))
    ids, _ = batching.tokenize(tiny['ds'].texts, tok, 32)
    out = dict(model=model, tok=tok, saes=saes, spec=spec, ids=ids)
    # Every comparison of two extraction programs (devices, batch sizes, width chunks,
    # padding) must not depend on codes within rounding of their threshold.
    out['saes'] = _gapped_thresholds(out)
    return out


def _extract(loaded, mode, batch_size=16):
    ex = steps.Extractor(loaded['model'], loaded['saes'], loaded['spec'],
                            parallel.Devices(mode))
    batches = batching.batches(loaded['ids'], batch_size, pad_id=loaded['tok'].pad_token_id,
                               multiple_of=8)
    return steps.extract(ex, batches, len(loaded['ids']), bos_id=loaded['tok'].bos_token_id,
                            include_special=False, progress=False)


def test_pmap_and_mesh_equal_one_device(loaded):
    assert jax.device_count() == 8
    one = _extract(loaded, 'single')
    for mode in ('pmap', 'mesh'):
        many = _extract(loaded, mode)
        assert one.keys() == many.keys()
        for k in one:
            # Same XLA ops per row on every device; only reduction order may differ.
            np.testing.assert_allclose(many[k], one[k], atol=1e-5, rtol=1e-5, err_msg=k)
    # Codes are informative: neither all zero nor all on.
    k = Variant(SAEKey(1, str(WIDTH)), 'mean', binarized=True)
    assert 0.05 < one[k].mean() < 0.95


def test_streaming_batch_size_does_not_change_features(loaded):
    a = _extract(loaded, 'single', batch_size=8)
    b = _extract(loaded, 'single', batch_size=32)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-5, err_msg=k)


def _gapped_thresholds(loaded, margin: float = 1e-3) -> dict:
    """Copies of the SAEs whose every threshold sits at least `margin` away from every
    pre-activation the test texts produce.

    A JumpReLU code flips when `pre - threshold` is within the matmul's rounding error
    (~1e-6 here) of zero, and the width-chunked and full encodes block their sums
    differently, so near-threshold latents made the comparison machine-dependent. Each
    latent's threshold moves to the midpoint of the widest gap between its sorted
    pre-activations around the original quantile.
    """
    import dataclasses
    ids = loaded['ids']
    b = next(iter(batching.batches(ids, len(ids), pad_id=loaded['tok'].pad_token_id)))
    resid = np.asarray(loaded['model'].residuals(b.input_ids, b.attention_mask, LAYERS),
                       np.float64)
    real = np.asarray(b.attention_mask, bool)
    out = {}
    for key, li in loaded['spec'].saes:
        p = loaded['saes'][key]
        x = resid[li][real]                                               # [tokens, D]
        pre = np.sort(x @ np.asarray(p.w_enc, np.float64) + np.asarray(p.b_enc, np.float64),
                      axis=0)                                             # [tokens, F]
        lo, hi = int(0.5 * len(pre)), int(0.9 * len(pre))
        gaps = pre[lo + 1:hi] - pre[lo:hi - 1]                            # [k, F]
        j = gaps.argmax(axis=0)
        f = np.arange(pre.shape[1])
        assert (gaps[j, f] > 2 * margin).all(), 'no wide gap: enlarge the window'
        thr = (pre[lo + j, f] + pre[lo + j + 1, f]) / 2
        out[key] = dataclasses.replace(p, threshold=jnp.asarray(thr, jnp.float32))
    return out


def test_width_chunked_extraction_equals_full(loaded):
    import dataclasses
    full = _extract(loaded, 'single')
    chunked = dict(loaded, spec=dataclasses.replace(loaded['spec'], chunk_size=WIDTH // 4))
    got = _extract(chunked, 'single')
    # A chunked encode never holds a text's codes whole, so it records no peak positions.
    assert set(full) - set(got) == {PeakPosition(k) for k in loaded['saes']}
    for k in got:
        # Same per-latent math; only the matmul is split over width blocks. No threshold
        # lies within 1e-3 of a pre-activation, so no code can flip on rounding.
        np.testing.assert_allclose(got[k], full[k], atol=1e-5, rtol=1e-5, err_msg=k)


def test_row_chunked_extraction_equals_whole_batch(loaded, monkeypatch):
    # A wide SAE's codes are encoded and pooled a few texts at a time (steps.CODES_BYTES);
    # the features, peak positions included, are the whole batch's.
    full = _extract(loaded, 'single')
    assert steps._row_chunk(16, 32, WIDTH) == 16
    monkeypatch.setattr(steps, 'CODES_BYTES', 4 * 32 * WIDTH * 4)  # 4 texts of 32 tokens
    assert steps._row_chunk(16, 32, WIDTH) == 4 and steps._row_chunk(6, 32, WIDTH) == 3
    got = _extract(loaded, 'single')
    assert got.keys() == full.keys()
    for k in full:
        np.testing.assert_allclose(got[k], full[k], atol=1e-5, rtol=1e-5, err_msg=str(k))


def test_include_special_counts_bos_but_never_padding(loaded):
    """include_special=True: BOS counts (MOSAIC), padding never does, so a text's `last` and
    `mean` features do not depend on how far its batch is padded."""
    ex = steps.Extractor(loaded['model'], loaded['saes'], loaded['spec'],
                         parallel.Devices('single'))
    ids, pad, bos = loaded['ids'], loaded['tok'].pad_token_id, loaded['tok'].bos_token_id
    got = {}
    for length in (32, 64):  # the bucket, and twice as much padding
        batches = batching.batches(ids, 16, pad_id=pad, pad_batch_to=length)
        got[length] = steps.extract(ex, batches, len(ids), bos_id=bos, include_special=True,
                                    progress=False)
    without_bos = _extract(loaded, 'single')
    keys = [k for k in got[32] if getattr(k, 'pooling', '') in ('last', 'mean')]
    assert len(keys) == 2 * len(LAYERS) + 2 * len(LAYERS)  # SAE mean (+bin), hidden last/mean
    for k in keys:
        # Real tokens' residuals are the same computation; padding is masked out.
        np.testing.assert_allclose(got[64][k], got[32][k], atol=1e-5, rtol=1e-5, err_msg=k)
    mean = Variant(SAEKey(1, str(WIDTH)), 'mean')
    assert np.abs(got[32][mean] - without_bos[mean]).max() > 1e-3  # BOS really counts


def _fused_setup(loaded, mode):
    ds_labels = np.asarray(data_loading.load('sae_probes:95_toxic_is', max_rows=N_ROWS, seed=0).labels)
    key = Variant(SAEKey(2, str(WIDTH)), 'mean')
    devices = parallel.Devices(mode)
    trainer = steps.FusedTrainer(loaded['model'], loaded['saes'], loaded['spec'], key,
                                 devices, C=1.0, lr=1e-2, n_train=len(ds_labels),
                                 num_classes=2)

    def batches_fn(epoch):
        del epoch  # the same length-sorted order every epoch: a deterministic comparison
        return batching.batches(loaded['ids'], 16, pad_id=loaded['tok'].pad_token_id,
                                multiple_of=8)
    return ds_labels, key, trainer, batches_fn


def _train_cached(x, labels, class_weight, batches_fn, *, epochs, lr, C, num_classes):
    """The reference for fused training: the same probe step on stored features, fed in the
    same batch order (batching.Batch.index selects rows)."""
    tx = optax.adam(lr)
    params = probe.init_params(x.shape[1], num_classes)
    opt_state = tx.init(params)
    step = jax.jit(probe.make_train_step(tx, C=C, num_classes=num_classes,
                                         n_train=len(labels)))
    for epoch in range(epochs):
        for b in batches_fn(epoch):
            idx, lab, w, valid = steps.batch_targets(b, labels, class_weight)
            params, opt_state, _ = step(params, opt_state, np.asarray(x[idx], np.float32),
                                        lab, w, valid)
    return params


def test_fused_equals_cached_and_devices_agree(loaded):
    labels, key, _, batches_fn = _fused_setup(loaded, 'single')
    weights = probe.class_weights(labels, 2)
    feats = _extract(loaded, 'single')
    cached = _train_cached(feats[key], labels, weights, batches_fn, epochs=2, lr=1e-2, C=1.0,
                           num_classes=2)
    preds = {}
    for mode in ('single', 'pmap', 'mesh'):
        _, _, trainer, _ = _fused_setup(loaded, mode)
        losses = steps.train_fused(trainer, batches_fn, labels, weights, epochs=2,
                                   bos_id=loaded['tok'].bos_token_id, include_special=False)
        assert losses[-1] < losses[0]
        for a, b in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(cached)):
            # Identical features and update; float32 reduction order differs across modes.
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
        preds[mode] = np.asarray(probe.predict(trainer.params, feats[key]))
    cached_pred = np.asarray(probe.predict(cached, feats[key]))
    for mode, p in preds.items():
        np.testing.assert_array_equal(p, cached_pred, err_msg=mode)


@pytest.mark.parametrize('mode', ['pmap', 'mesh'])
def test_fused_step_is_one_program_with_forward_and_update(loaded, mode):
    labels, key, trainer, batches_fn = _fused_setup(loaded, mode)
    b = next(iter(batches_fn(0)))
    fm = steps.feature_mask(b.input_ids, b.attention_mask, loaded['tok'].bos_token_id, False)
    lab = np.zeros(len(b.index), np.int32)
    w = np.ones(len(b.index), np.float32)
    valid = np.asarray(b.valid, bool)
    text = trainer.lowered_text(b, fm, lab, w, valid)
    # One StableHLO module with a single public entry point...
    assert text.count('func.func public @main') == 1
    # ...that contains the model forward (its attention-softmax exp, GELU tanh, RMSNorm
    # rsqrt) and the optax Adam update (named scope of probe.make_train_step).
    for op in ('stablehlo.tanh', 'stablehlo.rsqrt', 'stablehlo.exponential'):
        assert op in text, op
    assert 'probe_update' in trainer._step.lower(*trainer._args(b, fm, lab, w, valid)).as_text(
        debug_info=True)


def _main(tiny, workdir, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=8')
    cmd = [sys.executable, 'main.py', '--config=configs/tiny.py',
           f'--config.model.path={tiny["model_dir"]}',
           f'--config.sae.source={tiny["folder"]}/sae_layer_{{layer}}',
           f'--config.workdir={workdir}', *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_main_tiny_end_to_end(tiny, tmp_path):
    r = _main(tiny, tmp_path, '--config.run_id=r1', '--config.report=True')
    assert r.returncode == 0, r.stderr[-4000:]
    assert 'macroF1' in r.stdout  # the summary table
    files = glob.glob(f'{tmp_path}/tiny/95_toxic_is/layer_*/{WIDTH}/r1/*_classifier_results.json')
    assert len(files) == 2 * len(LAYERS), files
    for f in files:
        res = json.load(open(f))
        assert {'metadata', 'models'} <= res.keys()
        perf = res['models']['linearProbe']['performance']
        assert 0.0 <= perf['accuracy'] <= 1.0
        macro = res['models']['linearProbe']['aggregated_metrics']['macro avg']['f1_score']
        assert 0.0 <= macro <= 1.0
        assert res['metadata']['mosaic_jax']['config']['model']['path'] == tiny['model_dir']
        cv = perf['cross_validation']  # tiny.py sets cv_folds=2
        assert len(cv['fold_scores']) == 2 and 0.0 <= cv['mean_accuracy'] <= 1.0
    rows = list(csv.DictReader(open(f'{tmp_path}/tiny/_runs/r1/summary.csv')))
    kinds = {r['kind'] for r in rows}
    assert {'sae', 'hidden', 'tfidf', 'tree'} <= kinds
    for r in rows:
        assert 0.0 <= float(r['macro_f1']) <= 1.0
    # TF-IDF on real toxic-comment texts is far above chance.
    tfidf = [float(r['macro_f1']) for r in rows if r['kind'] == 'tfidf']
    assert tfidf[0] > 0.6
    html = open(tmp_path / 'report.html').read()
    assert '95_toxic_is' in html and '<img' in html
    _check_audit(tmp_path, rows, files)


def test_probe_threads_change_no_result(tiny, tmp_path):
    """probe.threads=3 fits the probes side by side: summary rows (order included) and the
    result JSONs equal one thread's, seconds aside. The second run reads the store."""
    extra = ('--config.probe.sparse_k=(5,)', "--config.features.pooling=('mean','max')",
             "--config.baselines=('hidden_mean','hidden_last','tfidf','decision_tree')")
    for run, n in (('t1', 1), ('t3', 3)):
        r = _main(tiny, tmp_path, f'--config.run_id={run}', f'--config.probe.threads={n}',
                  *extra)
        assert r.returncode == 0, r.stderr[-4000:]

    def table(run):
        rows = list(csv.DictReader(open(tmp_path / 'tiny' / '_runs' / run / 'summary.csv')))
        return [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]

    def strip(x):  # result JSONs without clocks and the two settings that differ
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()
                    if 'second' not in k and k not in ('timestamp', 'run_id', 'threads')}
        return [strip(v) for v in x] if isinstance(x, list) else x

    one, three = table('t1'), table('t3')
    assert len(one) > 10 and one == three
    for f in sorted(glob.glob(f'{tmp_path}/tiny/95_toxic_is/layer_*/{WIDTH}/t1/*.json')):
        g = f.replace('/t1/', '/t3/')
        assert strip(json.load(open(f))) == strip(json.load(open(g))), f


def _check_audit(workdir, rows, files):
    """The numbers of a run survive an audit: no text in two splits, one macro-F1 in the
    JSON and the summary, an interval around every test score, one selected row per kind."""
    split_rows = list(csv.DictReader(open(workdir / 'tiny' / '_runs' / 'r1' / 'splits' /
                                          '95_toxic_is.csv')))
    assert len(split_rows) == N_ROWS
    where = {}
    for r in split_rows:
        where.setdefault(' '.join(r['text'].split()).casefold(), set()).add(r['split'])
    assert all(len(v) == 1 for v in where.values())  # copies never straddle splits
    assert sum(1 for v in where.values()) < N_ROWS   # the set really has copies
    for r in rows:
        if r['kind'] in ('sae', 'hidden', 'tfidf', 'tree'):
            lo, v, hi = (float(r[k]) for k in ('macro_f1_lo', 'macro_f1', 'macro_f1_hi'))
            assert lo <= v <= hi and hi - lo > 0.01, r
    for kind in ('sae', 'hidden', 'tfidf', 'tree'):
        assert sum(r['selected'] == 'True' for r in rows if r['kind'] == kind) == 1, kind
    for f in files:
        if not f.endswith('sae_classifier_results.json'):
            continue
        res = json.load(open(f))
        layer = str(res['metadata']['model']['layer'])
        best = res['metadata']['mosaic_jax']['variant']
        row = [r for r in rows if r['kind'] == 'sae' and r['layer'] == layer
               and r['variant'] == best][0]
        macro = res['models']['linearProbe']['aggregated_metrics']['macro avg']['f1_score']
        assert abs(macro - float(row['macro_f1'])) < 1e-4  # summary rounds to 4 places
        assert res['variants'][best]['test']['macro_f1'] == pytest.approx(macro, abs=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_multihost_two_processes_match_one(tiny, tmp_path):
    """Two processes x 2 CPU devices on 127.0.0.1 form one 4-device job (gloo)."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1',
               XLA_FLAGS='--xla_force_host_platform_device_count=2')
    worker = os.path.join(ROOT, 'tests', 'multihost_worker.py')
    procs = [subprocess.Popen(
        [sys.executable, worker, tiny['model_dir'], tiny['folder'], str(tmp_path), str(port),
         str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-4000:]
    multi = np.load(tmp_path / 'features_mh.npz')
    single_env = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    r = subprocess.run([sys.executable, worker, tiny['model_dir'], tiny['folder'],
                        str(tmp_path), '0', '-1'], cwd=ROOT, env=single_env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    single = np.load(tmp_path / 'features_1p.npz')
    assert set(multi.files) == set(single.files)
    for k in single.files:
        np.testing.assert_allclose(multi[k], single[k], atol=1e-5, rtol=1e-5, err_msg=k)
    m_rows = list(csv.DictReader(open(tmp_path / 'mh' / 'tiny' / '_runs' / 'mh' / 'summary.csv')))
    s_rows = list(csv.DictReader(open(tmp_path / '1p' / 'tiny' / '_runs' / '1p' / 'summary.csv')))
    assert [r['macro_f1'] for r in m_rows] == [r['macro_f1'] for r in s_rows]
    # Only process 0 wrote results: one summary for the two-process run.
    assert len(glob.glob(str(tmp_path / 'mh' / 'tiny' / '_runs' / '*'))) == 1


def test_main_seeds_and_cv_selection(tiny, tmp_path):
    """seeds=(0, 1): one extraction, a split + probes per seed, seeds.csv with mean and std;
    probe.select=cv chooses by grouped K-fold CV on train + val."""
    r = _main(tiny, tmp_path, '--config.run_id=s', '--config.seeds=(0,1)', '--verbosity=1',
              '--config.probe.select=cv', '--config.probe.select_folds=3',
              '--config.probe.sparse_k=(1,5,0)',
              "--config.baselines=('hidden_mean','tfidf')", "--config.features.pooling=('mean',)",
              '--config.cv_folds=0')
    assert r.returncode == 0, r.stderr[-4000:]
    run = tmp_path / 'tiny' / '_runs' / 's'
    rows = list(csv.DictReader(open(run / 'summary.csv')))
    assert {r['seed'] for r in rows} == {'0', '1'}
    for seed in ('0', '1'):
        mine = [r for r in rows if r['seed'] == seed]
        for kind in ('sae', 'hidden', 'tfidf'):
            assert sum(r['selected'] == 'True' for r in mine if r['kind'] == kind) == 1
    agg = list(csv.DictReader(open(run / 'seeds.csv')))
    tfidf = [a for a in agg if a['kind'] == 'tfidf'][0]
    vals = [float(r['macro_f1']) for r in rows if r['kind'] == 'tfidf']
    assert int(tfidf['n_seeds']) == 2
    assert float(tfidf['macro_f1_mean']) == pytest.approx(np.mean(vals), abs=1e-4)
    assert float(tfidf['macro_f1_std']) == pytest.approx(np.std(vals, ddof=1), abs=1e-4)
    s0 = [r['split'] for r in csv.DictReader(open(run / 'splits' / '95_toxic_is_seed0.csv'))]
    s1 = [r['split'] for r in csv.DictReader(open(run / 'splits' / '95_toxic_is_seed1.csv'))]
    assert s0 != s1  # a new split per seed
    assert r.stderr.count('extracted 200 texts') == 1  # features extracted once, not per seed
    sparse = [r for r in rows if r['kind'] == 'sparse' and r['seed'] == '0']
    assert sorted(int(r['k']) for r in sparse) == sorted([1, 5, WIDTH] * len(LAYERS))
    for r in sparse:  # k = all features is the chosen variant's own probe
        if int(r['k']) == WIDTH:
            same = [x for x in rows if x['kind'] == 'sae' and x['seed'] == '0'
                    and x['layer'] == r['layer'] and x['variant'] == r['variant']]
            assert same[0]['macro_f1'] == r['macro_f1']


def _safe_top_ns(loaded, candidates=(2, 3, 4, 5, 6, 7, 9, 11), margin=1e-5) -> list[int]:
    """top_n values whose per-token top-n boundary is decided far from rounding for every
    real token of layer 1 (float64 check): rank flips between two programs are impossible."""
    ids = loaded['ids']
    b = next(iter(batching.batches(ids, len(ids), pad_id=loaded['tok'].pad_token_id)))
    resid = np.asarray(loaded['model'].residuals(b.input_ids, b.attention_mask, (1,)),
                       np.float64)[0][np.asarray(b.attention_mask, bool)]
    p = loaded['saes'][SAEKey(1, str(WIDTH))]
    pre = resid @ np.asarray(p.w_enc, np.float64) + np.asarray(p.b_enc, np.float64)
    acts = np.where(pre > np.asarray(p.threshold, np.float64), pre, 0.0)
    srt = -np.sort(-acts, axis=1)
    ok = []
    for n in candidates:
        gap = srt[:, n - 1] - srt[:, n]
        # A boundary between two zeros is no tie that matters: zero picks are not counted.
        if np.all((gap > margin) | (srt[:, n - 1] == 0)):
            ok.append(n)
    return ok


def test_top_n_sweep_in_one_pass_equals_one_run_per_top_n(loaded):
    tops = _safe_top_ns(loaded)[:2]
    assert len(tops) == 2, 'no top_n with a safe margin: widen the candidates'
    key = SAEKey(1, str(WIDTH))

    def run(top_n, mode='single'):
        spec = steps.FeatureSpec.build(layers=(1,), config_layers=(1,), saes=[key],
                                       pooling=('mosaic',), binarize=(False, True),
                                       top_n=top_n, threshold=0.5)
        return _extract(dict(loaded, spec=spec, saes={key: loaded['saes'][key]}), mode)
    sweep = run((0,) + tuple(tops))
    assert len(sweep) == 2 * 3  # 3 top_n x binarize, from one extraction
    for mode in ('mesh', 'pmap'):  # the top-n count's scatter under each device mode
        many = run((0,) + tuple(tops), mode)
        for v in sweep:
            np.testing.assert_allclose(many[v], sweep[v], atol=1e-5, rtol=1e-5, err_msg=v.name)
    for n in (0,) + tuple(tops):
        one = run((n,))
        for v, x in one.items():
            if n:  # integer counts: exactly equal
                np.testing.assert_array_equal(sweep[v], x, err_msg=v.name)
            else:  # summed activations: the same sums
                np.testing.assert_allclose(sweep[v], x, atol=1e-5, rtol=1e-5, err_msg=v.name)
    assert not np.array_equal(sweep[Variant(key, 'mosaic', tops[0])],
                              sweep[Variant(key, 'mosaic', tops[1])])


def test_main_cross_group_transfer(tiny, tmp_path):
    """Train on each group of a two-language file, test on both: the matrix, the subsets
    each cell is scored on, and the in-group cell equal to the summary's in-group result."""
    ds = tiny['ds']
    other = [' '.join(w[::-1] for w in t.split()) for t in ds.texts]  # a "second language"
    path = tmp_path / 'multi.csv'
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['prompt', 'target', 'lang'])
        for t, o, y in zip(ds.texts, other, ds.labels):
            w.writerow([t, int(y), 'en'])
            w.writerow([o, int(y), 'xx'])
    r = _main(tiny, tmp_path, '--config.run_id=t', f"--config.data.datasets=('{path}',)",
              '--config.data.group_field=lang', '--config.data.max_rows=0',
              "--config.baselines=('hidden_last','tfidf')",
              "--config.features.pooling=('mean',)", '--config.cv_folds=0',
              '--config.report=True')
    assert r.returncode == 0, r.stderr[-4000:]
    run = tmp_path / 'tiny' / '_runs' / 't'
    html = open(tmp_path / 'report.html').read()
    assert 'Transfer: train group x test group' in html and 'sae transfer heat map' in html
    cells = list(csv.DictReader(open(run / 'transfer.csv')))
    methods = {(c['kind'], c['layer'], c['width']) for c in cells}
    assert len(methods) == len(LAYERS) * 2 + 1  # an SAE and a hidden probe per layer, TF-IDF
    assert {(c['train_group'], c['test_group']) for c in cells} == {
        ('en', 'en'), ('en', 'xx'), ('xx', 'xx'), ('xx', 'en')}
    assert len(cells) == 4 * len(methods)
    split = list(csv.DictReader(open(run / 'splits' / 'multi.csv')))
    assert len(split) == 2 * N_ROWS  # file order kept (max_rows=0): even rows en, odd xx
    n_test = {g: sum(1 for s in split if s['split'] == 'test'
                     and int(s['index']) % 2 == (g == 'xx')) for g in ('en', 'xx')}
    for c in cells:
        if c['train_group'] == c['test_group']:  # own test split
            assert int(c['n_test']) == n_test[c['test_group']]
        else:  # every row of the other group (copies of training texts aside)
            assert 0.9 * N_ROWS <= int(c['n_test']) <= N_ROWS
        assert float(c['macro_f1_lo']) <= float(c['macro_f1']) <= float(c['macro_f1_hi'])
    summary = list(csv.DictReader(open(run / 'summary.csv')))
    for c in cells:
        if c['train_group'] == c['test_group'] == 'en' and c['kind'] == 'tfidf':
            s = [x for x in summary if x['kind'] == 'tfidf' and x['train_group'] == 'en']
            assert len(s) == 1 and s[0]['n_test'] == c['n_test'] and float(s[0]['macro_f1']) == pytest.approx(float(c['macro_f1']),
                                                                  abs=1e-4)
    overlap = list(csv.DictReader(open(run / 'feature_overlap.csv')))
    assert overlap and all(0.0 <= float(o['overlap']) <= 1.0 for o in overlap)
