"""The compiled feature step and the fused probe step.

One jitted function takes a token batch through the model up to the deepest configured
layer, encodes every configured SAE, and pools / binarizes every configured variant:

  tokens [B, L] -> residuals [n_layers, B, L, D] -> SAE codes [B, L, F] -> pooled [B, F]

The fused step appends the probe update (`probe.make_train_step`, the one minibatch
objective) so features are never stored. How the steps run on devices (pmap / mesh /
single) is `parallel.Devices`' business; nothing here branches on the device count.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from mosaic_jax import features
from mosaic_jax import parallel
from mosaic_jax import store
from mosaic_jax.data import batching
from mosaic_jax.probing import probe
from mosaic_jax.sae import jumprelu
from mosaic_jax.variants import (TOP_N_POOLINGS, HiddenVariant, PeakPosition, SAEKey,
                                 Variant)

FeatureKey = Variant | HiddenVariant | PeakPosition


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Static description of what one compiled step computes."""
    layers: tuple[int, ...]                      # model block indices (after the convention)
    saes: tuple[tuple[SAEKey, int], ...]         # (SAE, position in `layers`)
    variants: tuple[Variant, ...]                # every pooled feature set to return
    hidden: tuple[tuple[HiddenVariant, int], ...]  # hidden baselines, position in `layers`
    threshold: float                             # binarization: x > threshold
    chunk_size: int                              # width block of the fused encode (0: off)

    @property
    def peaks(self) -> tuple[SAEKey, ...]:
        """SAEs whose max pooling also returns where it peaks (PeakPosition): those with an
        unbinarized 'max' variant, unless the encode is chunked over the width."""
        if self.chunk_size:
            return ()
        return tuple(k for k, _ in self.saes if Variant(k, 'max') in self.variants)

    @classmethod
    def build(cls, *, layers: Sequence[int], config_layers: Sequence[int],
              saes: Iterable[SAEKey], pooling: Sequence[str], binarize: Sequence[bool],
              top_n: Sequence[int] | int, threshold: float, chunk_size: int = 0,
              hidden: Sequence[str] = ()) -> 'FeatureSpec':
        """Every pooling x top_n x binarize variant of every SAE (top_n only multiplies
        the poolings that read it).

        Args:
          layers: model block of each config layer; config_layers: the config's names.
        """
        pos = {int(l): i for i, l in enumerate(config_layers)}
        tops = (top_n,) if isinstance(top_n, int) else tuple(top_n)
        saes = tuple(saes)
        variants = tuple(
            Variant(k, p, int(n) if p in TOP_N_POOLINGS else 0, bool(b))
            for k in saes for p in pooling
            for n in (tops if p in TOP_N_POOLINGS else (0,)) for b in binarize)
        return cls(layers=tuple(int(l) for l in layers),
                   saes=tuple((k, pos[k.layer]) for k in saes),
                   variants=tuple(dict.fromkeys(variants)),
                   hidden=tuple((HiddenVariant(int(l), p), i)
                                for i, l in enumerate(config_layers) for p in hidden),
                   threshold=float(threshold), chunk_size=int(chunk_size))


def _pooled(params, x, acts, fmask, pooling: str, tops: tuple[int, ...],
            chunk_size: int) -> dict[int, jax.Array]:
    """top_n -> f32[B, F] for one SAE and pooling. MOSAIC's counts for several top_n come
    from ONE top_k of the largest n (lax.top_k is sorted, ties to the lower index, so its
    first n picks are top_k(n)'s picks)."""
    if chunk_size:
        # Wide SAEs: encode and pool block by block over the width, so [B, L, F] never
        # exists (one re-encode per pooling and top_n; memory over speed).
        return {n: jumprelu.encode_pooled(params, x, fmask, pooling, top_n=n,
                                          chunk_size=chunk_size) for n in tops}
    out = {n: features.pool(acts, fmask, pooling, top_n=n) for n in tops if n == 0}
    counted = sorted(n for n in tops if n > 0)
    if counted:
        vals, idx = jax.lax.top_k(acts, min(counted[-1], acts.shape[-1]))  # [B, L, K]
        rank = jnp.arange(vals.shape[-1])
        for n in counted:
            # The first n picks by masking (a zero pick is not counted), not by slicing: with
            # two or more slices the CPU compiler folds them into the top_k and emits a full
            # stable sort of [B, L, F] (32 x 128 x 16k: 16 s instead of 0.3 s).
            out[n] = features.count_top_n(jnp.where(rank < n, vals, 0.0), idx, fmask,
                                          acts.shape[-1])
    return out


