"""Gemma building blocks: `Embedder`, `Attention`, `FeedForward`, `Block`.

Attribute names are google-deepmind/gemma's checkpoint keys (`input_embedding`, `q_einsum`,
`kv_einsum`, `attn_vec_einsum`, `gating_einsum`, `linear`, `pre_attention_norm`, ...).
`Attention.cached` / `Block.cached` are the same computations over a fixed-size KV cache
(incremental decoding, see `transformer.KVCache`); `__call__` never touches a cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mosaic_jax.models import layers
from mosaic_jax.models.config import AttentionType, GemmaConfig

# Logit given to masked keys: finite, so a query row with no visible key (a left-padding
# row) softmaxes to a uniform distribution instead of NaN.
_MASKED = float(jnp.finfo(jnp.float32).min)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap); identity when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def apply_rope(x: jax.Array, positions: jax.Array, base: float, scale: float) -> jax.Array:
    """Rotary embedding in the "rotate half" layout HF checkpoints are stored in.

    Args:
      x: [B, L, N, H] queries or keys.
      positions: int[B, L].
      base: RoPE base frequency.
      scale: linear scaling factor (positions are divided by it).
    Returns:
      [B, L, N, H] in x's dtype.
    """
    half = x.shape[-1] // 2
    # Same float32 recipe as transformers: inv_freq = 1 / base^(2i/H), angle = pos * inv_freq.
    inv_freq = 1.0 / (base ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)))
    angle = positions.astype(jnp.float32)[..., None] * (inv_freq / scale)  # [B, L, H/2]
    cos = jnp.cos(angle)[:, :, None, :].astype(x.dtype)  # [B, L, 1, H/2]
    sin = jnp.sin(angle)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _gather_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids]: [V, D], int[B, L] -> [B, L, D], also under an explicit-sharding mesh.

    With explicit axes (jax.make_mesh's default) a gather must be told its output sharding;
    the rows follow the ids' sharding and D stays whole.
    """
    sharding = jax.typeof(ids).sharding
    if isinstance(sharding, NamedSharding) and not sharding.mesh.empty:
        out = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, None))
        return table.at[ids].get(out_sharding=out)
    return jnp.take(table, ids, axis=0)


