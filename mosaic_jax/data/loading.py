"""Labelled text datasets (sae-probes collection, local files, HF hub) -> `LabeledTexts`
(tokenising and batching live in `batching`, train/val/test splits in `splits`).

A dataset spec is a registry name (`DATASETS`), `sae_probes:<name>`, a local file path, a hub
id, or a dict / ConfigDict with the keys of `SPEC_KEYS`. Everything ends as `LabeledTexts`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import numbers
import os
from typing import Any, Mapping, Sequence

from absl import logging
import datasets
import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

SAE_PROBES_PREFIX = 'sae_probes:'
# Keys a dict spec may carry (anything else is a typo and raises).
SPEC_KEYS = ('name', 'hub', 'path', 'text_field', 'label_field', 'split', 'subset',
             'revision', 'max_rows', 'max_classes', 'task', 'seed', 'dedupe', 'encoding')
# More distinct label values than this is not a classification task (banking77 has 77,
# MASSIVE intents 60); numeric labels beyond it are a regression target.
MAX_CLASSES = 100
# Numeric labels with fractional values are class codes only when there are a handful of
# them (e.g. 0.5 steps); more distinct fractional values means a continuous target.
_MAX_FRACTIONAL_CLASSES = 10
_TASKS = ('auto', 'classification')
# Longest suffix first so 'x.csv.zst' is not taken for a plain file with suffix '.zst'.
_FILE_SUFFIXES = (('.csv.zst', 'csv.zst'), ('.parquet', 'parquet'), ('.jsonl', 'json'),
                  ('.json', 'json'), ('.csv', 'csv'))


# ---------------------------------------------------------------------------------------
# Registry of the paper's datasets (fields as in MOSAIC's config*.yaml and the hub cards).
# ---------------------------------------------------------------------------------------
# datasets >= 4 no longer runs hub loading scripts; script-based repos (banking77, tweet
# sentiment, MASSIVE) load from the hub's automatic parquet export branch instead.
_PARQUET = 'refs/convert/parquet'


def _registry() -> dict[str, dict[str, Any]]:
    reg: dict[str, dict[str, Any]] = {
        # MOSAIC evaluates the 'test' split (its only split); labels 'Harmless'/'Harmful'.
        'election_questions': dict(hub='Anthropic/election_questions', split='test',
                                   text_field='question', label_field='label'),
        'reject_prompts': dict(hub='AIM-Harvard/reject_prompts', split='train',
                               text_field='text', label_field='label'),
        # MOSAIC uses the 'test' split; labels 'benign'/'jailbreak'.
        'jailbreak_classification': dict(hub='jackhhao/jailbreak-classification',
                                         split='test', text_field='prompt', label_field='type'),
        # MOSAIC's banking77 config used the legacy mirror with the same fields.
        'banking77': dict(hub='PolyAI/banking77', split='train', text_field='text',
                          label_field='label', revision=_PARQUET),
        # sae-probes demo sets, under short aliases.
        'toxic_is': dict(name=SAE_PROBES_PREFIX + '95_toxic_is'),
        'spam_is': dict(name=SAE_PROBES_PREFIX + '96_spam_is'),
        'twt_emotion': dict(name=SAE_PROBES_PREFIX + '102_twt_emotion'),
    }
    # One split per language (5000 rows each, labels 0/1).
    for lang in ('en', 'ru', 'uk', 'de', 'es', 'am', 'zh', 'ar', 'hi'):
        reg[f'multilingual_toxicity_{lang}'] = dict(
            hub='textdetox/multilingual_toxicity_dataset', split=lang,
            text_field='text', label_field='toxic')
    # One config per language; MOSAIC uses the 'test' split (negative/neutral/positive).
    for lang in ('english', 'spanish', 'french', 'german', 'portuguese', 'italian',
                 'arabic', 'hindi'):
        reg[f'tweet_sentiment_{lang}'] = dict(
            hub='cardiffnlp/tweet_sentiment_multilingual', subset=lang, split='test',
            text_field='text', label_field='label', revision=_PARQUET)
    # One config per locale; 'intent' (60 classes) and 'scenario' (18) are ClassLabels.
    for locale in ('en-US', 'de-DE', 'es-ES', 'fr-FR', 'ru-RU', 'zh-CN', 'ja-JP', 'ar-SA',
                   'hi-IN'):
        for target in ('intent', 'scenario'):
            reg[f'massive_{target}_{locale}'] = dict(
                hub='AmazonScience/massive', subset=locale, split='train',
                text_field='utt', label_field=target, revision=_PARQUET)
    for key, spec in reg.items():
        spec.setdefault('name', key)
    return reg


DATASETS: dict[str, dict[str, Any]] = _registry()


# ---------------------------------------------------------------------------------------
# Loaded data.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LabeledTexts:
    """Texts with integer class labels.

    texts: N strings; labels: int64[N] in 0..C-1; label_names: C names (label_names[k] is the
    original value of class k); name: short dataset name; source: where it was read from;
    num_dropped: rows dropped for an empty/missing text or label.
    """
    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    name: str
    source: str
    num_dropped: int = 0
    groups: list[str] | None = None  # per-row group (e.g. language) for transfer runs

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(self, idx: Sequence[int] | np.ndarray) -> 'LabeledTexts':
        """Rows `idx` (int[M]) with the same label encoding (classes may become empty)."""
        idx = np.asarray(idx, dtype=np.int64)
        groups = None if self.groups is None else [self.groups[i] for i in idx]
        return dataclasses.replace(self, texts=[self.texts[i] for i in idx],
                                   labels=self.labels[idx], groups=groups)


def combine(parts: Sequence[tuple[str, 'LabeledTexts']], name: str) -> 'LabeledTexts':
    """One grouped dataset from (group name, dataset) parts, e.g. one per language.

    Classes are matched by their label names (a class missing from a part is allowed);
    `groups[i]` is the part row i came from.
    """
    if len(parts) < 2:
        raise ValueError(f'combining needs at least 2 (group, dataset) parts, got {len(parts)}')
    names = sorted({n for _, d in parts for n in d.label_names})
    texts, labels, groups = [], [], []
    for group, d in parts:
        code = np.asarray([names.index(n) for n in d.label_names], np.int64)
        texts += d.texts
        labels.append(code[d.labels])
        groups += [str(group)] * len(d)
    return LabeledTexts(texts=texts, labels=np.concatenate(labels), label_names=names,
                        name=name, source='combined:' + ','.join(g for g, _ in parts),
                        num_dropped=sum(d.num_dropped for _, d in parts), groups=groups)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A spec with every field resolved; `kind` is 'sae_probes' | 'file' | 'hub'."""
    kind: str
    name: str
    location: str            # file path, or hub id
    text_field: str
    label_field: str
    split: str | None
    subset: str | None
    revision: str | None
    max_rows: int
    max_classes: int
    task: str
    seed: int
    dedupe: bool
    encoding: str = 'utf-8'  # of a local CSV / JSON file


