"""The Gemma 2 / Gemma 3 text decoder as one Flax NNX module.

Layer numbering: "layer L" is the residual stream after block L (0-based), which is Gemma
Scope's layer L and transformers' `hidden_states[L + 1]`. MOSAIC indexes
`hidden_states[L]` instead (the stream *before* block L, `hidden_states[0]` being the scaled
embeddings); the pipeline maps its `layer_convention` onto block indices, this module only
knows block indices.

A forward pass is `head(run_blocks(embed(ids), attention_info(mask), 0, num_layers))`;
`__call__` is exactly that composition (plus captures and early stopping), and code that
needs to intervene mid-stream (e.g. splicing an SAE reconstruction in after a block) calls
the same public pieces rather than the submodules.

Incremental decoding: `init_cache` makes an empty fixed-size `KVCache` and `extend` feeds
it a chunk of tokens (a whole left-padded prompt, then one token per step), returning the
chunk's logits; `models.generate` builds greedy decoding on them.
"""
from __future__ import annotations

from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mosaic_jax.models import layers, modules
from mosaic_jax.models.config import AttentionType, GemmaConfig, resolve_dtype


@flax.struct.dataclass
class Output:
    """What a forward pass returns.

    Attributes:
      logits: float32[B, L, V] after the final soft cap; None when the pass stopped early.
      hidden: block index -> float32[B, L, D], the residual stream after that block
        (before the final norm, also for the last block).
    """
    logits: jax.Array | None
    hidden: dict[int, jax.Array]


def positions_and_masks(attention_mask: jax.Array, sliding_window: int | None):
    """Positions and the two attention masks, exact under left or right padding.

    Args:
      attention_mask: [B, L], nonzero on real tokens.
      sliding_window: keys at most this many positions back (self included) stay visible on
        sliding layers; None when the model has none.
    Returns:
      positions int32[B, L] = cumsum(mask) - 1 clipped at 0 (padding never shifts a real
      token's position), and {AttentionType: bool[B, L(query), L(key)]}: causal in index,
      padding keys hidden, and on sliding layers `q_pos - k_pos < sliding_window` (HF's
      `kv_idx > q_idx - sliding_window` on an unpadded sequence).
    """
    valid = attention_mask.astype(bool)                               # [B, L]
    positions = jnp.maximum(jnp.cumsum(valid, axis=-1, dtype=jnp.int32) - 1, 0)
    idx = jnp.arange(valid.shape[-1])
    causal = idx[:, None] >= idx[None, :]                             # [L, L]
    full = causal[None] & valid[:, None, :]                           # [B, L, L]
    masks = {AttentionType.GLOBAL: full}
    if sliding_window:
        dist = positions[:, :, None] - positions[:, None, :]          # [B, L, L]
        masks[AttentionType.LOCAL_SLIDING] = full & (dist < sliding_window)
    return positions, masks


@flax.struct.dataclass
class AttentionInfo:
    """What every block of one pass needs besides the stream; built by `attention_info`.

    Attributes:
      positions: int32[B, L], see `positions_and_masks`.
      masks: {AttentionType: bool[B, L(query), L(key)]}, one per attention type the model
        can use (the sliding one only when the config has a window).
    """
    positions: jax.Array
    masks: dict[AttentionType, jax.Array]


@flax.struct.dataclass
class KVCache:
    """Keys and values of every token fed so far, in T fixed slots; see `Transformer.extend`.

    Every row of the batch advances in lock-step: slot s holds the s-th token fed to each
    row, padding included (a left-padded prompt of length P fills slots 0..P-1, the next
    decoded token slot P, ...). Padding slots are marked invalid and never read.

    Attributes:
      keys, values: one [B, T, K, H] per block, keys with RoPE applied.
      valid: bool[B, T], the slot holds a real (unmasked) token.
      positions: int32[B, T], the RoPE position of each slot's token (0 on padding and on
        slots not filled yet).
      length: int32[], slots filled so far (the next chunk starts there).
    """
    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    positions: jax.Array
    length: jax.Array


