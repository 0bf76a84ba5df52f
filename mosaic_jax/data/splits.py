"""Seeded, stratified, duplicate-safe train/val/test splits, rare-class handling and a CSV
audit of which row went where.

Repeated texts leak: with a per-row split, `sae_probes:95_toxic_is` (728 rows, 583 distinct
texts after normalisation) had 39 of its 146 test texts verbatim in train (seed 0). `split`
therefore groups rows by normalised text (`normalise_text`) and, by default, keeps every
copy of a text in one split.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Iterator, Sequence

from absl import logging
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from mosaic_jax.data import loading as data_loading

SPLIT_NAMES = ('train', 'val', 'test')
DROPPED = 'dropped'  # `split_rows`' split value for rows that are in no split


class Duplicates(str, enum.Enum):
    """What `split` does with rows whose normalised text occurs more than once."""
    GROUP = 'group'  # every copy of a text lands in the same split (default)
    DROP = 'drop'    # the first copy is split, the others are in no split
    KEEP = 'keep'    # rows are split independently: copies straddle splits (leaky)


def _parse_duplicates(value: str | Duplicates) -> Duplicates:
    try:
        return Duplicates(value)
    except ValueError:
        raise ValueError(f'duplicates={value!r}; valid: '
                         f'{[d.value for d in Duplicates]}') from None


def normalise_text(text: str) -> str:
    """The duplicate key: runs of whitespace collapsed to one space, ends stripped, casefolded."""
    return ' '.join(text.split()).casefold()


@dataclasses.dataclass(frozen=True)
class SplitAudit:
    """What `split` saw and did about repeated texts.

    mode: the `Duplicates` value applied ('keep' when no texts were given); texts_checked:
    whether texts were given (without them every count below is 0); n_rows: N;
    n_duplicate_rows: rows whose normalised text occurs at an earlier row;
    n_duplicate_groups: normalised texts occurring more than once; n_conflicting_groups:
    normalised texts occurring with more than one label; n_dropped: rows in no split.
    """
    mode: str
    texts_checked: bool
    n_rows: int
    n_duplicate_rows: int = 0
    n_duplicate_groups: int = 0
    n_conflicting_groups: int = 0
    n_dropped: int = 0


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value
class Split:
    """A train/val/test split of N rows.

    train, val, test, dropped: sorted int64 row indices; together they partition range(N)
    (`dropped` is empty unless duplicates='drop'). Unpacks and indexes like the tuple
    (train, val, test): `tr, va, te = s`, `s[0]`, `len(s) == 3`.
    """
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    dropped: np.ndarray
    audit: SplitAudit

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.train, self.val, self.test))

    def __getitem__(self, i: int) -> np.ndarray:
        return (self.train, self.val, self.test)[i]

    def __len__(self) -> int:
        return 3

    def assignment(self, n: int) -> list[str]:
        """Per row of range(n): 'train' | 'val' | 'test' | 'dropped'."""
        out = [''] * n
        for name, idx in zip(SPLIT_NAMES + (DROPPED,), (*self, self.dropped)):
            for i in idx:
                out[int(i)] = name
        if '' in out:
            raise ValueError(f'split covers {n - out.count("")} rows, not all {n}')
        return out


# ---------------------------------------------------------------------------------------
# Groups of repeated texts.
# ---------------------------------------------------------------------------------------
def _groups(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """int64[N] group id per row (numbered in order of first occurrence) and int64[G] the
    first row of each group."""
    ids: dict[str, int] = {}
    group = np.fromiter((ids.setdefault(normalise_text(t), len(ids)) for t in texts),
                        dtype=np.int64, count=len(texts))
    _, first = np.unique(group, return_index=True)
    return group, first.astype(np.int64)


def text_groups(texts: Sequence[str]) -> np.ndarray:
    """int64[N] id of each row's normalised text: copies share an id (for grouped CV)."""
    return _groups(texts)[0]


