"""data.loading + data.batching: dataset specs and loading, label encoding, tokenisation, batches (splits:
test_splits.py)."""
import os

import numpy as np
import pandas as pd
import pytest

from mosaic_jax.data import batching
from mosaic_jax.data import loading as data_loading


def _sae_probes_frame(name):
    return pd.read_csv(os.path.join(data_loading.sae_probes_dir(), name + '.csv.zst'),
                       compression='zstd')


# ----------------------------------------------------------------------------- loading
def test_sae_probes_toxic_is_real():
    d = data_loading.load('sae_probes:95_toxic_is')
    raw = _sae_probes_frame('95_toxic_is')
    assert (d.name, len(d), d.num_dropped) == ('95_toxic_is', 728, 0)
    assert d.label_names == ['0', '1']
    assert d.labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(d.labels), [364, 364])
    assert d.texts == raw['prompt'].tolist()
    np.testing.assert_array_equal(d.labels, raw['target'].to_numpy())  # 0/1 keep their codes
    assert d.source.startswith('sae_probes:') and d.source.endswith('95_toxic_is.csv.zst')


def test_sae_probes_multiclass_string_targets_encoded_sorted_and_deterministic():
    d = data_loading.load('sae_probes:102_twt_emotion')
    raw = _sae_probes_frame('102_twt_emotion')
    assert d.num_classes == 4 and len(d) == 5000
    assert d.label_names == sorted(raw['target'].unique())
    # Decoding the codes gives back every original string label, row by row.
    assert [d.label_names[k] for k in d.labels] == raw['target'].tolist()
    again = data_loading.load('twt_emotion')  # registry alias, same file
    assert again.texts == d.texts and again.label_names == d.label_names
    np.testing.assert_array_equal(again.labels, d.labels)


def test_sae_probes_name_without_number_and_unknown_name():
    assert data_loading.load('sae_probes:toxic_is').name == '95_toxic_is'
    with pytest.raises(ValueError, match=r"unknown sae-probes dataset 'toxic'.*95_toxic_is"):
        data_loading.load('sae_probes:toxic')


def test_sae_probes_continuous_target_refused():
    # 93_glue_stsb: similarity scores 0..5, annotated 'Continuous Data' by the collection.
    with pytest.raises(ValueError, match='continuous .regression. target'):
        data_loading.load('sae_probes:93_glue_stsb')
    # 25_headline_year is annotated continuous but has 11 years; classification on request.
    d = data_loading.load({'name': 'sae_probes:25_headline_year', 'task': 'classification'})
    assert d.label_names == [str(y) for y in range(2010, 2021)]


def _write_all_formats(frame, folder):
    paths = {'csv': str(folder / 'rows.csv'), 'parquet': str(folder / 'rows.parquet'),
             'jsonl': str(folder / 'rows.jsonl'), 'csv.zst': str(folder / 'rows.csv.zst')}
    frame.to_csv(paths['csv'], index=False)
    frame.to_parquet(paths['parquet'], index=False)
    frame.to_json(paths['jsonl'], orient='records', lines=True)
    frame.to_csv(paths['csv.zst'], index=False, compression='zstd')
    return paths


def test_local_files_in_every_format_load_identically(tmp_path):
    frame = pd.DataFrame({
        'text': ['good movie', '1.50', '', 'terrible plot', 'fine', 'awful', None, 'great'],
        'y': [2, 1, 1, 0, 1, 0, 2, None],
        'extra': range(8),
    })
    paths = _write_all_formats(frame, tmp_path)
    loaded = {fmt: data_loading.load({'path': p, 'text_field': 'text', 'label_field': 'y'})
              for fmt, p in paths.items()}
    want_texts = ['good movie', '1.50', 'terrible plot', 'fine', 'awful']
    for fmt, d in loaded.items():
        # '' and None texts and the None label are dropped; '1.50' stays text in every format.
        assert d.texts == want_texts, fmt
        np.testing.assert_array_equal(d.labels, [2, 1, 0, 1, 0], err_msg=fmt)
        assert d.labels.dtype == np.int64
        assert (d.label_names, d.num_dropped, d.name) == (['0', '1', '2'], 3, 'rows'), fmt
    # The config's fallback fields reach a bare path spec too.
    via_str = data_loading.load(paths['parquet'], text_field='text', label_field='y')
    assert via_str.texts == want_texts and via_str.source == 'file:' + paths['parquet']