def cached_positions_and_masks(attention_mask: jax.Array, cache: KVCache,
                               sliding_window: int | None):
    """`positions_and_masks` for a chunk of new tokens appended to a cache.

    Args:
      attention_mask: [B, L], nonzero on the chunk's real tokens.
      cache: the cache before the chunk (it goes into slots length..length+L-1).
      sliding_window: as in `positions_and_masks`.
    Returns:
      positions int32[B, L] (the row's real tokens so far + cumsum(mask) - 1, clipped at
      0: on a fresh cache exactly `positions_and_masks`'), {AttentionType: bool[B, L, T]}
      (causal in slot, invalid slots hidden, sliding layers `q_pos - k_pos < window`), and
      the cache's updated (valid [B, T], positions [B, T]).
    """
    new_valid = attention_mask.astype(bool)                           # [B, L]
    seen = jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)             # [B]
    positions = jnp.maximum(
        seen[:, None] + jnp.cumsum(new_valid, axis=-1, dtype=jnp.int32) - 1, 0)
    at = (0, cache.length)
    valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, at)            # [B, T]
    key_pos = jax.lax.dynamic_update_slice(cache.positions, positions, at)      # [B, T]
    q_slot = cache.length + jnp.arange(new_valid.shape[-1])                       # [L]
    causal = jnp.arange(valid.shape[-1])[None, :] <= q_slot[:, None]              # [L, T]
    full = causal[None] & valid[:, None, :]                                       # [B, L, T]
    masks = {AttentionType.GLOBAL: full}
    if sliding_window:
        dist = positions[:, :, None] - key_pos[:, None, :]                        # [B, L, T]
        masks[AttentionType.LOCAL_SLIDING] = full & (dist < sliding_window)
    return positions, masks, (valid, key_pos)


