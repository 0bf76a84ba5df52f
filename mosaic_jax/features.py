"""Token pooling and binarization of SAE codes: pure, jittable functions of arrays.

`pool(acts [B, T, W], mask [B, T], mode)` -> f32[B, W]; masked tokens never count, and a row
with no unmasked token pools to zeros (never NaN). Rows are independent, so pooling a dataset
batch by batch (any padding length per batch) and concatenating equals pooling it at once.

MOSAIC's pooling, as read in github.com/shan23chen/MOSAIC (`src/sort_load_datasets.py` and
`src/process_npz_files.py`, function `optimized_top_n_to_one_hot`, called per text from
`process_batch`; `src/step2_dataset_classify.py` drives it with `--top-n`, default 5; the sweep in
`config.yaml` uses top_n in {0, 20, 50}):
  * Per token t, `np.argpartition(-acts, top_n, axis=1)[:, :top_n]` picks the top_n features,
    each pick becomes a 1, and the ones are summed over tokens: feature f's value is the number
    of tokens having f among their top_n (uint16 counts). The SAE codes were cast to float16
    before this (`encode_sequence`, `load_npz_file`).
  * Ties: argpartition (introselect) returns an unspecified member of a tie. Zero activations:
    when a token has fewer than top_n active features, argpartition fills the rest with
    arbitrary zero-valued features, which are counted too.
  * top_n = 0: the slice `[:, :0]` is empty, so that code returns all-zero counts. The paper
    (Gallifant et al. 2025) describes the features it recommends as summation-based
    (activations summed over tokens, then binarized), so here top_n = 0 means the sum.
  * Tokens: the hidden state saved per text (`src/retrieve_sae_features.py`) is its whole row
    of the padded batch, and no attention mask is applied afterwards, so BOS and any padding
    tokens are counted (MOSAIC's configs run batch_size 1, which avoids padding). One version
    of `src/get_hidden_states.py::get_valid_token` also drops the last position for LLMs.
    `include_special=True` (steps.feature_mask) counts BOS like MOSAIC, but never padding.
  * `--last-token` takes `x[-1]`, the last position of the row; the hidden-state baseline in
    `save_features` also takes the last position.
  * Binarization (`src/classifiers.py::ModelTrainer.binarize_features`): `np.where(x > t, 1, 0)`,
    threshold 1.0 by default, applied to the pooled features (`--binarize-value`).

Our 'mosaic' mode (top_n >= 1) counts, for every unmasked token, its top_n features, with two
deliberate differences that remove MOSAIC's unspecified choices: ties go to the lower feature
index (`lax.top_k` order), and picks whose activation is 0 are not counted (they are arbitrary
indices that carry no signal). Activations are not rounded to float16.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# MOSAIC's default binarization threshold (src/classifiers.py::binarize_features).
DEFAULT_THRESHOLD = 1.0


def _valid(mask: jax.Array, acts: jax.Array) -> jax.Array:
    """bool[B, T] mask, checked against acts [B, T, W]."""
    mask = jnp.asarray(mask).astype(bool)
    if acts.ndim != 3 or mask.shape != acts.shape[:2]:
        raise ValueError(f'pool expects acts [B, T, W] and mask [B, T]; got {acts.shape} and '
                         f'{mask.shape}')
    return mask


def pool_sum(acts, mask, top_n=0):
    del top_n
    return jnp.sum(jnp.where(mask[..., None], acts, 0.0), axis=1)


def pool_mean(acts, mask, top_n=0):
    del top_n
    n = jnp.sum(mask, axis=1, dtype=jnp.float32)[:, None]               # [B, 1]
    return pool_sum(acts, mask) / jnp.maximum(n, 1.0)


def pool_max(acts, mask, top_n=0):
    del top_n
    m = jnp.max(jnp.where(mask[..., None], acts, -jnp.inf), axis=1)     # [B, W]
    return jnp.where(jnp.any(mask, axis=1)[:, None], m, 0.0)


def max_and_position(acts: jax.Array, mask: jax.Array, offset: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """`pool(acts, mask, 'max')` and where it is reached, from one reduction.

    Args:
      acts: f32[B, T, W]; mask: bool[B, T]; offset: int[B], the position of each row's first
        token in the padded row (left padding), subtracted so positions index the text.
    Returns:
      (f32[B, W] equal to pool_max, int16/int32[B, W] the first unmasked position of that
      maximum minus offset; 0 where the maximum is <= 0, i.e. the feature never fires).
    """
    acts = jnp.asarray(acts, jnp.float32)
    mask = _valid(mask, acts)
    masked = jnp.where(mask[..., None], acts, -jnp.inf)
    pos = jnp.argmax(masked, axis=1)                                     # [B, W]
    m = jnp.take_along_axis(masked, pos[:, None, :], axis=1)[:, 0]
    m = jnp.where(jnp.any(mask, axis=1)[:, None], m, 0.0)
    dtype = jnp.int16 if acts.shape[1] <= 32767 else jnp.int32
    at = jnp.where(m > 0, pos - jnp.asarray(offset)[:, None], 0).astype(dtype)
    return m, at


def pool_last(acts, mask, top_n=0):
    """The last unmasked token (left or right padding alike)."""
    del top_n
    t = mask.shape[1]
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)                    # [B]
    row = jnp.take_along_axis(acts, last[:, None, None], axis=1)[:, 0]  # [B, W]
    return jnp.where(jnp.any(mask, axis=1)[:, None], row, 0.0)


def count_top_n(vals: jax.Array, idx: jax.Array, mask: jax.Array, width: int) -> jax.Array:
    """Per-feature count of unmasked tokens that picked it, from per-token top-n picks.

    Args:
      vals: f32[B, T, K] picked activations; picks <= 0 are not counted.
      idx: i32[B, T, K] picked feature indices.
      mask: bool[B, T].
      width: number of features W.
    Returns:
      f32[B, W] counts.
    """
    b = vals.shape[0]
    weight = (mask[..., None] & (vals > 0)).astype(jnp.float32)        # [B, T, K]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], idx.shape)
    return jnp.zeros((b, width), jnp.float32).at[rows, idx].add(weight)


def pool_mosaic(acts, mask, top_n=0):
    """MOSAIC's top-n token counts (top_n >= 1) or summed activations (top_n == 0)."""
    if top_n == 0:
        return pool_sum(acts, mask)
    vals, idx = jax.lax.top_k(acts, min(int(top_n), acts.shape[-1]))   # [B, T, K]
    return count_top_n(vals, idx, mask, acts.shape[-1])


