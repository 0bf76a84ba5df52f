"""The Gemma 2 / Gemma 3 text architecture as one frozen dataclass.

The two generations differ by fields (attention pattern, QK norm, soft caps, RoPE bases),
not by files. `GemmaConfig.from_hf` reads a transformers `config.json` dict.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

import jax.numpy as jnp


class AttentionType(str, enum.Enum):
    """Per-layer attention kind; the values are HF's `layer_types` strings."""
    GLOBAL = 'full_attention'
    LOCAL_SLIDING = 'sliding_attention'


SUPPORTED_ARCHITECTURES = ('Gemma2ForCausalLM', 'Gemma3ForCausalLM')
SUPPORTED_MODEL_TYPES = ('gemma2', 'gemma3', 'gemma3_text')

# Every Gemma 2/3 checkpoint uses the tanh approximation of GELU in its GeGLU.
_ACTIVATION = 'gelu_pytorch_tanh'


def _default_pattern(generation: int, num_layers: int) -> tuple[AttentionType, ...]:
    """HF's fallback `layer_types` when a config omits them.

    Gemma 2 alternates local/global starting with local; Gemma 3 has 5 local layers per
    global one (`sliding_window_pattern` = 6 in transformers' Gemma3TextConfig).
    """
    period = 2 if generation == 2 else 6
    return tuple(AttentionType.LOCAL_SLIDING if (i + 1) % period else AttentionType.GLOBAL
                 for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture of a Gemma 2 or Gemma 3 text decoder.

    Attributes:
      vocab_size: V, rows of the (tied) embedding table.
      embed_dim: D, residual stream width (HF `hidden_size`).
      hidden_dim: F, GeGLU width (HF `intermediate_size`).
      num_heads: N query heads.
      num_kv_heads: K key/value heads (N % K == 0, grouped-query attention).
      head_dim: H.
      query_pre_attn_scalar: queries are scaled by its -1/2 power. Read from the checkpoint
        config, never derived from head_dim (Gemma 2 27B uses embed_dim / num_heads).
      attn_types: one `AttentionType` per block; its length is the number of blocks.
      sliding_window: keys at most this many positions back (self included) are visible
        on LOCAL_SLIDING layers.
      rope_theta: RoPE base of GLOBAL layers.
      rope_local_base_freq: RoPE base of LOCAL_SLIDING layers (Gemma 2: same as rope_theta).
      rope_scale_factor: linear RoPE scaling of GLOBAL layers (positions are divided by it;
        Gemma 3 4B+ use 8.0, 1.0 means none).
      rope_local_scale_factor: the same for LOCAL_SLIDING layers (1.0 in every release).
      attn_logit_softcapping: tanh soft cap on attention logits, None for none.
      final_logit_softcapping: tanh soft cap on the output logits, None for none.
      use_qk_norm: RMSNorm on queries and keys per head (Gemma 3).
      rms_norm_eps: epsilon inside every RMSNorm.
      tie_embeddings: the LM head is the embedding table (true for every Gemma 2/3).
      hidden_activation: GeGLU gate activation; only 'gelu_pytorch_tanh' is supported.
    """
    vocab_size: int
    embed_dim: int
    hidden_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    attn_types: tuple[AttentionType, ...]
    sliding_window: int | None
    rope_theta: float = 10_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scale_factor: float = 1.0
    rope_local_scale_factor: float = 1.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    use_qk_norm: bool = False
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    hidden_activation: str = _ACTIVATION

    def __post_init__(self):
        object.__setattr__(self, 'attn_types', tuple(AttentionType(t) for t in self.attn_types))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                             f'num_kv_heads={self.num_kv_heads}')
        if AttentionType.LOCAL_SLIDING in self.attn_types and not self.sliding_window:
            raise ValueError('attn_types has sliding layers but sliding_window is not set')
        if self.hidden_activation != _ACTIVATION:
            raise ValueError(f'hidden_activation={self.hidden_activation!r} is not supported; '
                             f'Gemma 2/3 use {_ACTIVATION!r}')
        if not self.tie_embeddings:
            raise ValueError('untied LM heads are not supported (every Gemma 2/3 ties them)')

    @property
    def num_layers(self) -> int:
        return len(self.attn_types)

    def rope(self, attn_type: AttentionType) -> tuple[float, float]:
        """(base frequency, linear scale factor) of RoPE on layers of this type."""
        if attn_type == AttentionType.GLOBAL:
            return self.rope_theta, self.rope_scale_factor
        return self.rope_local_base_freq, self.rope_local_scale_factor

    # ---------------------------------------------------------------- from HF config.json
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> 'GemmaConfig':
        """Builds the config from a transformers `config.json` dict (4.x or 5.x layout).

        Raises:
          ValueError: the architecture / model_type is not a Gemma 2 or Gemma 3 text model,
            or a setting we do not implement (e.g. a non-linear RoPE scaling) is present.
        """
        archs = list(hf.get('architectures') or [])
        model_type = hf.get('model_type')
        unknown = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if unknown or (not archs and model_type not in SUPPORTED_MODEL_TYPES):
            raise ValueError(
                f'unsupported architecture {unknown or model_type!r}: mosaic_jax implements '
                f'{", ".join(SUPPORTED_ARCHITECTURES)} (model_type '
                f'{"/".join(SUPPORTED_MODEL_TYPES)})')
        if 'text_config' in hf:
            raise ValueError('multimodal Gemma 3 configs (with text_config) are not supported; '
                             'use a text-only Gemma3ForCausalLM checkpoint')
        generation = 2 if (model_type == 'gemma2' or 'Gemma2ForCausalLM' in archs) else 3
        if hf.get('use_bidirectional_attention') or hf.get('attention_bias'):
            raise ValueError('bidirectional attention and attention biases are not supported '
                             '(no Gemma 2/3 causal LM uses them)')

        num_layers = hf['num_hidden_layers']
        layer_types = hf.get('layer_types')
        attn_types = (tuple(layer_types) if layer_types
                      else _default_pattern(generation, num_layers))
        if len(attn_types) != num_layers:
            raise ValueError(f'layer_types has {len(attn_types)} entries for '
                             f'num_hidden_layers={num_layers}')

        global_rope, local_rope = _rope_settings(hf, generation)
        head_dim = hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads']
        return cls(
            vocab_size=hf['vocab_size'],
            embed_dim=hf['hidden_size'],
            hidden_dim=hf['intermediate_size'],
            num_heads=hf['num_attention_heads'],
            num_kv_heads=hf.get('num_key_value_heads', hf['num_attention_heads']),
            head_dim=head_dim,
            # transformers' default when the key is absent; never head_dim ** -0.5.
            query_pre_attn_scalar=float(hf.get('query_pre_attn_scalar', 256)),
            attn_types=attn_types,
            sliding_window=hf.get('sliding_window'),
            rope_theta=global_rope[0],
            rope_scale_factor=global_rope[1],
            rope_local_base_freq=local_rope[0],
            rope_local_scale_factor=local_rope[1],
            attn_logit_softcapping=hf.get('attn_logit_softcapping'),
            final_logit_softcapping=hf.get('final_logit_softcapping'),
            use_qk_norm=generation == 3,
            rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
            tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
            hidden_activation=hf.get('hidden_activation') or hf.get('hidden_act') or _ACTIVATION,
        )

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def gemma2_2b(cls) -> 'GemmaConfig':
        """google/gemma-2-2b config.json."""
        return cls(vocab_size=256_000, embed_dim=2304, hidden_dim=9216, num_heads=8,
                   num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256.0,
                   attn_types=_default_pattern(2, 26), sliding_window=4096,
                   rope_theta=10_000.0, rope_local_base_freq=10_000.0,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0)

    @classmethod
    def gemma2_9b(cls) -> 'GemmaConfig':
        """google/gemma-2-9b config.json."""
        return cls(vocab_size=256_000, embed_dim=3584, hidden_dim=14_336, num_heads=16,
                   num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256.0,
                   attn_types=_default_pattern(2, 42), sliding_window=4096,
                   rope_theta=10_000.0, rope_local_base_freq=10_000.0,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0)

    @classmethod
    def gemma3_270m(cls) -> 'GemmaConfig':
        """google/gemma-3-270m config.json (no soft caps, QK norm, 5 local : 1 global)."""
        return cls(vocab_size=262_144, embed_dim=640, hidden_dim=2048, num_heads=4,
                   num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256.0,
                   attn_types=_default_pattern(3, 18), sliding_window=512,
                   rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, use_qk_norm=True)


def _rope_settings(hf: Mapping[str, Any], generation: int):
    """((global base, global factor), (local base, local factor)) from either config layout.

    transformers 4.x writes `rope_theta`, `rope_local_base_freq` and `rope_scaling`
    (which applies to global layers only); 5.x writes `rope_parameters`, per layer type for
    Gemma 3 and flat for Gemma 2.
    """
    default_global = 10_000.0 if generation == 2 else 1_000_000.0
    params = hf.get('rope_parameters')
    if params and ('full_attention' in params or 'sliding_attention' in params):
        glob = params.get('full_attention') or {}
        loc = params.get('sliding_attention') or {}
    else:
        glob = dict(params or {})
        glob.setdefault('rope_theta', hf.get('rope_theta', default_global))
        glob.update(hf.get('rope_scaling') or {})
        loc = {'rope_theta': hf.get('rope_local_base_freq', 10_000.0)}
        if generation == 2:
            loc = {'rope_theta': glob['rope_theta']}  # Gemma 2 has one RoPE base for all layers
    glob_base = float(glob.get('rope_theta', hf.get('rope_theta', default_global)))
    loc_base = float(loc.get('rope_theta', hf.get('rope_local_base_freq', 10_000.0)))
    return (glob_base, _linear_factor(glob)), (loc_base, _linear_factor(loc))


def _linear_factor(rope: Mapping[str, Any]) -> float:
    kind = rope.get('rope_type', rope.get('type', 'default'))
    if kind == 'default':
        return 1.0
    if kind == 'linear':
        return float(rope['factor'])
    raise ValueError(f'RoPE scaling type {kind!r} is not supported (only default and linear)')


def resolve_dtype(dtype) -> jnp.dtype:
    """'float32' / 'bfloat16' (or the jnp dtypes) -> jnp dtype; float16 is refused.

    Raises:
      ValueError: float16 (Gemma residual streams exceed its range: Gemma 3 270M's BOS
        activations pass 65504, so they overflow to inf) or any other dtype.
    """
    d = jnp.dtype(dtype)
    if d == jnp.float16:
        raise ValueError(
            "dtype 'float16' is not supported: Gemma residual streams exceed the float16 range "
            "(Gemma 3 270M's BOS activations are larger than 65504 and overflow to inf); "
            "use 'bfloat16' or 'float32'")
    if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype {dtype!r} is not supported; use 'float32' or 'bfloat16'")
    return d