class Transformer(nnx.Module):
    """Gemma decoder: embedder, `layers[i]` blocks, `final_norm`, tied soft-capped head.

    Public pieces: `attention_info`, `embed`, `run_blocks`, `head`; `__call__` and
    `residuals` are built from them. `init_cache` / `extend` are the KV-cached forward.
    """

    def __init__(self, config: GemmaConfig, *, dtype='float32', rngs: nnx.Rngs):
        """dtype is both the parameter and the compute dtype ('float32' or 'bfloat16')."""
        dtype = resolve_dtype(dtype)
        self.config = config
        self.dtype = dtype
        self.embedder = modules.Embedder(config, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([modules.Block(config, t, dtype=dtype, rngs=rngs)
                                for t in config.attn_types])
        self.final_norm = layers.RMSNorm(config.embed_dim, eps=config.rms_norm_eps,
                                         dtype=dtype, rngs=rngs)

    def attention_info(self, attention_mask: jax.Array) -> AttentionInfo:
        """Positions and masks for `run_blocks`, from attention_mask [B, L] (1 on real
        tokens, left or right padding); build it once per batch and share it."""
        positions, masks = positions_and_masks(attention_mask, self.config.sliding_window)
        return AttentionInfo(positions=positions, masks=masks)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int[B, L] -> [B, L, D] in the compute dtype, scaled by sqrt(D) as in Gemma."""
        return self.embedder.encode(input_ids)

    def run_blocks(self, x: jax.Array, info: AttentionInfo, start: int, stop: int
                   ) -> jax.Array:
        """Blocks start..stop-1 on the residual stream x [B, L, D] -> [B, L, D].

        x is cast to the compute dtype first (a no-op on this model's own streams);
        start == stop returns it unchanged. start and stop are static Python ints with
        0 <= start <= stop <= num_layers.
        """
        start, stop = _check_range(start, stop, self.config.num_layers)
        x = x.astype(self.dtype)
        for i in range(start, stop):
            block = self.layers[i]
            x = block(x, info.positions, info.masks[block.attn.attn_type])
        return x

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm, tied embedding and final soft cap: [B, L, D] -> float32 logits
        [B, L, V]. x is cast to the compute dtype first."""
        logits = self.embedder.decode(self.final_norm(x.astype(self.dtype)))
        cap = self.config.final_logit_softcapping
        return modules.soft_cap(logits.astype(jnp.float32), cap)

    def init_cache(self, batch: int, size: int) -> KVCache:
        """An empty `KVCache` of `size` slots per row (prompt length + tokens to decode),
        in the compute dtype."""
        cfg = self.config
        shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)           # [B, T, K, H]
        zeros = tuple(jnp.zeros(shape, self.dtype) for _ in range(cfg.num_layers))
        return KVCache(keys=zeros, values=zeros, valid=jnp.zeros((batch, size), bool),
                       positions=jnp.zeros((batch, size), jnp.int32),
                       length=jnp.zeros((), jnp.int32))

    def extend(self, input_ids: jax.Array, attention_mask: jax.Array | None, cache: KVCache,
               *, last_only: bool = False) -> tuple[jax.Array, KVCache]:
        """Feeds a chunk of tokens through every block, reading and extending the cache.

        On a fresh cache with a whole left-padded prompt this is `__call__` (same positions
        and masks; the attention also spans the cache's empty slots, which are masked out),
        and each later one-token chunk continues it as if the sequence had been fed whole.

        Args:
          input_ids: int[B, L], the next L tokens of every row (cache.length + L <= T).
          attention_mask: [B, L], 1 on real tokens; None means all real.
          cache: from `init_cache` or a previous `extend`.
          last_only: compute the head on the chunk's last token only (logits [B, 1, V]);
            with left padding that is every row's newest real token.
        Returns:
          (float32 logits [B, L or 1, V], the cache holding the chunk too).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        positions, masks, (valid, key_pos) = cached_positions_and_masks(
            attention_mask, cache, self.config.sliding_window)
        x = self.embed(input_ids)                                     # [B, L, D]
        keys, values = list(cache.keys), list(cache.values)
        for i, block in enumerate(self.layers):
            x, keys[i], values[i] = block.cached(x, positions, masks[block.attn.attn_type],
                                                 keys[i], values[i], cache.length)
        cache = KVCache(keys=tuple(keys), values=tuple(values), valid=valid,
                        positions=key_pos, length=cache.length + input_ids.shape[-1])
        return self.head(x[:, -1:] if last_only else x), cache

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 capture: Sequence[int] = (), *, return_logits: bool = True) -> Output:
        """Forward pass.

        Args:
          input_ids: int[B, L].
          attention_mask: [B, L], 1 on real tokens, 0 on padding (left or right); None means
            no padding.
          capture: static block indices whose output residual stream to return.
          return_logits: False stops after block max(capture): later blocks, the final norm
            and the LM head are never computed (the SAE pipeline never needs them).
        Returns:
          Output with float32 logits (None when return_logits is False) and `hidden`.
        """
        capture = _check_blocks(capture, self.config.num_layers)
        if not return_logits and not capture:
            raise ValueError('return_logits=False needs at least one block in capture')
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        info = self.attention_info(attention_mask)

        stop = self.config.num_layers if return_logits else max(capture) + 1
        x = self.embed(input_ids)                                     # [B, L, D]
        hidden, done = {}, 0
        for i in sorted(capture):
            x = self.run_blocks(x, info, done, i + 1)
            hidden[i] = x.astype(jnp.float32)
            done = i + 1
        x = self.run_blocks(x, info, done, stop)
        logits = self.head(x) if return_logits else None
        return Output(logits=logits, hidden=hidden)

    def residuals(self, input_ids: jax.Array, attention_mask: jax.Array,
                  layers: Sequence[int]) -> jax.Array:
        """Residual streams after the given blocks, computing no block past the deepest.

        Block L's output equals transformers' `hidden_states[L + 1]` for every block but the
        last: HF's final entry is taken after the final norm, ours is the raw stream.
        MOSAIC's "layer L" is `hidden_states[L]`, i.e. block L - 1 here.

        Args:
          input_ids: int[B, L].
          attention_mask: [B, L], 1 on real tokens (left or right padding).
          layers: static block indices (0-based), e.g. (3, 8); repeats allowed.
        Returns:
          float32[len(layers), B, L, D].
        """
        layers = tuple(layers)
        out = self(input_ids, attention_mask, capture=layers, return_logits=False)
        return jnp.stack([out.hidden[i] for i in layers])


def _check_blocks(blocks: Sequence[int], num_layers: int) -> frozenset[int]:
    blocks = tuple(int(b) if isinstance(b, (int, np.integer)) else b for b in blocks)
    bad = [b for b in blocks if not (isinstance(b, int) and 0 <= b < num_layers)]
    if bad:
        raise ValueError(f'block indices {bad} out of range: this model has blocks '
                         f'0..{num_layers - 1}')
    return frozenset(blocks)


def _check_range(start: int, stop: int, num_layers: int) -> tuple[int, int]:
    """start, stop as ints with 0 <= start <= stop <= num_layers, else ValueError."""
    ok = all(isinstance(b, (int, np.integer)) and not isinstance(b, bool)
             for b in (start, stop))
    if not (ok and 0 <= start <= stop <= num_layers):
        raise ValueError(f'block range [{start}, {stop}) invalid: need static ints with '
                         f'0 <= start <= stop <= {num_layers}')
    return int(start), int(stop)