def _as_dict(spec: Any) -> dict[str, Any]:
    if hasattr(spec, 'to_dict'):  # ml_collections.ConfigDict
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise ValueError(f'dataset spec must be a str or a dict, got {type(spec).__name__}')
    spec = dict(spec)
    if unknown := sorted(set(spec) - set(SPEC_KEYS)):
        raise ValueError(f'unknown dataset spec keys {unknown}; valid: {list(SPEC_KEYS)}')
    return spec


def _file_format(path: str) -> str | None:
    lower = path.lower()
    for suffix, fmt in _FILE_SUFFIXES:
        if lower.endswith(suffix):
            return fmt
    return None


def _spec_from_str(spec: str) -> dict[str, Any]:
    if spec in DATASETS:
        return dict(DATASETS[spec])
    if spec.startswith(SAE_PROBES_PREFIX):
        return dict(name=spec)
    if os.path.exists(spec) or _file_format(spec):
        return dict(path=spec)
    if '/' in spec:
        # A bare hub id that the registry knows exactly once gets its registered fields.
        known = [dict(v) for v in DATASETS.values() if v.get('hub') == spec]
        return known[0] if len(known) == 1 else dict(hub=spec)
    close = difflib.get_close_matches(spec, list(DATASETS), n=5, cutoff=0.5)
    raise ValueError(f'unknown dataset {spec!r}: not a registry name, sae_probes:<name>, '
                     f'file or hub id. Close registry names: {close}')


