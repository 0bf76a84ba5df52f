"""features.py: each pooling vs numpy, MOSAIC's top-n code path, streaming, jit, binarize."""
import jax
import numpy as np
import pytest

from mosaic_jax import features

W = 12


def _np_pool(acts, mask, mode, top_n=0):
    """Plain numpy, one text at a time, only over its unmasked tokens."""
    out = np.zeros((acts.shape[0], acts.shape[2]), np.float64)
    for b in range(acts.shape[0]):
        toks = acts[b][mask[b]].astype(np.float64)        # [t, W]
        if len(toks) == 0:
            continue
        if mode == 'sum' or (mode == 'mosaic' and top_n == 0):
            out[b] = toks.sum(0)
        elif mode == 'mean':
            out[b] = toks.mean(0)
        elif mode == 'max':
            out[b] = toks.max(0)
        elif mode == 'last':
            out[b] = toks[-1]
        elif mode == 'mosaic':
            for row in toks:
                # Stable sort on -value: ties go to the lower index; zero picks not counted.
                for f in np.argsort(-row, kind='stable')[:top_n]:
                    out[b, f] += row[f] > 0
    return out


def _sparse_acts(shape, seed, density=0.4):
    r = np.random.default_rng(seed)
    return (r.exponential(1.0, shape) * (r.random(shape) < density)).astype(np.float32)


def _padded_mask(lengths, t, side):
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        if side == 'right':
            mask[i, :n] = True
        else:
            mask[i, t - n:] = True
    return mask


CASES = [('mosaic', 0), ('mosaic', 1), ('mosaic', 3), ('mosaic', 50),
         ('mean', 0), ('max', 0), ('sum', 0), ('last', 0)]


@pytest.mark.parametrize('side', ['left', 'right'])
@pytest.mark.parametrize('mode,top_n', CASES)
def test_pool_matches_numpy_reference(mode, top_n, side):
    acts = _sparse_acts((5, 8, W), seed=1)
    acts[0, 2] = 0.0                                   # an all-zero token
    mask = _padded_mask([8, 5, 1, 0, 3], 8, side)      # includes an all-masked row
    got = np.asarray(features.pool(acts, mask, mode, top_n=top_n))
    assert got.dtype == np.float32 and got.shape == (5, W)
    assert np.all(np.isfinite(got)) and np.all(got[3] == 0)
    # float32 sums of <= 8 terms vs float64 (mean/sum only; the rest are exact).
    np.testing.assert_allclose(got, _np_pool(acts, mask, mode, top_n), rtol=1e-6, atol=1e-6)


def test_hand_made_ties_zeros_and_padding():
    # Text 0 (right padded): tokens [3,3,0,1] and [0,0,0,2]; token 3 is padding.
    # Text 1 (left padded): padding, then [5,0,5,5].
    acts = np.array([[[3, 3, 0, 1], [0, 0, 0, 2], [9, 9, 9, 9]],
                     [[9, 9, 9, 9], [9, 9, 9, 9], [5, 0, 5, 5]]], np.float32)
    mask = np.array([[1, 1, 0], [0, 0, 1]], bool)
    top2 = np.asarray(features.pool(acts, mask, 'mosaic', top_n=2))
    # Tie 3 vs 3 -> both; [0,0,0,2] has one active feature -> only feature 3, no zero picks.
    # Tie 5,5,5 with top 2 -> the two lowest indices, 0 and 2.
    np.testing.assert_array_equal(top2, [[1, 1, 0, 1], [1, 0, 1, 0]])
    np.testing.assert_array_equal(features.pool(acts, mask, 'last'), [[0, 0, 0, 2], [5, 0, 5, 5]])
    np.testing.assert_array_equal(features.pool(acts, mask, 'max'), [[3, 3, 0, 2], [5, 0, 5, 5]])
    np.testing.assert_array_equal(features.pool(acts, mask, 'mean'),
                                  [[1.5, 1.5, 0, 1.5], [5, 0, 5, 5]])
    np.testing.assert_array_equal(features.pool(acts, mask, 'mosaic', top_n=0),
                                  [[3, 3, 0, 3], [5, 0, 5, 5]])


def test_max_and_last_of_negative_hidden_states():
    # Hidden states can be negative everywhere: masked positions must not leak a 0.
    acts = -np.arange(1, 13, dtype=np.float32).reshape(1, 3, 4)
    mask = np.array([[False, True, True]])
    np.testing.assert_array_equal(features.pool(acts, mask, 'max'), [[-5, -6, -7, -8]])
    np.testing.assert_array_equal(features.pool(acts, mask, 'last'), [[-9, -10, -11, -12]])


def _mosaic_code_path(sae_acts, top_n):
    """MOSAIC's optimized_top_n_to_one_hot for one text (src/sort_load_datasets.py), in numpy."""
    t, w = sae_acts.shape
    picks = np.argpartition(-sae_acts, top_n, axis=1)[:, :top_n]
    one_hot = np.zeros((t, w), np.uint8)
    one_hot[np.arange(t)[:, None], picks] = 1
    return one_hot.sum(0).astype(np.uint16), picks


