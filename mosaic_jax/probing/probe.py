"""Logistic-regression probe in optax, with scikit-learn's objective and parameterisation.

Binary problems use ONE sigmoid logit (C' = 1) and multiclass a softmax over C' = C logits,
exactly like `sklearn.linear_model.LogisticRegression`, so coefficients compare one to one.
Solvers: full-batch L-BFGS (`optax.lbfgs`, zoom line search, one `lax.while_loop`) and
minibatch AdamW with a validation split and early stopping. A grid of C values is fitted in
one compiled call with `jax.vmap` (`fit_grid`).

Objective (sklearn's): `J(w, b) = sum_i s_i xent_i + ||w||^2 / (2 C)`, bias unpenalised, with
s_i = sample_weight_i * class_weight[y_i]. Scalings of J have the same optimum:
  * full batch (L-BFGS) minimises `J / sum_i s_i`, which is what sklearn's lbfgs minimises
    (so `tol` means the same thing: the largest |gradient| entry);
  * a minibatch of B training rows (filler rows excluded) from a training set of n rows uses
    `sum_b s_b xent_b / B + ||w||^2 / (2 C n)`, an unbiased estimate of `J / n`
    (`batch_loss`; `make_train_step` is the one optimiser step on it, shared by the fused
    and the cached minibatch trainers). Class weights stay in the numerator.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu


SOLVERS = ('lbfgs', 'adam')


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


# ----------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------

def _prepare(x, y, num_classes, sample_weight, class_weight, standardize):
    """Validated float32 arrays: x [N, F], y int32[N], s f32[N], mean f32[F], scale f32[F]."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f'need x [N, F] and y [N], got shapes {x.shape} and {y.shape}')
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f'labels must be integers 0..C-1, got dtype {y.dtype}')
    if not np.all(np.isfinite(x)):
        raise ValueError(f'features contain {(~np.isfinite(x)).sum()} non-finite values')
    c = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f'labels must lie in 0..{c - 1}, got {y.min()}..{y.max()}')
    if len(np.unique(y)) < 2:
        raise ValueError(f'need at least 2 classes in y, got {np.unique(y).tolist()}')
    s = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if s.shape != y.shape or np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError(f'sample_weight must be finite, >= 0 and shaped {y.shape}')
    if class_weight is not None:
        if isinstance(class_weight, str):
            if class_weight != 'balanced':
                raise ValueError(f"class_weight={class_weight!r}; valid: None, 'balanced', "
                                 f'a dict or an array of {c} weights')
            cw = class_weights(y, c, sample_weight)
        elif isinstance(class_weight, dict):
            cw = np.array([class_weight.get(k, 1.0) for k in range(c)])
        else:
            cw = np.asarray(class_weight, np.float64)
            if cw.shape != (c,):
                raise ValueError(f'class_weight array must have shape ({c},), got {cw.shape}')
        s = s * cw[y]
    if standardize:
        mean = x.mean(0, dtype=np.float64)
        std = x.std(0, dtype=np.float64)
        scale = np.where(std > 0, std, 1.0)  # constant features: leave them unscaled
    else:
        mean, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
    return (x, y.astype(np.int32), s.astype(np.float32), mean.astype(np.float32),
            scale.astype(np.float32), c)


def _lbfgs_solve(x, y, s, mean, scale, C, max_iter, tol, *, n_out, memory_size, l2_stop):
    """Full-batch L-BFGS on J / sum(s) from zero. Returns (params, value, |grad|, iters).

    |grad| is the largest entry (sklearn's pgtol test) or, with `l2_stop`, the Euclidean
    norm (used by the reduced problem: it equals the norm of the original-space gradient,
    which bounds that gradient's largest entry, so the test is at least as strict)."""
    total = jnp.sum(s)
    zeros = init_params(x.shape[1], 2 if n_out == 1 else n_out)
    theta0 = {'w': zeros.w, 'b': zeros.b}

    def value_fn(theta):
        p = ProbeParams(theta['w'], theta['b'], mean, scale)
        return (jnp.sum(s * per_example_loss(p, x, y)) + l2_penalty(p, C)) / total

    opt = optax.lbfgs(memory_size=memory_size,
                      linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=30))
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    def grad_max(state):  # sklearn's (scipy's) pgtol criterion: largest |gradient| entry
        g = otu.tree_get(state, 'grad')
        return otu.tree_norm(g) if l2_stop else otu.tree_max(jax.tree.map(jnp.abs, g))

    def body(carry):
        theta, state = carry
        value, grad = value_and_grad(theta, state=state)
        updates, state = opt.update(grad, state, theta, value=value, grad=grad,
                                    value_fn=value_fn)
        return optax.apply_updates(theta, updates), state

    def cond(carry):
        _, state = carry
        count = otu.tree_get(state, 'count')
        value = otu.tree_get(state, 'value')
        going = (count < max_iter) & (grad_max(state) > tol) & jnp.isfinite(value)
        return (count == 0) | going

    theta, state = jax.lax.while_loop(cond, body, (theta0, opt.init(theta0)))
    params = ProbeParams(theta['w'], theta['b'], mean, scale)
    return (params, otu.tree_get(state, 'value'), grad_max(state),
            otu.tree_get(state, 'count'))