def compute_features(model, sae_params: dict, input_ids, attention_mask, feature_mask,
                     spec: FeatureSpec, pixel_values=None) -> tuple[dict, dict]:
    """One batch: forward -> SAE encode -> pool -> binarize, as a pure function.

    Args:
      model: a Transformer (merged inside the compiled function).
      sae_params: SAEKey -> SAEParams.
      input_ids: int32[B, L]; attention_mask: bool[B, L] (padding False);
      feature_mask: bool[B, L], positions that count in pooling (padding never; BOS and
        special tokens unless config.features.include_special; for images the chosen
        image / prompt positions).
      pixel_values: f32[B, 3, S, S] for a PaliGemma over images (`images.batches`); None
        reads text only.
    Returns:
      ({Variant: [B, F]} (float32, or uint8 when binarized),
       {HiddenVariant: float32[B, D]} for the hidden-state baselines,
       {PeakPosition: int16[B, F]} for spec.peaks). Three dicts: a pytree's keys must sort.
    """
    if pixel_values is None:
        resid = model.residuals(input_ids, attention_mask, spec.layers)  # [n, B, L, D]
    else:
        resid = model.residuals(input_ids, attention_mask, spec.layers, pixel_values)
    out, peaks = {}, {}
    first = jnp.argmax(attention_mask, axis=1)  # left padding: where each text starts
    for key, li in spec.saes:
        fn = functools.partial(_sae_features, sae_params[key], key=key, spec=spec)
        rows = _row_chunk(*resid[li].shape[:2], sae_params[key].width)
        if rows == len(first):
            got = fn(resid[li], feature_mask, first)
        else:
            # A wide SAE's codes [B, L, F] are gigabytes: encode and pool `rows` texts at a
            # time (texts are independent, so the features are the same).
            split = lambda a: a.reshape((-1, rows) + a.shape[1:])  # noqa: E731
            got = jax.lax.map(lambda a: fn(*a), (split(resid[li]), split(feature_mask),
                                                 split(first)))
            got = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), got)
        out.update(got[0])
        peaks.update(got[1])
    hidden = {}
    for hv, li in spec.hidden:
        # MOSAIC's hidden baseline reads the last real token (attention mask); the mean
        # baseline averages the same positions as the SAE poolings.
        mask = attention_mask if hv.pooling == 'last' else feature_mask
        hidden[hv] = features.pool(resid[li], mask, hv.pooling)
    return out, hidden, peaks


# Largest [rows, L, F] float32 block of SAE codes one batch holds at once (`_row_chunk`).
CODES_BYTES = 256 * 2**20


def _row_chunk(batch: int, length: int, width: int) -> int:
    """The most texts of a batch whose codes fit CODES_BYTES (a divisor of the batch;
    the whole batch for the usual 4k-16k SAEs at a few hundred tokens)."""
    fit = max(1, CODES_BYTES // max(1, length * width * 4))
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= fit)


def _sae_features(params, x, fmask, first, *, key: SAEKey, spec: FeatureSpec
                  ) -> tuple[dict, dict]:
    """One SAE's variants ({Variant: [B, F]}) and peak positions ({PeakPosition: [B, F]})
    of residuals x [B, L, D]; first int[B]: where each text starts in its row."""
    mine = [v for v in spec.variants if v.sae == key]
    acts = None if spec.chunk_size else jumprelu.encode(params, x)
    out, peaks = {}, {}
    for pooling in dict.fromkeys(v.pooling for v in mine):
        tops = tuple(sorted({v.top_n for v in mine if v.pooling == pooling}))
        if pooling == 'max' and key in spec.peaks:
            m, peaks[PeakPosition(key)] = features.max_and_position(acts, fmask, first)
            pooled = {0: m}
        else:
            pooled = _pooled(params, x, acts, fmask, pooling, tops, spec.chunk_size)
        for v in mine:
            if v.pooling == pooling:
                x_v = pooled[v.top_n]
                out[v] = (features.binarize(x_v, spec.threshold).astype(jnp.uint8)
                          if v.binarized else x_v)
    return out, peaks


