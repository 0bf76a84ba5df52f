"""splits.py: stratified, seeded, duplicate-safe splits, rare classes, the split CSV."""
import csv

import numpy as np
import pandas as pd
import pytest

from mosaic_jax import results
from mosaic_jax.data import loading as data_loading
from mosaic_jax.data import splits


def _split_of_each_key(s, texts):
    """normalised text -> set of split numbers (0 train, 1 val, 2 test) holding a copy."""
    out = {}
    for part, idx in enumerate(s):
        for i in idx:
            out.setdefault(splits.normalise_text(texts[i]), set()).add(part)
    return out


def _test_texts_in_train(s, texts):
    train = {splits.normalise_text(texts[i]) for i in s.train}
    return sum(splits.normalise_text(texts[i]) in train for i in s.test)


def _planted(seed=0, n_unique=240):
    """3 balanced classes; every 4th text has 1-3 extra copies that differ only in
    whitespace or case. Returns (texts, int64 labels), rows shuffled."""
    rng = np.random.default_rng(seed)
    variants = (str.upper, lambda t: '  ' + t.replace(' ', ' \t ') + '\n', str.title)
    texts, labels = [], []
    for i in range(n_unique):
        base = f'planted sentence {i} about topic {i % 7}'
        copies = [base] + [variants[k](base) for k in range(int(rng.integers(1, 4)))
                           if i % 4 == 0]
        texts += copies
        labels += [i % 3] * len(copies)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], np.asarray(labels, dtype=np.int64)[order]


def _assert_partition(s, n):
    rows = np.concatenate([s.train, s.val, s.test, s.dropped])
    assert sorted(rows.tolist()) == list(range(n))
    for idx in (*s, s.dropped):
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, no repeats


# ----------------------------------------------------------------------------- moved
def test_split_stratified_deterministic_disjoint_complete():
    labels = np.repeat(np.arange(3), [500, 300, 200])
    tr, va, te = splits.split(labels, seed=0)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(1000))
    assert (len(tr), len(va), len(te)) == (700, 100, 200)
    for idx, frac in ((tr, 0.7), (va, 0.1), (te, 0.2)):
        # Stratified: each class gets its share of every split, up to rounding (1 row).
        np.testing.assert_allclose(np.bincount(labels[idx], minlength=3),
                                   frac * np.array([500, 300, 200]), atol=1)
    again = splits.split(labels, seed=0)
    other = splits.split(labels, seed=1)
    for x, y in zip((tr, va, te), again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(te, other[2])


def test_split_tiny_class_raises_instead_of_falling_back():
    # Was: class 2 (one member) silently made the split unstratified, with a warning.
    labels = np.array([0] * 20 + [1] * 20 + [2])
    with pytest.raises(ValueError, match=r"class 2 with 1 rows.*data.drop_rare_classes=True"):
        splits.split(labels, seed=0)
    tr, va, te = splits.split(labels[:40], seed=0)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(40))
    with pytest.raises(ValueError, match='summing to 1'):
        splits.split(labels, 0, fractions=(0.5, 0.1, 0.1))


# ----------------------------------------------------------------------------- duplicates
def test_planted_duplicates_never_straddle_splits():
    texts, labels = _planted()
    n_unique = len({splits.normalise_text(t) for t in texts})
    assert n_unique == 240 and len(texts) > 300  # the variants normalise to their base
    straddled = 0
    for seed in range(5):
        s = splits.split(labels, seed, texts=texts)  # duplicates='group' is the default
        _assert_partition(s, len(texts))
        assert all(len(parts) == 1 for parts in _split_of_each_key(s, texts).values())
        assert _test_texts_in_train(s, texts) == 0
        leaky = splits.split(labels, seed, texts=texts, duplicates='keep')
        straddled += sum(len(p) > 1 for p in _split_of_each_key(leaky, texts).values())
    assert straddled > 0  # the per-row split does leak on this data


def test_real_toxic_is_has_no_test_text_in_train_when_grouped():
    d = data_loading.load('sae_probes:95_toxic_is', seed=0)
    grouped = splits.split(d.labels, 0, texts=d.texts, duplicates='group')
    keep = splits.split(d.labels, 0, texts=d.texts, duplicates='keep')
    assert _test_texts_in_train(grouped, d.texts) == 0
    assert _test_texts_in_train(keep, d.texts) > 0  # measured 39 of 146 (seed 0)
    # Measured on the collection's file: 583 distinct normalised texts in 728 rows, 113 of
    # them repeated, 3 with both labels.
    a = grouped.audit
    assert (a.n_rows, a.n_duplicate_rows, a.n_duplicate_groups, a.n_conflicting_groups,
            a.n_dropped) == (728, 145, 113, 3, 0)
    # 'keep' is the per-row split the texts do not influence.
    for x, y in zip(keep, splits.split(d.labels, 0)):
        np.testing.assert_array_equal(x, y)


