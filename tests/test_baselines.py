"""probing.baselines: registry, TF-IDF on a real dataset, the decision tree (and its top
features as results.tree_block reports them)."""
import numpy as np
import scipy.sparse
import pytest
from sklearn.metrics import f1_score

from mosaic_jax import results
from mosaic_jax.data import loading as data_loading
from mosaic_jax.data import splits
from mosaic_jax.probing import baselines


def test_unknown_baseline_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown baseline 'bow'.*'decision_tree', 'pixels', 'tfidf'"):
        baselines.get('bow')


def test_pixels_on_real_digits_beats_chance():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)  # 8 x 8 ink levels, the scale downsampled_pixels gives
    tr, _, te = splits.split(y, seed=0)
    model = baselines.fit('pixels', x[tr], y[tr], num_classes=10, C=1.0)
    proba = baselines.predict_proba(model, x[te], 10)
    assert proba.shape == (len(te), 10) and proba.dtype == np.float32
    # Logistic regression on the digit scans is ~95% right; 0.8 leaves room for any seed.
    assert f1_score(y[te], proba.argmax(1), average='macro') > 0.8
    with pytest.raises(ValueError, match=r'x_train must be \[N, F\]'):
        baselines.fit('pixels', x[tr, :5].reshape(-1), y[tr])


def test_tfidf_on_real_toxic_is_beats_chance():
    d = data_loading.load('sae_probes:95_toxic_is')
    tr, _, te = splits.split(d.labels, seed=0)
    texts = lambda idx: [d.texts[i] for i in idx]  # noqa: E731
    model = baselines.fit('tfidf', texts(tr), d.labels[tr], num_classes=d.num_classes)
    proba = baselines.predict_proba(model, texts(te), d.num_classes)
    assert proba.shape == (len(te), 2) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    f1 = f1_score(d.labels[te], proba.argmax(1), average='macro')
    # Balanced binary set: chance macro-F1 is ~0.5; measured 0.863 (seed 0). 0.75 leaves
    # room for scikit-learn version drift while still failing a broken pipeline.
    assert f1 > 0.75


def test_proba_columns_cover_classes_missing_from_training():
    model = baselines.fit('tfidf', ['red apple', 'green apple', 'blue sky', 'grey sky'],
                          [0, 0, 2, 2], num_classes=3, stop_words=None)
    proba = baselines.predict_proba(model, ['red sky'], 3)
    assert proba.shape == (1, 3) and proba[0, 1] == 0.0


def test_decision_tree_finds_the_informative_feature():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(300, 10)).astype(np.float32)
    y = (x[:, 3] > 0.5).astype(np.int64)  # only feature 3 carries the label
    model = baselines.fit('decision_tree', x[:200], y[:200], max_depth=3)
    proba = baselines.predict_proba(model, x[200:], 2)
    # One threshold on feature 3 separates the classes exactly.
    np.testing.assert_array_equal(proba.argmax(1), y[200:])
    assert model.get_depth() <= 3
    top = results.tree_block(model, y[200:], proba.argmax(1), ['a', 'b'])
    top = top['feature_analysis']['top_features']
    assert top[0]['index'] == 3 and top[0]['score'] == pytest.approx(1.0)  # the only split
    again = baselines.fit('decision_tree', x[:200], y[:200], max_depth=3)
    np.testing.assert_array_equal(baselines.predict_proba(again, x[200:], 2), proba)  # seeded


def test_decision_tree_multiclass_top_features_sorted():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6))
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 5] > 0)  # 4 classes from features 0, 5
    model = baselines.fit('decision_tree', x, y)
    proba = baselines.predict_proba(model, x, 4)
    assert proba.shape == (400, 4)
    top = results.tree_block(model, y, proba.argmax(1), list('abcd'), top_k=2)
    top = top['feature_analysis']['top_features']
    assert {t['index'] for t in top} == {0, 5} and top[0]['score'] >= top[1]['score']


