"""The CLI: every shipped config parses, --config.x=y overrides apply, typos fail.

Bad input (an unknown or mistyped override, a missing config file, a `UserError`) is one
`error:` line on stderr and exit status 2, with the traceback only under --verbosity=1; the
`mosaic-jax` console script of a real install runs the same entry point from anywhere.
"""
import glob
import os
import re
import shutil
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


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu', **extra)
    if 'PYTHONPATH' not in extra:
        env.pop('PYTHONPATH', None)
    return env


def _main(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=300)


def _one_error_line(r) -> str:
    """Asserts `r` failed as bad input: exit 2, stderr exactly one `error:` line."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-3000:]
    return lines[0]


def test_missing_weights_offline_is_one_line_no_traceback(tmp_path):
    # Inputs checked before the model loads are available offline (a sae_probes dataset,
    # the shipped SAEs), so the run gets as far as the model, whose weights are missing.
    saes = os.path.join(ROOT, 'checkpoints', 'gemma3_270m', 'layer_{layer}_width_{width}')
    r = _main('--config=configs/gemma2b.py', f'--config.workdir={tmp_path}',
              '--config.parallel.mode=single', "--config.data.datasets=('sae_probes:95_toxic_is',)",
              '--config.data.max_rows=50', '--config.layers=(8,)', "--config.sae.widths=('4k',)",
              '--config.sae.exclude=()', f'--config.sae.source={saes}', cwd=ROOT)
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert 'model.path' in r.stderr, r.stderr[-3000:]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len([ln for ln in r.stderr.splitlines() if 'error' in ln.lower()]) == 1, r.stderr
    assert not re.search(r'^I\d{4} ', r.stderr, re.M), r.stderr[-3000:]  # no INFO logs
    _one_error_line(r)


@pytest.mark.parametrize('args, names', [
    (['--config.nope=1'], ["'nope'", '--config.nope=1']),
    (['--config.model.dtyp=bfloat16'], ["'model.dtyp'", 'Did you mean "dtype"']),
    (['--config.seed=abc'], ['--config.seed=abc', 'invalid literal for int']),
    (['--config.model=3'], ['--config.model=3']),
    (['--config.probe.standardize=maybe'], ['--config.probe.standardize=maybe']),
], ids=['unknown', 'typo', 'type', 'dict', 'bool'])
def test_bad_override_is_one_error_line(args, names):
    line = _one_error_line(_main(f'--config={ROOT}/configs/gemma2b.py', *args))
    for name in names:
        assert name in line, line


def test_missing_config_file_is_one_error_line(tmp_path):
    line = _one_error_line(_main('--config=configs/nope.py', cwd=tmp_path))
    assert line == f'error: config file not found: configs/nope.py (relative to {tmp_path})'
    line = _one_error_line(_main('--config=/nonexistent/nope.py', '--config.seed=1'))
    assert line == 'error: config file not found: /nonexistent/nope.py'
    assert 'required' in _one_error_line(_main())


def test_broken_config_file_is_one_error_line(tmp_path):
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / '__init__.py').write_text('')
    path = tmp_path / 'configs' / 'broken.py'
    path.write_text('def get_config(arg=None):\n    return 1 / 0\n')
    line = _one_error_line(_main(f'--config={path}', cwd=ROOT))
    assert line == f'error: config file {path}: ZeroDivisionError: division by zero'
    line = _one_error_line(_main('--config=configs/gemma2b.py:bogus'))
    assert "unknown config arg 'bogus'" in line, line


def test_verbosity_1_shows_the_traceback(tmp_path):
    r = _main('--config=configs/gemma2b.py', '--config.nope=1', '--verbosity=1')
    assert r.returncode == 2 and 'Traceback' in r.stderr, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1] == "error: unknown config field 'nope' in --config.nope=1"
    # A UserError raised inside the run: the traceback ends in it, then the one line.
    args = ('--config=configs/gemma2b.py', '--config.mode=report',
            f'--config.workdir={tmp_path}/none')
    quiet, verbose = _main(*args), _main(*args, '-v', '1')
    assert 'does not exist' in _one_error_line(quiet)
    assert verbose.returncode == 2 and 'mosaic_jax.checks.UserError' in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == quiet.stderr.strip()


def test_help_is_fast_and_lists_the_flags(tmp_path):
    r = _main('--help', cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # absl's --help exits 1
    assert 'mosaic-jax --config=' in r.stdout and '--config:' in r.stdout
    assert '--verbosity' in r.stdout and not r.stderr


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """A real (non-editable) install with its `mosaic-jax` script, from a copy of the
    sources (building in the repo itself would race with test_install's build)."""
    src = tmp_path_factory.mktemp('src')
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, 'mosaic_jax'), src / 'mosaic_jax',
                    ignore=shutil.ignore_patterns('__pycache__'))
    target = tmp_path_factory.mktemp('site')
    r = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps',
                        '--no-build-isolation', '--no-compile', '--target', str(target), str(src)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TMPDIR=str(tmp_path_factory.mktemp('build'))))
    assert r.returncode == 0, r.stderr[-3000:]
    script = target / 'bin' / 'mosaic-jax'
    assert script.is_file(), sorted(os.listdir(target))
    return str(target), str(script)


def test_console_script_help_runs_the_installed_copy(installed, tmp_path):
    target, script = installed
    r = subprocess.run([script, '--help'], cwd=tmp_path, env=_env(PYTHONPATH=target),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and '--config:' in r.stdout, r.stderr[-3000:]
    # The same script run in-process, reporting which mosaic_jax.cli it ran.
    code = (f'import atexit, runpy, sys\nsys.path.insert(0, {target!r})\n'
            "atexit.register(lambda: print('CLI=' + sys.modules['mosaic_jax.cli'].__file__))\n"
            f'sys.argv = [{script!r}, "--help"]\nrunpy.run_path({script!r}, run_name="__main__")\n')
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-3000:]
    ran = r.stdout.split('CLI=')[-1].strip()
    assert ran == os.path.join(target, 'mosaic_jax', 'cli.py'), r.stdout[-3000:]


def test_console_script_loads_repo_configs_from_elsewhere(installed, tmp_path):
    """`from configs import base, common` in the config file resolves from any cwd."""
    target, script = installed
    args = [script, f'--config={ROOT}/configs/gemma3_270m.py', '--config.mode=report',
            '--config.workdir=none']

    def run(*extra):
        return subprocess.run([*args, *extra], cwd=tmp_path, env=_env(PYTHONPATH=target),
                              capture_output=True, text=True, timeout=300)

    line = _one_error_line(run())
    assert line == "error: report of 'none': report: workdir 'none' does not exist", line
    verbose = run('--verbosity=1')  # the traceback shows the installed copy ran
    assert verbose.returncode == 2, verbose.stderr[-3000:]
    assert os.path.join(target, 'mosaic_jax', 'cli.py') in verbose.stderr, verbose.stderr
