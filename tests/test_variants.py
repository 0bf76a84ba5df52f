"""variants.py: the one width parser (Gemma Scope's width names) and variant names."""
import pytest

from mosaic_jax.variants import parse_width, width_order


@pytest.mark.parametrize('name, width', [
    ('4k', 4096), ('16k', 16384), ('32k', 32768), ('65k', 65536), ('131k', 131072),
    ('262k', 262144), ('524k', 524288), ('1m', 1048576), ('128', 128), ('3k', 3072),
    (4096, 4096)])
def test_gemma_scope_width_names(name, width):
    # Gemma Scope's width_65k SAEs have d_sae = 65536 (2**16), not 65 * 1024.
    assert parse_width(name) == width


def test_bad_width_and_order():
    with pytest.raises(ValueError, match='not like 16k'):
        parse_width('16q')
    assert sorted(['1m', '65k', '16k', 'x'], key=width_order) == ['16k', '65k', '1m', 'x']