def feature_mask(input_ids: np.ndarray, attention_mask: np.ndarray, bos_id: int | None,
                 include_special: bool) -> np.ndarray:
    """Positions that count in pooling: real tokens except BOS, or every real token
    (MOSAIC counts BOS). Padding never counts, so a text's features do not depend on
    which texts share its batch."""
    m = np.asarray(attention_mask, bool)
    if include_special or bos_id is None:
        return m
    return m & (input_ids != bos_id)


class Extractor:
    """Streams token batches through the compiled feature step on all devices.

    images=True: the step also takes pixel_values f32[B, 3, S, S] (split over the devices
    like the ids), for a PaliGemma reading images.
    """

    def __init__(self, model, sae_params: dict, spec: FeatureSpec,
                 devices: parallel.Devices, images: bool = False):
        self.spec, self.devices, self.images = spec, devices, bool(images)
        graphdef, state = nnx.split(model)

        def step(state, saes, ids, mask, fmask, *pixels):
            return compute_features(nnx.merge(graphdef, state), saes, ids, mask, fmask, spec,
                                    *pixels)

        self._step = devices.compile(step, n_replicated=2, n_rows=4 if images else 3)
        self._state = devices.replicate(state)
        self._saes = devices.replicate(sae_params)

    def __call__(self, input_ids, attention_mask, feature_mask, pixel_values=None
                 ) -> dict[FeatureKey, np.ndarray]:
        if (pixel_values is not None) != self.images:
            raise ValueError(f'this Extractor was built with images={self.images}; '
                             f'pixel_values {"missing" if self.images else "given"}')
        rows = (input_ids, attention_mask, feature_mask)
        args = self.devices.split(*rows, *(() if pixel_values is None else (pixel_values,)))
        sae_out, hidden, peaks = self.devices.gather(self._step(self._state, self._saes,
                                                                *args))
        return {**sae_out, **hidden, **peaks}

    def lowered_text(self, input_ids, attention_mask, feature_mask) -> str:
        args = self.devices.split(input_ids, attention_mask, feature_mask)
        return self._step.lower(self._state, self._saes, *args).as_text()


def extractors(model, sae_params: dict, devices: parallel.Devices
               ) -> Callable[..., Extractor]:
    """(spec, images=False) -> its Extractor, each built on first use and then reused
    (building one replicates the model onto the devices; compiling it is per instance)."""
    built: dict[tuple[FeatureSpec, bool], Extractor] = {}

    def get(spec: FeatureSpec, images: bool = False) -> Extractor:
        if (spec, images) not in built:
            built[spec, images] = Extractor(model, {k: sae_params[k] for k, _ in spec.saes},
                                            spec, devices, images)
        return built[spec, images]
    return get


def extract(extractor: Extractor, batches: Iterable[batching.Batch], n: int, *, bos_id,
            include_special, progress: bool = True, total: int | None = None,
            sink: Callable[[np.ndarray, dict], None] | None = None,
            mask_fn: Callable[[Any], np.ndarray] | None = None
            ) -> dict[FeatureKey, np.ndarray] | None:
    """Pooled features of a whole dataset, batch by batch; never holds [N, T, F].

    Args:
      batches: batching.Batch items (input_ids, attention_mask, index, valid), or
        images.ImageBatch items (the same plus pixel_values) for an images Extractor.
      n: number of texts; every index in [0, n) must appear once among valid rows.
      total: number of batches, for the progress bar's total and ETA.
      sink: when given, called with (row indices, {key: rows}) per batch instead of
        collecting the rows (the feature store writes them as they come); the batches
        then need not cover every row.
    Returns:
      Variant / HiddenVariant -> [N, F] arrays in dataset order (None with a sink).
    """
    store: dict[FeatureKey, np.ndarray] = {}
    seen = np.zeros(n, bool)
    for b in tqdm(batches, desc='extract', unit='batch', total=total, disable=not progress):
        fmask = (feature_mask(b.input_ids, b.attention_mask, bos_id, include_special)
                 if mask_fn is None else mask_fn(b))
        out = extractor(b.input_ids, b.attention_mask, fmask, getattr(b, 'pixel_values', None))
        valid = np.asarray(b.valid, bool)
        idx = np.asarray(b.index)[valid]
        if sink is not None:
            sink(idx, {k: v[valid] for k, v in out.items()})
            continue
        seen[idx] = True
        for k, v in out.items():
            if k not in store:
                store[k] = np.zeros((n,) + v.shape[1:], v.dtype)
            store[k][idx] = v[valid]
    if sink is not None:
        return None
    if not seen.all():
        raise RuntimeError(f'{(~seen).sum()} texts were never extracted')
    return store