def test_missing_column_error_names_file_column_and_columns(tmp_path):
    path = str(tmp_path / 'rows.csv')
    pd.DataFrame({'sentence': ['a', 'b'], 'label': [0, 1]}).to_csv(path, index=False)
    with pytest.raises(ValueError) as err:
        data_loading.load({'path': path, 'text_field': 'text', 'label_field': 'label'})
    msg = str(err.value)
    assert path in msg and "'text'" in msg and "['sentence', 'label']" in msg


def test_local_float_targets_refused_as_regression(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / 'scores.csv')
    pd.DataFrame({'prompt': [f'text {i}' for i in range(50)],
                  'target': rng.uniform(0, 5, 50)}).to_csv(path, index=False)
    with pytest.raises(ValueError, match='continuous .regression. target'):
        data_loading.load(path)


def test_label_checks():
    with pytest.raises(ValueError, match='at least 2 classes'):
        data_loading.encode_labels(['a', 'a'], name='x')
    with pytest.raises(ValueError, match='exceeds max_classes'):
        data_loading.encode_labels([f'id{i}' for i in range(101)], name='x')
    with pytest.raises(ValueError, match='regression'):
        data_loading.encode_labels(list(range(101)), name='x')  # 101 distinct integers
    # A few fractional values are class codes; float 0.0/1.0 are the integers 0/1.
    codes, names = data_loading.encode_labels([0.5, 1.5, 0.5], name='x')
    assert codes.tolist() == [0, 1, 0] and names == ['0.5', '1.5']
    codes, names = data_loading.encode_labels([1.0, 0.0], name='x')
    assert codes.tolist() == [1, 0] and names == ['0', '1']
    codes, names = data_loading.encode_labels([2, 0], name='x', class_names=['neg', 'neu', 'pos'])
    assert codes.tolist() == [1, 0] and names == ['neg', 'pos']


def test_max_rows_is_stratified_and_seeded():
    full = data_loading.load('toxic_is')
    a = data_loading.load('toxic_is', max_rows=100, seed=0)
    b = data_loading.load({'name': 'toxic_is', 'max_rows': 100, 'seed': 0})
    c = data_loading.load('toxic_is', max_rows=100, seed=1)
    assert len(a) == 100 and a.texts == b.texts
    np.testing.assert_array_equal(np.bincount(a.labels), [50, 50])  # 364/364 -> 50/50
    assert a.texts != c.texts
    # Kept rows are a subsequence of the full data, in order, each with its own label
    # (texts alone are not keys: 95_toxic_is repeats some texts with both labels).
    full_rows = iter(zip(full.texts, full.labels.tolist()))
    assert all(row in full_rows for row in zip(a.texts, a.labels.tolist()))


def test_dedupe_drops_repeats_and_conflicting_texts(tmp_path):
    path = str(tmp_path / 'dups.jsonl')
    pd.DataFrame({'prompt': ['a', 'b', 'a', 'c', 'b', 'd'],
                  'target': [0, 1, 0, 1, 0, 0]}).to_json(path, orient='records', lines=True)
    d = data_loading.load({'path': path, 'dedupe': True})
    # 'a' twice with label 0 -> kept once; 'b' with labels 1 and 0 -> ambiguous, dropped.
    assert (d.texts, d.labels.tolist(), d.num_dropped) == (['a', 'c', 'd'], [0, 1, 0], 3)
    assert len(data_loading.load(path)) == 6  # off by default
    real = data_loading.load({'name': 'sae_probes:95_toxic_is', 'dedupe': True})
    assert len(real) == len(set(real.texts)) == 584 - 3  # measured: 3 texts carry both labels


def test_spec_errors():
    with pytest.raises(ValueError, match=r"unknown dataset spec keys \['label'\]"):
        data_loading.load({'path': 'x.csv', 'label': 'y'})
    with pytest.raises(ValueError, match='unknown dataset'):
        data_loading.load('no_such_dataset')


def test_registry_entries_resolve():
    for lang in ('en', 'ru', 'uk', 'de', 'es', 'am', 'zh', 'ar', 'hi'):
        s = data_loading.resolve(f'multilingual_toxicity_{lang}')
        assert (s.location, s.split, s.text_field, s.label_field) == (
            'textdetox/multilingual_toxicity_dataset', lang, 'text', 'toxic')
    s = data_loading.resolve('Anthropic/election_questions')  # bare hub id known to the registry
    assert (s.kind, s.text_field, s.label_field, s.split) == ('hub', 'question', 'label', 'test')
    s = data_loading.resolve({'name': 'massive_intent_en-US', 'split': 'test'})  # override one key
    assert (s.location, s.subset, s.split, s.text_field) == (
        'AmazonScience/massive', 'en-US', 'test', 'utt')
    for name in data_loading.DATASETS:
        assert data_loading.resolve(name).kind in ('hub', 'sae_probes'), name


