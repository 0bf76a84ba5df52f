"""Greedy decoding with a KV cache: `greedy` (token ids) and `generate_text` (strings).

One compiled program per (model structure, batch shape, max_new_tokens, eos, pad): the
left-padded prompt is prefilled into a fixed-size `KVCache` of P + max_new_tokens slots,
then a `lax.while_loop` decodes one token per step until max_new_tokens or until every
row has produced EOS. It reproduces transformers' `generate(do_sample=False)`: positions
are cumsum(mask) - 1 and then +1 per step, argmax ties go to the lowest id, and a finished
row is filled with the pad id.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mosaic_jax.models.transformer import Transformer


def greedy(model: Transformer, input_ids, attention_mask=None, *, max_new_tokens: int,
           eos_id: int | Sequence[int] | None, pad_id: int | None = None) -> jax.Array:
    """Greedy continuation of a batch of left-padded prompts.

    Call it outside jit (it compiles itself, once per shape and settings).

    Args:
      model: the decoder.
      input_ids: int[B, P] prompts, padded on the left (a tokenizer with
        padding_side='left'); every row needs at least one real token.
      attention_mask: [B, P], 1 on real tokens; None means no padding.
      max_new_tokens: N >= 1 tokens to produce per row.
      eos_id: the id (or ids) that end a row; None decodes all N tokens.
      pad_id: written after a row's EOS; defaults to the (first) EOS id. transformers
        writes its `pad_token_id` there, so pass that to match it.
    Returns:
      int32[B, N]: row b's greedy tokens up to and including its first EOS, then pad_id.
      Decoding stops as soon as every row has produced EOS.
    Raises:
      ValueError: right (or inner) padding, an all-padding row, or max_new_tokens < 1.
    """
    input_ids = np.asarray(input_ids, np.int32)                        # [B, P]
    mask = (np.ones(input_ids.shape, np.int32) if attention_mask is None
            else np.asarray(attention_mask).astype(np.int32))          # [B, P]
    _check_inputs(input_ids, mask, max_new_tokens)
    eos_ids = () if eos_id is None else tuple(int(e) for e in np.atleast_1d(eos_id))
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0
    graphdef, state = nnx.split(model)
    return _greedy_compiled(state, input_ids, mask, graphdef=graphdef,
                            max_new_tokens=int(max_new_tokens), eos_ids=eos_ids,
                            pad_id=int(pad_id))


def _check_inputs(input_ids: np.ndarray, mask: np.ndarray, max_new_tokens) -> None:
    if input_ids.ndim != 2 or mask.shape != input_ids.shape:
        raise ValueError(f'input_ids {input_ids.shape} and attention_mask {mask.shape} must '
                         'both be [B, P]')
    if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
        raise ValueError(f'max_new_tokens must be an int >= 1, got {max_new_tokens!r}')
    real = mask != 0
    # Left padding: each row is 0...0 1...1, and the last column real.
    if (np.diff(real.astype(np.int8), axis=-1) < 0).any() or not real[:, -1].all():
        raise ValueError('greedy needs left-padded prompts (padding only at the start of a '
                         "row, at least one real token): tokenize with padding_side='left'")


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'eos_ids',
                                             'pad_id'))
def _greedy_compiled(state, input_ids, attention_mask, *, graphdef, max_new_tokens: int,
                     eos_ids: tuple[int, ...], pad_id: int) -> jax.Array:
    """Prefill, then a while loop of one-token steps; see `greedy`. -> int32[B, N]."""
    model = nnx.merge(graphdef, state)
    b, p = input_ids.shape
    cache = model.init_cache(b, p + max_new_tokens)                    # T = P + N slots
    logits, cache = model.extend(input_ids, attention_mask, cache, last_only=True)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)        # [B]
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)  # [B, N]
    ones = jnp.ones((b, 1), jnp.int32)

    def unfinished(carry):
        step, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode(carry):
        step, token, done, out, cache = carry
        logits, cache = model.extend(token[:, None], ones, cache, last_only=True)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)     # [B]
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        return step + 1, nxt, done | _is_eos(nxt, eos_ids), out, cache

    carry = (jnp.int32(1), first, _is_eos(first, eos_ids), out, cache)
    return jax.lax.while_loop(unfinished, decode, carry)[3]


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """int32[B] -> bool[B]; all False when there is no EOS id."""
    done = jnp.zeros(tokens.shape, bool)
    for e in eos_ids:
        done = done | (tokens == e)
    return done


def generate_text(model: Transformer, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                  *, eos_id: int | Sequence[int] | None = None,
                  pad_to_multiple_of: int | None = 16) -> list[str]:
    """Greedy continuations of `prompts` as strings (the prompt itself not included).

    Args:
      model: the decoder.
      tokenizer: a transformers tokenizer; prompts are left-padded with it (its
        padding_side is restored afterwards) and tokenized as it does by default (Gemma
        tokenizers prepend <bos>).
      prompts: the texts.
      max_new_tokens: tokens to decode per prompt.
      eos_id: id(s) that end a continuation; default the tokenizer's eos_token_id.
      pad_to_multiple_of: prompt length rounded up to a multiple of this, so batches of
        similar lengths share one compiled program (extra left padding changes nothing).
    Returns:
      One string per prompt: the tokens before the first EOS, decoded with special
      tokens skipped.
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = 'left'
    try:
        enc = tokenizer(list(prompts), padding=True, pad_to_multiple_of=pad_to_multiple_of,
                        return_tensors='np')
    finally:
        tokenizer.padding_side = side
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    eos_ids = () if eos is None else tuple(int(e) for e in np.atleast_1d(eos))
    pad = tokenizer.pad_token_id
    tokens = np.asarray(greedy(model, enc['input_ids'], enc['attention_mask'],
                               max_new_tokens=max_new_tokens, eos_id=eos_ids or None,
                               pad_id=pad))                             # [B, N]
    texts = []
    for row in tokens:
        stop = [i for i, t in enumerate(row) if t in eos_ids]
        texts.append(tokenizer.decode(row[:stop[0]] if stop else row,
                                      skip_special_tokens=True))
    return texts