# ----------------------------------------------------------------------------------------
# Extraction through the feature store
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StoreGroup:
    """One group of the feature store: the variants of one SAE, or one layer's hidden
    poolings, and the store name that fingerprints them (store.digest)."""
    name: str
    keys: tuple[FeatureKey, ...]
    info: dict


def store_groups(spec: FeatureSpec, model_fp: Any, sae_fps: dict, *, bos_id,
                 include_special: bool) -> list[StoreGroup]:
    """The store groups of a spec: every input that changes the numbers is in the name."""
    base = dict(format=store.FORMAT, model=model_fp, include_special=bool(include_special),
                bos_id=bos_id)
    out = []
    for key, li in spec.saes:
        mine = tuple(v for v in spec.variants if v.sae == key)
        mine += (PeakPosition(key),) if key in spec.peaks else ()
        ident = dict(base, block=spec.layers[li], sae=sae_fps[key],
                     variants=[v.name for v in mine], threshold=spec.threshold)
        out.append(StoreGroup(store.digest(ident), mine,
                              dict(kind='sae', layer=key.layer, width=key.width,
                                   sae=store.fingerprint_label(sae_fps[key]),
                                   model=_model_label(model_fp))))
    for li, block in enumerate(spec.layers):
        mine = tuple(hv for hv, i in spec.hidden if i == li)
        if mine:
            ident = dict(base, block=block, hidden=[hv.name for hv in mine])
            out.append(StoreGroup(store.digest(ident), mine,
                                  dict(kind='hidden', layer=mine[0].layer,
                                       model=_model_label(model_fp))))
    return out


def _model_label(model_fp: Any) -> str:
    """The model path of a model fingerprint ([path fingerprint, dtype, precision])."""
    try:
        return store.fingerprint_label(model_fp[0])
    except (TypeError, IndexError, KeyError):
        return str(model_fp)[:200]


def _restrict(spec: FeatureSpec, keys: set) -> FeatureSpec:
    """The spec computing only `keys` (the store's missing groups)."""
    return dataclasses.replace(
        spec, saes=tuple((k, i) for k, i in spec.saes
                         if any(v.sae == k and v in keys for v in spec.variants)),
        variants=tuple(v for v in spec.variants if v in keys),
        hidden=tuple((hv, i) for hv, i in spec.hidden if hv in keys))


