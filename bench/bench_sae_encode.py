"""SAE encode throughput (tokens/s) for 16k- and 65k-wide JumpReLU SAEs at d_model=2304.

Random weights, jitted, one warm-up call, then the best of --reps timed calls. Also prints
XLA's memory analysis of each compiled variant (argument / output / temporary bytes), which is
what chunking changes, and the fused encode+pool path that never writes [N, F].

    python bench/bench_sae_encode.py --tokens 2048 --widths 16384,65536 --chunk 8192
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mosaic_jax.sae import jumprelu

MB = 1 << 20


def _params(d: int, f: int, seed: int = 0) -> jumprelu.SAEParams:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return jumprelu.SAEParams(
        w_enc=jax.random.normal(k1, (d, f), jnp.float32) / np.sqrt(d),
        b_enc=jax.random.normal(k2, (f,), jnp.float32) * 0.1,
        threshold=jnp.abs(jax.random.normal(k3, (f,), jnp.float32)) * 0.5,
        # encode never reads W_dec; a 1-row placeholder keeps host memory for 65k+ widths down.
        w_dec=jnp.zeros((1, d), jnp.float32),
        b_dec=jnp.zeros((d,), jnp.float32))


def _bench(fn, args, reps: int) -> tuple[float, str]:
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    info = ('n/a' if mem is None else
            f'args {mem.argument_size_in_bytes / MB:.0f} MiB, out {mem.output_size_in_bytes / MB:.0f}'
            f' MiB, temp {mem.temp_size_in_bytes / MB:.0f} MiB')
    jax.block_until_ready(compiled(*args))                      # warm-up
    best = float('inf')
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return best, info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tokens', type=int, default=2048)
    ap.add_argument('--d-model', type=int, default=2304)
    ap.add_argument('--widths', default='16384,65536')
    ap.add_argument('--chunk', type=int, default=8192)
    ap.add_argument('--top-n', type=int, default=20, help="top_n of the fused 'mosaic' pooling")
    ap.add_argument('--reps', type=int, default=2)
    args = ap.parse_args()

    print(f'devices: {jax.devices()}')
    n, d = args.tokens, args.d_model
    x = jax.random.normal(jax.random.key(1), (n, d), jnp.float32)
    # For the fused path: the same tokens as 8 texts of n/8 tokens, all unmasked.
    xb, mask = x.reshape(8, n // 8, d), jnp.ones((8, n // 8), bool)
    for f in [int(w) for w in args.widths.split(',')]:
        p = _params(d, f)
        print(f'\nwidth {f}: W_enc {d * f * 4 / MB:.0f} MiB, full codes [{n}, {f}] '
              f'{n * f * 4 / MB:.0f} MiB, one chunk [{n}, {args.chunk}] '
              f'{n * args.chunk * 4 / MB:.0f} MiB, {2 * n * d * f / 1e9:.0f} GFLOP per call')
        full = jumprelu.encode(p, x)
        variants = [
            ('encode unchunked', lambda p, x: jumprelu.encode(p, x), (p, x)),
            (f'encode chunk={args.chunk}', lambda p, x: jumprelu.encode(p, x, chunk_size=args.chunk),
             (p, x)),
            (f'encode_pooled mosaic top_n={args.top_n} chunk={args.chunk}',
             lambda p, x, m: jumprelu.encode_pooled(p, x, m, 'mosaic', top_n=args.top_n,
                                                    chunk_size=args.chunk), (p, xb, mask)),
        ]
        for name, fn, fargs in variants:
            sec, info = _bench(fn, fargs, args.reps)
            print(f'  {name:<44s} {n / sec:10.0f} tokens/s  ({sec * 1e3:7.1f} ms; {info})')
        chunked = jumprelu.encode(p, x, chunk_size=args.chunk)
        print(f'  chunked vs unchunked: max |diff| {float(jnp.max(jnp.abs(chunked - full))):.2e}, '
              f'L0/token {float(jnp.mean(jnp.sum(full > 0, -1))):.1f}')
        del full, chunked, p


if __name__ == '__main__':
    main()
