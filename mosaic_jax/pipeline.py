"""The compiled feature step, data parallelism (pmap / mesh / multi-host) and `run(config)`.

One jitted function takes a token batch through the model up to the deepest configured
layer, encodes every configured SAE, and pools / binarizes every configured variant:

  tokens [B, L] -> residuals [n_layers, B, L, D] -> SAE codes [B, L, F] -> pooled [B, F]

It runs data-parallel in one of three ways chosen by `config.parallel.mode`; all device
bookkeeping (replicate, split, gather) lives in this file and nowhere else:
  - 'pmap': `jax.pmap` over local devices, the batch split on a leading device axis;
  - 'mesh': `jax.jit` with `NamedSharding` on a 1-D ('data',) mesh, also multi-host;
  - 'single': plain `jax.jit` on the default device.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from typing import Any, Callable, Iterable

from absl import logging
import flax.nnx as nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from mosaic_jax import features
from mosaic_jax import probe
from mosaic_jax import sae as sae_lib

AXIS = 'data'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UserError(ValueError):
    """A bad config, file or missing weights: main.py prints it as one line."""


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------

def validate(config) -> None:
    """Checks field combinations once, before anything is loaded."""
    problems = []
    if config.mode not in ('classify', 'report'):
        problems.append(f"mode={config.mode!r} (valid: 'classify', 'report')")
    if config.model.dtype not in ('float32', 'bfloat16'):
        problems.append(f'model.dtype={config.model.dtype!r}: use float32 or bfloat16 '
                        '(float16 overflows on Gemma residual streams)')
    if config.model.matmul_precision not in ('default', 'high', 'highest'):
        problems.append(f'model.matmul_precision={config.model.matmul_precision!r} '
                        "(valid: 'default', 'high', 'highest')")
    if config.model.layer_convention not in ('gemma_scope', 'hf_hidden_states'):
        problems.append(f'model.layer_convention={config.model.layer_convention!r} '
                        "(valid: 'gemma_scope', 'hf_hidden_states')")
    if not config.layers:
        problems.append('layers is empty')
    if config.model.layer_convention == 'hf_hidden_states' and 0 in config.layers:
        problems.append('layers contains 0 with layer_convention=hf_hidden_states: '
                        'hidden_states[0] is the embedding output, not a block residual')
    for p in config.features.pooling:
        if p not in features.POOLINGS:
            problems.append(f'features.pooling has {p!r} (valid: {sorted(features.POOLINGS)})')
    if config.parallel.mode not in ('pmap', 'mesh', 'single'):
        problems.append(f"parallel.mode={config.parallel.mode!r} (valid: pmap, mesh, single)")
    if config.probe.train not in ('cached', 'fused'):
        problems.append(f"probe.train={config.probe.train!r} (valid: 'cached', 'fused')")
    if config.probe.train == 'fused':
        if config.probe.fused_variant not in config.features.pooling:
            problems.append(f'probe.fused_variant={config.probe.fused_variant!r} is not in '
                            f'features.pooling={tuple(config.features.pooling)}')
    if not config.probe.Cs or any(c <= 0 for c in config.probe.Cs):
        problems.append(f'probe.Cs={tuple(config.probe.Cs)} must be non-empty and positive')
    if config.mode == 'classify' and not config.model.path:
        problems.append('model.path is empty: pass --config.model.path=DIR (local weights), '
                        'a hub id, a .gguf file or gemma3_270m')
    if config.mode == 'classify' and not config.sae.source:
        problems.append('sae.source is empty: pass --config.sae.source=PATH_WITH_{layer}_{width}')
    fr = tuple(config.data.fractions)
    if len(fr) != 3 or abs(sum(fr) - 1) > 1e-6 or min(fr) <= 0:
        problems.append(f'data.fractions={fr} must be three positive numbers summing to 1')
    for ex in config.sae.exclude:
        if not re.fullmatch(r'\d+:\S+', ex):
            problems.append(f"sae.exclude entry {ex!r} is not 'layer:width'")
    if problems:
        raise UserError('invalid config: ' + '; '.join(problems))


# ----------------------------------------------------------------------------------------
# Devices: pmap / mesh / single, and multi-host set-up
# ----------------------------------------------------------------------------------------

_DISTRIBUTED_READY = False


def init_distributed(parallel) -> None:
    """Joins a multi-host job (jax.distributed) when the config asks for it; idempotent."""
    global _DISTRIBUTED_READY
    if not parallel.distributed or _DISTRIBUTED_READY:
        return
    if parallel.cpu_collectives:
        jax.config.update('jax_cpu_collectives_implementation', parallel.cpu_collectives)
    kwargs = {}
    if parallel.coordinator_address:  # TPU VMs find the coordinator themselves
        kwargs = dict(coordinator_address=parallel.coordinator_address,
                      num_processes=parallel.num_processes, process_id=parallel.process_id)
    jax.distributed.initialize(**kwargs)
    _DISTRIBUTED_READY = True
    logging.info('process %d of %d, local devices %s', jax.process_index(),
                 jax.process_count(), jax.local_devices())


@dataclasses.dataclass
class Devices:
    """Replicate / split / gather for one data-parallel mode (the only place that knows)."""
    mode: str

    def __post_init__(self):
        if self.mode == 'single':
            self.mesh = jax.make_mesh((1,), (AXIS,), devices=jax.local_devices()[:1])
        else:
            self.mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
        self.rows = NamedSharding(self.mesh, P(AXIS))
        self.repl = NamedSharding(self.mesh, P())

    @property
    def count(self) -> int:
        """Devices that share one global batch."""
        return self.mesh.devices.size

    @property
    def local_count(self) -> int:
        return len(self.mesh.local_devices)

    def replicate(self, tree):
        """Places parameters on every device once (all modes use a replicated sharding)."""
        return jax.device_put(tree, self.repl)

    def local_rows(self, global_rows: int) -> slice:
        """This process's slice of a global batch (each host feeds its own rows)."""
        per = global_rows // jax.process_count()
        return slice(jax.process_index() * per, (jax.process_index() + 1) * per)

    def split(self, *arrays: np.ndarray):
        """Global host batch [B, ...] -> what the compiled function takes.

        pmap: this host's rows reshaped to [local_devices, B_local / local_devices, ...].
        mesh/single: one global jax.Array sharded over rows.
        """
        out = []
        for a in arrays:
            a = np.asarray(a)
            local = a[self.local_rows(a.shape[0])]
            if self.mode == 'pmap':
                out.append(local.reshape(self.local_count, -1, *local.shape[1:]))
            elif jax.process_count() > 1:
                out.append(jax.make_array_from_process_local_data(self.rows, local))
            else:
                out.append(jax.device_put(local, self.rows))
        return out

    def gather(self, tree):
        """Compiled output -> numpy [B, ...] in global row order, on every host."""
        def one(x):
            if self.mode == 'pmap':
                x = np.asarray(x).reshape(-1, *x.shape[2:])  # this host's rows
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils
                    x = multihost_utils.process_allgather(x, tiled=True)
                return x
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                return np.asarray(multihost_utils.process_allgather(x, tiled=True))
            return np.asarray(x)
        return jax.tree.map(one, tree)

    def compile(self, fn: Callable, n_replicated: int, n_rows: int):
        """Compiles `fn(*replicated, *rows)` for this mode (outputs keep XLA's layout)."""
        if self.mode == 'pmap':
            return jax.pmap(fn, axis_name=AXIS, in_axes=(None,) * n_replicated + (0,) * n_rows)
        return jax.jit(fn, in_shardings=(self.repl,) * n_replicated + (self.rows,) * n_rows)

    def unreplicate(self, tree):
        """Replicated outputs (updated parameters, a loss): pmap's copy on device 0."""
        if self.mode == 'pmap':
            return jax.tree.map(lambda x: x[0], tree)
        return tree