def extract_stored(spec: FeatureSpec, extractor_for: Callable[[FeatureSpec], Extractor],
                   groups: Sequence[StoreGroup], opts: store.StoreOptions, token_ids,
                   batches: Iterable[batching.Batch], *, bos_id, include_special,
                   progress: bool = True) -> store.StoredFeatures:
    """`extract` through the store: texts whose features are stored are read, the rest
    computed (only for the groups that miss them) and written shard by shard, so a killed
    run resumes where its last shard ended.

    Args:
      extractor_for: spec -> Extractor (`extractors`): the whole spec's when every group
        is missing, a smaller spec's for the missing groups only.
      batches: the batches an in-memory extraction of all `token_ids` would run. Only
        those holding a missing text are computed, whole, so every feature equals the
        uninterrupted run's bit for bit (a text's padded length is the same).
    """
    keys = store.text_keys(token_ids)
    opened = {g.name: store.Group.open(opts.root, g.name, [k.name for k in g.keys], g.info)
              for g in groups}
    need = {g.name: opened[g.name].missing(keys) for g in groups}
    todo = [g for g in groups if len(need[g.name])]
    missing = np.zeros(len(keys), bool)
    for g in todo:
        missing[need[g.name]] = True
    n, n_missing = len(keys), int(missing.sum())
    if not n_missing:
        logging.info('feature store: all %d texts read from the store; nothing extracted', n)
    else:
        if n_missing < n:
            logging.info('feature store: resuming: %d of %d texts already stored, computing %d',
                         n - n_missing, n, n_missing)
        logging.info('feature store: computing %d of %d feature groups (%s)', len(todo),
                     len(groups), ', '.join(str(g.info.get('sae') or f"hidden layer "
                                                f"{g.info.get('layer')}") for g in todo))
        run = [b for b in batches
               if missing[np.asarray(b.index)[np.asarray(b.valid, bool)]].any()]
        sub = _restrict(spec, {k for g in todo for k in g.keys})
        ex = extractor_for(spec if len(todo) == len(groups) else sub)
        sink = _ShardSink([opened[g.name] for g in todo], todo,
                          {g.name: need[g.name] for g in todo}, keys, opts.shard_texts)
        extract(ex, run, n, bos_id=bos_id, include_special=include_special,
                progress=progress, total=len(run), sink=sink)
        sink.flush()
        if (left := int((missing & ~sink.seen(n)).sum())):
            raise RuntimeError(f'{left} texts were never extracted')
    return store.StoredFeatures({k: (opened[g.name], k.name) for g in groups for k in g.keys},
                                keys, n_computed=n_missing)


class _ShardSink:
    """Buffers extracted rows per group and writes a shard every `shard_texts` texts
    (whole batches: a shard never ends inside a batch)."""

    def __init__(self, groups, specs, need: dict, keys, shard_texts: int):
        self.groups, self.specs, self.keys = groups, specs, keys
        self.need = {name: set(v.tolist()) for name, v in need.items()}
        self.shard_texts = max(1, int(shard_texts))
        self.buf: list[tuple[np.ndarray, dict]] = []
        self.done: list[np.ndarray] = []
        self.count = 0

    def __call__(self, idx: np.ndarray, out: dict) -> None:
        self.buf.append((idx, out))
        self.count += len(idx)
        if self.count >= self.shard_texts:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        rows = np.concatenate([r for r, _ in self.buf])
        for group, spec in zip(self.groups, self.specs):
            keep = np.asarray([r in self.need[spec.name] for r in rows], bool)
            if keep.any():
                values = {k.name: np.concatenate([o[k] for _, o in self.buf])[keep]
                          for k in spec.keys}
                group.write(self.keys[rows[keep]], values)
                self.need[spec.name] -= set(rows[keep].tolist())  # a copy's key: written once
        self.done.append(rows)
        self.buf, self.count = [], 0

    def seen(self, n: int) -> np.ndarray:
        out = np.zeros(n, bool)
        for rows in self.done:
            out[rows] = True
        return out


# ----------------------------------------------------------------------------------------
# Minibatch training: fused (features streamed) and its cached twin
# ----------------------------------------------------------------------------------------

