"""sae.jumprelu + sae.loading: JumpReLU encode/decode against numpy, chunking, fused pooling, loaders and errors."""
import json
import os
import shutil

import huggingface_hub
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from mosaic_jax import checkpoint, features
from mosaic_jax.sae import jumprelu
from mosaic_jax.sae import loading as sae_loading

D, F = 48, 200


def _arrays(seed=0, d=D, f=F):
    r = np.random.default_rng(seed)
    return {'W_enc': r.normal(0, 0.3, (d, f)).astype(np.float32),
            'b_enc': r.normal(0, 0.2, f).astype(np.float32),
            'threshold': r.uniform(0.1, 0.8, f).astype(np.float32),
            'W_dec': r.normal(0, 0.3, (f, d)).astype(np.float32),
            'b_dec': r.normal(0, 0.5, d).astype(np.float32)}


def _params(seed=0, apply_b_dec=False):
    return sae_loading.from_arrays(_arrays(seed), where='test', apply_b_dec_to_input=apply_b_dec)


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
    got = np.asarray(jumprelu.encode(_params(apply_b_dec=apply_b_dec), x))
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
    np.testing.assert_allclose(np.asarray(jumprelu.decode(_params(), f)), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('chunk', [1, 50, 64, 199, 200, 1000])
def test_chunked_equals_unchunked(chunk):
    p, x = _params(), _x()
    # No gate within float32 error of its threshold (machine-independent float64 check).
    assert np.min(np.abs(_reference(_arrays(), x)[1] - _arrays()['threshold'])) > 1e-4
    full = np.asarray(jumprelu.encode(p, x))
    got = np.asarray(jax.jit(lambda p, x: jumprelu.encode(p, x, chunk_size=chunk))(p, x))
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
    want = np.asarray(features.pool(jumprelu.encode(p, x), mask, mode, top_n=top_n))
    fn = jax.jit(lambda p, x, m: jumprelu.encode_pooled(p, x, m, mode, top_n=top_n, chunk_size=chunk))
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
        jumprelu.encode(_params(), np.zeros((2, D + 1), np.float32))


# ----------------------------------------------------------------------------- loaders

def _write_npz(folder, arrays):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'params.npz')
    np.savez(path, **arrays)
    return path


def _write_saelens(folder, arrays, **cfg):
    os.makedirs(folder, exist_ok=True)
    save_file(arrays, os.path.join(folder, 'sae_weights.safetensors'))
    base = dict(architecture='jumprelu', d_in=arrays['W_enc'].shape[0],
                d_sae=arrays['W_enc'].shape[1], apply_b_dec_to_input=False,
                hook_name='blocks.12.hook_resid_post')
    base.update(cfg)
    with open(os.path.join(folder, 'cfg.json'), 'w') as fh:
        json.dump(base, fh)


def _assert_same(a: jumprelu.SAEParams, b: jumprelu.SAEParams):
    assert a.apply_b_dec_to_input == b.apply_b_dec_to_input
    for k in ('w_enc', 'b_enc', 'threshold', 'w_dec', 'b_dec'):
        np.testing.assert_array_equal(np.asarray(getattr(a, k)), np.asarray(getattr(b, k)))


def test_gemma_scope_and_saelens_load_identically(tmp_path):
    arrays = _arrays(7)
    npz = _write_npz(str(tmp_path / 'gs' / 'layer_12'), arrays)
    _write_saelens(str(tmp_path / 'sl'), arrays)
    from_file = sae_loading.load_sae(npz, d_model=D)
    from_folder = sae_loading.load_sae(os.path.dirname(npz))
    from_saelens = sae_loading.load_sae(str(tmp_path / 'sl'), d_model=D)
    _assert_same(from_file, from_folder)
    _assert_same(from_file, from_saelens)
    assert (from_file.d_model, from_file.width) == (D, F)
    np.testing.assert_array_equal(np.asarray(from_file.w_enc), arrays['W_enc'])


def test_saelens_apply_b_dec_flag_is_read(tmp_path):
    _write_saelens(str(tmp_path), _arrays(), apply_b_dec_to_input=True)
    p = sae_loading.load_sae(str(tmp_path))
    assert p.apply_b_dec_to_input
    want, _ = _reference(_arrays(), _x(), apply_b_dec=True)
    # Same tolerance as test_encode_matches_numpy_formula.
    np.testing.assert_allclose(np.asarray(jumprelu.encode(p, _x())), want, rtol=1e-5, atol=1e-5)


