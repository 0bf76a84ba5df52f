"""Fitting the logistic-regression probe (math: `logistic`), with scikit-learn's objective.

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

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import scipy.linalg


from mosaic_jax.probing.logistic import (
    ProbeParams, adamw, apply_update, batch_loss, check_finite, class_weights, init_params,
    l2_penalty, logits, loss_and_grad, make_train_step, num_outputs, per_example_loss,
    predict, predict_proba, raw_coef, take)

# The probe's math lives in `logistic`; `probe.<name>` keeps serving all of it.
__all__ = ['ProbeParams', 'RowBasis', 'SOLVERS', 'adamw', 'apply_update', 'batch_loss',
           'check_finite', 'class_weights', 'fit', 'fit_grid', 'init_params', 'l2_penalty',
           'logits', 'loss_and_grad', 'make_train_step', 'num_outputs', 'per_example_loss',
           'predict', 'predict_proba', 'raw_coef', 'take']

SOLVERS = ('lbfgs', 'adam')


# ----------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------

def _targets(y, n, num_classes, sample_weight, class_weight):
    """Validated labels int32[n], per-row weights f32[n] (sample x class weight), classes."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f'need x [N, F] and y [N], got {n} rows and y of shape {y.shape}')
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f'labels must be integers 0..C-1, got dtype {y.dtype}')
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
    return y.astype(np.int32), s.astype(np.float32), c


def _features(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f'need x [N, F], got shape {x.shape}')
    if not np.all(np.isfinite(x)):
        raise ValueError(f'features contain {(~np.isfinite(x)).sum()} non-finite values')
    return x