def test_hub_offline_error_is_clear():
    import huggingface_hub
    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip('needs HF_HUB_OFFLINE=1 (conftest) to fail fast instead of retrying')
    with pytest.raises(ValueError, match=r"Anthropic/election_questions.*local csv"):
        data_loading.load('election_questions')


# ----------------------------------------------------------------------------- tokens
@pytest.fixture(scope='module')
def tokenizer():
    """A real (tiny, word-level) HF fast tokenizer that, like Gemma's, adds BOS itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    import transformers
    words = 'the cat sat on a mat dog ran far away and then came back home again'.split()
    vocab = {'<pad>': 0, '<bos>': 1, '<unk>': 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single='<bos> $A',
                                                       special_tokens=[('<bos>', 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<bos>',
                                                pad_token='<pad>', unk_token='<unk>')


def test_tokenize_adds_one_bos_and_counts_truncation(tokenizer):
    assert tokenizer('the cat')['input_ids'] == [1, 3, 4]  # the tokenizer's own BOS
    ids, truncated = batching.tokenize(['the cat', 'the cat sat on a mat', 'dog zebra'],
                                       tokenizer, max_length=4)
    assert ids == [[1, 3, 4], [1, 3, 4, 5], [1, 9, 2]]  # one BOS; 'zebra' -> <unk>
    assert truncated == 1
    ids, truncated = batching.tokenize(['the cat'], tokenizer, max_length=8, add_bos=False)
    assert (ids, truncated) == ([[3, 4]], 0)


def _random_ids(n, seed=0, max_len=150):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, 100, size=rng.integers(1, max_len + 1))) for _ in range(n)]


@pytest.mark.parametrize('pad_side', ['right', 'left'])
def test_batches_cover_every_index_once_with_bucketed_static_shapes(pad_side):
    ids = _random_ids(53)
    out = list(batching.batches(ids, 8, pad_id=0, pad_side=pad_side, multiple_of=8))
    assert len(out) == 7  # ceil(53 / 8)
    seen = np.concatenate([b.index[b.valid] for b in out])
    assert sorted(seen.tolist()) == list(range(53))
    shapes = {b.input_ids.shape for b in out}
    assert {s[0] for s in shapes} == {8}  # static batch size, last batch included
    assert {s[1] for s in shapes} <= {32, 64, 128, 256}
    for b in out:
        assert b.input_ids.dtype == np.int32 and b.attention_mask.dtype == bool
        assert b.index.dtype == np.int64 and b.valid.dtype == bool
        longest = max(len(ids[i]) for i in b.index[b.valid])
        # Smallest bucket holding the longest member.
        assert b.input_ids.shape[1] == batching.bucket_length(longest)
        for row in range(8):
            if not b.valid[row]:
                assert b.index[row] == -1 and b.attention_mask[row].any()
                continue
            seq = ids[b.index[row]]
            n, length = len(seq), b.input_ids.shape[1]
            cols = slice(0, n) if pad_side == 'right' else slice(length - n, length)
            np.testing.assert_array_equal(b.input_ids[row, cols], seq)
            assert b.attention_mask[row].sum() == n and b.attention_mask[row, cols].all()
            assert (b.input_ids[row][~b.attention_mask[row]] == 0).all()
    last = out[-1]
    assert last.valid.sum() == 53 - 48 and not last.valid[5:].any()


def test_batches_fixed_length_and_argument_checks():
    ids = _random_ids(20, seed=1, max_len=40)
    out = list(batching.batches(ids, 4, pad_id=0, pad_batch_to=48))
    assert {b.input_ids.shape for b in out} == {(4, 48)}
    with pytest.raises(ValueError, match='multiple of multiple_of=8'):
        list(batching.batches(ids, 6, pad_id=0, multiple_of=8))
    with pytest.raises(ValueError, match='largest bucket'):
        list(batching.batches([[1] * 40], 2, pad_id=0, bucket_sizes=(16, 32)))
    with pytest.raises(ValueError, match='shorter than the longest'):
        list(batching.batches(ids, 4, pad_id=0, pad_batch_to=8))
    assert list(batching.batches([], 4, pad_id=0)) == []
