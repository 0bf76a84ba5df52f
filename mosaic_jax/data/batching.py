"""Tokenisation and length-bucketed batches with static shapes: the few padded lengths every
compiled step sees (`DEFAULT_BUCKETS`), whatever the texts' lengths.
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

from absl import logging
import numpy as np


def tokenize(texts: Sequence[str], tokenizer: Any, max_length: int, add_bos: bool = True,
             ) -> tuple[list[list[int]], int]:
    """Token ids per text, truncated to `max_length` (BOS included).

    The tokenizer (a transformers tokenizer, or anything whose `__call__(texts,
    add_special_tokens=False)` returns a mapping with 'input_ids') adds no special tokens;
    BOS is prepended here so every text starts with exactly one BOS whatever the tokenizer's
    defaults. Truncation keeps the start of the text, as HF `truncation=True` does.
    Returns the id lists and how many texts were truncated (logged).
    """
    if max_length < 1:
        raise ValueError(f'max_length={max_length} must be >= 1')
    bos = getattr(tokenizer, 'bos_token_id', None)
    if add_bos and bos is None:
        raise ValueError('add_bos=True but the tokenizer has no bos_token_id')
    if not texts:
        return [], 0
    ids = tokenizer(list(texts), add_special_tokens=False)['input_ids']
    out, truncated = [], 0
    for row in ids:
        row = ([int(bos)] if add_bos else []) + [int(t) for t in row]
        if len(row) > max_length:
            truncated += 1
            row = row[:max_length]
        out.append(row)
    if truncated:
        logging.info('truncated %d of %d texts to max_length=%d tokens', truncated, len(out),
                     max_length)
    return out, truncated


class Batch(NamedTuple):
    """One padded batch (a NamedTuple, hence a JAX pytree).

    input_ids int32[B, L]; attention_mask bool[B, L]; index int64[B] (row in the input list,
    -1 for filler rows); valid bool[B] (False for filler rows).
    """
    input_ids: np.ndarray
    attention_mask: np.ndarray
    index: np.ndarray
    valid: np.ndarray


DEFAULT_BUCKETS = tuple(32 * 2 ** k for k in range(9))  # 32 ... 8192 tokens


def bucket_length(n: int, bucket_sizes: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= n."""
    for b in sorted(bucket_sizes):
        if b >= n:
            return int(b)
    raise ValueError(f'sequence of {n} tokens exceeds the largest bucket '
                     f'{max(bucket_sizes)}; truncate (tokenize max_length) or add a bucket')


def batches(token_ids: Sequence[Sequence[int]], batch_size: int, *, pad_id: int,
            pad_side: str = 'right', bucket_sizes: Sequence[int] = DEFAULT_BUCKETS,
            pad_batch_to: int | None = None, multiple_of: int = 1) -> Iterator[Batch]:
    """Length-sorted, bucket-padded batches of static batch size.

    Texts are sorted longest first (ties by index, so the order is deterministic) and cut
    into batches of `batch_size`; each batch is padded to the smallest bucket >= its longest
    member, so a run compiles one shape per bucket used. The last batch is filled up to
    `batch_size` with filler rows: copies of its first row (a well-formed sequence, so no
    row is fully masked and attention never sees an all -inf softmax row) with valid=False
    and index=-1. Every input index appears exactly once among valid rows.

    Args:
      token_ids: N id lists (from `tokenize`), each non-empty.
      batch_size: rows per batch B; must divide by `multiple_of` (the device count).
      pad_id: id written into padding positions (masked out).
      pad_side: 'right' or 'left' (positions come from the mask, so both are exact).
      bucket_sizes: allowed padded lengths.
      pad_batch_to: if set, every batch is padded to exactly this many tokens (one shape
        for the whole run) instead of bucketing.
      multiple_of: batch_size must be a multiple of this.
    Yields:
      `Batch`es with input_ids int32[B, L], attention_mask bool[B, L], index int64[B],
      valid bool[B].
    """
    if pad_side not in ('right', 'left'):
        raise ValueError(f"pad_side={pad_side!r}; valid: 'right', 'left'")
    if batch_size < 1 or multiple_of < 1 or batch_size % multiple_of:
        raise ValueError(f'batch_size={batch_size} must be a positive multiple of '
                         f'multiple_of={multiple_of} (the device count)')
    lengths = np.asarray([len(t) for t in token_ids], dtype=np.int64)
    if len(lengths) and lengths.min() < 1:
        raise ValueError(f'token_ids row {int(lengths.argmin())} is empty')
    if pad_batch_to is not None and len(lengths) and lengths.max() > pad_batch_to:
        raise ValueError(f'pad_batch_to={pad_batch_to} is shorter than the longest sequence '
                         f'({int(lengths.max())} tokens)')
    order = np.argsort(-lengths, kind='stable')
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        length = pad_batch_to or bucket_length(int(lengths[rows].max()), bucket_sizes)
        ids = np.full((batch_size, length), pad_id, dtype=np.int32)
        mask = np.zeros((batch_size, length), dtype=bool)
        index = np.full((batch_size,), -1, dtype=np.int64)
        valid = np.zeros((batch_size,), dtype=bool)
        index[:len(rows)], valid[:len(rows)] = rows, True
        for b, i in enumerate(rows):
            n = int(lengths[i])
            cols = slice(0, n) if pad_side == 'right' else slice(length - n, length)
            ids[b, cols] = token_ids[i]
            mask[b, cols] = True
        ids[len(rows):], mask[len(rows):] = ids[0], mask[0]  # filler rows (valid=False)
        yield Batch(input_ids=ids, attention_mask=mask, index=index, valid=valid)