def test_tfidf_on_digit_and_stop_word_texts_falls_back_to_every_token():
    texts = [f'What is {a} + {b}?' for a in range(5) for b in range(5)]
    y = np.array([(a + b) % 2 for a in range(5) for b in range(5)])
    model = baselines.fit('tfidf', texts, y, num_classes=2)
    assert baselines.predict_proba(model, texts[:4], 2).shape == (4, 2)
    vocab = model.steps[0][1].vocabulary_
    assert '3' in vocab and 'what' in vocab  # single characters and stop words kept


def test_decision_tree_sparse_fit_equals_dense_fit():
    """Sparse inputs take sklearn's sparse splitter: the same tree as the dense one (real
    valued counts, so no two features tie on a split) and the same probabilities."""
    r = np.random.default_rng(3)
    x = ((r.random((300, 400)) < 0.03) * r.uniform(0.5, 4.0, (300, 400))).astype(np.float32)
    y = (x[:, :20].sum(1) > x[:, 20:40].sum(1)).astype(np.int64)
    assert np.count_nonzero(x) < baselines.SPARSE_FIT_DENSITY * x.size
    sparse = baselines.fit('decision_tree', x, y, max_depth=4)
    from sklearn.tree import DecisionTreeClassifier
    dense = DecisionTreeClassifier(max_depth=4, class_weight='balanced', random_state=0)
    dense.fit(x, y)
    np.testing.assert_array_equal(sparse.tree_.feature, dense.tree_.feature)
    np.testing.assert_allclose(sparse.tree_.threshold, dense.tree_.threshold)
    np.testing.assert_allclose(baselines.predict_proba(sparse, x, 2),
                               dense.predict_proba(x), rtol=1e-6)
    # tree_matrix builds the CSR once (in row blocks); fits index its rows: the same tree.
    m = baselines.tree_matrix(x, block=64)
    assert scipy.sparse.isspmatrix_csr(m) and m.nnz == np.count_nonzero(x)
    rows = np.arange(0, 300, 2)
    got = baselines.fit('decision_tree', m[rows], y[rows], max_depth=4)
    want = baselines.fit('decision_tree', x[rows], y[rows], max_depth=4)
    np.testing.assert_array_equal(got.tree_.feature, want.tree_.feature)
    np.testing.assert_array_equal(baselines.predict_proba(got, m, 2),
                                  baselines.predict_proba(want, x, 2))
    assert baselines.tree_matrix(np.ones((5, 4), np.float32)).shape == (5, 4)  # dense stays


@pytest.mark.parametrize('name,rows', [('sae_probes:95_toxic_is', 600),
                                       ('sae_probes:102_twt_emotion', 500)])
def test_tfidf_equals_sklearns_own_pipeline(name, rows):
    """The TF-IDF baseline solves sklearn's logistic regression with probe.fit_grid: on real
    texts (binary and 4 classes, balanced weights, two Cs from one vectorizer) it predicts
    what sklearn's own Pipeline predicts, with the same probabilities."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    d = data_loading.load(name)
    x, y = d.texts[:rows], d.labels[:rows]
    tr, te = np.arange(0, rows, 2), np.arange(1, rows, 2)
    c = int(y.max()) + 1
    ours = baselines.fit_grid('tfidf', [x[i] for i in tr], y[tr], (0.1, 10.0), num_classes=c)
    for model, C in zip(ours, (0.1, 10.0)):
        ref = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), max_features=20_000, stop_words='english'),
            LogisticRegression(C=C, class_weight='balanced', max_iter=10_000, tol=1e-8))
        ref.fit([x[i] for i in tr], y[tr])
        got = baselines.predict_proba(model, [x[i] for i in te], c)
        want = baselines.predict_proba(ref, [x[i] for i in te], c)
        # float32 reduced solve stopped at tol 1e-4 vs sklearn's float64 optimum.
        np.testing.assert_allclose(got, want, atol=5e-3)
        assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.99