def test_drop_keeps_the_first_copy_only():
    texts, labels = _planted(seed=1)
    s = splits.split(labels, 0, texts=texts, duplicates='drop')
    _assert_partition(s, len(texts))
    kept = np.concatenate(list(s))
    keys = [splits.normalise_text(t) for t in texts]
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    assert sorted(kept.tolist()) == sorted(first.values())  # one copy each: the first
    assert s.audit.n_dropped == len(s.dropped) == len(texts) - len(first)
    assert _test_texts_in_train(s, texts) == 0


def test_conflicting_labels_are_counted():
    filler = [f'filler text {i}' for i in range(60)]
    texts = ['a b', 'A  b', 'same', 'Same', 'c', ' c', 'C\n'] + filler
    labels = np.asarray([0, 1, 1, 1, 0, 0, 1] + [i % 2 for i in range(60)])
    for mode in ('group', 'keep', 'drop'):
        a = splits.split(labels, 0, texts=texts, duplicates=mode).audit
        # 'a b' (labels 0, 1) and 'c' (0, 0, 1) conflict; 'same' (1, 1) does not.
        assert (a.n_duplicate_rows, a.n_duplicate_groups, a.n_conflicting_groups) == (4, 3, 2)
        assert a.mode == mode and a.texts_checked
    s = splits.split(labels, 0, texts=texts)
    assert len(_split_of_each_key(s, texts)['c']) == 1
    assert not splits.split(labels, 0).audit.texts_checked  # texts=None: nothing to count


def test_no_duplicates_every_mode_is_the_per_row_split():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    texts = [f'unique text {i}' for i in range(100)]
    base = splits.split(labels, 3)
    for mode in ('group', 'drop', 'keep'):
        s = splits.split(labels, 3, texts=texts, duplicates=mode)
        for x, y in zip(s, base):
            np.testing.assert_array_equal(x, y)
        assert s.audit.n_duplicate_rows == 0 and len(s.dropped) == 0


def test_bad_duplicates_value_lists_valid_values():
    valid = r"duplicates='dedupe'; valid: \['group', 'drop', 'keep'\]"
    with pytest.raises(ValueError, match=valid):
        splits.split(np.array([0, 1] * 10), 0, texts=['x'] * 20, duplicates='dedupe')
    with pytest.raises(ValueError, match='3 texts for 20 labels'):
        splits.split(np.array([0, 1] * 10), 0, texts=['x', 'y', 'z'])
    assert splits.split(np.array([0, 1] * 10), 0, duplicates=splits.Duplicates.KEEP)


def test_split_is_deterministic_per_seed_and_unpacks_like_a_tuple():
    texts, labels = _planted(seed=2)
    for mode in ('group', 'drop', 'keep'):
        a = splits.split(labels, 7, texts=texts, duplicates=mode)
        b = splits.split(labels, 7, texts=texts, duplicates=mode)
        c = splits.split(labels, 8, texts=texts, duplicates=mode)
        for x, y in zip((*a, a.dropped), (*b, b.dropped)):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(a.test, c.test), mode
    tr, va, te = a
    assert tr is a[0] is a.train and te is a[2] and len(a) == 3


def test_grouped_split_roughly_respects_fractions_per_class():
    texts, labels = _planted(seed=3, n_unique=600)
    n = len(texts)
    for fractions in ((0.7, 0.1, 0.2), (0.6, 0.2, 0.2), (0.8, 0.0, 0.2)):
        s = splits.split(labels, 0, fractions, texts=texts)
        for idx, frac in zip(s, fractions):
            # Groups hold up to 4 rows, so a split's size can miss its share by a few rows
            # per class; 2% of ~800 rows (16) is well above that and far below a bad split.
            assert abs(len(idx) - frac * n) <= 0.02 * n, fractions
            want = frac * np.bincount(labels, minlength=3)
            # Same slack per class (~270 rows each): 3% of a class is ~8 rows.
            np.testing.assert_allclose(np.bincount(labels[idx], minlength=3), want,
                                       atol=0.03 * n / 3)


# ----------------------------------------------------------------------------- rare classes
def test_every_class_reaches_every_split():
    labels = np.array([0] * 500 + [1] * 497 + [2] * 3)  # the old split left val without 2
    for seed in range(5):
        for s in (splits.split(labels, seed),
                  splits.split(labels, seed, texts=[f't{i}' for i in range(1000)])):
            assert all(np.bincount(labels[idx], minlength=3).min() >= 1 for idx in s)
            assert [len(idx) for idx in s] == [700, 100, 200]  # swaps keep the sizes
    # 'group': a class with 3 distinct texts (9 rows) also reaches every split.
    texts = [f'big {i}' for i in range(200)] + [f'rare {i % 3}' for i in range(9)]
    labels = np.array([0] * 200 + [1] * 9)
    for seed in range(5):
        s = splits.split(labels, seed, texts=texts)
        assert all(np.bincount(labels[idx], minlength=2).min() >= 1 for idx in s)