def resolve(spec: Any, *, text_field: str = 'prompt', label_field: str = 'target',
            max_rows: int = 0, seed: int = 0, encoding: str = 'utf-8') -> Spec:
    """Turns any accepted spec form into a fully resolved `Spec`.

    The keyword arguments are fallbacks (the config's `data.*` fields) for values the spec
    does not set itself; sae-probes sets always use their own `prompt`/`target` columns.
    """
    raw = _spec_from_str(spec) if isinstance(spec, str) else _as_dict(spec)
    name = raw.get('name')
    if name in DATASETS and not (raw.get('path') or raw.get('hub')):
        # The registry entry, with the spec's other keys overriding it.
        raw = {**DATASETS[name], **{k: v for k, v in raw.items() if k != 'name'}}
        name = raw['name']
    if raw.get('path') and raw.get('hub'):
        raise ValueError(f'dataset spec sets both path={raw["path"]!r} and hub={raw["hub"]!r}')
    if raw.get('path'):
        kind, location = 'file', str(raw['path'])
        name = name or os.path.basename(location).split('.')[0]
    elif raw.get('hub'):
        kind, location = 'hub', str(raw['hub'])
        name = name or '_'.join(
            [location.replace('/', '_')] + [str(raw[k]) for k in ('subset',) if raw.get(k)])
    elif name and str(name).startswith(SAE_PROBES_PREFIX):
        kind, location = 'sae_probes', str(name)[len(SAE_PROBES_PREFIX):]
        name = location  # load() replaces it by the full file name ('95_toxic_is')
        text_field, label_field = 'prompt', 'target'  # the collection's fixed columns
    else:
        raise ValueError(f'dataset spec {raw} names no source: give path=, hub=, a registry '
                         f'name or sae_probes:<name>')
    task = raw.get('task') or 'auto'
    if task not in _TASKS:
        raise ValueError(f'dataset {name!r}: task={task!r}; valid: {list(_TASKS)}')
    return Spec(
        kind=kind, name=str(name), location=location,
        text_field=raw.get('text_field') or text_field,
        label_field=raw.get('label_field') or label_field,
        split=raw.get('split') or None, subset=raw.get('subset') or None,
        revision=raw.get('revision') or None,
        max_rows=int(raw.get('max_rows') or max_rows or 0),
        max_classes=int(raw.get('max_classes') or MAX_CLASSES), task=task,
        seed=int(raw['seed']) if raw.get('seed') is not None else seed,
        dedupe=bool(raw.get('dedupe', False)), encoding=str(raw.get('encoding') or encoding))


# ---------------------------------------------------------------------------------------
# Readers: each returns a datasets.Dataset.
# ---------------------------------------------------------------------------------------
def sae_probes_dir() -> str:
    """Folder of the sae-probes `cleaned_data/*.csv.zst` files (package found, not imported:
    its __init__ pulls torch)."""
    found = importlib.util.find_spec('sae_probes')
    if found is None or not found.submodule_search_locations:
        raise ValueError('the sae-probes datasets need the sae-probes package: '
                         '`pip install --no-deps sae-probes`')
    return os.path.join(list(found.submodule_search_locations)[0], 'data', 'cleaned_data')


def sae_probes_names() -> list[str]:
    """All dataset names of the sae-probes collection, e.g. '95_toxic_is'."""
    suffix = '.csv.zst'
    return sorted(f[:-len(suffix)] for f in os.listdir(sae_probes_dir()) if f.endswith(suffix))


def _sae_probes_path(name: str) -> str:
    names = sae_probes_names()
    if name not in names:
        # Accept the name without its number ('toxic_is') when that is unambiguous.
        numbered = [n for n in names if n.split('_', 1)[-1] == name]
        if len(numbered) != 1:
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
            raise ValueError(f'unknown sae-probes dataset {name!r} ({len(names)} available); '
                             f'close matches: {close}')
        name = numbered[0]
    return os.path.join(sae_probes_dir(), name + '.csv.zst')


