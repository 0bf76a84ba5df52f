"""sae.py: JumpReLU encode/decode against numpy, chunking, fused pooling, loaders and errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_jax import features, sae

D, F = 48, 200


def _arrays(seed=0, d=D, f=F):
    r = np.random.default_rng(seed)
    return {'W_enc': r.normal(0, 0.3, (d, f)).astype(np.float32),
            'b_enc': r.normal(0, 0.2, f).astype(np.float32),
            'threshold': r.uniform(0.1, 0.8, f).astype(np.float32),
            'W_dec': r.normal(0, 0.3, (f, d)).astype(np.float32),
            'b_dec': r.normal(0, 0.5, d).astype(np.float32)}


def _params(seed=0, apply_b_dec=False):
    return sae.from_arrays(_arrays(seed), where='test', apply_b_dec_to_input=apply_b_dec)


def _x(shape=(3, 7), seed=1):
    return np.random.default_rng(seed).normal(0, 1, (*shape, D)).astype(np.float32)


def _reference(arrays, x, apply_b_dec=False):
    """The JumpReLU formula in float64 numpy; also returns pre-activations for margin checks."""
    x = x.astype(np.float64)
    if apply_b_dec:
        x = x - arrays['b_dec']
    pre = x @ arrays['W_enc'].astype(np.float64) + arrays['b_enc']
    return np.maximum(pre, 0) * (pre > arrays['threshold']), pre


@pytest.mark.parametrize('apply_b_dec', [False, True])
def test_encode_matches_numpy_formula(apply_b_dec):
    arrays, x = _arrays(), _x()
    want, pre = _reference(arrays, x, apply_b_dec)
    # The gate is a hard comparison: make sure no pre-activation is so close to its threshold
    # that float32 rounding could flip it (this seed has a margin far above float32 error).
    assert np.min(np.abs(pre - arrays['threshold'])) > 1e-4
    got = np.asarray(sae.encode(_params(apply_b_dec=apply_b_dec), x))
    assert got.shape == (3, 7, F) and got.dtype == np.float32
    np.testing.assert_array_equal(got > 0, want > 0)
    # float32 dot products of length D=48 with |terms| ~ 0.3 vs a float64 reference.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    other, _ = _reference(arrays, x, not apply_b_dec)
    assert not np.allclose(got, other, atol=1e-3)  # the flag really changes the result


def test_decode_matches_numpy():
    arrays = _arrays()
    f = np.abs(np.random.default_rng(3).normal(size=(4, F))).astype(np.float32)
    want = f.astype(np.float64) @ arrays['W_dec'] + arrays['b_dec']
    # float32 dot products of length F=200 vs float64.
    np.testing.assert_allclose(np.asarray(sae.decode(_params(), f)), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('chunk', [1, 50, 64, 199, 200, 1000])
def test_chunked_equals_unchunked(chunk):
    p, x = _params(), _x()
    # No gate within float32 error of its threshold (machine-independent float64 check).
    assert np.min(np.abs(_reference(_arrays(), x)[1] - _arrays()['threshold'])) > 1e-4
    full = np.asarray(sae.encode(p, x))
    got = np.asarray(jax.jit(lambda p, x: sae.encode(p, x, chunk_size=chunk))(p, x))
    np.testing.assert_array_equal(got > 0, full > 0)
    # Each output is the same length-D dot product; XLA may only tile the contraction
    # differently for a different output width, which moves at most the last float32 bit.
    np.testing.assert_allclose(got, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('mode,top_n', [('mosaic', 0), ('mosaic', 1), ('mosaic', 5),
                                        ('mean', 0), ('max', 0), ('sum', 0), ('last', 0)])
@pytest.mark.parametrize('chunk', [None, 64])  # 64: 3 full blocks + a remainder
def test_encode_pooled_equals_pool_of_encode(mode, top_n, chunk):
    p, x = _params(), _x((4, 9))
    # As above: every gate decided far from rounding, so both programs agree on codes.
    assert np.min(np.abs(_reference(_arrays(), x)[1] - _arrays()['threshold'])) > 1e-5
    mask = np.random.default_rng(5).random((4, 9)) > 0.3
    mask[1] = False                      # an all-masked row
    want = np.asarray(features.pool(sae.encode(p, x), mask, mode, top_n=top_n))
    fn = jax.jit(lambda p, x, m: sae.encode_pooled(p, x, m, mode, top_n=top_n, chunk_size=chunk))
    got = np.asarray(fn(p, x, mask))
    assert got.shape == (4, F)
    # Same per-element dot products as above (last-bit tiling differences at most); counts
    # are integers and must agree exactly.
    if mode == 'mosaic' and top_n > 0:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_encode_checks_input_width():
    with pytest.raises(ValueError, match='d_model is 48'):
        sae.encode(_params(), np.zeros((2, D + 1), np.float32))


# ----------------------------------------------------------------------------- loaders

def _write_npz(folder, arrays):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'params.npz')
    np.savez(path, **arrays)
    return path


def _write_saelens(folder, arrays, **cfg):
    from safetensors.numpy import save_file
    os.makedirs(folder, exist_ok=True)
    save_file(arrays, os.path.join(folder, 'sae_weights.safetensors'))
    base = dict(architecture='jumprelu', d_in=arrays['W_enc'].shape[0],
                d_sae=arrays['W_enc'].shape[1], apply_b_dec_to_input=False,
                hook_name='blocks.12.hook_resid_post')
    base.update(cfg)
    with open(os.path.join(folder, 'cfg.json'), 'w') as fh:
        json.dump(base, fh)


def _assert_same(a: sae.SAEParams, b: sae.SAEParams):
    assert a.apply_b_dec_to_input == b.apply_b_dec_to_input
    for k in ('w_enc', 'b_enc', 'threshold', 'w_dec', 'b_dec'):
        np.testing.assert_array_equal(np.asarray(getattr(a, k)), np.asarray(getattr(b, k)))


def test_gemma_scope_and_saelens_load_identically(tmp_path):
    arrays = _arrays(7)
    npz = _write_npz(str(tmp_path / 'gs' / 'layer_12'), arrays)
    _write_saelens(str(tmp_path / 'sl'), arrays)
    from_file = sae.load_sae(npz, d_model=D)
    from_folder = sae.load_sae(os.path.dirname(npz))
    from_saelens = sae.load_sae(str(tmp_path / 'sl'), d_model=D)
    _assert_same(from_file, from_folder)
    _assert_same(from_file, from_saelens)
    assert (from_file.d_model, from_file.width) == (D, F)
    np.testing.assert_array_equal(np.asarray(from_file.w_enc), arrays['W_enc'])


def test_saelens_apply_b_dec_flag_is_read(tmp_path):
    _write_saelens(str(tmp_path), _arrays(), apply_b_dec_to_input=True)
    p = sae.load_sae(str(tmp_path))
    assert p.apply_b_dec_to_input
    want, _ = _reference(_arrays(), _x(), apply_b_dec=True)
    # Same tolerance as test_encode_matches_numpy_formula.
    np.testing.assert_allclose(np.asarray(sae.encode(p, _x())), want, rtol=1e-5, atol=1e-5)


def test_saelens_other_architecture_is_rejected(tmp_path):
    _write_saelens(str(tmp_path), _arrays(), architecture='topk')
    with pytest.raises(ValueError, match="architecture 'topk'.*jumprelu"):
        sae.load_sae(str(tmp_path))


def test_saelens_cfg_width_mismatch(tmp_path):
    _write_saelens(str(tmp_path), _arrays(), d_sae=F + 1)
    with pytest.raises(ValueError, match='d_sae=201'):
        sae.load_sae(str(tmp_path))


@pytest.mark.parametrize('storage', ['float32', 'bfloat16'])
def test_orbax_round_trip(tmp_path, storage):
    p = _params(apply_b_dec=True)
    sae.save_sae(str(tmp_path / 'ck'), p, {'layer': 3, 'note': 'x'}, dtype=storage)
    back = sae.load_sae(str(tmp_path / 'ck'), d_model=D)
    if storage == 'float32':
        _assert_same(p, back)
    else:
        rounded = {k: np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32))
                   for k, v in sae.to_arrays(p).items()}
        _assert_same(sae.from_arrays(rounded, where='x', apply_b_dec_to_input=True), back)
        assert back.w_enc.dtype == jnp.float32
    meta = json.load(open(tmp_path / 'ck' / 'metadata.json'))
    assert meta['layer'] == 3 and meta['width'] == F and meta['storage_dtype'] == storage


def test_export_saelens_round_trip(tmp_path):
    p = _params(apply_b_dec=True)
    sae.export_saelens(p, str(tmp_path / 'out'), {'layer': 5, 'model_name': 'tiny'})
    cfg = json.load(open(tmp_path / 'out' / 'cfg.json'))
    assert cfg['hook_name'] == 'blocks.5.hook_resid_post' and cfg['d_sae'] == F
    _assert_same(p, sae.load_sae(str(tmp_path / 'out')))


def test_d_model_mismatch_names_file_layer_and_shapes(tmp_path):
    npz = _write_npz(str(tmp_path / 'layer_9'), _arrays())
    with pytest.raises(ValueError) as e:
        sae.load_sae(npz, d_model=64)
    msg = str(e.value)
    assert npz in msg and 'layer 9' in msg and '(48, 200)' in msg and '64' in msg


def test_inconsistent_shapes_are_rejected(tmp_path):
    arrays = _arrays()
    arrays['threshold'] = arrays['threshold'][:-1]
    npz = _write_npz(str(tmp_path), arrays)
    with pytest.raises(ValueError, match=r'threshold has shape \(199,\), expected \(200,\)'):
        sae.load_sae(npz, layer=4)


def test_missing_key_names_file_and_key(tmp_path):
    arrays = _arrays()
    del arrays['threshold']
    npz = _write_npz(str(tmp_path), arrays)
    with pytest.raises(KeyError) as e:
        sae.load_sae(npz)
    assert npz in str(e.value) and 'threshold' in str(e.value)


def test_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match='params.npz'):
        sae.load_sae(str(tmp_path))                     # empty folder
    with pytest.raises(FileNotFoundError, match='hub'):
        sae.load_sae(str(tmp_path / 'nope'))


# ----------------------------------------------------------------------------- hub references

def test_canonical_table_matches_saelens_entries():
    # Spot checks against SAELens pretrained_saes.yaml (gemma-scope-*-res-canonical).
    for ref, want in [
        ('google/gemma-scope-2b-pt-res/layer_5/width_16k/canonical', 68),
        ('google/gemma-scope-2b-pt-res/layer_12/width_16k/canonical', 82),
        ('google/gemma-scope-2b-pt-res/layer_19/width_16k/canonical', 73),
        ('google/gemma-scope-2b-pt-res/layer_12/width_65k/canonical', 72),
        ('google/gemma-scope-2b-pt-res/layer_19/width_65k/canonical', 115),
        ('google/gemma-scope-9b-pt-res/layer_9/width_16k/canonical', 100),
        ('google/gemma-scope-9b-pt-res/layer_20/width_16k/canonical', 68),
        ('google/gemma-scope-9b-pt-res/layer_31/width_16k/canonical', 114),
    ]:
        repo, path = sae.resolve_hub_ref(ref, list_files=lambda r: pytest.fail('listed repo'))
        assert path == ref.split('/', 2)[2].replace('canonical', f'average_l0_{want}') + \
            '/params.npz'
        assert repo == '/'.join(ref.split('/')[:2])


def test_canonical_fallback_picks_l0_closest_to_100():
    files = ['layer_3/width_16k/average_l0_40/params.npz', 'layer_3/width_16k/average_l0_95/'
             'params.npz', 'layer_3/width_16k/average_l0_106/params.npz',
             'layer_30/width_16k/average_l0_100/params.npz', 'README.md']
    _, path = sae.resolve_hub_ref('someone/saes/layer_3/width_16k/canonical', lambda r: files)
    assert path == 'layer_3/width_16k/average_l0_95/params.npz'
    assert sae.closest_l0([90, 110]) == 90          # ties go to the smaller L0


def test_explicit_hub_ref_and_offline_error():
    ref = 'google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82'
    assert sae.resolve_hub_ref(ref) == ('google/gemma-scope-2b-pt-res',
                                        'layer_12/width_16k/average_l0_82/params.npz')
    # conftest sets HF_HUB_OFFLINE=1 (and this machine has no hub access anyway).
    with pytest.raises(FileNotFoundError, match='params.npz.*path'):
        sae.load_sae(ref)
