"""The cross-modal read: images + a prompt through PaliGemma -> pooled SAE / hidden features.

This is the image counterpart of the text extractor: it yields, for every image, one
vector per (layer, pooling) from the decoder's residual stream at the chosen positions
('image', 'prompt' or 'both'), so everything above extraction (probes, intervals, report)
can take image datasets unchanged. Devices are not handled here (one jitted read per
batch, on the default device); the pipeline's `parallel` layer would own that.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mosaic_jax import features
from mosaic_jax.data import images
from mosaic_jax.models import paligemma
from mosaic_jax.sae import jumprelu


@dataclasses.dataclass(frozen=True)
class ReadSpec:
    """What one extraction reads.

    layers: block indices (0-based, Gemma Scope's layer numbers); positions: one of
    `paligemma.POSITIONS`; poolings: names in `features.POOLINGS`; prompt: the text after
    the image (e.g. 'caption en'); batch_size: images per forward; include_special: False
    leaves BOS out of the 'prompt' positions (its activations are huge and
    image-independent), as `config.features.include_special` does for texts.
    """
    layers: tuple[int, ...]
    positions: str = 'image'
    poolings: tuple[str, ...] = ('mean',)
    prompt: str = 'caption en'
    batch_size: int = 8
    include_special: bool = False


def make_reader(model: paligemma.PaliGemma, spec: ReadSpec, bos_id: int) -> Callable:
    """A jitted (ids [B, L], mask [B, L], pixels [B, 3, S, S]) -> (f32[n, B, L, D]
    residuals, bool[B, L] positions to pool). Parameters are jit arguments, not
    constants, so a 3B model is not baked into the executable."""
    if spec.positions not in paligemma.POSITIONS:
        raise ValueError(f'features.positions={spec.positions!r}; valid: {paligemma.POSITIONS}')
    graphdef, state = nnx.split(model)
    exclude = () if spec.include_special else (bos_id,)
    image_token = model.config.image_token_id

    @jax.jit
    def read(state, ids, mask, pixels):
        m = nnx.merge(graphdef, state)
        res = m.residuals(ids, mask, spec.layers, pixels)
        return res, paligemma.position_mask(ids, mask, spec.positions, image_token, exclude)

    return lambda ids, mask, pixels: read(state, ids, mask, pixels)


def batches(model: paligemma.PaliGemma, tokenizer, ds: images.LabeledImages, spec: ReadSpec
            ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids int32[B, L], mask int32[B, L], pixels f32[B, 3, S, S]) per batch, in row order.

    The prompt is the same for every image, so every row has the same length (no padding).
    """
    cfg = model.config
    for start in range(0, len(ds), spec.batch_size):
        stop = min(start + spec.batch_size, len(ds))
        ids, mask = images.prompt_batch(tokenizer, [spec.prompt] * (stop - start),
                                        cfg.num_image_tokens, cfg.image_token_id,
                                        pad_id=tokenizer.pad_token_id or 0)
        paligemma.check_image_tokens(ids, cfg.image_token_id, cfg.num_image_tokens)
        pixels = images.pixel_values(ds.images[start:stop], cfg.vision.image_size,
                                     ds.sources[start:stop])
        yield ids, mask, pixels


def extract(model: paligemma.PaliGemma, tokenizer, ds: images.LabeledImages, spec: ReadSpec,
            saes: Mapping[int, jumprelu.SAEParams]) -> dict[tuple[str, int, str], np.ndarray]:
    """Pooled features of every image.

    Args:
      saes: layer -> SAE (layers without one give hidden-state features only).
    Returns:
      {(kind, layer, pooling): f32[N, W]} with kind 'sae' (W = SAE width) or 'hidden'
      (W = D, the pooled residual stream itself), rows in dataset order.
    """
    read = make_reader(model, spec, tokenizer.bos_token_id)

    @jax.jit
    def pool_all(res, mask, sae_params):
        out = {}
        for j, layer in enumerate(spec.layers):
            acts = {'hidden': res[j]}
            if layer in sae_params:
                acts['sae'] = jumprelu.encode(sae_params[layer], res[j])
            for kind, a in acts.items():
                for mode in spec.poolings:
                    out[(kind, layer, mode)] = features.pool(a, mask, mode)
        return out

    chunks: dict[tuple, list] = {}
    for ids, mask, pixels in batches(model, tokenizer, ds, spec):
        res, where = read(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
        for key, value in pool_all(res, where, dict(saes)).items():
            chunks.setdefault(key, []).append(np.asarray(value))
    return {k: np.concatenate(v) for k, v in chunks.items()}
