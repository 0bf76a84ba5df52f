"""The logistic probe's math: parameters, sklearn's objective, optimiser steps, prediction.

Pure array functions shared by the fitting solvers (`probe`), the fused training step
(`steps`) and saved probes. Binary problems use ONE sigmoid logit (C' = 1) and multiclass a
softmax over C' = C logits, exactly like `sklearn.linear_model.LogisticRegression`.
Objective (sklearn's): `J(w, b) = sum_i s_i xent_i + ||w||^2 / (2 C)`, bias unpenalised;
`batch_loss` is its unbiased minibatch estimate of `J / n` (see `probe`'s docstring).
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class ProbeParams:
    """Probe parameters; `fit_grid` returns the same fields with a leading grid axis [G]."""
    w: jax.Array      # f32[F, C'], C' = 1 for binary problems, else C
    b: jax.Array      # f32[C'], unpenalised intercept
    mean: jax.Array   # f32[F], subtracted from the features (0 without standardisation)
    scale: jax.Array  # f32[F], divides the centred features (1 without standardisation)

    @property
    def num_classes(self) -> int:
        return 2 if self.w.shape[-1] == 1 else int(self.w.shape[-1])


def num_outputs(num_classes: int) -> int:
    """C': one logit for a binary problem (sklearn's convention), else one per class."""
    if num_classes < 2:
        raise ValueError(f'a probe needs num_classes >= 2, got {num_classes}')
    return 1 if num_classes == 2 else int(num_classes)


def init_params(num_features: int, num_classes: int, *, mean=None, scale=None) -> ProbeParams:
    """Zero weights, like sklearn: the objective is convex, so no random init is needed.

    Args:
      mean, scale: optional f32[F] standardisation (default: identity).
    """
    c = num_outputs(num_classes)
    return ProbeParams(
        w=jnp.zeros((num_features, c), jnp.float32), b=jnp.zeros((c,), jnp.float32),
        mean=(jnp.zeros((num_features,), jnp.float32) if mean is None
              else jnp.asarray(mean, jnp.float32)),
        scale=(jnp.ones((num_features,), jnp.float32) if scale is None
               else jnp.asarray(scale, jnp.float32)))


# ----------------------------------------------------------------------------------------
# Pure math: logits, losses, probabilities
# ----------------------------------------------------------------------------------------

def logits(params: ProbeParams, x: jax.Array) -> jax.Array:
    """f32[B, F] -> f32[B, C']. The standardisation is a constant, never trained."""
    mean = jax.lax.stop_gradient(params.mean)
    scale = jax.lax.stop_gradient(params.scale)
    return ((x - mean) / scale) @ params.w + params.b


def per_example_loss(params: ProbeParams, x: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy per row: f32[B, F], int[B] -> f32[B] (sigmoid when C' = 1)."""
    z = logits(params, x)
    if z.shape[-1] == 1:
        return optax.sigmoid_binary_cross_entropy(z[:, 0], labels.astype(z.dtype))
    return optax.softmax_cross_entropy_with_integer_labels(z, labels)


def l2_penalty(params: ProbeParams, C) -> jax.Array:
    """sklearn's `||w||^2 / (2 C)`; the intercept is not penalised."""
    return 0.5 / C * jnp.sum(params.w ** 2)


def _weighted_sum(params: ProbeParams, features: jax.Array, labels: jax.Array,
                  sample_weight: jax.Array | None, valid: jax.Array | None) -> jax.Array:
    """`sum_b valid_b s_b xent_b`: the data term of J on one batch (f32 scalar)."""
    xent = per_example_loss(params, features, labels)
    if sample_weight is not None:
        xent = xent * sample_weight
    if valid is not None:
        xent = jnp.where(valid, xent, 0.0)
    return jnp.sum(xent)


def _count(features: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Rows of the batch that belong to the training set (filler rows excluded)."""
    if valid is None:
        return jnp.asarray(features.shape[0], jnp.float32)
    return jnp.sum(valid.astype(jnp.float32))


def batch_loss(params: ProbeParams, features: jax.Array, labels: jax.Array,
               sample_weight: jax.Array | None = None, *, C, n_train=None,
               valid: jax.Array | None = None) -> jax.Array:
    """The one minibatch objective, an unbiased estimate of J / n:

      `sum_b valid_b s_b xent_b / n_valid + ||w||^2 / (2 C n_train)`.

    Class weights enter the numerator only (dividing by the batch's sum of weights would
    cancel `balanced` weighting inside a batch); the denominator counts training rows.

    Args:
      features: f32[B, F]; labels: int[B]; sample_weight: f32[B] (default ones; a weight of
        0 still counts the row in n_valid).
      valid: bool[B], False for filler rows that pad a batch to the device count (default
        all True); they count nowhere.
      n_train: rows in the whole training set (default n_valid: the batch is all of it).
    Returns:
      f32 scalar.
    """
    count = jnp.maximum(_count(features, valid), 1.0)
    n_train = count if n_train is None else n_train
    data = _weighted_sum(params, features, labels, sample_weight, valid) / count
    return data + l2_penalty(params, C) / n_train


def loss_and_grad(params: ProbeParams, features: jax.Array, labels: jax.Array,
                  sample_weight: jax.Array | None = None, *, C, n_train=None, valid=None):
    """(loss, grads) of `batch_loss`; grads of `mean`/`scale` are zero.

    For data parallelism with equal per-device batches, `lax.pmean` of these grads is the
    step on the concatenated batch; `make_train_step(axis_name=...)` is exact for unequal
    valid counts too (it sums before dividing).
    """
    return jax.value_and_grad(batch_loss)(params, features, labels, sample_weight,
                                          C=C, n_train=n_train, valid=valid)


def apply_update(tx: optax.GradientTransformation, params: ProbeParams, opt_state, grads):
    """One optax update of `w` and `b`; the standardisation is carried over unchanged
    (so weight decay in `tx` can never move it)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    return params.replace(w=new.w, b=new.b), opt_state


def make_train_step(tx: optax.GradientTransformation, *, C: float, num_classes: int,
                    n_train: int | None = None, axis_name: str | None = None) -> Callable:
    """A pure `step(params, opt_state, features, labels, sample_weight=None, valid=None)
    -> (params, opt_state, loss)` to jit, pmap or fuse into a bigger step (the fused
    feature -> probe step of `steps.py` and its cached twin both use it).

    The loss is `batch_loss`. With `axis_name`, the weighted sums, their gradients and the
    valid counts are `psum`-ed over that axis before dividing, so under
    `jax.pmap(step, axis_name=...)` every device applies the update of the whole batch.
    """
    expected = num_outputs(num_classes)

    def step(params, opt_state, features, labels, sample_weight=None, valid=None):
        if params.w.shape[-1] != expected:
            raise ValueError(f'params have {params.w.shape[-1]} logits but num_classes='
                             f'{num_classes} needs {expected}')
        num, g_num = jax.value_and_grad(_weighted_sum)(params, features, labels,
                                                       sample_weight, valid)
        count = _count(features, valid)
        if axis_name is not None:
            num, g_num, count = jax.lax.psum((num, g_num, count), axis_name)
        count = jnp.maximum(count, 1.0)
        n = count if n_train is None else n_train
        reg, g_reg = jax.value_and_grad(lambda p: l2_penalty(p, C) / n)(params)
        grads = jax.tree.map(lambda a, b: a / count + b, g_num, g_reg)
        with jax.named_scope('probe_update'):
            params, opt_state = apply_update(tx, params, opt_state, grads)
        return params, opt_state, num / count + reg

    return step


@functools.lru_cache(maxsize=None)  # one object per setting, so jit caches hit
def adamw(lr: float = 1e-3, weight_decay: float = 1e-5) -> optax.GradientTransformation:
    """MOSAIC's probe optimiser (AdamW, lr 1e-3, weight decay 1e-5), decaying w and b only."""
    mask = lambda p: ProbeParams(w=True, b=True, mean=False, scale=False)  # noqa: E731
    return optax.adamw(lr, weight_decay=weight_decay, mask=mask)


def predict_proba(params: ProbeParams, x) -> jax.Array:
    """f32[N, F] -> f32[N, C]; binary problems return both columns [1 - p, p]."""
    z = logits(params, jnp.asarray(x, jnp.float32))
    if z.shape[-1] == 1:
        p = jax.nn.sigmoid(z[:, 0])
        return jnp.stack([1.0 - p, p], axis=-1)
    return jax.nn.softmax(z, axis=-1)


def predict(params: ProbeParams, x) -> jax.Array:
    """f32[N, F] -> int32[N] predicted class."""
    z = logits(params, jnp.asarray(x, jnp.float32))
    if z.shape[-1] == 1:
        return (z[:, 0] > 0).astype(jnp.int32)
    return jnp.argmax(z, axis=-1).astype(jnp.int32)


def raw_coef(params: ProbeParams) -> tuple[np.ndarray, np.ndarray]:
    """Weights on the raw (unstandardised) features: (coef f32[F, C'], intercept f32[C'])."""
    w = np.asarray(params.w) / np.asarray(params.scale)[:, None]
    return w, np.asarray(params.b) - np.asarray(params.mean) @ w


def take(grid: ProbeParams, i: int) -> ProbeParams:
    """Entry i of a `fit_grid` result."""
    return jax.tree.map(lambda a: a[i], grid)


def class_weights(y, num_classes: int, sample_weight=None) -> np.ndarray:
    """sklearn's 'balanced' weights: n / (n_present_classes * count_c), 1 for absent classes.

    With sample weights, n and count_c are weighted sums, as sklearn >= 1.6 computes them.

    Args:
      y: int[N] labels in 0..num_classes-1; sample_weight: optional f32[N].
    Returns:
      f32[num_classes].
    """
    y = np.asarray(y)
    sw = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    counts = np.bincount(y, weights=sw, minlength=num_classes)
    present = np.bincount(y, minlength=num_classes) > 0
    out = np.ones(num_classes)
    out[present] = sw.sum() / (present.sum() * counts[present])
    return out.astype(np.float32)


def check_finite(loss, what: str = 'probe loss') -> None:
    """Raises FloatingPointError unless every entry of `loss` is finite (call outside jit)."""
    loss = np.asarray(loss)
    if not np.all(np.isfinite(loss)):
        raise FloatingPointError(
            f'non-finite {what}: {loss.tolist()}; check the features for huge values or '
            f'try standardize=True / a smaller C')
