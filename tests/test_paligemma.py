"""PaliGemma 2 (SigLIP tower + projector + Gemma 2 decoder) vs transformers' torch model."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paligemma_helpers as ph
from mosaic_jax.models import loading, paligemma, paligemma_loading, siglip
from mosaic_jax.models.config import AttentionType

# Both sides run float32; the op order differs (einsum vs conv / bmm), so differences are
# rounding-sized: measured max |diff| / max |ref| is ~2e-6; 1e-4 is the bound.
REL = 1e-4


def _rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    folder = ph.tiny_paligemma_dir(tmp_path_factory.mktemp('pg'))
    return ph.tiny_paligemma(), loading.load_model(folder), folder


@pytest.fixture(scope='module')
def batch():
    # Left padding of 0, 4 and 2; row 1 has a 2-token suffix (causal part of the mask).
    return ph.image_batch(lengths=[7, 3, 5], suffixes=[0, 2, 0], seq_len=ph.NUM_IMAGE_TOKENS + 7)


def test_load_model_dispatches_on_model_type(tiny):
    _, ours, _ = tiny
    assert isinstance(ours, paligemma.PaliGemma)
    assert ours.config.num_image_tokens == ph.NUM_IMAGE_TOKENS
    assert ours.config.image_token_id == ph.IMAGE_TOKEN


def test_vision_tower_and_projector_match(tiny, batch):
    ref, ours, _ = tiny
    ids, mask, types, pixels = batch
    _, tower, feats = ph.hf_reference(ref, ids, mask, types, pixels)
    assert _rel(np.asarray(ours.vision_tower(jnp.asarray(pixels))), tower) < REL
    assert _rel(np.asarray(ours.image_features(jnp.asarray(pixels))), feats) < REL


def test_decoder_residuals_match_with_padding_and_suffix(tiny, batch):
    ref, ours, _ = tiny
    ids, mask, types, pixels = batch
    hidden, _, _ = ph.hf_reference(ref, ids, mask, types, pixels)
    layers = (0, 1, 2)  # the last block is not compared: HF's last entry is final-normed
    got = np.asarray(ours.residuals(ids, mask, layers, pixels, types))
    assert got.shape == (3, *ids.shape, 32) and got.dtype == np.float32
    real = mask.astype(bool)  # padding rows are not defined by either side
    for j, layer in enumerate(layers):
        assert _rel(got[j][real], hidden[layer + 1][real]) < REL, layer


def test_no_token_types_means_all_prefix(tiny, batch):
    ref, ours, _ = tiny
    ids, mask, _, pixels = batch
    zeros = np.zeros_like(ids)
    hidden, _, _ = ph.hf_reference(ref, ids, mask, zeros, pixels)
    got = np.asarray(ours.residuals(ids, mask, (1,), pixels))
    real = mask.astype(bool)
    assert _rel(got[0][real], hidden[2][real]) < REL


def test_jit_equals_eager(tiny, batch):
    _, ours, _ = tiny
    ids, mask, types, pixels = batch
    eager = ours.residuals(ids, mask, (2,), pixels, types)

    @jax.jit
    def run(i, m, t, p):
        return ours.residuals(i, m, (2,), p, t)
    # Same float32 graph; XLA may fuse differently under jit.
    np.testing.assert_allclose(run(ids, mask, types, pixels), eager, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_real_tokens(tiny, batch):
    _, ours, _ = tiny
    ids, mask, types, pixels = batch
    padded = np.asarray(ours.residuals(ids, mask, (2,), pixels, types))[0]
    n = int(mask[1].sum())
    alone = np.asarray(ours.residuals(ids[1:2, -n:], mask[1:2, -n:], (2,), pixels[1:2],
                                      types[1:2, -n:]))[0]
    # Padding keys are masked to exactly zero weight; only reduction order can differ.
    np.testing.assert_allclose(padded[1, -n:], alone[0], rtol=1e-5, atol=1e-5)


def test_prefix_mask_literal():
    # One row: pad, 2 prefix tokens, 2 suffix tokens; window 2.
    mask = jnp.array([[0, 1, 1, 1, 1]])
    types = jnp.array([[0, 0, 0, 1, 1]])
    info = paligemma.prefix_attention_info(mask, types, sliding_window=2)
    np.testing.assert_array_equal(info.positions, [[0, 1, 2, 3, 4]])
    t, f = True, False
    # Rows are queries 1..4 (the padding query's row is undefined on both sides).
    want_global = [[f, t, t, f, f],   # prefix sees the whole prefix (also ahead)
                   [f, t, t, f, f],
                   [f, t, t, t, f],   # suffix: causal
                   [f, t, t, t, t]]
    np.testing.assert_array_equal(np.asarray(info.masks[AttentionType.GLOBAL][0])[1:],
                                  want_global)
    want_local = [[f, t, t, f, f],
                  [f, t, t, f, f],
                  [f, f, t, t, f],    # window 2: query 3 sees keys 2, 3
                  [f, f, f, t, t]]
    np.testing.assert_array_equal(np.asarray(info.masks[AttentionType.LOCAL_SLIDING][0])[1:],
                                  want_local)


def test_position_mask():
    ids = jnp.array([[0, 9, 9, 2, 5, 6]])
    mask = jnp.array([[0, 1, 1, 1, 1, 1]])
    img = paligemma.position_mask(ids, mask, 'image', image_token_id=9)
    txt = paligemma.position_mask(ids, mask, 'prompt', image_token_id=9, exclude_ids=(2,))
    both = paligemma.position_mask(ids, mask, 'both', image_token_id=9)
    np.testing.assert_array_equal(img, [[0, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(txt, [[0, 0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(both, [[0, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="positions='pixels'"):
        paligemma.position_mask(ids, mask, 'pixels', image_token_id=9)


def test_bad_inputs_have_clear_messages(tiny):
    _, ours, _ = tiny
    with pytest.raises(ValueError, match=r'row 1 of input_ids has 3 <image> tokens'):
        paligemma.check_image_tokens(np.array([[95] * 16, [95] * 3 + [4] * 13]), 95, 16)
    with pytest.raises(ValueError, match=r'takes \[B, 3, 28, 28\]'):
        ours.vision_tower(jnp.zeros((1, 3, 32, 32)))


def test_hub_key_layout_loads(tiny, tmp_path):
    """The hub's key names (vision_tower.vision_model.*) give the same model."""
    from safetensors.numpy import load_file, save_file
    _, ours, folder = tiny
    tensors = load_file(os.path.join(folder, 'model.safetensors'))
    hub = {k.replace('vision_tower.', 'vision_tower.vision_model.', 1): v
           for k, v in tensors.items()}
    os.makedirs(tmp_path / 'hub')
    save_file(hub, str(tmp_path / 'hub' / 'model.safetensors'))
    with open(os.path.join(folder, 'config.json')) as f:
        cfg = json.load(f)
    with open(tmp_path / 'hub' / 'config.json', 'w') as f:
        json.dump(cfg, f)
    again = loading.load_model(str(tmp_path / 'hub'))
    px = jnp.ones((1, 3, 28, 28)) * 0.5
    np.testing.assert_array_equal(again.image_features(px), ours.image_features(px))


