"""PaliGemma 2 in Flax NNX: SigLIP tower -> linear projector -> Gemma 2 decoder.

The P = (image_size / patch_size)^2 projected patch tokens replace the `<image>`
placeholders of the prompt (`<image>` x P, BOS, prompt, "\\n"), and the decoder runs with
PaliGemma's prefix-LM mask: prefix tokens (image + prompt, token type 0) attend to each
other bidirectionally, suffix tokens (type 1) causally. Layer numbering is the text
model's (`transformer.py`): block L's output is transformers' `hidden_states[L + 1]`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mosaic_jax.models import siglip, transformer
from mosaic_jax.models.config import AttentionType, GemmaConfig, resolve_dtype

# Which token positions a residual read pools over (`position_mask`).
POSITIONS = ('image', 'prompt', 'both')


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
    """Architecture of a PaliGemma 2 checkpoint.

    Attributes:
      vision: the SigLIP tower.
      text: the Gemma 2 decoder (D = text.embed_dim).
      image_token_id: id of the `<image>` placeholder (HF `image_token_index`); it may lie
        outside the embedding table (PaliGemma 2: 257152 of 257216 rows is inside).
    """
    vision: siglip.SiglipConfig
    text: GemmaConfig
    image_token_id: int

    @property
    def num_layers(self) -> int:
        """Decoder blocks (what layer checks compare against, as for a text model)."""
        return self.text.num_layers

    @property
    def embed_dim(self) -> int:
        """D, the decoder's width (what SAEs read)."""
        return self.text.embed_dim

    @property
    def num_image_tokens(self) -> int:
        """P, the placeholders per image = patches of the tower."""
        return self.vision.num_patches

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> 'PaliGemmaConfig':
        """From a complete transformers PaliGemma config dict (see `resolved_hf_config`).

        Raises:
          ValueError: a PaliGemma 1 (Gemma 1 decoder) or a projector width that is not the
            decoder's.
        """
        text = dict(hf['text_config'])
        if text.get('model_type') != 'gemma2':
            raise ValueError(f"text_config.model_type={text.get('model_type')!r}: only PaliGemma "
                             "2 (a Gemma 2 decoder) is supported, not PaliGemma 1 (Gemma 1)")
        # The flag only makes transformers skip its causal fast path; the prefix mask that
        # PaliGemma actually uses is built explicitly (`prefix_attention_info`).
        text.pop('use_bidirectional_attention', None)
        text.pop('architectures', None)
        text_cfg = GemmaConfig.from_hf(text)
        proj = hf.get('projection_dim', text_cfg.embed_dim)
        if proj != text_cfg.embed_dim:
            raise ValueError(f'projection_dim={proj} differs from text_config.hidden_size='
                             f'{text_cfg.embed_dim}')
        image_token = hf.get('image_token_index', hf.get('image_token_id'))
        return cls(vision=siglip.SiglipConfig.from_hf(hf['vision_config']), text=text_cfg,
                   image_token_id=int(image_token))

    @classmethod
    def paligemma2_3b_224(cls) -> 'PaliGemmaConfig':
        """google/paligemma2-3b-pt-224: So400m/14 tower, Gemma 2 2B decoder (vocab 257216)."""
        text = dataclasses.replace(GemmaConfig.gemma2_2b(), vocab_size=257_216)
        return cls(vision=siglip.SiglipConfig.so400m_224(), text=text, image_token_id=257_152)


