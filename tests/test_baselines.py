"""baselines.py: registry, TF-IDF on a real dataset, decision tree with top features."""
import numpy as np
import pytest
from sklearn.metrics import f1_score

from mosaic_jax.probing import baselines
from mosaic_jax.data import splits
from mosaic_jax.data import loading as data_loading


def test_unknown_baseline_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown baseline 'bow'.*'decision_tree', 'tfidf'"):
        baselines.get('bow')


def test_tfidf_on_real_toxic_is_beats_chance():
    d = data_loading.load('sae_probes:95_toxic_is')
    tr, va, te = splits.split(d.labels, seed=0)
    texts = lambda idx: [d.texts[i] for i in idx]
    out = baselines.run('tfidf', texts(tr), d.labels[tr], texts(te), texts(va),
                        num_classes=d.num_classes)
    assert out['proba'].shape == (len(te), 2) and out['proba_val'].shape == (len(va), 2)
    np.testing.assert_allclose(out['proba'].sum(1), 1.0, rtol=1e-6)  # f32 probabilities
    f1 = f1_score(d.labels[te], out['proba'].argmax(1), average='macro')
    # Balanced binary set: chance macro-F1 is ~0.5; measured 0.863 (seed 0). 0.75 leaves
    # room for scikit-learn version drift while still failing a broken pipeline.
    assert f1 > 0.75


def test_proba_columns_cover_classes_missing_from_training():
    x_train = ['red apple', 'green apple', 'blue sky', 'grey sky']
    out = baselines.run('tfidf', x_train, [0, 0, 2, 2], ['red sky'], num_classes=3,
                        stop_words=None)
    assert out['proba'].shape == (1, 3) and out['proba'][0, 1] == 0.0


def test_decision_tree_finds_the_informative_feature():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(300, 10)).astype(np.float32)
    y = (x[:, 3] > 0.5).astype(np.int64)  # only feature 3 carries the label
    names = [f'latent_{i}' for i in range(10)]
    out = baselines.run('decision_tree', x[:200], y[:200], x[200:], x[100:200],
                        feature_names=names, max_depth=3)
    # One threshold on feature 3 separates the classes exactly.
    np.testing.assert_array_equal(out['proba'].argmax(1), y[200:])
    assert out['proba_val'].shape == (100, 2)
    top = out['top_features']
    assert top[0]['index'] == 3 and top[0]['name'] == 'latent_3'
    assert top[0]['importance'] == pytest.approx(1.0)  # the only split used
    assert out['model'].get_depth() <= 3
    again = baselines.run('decision_tree', x[:200], y[:200], x[200:], feature_names=names,
                          max_depth=3)
    np.testing.assert_array_equal(again['proba'], out['proba'])  # seeded


def test_decision_tree_multiclass_top_features_sorted():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6))
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 5] > 0)  # 4 classes from features 0, 5
    out = baselines.run('decision_tree', x, y, x, top_k=2)
    top = out['top_features']
    assert {t['index'] for t in top} == {0, 5}
    assert top[0]['importance'] >= top[1]['importance']
    assert out['proba'].shape == (400, 4)


def test_tfidf_on_digit_and_stop_word_texts_falls_back_to_every_token():
    texts = [f'What is {a} + {b}?' for a in range(5) for b in range(5)]
    y = np.array([(a + b) % 2 for a in range(5) for b in range(5)])
    out = baselines.run('tfidf', texts, y, texts[:4], num_classes=2)
    assert out['proba'].shape == (4, 2)
    vocab = out['model'].steps[0][1].vocabulary_
    assert '3' in vocab and 'what' in vocab  # single characters and stop words kept
