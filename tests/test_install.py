"""A non-editable install runs from another directory: no package code needs the source tree.

The package is installed with `pip install --no-deps --target` (a real, non-editable copy),
then a run is started from an unrelated working directory with that copy first on the path.
The repository only provides what a user also keeps beside the package: main.py, configs/
and the shipped checkpoints/ (found by the config file relative to itself).
"""
import os
import subprocess
import sys
import textwrap

import pytest

from tests import test_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp('site')
    build = tmp_path_factory.mktemp('build')
    r = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps',
                        '--no-build-isolation', '--no-compile', '--target', str(target), ROOT],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TMPDIR=str(build)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isdir(target / 'mosaic_jax')
    return str(target)


def _run(installed, cwd, code):
    """Runs `code` with the installed copy first on sys.path and the repo after it (for
    configs/ only), from `cwd`."""
    prelude = textwrap.dedent(f'''
        import sys
        sys.path[:0] = [{installed!r}, {ROOT!r}]
        import mosaic_jax
        assert mosaic_jax.__file__.startswith({installed!r}), mosaic_jax.__file__
    ''')
    env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=8')
    env.pop('PYTHONPATH', None)
    return subprocess.run([sys.executable, '-c', prelude + textwrap.dedent(code)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_installed_package_loads_the_shipped_saes_from_elsewhere(installed, tmp_path):
    r = _run(installed, tmp_path, '''
        from configs import gemma3_270m
        from mosaic_jax.experiments import assets
        saes = assets.load_saes(gemma3_270m.get_config(), 640)
        print(sorted(k.name for k in saes))
    ''')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'layer_8/16k' in r.stdout and 'layer_13/4k' in r.stdout


def test_installed_package_runs_main_from_elsewhere(installed, tmp_path):
    tiny = test_pipeline._build(str(tmp_path / 'assets'))
    work = tmp_path / 'elsewhere'
    work.mkdir()
    r = _run(installed, work, f'''
        import runpy
        sys.argv = ['main.py', '--config={ROOT}/configs/tiny.py',
                    '--config.model.path={tiny["model_dir"]}',
                    '--config.sae.source={tiny["folder"]}/sae_layer_{{layer}}',
                    '--config.workdir=out', '--config.run_id=r1', '--config.cv_folds=0']
        runpy.run_path({os.path.join(ROOT, 'main.py')!r}, run_name='__main__')
    ''')
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(work / 'out' / 'tiny' / '_runs' / 'r1' / 'summary.csv')
