"""The SigLIP vision tower (ViT without a pooling head) in Flax NNX, as PaliGemma uses it.

Attribute names are the checkpoint's (`embeddings.patch_embedding`, `encoder.layers[i]`
with `layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc1/fc2`,
`post_layernorm`), so `HF_RULES` is a name-for-name table. Gemma 3's multimodal models use
the same tower (their 896-pixel variant only differs by config), which is why it lives
apart from PaliGemma.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

# SigLIP checkpoints use the tanh approximation of GELU in the MLP (HF `hidden_act`).
_ACTIVATION = 'gelu_pytorch_tanh'


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """Architecture of a SigLIP vision tower.

    Attributes:
      image_size: S, pixels per side of the (square) input.
      patch_size: p, pixels per side of a patch; P = (S // p) ** 2 patch tokens.
      width: D_v, the tower's residual width (HF `hidden_size`).
      mlp_dim: the MLP hidden width (HF `intermediate_size`).
      num_layers: encoder blocks.
      num_heads: attention heads (head dim D_v / num_heads).
      num_channels: C, input channels (3).
      layer_norm_eps: epsilon inside every LayerNorm.
    """
    image_size: int
    patch_size: int
    width: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f'image_size={self.image_size} is not a multiple of '
                             f'patch_size={self.patch_size}')
        if self.width % self.num_heads:
            raise ValueError(f'hidden_size={self.width} is not a multiple of '
                             f'num_attention_heads={self.num_heads}')

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """P, the number of image tokens the tower returns."""
        return self.grid ** 2

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> 'SiglipConfig':
        """From a transformers `vision_config` dict (complete: defaults already filled in).

        Raises:
          ValueError: a pooling head (`vision_use_head`, unused by PaliGemma and Gemma 3)
            or an activation other than tanh-GELU.
        """
        if hf.get('vision_use_head'):
            raise ValueError('vision_config.vision_use_head=True is not supported: PaliGemma '
                             'reads the patch tokens, not the pooled head')
        act = hf.get('hidden_act', _ACTIVATION)
        if act != _ACTIVATION:
            raise ValueError(f'vision_config.hidden_act={act!r} is not supported; SigLIP '
                             f'uses {_ACTIVATION!r}')
        return cls(image_size=hf['image_size'], patch_size=hf['patch_size'],
                   width=hf['hidden_size'], mlp_dim=hf['intermediate_size'],
                   num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
                   num_channels=hf.get('num_channels', 3),
                   layer_norm_eps=float(hf.get('layer_norm_eps', 1e-6)))

    @classmethod
    def so400m_224(cls) -> 'SiglipConfig':
        """google/paligemma2-3b-pt-224's vision_config (SigLIP So400m/14 at 224 pixels)."""
        return cls(image_size=224, patch_size=14, width=1152, mlp_dim=4304, num_layers=27,
                   num_heads=16)


class Dense(nnx.Module):
    """x @ w + b with w stored [in, out] (HF's Linear weight transposed)."""

    def __init__(self, d_in: int, d_out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.w = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (d_in, d_out), dtype))
        self.b = nnx.Param(jnp.zeros((d_out,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., in] -> [..., out]."""
        return jnp.einsum('...i,io->...o', x, self.w[...]) + self.b[...]


class LayerNorm(nnx.Module):
    """LayerNorm with float32 two-pass statistics (mean of squared deviations, as torch)."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs  # identity init; checkpoints overwrite it
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim] in x's dtype."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)


class Attention(nnx.Module):
    """Bidirectional multi-head self-attention over all patches (no mask, no RoPE)."""

    def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.width
        self.q_proj = Dense(d, d, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(d, d, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(d, d, dtype=dtype, rngs=rngs)
        self.out_proj = Dense(d, d, dtype=dtype, rngs=rngs)
        self.num_heads = cfg.num_heads
        self.scale = (d // cfg.num_heads) ** -0.5

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, P, D] -> [B, P, D]."""
        b, p, d = x.shape
        heads = (b, p, self.num_heads, d // self.num_heads)
        q = self.q_proj(x).reshape(heads)                           # [B, P, N, H]
        k = self.k_proj(x).reshape(heads)
        v = self.v_proj(x).reshape(heads)
        logits = jnp.einsum('BLNH,BSNH->BNLS', q, k).astype(jnp.float32) * self.scale
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)     # [B, N, P, P]
        enc = jnp.einsum('BNLS,BSNH->BLNH', probs, v).reshape(b, p, d)
        return self.out_proj(enc)


class MLP(nnx.Module):
    """fc1, tanh-GELU, fc2."""

    def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = Dense(cfg.width, cfg.mlp_dim, dtype=dtype, rngs=rngs)
        self.fc2 = Dense(cfg.mlp_dim, cfg.width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, P, D] -> [B, P, D]."""
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        def norm():
            return LayerNorm(cfg.width, eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.layer_norm1 = norm()
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = norm()
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, P, D] -> [B, P, D]."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class PatchEmbedding(nnx.Module):
    """A stride-p, p x p convolution with bias, stored as HF's Conv2d weight w [D, C, p, p]."""

    def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.width
        self.w = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (d, c, p, p), dtype))
        self.b = nnx.Param(jnp.zeros((d,), dtype))
        self.patch_size = p

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[B, C, S, S] -> [B, P, D], patches in row-major (row, column) order as HF's
        `flatten(2)` of the conv output. Non-overlapping patches make the conv one einsum."""
        b, c, h, w = pixel_values.shape
        p = self.patch_size
        x = pixel_values.astype(self.w.dtype).reshape(b, c, h // p, p, w // p, p)
        x = jnp.einsum('BCYpXq,DCpq->BYXD', x, self.w[...])      # [B, gh, gw, D]
        return x.reshape(b, (h // p) * (w // p), -1) + self.b[...]


class Embeddings(nnx.Module):
    """Patch embeddings plus a learned position embedding per patch."""

    def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.patch_embedding = PatchEmbedding(cfg, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_patches, cfg.width), dtype))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[B, C, S, S] -> [B, P, D]."""
        return self.patch_embedding(pixel_values) + self.position_embedding[...][None]


class Encoder(nnx.Module):
    """The stack of `EncoderLayer`s (a scope of its own, as in the checkpoint)."""

    def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])


