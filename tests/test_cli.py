"""The CLI: every shipped config parses, --config.x=y overrides apply, typos fail."""
import glob
import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from mosaic_jax import checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if os.path.basename(p) not in ('__init__.py', 'common.py'))


def parse(argv):
    argv = ['main.py'] + argv
    fv = flags.FlagValues()
    # sys_argv: config_flags finds the --config.x overrides in it (default: sys.argv).
    config_flags.DEFINE_config_file('config', None, 'cfg', flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def test_all_configs_are_shipped():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {'base.py', 'gemma2b.py', 'gemma9b.py', 'gemma9b_it.py', 'gemma3_270m.py',
            'tiny.py'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_parses_and_validates(path):
    c = parse([f'--config={path}'])
    if os.path.basename(path) == 'tiny.py':  # the tests supply the tiny model's files
        c.unlock()
        c.model.path, c.sae.source = '/m', '/s/{layer}'
    checks.validate(c)


def test_overrides_apply():
    c = parse([f'--config={ROOT}/configs/gemma2b.py', '--config.model.dtype=bfloat16',
               '--config.layers=(3,7)', '--config.features.threshold=0.5',
               "--config.sae.widths=('65k',)", '--config.model.path=/data/g2'])
    assert c.model.dtype == 'bfloat16'
    assert tuple(c.layers) == (3, 7)
    assert c.features.threshold == 0.5
    assert tuple(c.sae.widths) == ('65k',)
    assert c.model.path == '/data/g2'


def test_smoke_arg_shrinks():
    full = parse([f'--config={ROOT}/configs/gemma3_270m.py'])
    smoke = parse([f'--config={ROOT}/configs/gemma3_270m.py:smoke'])
    assert smoke.data.max_rows < full.data.max_rows
    assert len(smoke.layers) < len(full.layers)


def test_typo_in_override_fails():
    with pytest.raises(Exception, match='modle'):
        parse([f'--config={ROOT}/configs/gemma2b.py', '--config.modle.dtype=bfloat16'])


def test_invalid_combination_is_one_clear_error():
    c = parse([f'--config={ROOT}/configs/gemma2b.py', '--config.model.dtype=float16',
               "--config.features.pooling=('mean','median')"])
    with pytest.raises(checks.UserError) as e:
        checks.validate(c)
    assert 'float16' in str(e.value) and 'median' in str(e.value)


def test_missing_weights_offline_is_one_line_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu')
    r = subprocess.run(
        [sys.executable, 'main.py', '--config=configs/gemma2b.py',
         f'--config.workdir={tmp_path}', '--config.parallel.mode=single'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert 'model.path' in r.stderr, r.stderr[-3000:]
