"""JumpReLU SAE training on residual activations (the Gemma Scope recipe), plus evaluation.

Recipe (Rajamanoharan et al. 2024, arXiv 2407.14435; Lieberum et al. 2024, arXiv 2408.05147):
loss = ||x - x_hat||^2 + lambda * L0(f), JumpReLU f = z * H(z - theta), straight-through
pseudo-derivatives with a rectangle kernel of bandwidth eps for theta (in both the JumpReLU and
the L0 step function), lambda warmed up linearly from 0, Adam(b1=0, b2=0.999) with a cosine
learning-rate warm-up from 0.1 * lr, decoder rows kept at unit norm (gradient parallel to each
row projected out, rows renormalised after every step), W_enc = W_dec^T at init, b_enc = 0,
theta = 1e-3 at init, inputs scaled by one fixed scalar so that E||x||^2 = 1.

Deviations, for short CPU budgets: theta is clamped at `min_threshold` after every step (so it
stays positive); `target_l0` optionally swaps the lambda * L0 penalty for
lambda * (L0 / target - 1)^2 (the dictionary_learning variant), which lands near a chosen
sparsity without a lambda sweep.

Normalisation is folded back on export (`to_sae_params`). Training sees x' = (x - mu) * a
(Gemma Scope: mu = 0, a = s the same for every dimension; `normalise='per_dim'`: mu the data
mean and a ~ 1/std per dimension, for residual streams where a few massive dimensions would
otherwise own the squared error). Then pre' = x (a * W_enc) + b_enc - (mu * a) W_enc, and
x = x_hat' / a + mu, so the raw-space SAE has W_enc' = a * W_enc, b_enc' = b_enc - (mu a) W_enc,
W_dec' = W_dec / a, b_dec' = b_dec / a + mu. JumpReLU is positively homogeneous, so each
latent i is then rescaled by c_i = ||W_dec'_i|| (encoder column, b_enc and theta times c_i,
decoder row divided by it) to give unit decoder rows again. It fires on exactly the same
latents; in the scalar case this is W_enc, W_dec unchanged and b_enc, theta, b_dec divided by s.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import math
import os
import re
import shutil
import time
from typing import Any, Callable, Iterable, Iterator

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mosaic_jax import checkpoint
from mosaic_jax.sae import jumprelu as sae_math


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one SAE run; defaults are the papers' unless a comment says so."""
    width: int = 4096                 # F, number of latents
    steps: int = 4000                 # optimiser steps (paper: ~1M; we have CPU minutes)
    batch_size: int = 1024            # activations per step (paper: 4096)
    lr: float = 7e-5                  # paper value; short runs want more (see scripts/)
    lr_warmup_frac: float = 0.05      # cosine warm-up from 0.1*lr (paper: first 1,000 steps)
    lr_decay_frac: float = 0.0        # linear decay to 0 over this final fraction (paper: none)
    adam_b1: float = 0.0              # paper: no momentum
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    l0_coeff: float = 1e-3            # lambda
    target_l0: float | None = None    # None: lambda*L0 (paper); k: lambda*(L0/k - 1)^2
    l0_warmup_frac: float = 0.1       # lambda ramps linearly from 0 (paper: first 10k steps)
    bandwidth: float = 1e-3           # eps of the rectangle kernel, in normalised units
    init_threshold: float = 1e-3      # theta at init, in normalised units
    min_threshold: float = 1e-6       # theta is clamped here after each step (stays > 0)
    target_mean_sq_norm: float = 1.0  # E||s*x||^2 after scaling (Gemma Scope: unit mean sq.)
    normalise: str = 'scalar'         # 'scalar' (paper) or 'per_dim' (see module docstring)
    norm_sample_size: int = 16384     # rows used to estimate the normalisation
    b_dec_init: str = 'zero'          # 'zero' (paper) or 'mean' of the normalised sample
    seed: int = 0
    checkpoint_every: int = 500       # steps between orbax checkpoints (when a dir is given)
    keep_checkpoints: int = 2         # older step folders are deleted

    def validate(self) -> None:
        if self.width < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(f'width, steps and batch_size must be >= 1, got {self.width}, '
                             f'{self.steps}, {self.batch_size}')
        if self.bandwidth <= 0 or self.init_threshold <= 0:
            raise ValueError('bandwidth and init_threshold must be > 0, got '
                             f'{self.bandwidth}, {self.init_threshold}')
        if not 0 < self.min_threshold <= self.init_threshold:
            raise ValueError(f'min_threshold must be in (0, init_threshold], got '
                             f'{self.min_threshold}')
        for name in ('lr_warmup_frac', 'lr_decay_frac', 'l0_warmup_frac'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f'{name} must be in [0, 1], got {getattr(self, name)}')
        if self.lr_warmup_frac + self.lr_decay_frac > 1.0:
            raise ValueError('lr_warmup_frac + lr_decay_frac must be <= 1')
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise ValueError(f'target_l0 must be > 0 or None, got {self.target_l0}')
        if self.normalise not in ('scalar', 'per_dim'):
            raise ValueError(f"normalise must be 'scalar' or 'per_dim', got {self.normalise!r}")
        if self.b_dec_init not in ('zero', 'mean'):
            raise ValueError(f"b_dec_init must be 'zero' or 'mean', got {self.b_dec_init!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs; all leaves are arrays so orbax can store it.

    params (normalised units): w_enc f32[D, F], b_enc f32[F], threshold f32[F],
    w_dec f32[F, D] (unit rows), b_dec f32[D].
    """
    step: jax.Array          # int32[]
    params: dict[str, jax.Array]
    opt_state: Any
    key: jax.Array           # uint32[2], raw PRNG key data; batch sampling derives from it
    shift: jax.Array         # f32[D], mu: subtracted from raw activations ...
    scale: jax.Array         # f32[D], a: ... which are then multiplied by it


# ---------------------------------------------------------------------------------------
# JumpReLU and step with straight-through pseudo-derivatives.
# ---------------------------------------------------------------------------------------
def _rectangle(u: jax.Array) -> jax.Array:
    """Rectangle kernel K(u) = 1 on (-1/2, 1/2), 0 elsewhere."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to(g: jax.Array, shape) -> jax.Array:
    """Sums the leading (broadcast) axes of g so it has `shape` (theta is [F], z is [B, F])."""
    return g.sum(axis=tuple(range(g.ndim - len(shape)))).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """z * H(z - theta); d/dz = H(z - theta), d/dtheta = -(theta/eps) K((z - theta)/eps)."""
    return z * (z > theta).astype(z.dtype)


def _jumprelu_fwd(z, theta, bandwidth):
    return jumprelu(z, theta, bandwidth), (z, theta)


def _jumprelu_bwd(bandwidth, res, g):
    z, theta = res
    dz = g * (z > theta).astype(z.dtype)
    dtheta = -(theta / bandwidth) * _rectangle((z - theta) / bandwidth) * g
    return dz, _sum_to(dtheta, theta.shape)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step_fn(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """H(z - theta); d/dz = 0, d/dtheta = -(1/eps) K((z - theta)/eps)."""
    return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, bandwidth):
    return step_fn(z, theta, bandwidth), (z, theta)


def _step_bwd(bandwidth, res, g):
    z, theta = res
    dtheta = -(1.0 / bandwidth) * _rectangle((z - theta) / bandwidth) * g
    return jnp.zeros_like(z), _sum_to(dtheta, theta.shape)


step_fn.defvjp(_step_fwd, _step_bwd)


# ---------------------------------------------------------------------------------------
# Init, schedules, loss, step.
# ---------------------------------------------------------------------------------------
def init(key: jax.Array, d_model: int, width: int, *, init_threshold: float = 1e-3,
         b_dec: jax.Array | None = None) -> dict[str, jax.Array]:
    """Gemma Scope init: He-uniform W_dec with unit rows, W_enc = W_dec^T, b_enc = 0.

    Args:
      key: PRNG key.
      d_model: D.
      width: F.
      init_threshold: theta at init (normalised units).
      b_dec: optional f32[D] decoder bias (e.g. the data mean); zeros when None.
    Returns:
      training params: w_enc f32[D, F], b_enc f32[F], threshold f32[F], w_dec f32[F, D],
      b_dec f32[D].
    """
    bound = math.sqrt(6.0 / width)  # He-uniform with fan-in F; rescaled to unit rows below
    w_dec = jax.random.uniform(key, (width, d_model), jnp.float32, -bound, bound)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    if b_dec is None:
        b_dec = jnp.zeros((d_model,), jnp.float32)
    elif b_dec.shape != (d_model,):
        raise ValueError(f'b_dec must have shape ({d_model},), got {b_dec.shape}')
    return dict(w_enc=w_dec.T, b_enc=jnp.zeros((width,), jnp.float32),
                threshold=jnp.full((width,), init_threshold, jnp.float32),
                w_dec=w_dec, b_dec=jnp.asarray(b_dec, jnp.float32))


def lr_schedule(cfg: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """Cosine warm-up from 0.1*lr to lr, constant, optional linear decay to 0 at the end."""
    warm = max(int(round(cfg.lr_warmup_frac * cfg.steps)), 1)
    decay = int(round(cfg.lr_decay_frac * cfg.steps))
    decay_start = cfg.steps - decay

    def schedule(count):
        t = count.astype(jnp.float32)
        up = 0.1 + 0.9 * 0.5 * (1.0 - jnp.cos(jnp.pi * jnp.minimum(t / warm, 1.0)))
        down = jnp.clip((cfg.steps - t) / max(decay, 1), 0.0, 1.0) if decay else 1.0
        return cfg.lr * up * jnp.where(t >= decay_start, down, 1.0)
    return schedule


def l0_coeff_at(cfg: TrainConfig, step: jax.Array) -> jax.Array:
    """lambda ramps linearly from 0 to l0_coeff over the first l0_warmup_frac of steps."""
    warm = cfg.l0_warmup_frac * cfg.steps
    ramp = jnp.minimum(step.astype(jnp.float32) / warm, 1.0) if warm > 0 else 1.0
    return cfg.l0_coeff * ramp


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps),
                       optax.scale_by_learning_rate(lr_schedule(cfg)))