POOLINGS: dict[str, Callable[..., jax.Array]] = {
    'mosaic': pool_mosaic,
    'mean': pool_mean,
    'max': pool_max,
    'sum': pool_sum,
    'last': pool_last,
}


def check_mode(mode: str, top_n: int = 0) -> None:
    """Raises ValueError for an unknown mode or a negative top_n."""
    if mode not in POOLINGS:
        raise ValueError(f'unknown pooling {mode!r}; valid: {sorted(POOLINGS)}')
    if int(top_n) < 0:
        raise ValueError(f'top_n must be >= 0 (0: sum of activations), got {top_n}')


def pool(acts: jax.Array, mask: jax.Array, mode: str, *, top_n: int = 0) -> jax.Array:
    """Pools token activations into one vector per text.

    Args:
      acts: f32[B, T, W] SAE codes (or hidden states, W = D).
      mask: bool[B, T], True where a token counts.
      mode: 'mosaic' | 'mean' | 'max' | 'sum' | 'last' (see module docstring).
      top_n: for 'mosaic' only (static): >= 1 counts top-n picks, 0 sums activations.
    Returns:
      f32[B, W]; zeros for rows whose mask is all False.
    """
    check_mode(mode, top_n)
    acts = jnp.asarray(acts, jnp.float32)
    return POOLINGS[mode](acts, _valid(mask, acts), int(top_n)).astype(jnp.float32)


def binarize(x: jax.Array, threshold: float = DEFAULT_THRESHOLD) -> jax.Array:
    """f32 (x > threshold), MOSAIC's binarization; usable after any pooling."""
    return (jnp.asarray(x) > threshold).astype(jnp.float32)