def grouped_folds(y: np.ndarray, rows: np.ndarray, groups: np.ndarray | None, k: int,
                  seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The one K-fold builder: (fit rows, score rows) pairs over `rows`, stratified by `y`,
    every copy of a text (same `groups` id, see `text_groups`) inside one fold.

    Args:
      y: int[N] labels of the whole dataset; rows: int[M] the rows to cut (never test rows).
      groups: int[N] text-copy ids, or None (every row its own group).
    """
    rows = np.sort(np.asarray(rows, np.int64))
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    yr, gr = np.asarray(y, np.int64)[rows], np.asarray(g, np.int64)[rows]
    # Every method of a dataset asks for the same folds; sklearn's greedy group assignment
    # takes ~0.2 s per call on a thousand rows, so equal inputs share one computation.
    cut = _fold_positions(rows.tobytes(), yr.tobytes(), gr.tobytes(), int(k), int(seed))
    return [(rows[a], rows[b]) for a, b in cut]


@functools.lru_cache(maxsize=32)
def _fold_positions(rows: bytes, y: bytes, groups: bytes, k: int, seed: int):
    """((fit positions, score positions), ...) of StratifiedGroupKFold on the int64 arrays
    given as bytes (hashable, so equal calls hit the cache); read-only arrays."""
    y_, g = np.frombuffer(y, np.int64), np.frombuffer(groups, np.int64)
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    out = []
    for a, b in folds.split(np.zeros(len(y_)), y_, g):
        a.flags.writeable = b.flags.writeable = False
        out.append((a, b))
    return tuple(out)


def _majority(labels: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
    """int64[G] most frequent label of each group (ties: the smallest label code)."""
    counts = np.zeros((num_groups, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (group, labels), 1)
    return counts.argmax(axis=1).astype(np.int64)  # argmax takes the first maximum


def _audit(mode: Duplicates, labels: np.ndarray, group: np.ndarray, first: np.ndarray,
           ) -> SplitAudit:
    n, num_groups = len(labels), len(first)
    sizes = np.bincount(group, minlength=num_groups)
    pairs = np.unique(np.stack([group, labels]), axis=1)  # distinct (group, label) pairs
    conflicting = int((np.bincount(pairs[0], minlength=num_groups) > 1).sum())
    return SplitAudit(mode=mode.value, texts_checked=True, n_rows=n,
                      n_duplicate_rows=n - num_groups,
                      n_duplicate_groups=int((sizes > 1).sum()),
                      n_conflicting_groups=conflicting,
                      n_dropped=n - num_groups if mode is Duplicates.DROP else 0)


def _units(labels: np.ndarray, texts: Sequence[str] | None, mode: Duplicates):
    """What `split` allocates: int64[U] stratification label and int64[U] row count per unit
    (a row for 'keep', a first copy for 'drop', a group of copies for 'group')."""
    if texts is None or mode is Duplicates.KEEP:
        return labels, np.ones(len(labels), dtype=np.int64)
    group, first = _groups(texts)
    if mode is Duplicates.DROP:
        return labels[first], np.ones(len(first), dtype=np.int64)
    return _majority(labels, group, len(first)), np.bincount(group, minlength=len(first))


def class_unit_counts(labels: np.ndarray, texts: Sequence[str] | None = None,
                      duplicates: str | Duplicates = Duplicates.GROUP) -> np.ndarray:
    """int64[C] per class the number of units `split` allocates (C = labels.max() + 1):
    rows for 'keep' (or texts=None), first copies for 'drop', distinct normalised texts
    counted under their majority label for 'group'."""
    labels = np.asarray(labels, dtype=np.int64)
    unit_labels, _ = _units(labels, texts, _parse_duplicates(duplicates))
    return np.bincount(unit_labels, minlength=int(labels.max()) + 1)


# ---------------------------------------------------------------------------------------
# Feasibility.
# ---------------------------------------------------------------------------------------
def min_class_count(fractions: Sequence[float] = (0.7, 0.1, 0.2)) -> int:
    """Units a class needs so that every split with a fraction > 0 can hold one of them."""
    return sum(1 for f in fractions if f > 0)


def _split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Rows (train, val, test) for N rows; validates `fractions`."""
    # isclose's default rel_tol=1e-9 forgives float rounding in e.g. 0.7 + 0.1 + 0.2.
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f'fractions={tuple(fractions)} must be 3 values >= 0 summing to 1')
    f_train, f_val, f_test = fractions
    if f_train <= 0 or f_test <= 0:
        raise ValueError(f'fractions={tuple(fractions)}: train and test must be > 0')
    # Row counts, not fractions, go to sklearn: 0.1 / 0.8 of 800 rows is 100 only in exact
    # arithmetic (sklearn's ceil of 100.00000000000001 would give 101).
    n_test = max(1, round(f_test * n))
    n_val = round(f_val * n)
    if n - n_test - n_val < 1:
        raise ValueError(f'fractions={tuple(fractions)} leave no training rows of {n}')
    return n - n_test - n_val, n_val, n_test