def forward(params: dict[str, jax.Array], x: jax.Array, bandwidth: float):
    """Normalised-space SAE pass. x: f32[B, D] -> (codes f32[B, F], recon f32[B, D], L0 f32[B])."""
    theta = params['threshold']                                    # [F]
    pre = x @ params['w_enc'] + params['b_enc']                    # [B, F]
    codes = jumprelu(pre, theta, bandwidth)                        # [B, F]
    recon = codes @ params['w_dec'] + params['b_dec']              # [B, D]
    l0 = step_fn(pre, theta, bandwidth).sum(-1)                    # [B]
    return codes, recon, l0


def loss_fn(params, x, l0_coeff, cfg: TrainConfig):
    """Mean over the batch of ||x - x_hat||^2 + sparsity penalty; x is already normalised."""
    _, recon, l0 = forward(params, x, cfg.bandwidth)
    mse = jnp.sum((recon - x) ** 2, axis=-1).mean()
    l0 = l0.mean()
    sparsity = l0 if cfg.target_l0 is None else (l0 / cfg.target_l0 - 1.0) ** 2
    loss = mse + l0_coeff * sparsity
    var = jnp.sum((x - x.mean(0)) ** 2, axis=-1).mean()
    return loss, dict(loss=loss, mse=mse, l0=l0, fve=1.0 - mse / var)


