"""Offline end to end below the CLI: real digit images -> tiny PaliGemma -> SAE features ->
probe, beside the pixel baseline (the CLI wiring is proposed in docs, not done here)."""
import os
import sys

import numpy as np
import pytest

import paligemma_helpers as ph
import tiny_assets
from mosaic_jax import features
from mosaic_jax.data import images
from mosaic_jax.experiments import image_study
from mosaic_jax.models import loading
from mosaic_jax.sae import loading as sae_loading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'scripts'))
import digits_to_folder  # noqa: E402


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('study')
    folder = ph.tiny_paligemma_dir(root)
    tiny_assets.save_tiny_tokenizer(folder, ['caption en', 'what digit is this'], vocab_size=60)
    digits_to_folder.convert(str(root / 'digits'), per_class=4)
    return loading.load_model(folder), loading.load_tokenizer(folder), root


def test_features_from_images_end_to_end(setup):
    from sklearn.linear_model import LogisticRegression
    model, tok, root = setup
    ds = images.load_folder(str(root / 'digits'))
    sp = images.split(ds, seed=0, fractions=(0.5, 0.25, 0.25))
    saes = {1: sae_loading.from_arrays(tiny_assets.random_sae_arrays(32, 64, seed=1), where='tiny')}
    spec = image_study.ReadSpec(layers=(1, 2), positions='both', poolings=('mean', 'max'),
                                batch_size=16)
    feats = image_study.extract(model, tok, ds, spec, saes)
    assert set(feats) == {('hidden', 1, 'mean'), ('hidden', 1, 'max'), ('hidden', 2, 'mean'),
                          ('hidden', 2, 'max'), ('sae', 1, 'mean'), ('sae', 1, 'max')}
    assert feats[('sae', 1, 'mean')].shape == (40, 64)
    assert feats[('hidden', 2, 'mean')].shape == (40, 32)
    x = feats[('hidden', 2, 'mean')]
    probe = LogisticRegression(max_iter=500).fit(x[sp.train], ds.labels[sp.train])
    assert 0 <= probe.score(x[sp.test], ds.labels[sp.test]) <= 1
    pixels = images.downsampled_pixels(ds.images, side=8)
    assert LogisticRegression(max_iter=500).fit(pixels[sp.train], ds.labels[sp.train]).score(
        pixels[sp.test], ds.labels[sp.test]) > 0.5  # real digits: the pixel baseline works


def test_positions_select_the_right_tokens(setup):
    model, tok, root = setup
    ds = images.load_folder(str(root / 'digits')).subset([0, 1])
    ids, mask, pixels = next(image_study.batches(model, tok, ds, image_study.ReadSpec((0,))))
    out = {}
    for where in ('image', 'prompt', 'both'):
        spec = image_study.ReadSpec(layers=(0,), positions=where, poolings=('sum',))
        res, pos = image_study.make_reader(model, spec, tok.bos_token_id)(ids, mask, pixels)
        out[where] = np.asarray(features.pool(res[0], pos, 'sum'))
        n_text = ids.shape[1] - ph.NUM_IMAGE_TOKENS - 1  # BOS left out
        assert int(pos[0].sum()) == {'image': ph.NUM_IMAGE_TOKENS, 'prompt': n_text,
                                     'both': ph.NUM_IMAGE_TOKENS + n_text}[where]
    # Sums over disjoint position sets add up (float32 rounding only).
    np.testing.assert_allclose(out['image'] + out['prompt'], out['both'], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="features.positions='pixels'"):
        image_study.make_reader(model, image_study.ReadSpec((0,), positions='pixels'), 2)


def test_paligemma2_3b_config_fits_the_architecture():
    from configs import paligemma2_3b
    from mosaic_jax.models import paligemma
    c = paligemma2_3b.get_config()
    arch = paligemma.PaliGemmaConfig.paligemma2_3b_224()
    assert max(c.layers) < arch.text.num_layers and arch.text.embed_dim == 2304
    assert arch.num_image_tokens == 256 and c.model.max_length >= 256 + 3
    assert c.features.positions in paligemma.POSITIONS
    spec = image_study.ReadSpec(layers=tuple(c.layers), positions=c.features.positions,
                                poolings=tuple(c.features.pooling), prompt=c.data.prompt)
    assert spec.prompt == 'caption en'
    assert paligemma2_3b.get_config('smoke').layers == (12,)