@functools.partial(jax.jit, static_argnames=('n_out', 'memory_size', 'l2_stop'))
def _lbfgs(x, y, s, mean, scale, C, max_iter, tol, *, n_out, memory_size, l2_stop=False):
    return _lbfgs_solve(x, y, s, mean, scale, C, max_iter, tol, n_out=n_out,
                        memory_size=memory_size, l2_stop=l2_stop)


def _holdout(y: np.ndarray, fraction: float, rng: np.random.Generator):
    """Stratified (train, val) row indices: about `fraction` of every class goes to val
    (at least one row of each class with >= 2 rows)."""
    val = []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        k = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
        val.extend(rows[:k])
    val = np.sort(np.asarray(val, np.int64))
    return np.setdiff1d(np.arange(len(y)), val), val


@functools.partial(jax.jit, static_argnames=('tx',))
def _adam_epoch(params, opt_state, x, y, s, batches, Cs, *, tx):
    """One epoch of AdamW over `batches` int[nb, B] for every C at once ([G] leading)."""
    n_train = x.shape[0]  # the L2 term is scaled by the whole training split

    def one(params, opt_state, C):
        def body(carry, rows):
            p, o = carry
            loss, grads = loss_and_grad(p, x[rows], y[rows], s[rows], C=C, n_train=n_train)
            p, o = apply_update(tx, p, o, grads)
            return (p, o), loss
        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), batches)
        return params, opt_state, jnp.mean(losses)

    return jax.vmap(one)(params, opt_state, Cs)


@jax.jit
def _weighted_xent(params, x, y, s):
    """Validation loss per grid entry: sum(s * xent) / sum(s), f32[G]."""
    per = jax.vmap(per_example_loss, in_axes=(0, None, None))(params, x, y)  # [G, N]
    return per @ s / jnp.maximum(jnp.sum(s), 1e-12)