@functools.lru_cache(maxsize=1)
def _sae_probes_task_types() -> dict[str, str]:
    """Dataset name -> the collection's own 'Data type' annotation (e.g. 'Continuous Data')."""
    master = os.path.join(os.path.dirname(sae_probes_dir()), 'probing_datasets_MASTER.csv.zst')
    if not os.path.exists(master):
        return {}
    table = pd.read_csv(master, compression='zstd')
    out = {}
    for save_name, dtype in zip(table['Dataset save name'], table['Data type']):
        if isinstance(save_name, str) and isinstance(dtype, str):
            out[os.path.basename(save_name).removesuffix('.csv')] = dtype
    return out


def sae_probes_tasks() -> dict[str, str]:
    """Every sae-probes dataset name -> its 'Data type' ('Binary Classification',
    'Multiclass Classification', 'Continuous Data'; '' when the collection has none)."""
    types = _sae_probes_task_types()
    return {n: types.get(n, '') for n in sae_probes_names()}


def sae_probes_ood_path(name: str) -> str | None:
    """The shifted test set the collection ships for dataset `name` ('OOD data/<name>_OOD
    .csv.zst'), or None when it has none."""
    path = os.path.join(os.path.dirname(sae_probes_dir()), 'OOD data', f'{name}_OOD.csv.zst')
    return path if os.path.exists(path) else None


def _check_encoding(path: str, encoding: str) -> None:
    """The whole file decodes as `encoding`, else one error naming the first bad byte."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        raw.decode(encoding)
    except LookupError:
        raise ValueError(f'dataset file {path!r}: unknown encoding {encoding!r} (data.encoding '
                         "takes Python codec names: 'utf-8', 'latin-1', 'cp1252', ...)") from None
    except UnicodeDecodeError as e:
        line = raw.count(b'\n', 0, e.start) + 1
        raise ValueError(
            f'dataset file {path!r} is not {encoding} text: byte offset {e.start} (line {line}, '
            f'{raw[e.start:e.start + 1]!r}) cannot be decoded; set data.encoding (e.g. '
            f"--config.data.encoding=latin-1) or the dataset spec's encoding= to the file's "
            f'encoding') from None


def _read_file(path: str, text_field: str, encoding: str = 'utf-8'):
    if not os.path.exists(path):
        raise ValueError(f'dataset file {path!r} does not exist')
    fmt = _file_format(path)
    if fmt is None:
        raise ValueError(f'dataset file {path!r}: unknown format; use one of '
                         f'{[s for s, _ in _FILE_SUFFIXES]}')
    if fmt == 'csv.zst':
        # Text column read as str so '1.50' stays '1.50' (pandas would parse a float).
        frame = pd.read_csv(path, compression='zstd', converters={text_field: str},
                            encoding=encoding)
        return datasets.Dataset.from_pandas(frame, preserve_index=False)
    if fmt == 'parquet':
        return datasets.load_dataset(fmt, data_files=path, split='train')
    _check_encoding(path, encoding)
    kwargs = dict(converters={text_field: str}) if fmt == 'csv' else {}
    return datasets.load_dataset(fmt, data_files=path, split='train', encoding=encoding,
                                 **kwargs)


def _read_hub(spec: Spec):
    try:
        return datasets.load_dataset(spec.location, spec.subset, split=spec.split,
                                     revision=spec.revision)
    except ConnectionError as e:
        raise ValueError(
            f'dataset {spec.name!r}: the hub dataset {spec.location!r} (subset={spec.subset}, '
            f'split={spec.split}) cannot be reached and is not cached ({e}). Offline, export '
            f'it to a local csv/parquet/jsonl file and pass path= instead.') from e


# ---------------------------------------------------------------------------------------
# Labels.
# ---------------------------------------------------------------------------------------
def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def encode_labels(values: Sequence[Any], *, name: str, class_names: Sequence[str] | None = None,
                  max_classes: int = MAX_CLASSES, check_continuous: bool = True,
                  ) -> tuple[np.ndarray, list[str]]:
    """Encodes label values as sorted unique value -> 0..C-1.

    Args:
      values: N non-missing labels (str, int, float or bool).
      name: dataset name, for errors.
      class_names: names of integer codes (a hub ClassLabel), used for `label_names`.
      max_classes: more distinct values than this is refused.
      check_continuous: refuse numeric targets that look continuous (regression).
    Returns:
      int64[N] labels and C label names.
    """
    vals = list(values)
    numeric = all(isinstance(v, numbers.Number) for v in vals)
    if numeric:
        arr = np.asarray(vals)
        if arr.dtype.kind == 'f' and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)  # 1.0/0.0 (csv column that held NaNs) -> 1/0
        uniq = np.unique(arr)
        fractional = arr.dtype.kind == 'f'
        if check_continuous and (len(uniq) > max_classes
                                 or (fractional and len(uniq) > _MAX_FRACTIONAL_CLASSES)):
            raise ValueError(
                f'dataset {name!r}: the label is a continuous (regression) target '
                f'({len(uniq)} distinct {"fractional " if fractional else ""}numeric values '
                f'over {len(arr)} rows, e.g. {uniq[:4].tolist()}); only classification is '
                f'supported')
    else:
        # Mixed or string labels compare as strings so sorting is well defined.
        arr = np.asarray([v if isinstance(v, str) else str(v) for v in vals], dtype=object)
        uniq = np.asarray(sorted(set(arr.tolist())), dtype=object)
    if len(uniq) > max_classes:
        raise ValueError(f'dataset {name!r}: {len(uniq)} distinct labels over {len(arr)} rows '
                         f'exceeds max_classes={max_classes}; is label_field a text/id column?')
    if len(uniq) < 2:
        raise ValueError(f'dataset {name!r}: needs at least 2 classes, found {uniq.tolist()}')
    codes = np.searchsorted(uniq, arr).astype(np.int64)
    if class_names is not None:
        names = [str(class_names[int(u)]) for u in uniq]
    else:
        names = [str(u.item() if hasattr(u, 'item') else u) for u in uniq]
    return codes, names


def _stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted int64[n] row indices, stratified by `labels` when every class allows it."""
    idx = np.arange(len(labels))
    try:
        keep, _ = train_test_split(idx, train_size=n, stratify=labels, random_state=seed)
    except ValueError as e:  # a class with one member, or fewer rows than classes
        logging.warning('max_rows=%d: stratified subsample impossible (%s); sampling uniformly',
                        n, e)
        keep, _ = train_test_split(idx, train_size=n, random_state=seed)
    return np.sort(keep).astype(np.int64)