def test_saelens_other_architecture_is_rejected(tmp_path):
    _write_saelens(str(tmp_path), _arrays(), architecture='topk')
    with pytest.raises(ValueError, match="architecture 'topk'.*jumprelu"):
        sae_loading.load_sae(str(tmp_path))


def test_saelens_cfg_width_mismatch(tmp_path):
    _write_saelens(str(tmp_path), _arrays(), d_sae=F + 1)
    with pytest.raises(ValueError, match='d_sae=201'):
        sae_loading.load_sae(str(tmp_path))


@pytest.mark.parametrize('storage', ['float32', 'bfloat16'])
def test_orbax_round_trip(tmp_path, storage):
    p = _params(apply_b_dec=True)
    sae_loading.save_sae(str(tmp_path / 'ck'), p, {'layer': 3, 'note': 'x'}, dtype=storage)
    back = sae_loading.load_sae(str(tmp_path / 'ck'), d_model=D)
    if storage == 'float32':
        _assert_same(p, back)
    else:
        rounded = {k: np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32))
                   for k, v in sae_loading.to_arrays(p).items()}
        _assert_same(sae_loading.from_arrays(rounded, where='x', apply_b_dec_to_input=True), back)
        assert back.w_enc.dtype == jnp.float32
    meta = json.load(open(tmp_path / 'ck' / 'metadata.json'))
    assert meta['layer'] == 3 and meta['width'] == F and meta['storage_dtype'] == storage


def test_export_saelens_round_trip(tmp_path):
    p = _params(apply_b_dec=True)
    sae_loading.export_saelens(p, str(tmp_path / 'out'), {'layer': 5, 'model_name': 'tiny'})
    cfg = json.load(open(tmp_path / 'out' / 'cfg.json'))
    assert cfg['hook_name'] == 'blocks.5.hook_resid_post' and cfg['d_sae'] == F
    _assert_same(p, sae_loading.load_sae(str(tmp_path / 'out')))


def test_d_model_mismatch_names_file_layer_and_shapes(tmp_path):
    npz = _write_npz(str(tmp_path / 'layer_9'), _arrays())
    with pytest.raises(ValueError) as e:
        sae_loading.load_sae(npz, d_model=64)
    msg = str(e.value)
    assert npz in msg and 'layer 9' in msg and '(48, 200)' in msg and '64' in msg


def test_inconsistent_shapes_are_rejected(tmp_path):
    arrays = _arrays()
    arrays['threshold'] = arrays['threshold'][:-1]
    npz = _write_npz(str(tmp_path), arrays)
    with pytest.raises(ValueError, match=r'threshold has shape \(199,\), expected \(200,\)'):
        sae_loading.load_sae(npz, layer=4)


def test_missing_key_names_file_and_key(tmp_path):
    arrays = _arrays()
    del arrays['threshold']
    npz = _write_npz(str(tmp_path), arrays)
    with pytest.raises(KeyError) as e:
        sae_loading.load_sae(npz)
    assert npz in str(e.value) and 'threshold' in str(e.value)


def test_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match='params.npz'):
        sae_loading.load_sae(str(tmp_path))                     # empty folder
    with pytest.raises(FileNotFoundError, match='hub'):
        sae_loading.load_sae(str(tmp_path / 'nope'))


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
        repo, path = sae_loading.resolve_hub_ref(ref, list_files=lambda r: pytest.fail('listed repo'))
        assert path == ref.split('/', 2)[2].replace('canonical', f'average_l0_{want}') + \
            '/params.npz'
        assert repo == '/'.join(ref.split('/')[:2])


def test_canonical_fallback_picks_l0_closest_to_100():
    files = ['layer_3/width_16k/average_l0_40/params.npz', 'layer_3/width_16k/average_l0_95/'
             'params.npz', 'layer_3/width_16k/average_l0_106/params.npz',
             'layer_30/width_16k/average_l0_100/params.npz', 'README.md']
    _, path = sae_loading.resolve_hub_ref('someone/saes/layer_3/width_16k/canonical', lambda r: files)
    assert path == 'layer_3/width_16k/average_l0_95/params.npz'
    assert sae_loading.closest_l0([90, 110]) == 90          # ties go to the smaller L0