def _fit_adam(x, y, s, mean, scale, Cs, n_out, *, max_epochs, batch_size, lr, weight_decay,
              patience, val_fraction, seed):
    """Minibatch AdamW for every C in `Cs` at once; keeps each C's best-val-loss params.

    Returns:
      (params with a leading [G] axis, epochs run).
    """
    rng = np.random.default_rng(seed)
    tr, va = _holdout(y, val_fraction, rng)
    x_tr, y_tr, s_tr = jnp.asarray(x[tr]), jnp.asarray(y[tr]), jnp.asarray(s[tr])
    x_va, y_va, s_va = jnp.asarray(x[va]), jnp.asarray(y[va]), jnp.asarray(s[va])
    g, n = len(Cs), len(tr)
    bs = min(batch_size, n)
    nb = -(-n // bs)
    tx = adamw(lr, weight_decay)
    one = init_params(x.shape[1], 2 if n_out == 1 else n_out, mean=mean, scale=scale)
    params = jax.tree.map(lambda a: jnp.broadcast_to(a, (g,) + a.shape), one)
    opt_state = jax.vmap(tx.init)(params)
    Cs = jnp.asarray(Cs, jnp.float32)
    best, best_loss = params, np.full(g, np.inf)
    wait = np.zeros(g, np.int64)
    epochs = 0
    for epochs in range(1, max_epochs + 1):
        perm = rng.permutation(n)
        # Wrap the permutation so every batch is full: a few rows are seen twice an epoch.
        batches = np.concatenate([perm, perm[:nb * bs - n]]).reshape(nb, bs)
        params, opt_state, train_loss = _adam_epoch(params, opt_state, x_tr, y_tr, s_tr,
                                                    jnp.asarray(batches), Cs, tx=tx)
        check_finite(train_loss, f'adam probe loss for C={np.asarray(Cs).tolist()}')
        val_loss = np.asarray(_weighted_xent(params, x_va, y_va, s_va))
        better = val_loss < best_loss
        best = jax.tree.map(lambda new, old: jnp.where(
            better.reshape((g,) + (1,) * (new.ndim - 1)), new, old), params, best)
        best_loss = np.where(better, val_loss, best_loss)
        wait = np.where(better, 0, wait + 1)
        if np.all(wait >= patience):
            break
    return best, epochs


ROW_BUCKET = 64  # reduced problems pad rows to a multiple of this: fewer distinct shapes


@jax.jit
def _gram(xs):
    """K = Xs Xs^T of the standardised rows f32[n, F] -> f32[n, n] (the F-sized product)."""
    return jnp.dot(xs, xs.T, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _lift(xs, alpha):
    """w = Xs^T alpha: reduced coefficients back to the F features, f32[F, C']."""
    return jnp.dot(xs.T, alpha, precision=jax.lax.Precision.HIGHEST)


def _lbfgs_each(data, cs, *, grid, max_iter, tol, **kw):
    """`_lbfgs` once per C (stacked on a leading [G] axis when `grid`), not vmapped: under
    vmap the while loop and its nested line search run every C for as many steps as the
    slowest one needs (4 Cs x 500 iterations on 448 x 448: 2.7 s vmapped, 4 x 0.28 s one
    by one). Each C's optimum is the one it would have alone."""
    data = tuple(jnp.asarray(a) for a in data)  # on the device once for every C
    sols = [_lbfgs(*data, jnp.float32(c), jnp.int32(max_iter), jnp.float32(tol), **kw)
            for c in (cs if grid else cs[:1])]
    return jax.tree.map(lambda *a: jnp.stack(a), *sols) if grid else sols[0]


def _fit_reduced(x, y, s, mean, scale, cs, n_out, *, grid, max_iter, tol, memory_size):
    """The same objective solved in n dimensions when n rows < F features.

    With Xs = U S V^T (thin SVD, from the Gram K = Xs Xs^T = U S^2 U^T), every optimum has
    w = V w' (a component orthogonal to the rows only adds penalty), logits Xs w = (U S) w'
    and ||w|| = ||w'||: the problem on the n x r matrix Phi = U S is the original one,
    equally conditioned, at n/F of the cost per iteration. Directions with S^2 below
    n * eps * max(S^2) are dropped (they carry no signal at float32). Rows are padded with
    zero-weight rows and Phi's columns to a multiple of ROW_BUCKET, so variants, widths and
    Cs of similar row counts share one executable. w = Xs^T (U S^-1 w').
    """
    n = len(x)
    xs = jnp.asarray((x - mean) / scale)  # standardised once, on the device for both products
    k = np.asarray(_gram(xs), np.float64)
    lam, u = np.linalg.eigh((k + k.T) / 2)
    keep = lam > n * np.finfo(np.float32).eps * max(lam.max(), 1e-30)
    u, root = u[:, keep], np.sqrt(lam[keep])
    m = -(-n // ROW_BUCKET) * ROW_BUCKET
    phi = np.zeros((m, m), np.float32)
    phi[:n, :len(root)] = u * root
    pad = lambda a: np.concatenate([a, np.zeros(m - n, a.dtype)])  # noqa: E731
    red, value, gnorm, iters = _lbfgs_each(
        (phi, pad(y), pad(s), np.zeros(m, np.float32), np.ones(m, np.float32)), cs,
        grid=grid, max_iter=max_iter, tol=tol, n_out=n_out, memory_size=memory_size,
        l2_stop=True)
    wr = np.asarray(red.w, np.float64)[..., :len(root), :]           # [(G,) r, C']
    alpha = np.einsum('nr,...rc->...nc', u / root, wr).astype(np.float32)
    w = (jax.vmap(_lift, in_axes=(None, 0)) if grid else _lift)(xs, alpha)
    mean_j, scale_j = jnp.asarray(mean), jnp.asarray(scale)
    if grid:
        g = len(cs)
        mean_j, scale_j = (jnp.broadcast_to(a, (g,) + a.shape) for a in (mean_j, scale_j))
    params = ProbeParams(w=w, b=red.b, mean=mean_j, scale=scale_j)
    return params, {'loss': value, 'grad_max': gnorm, 'iterations': iters}


def _fit(x, y, Cs, *, grid, num_classes, sample_weight, class_weight, standardize, solver,
         max_iter, tol, seed, memory_size, batch_size, lr, weight_decay, patience,
         val_fraction, return_info):
    if solver not in SOLVERS:
        raise ValueError(f'unknown solver {solver!r}; valid: {SOLVERS}')
    cs = np.atleast_1d(np.asarray(Cs, np.float64))
    if cs.ndim != 1 or cs.size == 0 or not np.all((cs > 0) & np.isfinite(cs)):
        raise ValueError(f'C must be positive and finite, got {np.asarray(Cs).tolist()}')
    x, y, s, mean, scale, c = _prepare(x, y, num_classes, sample_weight, class_weight,
                                       standardize)
    n_out = num_outputs(c)
    if solver == 'adam':
        params, epochs = _fit_adam(
            x, y, s, mean, scale, cs, n_out, max_epochs=max_iter, batch_size=batch_size,
            lr=lr, weight_decay=weight_decay, patience=patience, val_fraction=val_fraction,
            seed=seed)
        value = _weighted_xent(params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(s))
        info = {'loss': value, 'epochs': epochs}
        if not grid:
            params, info = take(params, 0), {'loss': value[0], 'epochs': epochs}
    elif len(x) < x.shape[1]:  # more features than rows: the exact n-dimensional problem
        params, info = _fit_reduced(x, y, s, mean, scale, cs, n_out, grid=grid,
                                    max_iter=max_iter, tol=tol, memory_size=memory_size)
    else:
        params, value, gmax, iters = _lbfgs_each(
            (x, y, s, mean, scale), cs, grid=grid, max_iter=max_iter, tol=tol, n_out=n_out,
            memory_size=memory_size)
        info = {'loss': value, 'grad_max': gmax, 'iterations': iters}
    info = {k: np.asarray(v) for k, v in info.items()}
    check_finite(info['loss'], f'probe loss for C={cs.tolist()}')
    return (params, info) if return_info else params


def fit(x, y, *, num_classes: int | None = None, C: float = 1.0, sample_weight=None,
        class_weight=None, standardize: bool = False, solver: str = 'lbfgs',
        max_iter: int = 500, tol: float = 1e-4, seed: int = 0, memory_size: int = 10,
        batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-5,
        patience: int = 5, val_fraction: float = 0.1, return_info: bool = False):
    """Fits one logistic probe.

    Args:
      x: f32[N, F] features; y: int[N] labels in 0..num_classes-1 (default max(y) + 1).
      C: inverse L2 strength, as in sklearn. sample_weight: optional f32[N].
      class_weight: None, 'balanced' (n / (n_classes * bincount(y)), weighted by
        sample_weight when given, as sklearn), a dict {class: weight} or f32[C].
      standardize: centre and scale features with the training mean / std first.
      solver: 'lbfgs' (full batch; max_iter iterations, stop when max |grad| <= tol) or
        'adam' (AdamW minibatches of `batch_size`, up to max_iter epochs, early stopping
        after `patience` epochs without a better loss on a stratified `val_fraction`).
      return_info: also return an info dict: 'loss' (the objective J / sum(s) for lbfgs,
        the s-weighted mean cross-entropy over all of x for adam) and 'grad_max', 'iterations' (lbfgs)
        or 'epochs' (adam).
    Returns:
      ProbeParams (w f32[F, C'], b f32[C'], mean f32[F], scale f32[F]).
    Raises:
      ValueError on bad inputs; FloatingPointError if the loss is not finite.
    """
    return _fit(x, y, C, grid=False, num_classes=num_classes, sample_weight=sample_weight,
                class_weight=class_weight, standardize=standardize, solver=solver,
                max_iter=max_iter, tol=tol, seed=seed, memory_size=memory_size,
                batch_size=batch_size, lr=lr, weight_decay=weight_decay, patience=patience,
                val_fraction=val_fraction, return_info=return_info)


def fit_grid(x, y, Cs: Sequence[float], *, num_classes: int | None = None,
             sample_weight=None, class_weight=None, standardize: bool = False,
             solver: str = 'lbfgs', max_iter: int = 500, tol: float = 1e-4, seed: int = 0,
             memory_size: int = 10, batch_size: int = 64, lr: float = 1e-3,
             weight_decay: float = 1e-5, patience: int = 5, val_fraction: float = 0.1,
             return_info: bool = False):
    """Fits one probe per C in ONE compiled call (`jax.vmap` over C); same arguments as
    `fit`. Returns ProbeParams with a leading axis [G = len(Cs)] (see `take`)."""
    return _fit(x, y, Cs, grid=True, num_classes=num_classes, sample_weight=sample_weight,
                class_weight=class_weight, standardize=standardize, solver=solver,
                max_iter=max_iter, tol=tol, seed=seed, memory_size=memory_size,
                batch_size=batch_size, lr=lr, weight_decay=weight_decay, patience=patience,
                val_fraction=val_fraction, return_info=return_info)