def test_sparse_hub_config_gets_transformers_defaults(tmp_path):
    # google/paligemma2-3b-pt-224's config.json omits head_dim (Gemma 2 default 256, not
    # 2304 / 8 = 288) and image_size (224).
    sparse = {'model_type': 'paligemma', 'image_token_index': 257152, 'projection_dim': 2304,
              'text_config': {'model_type': 'gemma2', 'hidden_size': 2304,
                              'intermediate_size': 9216, 'num_attention_heads': 8,
                              'num_hidden_layers': 26, 'num_key_value_heads': 4,
                              'query_pre_attn_scalar': 256, 'sliding_window': 4096,
                              'vocab_size': 257216, 'final_logit_softcapping': 30.0,
                              'attn_logit_softcapping': 50.0},
              'vision_config': {'model_type': 'siglip_vision_model', 'hidden_size': 1152,
                                'intermediate_size': 4304, 'num_attention_heads': 16,
                                'num_hidden_layers': 27, 'patch_size': 14,
                                'projection_dim': 2304, 'vision_use_head': False}}
    with open(tmp_path / 'config.json', 'w') as f:
        json.dump(sparse, f)
    cfg = paligemma.PaliGemmaConfig.from_hf(paligemma_loading.resolved_hf_config(str(tmp_path)))
    assert cfg == paligemma.PaliGemmaConfig.paligemma2_3b_224()
    assert cfg.num_image_tokens == 256


def test_paligemma1_and_pooling_head_refused():
    base = ph.tiny_paligemma_config().to_dict()
    gemma1 = dict(base, text_config=dict(base['text_config'], model_type='gemma'))
    with pytest.raises(ValueError, match='only PaliGemma 2'):
        paligemma.PaliGemmaConfig.from_hf(gemma1)
    with pytest.raises(ValueError, match='vision_use_head'):
        siglip.SiglipConfig.from_hf(dict(base['vision_config'], vision_use_head=True))


def test_unused_checkpoint_tensor_is_named(tiny):
    _, ours, folder = tiny
    from safetensors.numpy import load_file
    tensors = dict(load_file(os.path.join(folder, 'model.safetensors')))
    tensors['vision_tower.head.probe'] = np.zeros((1, 1, 32), np.float32)
    with pytest.raises(ValueError, match='vision_tower.head.probe|head.probe'):
        paligemma_loading.build(ours.config, tensors)
