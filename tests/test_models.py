"""Gemma 2 / Gemma 3 in Flax NNX against transformers' torch eager reference, and loading."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tests import helpers
from mosaic_jax.models import config as config_lib
from mosaic_jax.models import loading
from mosaic_jax.models import transformer
from mosaic_jax.models.config import AttentionType, GemmaConfig
from mosaic_jax.models.transformer import Transformer

SEQ = 24
LENGTHS = (24, 17, 9)  # one full row and two padded ones
# Float32 on both sides; only op order differs (measured ~1e-6).
F32_TOL = 1e-4
# Our bfloat16 vs HF float32. bf16 keeps 8 mantissa bits (2^-8 = 4e-3 per rounding) and the
# error compounds over blocks: transformers' own bf16 run of these models is off by up to
# 2.2e-2 on residuals and 4.1e-2 on logits; ours measured at most 2.3e-2 and 3.8e-2.
BF16_TOL = 6e-2


def _rel(got, want, real):
    """max |got - want| / max |want| over real (unpadded) tokens."""
    return float(np.abs(got[real] - want[real]).max() / np.abs(want[real]).max())


@pytest.fixture(scope='module')
def gemma2(tmp_path_factory):
    hf = helpers.tiny_gemma2(seed=0)
    return hf, helpers.save_model(hf, tmp_path_factory.mktemp('g2'))


@pytest.fixture(scope='module')
def gemma3(tmp_path_factory):
    hf = helpers.tiny_gemma3(seed=1)
    return hf, helpers.save_model(hf, tmp_path_factory.mktemp('g3'))


def _parity(hf, model, side, tol):
    """Every block's residual, the last one through the final norm, and the logits vs HF."""
    ids, mask = helpers.padded_batch(LENGTHS, SEQ, side, seed=3)
    want_hidden, want_logits = helpers.hf_reference(hf, ids, mask)
    n = model.config.num_layers
    out = model(jnp.asarray(ids), jnp.asarray(mask), capture=tuple(range(n)))
    real = mask.astype(bool)
    errs = {}
    for i in range(n - 1):  # block i's output is HF hidden_states[i + 1]
        errs[f'block {i}'] = _rel(np.asarray(out.hidden[i]), want_hidden[i + 1], real)
    # HF's last hidden state is taken after the final norm; ours is the raw stream.
    last = model.final_norm(out.hidden[n - 1].astype(model.dtype)).astype(jnp.float32)
    errs[f'block {n - 1} + final norm'] = _rel(np.asarray(last), want_hidden[n], real)
    errs['logits'] = _rel(np.asarray(out.logits), want_logits, real)
    # Padded query rows (a left-padding row sees no key at all) must stay finite.
    assert np.isfinite(np.asarray(out.logits)).all()
    assert all(np.isfinite(np.asarray(h)).all() for h in out.hidden.values())
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f'{side} padding: relative errors above {tol}: {bad}'
    return errs


@pytest.mark.parametrize('dtype,tol', [('float32', F32_TOL), ('bfloat16', BF16_TOL)])
@pytest.mark.parametrize('side', ['right', 'left'])
def test_gemma2_matches_transformers(gemma2, side, dtype, tol):
    hf, folder = gemma2
    _parity(hf, loading.load_model(folder, dtype), side, tol)


@pytest.mark.parametrize('side', ['right', 'left'])
def test_gemma3_matches_transformers(gemma3, side):
    hf, folder = gemma3
    model = loading.load_model(folder)
    cfg = model.config
    # The fixture exercises what makes Gemma 3 differ: mixed layers, a window shorter than
    # the sequence, QK norm, separate local/global RoPE and linear scaling on global layers.
    assert set(cfg.attn_types) == set(AttentionType) and cfg.sliding_window < SEQ
    assert cfg.use_qk_norm and cfg.rope_local_base_freq != cfg.rope_theta
    assert cfg.rope_scale_factor == 2.0 and cfg.final_logit_softcapping is None
    _parity(hf, model, side, F32_TOL)