@pytest.mark.parametrize('top_n', [1, 5, 20])
def test_mosaic_mode_reproduces_mosaic_code_path(top_n):
    r = np.random.default_rng(3)
    w, lengths = 64, [7, 3, 11]
    texts = []
    for n in lengths:
        # Distinct positive values with >= top_n active features per token: argpartition's
        # chosen set is then unique, so both implementations must agree exactly.
        acts = np.zeros((n, w), np.float32)
        for row in acts:
            active = r.choice(w, size=top_n + r.integers(0, 10), replace=False)
            row[active] = r.permutation(np.arange(1, len(active) + 1)) * 0.37
        texts.append(acts)
    t = max(lengths)
    batch = np.zeros((3, t, w), np.float32)
    for i, a in enumerate(texts):
        batch[i, t - len(a):] = a                      # left padding, as Gemma's tokenizer
    mask = _padded_mask(lengths, t, 'left')
    got = np.asarray(features.pool(batch, mask, 'mosaic', top_n=top_n))
    want = np.stack([_mosaic_code_path(a, top_n)[0] for a in texts])
    np.testing.assert_array_equal(got, want)


def test_mosaic_zero_picks_are_dropped():
    # A token with fewer than top_n active features: MOSAIC counts top_n picks anyway (some are
    # arbitrary zero-valued features); we count only the picks with a positive activation.
    acts = np.zeros((1, 2, 10), np.float32)
    acts[0, 0, [1, 4]] = [2.0, 1.0]
    acts[0, 1, [4, 7, 8, 9]] = [1.0, 3.0, 0.5, 0.25]
    ref_counts, picks = _mosaic_code_path(acts[0], 3)
    assert ref_counts.sum() == 6                       # 3 picks per token, zeros included
    picked_vals = np.take_along_axis(acts[0], picks, 1)
    positive = np.zeros(10)
    np.add.at(positive, picks[picked_vals > 0], 1)
    got = np.asarray(features.pool(acts, np.ones((1, 2), bool), 'mosaic', top_n=3))
    np.testing.assert_array_equal(got[0], positive)
    np.testing.assert_array_equal(got[0], [0, 1, 0, 0, 2, 0, 0, 1, 1, 0])


def test_mosaic_top_n_zero_is_the_sum_not_the_literal_empty_slice():
    acts = _sparse_acts((2, 4, W), seed=4)
    # MOSAIC's literal code with top_n=0 selects nothing ...
    assert _mosaic_code_path(acts[0], 0)[0].sum() == 0
    # ... we read top_n=0 as the paper's summation-based features.
    mask = np.ones((2, 4), bool)
    np.testing.assert_array_equal(features.pool(acts, mask, 'mosaic', top_n=0),
                                  features.pool(acts, mask, 'sum'))


def test_binarize_is_strictly_greater():
    x = np.array([[0.0, 0.5, 1.0, 1.0001, 7.0]], np.float32)
    np.testing.assert_array_equal(features.binarize(x), [[0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(features.binarize(x, 0.5), [[0, 0, 1, 1, 1]])
    assert features.binarize(x).dtype == np.float32


@pytest.mark.parametrize('mode,top_n', CASES)
def test_streaming_batches_equal_all_at_once(mode, top_n):
    r = np.random.default_rng(8)
    lengths = [5, 2, 9, 1, 6, 3, 7]
    texts = [_sparse_acts((n, W), seed=i) for i, n in enumerate(lengths)]

    def padded(idx, side):
        t = max(lengths[i] for i in idx)
        acts = r.normal(0, 5, (len(idx), t, W)).astype(np.float32)   # garbage under padding
        mask = _padded_mask([lengths[i] for i in idx], t, side)
        for row, i in enumerate(idx):
            acts[row][mask[row]] = texts[i]
        return acts, mask

    whole = np.asarray(features.pool(*padded(range(7), 'right'), mode, top_n=top_n))
    batches = [padded([0, 1, 2], 'left'), padded([3], 'right'), padded([4, 5, 6], 'left')]
    streamed = np.concatenate([np.asarray(features.pool(a, m, mode, top_n=top_n))
                               for a, m in batches])
    # Different padded lengths change only the reduction tree of sums over T (mean/sum).
    np.testing.assert_allclose(streamed, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('mode,top_n', CASES)
def test_jit_equals_eager(mode, top_n):
    acts = _sparse_acts((3, 6, W), seed=2)
    mask = _padded_mask([6, 2, 0], 6, 'left')
    eager = np.asarray(features.pool(acts, mask, mode, top_n=top_n))
    jitted = np.asarray(jax.jit(lambda a, m: features.pool(a, m, mode, top_n=top_n))(acts, mask))
    np.testing.assert_array_equal(jitted, eager)


def test_unknown_mode_and_bad_arguments():
    acts, mask = np.zeros((1, 2, 3), np.float32), np.ones((1, 2), bool)
    with pytest.raises(ValueError, match=r"unknown pooling 'median'.*\['last', 'max', 'mean'"):
        features.pool(acts, mask, 'median')
    with pytest.raises(ValueError, match='top_n must be >= 0'):
        features.pool(acts, mask, 'mosaic', top_n=-1)
    with pytest.raises(ValueError, match='mask'):
        features.pool(acts, np.ones((1, 3), bool), 'mean')
    assert set(features.POOLINGS) == {'mosaic', 'mean', 'max', 'sum', 'last'}
