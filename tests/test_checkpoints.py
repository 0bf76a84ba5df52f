"""The shipped Gemma 3 270M SAEs load through the demo config's source template."""
import json
import os

import numpy as np
import pytest

from configs import gemma3_270m
from mosaic_jax.experiments import assets
from mosaic_jax.sae import loading as sae_loading
from mosaic_jax.variants import parse_width

CONFIG = gemma3_270m.get_config()
GRID = assets.sae_grid(CONFIG)


def test_demo_grid_is_the_papers_depths_plus_a_width_comparison():
    assert GRID == [(3, '4k'), (8, '4k'), (8, '16k'), (13, '4k')]


@pytest.mark.parametrize('layer,width', GRID, ids=lambda v: str(v))
def test_shipped_sae_loads_with_metadata(layer, width):
    src = assets.resolve_sae_source(CONFIG.sae.source, layer, width)
    assert os.path.isdir(src), f'missing shipped SAE {src}'
    params = sae_loading.load_sae(src, d_model=640)
    assert params.width == parse_width(width)
    meta = json.load(open(os.path.join(src, 'metadata.json')))
    assert meta['layer'] == layer and meta['width'] == params.width
    for key in ('l0', 'fve', 'dead_fraction', 'loss_increase', 'training_tokens', 'date'):
        assert key in meta, key
    # Decoder rows are kept at unit norm during training (Gemma Scope recipe); bfloat16
    # storage rounds each entry by <= 2^-8 relative, so norms stay within 1%.
    norms = np.linalg.norm(np.asarray(params.w_dec, np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-2)
    assert np.all(np.asarray(params.threshold) > 0)