def test_explicit_hub_ref_and_offline_error():
    ref = 'google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82'
    assert sae_loading.resolve_hub_ref(ref) == ('google/gemma-scope-2b-pt-res',
                                                'layer_12/width_16k/average_l0_82/params.npz')
    # conftest sets HF_HUB_OFFLINE=1 (and this machine has no hub access anyway).
    with pytest.raises(FileNotFoundError, match='params.npz.*path'):
        sae_loading.load_sae(ref)


# ----------------------------------------------------------------------------- Gemma Scope 2

SCOPE2_REPO = 'google/gemma-scope-2-270m-pt'
SCOPE2_SUB = 'resid_post/layer_12_width_16k_l0_medium'
SCOPE2_REF = f'{SCOPE2_REPO}/{SCOPE2_SUB}'


def _write_scope2(folder, arrays, config=None, dtype=None):
    """A Gemma Scope 2 folder: params.safetensors (w_enc, w_dec, b_enc, b_dec, threshold)."""
    os.makedirs(folder, exist_ok=True)
    stored = {k[0].lower() + k[1:]: np.ascontiguousarray(v if dtype is None else v.astype(dtype))
              for k, v in arrays.items()}
    save_file(stored, os.path.join(folder, 'params.safetensors'))
    if config is not None:
        with open(os.path.join(folder, 'config.json'), 'w') as fh:
            json.dump(config, fh)
    return os.path.join(folder, 'params.safetensors')


def _resid_config(layer=12, width=F, **kw):
    # A Gemma Scope 2 config.json; SAELens' gemma_3 loader reads architecture, model_name and
    # hf_hook_point_in (model.layers.L.output: the residual after block L).
    return dict(architecture='jump_relu', model_name='gemma-v3-270m-pt', width=width, l0=60,
                hf_hook_point_in=f'model.layers.{layer}.output', **kw)


def _encode_error(params, arrays, x) -> float:
    """Max |encode - float64 JumpReLU formula| (no b_dec subtraction).

    A pre-activation within 1e-5 of its threshold (float32 rounding of the length-D dot
    product is far below that, see below) may gate either way, so there either value counts.
    """
    want, pre = _reference(arrays, x)
    got = np.asarray(jumprelu.encode(params, x), np.float64)
    near = np.abs(pre - arrays['threshold']) < 1e-5
    err = np.where(near, np.minimum(np.abs(got), np.abs(got - np.maximum(pre, 0))),
                   np.abs(got - want))
    np.testing.assert_array_equal((got > 0)[~near], (want > 0)[~near])
    return float(err.max())


@pytest.mark.parametrize('d,f,config', [(64, 16384, None),
                                        (32, 96, _resid_config(layer=7, width=96))])
def test_scope2_folder_encode_parity(tmp_path, d, f, config):
    arrays = _arrays(11, d, f)
    weights = _write_scope2(str(tmp_path / 'layer_7_width_x'), arrays, config)
    p = sae_loading.load_sae(os.path.dirname(weights), d_model=d)
    _assert_same(p, sae_loading.load_sae(weights))            # the file itself loads the same
    assert (p.d_model, p.width, p.apply_b_dec_to_input) == (d, f, False)
    np.testing.assert_array_equal(np.asarray(p.w_dec), arrays['W_dec'])
    x = np.random.default_rng(2).normal(0, 1, (3, 7, d)).astype(np.float32)
    err = _encode_error(p, arrays, x)
    print(f'Gemma Scope 2 d={d} W={f}: max |encode - float64 formula| = {err:.3g}')
    # float32 dot products of length d <= 64, |pre| up to ~12 (one float32 ulp there ~1e-6):
    # observed max 2.8e-6 (d=64) and 1.3e-6 (d=32); 1e-5 leaves a >3x margin.
    assert err < 1e-5
    # b_dec ~ N(0, 0.5) is not subtracted: the formula that does subtract it is far off.
    assert np.abs(np.asarray(jumprelu.encode(p, x)) - _reference(arrays, x, True)[0]).max() > 0.1
    with pytest.raises(ValueError, match=r'layer 7\).*d_model is %d' % d):
        sae_loading.load_sae(weights, d_model=d + 1)