def _check_feasible(labels: np.ndarray, unit_labels: np.ndarray, sizes: Sequence[int],
                    class_names: Sequence[str] | None, grouped: bool) -> None:
    """Raises one ValueError naming every class with fewer units than non-empty splits, or
    a non-empty split with fewer rows than there are classes."""
    open_splits = [name for name, size in zip(SPLIT_NAMES, sizes) if size > 0]
    need = len(open_splits)
    rows = np.bincount(labels)
    units = np.bincount(unit_labels, minlength=len(rows))
    rare = [c for c in np.flatnonzero(rows) if units[c] < need]
    if rare:
        name = (lambda c: class_names[c]) if class_names is not None else int
        what = ' distinct texts' if grouped else ' rows'
        listed = ', '.join(f'{name(c)!r} with {rows[c]} rows'
                           + (f' ({units[c]} distinct texts)' if grouped else '')
                           for c in rare)
        raise ValueError(
            f'too few rows to appear in every split: class{"es" * (len(rare) > 1)} {listed}. '
            f'Each of {"/".join(open_splits)} needs at least one, so a class needs at least '
            f'{need}{what}. Pass data.drop_rare_classes=True to drop such classes (with a warning).')
    num_classes = int((rows > 0).sum())
    for name, size in zip(SPLIT_NAMES, sizes):
        if 0 < size < num_classes:
            raise ValueError(f'the {name} split gets {size} of {len(labels)} rows, fewer than '
                             f'the {num_classes} classes; raise its fraction or use more data')


# ---------------------------------------------------------------------------------------
# Row-level split (sklearn stratification, as before duplicates were handled).
# ---------------------------------------------------------------------------------------
def _swap_repair(parts: list[np.ndarray], labels: np.ndarray, need: Sequence[int],
                 rng: np.random.Generator) -> None:
    """Swaps rows between the two int arrays `parts` (in place, sizes kept) until part s
    holds >= need[s] rows of every class. Needs every class to have >= sum(need) rows and
    len(parts[s]) >= need[s] * C; a no-op when every part already holds enough."""
    num = int(labels.max()) + 1
    while True:  # each swap lowers the total shortfall by one and creates none
        counts = [np.bincount(labels[p], minlength=num) for p in parts]
        present = (counts[0] + counts[1]) > 0
        for s in (0, 1):
            lacking = np.flatnonzero(present & (counts[s] < need[s]))
            if lacking.size:
                break
        else:
            return
        c, d = int(lacking[0]), 1 - s
        u = rng.choice(np.flatnonzero(labels[parts[d]] == c))  # the donor has > need[d]
        spare = np.flatnonzero(counts[s] > need[s])
        v = rng.choice(np.flatnonzero(np.isin(labels[parts[s]], spare)))
        parts[d][u], parts[s][v] = parts[s][v], parts[d][u]