def _unit_rows(w: jax.Array) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=8)  # one compilation per config, also across train_sae calls
def make_train_step(cfg: TrainConfig) -> Callable[[TrainState, jax.Array], tuple]:
    """Builds the jitted `train_step(state, batch) -> (state, metrics)`.

    batch: raw (unnormalised) activations f32[B, D]; the step applies shift and scale.
    metrics: scalar loss, mse, l0, fve (fraction of variance explained on this batch) and the
    current lambda and learning rate.
    """
    cfg.validate()
    tx = make_optimizer(cfg)
    schedule = lr_schedule(cfg)

    @jax.jit
    def train_step(state: TrainState, batch: jax.Array):
        x = (batch.astype(jnp.float32) - state.shift) * state.scale
        lam = l0_coeff_at(cfg, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, x, lam, cfg)
        # Only the component of each decoder-row gradient orthogonal to the (unit) row can
        # change anything once rows are renormalised; Adam would otherwise mix in the rest.
        w_dec = state.params['w_dec']
        g = grads['w_dec']
        grads = dict(grads, w_dec=g - jnp.sum(g * w_dec, -1, keepdims=True) * w_dec)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = dict(params, w_dec=_unit_rows(params['w_dec']),
                      threshold=jnp.maximum(params['threshold'], cfg.min_threshold))
        metrics = dict(metrics, l0_coeff=lam, lr=schedule(state.step))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def init_state(cfg: TrainConfig, d_model: int, shift: np.ndarray | float,
               scale: np.ndarray | float, b_dec: np.ndarray | None = None) -> TrainState:
    """Fresh state from cfg.seed; shift/scale broadcast to [D]; b_dec normalised units."""
    cfg.validate()
    init_key, data_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    params = init(init_key, d_model, cfg.width, init_threshold=cfg.init_threshold,
                  b_dec=None if b_dec is None else jnp.asarray(b_dec))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=make_optimizer(cfg).init(params), key=data_key,
                      shift=jnp.broadcast_to(jnp.asarray(shift, jnp.float32), (d_model,)),
                      scale=jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (d_model,)))