def _dedupe(texts: list[str], labels: list[Any]) -> tuple[list[str], list[Any]]:
    """Keeps the first row of each text; drops texts that occur with different labels.

    The sae-probes sets repeat texts (95_toxic_is: 728 rows, 584 distinct texts, 3 with both
    labels), so a random split can put one copy in train and another in test.
    """
    seen: dict[str, set] = {}
    for t, y in zip(texts, labels):
        seen.setdefault(t, set()).add(y)
    kept, out_t, out_y = set(), [], []
    for t, y in zip(texts, labels):
        if len(seen[t]) == 1 and t not in kept:
            kept.add(t)
            out_t.append(t)
            out_y.append(y)
    return out_t, out_y


# ---------------------------------------------------------------------------------------
# load.
# ---------------------------------------------------------------------------------------
def _table(s: Spec, check_continuous: bool = False):
    """(datasets.Dataset, source description, spec with its final name) of a spec."""
    if s.kind == 'sae_probes':
        path = _sae_probes_path(s.location)
        base = os.path.basename(path).removesuffix('.csv.zst')
        kind = _sae_probes_task_types().get(base, '')
        if check_continuous and kind == 'Continuous Data':
            raise ValueError(f'dataset {s.name!r}: sae-probes marks {base!r} as a continuous '
                             f'(regression) target; only classification is supported '
                             f"(task='classification' forces discrete classes)")
        table, source = _read_file(path, s.text_field), f'sae_probes:{path}'
        s = dataclasses.replace(s, name=base)
    elif s.kind == 'file':
        table, source = _read_file(s.location, s.text_field, s.encoding), f'file:{s.location}'
    else:
        table = _read_hub(s)
        source = f'hub:{s.location}' + (f'/{s.subset}' if s.subset else '') + (
            f'[{s.split}]' if s.split else '')
    if isinstance(table, datasets.DatasetDict):  # hub id without split=
        raise ValueError(f'dataset {s.name!r}: give split=, one of {list(table.keys())}')
    return table, source, s


