"""Pure pieces of the compiled steps: one-pass top-n pooling and the training batch order."""
import jax
import numpy as np
import pytest

from mosaic_jax import features
from mosaic_jax import steps
from mosaic_jax.data import batching
from mosaic_jax.variants import SAEKey, Variant


def test_one_pass_top_n_sweep_equals_separate_poolings():
    r = np.random.default_rng(0)
    acts = np.maximum(r.normal(size=(3, 7, 40)), 0).astype(np.float32)  # [B, T, W]
    acts[0, 0, :5] = 0.5  # ties: lax.top_k keeps the lower index in both paths
    mask = r.uniform(size=(3, 7)) > 0.2
    tops = (0, 3, 5, 12)

    @jax.jit
    def both(acts, mask):
        one = steps._pooled(None, None, acts, mask, 'mosaic', tops, chunk_size=0)
        sep = {n: features.pool(acts, mask, 'mosaic', top_n=n) for n in tops}
        return one, sep
    one, sep = both(acts, mask)
    for n in tops:
        # Same top_k picks (a prefix of the largest top_k), same count: exactly equal.
        np.testing.assert_array_equal(np.asarray(one[n]), np.asarray(sep[n]), err_msg=str(n))
    assert not np.array_equal(np.asarray(one[3]), np.asarray(one[12]))


def test_top_n_sweep_compiles_to_top_k_not_a_full_sort():
    # Two top_n from one top_k: unless steps._pooled masks instead of slicing, the CPU
    # compiler folds the slices into the top_k and emits a stable sort of the whole
    # [B, L, F] activation tensor (50x slower at 32 x 128 x 16k). The compiled program must
    # keep the TopK and contain no sort.
    acts = jax.ShapeDtypeStruct((2, 8, 256), np.float32)
    mask = jax.ShapeDtypeStruct((2, 8), np.bool_)
    fn = jax.jit(lambda a, m: steps._pooled(None, None, a, m, 'mosaic', (0, 20, 50),
                                            chunk_size=0))
    hlo = fn.lower(acts, mask).compile().as_text()
    assert ' sort(' not in hlo
    if jax.devices()[0].platform == 'cpu':
        assert 'TopK' in hlo


def test_spec_sweeps_top_n_for_the_poolings_that_read_it():
    k = SAEKey(8, '4k')
    spec = steps.FeatureSpec.build(layers=(8,), config_layers=(8,), saes=[k],
                                   pooling=('mosaic', 'mean'), binarize=(False, True),
                                   top_n=(0, 20, 50), threshold=1.0)
    names = [v.name for v in spec.variants]
    assert names == ['mosaic', 'mosaic+bin', 'mosaic_top20', 'mosaic_top20+bin',
                     'mosaic_top50', 'mosaic_top50+bin', 'mean', 'mean+bin']
    assert Variant(k, 'mean', 0, True) in spec.variants
    assert len(set(names)) == len(names)  # one name per variant, nothing parsed back


def _labels_by_length(n=400, seed=0):
    """Texts whose length predicts the class: length-sorted batches are nearly one class."""
    r = np.random.default_rng(seed)
    y = r.integers(0, 2, n)
    ids = [list(range(2 + int(y[i]) * 20 + int(r.integers(0, 8)))) for i in range(n)]
    return ids, y


def test_epoch_batches_cover_every_row_once_and_mix_classes():
    ids, y = _labels_by_length()
    share_sorted = [y[b.index[b.valid]].mean() for b in batching.batches(ids, 32, pad_id=0)]
    for epoch in (0, 1):
        bs = steps.epoch_batches(ids, 32, seed=0, epoch=epoch, pad_id=0)
        rows = np.concatenate([b.index[b.valid] for b in bs])
        assert sorted(rows.tolist()) == list(range(len(ids)))
        assert all((b.index[~b.valid] == -1).all() for b in bs)
        for b in bs:  # each row's tokens are its own text
            for i, row in zip(b.index[b.valid], b.input_ids[b.valid]):
                assert row[:len(ids[i])].tolist() == ids[i]
        share = [y[b.index[b.valid]].mean() for b in bs]
        # Length-sorted batches are single-class (share 0 or 1); shuffled chunks are mixed.
        assert np.std(share) < 0.5 * np.std(share_sorted)
    a = steps.epoch_batches(ids, 32, seed=0, epoch=0, pad_id=0)
    b = steps.epoch_batches(ids, 32, seed=0, epoch=0, pad_id=0)
    c = steps.epoch_batches(ids, 32, seed=0, epoch=1, pad_id=0)
    assert all((x.index == z.index).all() for x, z in zip(a, b))  # seeded
    assert any((x.index != z.index).any() for x, z in zip(a, c))  # a new order each epoch


@pytest.mark.parametrize('include_special', [False, True])
def test_feature_mask_never_counts_padding(include_special):
    ids = np.array([[2, 5, 6, 0], [2, 7, 0, 0]])
    mask = ids != 0
    got = steps.feature_mask(ids, mask, bos_id=2, include_special=include_special)
    want = mask.copy()
    if not include_special:
        want[:, 0] = False  # BOS excluded by default
    np.testing.assert_array_equal(got, want)