def epoch_batches(token_ids: Sequence[Sequence[int]], batch_size: int, *, seed: int,
                  epoch: int, chunk_batches: int = 1, **batch_kw) -> list[batching.Batch]:
    """Training batches of one epoch in a seeded random order.

    Rows are shuffled (seed, epoch) and cut into chunks of `chunk_batches` batches that are
    length-bucketed inside (batching.batches); the batches are then shuffled too. The default
    (1) makes every batch a uniform random sample, an unbiased minibatch; larger chunks
    pad less, but where length predicts the label (it often does) they bring back
    single-class batches like a length-sorted pass over the whole dataset.
    `Batch.index` is the row's position in `token_ids`.

    Args:
      batch_kw: batching.batches options (pad_id, pad_side, multiple_of, ...).
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(token_ids))
    step = batch_size * chunk_batches
    out = []
    for start in range(0, len(perm), step):
        rows = perm[start:start + step]
        for b in batching.batches([token_ids[i] for i in rows], batch_size, **batch_kw):
            index = np.where(b.valid, rows[np.maximum(b.index, 0)], -1)
            out.append(b._replace(index=index))
    return [out[i] for i in rng.permutation(len(out))]


def batch_targets(b: batching.Batch, labels: np.ndarray, class_weight: np.ndarray):
    """Rows, labels and weights of one batching.Batch for the probe (filler rows: weight 0).

    Returns:
      idx int[B] (filler rows point at row 0), lab int32[B], w float32[B], valid bool[B].
    """
    valid = np.asarray(b.valid, bool)
    idx = np.where(valid, np.asarray(b.index), 0)
    lab = np.where(valid, labels[idx], 0).astype(np.int32)
    w = np.where(valid, class_weight[lab], 0.0).astype(np.float32)
    return idx, lab, w, valid


def make_fused_step(graphdef, spec: FeatureSpec, variant: Variant,
                    tx: optax.GradientTransformation, *, C: float, n_train: int,
                    num_classes: int, axis_name: str | None):
    """The design's single compiled step: forward -> SAE -> pool -> binarize -> probe
    loss/grad -> (psum over devices) -> optax update, streaming, nothing stored."""
    train_step = probe.make_train_step(tx, C=C, num_classes=num_classes, n_train=n_train,
                                       axis_name=axis_name)

    def step(state, saes, params, opt_state, ids, mask, fmask, labels, weights, valid):
        with jax.named_scope('features'):
            sae_out, _, _ = compute_features(nnx.merge(graphdef, state), saes, ids, mask, fmask,
                                          spec)
        x = sae_out[variant].astype(jnp.float32)
        return train_step(params, opt_state, x, labels, weights, valid)
    return step


class FusedTrainer:
    """Trains one probe variant by streaming batches through the fused step."""

    def __init__(self, model, sae_params, spec: FeatureSpec, variant: Variant,
                 devices: parallel.Devices, *, C: float, lr: float, n_train: int,
                 num_classes: int):
        self.devices = devices
        graphdef, state = nnx.split(model)
        self.tx = optax.adam(lr)
        self.params = probe.init_params(sae_params[variant.sae].width, num_classes)
        self.opt_state = self.tx.init(self.params)
        fn = make_fused_step(graphdef, spec, variant, self.tx, C=C, n_train=n_train,
                             num_classes=num_classes, axis_name=devices.axis_name)
        self._step = devices.compile(fn, n_replicated=4, n_rows=6)
        self._state = devices.replicate(state)
        self._saes = devices.replicate(sae_params)

    def _args(self, b, fmask, labels, weights, valid):
        params, opt_state = self.devices.replicate((self.params, self.opt_state))
        rows = self.devices.split(b.input_ids, b.attention_mask, fmask, labels, weights, valid)
        return (self._state, self._saes, params, opt_state, *rows)

    def step(self, b, fmask, labels, weights, valid) -> float:
        out = self.devices.unreplicate(self._step(*self._args(b, fmask, labels, weights,
                                                              valid)))
        self.params, self.opt_state, loss = out
        loss = float(loss)
        if not np.isfinite(loss):
            raise FloatingPointError(f'non-finite fused probe loss {loss}')
        return loss

    def lowered_text(self, b, fmask, labels, weights, valid) -> str:
        return self._step.lower(*self._args(b, fmask, labels, weights, valid)).as_text()


def train_fused(trainer: FusedTrainer, batches_fn: Callable[[int], Iterable[batching.Batch]],
                labels: np.ndarray, weights: np.ndarray, *, epochs: int, bos_id,
                include_special: bool) -> list[float]:
    """Streams `epochs` passes of training batches through the fused step.

    Args:
      batches_fn: epoch -> iterable of batching.Batch over the training texts (index =
        position in `labels`), e.g. `epoch_batches`.
      labels: int[N] training labels; weights: float[C] per-class weights.
    Returns:
      the loss of every step.
    """
    losses = []
    for epoch in range(epochs):
        for b in batches_fn(epoch):
            fm = feature_mask(b.input_ids, b.attention_mask, bos_id, include_special)
            _, lab, w, valid = batch_targets(b, labels, weights)
            losses.append(trainer.step(b, fm, lab, w, valid))
    return losses