def test_gemma3_bfloat16_matches_transformers(gemma3):
    hf, folder = gemma3
    _parity(hf, loading.load_model(folder, 'bfloat16'), 'left', BF16_TOL)


def test_config_from_hf_reads_the_checkpoint(gemma2):
    hf, folder = gemma2
    with open(os.path.join(folder, 'config.json')) as f:
        cfg = GemmaConfig.from_hf(json.load(f))
    assert cfg.query_pre_attn_scalar == 24.0 and cfg.head_dim == 16  # read, not derived
    assert cfg.attn_types == (AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL) * 2
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (5.0, 3.0)
    assert not cfg.use_qk_norm and cfg.rope_local_base_freq == cfg.rope_theta == 10_000.0


def test_config_from_transformers_4_layout():
    """Older config.json files carry rope_theta / rope_local_base_freq / rope_scaling."""
    hf = dict(architectures=['Gemma3ForCausalLM'], model_type='gemma3_text', vocab_size=10,
              hidden_size=8, intermediate_size=16, num_hidden_layers=7, num_attention_heads=2,
              num_key_value_heads=1, head_dim=4, query_pre_attn_scalar=4, sliding_window=3,
              rope_theta=1e6, rope_local_base_freq=1e4,
              rope_scaling={'rope_type': 'linear', 'factor': 8.0},
              final_logit_softcapping=None)
    cfg = GemmaConfig.from_hf(hf)
    assert cfg.rope(AttentionType.GLOBAL) == (1e6, 8.0)
    assert cfg.rope(AttentionType.LOCAL_SLIDING) == (1e4, 1.0)
    # No layer_types: Gemma 3's default of 5 local layers then a global one.
    assert [t == AttentionType.GLOBAL for t in cfg.attn_types] == [0, 0, 0, 0, 0, 1, 0]
    assert cfg.final_logit_softcapping is None and cfg.use_qk_norm


def test_presets():
    g3 = GemmaConfig.gemma3_270m()
    assert g3.num_layers == 18 and (g3.num_heads, g3.num_kv_heads, g3.head_dim) == (4, 1, 256)
    assert [i for i, t in enumerate(g3.attn_types) if t == AttentionType.GLOBAL] == [5, 11, 17]
    assert GemmaConfig.gemma2_2b().num_layers == 26 and GemmaConfig.gemma2_9b().num_layers == 42
    assert GemmaConfig.gemma2_2b().attn_types[:2] == (AttentionType.LOCAL_SLIDING,
                                                      AttentionType.GLOBAL)


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*Gemma2ForCausalLM.*Gemma3ForCausalLM"):
        GemmaConfig.from_hf({'architectures': ['LlamaForCausalLM'], 'model_type': 'llama'})


def test_unknown_architecture_folder(tmp_path):
    with open(tmp_path / 'config.json', 'w') as f:
        json.dump({'architectures': ['MistralForCausalLM'], 'model_type': 'mistral'}, f)
    with open(tmp_path / 'model.safetensors', 'wb'):
        pass
    with pytest.raises(ValueError, match='MistralForCausalLM'):
        loading.load_model(str(tmp_path))


def test_float16_is_refused(gemma2):
    _, folder = gemma2
    with pytest.raises(ValueError, match='65504'):
        loading.load_model(folder, 'float16')
    with pytest.raises(ValueError, match='float16'):
        Transformer(GemmaConfig.gemma3_270m(), dtype=jnp.float16, rngs=nnx.Rngs(0))


def test_hub_id_without_network_says_what_to_do():
    # HF_HUB_OFFLINE=1 (conftest): not cached, not reachable.
    with pytest.raises(loading.ModelNotFoundError, match=r'--config\.model\.path=DIR'):
        loading.load_model('mosaic-jax-tests/no-such-gemma')