def test_scope2_bfloat16_file_loads_as_float32(tmp_path):
    arrays = _arrays(3)
    weights = _write_scope2(str(tmp_path), arrays, dtype=ml_dtypes.bfloat16)
    p = sae_loading.load_sae(weights)
    assert p.w_enc.dtype == jnp.float32
    # bfloat16 -> float32 is exact, so the loaded values are the bf16-rounded ones exactly.
    np.testing.assert_array_equal(np.asarray(p.w_enc),
                                  arrays['W_enc'].astype(ml_dtypes.bfloat16).astype(np.float32))
    assert sae_loading.peek(str(tmp_path)) == (D, F)


@pytest.mark.parametrize('bad,match', [
    (dict(architecture='topk'), "architecture 'topk'"),
    (dict(hf_hook_point_in='model.layers.12.self_attn.o_proj.input'), 'not a residual-stream'),
])
def test_scope2_config_is_checked(tmp_path, bad, match):
    _write_scope2(str(tmp_path), _arrays(), dict(_resid_config(), **bad))
    for fn in (sae_loading.load_sae, sae_loading.peek):
        with pytest.raises(ValueError, match=match):
            fn(str(tmp_path))


@pytest.mark.parametrize('key,value,match', [
    ('b_enc', np.zeros(F + 1, np.float32), r'b_enc has shape \(201,\), expected \(200,\)'),
    # Loaded arrays say int32, the safetensors header (peek) I32.
    ('threshold', np.ones(F, np.int32), 'tensor threshold has dtype (int32|I32)'),
    ('W_dec', np.zeros((D, F), np.float32), r'w_dec has shape \(48, 200\)'),
])
def test_scope2_bad_tensor_names_file_and_tensor(tmp_path, key, value, match):
    arrays = dict(_arrays(), **{key: value})
    weights = _write_scope2(str(tmp_path), arrays)
    for fn in (sae_loading.load_sae, sae_loading.peek):               # peek finds it from the header alone
        with pytest.raises(ValueError, match=match) as e:
            fn(str(tmp_path))
        assert weights in str(e.value) and '\n' not in str(e.value)


def test_scope2_missing_tensor_and_corrupt_file(tmp_path):
    arrays = _arrays()
    del arrays['b_dec']
    _write_scope2(str(tmp_path / 'a'), arrays)
    with pytest.raises(sae_loading.MissingTensorError) as e:
        sae_loading.load_sae(str(tmp_path / 'a'))
    assert isinstance(e.value, ValueError) and str(e.value).startswith(str(tmp_path / 'a'))
    assert "missing SAE tensor(s) ['b_dec']" in str(e.value)
    os.makedirs(tmp_path / 'b')
    (tmp_path / 'b' / 'params.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{bad')
    for fn in (sae_loading.load_sae, sae_loading.peek):
        with pytest.raises(ValueError, match='params.safetensors: not a readable'):
            fn(str(tmp_path / 'b'))


# ----------------------------------------------------------------------------- non-finite weights

def _write_orbax(folder, arrays):
    sae_loading.save_sae(folder, sae_loading.from_arrays(_arrays(), where='x'), {'layer': 2})
    # save_sae itself refuses nothing; overwrite its params with the poisoned arrays.
    shutil.rmtree(os.path.join(folder, 'params'))
    checkpoint.save_pytree(os.path.join(folder, 'params'), arrays)


@pytest.mark.parametrize('fmt,key,value', [('npz', 'W_enc', np.nan), ('scope2', 'W_dec', np.inf),
                                           ('saelens', 'threshold', -np.inf),
                                           ('orbax', 'b_enc', np.nan)])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, fmt, key, value):
    arrays = _arrays()
    arrays[key] = arrays[key].copy()
    arrays[key].flat[[3, 17]] = value
    folder = str(tmp_path / fmt)
    {'npz': _write_npz, 'scope2': _write_scope2, 'saelens': _write_saelens,
     'orbax': _write_orbax}[fmt](folder, arrays)
    stored = key.lower() if fmt == 'scope2' else key
    with pytest.raises(ValueError, match=f'tensor {stored} has 2 non-finite') as e:
        sae_loading.load_sae(folder)
    assert folder in str(e.value)


# ----------------------------------------------------------------------------- Gemma Scope 2 hub

