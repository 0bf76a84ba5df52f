"""Saved probes: what a run chose, in a form that classifies new texts.

  <run folder>/probes/<dataset>/<kind>/probe.json   what applying it needs (versioned)
  <run folder>/probes/<dataset>/<kind>/weights.npz  arrays (no pickle)

`kind` is 'sae' (the selected SAE probe), 'hidden' (the selected hidden-state probe) or
'tfidf'. probe.json names the label names (as the training data spelled them), the variant,
the model and SAE (source and fingerprint), the tokenizer settings and the feature
settings that produced the training features; weights.npz holds the probe's w, b and
standardisation (or the TF-IDF vocabulary, idf and logistic-regression weights), plus the
run's own test rows and probabilities, so a reload can be checked against the run.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import numpy as np

from mosaic_jax import checkpoint
from mosaic_jax.probing import probe

FORMAT = 'mosaic_jax.probe'
VERSION = 1
KINDS = ('sae', 'hidden', 'tfidf')
# TfidfVectorizer settings that change what transform() returns (fit-only ones are left out).
_TFIDF_KEYS = ('analyzer', 'binary', 'lowercase', 'ngram_range', 'norm', 'smooth_idf',
               'stop_words', 'strip_accents', 'sublinear_tf', 'token_pattern', 'use_idf')


@dataclasses.dataclass
class SavedProbe:
    """A probe and everything applying it needs (see module docstring)."""
    info: dict                   # probe.json
    params: Any                  # probe.ProbeParams, or the TF-IDF sklearn pipeline
    test_index: np.ndarray       # the run's test rows (dataset row numbers)
    test_proba: np.ndarray       # the run's test probabilities [n_test, C]

    @property
    def kind(self) -> str:
        return self.info['kind']

    @property
    def label_names(self) -> list[str]:
        return list(self.info['label_names'])


def folder(run_folder: str, dataset: str, kind: str) -> str:
    return os.path.join(run_folder, 'probes', dataset, kind)


def save(path: str, saved: SavedProbe) -> None:
    """Writes probe.json + weights.npz into `path` (each atomically)."""
    arrays = dict(test_index=np.asarray(saved.test_index, np.int64),
                  test_proba=np.asarray(saved.test_proba, np.float32))
    info = dict(saved.info, format=FORMAT, version=VERSION)
    if saved.kind == 'tfidf':
        vec, lr = saved.params.steps[0][1], saved.params.steps[-1][1]
        vocab = sorted(vec.vocabulary_, key=vec.vocabulary_.get)
        arrays.update(vocabulary=np.asarray(vocab), idf=vec.idf_, coef=lr.coef_,
                      intercept=lr.intercept_, classes=lr.classes_)
        params = vec.get_params()
        info['tfidf'] = {k: list(params[k]) if isinstance(params[k], tuple) else params[k]
                         for k in _TFIDF_KEYS}
    else:
        p = probe.ProbeParams(*(np.asarray(a) for a in (saved.params.w, saved.params.b,
                                                        saved.params.mean, saved.params.scale)))
        arrays.update(w=p.w, b=p.b, mean=p.mean, scale=p.scale)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    checkpoint.atomic_write_bytes(os.path.join(path, 'weights.npz'), buf.getvalue())
    checkpoint.atomic_write_json(os.path.join(path, 'probe.json'), info)


def load(path: str) -> SavedProbe:
    """A saved probe folder -> SavedProbe; one clear ValueError when it is not one."""
    meta = os.path.join(path, 'probe.json')
    if not os.path.isfile(meta):
        raise ValueError(f'no saved probe at {path} (no probe.json); a classify run saves '
                         f'its selected probes under <run folder>/probes/<dataset>/<kind>')
    info = checkpoint.read_json(meta)
    if info.get('format') != FORMAT or int(info.get('version', 0)) > VERSION:
        raise ValueError(f'{meta}: format {info.get("format")!r} version '
                         f'{info.get("version")!r}; this mosaic_jax reads {FORMAT!r} up to '
                         f'version {VERSION}')
    with np.load(os.path.join(path, 'weights.npz'), allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    if info['kind'] == 'tfidf':
        params = _tfidf_pipeline(info['tfidf'], a)
    else:
        params = probe.ProbeParams(w=a['w'], b=a['b'], mean=a['mean'], scale=a['scale'])
    return SavedProbe(info, params, a['test_index'], a['test_proba'])


def _tfidf_pipeline(settings: dict, a: dict):
    """The fitted TF-IDF + logistic-regression pipeline, rebuilt from its arrays."""
    from sklearn.feature_extraction.text import TfidfVectorizer  # pylint: disable=g-import-not-at-top
    from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
    from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
    kw = dict(settings, ngram_range=tuple(settings['ngram_range']))
    vec = TfidfVectorizer(vocabulary={str(t): i for i, t in enumerate(a['vocabulary'])}, **kw)
    vec.idf_ = a['idf']
    lr = LogisticRegression()
    lr.coef_, lr.intercept_, lr.classes_ = a['coef'], a['intercept'], a['classes']
    return make_pipeline(vec, lr)


def contributions(params: probe.ProbeParams, x: np.ndarray, predicted: np.ndarray,
                  k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The k features that pushed each row most towards its predicted class.

    A feature's contribution is its (standardised) value times its weight in the predicted
    class's logit; for a binary probe (one logit for class 1) class 0's is the negative.
    Returns (feature indices int[N, k], contributions float[N, k]), largest first.
    """
    z = (np.asarray(x, np.float32) - np.asarray(params.mean)) / np.asarray(params.scale)
    w = np.asarray(params.w)
    if w.shape[1] == 1:
        sign = np.where(np.asarray(predicted) == 1, 1.0, -1.0)[:, None]
        contrib = z * w[:, 0][None, :] * sign
    else:
        contrib = z * w.T[np.asarray(predicted)]
    k = min(k, contrib.shape[1])
    idx = np.argsort(-contrib, axis=1, kind='stable')[:, :k]
    return idx, np.take_along_axis(contrib, idx, axis=1)