# ----------------------------------------------------------------------------------------
# The compiled feature step
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Static description of what one compiled step computes."""
    layers: tuple[int, ...]                 # model block indices (after the convention)
    saes: tuple[tuple[str, int], ...]       # (sae key, position in `layers`)
    pooling: tuple[str, ...]
    binarize: tuple[bool, ...]
    top_n: int
    threshold: float
    chunk_size: int
    hidden: tuple[str, ...]                 # hidden-state baselines: 'last', 'mean'


def variant_key(sae_key: str, pool: str, binarized: bool) -> str:
    return f'{sae_key}/{pool}' + ('/bin' if binarized else '')


def compute_features(model, sae_params: dict, input_ids, attention_mask, feature_mask,
                     spec: FeatureSpec) -> dict[str, jax.Array]:
    """One batch: forward -> SAE encode -> pool -> binarize, as a pure function.

    Args:
      model: a Transformer (merged inside the compiled function).
      sae_params: sae key -> SAEParams.
      input_ids: int32[B, L]; attention_mask: bool[B, L] (padding False);
      feature_mask: bool[B, L], positions that count in pooling (padding and BOS
        excluded unless config.features.include_special).
    Returns:
      variant key -> [B, F] (float32, or uint8 for binarized) and 'hidden/<layer>/<pool>'
      -> float32[B, D] for the hidden-state baselines.
    """
    resid = model.residuals(input_ids, attention_mask, spec.layers)  # [n, B, L, D]
    out = {}
    for key, li in spec.saes:
        if not spec.chunk_size:
            acts = sae_lib.encode(sae_params[key], resid[li])              # [B, L, F]
        for pool in spec.pooling:
            if spec.chunk_size:
                # Wide SAEs: encode and pool block by block over the width, so [B, L, F]
                # never exists (one re-encode per pooling; memory over speed).
                pooled = sae_lib.encode_pooled(sae_params[key], resid[li], feature_mask, pool,
                                               top_n=spec.top_n, chunk_size=spec.chunk_size)
            else:
                pooled = features.pool(acts, feature_mask, pool, top_n=spec.top_n)  # [B, F]
            for b in spec.binarize:
                if b:
                    bits = features.binarize(pooled, spec.threshold)
                    out[variant_key(key, pool, True)] = bits.astype(jnp.uint8)
                else:
                    out[variant_key(key, pool, False)] = pooled
    for li, layer in enumerate(spec.layers):
        for pool in spec.hidden:
            # MOSAIC's hidden baseline reads the last real token (attention mask);
            # the mean baseline averages the same positions as the SAE poolings.
            mask = attention_mask if pool == 'last' else feature_mask
            out[f'hidden/{li}/{pool}'] = features.pool(resid[li], mask, pool)
    return out


class Extractor:
    """Streams token batches through the compiled feature step on all devices."""

    def __init__(self, model, sae_params: dict, spec: FeatureSpec, devices: Devices):
        self.spec, self.devices = spec, devices
        graphdef, state = nnx.split(model)

        def step(state, saes, ids, mask, fmask):
            return compute_features(nnx.merge(graphdef, state), saes, ids, mask, fmask, spec)

        self._step = devices.compile(step, n_replicated=2, n_rows=3)
        self._state = devices.replicate(state)
        self._saes = devices.replicate(sae_params)

    def __call__(self, input_ids, attention_mask, feature_mask) -> dict[str, np.ndarray]:
        args = self.devices.split(input_ids, attention_mask, feature_mask)
        return self.devices.gather(self._step(self._state, self._saes, *args))

    def lowered_text(self, input_ids, attention_mask, feature_mask) -> str:
        args = self.devices.split(input_ids, attention_mask, feature_mask)
        return self._step.lower(self._state, self._saes, *args).as_text()


def feature_mask(input_ids: np.ndarray, attention_mask: np.ndarray, bos_id: int | None,
                 include_special: bool) -> np.ndarray:
    """Positions that count in pooling: real tokens except BOS, or all (MOSAIC)."""
    if include_special:
        return np.ones_like(attention_mask, dtype=bool)
    m = attention_mask.astype(bool)
    if bos_id is not None:
        m = m & (input_ids != bos_id)
    return m


def extract(extractor: Extractor, batches: Iterable, n: int, *, bos_id, include_special,
            progress: bool = True) -> dict[str, np.ndarray]:
    """Pooled features of a whole dataset, batch by batch; never holds [N, T, F].

    Args:
      batches: data.Batch items (input_ids, attention_mask, index, valid).
      n: number of texts; every index in [0, n) must appear once among valid rows.
    Returns:
      key -> [N, F] arrays in dataset order.
    """
    from tqdm import tqdm

    store: dict[str, np.ndarray] = {}
    seen = np.zeros(n, bool)
    it = tqdm(batches, desc='extract', unit='batch', disable=not progress)
    for b in it:
        fmask = feature_mask(b.input_ids, b.attention_mask, bos_id, include_special)
        out = extractor(b.input_ids, b.attention_mask, fmask)
        valid = np.asarray(b.valid, bool)
        idx = np.asarray(b.index)[valid]
        for k, v in out.items():
            if k not in store:
                store[k] = np.zeros((n,) + v.shape[1:], v.dtype)
            store[k][idx] = v[valid]
        seen[idx] = True
    if not seen.all():
        raise RuntimeError(f'{(~seen).sum()} texts were never extracted')
    return store


# ----------------------------------------------------------------------------------------
# Fused training: forward -> SAE -> pool -> binarize -> probe loss/grad -> update
# ----------------------------------------------------------------------------------------

def probe_update(params, opt_state, x, labels, weights, tx: optax.GradientTransformation, *,
                 C: float, n_train: int, pmapped: bool):
    """One optax step of the probe on a batch of pooled features (shared by both modes).

    The objective is sklearn's `sum_i w_i xent_i + ||W||^2 / (2C)`, estimated on a batch
    as `n_train * sum_b(w xent) / sum_b(w) + ||W||^2 / (2C)` and divided by `n_train` for
    conditioning. Padded dummy rows have weight 0. Under pmap the weighted sums and their
    gradients are `psum`-ed outside the differentiated function, so the update equals
    the one-device update on the whole batch.

    Args:
      x: float32[B, F]; labels: int32[B]; weights: float32[B] (0 for padding rows).
    """
    def weighted_sum(p):
        return jnp.sum(probe.per_example_loss(p, x, labels) * weights)

    num, g_num = jax.value_and_grad(weighted_sum)(params)
    den = jnp.sum(weights)
    if pmapped:
        num, g_num, den = jax.lax.psum((num, g_num, den), AXIS)
    den = jnp.maximum(den, 1.0)
    reg, g_reg = jax.value_and_grad(lambda p: probe.l2_penalty(p, C) / n_train)(params)
    grads = jax.tree.map(lambda a, b: a / den + b, g_num, g_reg)
    with jax.named_scope('probe_update'):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state, num / den + reg


def make_fused_step(graphdef, spec: FeatureSpec, key: str, tx: optax.GradientTransformation,
                    *, C: float, n_train: int, pmapped: bool):
    """The design's single compiled step: forward -> SAE -> pool -> binarize -> probe
    loss/grad -> (psum over devices) -> optax update, streaming, nothing stored."""
    def step(state, saes, params, opt_state, ids, mask, fmask, labels, weights):
        with jax.named_scope('features'):
            feats = compute_features(nnx.merge(graphdef, state), saes, ids, mask, fmask, spec)
        x = feats[key].astype(jnp.float32)
        return probe_update(params, opt_state, x, labels, weights, tx, C=C, n_train=n_train,
                            pmapped=pmapped)
    return step


def batch_targets(b, labels: np.ndarray, class_weight: np.ndarray):
    """Rows, labels and weights of one data.Batch for the probe (filler rows: weight 0).

    Returns:
      idx int[B] (filler rows point at row 0), lab int32[B], w float32[B].
    """
    valid = np.asarray(b.valid, bool)
    idx = np.where(valid, np.asarray(b.index), 0)
    lab = np.where(valid, labels[idx], 0).astype(np.int32)
    w = np.where(valid, class_weight[lab], 0.0).astype(np.float32)
    return idx, lab, w


def train_cached_minibatch(x: np.ndarray, labels: np.ndarray, class_weight: np.ndarray,
                           batches_fn, *, epochs: int, lr: float, C: float, num_classes: int,
                           seed: int):
    """The cached twin of fused training: the same update on stored features, fed in the
    same batch order (data.Batch.index selects rows), for checking the two agree.

    Args:
      x: [N, F] pooled features; labels: int[N]; class_weight: float[C].
    Returns:
      probe parameters.
    """
    tx = optax.adam(lr)
    params = probe.init_params(x.shape[1], num_classes)
    opt_state = tx.init(params)
    step = jax.jit(functools.partial(probe_update, tx=tx, C=C, n_train=len(labels),
                                     pmapped=False))
    for _ in range(epochs):
        for b in batches_fn():
            idx, lab, w = batch_targets(b, labels, class_weight)
            params, opt_state, _ = step(params, opt_state, np.asarray(x[idx], np.float32),
                                        lab, w)
    return params


class FusedTrainer:
    """Trains one probe variant by streaming batches through the fused step."""

    def __init__(self, model, sae_params, spec: FeatureSpec, key: str, devices: Devices, *,
                 C: float, lr: float, n_train: int, num_classes: int, seed: int):
        self.devices = devices
        graphdef, state = nnx.split(model)
        self.tx = optax.adam(lr)
        width = int(sae_params['/'.join(key.split('/')[:2])].w_enc.shape[1])
        self.params = probe.init_params(width, num_classes)
        self.opt_state = self.tx.init(self.params)
        fn = make_fused_step(graphdef, spec, key, self.tx, C=C, n_train=n_train,
                             pmapped=devices.mode == 'pmap')
        self._step = devices.compile(fn, n_replicated=4, n_rows=5)
        self._state = devices.replicate(state)
        self._saes = devices.replicate(sae_params)

    def _args(self, b, fmask, labels, weights):
        params, opt_state = self.devices.replicate((self.params, self.opt_state))
        rows = self.devices.split(b.input_ids, b.attention_mask, fmask, labels, weights)
        return (self._state, self._saes, params, opt_state, *rows)

    def step(self, b, fmask, labels, weights) -> float:
        out = self.devices.unreplicate(self._step(*self._args(b, fmask, labels, weights)))
        self.params, self.opt_state, loss = out
        loss = float(loss)
        if not np.isfinite(loss):
            raise FloatingPointError(f'non-finite fused probe loss {loss}')
        return loss

    def lowered_text(self, b, fmask, labels, weights) -> str:
        return self._step.lower(*self._args(b, fmask, labels, weights)).as_text()


# ----------------------------------------------------------------------------------------
# Probes on cached features
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class ProbeResult:
    """One trained variant: chosen C, test metrics and what the results files need."""
    key: str
    C: float
    val: dict
    test: dict
    test_proba: np.ndarray
    params: Any
    seconds: float


def fit_variant(key: str, x: np.ndarray, y: np.ndarray, splits, pcfg, *, metric_names,
                num_classes: int, seed: int) -> ProbeResult:
    """Fits every C in one vmapped call, picks the best on validation, scores test."""
    from mosaic_jax import metrics

    tr, va, te = splits
    t0 = time.perf_counter()
    x = np.asarray(x, np.float32)
    grid = probe.fit_grid(x[tr], y[tr], tuple(pcfg.Cs), num_classes=num_classes,
                          class_weight=pcfg.class_weight or None,
                          standardize=pcfg.standardize, solver=pcfg.solver,
                          max_iter=pcfg.max_iter, seed=seed)
    best, best_score, best_val = 0, -np.inf, None
    for i in range(len(pcfg.Cs)):
        params = probe.take(grid, i)
        val = metrics.compute(y[va], np.asarray(probe.predict_proba(params, x[va])),
                              names=metric_names)
        if val[metric_names[0]] > best_score:  # ties keep the smaller C (stronger L2)
            best, best_score, best_val = i, val[metric_names[0]], val
    params = probe.take(grid, best)
    proba = np.asarray(probe.predict_proba(params, x[te]))
    test = metrics.compute(y[te], proba, names=metric_names)
    return ProbeResult(key, float(pcfg.Cs[best]), best_val, test, proba,
                       jax.device_get(params), time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------
# The experiment: config -> results files, summary table and report
# ----------------------------------------------------------------------------------------

def model_layers(config) -> tuple[int, ...]:
    """Config layers -> model block indices (see config.model.layer_convention)."""
    shift = 1 if config.model.layer_convention == 'hf_hidden_states' else 0
    return tuple(int(l) - shift for l in config.layers)


def parse_width(width: str) -> int:
    """'16k' -> 16384, '1m' -> 1048576, '128' -> 128 (Gemma Scope's folder names)."""
    m = re.fullmatch(r'(\d+)([kKmM]?)', str(width))
    if not m:
        raise UserError(f'sae width {width!r} is not like 16k, 65k, 1m or 4096')
    return int(m.group(1)) * {'': 1, 'k': 1024, 'm': 1024 ** 2}[m.group(2).lower()]


def sae_grid(config) -> list[tuple[int, str]]:
    """(config layer, width) pairs to run: layers x widths minus sae.exclude."""
    excluded = set(config.sae.exclude)
    return [(int(l), str(w)) for l in config.layers for w in config.sae.widths
            if f'{l}:{w}' not in excluded]


def resolve_sae_source(template: str, layer: int, width: str) -> str:
    """Fills {layer}/{width}; a relative path missing from the cwd is tried from the repo."""
    src = template.format(layer=layer, width=width)
    if not os.path.isabs(src) and not os.path.exists(src):
        candidate = os.path.join(REPO_ROOT, src)
        if os.path.exists(candidate):
            return candidate
    return src


def load_saes(config, d_model: int) -> dict[str, Any]:
    saes = {}
    for layer, width in sae_grid(config):
        src = resolve_sae_source(config.sae.source, layer, width)
        try:
            params = sae_lib.load_sae(src, d_model=d_model)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise UserError(f'SAE for layer {layer} width {width} ({src}): {e}') from e
        if params.width != parse_width(width):
            raise UserError(f'SAE {src} has width {params.width}, but the config names it '
                            f'{width} ({parse_width(width)})')
        saes[f'layer_{layer}/{width}'] = params
    return saes


def _load_model(config):
    from mosaic_jax import models

    try:
        model = models.load_model(config.model.path, dtype=config.model.dtype)
        tokenizer = models.load_tokenizer(config.model.path)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(f'cannot load model {config.model.path!r}: {e}') from e
    n_blocks = model.config.num_layers
    bad = [l for l in model_layers(config) if not 0 <= l < n_blocks]
    if bad:
        raise UserError(f'layers {tuple(config.layers)} ({config.model.layer_convention}) '
                        f'reach blocks {bad}, but {config.model.path} has {n_blocks} blocks')
    return model, tokenizer


def _sync_run_id(run_id: str) -> str:
    """All hosts of a multi-host job must write under the same run id."""
    if jax.process_count() == 1:
        return run_id
    from jax.experimental import multihost_utils
    code = np.frombuffer(run_id.encode().ljust(32), np.uint8)
    code = multihost_utils.broadcast_one_to_all(code)
    return bytes(np.asarray(code)).decode().strip()


def run(config) -> list[dict]:
    """Runs the configured experiment; returns the summary rows (also written to disk)."""
    from mosaic_jax import baselines
    from mosaic_jax import data
    from mosaic_jax import report
    from mosaic_jax import results

    validate(config)
    if config.mode == 'report':
        try:
            path = report.build(config.workdir)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(f'report of {config.workdir!r}: {e}') from e
        logging.info('report written to %s', path)
        return []

    init_distributed(config.parallel)
    if config.model.matmul_precision != 'default':
        jax.config.update('jax_default_matmul_precision', config.model.matmul_precision)
    devices = Devices(config.parallel.mode)
    if config.model.batch_size % devices.count:
        raise UserError(f'model.batch_size={config.model.batch_size} must be divisible by '
                        f'the {devices.count} devices of parallel.mode={devices.mode}')
    writer = jax.process_index() == 0  # only process 0 writes results
    run_id = _sync_run_id(config.run_id or results.new_run_id())
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    model, tokenizer = _load_model(config)
    saes = load_saes(config, model.config.embed_dim)
    timings['load_model_and_saes'] = time.perf_counter() - t0
    layers = model_layers(config)
    hidden_pools = tuple(b.split('_', 1)[1] for b in config.baselines
                         if b in ('hidden_last', 'hidden_mean'))
    spec = FeatureSpec(
        layers=layers,
        saes=tuple((k, list(config.layers).index(int(k.split('/')[0][6:]))) for k in saes),
        pooling=tuple(config.features.pooling), binarize=tuple(config.features.binarize),
        top_n=config.features.top_n, threshold=config.features.threshold,
        chunk_size=config.sae.chunk_size, hidden=hidden_pools)
    extractor = Extractor(model, saes, spec, devices)
    metric_names = tuple(config.metrics)
    rows: list[dict] = []

    for ds_name in config.data.datasets:
        t = time.perf_counter()
        try:
            ds = data.load(ds_name, text_field=config.data.text_field,
                           label_field=config.data.label_field, max_rows=config.data.max_rows,
                           seed=config.seed)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise UserError(f'dataset {ds_name!r}: {e}') from e
        y = ds.labels
        splits = data.split(y, seed=config.seed, fractions=tuple(config.data.fractions))
        ids, n_trunc = data.tokenize(ds.texts, tokenizer, config.model.max_length)
        if n_trunc:
            logging.info('%s: %d of %d texts truncated to %d tokens', ds_name, n_trunc,
                         len(ids), config.model.max_length)
        timings[f'{ds_name}/load_tokenize'] = time.perf_counter() - t

        def make_batches(subset=None):
            sel = ids if subset is None else [ids[i] for i in subset]
            return data.batches(sel, config.model.batch_size, pad_id=tokenizer.pad_token_id,
                                pad_side=config.model.pad_side, multiple_of=devices.count)

        bos_id = tokenizer.bos_token_id
        if config.probe.train == 'fused':
            t = time.perf_counter()
            rows += _fused_dataset(config, model, saes, spec, devices, extractor, ds, ids,
                                   splits, metric_names, make_batches, bos_id)
            timings[f'{ds_name}/fused'] = time.perf_counter() - t
            continue
        t = time.perf_counter()
        feats = extract(extractor, make_batches(), len(ids), bos_id=bos_id,
                        include_special=config.features.include_special)
        timings[f'{ds_name}/extract'] = time.perf_counter() - t
        n_tokens = int(sum(len(i) for i in ids))
        logging.info('%s: extracted %d texts (%d tokens) in %.1fs', ds_name, len(ids),
                     n_tokens, timings[f'{ds_name}/extract'])
        t = time.perf_counter()
        extra_meta = dict(n_texts=len(ids), n_tokens=n_tokens, n_truncated=n_trunc,
                          split_sizes=[len(s) for s in splits],
                          extract_seconds=timings[f'{ds_name}/extract'])
        rows += _probe_dataset(config, ds, feats, splits, metric_names, run_id, writer,
                               results, baselines, extra_meta)
        timings[f'{ds_name}/probes'] = time.perf_counter() - t

    timings['total'] = time.perf_counter() - t0
    table = results.format_table(rows)
    print(table, flush=True)
    if writer:
        run_folder = os.path.join(config.workdir, results.safe_name(config.model.name), '_runs',
                                  run_id)
        results.write_summary(os.path.join(run_folder, 'summary.csv'), rows)
        results.write_json(run_folder, 'config.json', config.to_dict())
        results.write_json(run_folder, 'timings.json', timings)
        if config.report:
            path = report.build(config.workdir)
            logging.info('report written to %s', path)
    logging.info('timings (s): %s', {k: round(v, 2) for k, v in timings.items()})
    return rows


def _probe_dataset(config, ds, feats, splits, metric_names, run_id, writer, results,
                   baselines, extra_meta: dict) -> list[dict]:
    """Cached training: every variant x C grid, hidden baselines, TF-IDF, decision tree."""
    tr, va, te = splits
    y = ds.labels
    C = len(ds.label_names)
    rows = []
    common = dict(dataset=ds.name, n_train=len(tr), n_test=len(te))

    def row(res, **kw):
        return {**common, **kw, 'C': res.C, 'seconds': res.seconds,
                **{k: float(v) for k, v in res.test.items()}}

    grid = sae_grid(config)
    for li, layer in enumerate(config.layers):
        hidden_res = {}
        for pool in ('last', 'mean'):
            key = f'hidden/{li}/{pool}'
            if key in feats:
                res = fit_variant(key, feats[key], y, splits, config.probe,
                                  metric_names=metric_names, num_classes=C, seed=config.seed)
                hidden_res[pool] = res
                rows.append(row(res, layer=layer, width='-', kind='hidden',
                                variant=f'hidden_{pool}', pooling=pool, binarized=False))
        for lay, width in grid:
            if lay != layer:
                continue
            sae_key = f'layer_{layer}/{width}'
            variants = {}
            for pool in config.features.pooling:
                for b in config.features.binarize:
                    key = variant_key(sae_key, pool, b)
                    res = fit_variant(key, feats[key], y, splits, config.probe,
                                      metric_names=metric_names, num_classes=C,
                                      seed=config.seed)
                    variants[key] = res
                    rows.append(row(res, layer=layer, width=width, kind='sae',
                                    variant=pool + ('+bin' if b else ''), pooling=pool,
                                    binarized=bool(b)))
            best = max(variants.values(), key=lambda r: r.val[metric_names[0]])
            tree = None
            if 'decision_tree' in config.baselines:
                tree = baselines.run('decision_tree', feats[best.key][tr], y[tr],
                                     feats[best.key][te], num_classes=C, seed=config.seed)
                rows.append({**common, 'layer': layer, 'width': width, 'kind': 'tree',
                             'variant': best.key.split('/', 2)[2].replace('/bin', '+bin'),
                             'pooling': best.key.split('/')[2],
                             'binarized': best.key.endswith('/bin'), 'C': None,
                             **_metrics_from_proba(y[te], tree['proba'], metric_names)})
            cv = {}
            if config.cv_folds:
                cv['sae'] = cross_validate_variant(best, feats[best.key], y, splits,
                                                   config.probe, k=config.cv_folds,
                                                   num_classes=C, seed=config.seed)
                if hidden_res:
                    main = hidden_res.get('last') or next(iter(hidden_res.values()))
                    cv['hidden'] = cross_validate_variant(main, feats[main.key], y, splits,
                                                          config.probe, k=config.cv_folds,
                                                          num_classes=C, seed=config.seed)
            if writer:
                folder = results.run_dir(config.workdir, config.model.name, ds.name, layer,
                                         width, run_id)
                _write_variant_files(folder, config, ds, layer, width, y[te], best, variants,
                                     tree, hidden_res, results, cv, extra_meta)
    if 'tfidf' in config.baselines:
        t = time.perf_counter()
        out = baselines.run('tfidf', [ds.texts[i] for i in tr], y[tr],
                            [ds.texts[i] for i in te], num_classes=C, seed=config.seed)
        rows.append({**common, 'layer': '-', 'width': '-', 'kind': 'tfidf', 'variant': 'tfidf',
                     'C': None, 'seconds': time.perf_counter() - t,
                     **_metrics_from_proba(y[te], out['proba'], metric_names)})
    return rows


def cross_validate_variant(res: 'ProbeResult', x: np.ndarray, y: np.ndarray, splits, pcfg, *,
                           k: int, num_classes: int, seed: int) -> dict:
    """MOSAIC's `performance.cross_validation`: stratified K-fold accuracy of the chosen C
    on train + validation rows (test rows are never touched)."""
    from mosaic_jax import metrics

    rows = np.concatenate([splits[0], splits[1]])

    def fit_fn(x_tr, y_tr):
        p = probe.fit(np.asarray(x_tr, np.float32), y_tr, num_classes=num_classes, C=res.C,
                      class_weight=pcfg.class_weight or None, standardize=pcfg.standardize,
                      solver=pcfg.solver, max_iter=pcfg.max_iter, seed=seed)
        return lambda x_te: probe.predict_proba(p, np.asarray(x_te, np.float32))

    cv = metrics.cross_validate(fit_fn, x[rows], y[rows], k=k, seed=seed)
    out = dict(mean_accuracy=cv['accuracy']['mean'], std_accuracy=cv['accuracy']['std'],
               fold_scores=cv['accuracy']['folds'])
    out.update({f'{n}_mean': v['mean'] for n, v in cv.items()})
    return out


def _metrics_from_proba(y, proba, names) -> dict:
    from mosaic_jax import metrics
    return {k: float(v) for k, v in metrics.compute(y, np.asarray(proba), names=names).items()}


def _coef(params) -> np.ndarray:
    """Probe weights on the raw feature space (standardisation undone): [F, C']."""
    return probe.raw_coef(params)[0]


def _write_variant_files(folder, config, ds, layer, width, y_test, best, variants, tree,
                         hidden_res, results, cv, extra_meta):
    names = ds.label_names
    extra = dict(best_variant=best.key, C=best.C, pooling=best.key.split('/')[2],
                 binarized=best.key.endswith('/bin'),
                 binarize_threshold=config.features.threshold, top_n=config.features.top_n,
                 probe_seconds=best.seconds, **extra_meta)
    sae_json = dict(
        metadata=results.metadata(config, dataset=ds.name, layer=layer, width=width,
                                  hidden=False, class_names=names, extra=extra),
        models=dict(linearProbe=results.linear_probe_block(y_test, best.test_proba, names,
                                                           _coef(best.params),
                                                           cv=cv.get('sae'))),
        variants={k.split('/', 2)[2]: dict(C=v.C, val=v.val, test=v.test, seconds=v.seconds)
                  for k, v in variants.items()})
    if tree is not None:
        sae_json['models']['decisionTree'] = results.tree_block(
            tree['model'], y_test, np.asarray(tree['proba']).argmax(-1), names)
    results.write_json(folder, 'sae_classifier_results.json', sae_json)
    if hidden_res:
        main = hidden_res.get('last') or next(iter(hidden_res.values()))
        hidden_json = dict(
            metadata=results.metadata(config, dataset=ds.name, layer=layer, width=width,
                                      hidden=True, class_names=names,
                                      extra=dict(C=main.C, pooling=main.key.split('/')[2],
                                                 **extra_meta)),
            models=dict(linearProbe=results.linear_probe_block(y_test, main.test_proba, names,
                                                               _coef(main.params),
                                                               cv=cv.get('hidden'))),
            variants={k: dict(C=v.C, val=v.val, test=v.test) for k, v in hidden_res.items()})
        results.write_json(folder, 'hidden_classifier_results.json', hidden_json)


def train_fused(trainer: 'FusedTrainer', batches_fn, labels: np.ndarray, weights: np.ndarray,
                *, epochs: int, bos_id, include_special: bool) -> list[float]:
    """Streams `epochs` passes of training batches through the fused step.

    Args:
      batches_fn: () -> iterable of data.Batch over the training texts (index = position
        in `labels`).
      labels: int[N] training labels; weights: float[C] per-class weights.
    Returns:
      the loss of every step.
    """
    losses = []
    for _ in range(epochs):
        for b in batches_fn():
            fm = feature_mask(b.input_ids, b.attention_mask, bos_id, include_special)
            _, lab, w = batch_targets(b, labels, weights)
            losses.append(trainer.step(b, fm, lab, w))
    return losses


def _fused_dataset(config, model, saes, spec, devices, extractor, ds, ids, splits,
                   metric_names, make_batches, bos_id) -> list[dict]:
    """Fused training of one variant per SAE on the training split, scored on test."""
    tr, va, te = splits
    y = ds.labels
    C = len(ds.label_names)
    pcfg = config.probe
    weights = (probe.class_weights(y[tr], C) if pcfg.class_weight
               else np.ones(C, np.float32))
    test_feats = extract(extractor, make_batches(te), len(te), bos_id=bos_id,
                         include_special=config.features.include_special, progress=False)
    rows = []
    for sae_key in saes:
        key = variant_key(sae_key, pcfg.fused_variant, pcfg.fused_binarize)
        t = time.perf_counter()
        trainer = FusedTrainer(model, saes, spec, key, devices, C=pcfg.fused_C,
                               lr=pcfg.fused_lr, n_train=len(tr), num_classes=C,
                               seed=config.seed)
        train_fused(trainer, lambda: make_batches(tr), y[tr], weights,
                    epochs=pcfg.fused_epochs, bos_id=bos_id,
                    include_special=config.features.include_special)
        proba = np.asarray(probe.predict_proba(trainer.params, test_feats[key]))
        layer, width = sae_key[6:].split('/')
        rows.append(dict(dataset=ds.name, layer=int(layer), width=width, kind='fused',
                         variant=key.split('/', 2)[2], pooling=pcfg.fused_variant,
                         binarized=pcfg.fused_binarize, C=float(pcfg.fused_C),
                         n_train=len(tr), n_test=len(te), seconds=time.perf_counter() - t,
                         **_metrics_from_proba(y[te], proba, metric_names)))
    return rows