def test_hub_id_loads_from_the_offline_cache(gemma2, tmp_path, monkeypatch):
    """A repo id already in the Hugging Face cache loads with no network (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants
    from tests import tiny_assets
    _, folder = gemma2
    rev = 'a' * 40
    repo = tmp_path / 'models--mosaic-jax-tests--cached-gemma'
    snapshot = repo / 'snapshots' / rev
    shutil.copytree(folder, snapshot)
    tiny_assets.save_tiny_tokenizer(str(snapshot), ['hello world', 'spam spam'], vocab_size=40)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(rev)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    model = loading.load_model('mosaic-jax-tests/cached-gemma')
    want = loading.load_model(folder)
    np.testing.assert_array_equal(model.layers[3].attn.q_einsum.w[...],
                                  want.layers[3].attn.q_einsum.w[...])
    tok = loading.load_tokenizer('mosaic-jax-tests/cached-gemma')
    assert tok('hello world')['input_ids'][0] == 2  # <bos> first, as saved


def test_missing_local_path():
    with pytest.raises(loading.ModelNotFoundError, match='does not exist'):
        loading.load_model('/nonexistent/dir/for/mosaic')


def test_sharded_checkpoint_loads_the_same(gemma2, tmp_path):
    hf, folder = gemma2
    sharded = helpers.save_model(hf, tmp_path / 'sharded', max_shard_size='40KB')
    assert os.path.exists(os.path.join(sharded, 'model.safetensors.index.json'))
    assert len([f for f in os.listdir(sharded) if f.endswith('.safetensors')]) > 1
    a = nnx.state(loading.load_model(folder))
    b = nnx.state(loading.load_model(sharded))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_bfloat16_safetensors_load(tmp_path):
    """numpy has no bfloat16, so BF16 tensors are read from the raw bytes."""
    import torch
    hf = helpers.tiny_gemma2(seed=2).to(torch.bfloat16)
    folder = helpers.save_model(hf, tmp_path / 'bf16')
    model = loading.load_model(folder)
    want = hf.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.linear.w[...]), want)


def _hf_tensors(hf):
    return {k: v.detach().numpy() for k, v in hf.state_dict().items()}


def test_mapping_rejects_unused_and_mismatched_keys(gemma2):
    hf, folder = gemma2
    cfg = loading.load_model(folder).config
    tensors = _hf_tensors(hf)
    with pytest.raises(ValueError, match='model.layers.0.extra.weight'):
        loading.build_model(cfg, {**tensors, 'model.layers.0.extra.weight': np.zeros(3)})
    with pytest.raises(ValueError, match='model.layers.9.mlp.up_proj.weight'):  # block 9 of 4
        loading.build_model(cfg, {**tensors,
                                  'model.layers.9.mlp.up_proj.weight': np.zeros((128, 64))})
    bad = dict(tensors)
    bad['model.layers.2.self_attn.o_proj.weight'] = np.zeros((64, 32), np.float32)
    with pytest.raises(ValueError, match=r"o_proj.weight.*\(64, 32\).*\(4, 16, 64\)"):
        loading.build_model(cfg, bad)
    del bad['model.layers.2.self_attn.o_proj.weight']
    with pytest.raises(ValueError, match='attn_vec_einsum'):
        loading.build_model(cfg, bad)


def test_non_finite_weights_are_refused_naming_the_tensor(gemma2):
    hf, folder = gemma2
    cfg = loading.load_model(folder).config
    tensors = _hf_tensors(hf)
    w = tensors['model.layers.1.mlp.down_proj.weight'].copy()
    w[3, 5], w[0, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj.weight' has 2 "
                                         r"non-finite values"):
        loading.build_model(cfg, {**tensors, 'model.layers.1.mlp.down_proj.weight': w})


def test_untied_head_is_refused(gemma2):
    hf, folder = gemma2
    cfg = loading.load_model(folder).config
    tensors = _hf_tensors(hf)
    tensors['lm_head.weight'] = tensors['model.embed_tokens.weight'] + 1.0
    with pytest.raises(ValueError, match='untied'):
        loading.build_model(cfg, tensors)


def test_residuals_under_jit_and_pmap(gemma2):
    _, folder = gemma2
    model = loading.load_model(folder)
    graphdef, state = nnx.split(model)
    ids, mask = helpers.padded_batch((24, 17, 9, 20, 5, 24, 11, 3), SEQ, 'left', seed=4)
    want = np.asarray(model.residuals(ids, mask, layers=(3, 1)))            # [2, B, L, D]
    assert want.shape == (2, 8, SEQ, helpers.HIDDEN)

    def fn(state, ids, mask):
        return nnx.merge(graphdef, state).residuals(ids, mask, layers=(3, 1))

    got_jit = jax.jit(fn)(state, ids, mask)
    n = jax.local_device_count()
    got_pmap = jax.pmap(fn, in_axes=(None, 0, 0))(
        state, ids.reshape(n, -1, SEQ), mask.reshape(n, -1, SEQ))          # [n, 2, B/n, L, D]
    got_pmap = np.moveaxis(np.asarray(got_pmap), 0, 1).reshape(want.shape)
    # jax.make_mesh's default axes are Explicit: the embedding gather must name its sharding.
    mesh = jax.make_mesh((n,), ('data',))
    rows, repl = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
    got_mesh = jax.jit(fn)(jax.device_put(state, repl), jax.device_put(ids, rows),
                           jax.device_put(mask, rows))
    # Same float32 math, compiled vs op-by-op: only fusion/reassociation differences
    # (measured ~1e-6 relative to the largest residual).
    real = mask.astype(bool)
    for got in (got_jit, got_pmap, got_mesh):
        assert max(_rel(np.asarray(g), w, real) for g, w in zip(got, want)) < 1e-5


def test_stopping_early_skips_later_blocks(gemma2):
    _, folder = gemma2
    model = loading.load_model(folder)
    ids, mask = helpers.padded_batch(LENGTHS, SEQ, 'right', seed=5)
    before = np.asarray(model.residuals(ids, mask, layers=(0, 1)))
    graphdef, state = nnx.split(model)

    def eqns(layers):
        fn = lambda s: nnx.merge(graphdef, s).residuals(ids, mask, layers=layers)
        return len(jax.make_jaxpr(fn)(state).eqns)
    assert eqns((0,)) < eqns((1,)) < eqns((3,))

    for block in model.layers[2:]:  # poison the blocks a (0, 1) capture must not touch
        block.mlp.linear.w[...] = jnp.nan
    after = model(ids, mask, capture=(0, 1), return_logits=False)
    assert after.logits is None and sorted(after.hidden) == [0, 1]
    np.testing.assert_array_equal(np.stack([after.hidden[0], after.hidden[1]]), before)
    assert np.isnan(np.asarray(model(ids, mask).logits)).all()  # the poison does propagate


@pytest.mark.parametrize('fixture', ['gemma2', 'gemma3'])
def test_public_pieces_are_the_forward(fixture, request):
    """head(run_blocks(embed(ids), attention_info(mask), 0, n)) is __call__, bit for bit."""
    _, folder = request.getfixturevalue(fixture)
    model = loading.load_model(folder)
    n = model.config.num_layers
    ids, mask = map(jnp.asarray, helpers.padded_batch(LENGTHS, SEQ, 'left', seed=6))

    def pieces(m, ids, mask):
        return m.head(m.run_blocks(m.embed(ids), m.attention_info(mask), 0, n))

    def call(m, ids, mask):
        return m(ids, mask).logits
    got = pieces(model, ids, mask)
    assert got.shape == (*ids.shape, model.config.vocab_size) and got.dtype == jnp.float32
    np.testing.assert_array_equal(got, call(model, ids, mask))
    np.testing.assert_array_equal(nnx.jit(pieces)(model, ids, mask),
                                  nnx.jit(call)(model, ids, mask))
    # Split runs compose, and captures are the stream after the block, cast to float32.
    info = model.attention_info(mask)
    x = model.embed(ids)
    half = model.run_blocks(x, info, 0, 2)
    np.testing.assert_array_equal(model.run_blocks(half, info, 2, n),
                                  model.run_blocks(x, info, 0, n))
    np.testing.assert_array_equal(model(ids, mask, capture=(1,)).hidden[1],
                                  half.astype(jnp.float32))
    assert model.run_blocks(x, info, 3, 3) is x  # empty range: the stream as it came


def test_run_blocks_rejects_bad_ranges(gemma2):
    _, folder = gemma2
    model = loading.load_model(folder)
    ids = jnp.ones((1, 4), jnp.int32)
    info, x = model.attention_info(ids), model.embed(ids)
    for start, stop in ((2, 1), (-1, 2), (0, 5), (0, jnp.int32(2))):
        with pytest.raises(ValueError, match=r'0 <= start <= stop <= 4'):
            model.run_blocks(x, info, start, stop)


def test_bad_capture_requests(gemma2):
    _, folder = gemma2
    model = loading.load_model(folder)
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match=r'0\.\.3'):
        model.residuals(ids, ids, layers=(4,))
    with pytest.raises(ValueError, match='capture'):
        model(ids, ids, return_logits=False)


def test_resolve_dtype_accepts_names_and_dtypes():
    assert config_lib.resolve_dtype('bfloat16') == jnp.bfloat16
    assert config_lib.resolve_dtype(jnp.float32) == jnp.float32
    with pytest.raises(ValueError, match='int8'):
        config_lib.resolve_dtype('int8')


@pytest.mark.slow
def test_real_gemma3_270m_gguf_matches_transformers():
    """The pip-shipped Gemma 3 270M: ours vs transformers' own GGUF loading (~3 min)."""
    torch = pytest.importorskip('torch')
    from transformers import AutoModelForCausalLM
    tok = loading.load_tokenizer('gemma3_270m')  # builds once, then ~/.cache/mosaic_jax
    assert tok.padding_side == 'left'
    enc = tok(['The quick brown fox jumps over the lazy dog, then runs into the forest.',
               'Hello there!', 'Spam spam spam, buy now!!!'], padding=True, return_tensors='np')
    ids, mask = enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(np.int32)
    _, path = loading.resolve('gemma3_270m')
    ref = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation='eager').eval()
    want_hidden, want_logits = helpers.hf_reference(ref, ids, mask)
    model = loading.load_model('gemma3_270m')
    assert model.config.num_layers == 18
    out = model(jnp.asarray(ids), jnp.asarray(mask), capture=tuple(range(18)))
    real = mask.astype(bool)
    # Float32 both sides from the same dequantised weights: measured 2.8e-7 on residuals,
    # 4.2e-6 on logits.
    for i in range(17):
        assert _rel(np.asarray(out.hidden[i]), want_hidden[i + 1], real) < F32_TOL, i
    assert _rel(np.asarray(out.logits), want_logits, real) < F32_TOL
    # Why float16 is refused: the BOS residual of this model exceeds float16's 65504.
    assert max(np.abs(h[real]).max() for h in want_hidden[1:18]) > 65504


