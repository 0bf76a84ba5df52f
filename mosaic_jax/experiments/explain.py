"""Feature explanations: what the top features of a selected SAE probe respond to, read
from the run's own training texts.

For the selected SAE probe of a dataset, the top `k` features per class are ranked by
score = (raw probe weight towards the class) x (mean pooled value of the feature over the
training texts), i.e. how much the feature moves an average training text towards the
class. For a binary probe (one logit) the weight towards class 1 is w and towards class 0
is -w; `weight` in the output is always signed towards the positive class (label 1).
Per feature it keeps:
  * up to `examples` top-activating texts (one example per distinct text, copies counted
    once: its maximum over tokens),
    with the firing token and a window of `context` tokens around it;
  * density: the share of training texts where it fires;
  * class_means: the mean pooled value per class (what the probe reads).
Written to `<run>/features/<dataset>_layer_<L>_<width>.json` as
  {"classes": {label: [{"feature", "weight", "score", "density", "class_means",
                        "examples": [{"text_index", "token", "context", "token_span",
                                      "activation"}]}]}, ...}.
When the run pooled the SAE with 'max' too (the default), the top texts, activations and
densities come from those features, and the firing tokens from the positions the extraction
recorded beside them (variants.PeakPosition): no pass runs at all. Without them (no max
pooling, or a width-chunked encode) one pass (`token_activations`: the forward to the
SAE's layer and only the chosen features' encoder columns) finds them, over the top texts
only when max pooling picked them, over every training text when there is none.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax import steps
from mosaic_jax.data import batching
from mosaic_jax.probing import probe
from mosaic_jax.sae import jumprelu

CONTEXT = (8, 4)  # tokens kept before / after the firing token


def ranked(coef: np.ndarray, mean: np.ndarray, class_names, k: int) -> dict[str, list]:
    """label -> [(feature, weight towards the positive class / the class, score)], best
    first, only features with a positive score (they push an average text that way)."""
    out = {}
    for c, name in enumerate(class_names):
        if coef.shape[1] == 1:
            w_pos = coef[:, 0]
            towards = w_pos if c == 1 else -w_pos
        else:
            w_pos = towards = coef[:, c]
        score = towards * mean
        order = [int(j) for j in np.argsort(-score, kind='stable')[:k] if score[j] > 0]
        out[str(name)] = [(j, float(w_pos[j]), float(score[j])) for j in order]
    return out


def _top_rows(m: np.ndarray, n: int, groups: np.ndarray | None) -> list[int]:
    """The n rows with the largest m > 0, at most one per text (copies of a text share a
    group id), best first."""
    out, seen = [], set()
    for r in np.argsort(-m, kind='stable'):
        if m[r] <= 0 or len(out) == n:
            break
        g = r if groups is None else groups[r]
        if g not in seen:
            seen.add(g)
            out.append(int(r))
    return out


def _means(x: np.ndarray, rows: np.ndarray, y: np.ndarray, n_classes: int,
           block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(f64[F] mean of x over `rows`, f64[C, F] the mean per class, NaN for an absent
    class), read `block` rows at a time so no [n, F] copy of a wide SAE's features exists."""
    total = np.zeros(x.shape[1])
    per = np.zeros((n_classes, x.shape[1]))
    for a in range(0, len(rows), block):
        xb, yb = np.asarray(x[rows[a:a + block]], np.float64), y[a:a + block]
        total += xb.sum(0)
        for c in np.unique(yb):
            per[c] += xb[yb == c].sum(0)
    count = np.bincount(y, minlength=n_classes).astype(np.float64)
    with np.errstate(invalid='ignore', divide='ignore'):
        return total / max(len(rows), 1), per / count[:, None]


def _context(tokenizer, ids, pos: int) -> dict:
    """The firing token and a window around it, decoded; token_span marks the token."""
    a, b = max(0, pos - CONTEXT[0]), min(len(ids), pos + CONTEXT[1] + 1)
    left = tokenizer.decode(list(ids[a:pos]), skip_special_tokens=True)
    tok = tokenizer.decode([int(ids[pos])], skip_special_tokens=False)
    right = tokenizer.decode(list(ids[pos + 1:b]), skip_special_tokens=True)
    return dict(token=tok, context=left + tok + right,
                token_span=[len(left), len(left) + len(tok)])


