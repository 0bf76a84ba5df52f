"""JumpReLU sparse autoencoder math: params, width-chunked encode (optionally fused with pooling)
and decode. Reading and writing SAE files (Gemma Scope, Gemma Scope 2, SAELens, our orbax folders,
hub references) is `sae.loading`; training is `sae.train`.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax import features

# The encoder decides which features fire by comparing against `threshold`, so it must be real
# float32 arithmetic (as in the torch references), not the bf16 passes a TPU/GPU may default to.
_PRECISION = jax.lax.Precision.HIGHEST

TENSOR_KEYS = ('W_enc', 'b_enc', 'threshold', 'W_dec', 'b_dec')  # Gemma Scope / SAELens tensor names
FIELDS = ('w_enc', 'b_enc', 'threshold', 'w_dec', 'b_dec')       # SAEParams fields, same order


@flax.struct.dataclass
class SAEParams:
    """JumpReLU SAE weights (Gemma Scope layout, float32)."""
    w_enc: jax.Array       # [D, F]
    b_enc: jax.Array       # [F]
    threshold: jax.Array   # [F]
    w_dec: jax.Array       # [F, D]
    b_dec: jax.Array       # [D]
    # SAELens option: subtract b_dec from the input before encoding (Gemma Scope: False).
    apply_b_dec_to_input: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def d_model(self) -> int:
        return int(self.w_enc.shape[0])

    @property
    def width(self) -> int:
        return int(self.w_enc.shape[1])


# ----------------------------------------------------------------------------- encode / decode

def _encode_block(params: SAEParams, x: jax.Array, start, size: int) -> jax.Array:
    """Features [start, start + size) of x: f32[N, D] -> f32[N, size]."""
    w = jax.lax.dynamic_slice_in_dim(params.w_enc, start, size, axis=1).astype(jnp.float32)
    b = jax.lax.dynamic_slice_in_dim(params.b_enc, start, size).astype(jnp.float32)
    th = jax.lax.dynamic_slice_in_dim(params.threshold, start, size).astype(jnp.float32)
    pre = jnp.dot(x, w, precision=_PRECISION) + b                    # [N, size]
    return jnp.where(pre > th, jnp.maximum(pre, 0.0), 0.0)


def _prepare_input(params: SAEParams, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] != params.d_model:
        raise ValueError(f'SAE input has last dim {x.shape[-1]}, SAE d_model is {params.d_model}')
    if params.apply_b_dec_to_input:
        x = x - params.b_dec.astype(jnp.float32)
    return x


def _blocks(width: int, chunk_size: int | None) -> tuple[int, int, int]:
    """(block size, number of full blocks, remainder) for chunking the width."""
    if chunk_size is None or chunk_size <= 0 or chunk_size >= width:
        return width, 1, 0
    return chunk_size, width // chunk_size, width % chunk_size


def encode(params: SAEParams, x: jax.Array, *, chunk_size: int | None = None) -> jax.Array:
    """JumpReLU encoder: relu(pre) * (pre > threshold), pre = (x [- b_dec]) @ W_enc + b_enc.

    Args:
      params: the SAE.
      x: activations f32[..., D] (any float dtype; computed in float32).
      chunk_size: if set, the width is processed in blocks of this many features inside a
        `lax.scan`, so the [N, D] x [D, F] product never has more than [N, chunk_size] live
        pre-activations. The result is identical to the unchunked one.
    Returns:
      f32[..., F], exactly zero where the pre-activation is <= threshold.
    """
    x = _prepare_input(params, x)
    lead, n = x.shape[:-1], int(np.prod(x.shape[:-1], dtype=np.int64))
    x2 = x.reshape(n, params.d_model)                                   # [N, D]
    size, n_full, rem = _blocks(params.width, chunk_size)
    if n_full == 1 and rem == 0:
        return _encode_block(params, x2, 0, size).reshape(*lead, params.width)

    def body(out, i):
        start = i * size
        block = _encode_block(params, x2, start, size)                  # [N, size]
        return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=1), None

    out = jnp.zeros((n, params.width), jnp.float32)
    out, _ = jax.lax.scan(body, out, jnp.arange(n_full))
    if rem:
        start = n_full * size
        out = out.at[:, start:].set(_encode_block(params, x2, start, rem))
    return out.reshape(*lead, params.width)


def encode_pooled(params: SAEParams, x: jax.Array, mask: jax.Array, mode: str, *,
                  top_n: int = 0, chunk_size: int | None = None) -> jax.Array:
    """`features.pool(encode(params, x), mask, mode, top_n=top_n)` without the whole [B, T, F].

    Every pooling except MOSAIC's top-n count is a per-feature reduction over tokens, so each
    width block is encoded and pooled on its own. The top-n count needs each token's top n over
    the whole width, so the blocks keep a running per-token top n (ties: lower index first, the
    same rule as `features.pool`) and count once at the end.

    Args:
      x: f32[B, T, D]; mask: bool[B, T]; mode, top_n: as in `features.pool`.
      chunk_size: width block size (None: one block).
    Returns:
      f32[B, F], equal to the unfused computation.
    """
    features.check_mode(mode, top_n)
    x = _prepare_input(params, x)
    b, t, d = x.shape
    x2 = x.reshape(b * t, d)
    size, n_full, rem = _blocks(params.width, chunk_size)
    counting = mode == 'mosaic' and top_n > 0

    def block_acts(start, n):
        return _encode_block(params, x2, start, n).reshape(b, t, n)      # [B, T, n]

    if counting:
        k = min(top_n, params.width)
        vals = jnp.full((b, t, k), -jnp.inf, jnp.float32)
        idx = jnp.zeros((b, t, k), jnp.int32)

        def merge(carry, start, n):
            vals, idx = carry
            bv, bi = jax.lax.top_k(block_acts(start, n), min(k, n))     # [B, T, k']
            # Earlier blocks (lower feature indices) come first, and top_k keeps the lower
            # position on ties, so the merged order is the global lower-index-first order.
            allv = jnp.concatenate([vals, bv], -1)
            alli = jnp.concatenate([idx, bi.astype(jnp.int32) + start], -1)
            mv, pos = jax.lax.top_k(allv, k)
            return mv, jnp.take_along_axis(alli, pos, -1)

        carry = (vals, idx)
        if n_full > 0:
            carry, _ = jax.lax.scan(lambda c, i: (merge(c, i * size, size), None), carry,
                                    jnp.arange(n_full))
        if rem:
            carry = merge(carry, n_full * size, rem)
        vals, idx = carry
        return features.count_top_n(vals, idx, mask, params.width)

    def pooled(start, n):
        return features.pool(block_acts(start, n), mask, mode, top_n=top_n)  # [B, n]

    if n_full == 1 and rem == 0:
        return pooled(0, size)
    blocks = jax.lax.map(lambda i: pooled(i * size, size), jnp.arange(n_full))  # [nb, B, size]
    out = jnp.moveaxis(blocks, 0, 1).reshape(b, n_full * size)
    if rem:
        out = jnp.concatenate([out, pooled(n_full * size, rem)], axis=1)
    return out


def decode(params: SAEParams, f: jax.Array) -> jax.Array:
    """Reconstruction f32[..., F] -> f32[..., D]: f @ W_dec + b_dec."""
    f = jnp.asarray(f, jnp.float32)
    return jnp.dot(f, params.w_dec.astype(jnp.float32), precision=_PRECISION) + params.b_dec