def test_positions_and_masks_literal():
    """Left padding: positions start at 0 on the first real token; window 2 = self + 1 back."""
    positions, masks = transformer.positions_and_masks(jnp.array([[0, 0, 1, 1, 1]]), 2)
    np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 2]])
    full = [[0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],   # padding rows see nothing (softmax stays finite, uniform)
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1]]
    local = [[0, 0, 0, 0, 0],
             [0, 0, 0, 0, 0],
             [0, 0, 1, 0, 0],
             [0, 0, 1, 1, 0],
             [0, 0, 0, 1, 1]]
    np.testing.assert_array_equal(masks[AttentionType.GLOBAL][0], np.array(full, bool))
    np.testing.assert_array_equal(masks[AttentionType.LOCAL_SLIDING][0], np.array(local, bool))


def test_cached_positions_and_masks_literal():
    """A fresh 5-slot cache fed [pad, a, b] then [c]: `positions_and_masks` of the whole
    sequence, laid out over the cache's slots (window 2 = self + 1 back)."""
    cache = transformer.KVCache(keys=(), values=(), valid=jnp.zeros((1, 5), bool),
                                positions=jnp.zeros((1, 5), jnp.int32),
                                length=jnp.int32(0))
    positions, masks, (valid, key_pos) = transformer.cached_positions_and_masks(
        jnp.array([[0, 1, 1]]), cache, 2)
    np.testing.assert_array_equal(positions, [[0, 0, 1]])
    full = [[0, 0, 0, 0, 0],   # the padding query sees nothing, as in the uncached mask
            [0, 1, 0, 0, 0],
            [0, 1, 1, 0, 0]]
    np.testing.assert_array_equal(masks[AttentionType.GLOBAL][0], np.array(full, bool))
    np.testing.assert_array_equal(masks[AttentionType.LOCAL_SLIDING][0], np.array(full, bool))
    cache = cache.replace(valid=valid, positions=key_pos, length=jnp.int32(3))
    positions, masks, (valid, key_pos) = transformer.cached_positions_and_masks(
        jnp.array([[1]]), cache, 2)
    np.testing.assert_array_equal(positions, [[2]])
    np.testing.assert_array_equal(masks[AttentionType.GLOBAL][0], [[0, 1, 1, 1, 0]])
    np.testing.assert_array_equal(masks[AttentionType.LOCAL_SLIDING][0], [[0, 0, 1, 1, 0]])
    np.testing.assert_array_equal(valid, [[0, 1, 1, 1, 0]])
    np.testing.assert_array_equal(key_pos, [[0, 0, 1, 2, 0]])
    # The same rows as the uncached masks of the 4 tokens, in the first 4 slots.
    _, want = transformer.positions_and_masks(jnp.array([[0, 1, 1, 1]]), 2)
    np.testing.assert_array_equal(masks[AttentionType.LOCAL_SLIDING][0, :, :4],
                                  want[AttentionType.LOCAL_SLIDING][0, 3:])


