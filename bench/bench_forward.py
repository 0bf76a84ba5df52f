"""Forward throughput on the real Gemma 3 270M: our jitted Flax residuals vs transformers.

Both read the same GGUF weights in float32 and process the same real texts (sae-probes
`102_twt_emotion`, batches of 32, padded to the batch's longest text). Measured side by
side in one process, alternating, after a warm-up; prints padded and real tokens/s and
the ratio.

  python bench/bench_forward.py [--texts 256] [--layer 13] [--repeats 3]

Reference (MOSAIC's way): `AutoModelForCausalLM(...)(ids, output_hidden_states=True)` in
torch eager, which runs every block and the 262k-vocab LM head on every token.
Ours: `model.residuals(ids, mask, layers=(layer,))`, jitted, stopping after `layer`.
Requires torch (the test extra) for the reference side.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--texts', type=int, default=256)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--layer', type=int, default=13)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--max_length', type=int, default=128)
    args = ap.parse_args()

    import torch
    import transformers
    from mosaic_jax import models
    from mosaic_jax.data import batching
    from mosaic_jax.data import loading as data_loading

    ds = data_loading.load('sae_probes:102_twt_emotion', max_rows=args.texts, seed=0)
    model = models.load_model('gemma3_270m', dtype='float32')
    tok = models.load_tokenizer('gemma3_270m')
    ids, _ = batching.tokenize(ds.texts, tok, args.max_length)
    # Batches in dataset order (no length bucketing) so both sides pad identically.
    batches = []
    for s in range(0, len(ids), args.batch):
        chunk = ids[s:s + args.batch]
        L = max(len(i) for i in chunk)
        x = np.full((len(chunk), L), tok.pad_token_id, np.int32)
        m = np.zeros((len(chunk), L), bool)
        for r, i in enumerate(chunk):
            x[r, :len(i)], m[r, :len(i)] = i, True
        batches.append((x, m))
    padded = sum(x.size for x, _ in batches)
    real = sum(int(m.sum()) for _, m in batches)

    import flax.nnx as nnx
    graphdef, state = nnx.split(model)
    layers = (args.layer,)

    @jax.jit
    def ours(state, x, m):
        return nnx.merge(graphdef, state).residuals(x, m, layers)

    from mosaic_jax.models import loading
    path = loading._gemma3_270m_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation='eager').eval()

    def run_ours():
        for x, m in batches:
            ours(state, x, m).block_until_ready()

    def run_ref():
        with torch.no_grad():
            for x, m in batches:
                ref(torch.from_numpy(x.astype(np.int64)), attention_mask=torch.from_numpy(m),
                    output_hidden_states=True)

    run_ours()  # compile every batch shape once
    run_ref()
    t_ours, t_ref = [], []
    for _ in range(args.repeats):
        t = time.perf_counter(); run_ours(); t_ours.append(time.perf_counter() - t)
        t = time.perf_counter(); run_ref(); t_ref.append(time.perf_counter() - t)
    mo, mr = float(np.median(t_ours)), float(np.median(t_ref))
    print(f'texts={len(ids)} padded_tokens={padded} real_tokens={real} '
          f'devices={jax.devices()[0].platform} threads(torch)={torch.get_num_threads()}')
    print(f'ours  (jit, stop after block {args.layer}): {mo:7.2f} s  '
          f'{padded / mo:8.1f} padded tok/s  {real / mo:8.1f} real tok/s')
    print(f'torch (eager, all blocks + LM head):      {mr:7.2f} s  '
          f'{padded / mr:8.1f} padded tok/s  {real / mr:8.1f} real tok/s')
    print(f'speed-up ours/torch: {mr / mo:.2f}x (medians of {args.repeats})')


if __name__ == '__main__':
    main()