class Embedder(nnx.Module):
    """Token embedding (scaled by sqrt(D)) and the tied LM head."""

    def __init__(self, cfg: GemmaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.input_embedding = nnx.Param(
            nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab_size, cfg.embed_dim), dtype))
        self.embed_dim = cfg.embed_dim

    def encode(self, input_ids: jax.Array) -> jax.Array:
        """int[B, L] -> [B, L, D]."""
        x = _gather_rows(self.input_embedding[...], input_ids)
        # The scale is rounded to the compute dtype first (sqrt(2304)=48 exactly, but
        # sqrt(640)=25.298 becomes 25.25 in bf16), as in transformers and the originals.
        return x * jnp.asarray(self.embed_dim ** 0.5, dtype=x.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """[B, L, D] -> logits [B, L, V]."""
        return jnp.einsum('BLD,VD->BLV', x, self.input_embedding[...])


class Attention(nnx.Module):
    """Grouped-query attention with optional QK norm, soft cap and sliding window."""

    def __init__(self, cfg: GemmaConfig, attn_type: AttentionType, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        n, k, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim
        self.q_einsum = layers.Einsum((n, d, h), dtype=dtype, rngs=rngs)
        self.kv_einsum = layers.Einsum((2, k, d, h), dtype=dtype, rngs=rngs)
        self.attn_vec_einsum = layers.Einsum((n, h, d), dtype=dtype, rngs=rngs)
        if cfg.use_qk_norm:
            self.query_norm = layers.RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
            self.key_norm = layers.RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.use_qk_norm = cfg.use_qk_norm
        self.attn_type = attn_type
        self.rope_base, self.rope_scale = cfg.rope(attn_type)
        self.query_scale = cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.num_kv_heads = k

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, L, D], positions: int[B, L], mask: bool[B, L(query), L(key)] -> [B, L, D]."""
        q, k, v = self.project(x, positions)
        return self.attend(q, k, v, mask)

    def cached(self, x: jax.Array, positions: jax.Array, mask: jax.Array, keys: jax.Array,
               values: jax.Array, start: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention of a chunk of L new tokens over a fixed-size KV cache of T slots.

        The chunk's keys and values are first written into slots start..start+L-1, then
        its queries attend over all T slots.

        Args:
          x: [B, L, D] the new tokens' (normed) stream.
          positions: int[B, L] their RoPE positions.
          mask: bool[B, L(query), T(slot)] which cache slots each new token may read.
          keys, values: [B, T, K, H] this layer's cache.
          start: int32[] first slot of the chunk (start + L <= T).
        Returns:
          ([B, L, D] attention output, updated keys, updated values).
        """
        q, k, v = self.project(x, positions)                    # [B, L, N|K, H]
        at = (0, start, 0, 0)
        keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), at)      # [B, T, K, H]
        values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), at)
        return self.attend(q, keys, values, mask), keys, values

    def project(self, x: jax.Array, positions: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, L, D], positions: int[B, L] -> q [B, L, N, H], k and v [B, L, K, H], with
        QK norm (Gemma 3) and RoPE applied to q and k."""
        q = self.q_einsum('BLD,NDH->BLNH', x)                   # [B, L, N, H]
        k, v = self.kv_einsum('BSD,CKDH->CBSKH', x)             # 2 x [B, S, K, H]
        if self.use_qk_norm:  # normalised before RoPE, as in Gemma 3
            q, k = self.query_norm(q), self.key_norm(k)
        q = apply_rope(q, positions, self.rope_base, self.rope_scale)
        k = apply_rope(k, positions, self.rope_base, self.rope_scale)
        return q, k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """q: [B, L, N, H], k and v: [B, S, K, H], mask: bool[B, L, S] -> [B, L, D]."""
        b, l, n, h = q.shape
        # Query head n reads KV head n // G (transformers' repeat_kv order).
        q = q.reshape(b, l, self.num_kv_heads, n // self.num_kv_heads, h)  # [B, L, K, G, H]
        logits = jnp.einsum('BLKGH,BSKH->BKGLS', q, k).astype(jnp.float32) * self.query_scale
        logits = soft_cap(logits, self.softcap)
        logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, K, G, L, S]
        enc = jnp.einsum('BKGLS,BSKH->BLKGH', probs, v).reshape(b, l, n, h)
        return self.attn_vec_einsum('BLNH,NHD->BLD', enc)


class FeedForward(nnx.Module):
    """GeGLU MLP with the tanh approximation of GELU."""

    def __init__(self, cfg: GemmaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        # gating_einsum[0] is the gate, [1] the up projection (HF gate_proj / up_proj).
        self.gating_einsum = layers.Einsum((2, cfg.hidden_dim, cfg.embed_dim), dtype=dtype,
                                           rngs=rngs)
        self.linear = layers.Einsum((cfg.hidden_dim, cfg.embed_dim), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, D]."""
        gate, up = self.gating_einsum('BLD,CFD->CBLF', x)       # 2 x [B, L, F]
        return self.linear('BLF,FD->BLD', jax.nn.gelu(gate, approximate=True) * up)


class Block(nnx.Module):
    """Pre- and post-normed attention and MLP, each added to the residual stream."""

    def __init__(self, cfg: GemmaConfig, attn_type: AttentionType, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        def norm():
            return layers.RMSNorm(cfg.embed_dim, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.pre_attention_norm = norm()
        self.attn = Attention(cfg, attn_type, dtype=dtype, rngs=rngs)
        self.post_attention_norm = norm()
        self.pre_ffw_norm = norm()
        self.mlp = FeedForward(cfg, dtype=dtype, rngs=rngs)
        self.post_ffw_norm = norm()

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, L, D] residual stream in; the stream after this block out."""
        x = x + self.post_attention_norm(self.attn(self.pre_attention_norm(x), positions, mask))
        return self._ffw_residual(x)

    def cached(self, x: jax.Array, positions: jax.Array, mask: jax.Array, keys: jax.Array,
               values: jax.Array, start: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`__call__` for L new tokens reading and extending a KV cache (`Attention.cached`).

        x: [B, L, D], mask: bool[B, L, T], keys / values: [B, T, K, H], start: int32[].
        Returns the stream after this block [B, L, D] and the updated keys and values.
        """
        h, keys, values = self.attn.cached(self.pre_attention_norm(x), positions, mask, keys,
                                           values, start)
        x = x + self.post_attention_norm(h)
        return self._ffw_residual(x), keys, values

    def _ffw_residual(self, x: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, D]: the stream plus the post-normed MLP of its pre-norm."""
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))