def test_scope2_hub_ref_parsing():
    want = (SCOPE2_REPO, f'{SCOPE2_SUB}/params.safetensors')
    assert sae_loading.resolve_hub_ref(SCOPE2_REF) == want
    assert sae_loading.resolve_hub_ref(SCOPE2_REF + '/params.safetensors') == want
    parts = sae_loading.parse_hub_ref('google/gemma-scope-2-270m-it/resid_post_all/'
                                      'layer_17_width_262k_l0_small')
    assert (parts['layer'], parts['width'], parts['l0'], parts['scope']) == (17, '262k', 'small', 2)
    # Only residual-stream sites are references: the pipeline feeds nothing else.
    assert sae_loading.parse_hub_ref(f'{SCOPE2_REPO}/attn_out/layer_12_width_16k_l0_medium') is None


def test_scope2_hub_ref_downloads_through_hf_hub_download(tmp_path, monkeypatch):
    arrays = _arrays(5)
    weights = _write_scope2(str(tmp_path / 'snap' / SCOPE2_SUB), arrays, _resid_config())
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        assert (repo_id, filename) == (SCOPE2_REPO, f'{SCOPE2_SUB}/params.safetensors')
        return weights

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
    p = sae_loading.load_sae(SCOPE2_REF, d_model=D)
    assert calls == [(SCOPE2_REPO, f'{SCOPE2_SUB}/params.safetensors')]
    _assert_same(p, sae_loading.load_sae(weights))
    with pytest.raises(ValueError, match='layer 12'):
        sae_loading.load_sae(SCOPE2_REF, d_model=D + 2)


def test_scope2_hub_ref_offline_error_is_one_line(monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1: the real hf_hub_download fails without any network.
    with pytest.raises(FileNotFoundError) as e:
        sae_loading.load_sae(SCOPE2_REF)
    msg = str(e.value)
    assert '\n' not in msg and 'HF_HUB_OFFLINE=1' in msg
    assert f'hf download {SCOPE2_REPO} {SCOPE2_SUB}/params.safetensors' in msg
    assert f'DIR/{SCOPE2_SUB}' in msg

    def unreachable(repo_id, filename, **kw):
        raise OSError('Connection refused\n  while requesting HEAD https://huggingface.co/...')

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', unreachable)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    for fn in (sae_loading.load_sae, sae_loading.peek):
        with pytest.raises(FileNotFoundError, match='OSError: Connection refused while') as e:
            fn(SCOPE2_REF)
        assert '\n' not in str(e.value)


# ----------------------------------------------------------------------------- peek

def _refuse(*args, **kw):
    raise AssertionError('peek read tensor data')


@pytest.mark.parametrize('fmt', ['npz', 'scope2', 'saelens', 'orbax'])
def test_peek_reads_shapes_without_tensors(tmp_path, monkeypatch, fmt):
    folder = str(tmp_path / fmt)
    if fmt == 'orbax':
        sae_loading.save_sae(folder, _params(), {'layer': 3})
    else:
        {'npz': _write_npz, 'scope2': _write_scope2, 'saelens': _write_saelens}[fmt](
            folder, _arrays())
    for target, name in ((sae_loading, 'load_file'), (np, 'load'), (checkpoint, 'restore_pytree'),
                         (sae_loading, 'from_arrays')):
        monkeypatch.setattr(target, name, _refuse)
    assert sae_loading.peek(folder) == (D, F)
    assert sae_loading.peek(folder, d_model=D) == (D, F)
    with pytest.raises(ValueError, match='d_model'):
        sae_loading.peek(folder, d_model=D + 1)


def test_peek_missing_sources_raise_like_load_sae(tmp_path):
    for src in (str(tmp_path), str(tmp_path / 'nope')):
        with pytest.raises(FileNotFoundError) as peeked:
            sae_loading.peek(src)
        with pytest.raises(FileNotFoundError) as loaded:
            sae_loading.load_sae(src)
        assert str(peeked.value) == str(loaded.value)
    with pytest.raises(FileNotFoundError, match='HF_HUB_OFFLINE=1') as e:
        sae_loading.peek(SCOPE2_REF)                              # offline and not cached
    assert '\n' not in str(e.value)


def test_peek_hub_ref_uses_the_hf_cache(tmp_path, monkeypatch):
    weights = _write_scope2(str(tmp_path / SCOPE2_SUB), _arrays(), _resid_config())
    monkeypatch.setattr(huggingface_hub, 'try_to_load_from_cache',
                        lambda repo, filename, **kw: weights if repo == SCOPE2_REPO else None)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', _refuse)
    monkeypatch.setattr(sae_loading, 'load_file', _refuse)
    assert sae_loading.peek(SCOPE2_REF) == (D, F)