def to_sae_params(state: TrainState) -> sae_math.SAEParams:
    """The SAE on raw activations, with unit decoder rows (see module docstring)."""
    p = {k: np.asarray(v, np.float64) for k, v in jax.device_get(state.params).items()}
    mu = np.asarray(state.shift, np.float64)                          # [D]
    a = np.asarray(state.scale, np.float64)                           # [D]
    w_dec = p['w_dec'] / a                                            # [F, D]
    c = np.linalg.norm(w_dec, axis=-1)                                # [F], > 0
    arrays = dict(w_enc=a[:, None] * p['w_enc'] * c,
                  b_enc=(p['b_enc'] - (mu * a) @ p['w_enc']) * c,
                  threshold=p['threshold'] * c,
                  w_dec=w_dec / c[:, None],
                  b_dec=p['b_dec'] / a + mu)
    return sae_math.SAEParams(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})


def norm_stats(sample: np.ndarray, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(shift mu f32[D], scale a f32[D]) with mean ||(x - mu) * a||^2 = target on `sample`."""
    d = sample.shape[-1]
    if cfg.normalise == 'scalar':
        return (np.zeros(d, np.float32),
                np.full(d, norm_scale(sample, cfg.target_mean_sq_norm), np.float32))
    mu = sample.mean(0, dtype=np.float64)
    std = sample.std(0, dtype=np.float64)
    inv = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 1.0)  # constant dims: as is
    z = (sample - mu) * inv
    a = inv * norm_scale(z, cfg.target_mean_sq_norm)
    return mu.astype(np.float32), a.astype(np.float32)


def norm_scale(sample: np.ndarray, target_mean_sq_norm: float = 1.0) -> float:
    """s such that mean_i ||s * x_i||^2 = target (sample: f32[N, D])."""
    mean_sq = float(np.mean(np.sum(np.square(sample, dtype=np.float64), axis=-1)))
    if not np.isfinite(mean_sq) or mean_sq <= 0:
        raise ValueError(f'cannot normalise activations with mean squared norm {mean_sq}')
    return math.sqrt(target_mean_sq_norm / mean_sq)


# ---------------------------------------------------------------------------------------
# Batches, checkpoints, the loop.
# ---------------------------------------------------------------------------------------
def _array_batch(acts: np.ndarray, key: np.ndarray, step: int, batch_size: int) -> np.ndarray:
    """Rows drawn with replacement; a pure function of (key, step), so resuming is exact."""
    rng = np.random.default_rng([int(k) for k in np.asarray(key)] + [step])
    idx = np.sort(rng.integers(0, acts.shape[0], batch_size))  # sorted: kinder to memmaps
    return np.asarray(acts[idx], np.float32)


_CKPT_RE = re.compile(r'^state_(\d{8})$')


def _checkpoints(folder: str) -> list[tuple[int, str]]:
    out = []
    for path in glob.glob(os.path.join(folder, 'state_*')):
        m = _CKPT_RE.match(os.path.basename(path))
        if m and os.path.isdir(path):
            out.append((int(m.group(1)), path))
    return sorted(out)


def save_state(folder: str, state: TrainState, history: dict[str, list], keep: int) -> None:
    """Writes state_<step>/ (orbax) and metrics.json, then prunes to the newest `keep`."""
    step = int(state.step)
    tree = dict(step=state.step, params=state.params, opt_state=state.opt_state,
                key=state.key, shift=state.shift, scale=state.scale)
    checkpoint.save_pytree(os.path.join(folder, f'state_{step:08d}'), tree)
    checkpoint.atomic_write_json(os.path.join(folder, 'metrics.json'),
                                 dict(step=step, history=history))
    for _, path in _checkpoints(folder)[:-keep]:
        shutil.rmtree(path)


def restore_state(folder: str, like: TrainState) -> tuple[TrainState, dict] | None:
    """Latest checkpoint in `folder` shaped like `like`, with the metric history; or None."""
    found = _checkpoints(folder)
    if not found:
        return None
    step, path = found[-1]
    tree = dict(step=like.step, params=like.params, opt_state=like.opt_state, key=like.key,
                shift=like.shift, scale=like.scale)
    restored = checkpoint.restore_pytree(path, jax.tree.map(np.asarray, tree))
    state = TrainState(**jax.tree.map(jnp.asarray, restored))
    history = {}
    metrics_path = os.path.join(folder, 'metrics.json')
    if os.path.exists(metrics_path):
        saved = checkpoint.read_json(metrics_path)
        # metrics.json is written after the state folder, so it can only be ahead on a
        # crash between the two; keep the rows up to the restored step.
        rows = sum(1 for s in saved['history'].get('step', []) if s <= step)
        history = {k: v[:rows] for k, v in saved['history'].items()}
    if int(state.step) != step:
        raise ValueError(f'checkpoint {path} holds step {int(state.step)}, not {step}')
    return state, history


def _check_config(folder: str, cfg: TrainConfig, d_model: int) -> None:
    """A checkpoint folder belongs to one config: resuming under another would mix runs."""
    path = os.path.join(folder, 'train_config.json')
    want = dict(cfg.to_dict(), d_model=d_model)
    if os.path.exists(path):
        have = checkpoint.read_json(path)
        # Checkpoint cadence may change between resumes without changing the result.
        free = ('checkpoint_every', 'keep_checkpoints')
        diff = sorted(k for k in set(have) | set(want)
                      if k not in free and have.get(k) != want.get(k))
        if diff:
            raise ValueError(f'{folder} was written by a different config (fields {diff}: '
                             f'{[(have.get(k), want.get(k)) for k in diff]}); use a new '
                             'checkpoint_dir or the same config')
    else:
        checkpoint.atomic_write_json(path, want)


def train_sae(activation_source: np.ndarray | Iterable[np.ndarray], d_model: int,
              cfg: TrainConfig, *, checkpoint_dir: str | None = None, log_every: int = 100,
              stop_at: int | None = None) -> tuple[sae_math.SAEParams, dict[str, np.ndarray]]:
    """Trains one JumpReLU SAE; resumes from the newest checkpoint in `checkpoint_dir`.

    Args:
      activation_source: raw activations, either an array-like f32/bf16[N, D] (a numpy
        array or memmap; batches are drawn with replacement as a pure function of the seed
        and step) or an iterable of f32[B, D] batches (B = cfg.batch_size). An iterable must
        yield the same sequence every time it is iterated, because a resumed run starts a
        fresh iterator and skips the batches already consumed.
      d_model: D.
      cfg: hyper-parameters.
      checkpoint_dir: orbax checkpoints every cfg.checkpoint_every steps (and at the end);
        None trains without checkpoints.
      log_every: steps between rows of the returned history (and log lines).
      stop_at: stop (after a checkpoint) once this step is reached, e.g. to time-slice a
        shared machine; the returned params are those of that step.
    Returns:
      (SAEParams in raw activation space, history {step, loss, mse, l0, fve, l0_coeff, lr}
      as numpy arrays, one row every `log_every` steps).
    """
    cfg.validate()
    is_array = hasattr(activation_source, 'shape')
    if is_array:
        if activation_source.ndim != 2 or activation_source.shape[1] != d_model:
            raise ValueError(f'activations must be [N, {d_model}], got '
                             f'{activation_source.shape}')
        n = min(cfg.norm_sample_size, activation_source.shape[0])
        sample_rng = np.random.default_rng(cfg.seed)
        sample = np.asarray(activation_source[np.sort(
            sample_rng.choice(activation_source.shape[0], n, replace=False))], np.float32)
        batches: Iterator[np.ndarray] | None = None
    else:
        batches = iter(activation_source)
        first = np.asarray(next(batches), np.float32)
        batches = itertools.chain([first], batches)
        sample = first

    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        _check_config(checkpoint_dir, cfg, d_model)
    shift, scale = norm_stats(sample, cfg)
    b_dec = (sample.mean(0) - shift) * scale if cfg.b_dec_init == 'mean' else None
    state = init_state(cfg, d_model, shift, scale, b_dec)
    history: dict[str, list] = {}
    if checkpoint_dir and (restored := restore_state(checkpoint_dir, state)) is not None:
        state, history = restored
        logging.info('resumed %s at step %d', checkpoint_dir, int(state.step))
        if batches is not None:  # skip what the interrupted run consumed
            batches = itertools.islice(batches, int(state.step), None)

    train_step = make_train_step(cfg)
    key = np.asarray(state.key)
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    t0, step0 = time.time(), int(state.step)
    for step in range(int(state.step), last):
        if is_array:
            batch = _array_batch(activation_source, key, step, cfg.batch_size)
        else:
            batch = np.asarray(next(batches), np.float32)
        state, metrics = train_step(state, batch)
        done = step + 1
        if done % log_every == 0 or done == last:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(metrics['loss']):
                raise FloatingPointError(f'non-finite SAE loss at step {done}: {metrics}')
            history.setdefault('step', []).append(done)
            for k, v in metrics.items():
                history.setdefault(k, []).append(v)
            rate = (done - step0) / max(time.time() - t0, 1e-9)
            logging.info('step %d/%d loss %.4g mse %.4g l0 %.1f fve %.3f (%.2f steps/s)',
                         done, cfg.steps, metrics['loss'], metrics['mse'], metrics['l0'],
                         metrics['fve'], rate)
        if checkpoint_dir and (done % cfg.checkpoint_every == 0 or done == last):
            save_state(checkpoint_dir, state, history, cfg.keep_checkpoints)
    return to_sae_params(state), {k: np.asarray(v) for k, v in history.items()}


# ---------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------
@jax.jit
def _eval_chunk(params: sae_math.SAEParams, x: jax.Array):
    """Summed squared error, active count and which latents fired, for x f32[N, D]."""
    codes = sae_math.encode(params, x)
    err = jnp.sum((sae_math.decode(params, codes) - x) ** 2, -1)
    return err.sum(), (codes > 0).sum(), (codes > 0).any(0)


def evaluate(params: sae_math.SAEParams, acts: np.ndarray, *, batch_size: int = 4096
             ) -> dict[str, float]:
    """Reconstruction quality of a raw-space SAE on held-out activations.

    Args:
      params: SAE in raw activation space.
      acts: f32[N, D] raw activations (no BOS, no padding).
      batch_size: rows per jitted chunk.
    Returns:
      l0 (mean active latents per row), fve (1 - sum||x - x_hat||^2 / sum||x - mean x||^2),
      mse (mean over rows of ||x - x_hat||^2, raw units), dead_fraction (latents that never
      fire on `acts`).
    """
    acts = np.asarray(acts, np.float32)
    if acts.ndim != 2:
        raise ValueError(f'acts must be [N, D], got {acts.shape}')

    mean = acts.mean(0, dtype=np.float64)
    total_var = float(np.sum((acts - mean) ** 2, dtype=np.float64))
    err, active, fired = 0.0, 0, np.zeros(params.threshold.shape[-1], bool)
    for i in range(0, acts.shape[0], batch_size):
        e, a, f = jax.device_get(_eval_chunk(params, jnp.asarray(acts[i:i + batch_size])))
        err, active, fired = err + float(e), active + int(a), fired | f
    n = acts.shape[0]
    return dict(l0=active / n, fve=1.0 - err / total_var, mse=err / n,
                dead_fraction=float(1.0 - fired.mean()))


def _token_ce(logits: jax.Array, input_ids: jax.Array, mask: jax.Array):
    """Summed next-token cross-entropy and count over pairs of real tokens."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)                      # [B, L-1, V]
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    pair = (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32)                 # [B, L-1]
    return jnp.sum(nll * pair), jnp.sum(pair)


def spliced_loss_increase(model, params: sae_math.SAEParams, layer: int, input_ids: np.ndarray,
                          attention_mask: np.ndarray, *, batch_size: int = 8
                          ) -> dict[str, float]:
    """Next-token loss increase when block `layer`'s output is replaced by the SAE's
    reconstruction (Gemma Scope's delta LM loss).

    Built from the Transformer's public pieces, in `__call__`'s order: `embed`,
    `run_blocks` up to and including `layer`, the splice, `run_blocks` for the rest, `head`.
    The BOS token (position 0 of each row) and padding keep their original residual, since
    the SAE never saw them in training.

    Args:
      model: a `mosaic_jax.models.Transformer`.
      params: SAE for the residual stream after block `layer`, raw activation space.
      layer: block index (0-based).
      input_ids: int[B, L]; attention_mask: [B, L] with 1 on real tokens.
      batch_size: rows per forward pass (the [rows, L, V] logits dominate memory).
    Returns:
      clean_loss, spliced_loss (mean nats per predicted real token), loss_increase
      (spliced - clean) and tokens (number of predicted tokens).
    """
    num_layers = model.config.num_layers
    if not 0 <= layer < num_layers:
        raise ValueError(f'layer {layer} out of range: the model has blocks 0..{num_layers - 1}')
    graphdef, model_state = nnx.split(model)

    @jax.jit
    def losses(model_state, sae_params, ids, mask):
        m = nnx.merge(graphdef, model_state)
        info = m.attention_info(mask)
        x = m.run_blocks(m.embed(ids), info, 0, layer + 1)            # [B, L, D]
        x32 = x.astype(jnp.float32)
        recon = sae_math.decode(sae_params, sae_math.encode(sae_params, x32))
        keep = (mask.astype(bool) & (info.positions > 0))[..., None]
        spliced = jnp.where(keep, recon, x32).astype(x.dtype)

        def rest(h):
            logits = m.head(m.run_blocks(h, info, layer + 1, num_layers))
            return _token_ce(logits, ids, mask)
        clean, n = rest(x)
        dirty, _ = rest(spliced)
        return clean, dirty, n

    input_ids = np.asarray(input_ids)
    attention_mask = np.asarray(attention_mask)
    clean = dirty = count = 0.0
    for i in range(0, input_ids.shape[0], batch_size):
        c, d, n = jax.device_get(losses(model_state, params,
                                        jnp.asarray(input_ids[i:i + batch_size]),
                                        jnp.asarray(attention_mask[i:i + batch_size])))
        clean, dirty, count = clean + float(c), dirty + float(d), count + float(n)
    if count == 0:
        raise ValueError('no pair of consecutive real tokens to score')
    return dict(clean_loss=clean / count, spliced_loss=dirty / count,
                loss_increase=(dirty - clean) / count, tokens=int(count))