def _row_split(rows: np.ndarray, labels: np.ndarray, sizes: tuple[int, int, int],
               seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified split of `rows` (int64[M]) into (train, val, test) of `sizes` rows.

    Two sklearn stratified cuts (test, then val out of the rest), each followed by a swap
    repair so that every class has a row in every non-empty split.
    """
    _, n_val, n_test = sizes
    rng = np.random.default_rng(seed)
    rest, test = (np.asarray(a, dtype=np.int64) for a in train_test_split(
        rows, test_size=n_test, stratify=labels[rows], random_state=seed))
    parts = [rest, test]
    _swap_repair(parts, labels, (2 if n_val > 0 else 1, 1), rng)
    rest, test = parts
    if n_val <= 0:
        return rest, rest[:0], test
    train, val = (np.asarray(a, dtype=np.int64) for a in train_test_split(
        rest, test_size=n_val, stratify=labels[rest], random_state=seed))
    parts = [train, val]
    _swap_repair(parts, labels, (1, 1), rng)
    return parts[0], parts[1], test


# ---------------------------------------------------------------------------------------
# Group-level split.
# ---------------------------------------------------------------------------------------
def _move_repair(assign: np.ndarray, unit_labels: np.ndarray, unit_sizes: np.ndarray,
                 open_splits: np.ndarray, rng: np.random.Generator) -> None:
    """Moves units (in place) until every class has one in every open split: each move
    takes one of the smallest units of the class from the split holding most of them."""
    for c in np.unique(unit_labels):
        members = np.flatnonzero(unit_labels == c)
        while True:
            counts = np.bincount(assign[members], minlength=3)
            missing = np.flatnonzero(open_splits & (counts == 0))
            if not missing.size:
                break
            donor = int(counts.argmax())  # >= 2 units: the class has >= len(open) units
            held = members[assign[members] == donor]
            smallest = held[unit_sizes[held] == unit_sizes[held].min()]
            assign[rng.choice(smallest)] = missing[0]


def _group_assign(unit_labels: np.ndarray, unit_sizes: np.ndarray,
                  sizes: tuple[int, int, int], seed: int) -> np.ndarray:
    """int64[U] split (0 train, 1 val, 2 test) per unit (a group of rows).

    Per class, units in seeded random order, largest first, each go to the split whose
    share of the class's rows is furthest below its target; then `_move_repair`.
    """
    rng = np.random.default_rng(seed)
    open_splits = np.asarray(sizes) > 0
    share = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    assign = np.zeros(len(unit_labels), dtype=np.int64)
    for c in np.unique(unit_labels):
        members = np.flatnonzero(unit_labels == c)
        members = members[rng.permutation(len(members))]
        members = members[np.argsort(-unit_sizes[members], kind='stable')]
        target = unit_sizes[members].sum() * share
        filled = np.zeros(3)
        for u in members:
            s = int(np.argmax(np.where(open_splits, target - filled, -np.inf)))
            assign[u] = s
            filled[s] += unit_sizes[u]
    _move_repair(assign, unit_labels, unit_sizes, open_splits, rng)
    return assign


# ---------------------------------------------------------------------------------------
# split.
# ---------------------------------------------------------------------------------------
def split(labels: np.ndarray, seed: int, fractions: Sequence[float] = (0.7, 0.1, 0.2), *,
          texts: Sequence[str] | None = None, duplicates: str | Duplicates = Duplicates.GROUP,
          class_names: Sequence[str] | None = None) -> Split:
    """Stratified, seeded train/val/test split that keeps repeated texts together.

    Args:
      labels: int[N] class labels, N >= 3.
      seed: same inputs and seed -> same split.
      fractions: (train, val, test), each >= 0, summing to 1; train and test > 0.
      texts: N texts; two rows are copies when their `normalise_text` agree. None: copies
        cannot be seen and the split is the per-row 'keep' split.
      duplicates: 'group' (default): all copies of a text go to one split, stratified by
        the group's majority label (ties: the smaller code), per-class proportions as close
        as the group sizes allow; 'drop': only the first copy is split, the others land in
        `Split.dropped`; 'keep': per-row split, copies may straddle splits (leaky: test
        texts can be in train verbatim).
      class_names: C names, for errors.
    Returns:
      `Split` with sorted int64 index arrays; train/val/test/dropped partition range(N).
      Without duplicates, every mode gives the per-row split (sklearn stratification).
    Raises:
      ValueError: bad fractions or duplicates value; a class with fewer rows (distinct
        texts for 'group') than non-empty splits; a split with fewer rows than classes.
    """
    labels = np.asarray(labels)
    mode = _parse_duplicates(duplicates)
    if labels.ndim != 1 or len(labels) < 3:
        raise ValueError(f'split needs int[N] labels with N >= 3, got shape {labels.shape}')
    n = len(labels)
    sizes = _split_sizes(n, fractions)
    labels = labels.astype(np.int64)
    if texts is None:
        audit = SplitAudit(mode=Duplicates.KEEP.value, texts_checked=False, n_rows=n)
        mode = Duplicates.KEEP
    else:
        if len(texts) != n:
            raise ValueError(f'{len(texts)} texts for {n} labels')
        group, first = _groups(texts)
        audit = _audit(mode, labels, group, first)
    dropped = np.zeros(0, dtype=np.int64)
    if mode is Duplicates.KEEP or audit.n_duplicate_rows == 0:
        _check_feasible(labels, labels, sizes, class_names, grouped=False)
        parts = _row_split(np.arange(n, dtype=np.int64), labels, sizes, seed)
    elif mode is Duplicates.DROP:
        sizes = _split_sizes(len(first), fractions)
        _check_feasible(labels[first], labels[first], sizes, class_names, grouped=False)
        parts = _row_split(first, labels, sizes, seed)
        dropped = np.setdiff1d(np.arange(n), first).astype(np.int64)
    else:
        unit_labels = _majority(labels, group, len(first))
        unit_sizes = np.bincount(group, minlength=len(first))
        _check_feasible(labels, unit_labels, sizes, class_names, grouped=True)
        row_split = _group_assign(unit_labels, unit_sizes, sizes, seed)[group]
        parts = tuple(np.flatnonzero(row_split == s).astype(np.int64) for s in range(3))
    if audit.n_duplicate_rows:
        logging.info('split: %s', audit)
    train, val, test = (np.sort(p).astype(np.int64) for p in parts)
    return Split(train=train, val=val, test=test, dropped=dropped, audit=audit)


# ---------------------------------------------------------------------------------------
# Rare classes and the audit file.
# ---------------------------------------------------------------------------------------
def drop_rare_classes(ds: data_loading.LabeledTexts, min_count: int, *,
                      duplicates: str | Duplicates = Duplicates.GROUP,
                      ) -> tuple[data_loading.LabeledTexts, list[str]]:
    """Removes the rows of classes with fewer than `min_count` units (see
    `class_unit_counts`; `min_class_count(fractions)` is what `split` needs) and
    re-encodes the remaining labels densely as 0..C'-1 in their old order.

    Returns the reduced dataset (label_names updated, rows in original order, num_dropped
    unchanged) and the dropped class names (empty: `ds` itself). Raises ValueError when
    fewer than 2 classes would remain.
    """
    counts = class_unit_counts(ds.labels, ds.texts, duplicates)
    counts = np.pad(counts, (0, max(0, ds.num_classes - len(counts))))
    rare = [c for c in range(ds.num_classes) if counts[c] < min_count]  # 0 rows: rare too
    if not rare:
        return ds, []
    keep = np.setdiff1d(np.arange(ds.num_classes), rare)
    dropped = [ds.label_names[c] for c in rare]
    if len(keep) < 2:
        raise ValueError(f'dataset {ds.name!r}: dropping classes {dropped} (fewer than '
                         f'{min_count} each) leaves {len(keep)} of {ds.num_classes} classes; '
                         f'a classifier needs 2')
    out = ds.subset(np.flatnonzero(np.isin(ds.labels, keep)))
    out = dataclasses.replace(out, labels=np.searchsorted(keep, out.labels).astype(np.int64),
                              label_names=[ds.label_names[c] for c in keep])
    # Dropping rows can shift a mixed-label group's majority: repeat until nothing is rare.
    out, more = drop_rare_classes(out, min_count, duplicates=duplicates)
    return out, dropped + more


SPLIT_FIELDS = ('index', 'split', 'label', 'text')  # the audit CSV's columns


def split_rows(split: Split, labels: np.ndarray, texts: Sequence[str],
               label_names: Sequence[str]) -> list[dict]:
    """One audit row per input row, in index order (`results.write_csv` writes them).

    Columns (`SPLIT_FIELDS`): index (row in `texts`), split ('train' | 'val' | 'test', or
    'dropped' for rows in no split, so the file accounts for every row), label (its name),
    text (quoted by the csv module when it holds commas, quotes or newlines). Read the file
    back with `pd.read_csv(path, dtype=str, keep_default_na=False)` or `csv.DictReader`.
    """
    labels = np.asarray(labels)
    if len(labels) != len(texts):
        raise ValueError(f'{len(texts)} texts for {len(labels)} labels')
    where = split.assignment(len(texts))
    return [dict(index=i, split=name, label=label_names[int(y)], text=t)
            for i, (name, y, t) in enumerate(zip(where, labels, texts))]