def explain(model, tokenizer, sae, block: int, res, x: np.ndarray, ids, labels: np.ndarray,
            train: np.ndarray, class_names, batches_fn, *, bos_id, include_special: bool,
            k: int = 10, examples: int = 5, max_pooled: np.ndarray | None = None,
            peaks: np.ndarray | None = None, groups: np.ndarray | None = None) -> dict:
    """The explanations JSON of one selected SAE probe (see module docstring).

    Args:
      res: the probe's evaluation.ProbeResult; x: its pooled features [N, F] (all rows);
      ids: token ids of all rows; train: the training rows; batches_fn: rows -> batches.
      max_pooled: the same SAE's max-pooled features [N, F] when the run has them: then
        the top texts and the density are read from them and the pass runs over those top
        texts only (it finds the firing token), not over every training text.
      peaks: int[N, F] where each max-pooled value is reached (PeakPosition), with
        max_pooled: then no pass runs.
      groups: int[N] text-copy ids (splits.text_groups): copies count as one text.
    """
    train = np.asarray(train)
    tg = None if groups is None else np.asarray(groups)[train]
    y = np.asarray(labels)[train]
    mean, class_mean = _means(x, train, y, len(class_names))
    coef = probe.raw_coef(res.params)[0]
    tops = ranked(coef, mean, class_names, k)
    feats = sorted({j for v in tops.values() for j, _, _ in v})
    if not feats:
        return dict(classes={c: [] for c in tops}, n_train=len(train))
    if max_pooled is not None:
        m_all = np.asarray(max_pooled[np.ix_(train, feats)], np.float32)  # [n_train, K]
        top = {j: _top_rows(m_all[:, i], examples, tg) for i, j in enumerate(feats)}
        rows = np.asarray(sorted({r for v in top.values() for r in v}), np.int64)
    else:
        m_all, top, rows = None, None, np.arange(len(train))
    if max_pooled is not None and peaks is not None:
        acts = dict(max=m_all[rows], argmax=np.asarray(peaks[np.ix_(train[rows], feats)],
                                                       np.int64))
    else:
        acts = token_activations(model, sae, block, feats, batches_fn(train[rows]),
                                       len(rows), bos_id=bos_id,
                                       include_special=include_special)
    where = {int(r): i for i, r in enumerate(rows)}  # training position -> pass row
    col = {j: i for i, j in enumerate(feats)}         # feature -> pass column
    out = {}
    for name, entries in tops.items():
        out[name] = []
        for j, w, score in entries:
            i = col[j]
            if m_all is None:
                m = acts['max'][:, i]
                best = _top_rows(m, examples, tg)
                density = float((m > 0).mean())
            else:
                best, density = top[j], float((m_all[:, i] > 0).mean())
            ex = [dict(text_index=int(train[r]), activation=float(acts['max'][where[r], i]),
                       **_context(tokenizer, ids[train[r]], int(acts['argmax'][where[r], i])))
                  for r in best]
            out[name].append(dict(
                feature=j, weight=w, score=score, density=density,
                class_means={str(c): None if np.isnan(class_mean[ci, j])
                             else float(class_mean[ci, j]) for ci, c in enumerate(class_names)},
                examples=ex))
    return dict(classes=out, n_train=len(train),
                n_pass_texts=len(rows) if 'fires' in acts else 0,
                variant=res.key.name,
                weight_sign='towards the positive class (label 1)' if coef.shape[1] == 1
                else 'towards the class')


def token_activations(model, params, block: int, features: Sequence[int],
                      batches: Iterable[batching.Batch], n: int, *, bos_id,
                      include_special: bool) -> dict[str, np.ndarray]:
    """Per text, where a few SAE features fire: the explanation pass.

    Only the chosen features' encoder columns are applied (an SAE of those columns), so
    the pass costs the forward to `block` plus a [D, K] matmul.

    Returns:
      max f32[N, K] (largest activation over the text's pooled tokens), argmax int32[N, K]
      (its position in the text's token ids), fires int32[N, K] (tokens where it fires), tokens int32[N]
      (pooled tokens of the text).
    """
    idx = np.asarray(features, np.int64)
    sub, k = _feature_columns(params, idx), len(idx)
    step, state = _token_step(model, block)
    out = dict(max=np.zeros((n, len(idx)), np.float32), argmax=np.zeros((n, len(idx)), np.int32),
               fires=np.zeros((n, len(idx)), np.int32), tokens=np.zeros(n, np.int32))
    for bt in batches:
        fmask = steps.feature_mask(bt.input_ids, bt.attention_mask, bos_id, include_special)
        got = jax.device_get(step(state, sub, bt.input_ids, bt.attention_mask, fmask))
        valid = np.asarray(bt.valid, bool)
        rows = np.asarray(bt.index)[valid]
        for key, v in zip(('max', 'argmax', 'fires', 'tokens'), got):
            v = np.asarray(v)[valid]
            out[key][rows] = v[:, :k] if v.ndim == 2 else v  # padded columns dropped
    return out


_TOKEN_STEP: list = []  # [model, block, compiled step, model state]: the last one built


def _token_step(model, block: int):
    """The explanation pass's compiled step for one model and block (built once; its
    shapes depend on the batch and on the padded feature count only, so datasets and
    runs share executables). The model itself is kept and compared by identity, so a
    later model can never reuse another's state."""
    if not (_TOKEN_STEP and _TOKEN_STEP[0] is model and _TOKEN_STEP[1] == int(block)):
        graphdef, state = nnx.split(model)

        @jax.jit
        def step(state, sub, ids, mask, fmask):
            resid = nnx.merge(graphdef, state).residuals(ids, mask, (block,))[0]  # [B, L, D]
            act = jumprelu.encode(sub, resid) * fmask[..., None]                  # [B, L, K]
            first = jnp.argmax(mask, axis=1)[:, None]  # left padding: positions from the text
            return act.max(1), act.argmax(1) - first, (act > 0).sum(1), fmask.sum(1)
        _TOKEN_STEP[:] = [model, int(block), step, state]
    return _TOKEN_STEP[2], _TOKEN_STEP[3]


def _feature_columns(params, idx: np.ndarray, multiple: int = 64):
    """An SAE of only the encoder columns `idx`, padded to a multiple of 64 columns with
    columns that never fire (threshold +inf), so every feature set of a size class shares
    one program; `jumprelu.encode` of it equals `encode(params)[..., idx]`."""
    k = len(idx)
    pad = -(-k // multiple) * multiple - k
    w = np.asarray(params.w_enc)[:, idx]
    d = w.shape[0]
    return jumprelu.SAEParams(
        w_enc=jnp.asarray(np.pad(w, ((0, 0), (0, pad)))),
        b_enc=jnp.asarray(np.pad(np.asarray(params.b_enc)[idx], (0, pad))),
        threshold=jnp.asarray(np.pad(np.asarray(params.threshold)[idx], (0, pad),
                                     constant_values=np.inf)),
        w_dec=jnp.zeros((k + pad, d), jnp.float32), b_dec=jnp.asarray(params.b_dec),
        apply_b_dec_to_input=params.apply_b_dec_to_input)
