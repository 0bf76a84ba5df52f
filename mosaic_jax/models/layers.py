"""The two parameterised primitives of Gemma: `Einsum` and `RMSNorm`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Einsum(nnx.Module):
    """A weight `w` of a fixed shape applied with an einsum string given at call time."""

    def __init__(self, shape: tuple[int, ...], *, dtype=jnp.float32, rngs: nnx.Rngs):
        # Initial values only matter for tests; checkpoints overwrite them.
        self.w = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shape, dtype))

    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return jnp.einsum(eqn, x, self.w[...])


class RMSNorm(nnx.Module):
    """Gemma RMSNorm: float32 statistics, scaled by (1 + scale) as checkpoints store it."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs  # zeros: the identity scale, as in transformers' init
        self.scale = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim] in x's dtype."""
        # Computed in float32 and cast back only at the end, like transformers' Gemma2RMSNorm
        # ((x * w).to(bf16), not x.to(bf16) * w), so bf16 runs round the same way.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