def read_texts(spec: Any, *, text_field: str = 'prompt', label_field: str = 'target',
               encoding: str = 'utf-8') -> tuple[str, list[str], np.ndarray, list | None]:
    """What prediction reads: (name, texts, their row numbers in the file, raw labels or
    None when the label column is absent). Rows without a text are left out (counted in
    the log); nothing is deduplicated or subsampled."""
    s = resolve(spec, text_field=text_field, label_field=label_field, encoding=encoding)
    table, source, s = _table(s)
    if s.text_field not in table.column_names:
        raise ValueError(f'dataset {s.name!r} ({source}): no column {s.text_field!r}; columns '
                         f'present: {table.column_names}')
    raw = list(table[s.text_field])
    labels = list(table[s.label_field]) if s.label_field in table.column_names else None
    keep = [i for i, t in enumerate(raw) if not _is_missing(t) and str(t).strip()]
    if len(keep) < len(raw):
        logging.info('dataset %s: %d of %d rows have no text; left out', s.name,
                     len(raw) - len(keep), len(raw))
    return (s.name, [str(raw[i]) for i in keep], np.asarray(keep, np.int64),
            None if labels is None else [labels[i] for i in keep])


def load(spec: Any, *, text_field: str = 'prompt', label_field: str = 'target',
         max_rows: int = 0, seed: int = 0, group_field: str = '',
         encoding: str = 'utf-8') -> LabeledTexts:
    """Loads a dataset spec (see module docstring) as `LabeledTexts`.

    Keyword arguments are fallbacks for fields the spec leaves unset. Rows with an empty or
    missing text or label are dropped (count logged, kept in `num_dropped`), and with
    `dedupe=True` in the spec also repeated texts (see `_dedupe`; off by default, as in
    MOSAIC and sae-probes). `max_rows` > 0 keeps a stratified, seeded subsample in
    original order. `group_field` names a column kept as `LabeledTexts.groups`.
    """
    s = resolve(spec, text_field=text_field, label_field=label_field, max_rows=max_rows,
                seed=seed, encoding=encoding)
    check_continuous = s.task == 'auto'
    table, source, s = _table(s, check_continuous)
    if group_field and s.dedupe:
        raise ValueError(f'dataset {s.name!r}: dedupe=True and group_field cannot be combined '
                         '(splits keep copies together anyway: data.duplicates)')
    for field in (s.text_field, s.label_field) + ((group_field,) if group_field else ()):
        if field not in table.column_names:
            raise ValueError(f'dataset {s.name!r} ({source}): no column {field!r}; columns '
                             f'present: {table.column_names}')
    feature = table.features[s.label_field]
    class_names = getattr(feature, 'names', None)  # datasets.ClassLabel
    raw_texts, raw_labels = list(table[s.text_field]), list(table[s.label_field])
    raw_groups = list(table[group_field]) if group_field else [None] * len(raw_texts)

    texts, labels, groups = [], [], []
    for t, y, g in zip(raw_texts, raw_labels, raw_groups):
        if _is_missing(t) or _is_missing(y) or (group_field and _is_missing(g)):
            continue
        t = t if isinstance(t, str) else str(t)
        if not t.strip():
            continue
        texts.append(t)
        labels.append(y)
        groups.append(None if g is None else str(g))
    if s.dedupe:
        texts, labels = _dedupe(texts, labels)
    dropped = len(raw_texts) - len(texts)
    if dropped:
        logging.info('dataset %s: dropped %d of %d rows (empty/missing text or label%s)',
                     s.name, dropped, len(raw_texts), ', duplicates' if s.dedupe else '')
    codes, names = encode_labels(labels, name=s.name, class_names=class_names,
                                 max_classes=s.max_classes, check_continuous=check_continuous)
    out = LabeledTexts(texts=texts, labels=codes, label_names=names, name=s.name,
                       source=source, num_dropped=dropped,
                       groups=groups if group_field else None)
    if 0 < s.max_rows < len(out):
        out = out.subset(_stratified_subset(codes, s.max_rows, s.seed))
        present = np.unique(out.labels)
        if len(present) < len(names):  # a tiny class fell out: re-number the rest densely
            logging.warning('dataset %s: max_rows=%d lost classes %s', s.name, s.max_rows,
                            sorted(set(names) - {names[k] for k in present}))
            out = dataclasses.replace(out, labels=np.searchsorted(present, out.labels),
                                      label_names=[names[k] for k in present])
    return out