class VisionTower(nnx.Module):
    """SigLIP ViT: patch embeddings, encoder, `post_layernorm`; returns every patch token."""

    def __init__(self, config: SiglipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(config.width, eps=config.layer_norm_eps, dtype=dtype,
                                        rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, C, S, S] (normalised to [-1, 1]) -> [B, P, D_v], post-normed
        (transformers' `last_hidden_state`)."""
        s = self.config.image_size
        if tuple(pixel_values.shape[1:]) != (self.config.num_channels, s, s):
            raise ValueError(f'pixel_values have shape {tuple(pixel_values.shape)}; this tower '
                             f'takes [B, {self.config.num_channels}, {s}, {s}]')
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# --------------------------------------------------------------------- checkpoint names
def _t(x):  # HF Linear weight [out, in] -> Dense.w [in, out]
    return x.T


def _same(x):
    return x


_LAYER = 'encoder.layers.{i}.'
# HF key (relative to the tower, e.g. after 'vision_tower.') -> (our path, transform).
HF_RULES: dict[str, tuple[tuple, Any]] = {
    'embeddings.patch_embedding.weight': (('embeddings', 'patch_embedding', 'w'), _same),
    'embeddings.patch_embedding.bias': (('embeddings', 'patch_embedding', 'b'), _same),
    'embeddings.position_embedding.weight': (('embeddings', 'position_embedding'), _same),
    'post_layernorm.weight': (('post_layernorm', 'scale'), _same),
    'post_layernorm.bias': (('post_layernorm', 'bias'), _same),
}
for _norm in ('layer_norm1', 'layer_norm2'):
    HF_RULES[_LAYER + _norm + '.weight'] = (('encoder', 'layers', '{i}', _norm, 'scale'), _same)
    HF_RULES[_LAYER + _norm + '.bias'] = (('encoder', 'layers', '{i}', _norm, 'bias'), _same)
for _scope, _names in (('self_attn', ('q_proj', 'k_proj', 'v_proj', 'out_proj')),
                       ('mlp', ('fc1', 'fc2'))):
    for _name in _names:
        _path = ('encoder', 'layers', '{i}', _scope, _name)
        HF_RULES[f'{_LAYER}{_scope}.{_name}.weight'] = (_path + ('w',), _t)
        HF_RULES[f'{_LAYER}{_scope}.{_name}.bias'] = (_path + ('b',), _same)