class Projector(nnx.Module):
    """`multi_modal_projector.linear`: D_v -> D with bias."""

    def __init__(self, cfg: PaliGemmaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear = siglip.Dense(cfg.vision.width, cfg.text.embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, P, D_v] -> [B, P, D]."""
        return self.linear(x)


def prefix_attention_info(attention_mask: jax.Array, token_type_ids: jax.Array | None,
                          sliding_window: int | None) -> transformer.AttentionInfo:
    """PaliGemma's positions and prefix-LM masks, exact under left or right padding.

    Args:
      attention_mask: [B, L], nonzero on real tokens.
      token_type_ids: int[B, L], 0 on the prefix (image + prompt), 1 on the suffix; None:
        every token is prefix (the classification reads, which have no suffix).
        transformers builds a purely causal mask when it is not given, so parity tests
        pass it explicitly.
      sliding_window: the decoder's window on LOCAL_SLIDING layers, or None.
    Returns:
      AttentionInfo with positions int32[B, L] = cumsum(mask), 1-based as PaliGemma's
      (transformers' arange + 1 on unpadded rows; 0 on left padding), and masks
      bool[B, L(query), L(key)]: (causal [& within the window]) | (both in the prefix),
      padding keys hidden. The prefix overrides the window, as in transformers' block
      overlay.
    """
    valid = attention_mask.astype(bool)                               # [B, L]
    if token_type_ids is None:
        prefix = valid
    else:
        prefix = valid & (token_type_ids == 0)
    positions = jnp.cumsum(valid, axis=-1, dtype=jnp.int32)
    idx = jnp.arange(valid.shape[-1])
    causal = (idx[:, None] >= idx[None, :])[None]                     # [1, L, L]
    block = prefix[:, :, None] & prefix[:, None, :]                   # [B, L, L]
    keys = valid[:, None, :]
    masks = {AttentionType.GLOBAL: (causal | block) & keys}
    if sliding_window:
        near = (idx[:, None] - idx[None, :] < sliding_window)[None]
        masks[AttentionType.LOCAL_SLIDING] = ((causal & near) | block) & keys
    return transformer.AttentionInfo(positions=positions, masks=masks)


def position_mask(input_ids: jax.Array, attention_mask: jax.Array, which: str,
                  image_token_id: int, exclude_ids: Sequence[int] = ()) -> jax.Array:
    """Which positions a pooled feature reads: bool[B, L].

    Args:
      input_ids: int[B, L] with `<image>` placeholders.
      attention_mask: [B, L], nonzero on real tokens (padding is never selected).
      which: 'image' (the P image tokens), 'prompt' (the real text tokens: BOS, prompt,
        newline, suffix) or 'both'.
      image_token_id: the placeholder id.
      exclude_ids: text ids never selected (e.g. BOS when special tokens are left out).
    """
    if which not in POSITIONS:
        raise ValueError(f'positions={which!r} is not one of {POSITIONS}')
    valid = attention_mask.astype(bool)
    image = (input_ids == image_token_id) & valid
    text = valid & ~image
    for t in exclude_ids:
        text = text & (input_ids != t)
    return {'image': image, 'prompt': text, 'both': image | text}[which]


class PaliGemma(nnx.Module):
    """`vision_tower`, `multi_modal_projector`, `language_model` (our Gemma `Transformer`).

    `residuals` is the text model's read with images: same layer numbering, float32
    [n, B, L, D]. `image_features` and `embed` are the public pieces it is made of.
    """

    def __init__(self, config: PaliGemmaConfig, *, dtype='float32', rngs: nnx.Rngs | None,
                 parts: tuple | None = None):
        """Random weights from rngs, or `parts` = (VisionTower, Projector, Transformer)
        already built (the loader's path)."""
        dtype = resolve_dtype(dtype)
        self.config = config
        self.dtype = dtype
        if parts is None:
            parts = (siglip.VisionTower(config.vision, dtype=dtype, rngs=rngs),
                     Projector(config, dtype=dtype, rngs=rngs),
                     transformer.Transformer(config.text, dtype=dtype, rngs=rngs))
        self.vision_tower, self.multi_modal_projector, self.language_model = parts

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values f32[B, 3, S, S] in [-1, 1] -> projected patch tokens [B, P, D] in the
        compute dtype (they enter the decoder unscaled; only text embeddings get sqrt(D))."""
        return self.multi_modal_projector(self.vision_tower(pixel_values.astype(self.dtype)))

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
        """Decoder input [B, L, D]: text embeddings with row b's image features written, in
        order, over row b's `<image>` placeholders (transformers' masked_scatter; every row
        must hold exactly P placeholders, see `check_image_tokens`)."""
        is_image = input_ids == self.config.image_token_id                # [B, L]
        # The placeholder may lie outside the table; its row is overwritten anyway.
        x = self.language_model.embed(jnp.where(is_image, 0, input_ids))
        if pixel_values is None:
            return x
        feats = self.image_features(pixel_values)                         # [B, P, D]
        slot = jnp.clip(jnp.cumsum(is_image, axis=-1) - 1, 0, feats.shape[1] - 1)
        scattered = jnp.take_along_axis(feats, slot[..., None], axis=1)   # [B, L, D]
        return jnp.where(is_image[..., None], scattered.astype(x.dtype), x)

    def residuals(self, input_ids: jax.Array, attention_mask: jax.Array,
                  layers: Sequence[int], pixel_values: jax.Array | None = None,
                  token_type_ids: jax.Array | None = None) -> jax.Array:
        """Decoder residual streams after the given blocks; no block past the deepest runs.

        Args:
          input_ids: int[B, L], `<image>` x P, BOS, prompt, "\\n" (see `images.prompt_ids`),
            left or right padded.
          attention_mask: [B, L], 1 on real tokens.
          layers: static block indices (0-based); block L = transformers' hidden_states[L+1].
          pixel_values: f32[B, 3, S, S] from `images.preprocess`; None reads text only.
          token_type_ids: int[B, L], 1 on suffix tokens; None: all prefix.
        Returns:
          float32[len(layers), B, L, D].
        """
        layers = tuple(layers)
        capture = transformer._check_blocks(layers, self.config.text.num_layers)
        if not capture:
            raise ValueError('residuals needs at least one block in layers')
        info = prefix_attention_info(attention_mask, token_type_ids,
                                     self.config.text.sliding_window)
        x = self.embed(input_ids, pixel_values)
        hidden, done = {}, 0
        for i in sorted(capture):
            x = self.language_model.run_blocks(x, info, done, i + 1)
            hidden[i] = x.astype(jnp.float32)
            done = i + 1
        return jnp.stack([hidden[i] for i in layers])


def check_image_tokens(input_ids: np.ndarray, image_token_id: int, num_image_tokens: int
                       ) -> None:
    """Host-side check before a forward: every row holds exactly P placeholders.

    Raises:
      ValueError: naming the first bad row and its count.
    """
    counts = (np.asarray(input_ids) == image_token_id).sum(-1)
    bad = np.flatnonzero(counts != num_image_tokens)
    if bad.size:
        raise ValueError(f'row {int(bad[0])} of input_ids has {int(counts[bad[0]])} <image> '
                         f'tokens (id {image_token_id}); PaliGemma needs exactly '
                         f'{num_image_tokens} per row (one image)')