def test_two_row_class_raises_a_clear_error():
    labels = np.array([0] * 30 + [1] * 30 + [2] * 2)
    names = ['neg', 'pos', 'rare one']
    with pytest.raises(ValueError) as err:
        splits.split(labels, 0, class_names=names)
    msg = str(err.value)
    assert "'rare one' with 2 rows" in msg and 'data.drop_rare_classes=True' in msg
    assert 'train/val/test' in msg and 'at least 3' in msg
    # Without a validation split two rows are enough.
    assert splits.min_class_count((0.8, 0.0, 0.2)) == 2
    assert len(splits.split(labels, 0, (0.8, 0.0, 0.2)).val) == 0
    # 'group' counts distinct texts: 6 rows but only 2 texts cannot fill 3 splits.
    texts = [f'text {i}' for i in range(60)] + ['x', 'y', 'x', 'y', 'X', 'y ']
    labels = np.array([0] * 30 + [1] * 30 + [2] * 6)
    with pytest.raises(ValueError, match=r"'rare one' with 6 rows \(2 distinct texts\)"):
        splits.split(labels, 0, texts=texts, class_names=names)
    assert len(splits.split(labels, 0, texts=texts, duplicates='keep').test) > 0
    with pytest.raises(ValueError, match='val split gets 3 of 30 rows, fewer than the 10'):
        splits.split(np.repeat(np.arange(10), 3), 0)


def _labeled(texts, labels, names):
    return data_loading.LabeledTexts(texts=list(texts), labels=np.asarray(labels, dtype=np.int64),
                                     label_names=list(names), name='toy', source='test')


def test_drop_rare_classes_relabels():
    labels = [0] * 10 + [1] * 2 + [2] * 10 + [3] * 5
    texts = [f'row {i}' for i in range(22)] + ['dup'] * 5  # class 'd': 5 copies of one text
    ds = _labeled(texts, labels, ['a', 'b', 'c', 'd'])
    out, dropped = splits.drop_rare_classes(ds, splits.min_class_count())
    assert dropped == ['b', 'd']  # 'd' has 5 rows but 1 distinct text
    assert out.label_names == ['a', 'c'] and out.labels.dtype == np.int64
    assert out.labels.tolist() == [0] * 10 + [1] * 10
    assert out.texts == texts[:10] + texts[12:22]  # original order
    assert len(splits.split(out.labels, 0, texts=out.texts).test) > 0
    kept, dropped = splits.drop_rare_classes(ds, 3, duplicates='keep')  # counts rows
    assert dropped == ['b'] and kept.label_names == ['a', 'c', 'd']
    assert kept.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 5
    same, none = splits.drop_rare_classes(ds, 2, duplicates='keep')
    assert same is ds and none == []
    with pytest.raises(ValueError, match='leaves 0 of 4 classes'):
        splits.drop_rare_classes(ds, 11)


# ----------------------------------------------------------------------------- audit file
def test_split_csv_round_trips_tricky_texts(tmp_path):
    tricky = ['comma, inside', 'quote " inside', '"fully quoted"', 'new\nline',
              'crlf\r\nline', '  leading and trailing  ', 'NA', '1.50', 'ünïcode ✓',
              'tab\tseparated', "single ' quote", 'semi;colon']
    texts = tricky + [f'filler {i}' for i in range(48)] + ['filler 0', 'FILLER 1']
    labels = np.array([i % 2 for i in range(60)] + [0, 1])
    names = ['neg, really', 'pos "quoted"']
    s = splits.split(labels, 0, texts=texts, duplicates='drop')
    assert len(s.dropped) == 2
    path = str(tmp_path / 'sub' / 'split.csv')
    results.write_csv(path, splits.split_rows(s, labels, texts, names), splits.SPLIT_FIELDS)
    want_split = s.assignment(len(texts))
    assert want_split.count('dropped') == 2
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(frame.columns) == ['index', 'split', 'label', 'text']
    assert frame['index'].tolist() == [str(i) for i in range(len(texts))]
    assert frame['text'].tolist() == texts
    assert frame['split'].tolist() == want_split
    assert frame['label'].tolist() == [names[y] for y in labels]
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['text'] for r in rows] == texts
    assert {r['split'] for r in rows} == {'train', 'val', 'test', 'dropped'}


def test_grouped_folds_keep_copies_in_one_fold_and_stay_inside_rows():
    r = np.random.default_rng(0)
    texts = [f't{int(i)}' for i in r.integers(0, 60, 300)]   # many repeated texts
    y = np.asarray([int(t[1:]) % 3 for t in texts])           # a copy's label is its text's
    groups = splits.text_groups(texts)
    rows = np.arange(0, 300, 1)[r.uniform(size=300) < 0.8]    # e.g. train + val only
    folds = splits.grouped_folds(y, rows, groups, 5, seed=1)
    assert len(folds) == 5
    seen = np.concatenate([b for _, b in folds])
    np.testing.assert_array_equal(np.sort(seen), np.sort(rows))  # each row scored once
    for fit, score in folds:
        assert not set(groups[fit]) & set(groups[score])  # no text on both sides
        assert set(fit) | set(score) == set(rows)
    again = splits.grouped_folds(y, rows, groups, 5, seed=1)
    assert all((a == c).all() and (b == d).all() for (a, b), (c, d) in zip(folds, again))