# Cached vs uncached, both ours. float32: only the attention's longer (masked) key axis and
# XLA's reduction order differ (measured 1.2e-6). bfloat16: those reorderings round at
# 2^-8 per op and compound over the blocks (measured 1.1e-2).
CACHED_TOL = {'float32': 1e-5, 'bfloat16': 3e-2}


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('fixture', ['gemma2', 'gemma3'])
def test_extend_in_chunks_is_the_forward(fixture, dtype, request):
    """A left-padded batch fed to a KV cache in two chunks (20 + 4 tokens, both longer
    than the sliding window) gives `__call__`'s logits on every real token."""
    _, folder = request.getfixturevalue(fixture)
    model = loading.load_model(folder, dtype)
    ids, mask = map(jnp.asarray, helpers.padded_batch(LENGTHS, SEQ, 'left', seed=6))
    want = np.asarray(model(ids, mask).logits)                       # [B, L, V]
    cache = model.init_cache(len(LENGTHS), SEQ + 6)                   # spare slots stay empty
    first, cache = model.extend(ids[:, :20], mask[:, :20], cache)
    second, cache = model.extend(ids[:, 20:], mask[:, 20:], cache)
    assert int(cache.length) == SEQ and cache.keys[0].dtype == model.dtype
    last, _ = model.extend(ids[:, 20:], mask[:, 20:], cache, last_only=True)
    assert last.shape == (len(LENGTHS), 1, model.config.vocab_size)
    got = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
    assert _rel(got, want, np.asarray(mask).astype(bool)) < CACHED_TOL[dtype]