def _prepare(x, y, num_classes, sample_weight, class_weight, standardize):
    """Validated float32 arrays: x [N, F], y int32[N], s f32[N], mean f32[F], scale f32[F]."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or np.ndim(y) != 1 or len(x) != len(y):
        raise ValueError(f'need x [N, F] and y [N], got shapes {x.shape} and {np.shape(y)}')
    y, s, c = _targets(y, len(x), num_classes, sample_weight, class_weight)
    x = _features(x)
    if standardize:
        mean = x.mean(0, dtype=np.float64)
        std = x.std(0, dtype=np.float64)
        scale = np.where(std > 0, std, 1.0)  # constant features: leave them unscaled
    else:
        mean, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
    return x, y, s, mean.astype(np.float32), scale.astype(np.float32), c


def _lbfgs_solve(x, y, s, mean, scale, C, max_iter, tol, theta0, precond, *, n_out,
                 memory_size, l2_stop):
    """Full-batch L-BFGS on J / sum(s) from theta0 = {'w', 'b'}. Returns (params, value,
    |grad|, iters).

    precond f[F] > 0: L-BFGS runs on v = sqrt(precond) * w (row-wise), the same objective
    in rescaled coordinates; with precond ~ the objective's curvature along each feature
    its steps see a far better conditioned problem. Ones for none. The stopping test is
    always on the gradient with respect to w itself.
    |grad| is the largest entry (sklearn's pgtol test) or, with `l2_stop`, the Euclidean
    norm (used by the reduced problem: it equals the norm of the original-space gradient,
    which bounds that gradient's largest entry, so the test is at least as strict)."""
    total = jnp.sum(s)
    root = jnp.sqrt(precond)[:, None]

    def value_fn(theta):  # theta['w'] is v: the probe's w is v / root
        p = ProbeParams(theta['w'] / root, theta['b'], mean, scale)
        return (jnp.sum(s * per_example_loss(p, x, y)) + l2_penalty(p, C)) / total

    opt = optax.lbfgs(memory_size=memory_size,
                      linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=30))
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    def grad_max(state):  # sklearn's (scipy's) pgtol criterion: largest |gradient| entry
        g = otu.tree_get(state, 'grad')
        g = {'w': g['w'] * root, 'b': g['b']}  # d/dw = root * d/dv
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

    v0 = {'w': theta0['w'] * root, 'b': theta0['b']}
    theta, state = jax.lax.while_loop(cond, body, (v0, opt.init(v0)))
    params = ProbeParams(theta['w'] / root, theta['b'], mean, scale)
    return (params, otu.tree_get(state, 'value'), grad_max(state),
            otu.tree_get(state, 'count'))


@functools.partial(jax.jit, static_argnames=('n_out', 'memory_size', 'l2_stop'))
def _lbfgs(x, y, s, mean, scale, C, max_iter, tol, theta0, precond, *, n_out, memory_size,
           l2_stop=False):
    return _lbfgs_solve(x, y, s, mean, scale, C, max_iter, tol, theta0, precond, n_out=n_out,
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


ROW_BUCKET = 64  # reduced problems pad rows and columns to multiples of this: fewer shapes


BLOCK_BYTES = 64 * 2**20  # column block of `_Rows` (float32 bytes)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Xs = (x[rows] - mean) / scale, read a block of columns at a time: its two F-sized
    products (the Gram and the lift) without an [n, F] copy of a wide matrix (a 65k SAE's
    features over 5,000 texts are 1.3 GB). rows None: every row; mean None: x as it is."""
    x: np.ndarray
    rows: np.ndarray | None = None
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    def blocks(self):
        """(start, stop, f32[n, stop - start]) over the columns."""
        n = len(self.x) if self.rows is None else len(self.rows)
        width = self.x.shape[1]
        step = max(256, BLOCK_BYTES // (4 * max(n, 1)))
        for a in range(0, width, step):
            b = min(a + step, width)
            xb = self.x[:, a:b] if self.rows is None else self.x[self.rows, a:b]
            xb = np.asarray(xb, np.float32)
            if self.mean is not None:
                xb = (xb - self.mean[a:b]) / self.scale[a:b]
            yield a, b, xb

    def gram(self) -> np.ndarray:
        """K = Xs Xs^T f64[n, n] (float32 products of each block, summed in float64);
        checks every value is finite on the way."""
        k = None
        for _, _, xb in self.blocks():
            if not np.isfinite(xb).all():
                raise ValueError(f'features contain {(~np.isfinite(xb)).sum()} non-finite '
                                 f'values (in one block of columns)')
            part = (xb @ xb.T).astype(np.float64)
            k = part if k is None else k + part
        return k

    def lift(self, alpha: np.ndarray) -> np.ndarray:
        """w = Xs^T alpha for alpha f32[(G,) n, C'] -> f32[(G,) F, C']."""
        out = np.zeros(alpha.shape[:-2] + (self.x.shape[1], alpha.shape[-1]), np.float32)
        for a, b, xb in self.blocks():
            out[..., a:b, :] = xb.T @ alpha
        return out


def _lbfgs_each(data, cs, *, grid, max_iter, tol, n_out, curvature=None, **kw):
    """`_lbfgs` once per C (stacked on a leading [G] axis when `grid`), not vmapped: under
    vmap the while loop and its nested line search run every C for as many steps as the
    slowest one needs (4 Cs x 500 iterations on 448 x 448: 2.7 s vmapped, 4 x 0.28 s one
    by one). Warm starts along the path: the Cs are solved from strong to weak
    regularisation, each from the previous C's optimum (the first from zero), so each
    reaches its own optimum (the test on the gradient is the same) in fewer steps.

    curvature: optional f[F], the data term's curvature bound per feature; each C is then
    preconditioned by curvature + its penalty's curvature 1 / (C sum(s)).
    """
    data = tuple(jnp.asarray(a) for a in data)  # on the device once for every C
    dt = data[0].dtype
    total = float(np.sum(np.asarray(data[2], np.float64)))
    theta = {'w': jnp.zeros((data[0].shape[1], n_out), dt), 'b': jnp.zeros((n_out,), dt)}
    order = np.argsort(cs, kind='stable') if grid else [0]
    sols = {}
    for i in order:
        pre = (np.ones(data[0].shape[1]) if curvature is None
               else np.asarray(curvature, np.float64) + 1.0 / (float(cs[i]) * total))
        sols[i] = _lbfgs(*data, jnp.asarray(cs[i], dt), jnp.int32(max_iter),
                         jnp.asarray(tol, dt), theta, jnp.asarray(pre, dt), n_out=n_out, **kw)
        theta = {'w': sols[i][0].w, 'b': sols[i][0].b}
    if not grid:
        return sols[0]
    return jax.tree.map(lambda *a: jnp.stack(a), *(sols[i] for i in range(len(cs))))


@dataclasses.dataclass(frozen=True)
class _Factor:
    """Xs = phi V^T for the rows' Gram K = Xs Xs^T: phi f64[n, r] with phi phi^T = K and V
    (F x r) orthonormal, V = Xs^T B; coefficients w' of phi lift to w = Xs^T (B w').

    Two factorisations (`_factor`): pivoted Cholesky, P^T K P = L L^T, phi = P L[:, :r],
    B = P [L11^-T; 0] (one triangular solve per lift); or the eigendecomposition K = U S^2
    U^T, phi = U S, B = U S^-1 = phi / S^2, whose columns are orthogonal, so col_sq (the
    squared column norms) is the exact curvature scale of each coordinate.
    """
    phi: np.ndarray
    col_sq: np.ndarray          # f64[r]: squared column norms of phi
    pivots: np.ndarray | None   # int[r] (Cholesky): the rows B draws on
    l11: np.ndarray | None      # f64[r, r] (Cholesky) lower triangular

    def alpha(self, wr: np.ndarray) -> np.ndarray:
        """B w' for w' f64[(G,) r, C'] -> f64[(G,) n, C']."""
        if self.pivots is None:  # zero columns (an all-zero matrix) lift to nothing
            inv = np.divide(self.phi, self.col_sq, out=np.zeros_like(self.phi),
                            where=self.col_sq > 0)
            return np.einsum('nr,...rc->...nc', inv, wr)
        r = len(self.pivots)
        flat = np.moveaxis(wr, -2, 0).reshape(r, -1)
        top = scipy.linalg.solve_triangular(self.l11, flat, trans='T', lower=True)
        out = np.zeros((len(self.phi), flat.shape[1]))
        out[self.pivots] = top
        return np.moveaxis(out.reshape((len(self.phi),) + wr.shape[:-2] + wr.shape[-1:]),
                           0, -2)


def _factor(k: np.ndarray, *, eigen: bool = False) -> _Factor:
    """Factors the rows' Gram K f64[n, n], dropping directions below 10 float32 epsilons of
    its largest diagonal / eigenvalue (the rounding level of a float32 Gram), so duplicate or
    dependent rows never fail. Pivoted Cholesky (LAPACK dpstrf, n^3/3 flops) by default;
    `eigen` costs ~5x more and gives orthogonal columns (a better preconditioner)."""
    k = (k + k.T) / 2
    top = float(np.max(np.diag(k)))
    if not top > 0:  # every row is zero: one zero column, nothing to learn from
        return _Factor(phi=np.zeros((len(k), 1)), col_sq=np.zeros(1), pivots=None, l11=None)
    if eigen:
        lam, u = np.linalg.eigh(k)
        keep = lam > 10 * float(np.finfo(np.float32).eps) * float(lam.max())
        phi = u[:, keep] * np.sqrt(lam[keep])
        return _Factor(phi=phi, col_sq=lam[keep], pivots=None, l11=None)
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(
        k, tol=10 * float(np.finfo(np.float32).eps) * top, lower=1)
    if info < 0:
        raise ValueError(f'dpstrf: argument {-info} is invalid')
    rank = max(int(rank), 1)
    low = np.tril(c)[:, :rank]
    phi = np.empty((len(k), rank))
    phi[piv - 1] = low
    return _Factor(phi=phi, col_sq=(low ** 2).sum(0), pivots=piv[:rank] - 1,
                   l11=low[:rank])


def _solve_reduced(xs, fac: _Factor, rows, y, s, mean, scale, cs, n_out, *, grid, max_iter,
                   tol, memory_size):
    """L-BFGS on the reduced features phi[rows] f64[n, r], lifted back: w = Xs^T alpha(w')
    (xs: the `_Rows` the factor was built from).

    Rows are padded with zero-weight rows and columns with zero columns to multiples of
    ROW_BUCKET, so variants, widths and Cs of similar sizes share one executable.
    Returns (ProbeParams, info) like `_fit`.
    """
    phi = fac.phi if rows is None else fac.phi[rows]
    n, r = phi.shape
    m, q = (-(-a // ROW_BUCKET) * ROW_BUCKET for a in (n, r))
    phi_p = np.zeros((m, q))
    phi_p[:n, :r] = phi
    pad = lambda a: np.concatenate([a, np.zeros(m - n, a.dtype)])  # noqa: E731
    # In float64, like sklearn: the reduced problem is small (n x r), and with large pooled
    # values (sums, counts in the hundreds) float32 gradients stall above tol (measured:
    # 500 iterations at |grad| 1.2e-3 in float32, 286 to 7e-5 in float64, same time).
    # Preconditioner: the logistic loss curves at most 1/4 per unit logit, so a quarter of
    # a column's mean square over the factored rows scales the data term's curvature along
    # it (padding columns: 1). It rescales coordinates only: the optimum and the stopping
    # test stay the same (real 4-class 800 x 4k problems: 1.5-2.8x fewer iterations, eigen basis).
    # Only for the eigenbasis, whose columns are orthogonal (on Cholesky's columns it gained
    # 1.25-1.5x and moved TF-IDF optima at tol 1e-4 further from sklearn's).
    sw = s.astype(np.float64)
    curv = None
    if fac.pivots is None:
        curv = np.ones(q)
        curv[:r] = 0.25 * fac.col_sq / len(fac.phi)
    with jax.enable_x64(True):
        red, value, gnorm, iters = _lbfgs_each(
            (phi_p, pad(y), pad(sw), np.zeros(q), np.ones(q)), cs,
            grid=grid, max_iter=max_iter, tol=tol, n_out=n_out, memory_size=memory_size,
            l2_stop=True, curvature=curv)
        red, value, gnorm, iters = jax.tree.map(np.asarray, (red, value, gnorm, iters))
    wr = red.w[..., :r, :]                                           # [(G,) r, C']
    alpha = fac.alpha(wr).astype(np.float32)
    w = jnp.asarray(xs.lift(alpha))
    mean_j, scale_j = jnp.asarray(mean), jnp.asarray(scale)
    if grid:
        g = len(cs)
        mean_j, scale_j = (jnp.broadcast_to(a, (g,) + a.shape) for a in (mean_j, scale_j))
    params = ProbeParams(w=w, b=jnp.asarray(red.b, jnp.float32), mean=mean_j, scale=scale_j)
    return params, {'loss': value, 'grad_max': gnorm, 'iterations': iters}


def _fit_reduced(x, y, s, mean, scale, cs, n_out, *, grid, max_iter, tol, memory_size):
    """The same objective solved in n dimensions when n rows < F features.

    With Xs = phi V^T (phi phi^T = K = Xs Xs^T, V orthonormal; `_factor`), every optimum
    has w = V w' (a component orthogonal to the rows only adds penalty), logits
    Xs w = phi w' and ||w|| = ||w'||: the problem on the n x r matrix phi is the original
    one, equally conditioned, at n/F of the cost per iteration.
    """
    plain = not np.any(mean) and np.all(scale == 1)
    # Standardised block by block for both products.
    xs = _Rows(x) if plain else _Rows(x, mean=mean, scale=scale)
    fac = _factor(xs.gram())
    return _solve_reduced(xs, fac, None, y, s, mean, scale, cs, n_out, grid=grid,
                          max_iter=max_iter, tol=tol, memory_size=memory_size)


EIGEN_MAX_ROWS = 2048  # RowBasis factors up to this many rows by eigendecomposition


class RowBasis:
    """One factorisation Xs = phi V^T of an unstandardised feature matrix's rows, shared by
    L-BFGS fits on any subset of them (the CV folds and the refit on their union).

    A fit on rows S has its optimum in span(X[S]), inside span(V): with w = V w' its logits
    are phi[S] w' and ||w|| = ||w'||, so the problem on phi[S] (|S| x r) is the original
    one. L-BFGS from zero takes the same steps as on S's own factorisation (its iterates
    are invariant under the orthogonal change of variables, and directions outside
    span(X[S]) get no gradient and stay zero). One Gram and one factorisation per matrix
    instead of one per fit.
    """

    def __init__(self, x, rows=None):
        """The basis of x[rows] (every row when None), read in place: x is never copied
        whole. Later fits index these rows by their position in `rows`."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f'need x [N, F], got shape {x.shape}')
        self.num_features = x.shape[1]
        self.xs = _Rows(x, None if rows is None else np.asarray(rows))
        k = self.xs.gram()
        # The eigenbasis costs ~5x a Cholesky but preconditions exactly; shared by K + 1
        # fits, it pays for itself up to a few thousand rows.
        self.factor = _factor(k, eigen=len(k) <= EIGEN_MAX_ROWS)
        self._zeros = np.zeros(self.num_features, np.float32)
        self._ones = np.ones(self.num_features, np.float32)

    def fit_grid(self, rows, y, Cs: Sequence[float], *, num_classes: int | None = None,
                 sample_weight=None, class_weight=None, max_iter: int = 500,
                 tol: float = 1e-4, memory_size: int = 10, return_info: bool = False):
        """`fit_grid(x[rows], y, Cs, ...)` with L-BFGS and no standardisation, from the
        basis (rows index the matrix the basis was built from)."""
        rows = np.asarray(rows)
        cs = _check_cs(Cs)
        y, s, c = _targets(y, len(rows), num_classes, sample_weight, class_weight)
        params, info = _solve_reduced(self.xs, self.factor, rows, y, s, self._zeros,
                                      self._ones, cs, num_outputs(c), grid=True,
                                      max_iter=max_iter, tol=tol, memory_size=memory_size)
        info = {k: np.asarray(v) for k, v in info.items()}
        check_finite(info['loss'], f'probe loss for C={cs.tolist()}')
        return (params, info) if return_info else params


def _check_cs(Cs) -> np.ndarray:
    cs = np.atleast_1d(np.asarray(Cs, np.float64))
    if cs.ndim != 1 or cs.size == 0 or not np.all((cs > 0) & np.isfinite(cs)):
        raise ValueError(f'C must be positive and finite, got {np.asarray(Cs).tolist()}')
    return cs


def _fit(x, y, Cs, *, grid, num_classes, sample_weight, class_weight, standardize, solver,
         max_iter, tol, seed, memory_size, batch_size, lr, weight_decay, patience,
         val_fraction, return_info):
    if solver not in SOLVERS:
        raise ValueError(f'unknown solver {solver!r}; valid: {SOLVERS}')
    cs = _check_cs(Cs)
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
