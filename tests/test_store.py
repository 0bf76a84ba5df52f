"""store.py: exact compact encoding, shards (torn ones recomputed), and runs that read the
store: a settings-only rerun extracts nothing, a killed run resumes to the same summary."""
import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mosaic_jax import store
from tests import test_pipeline


def _codes(n=40, f=300, seed=0):
    r = np.random.default_rng(seed)
    x = r.exponential(3.0, (n, f)).astype(np.float32) * (r.uniform(size=(n, f)) < 0.05)
    return x


@pytest.mark.parametrize('kind', ['sparse_float', 'counts', 'binarized', 'dense', 'wide'])
def test_encode_decode_is_exact_and_compact(kind):
    x = _codes()
    if kind == 'counts':
        x = np.floor(x).astype(np.float32)          # top-n counts: small integers as float32
    elif kind == 'binarized':
        x = (x > 1.0).astype(np.uint8)
    elif kind == 'dense':
        x = np.random.default_rng(1).normal(size=(40, 64)).astype(np.float32)  # hidden states
    elif kind == 'wide':
        x = np.zeros((5, 70_000), np.float32)
        x[np.arange(5), [3, 65_999, 66_000, 69_999, 0]] = [1.5, 2.0, 3.25, 4.0, 5.0]
    arrays = store.encode(x, 'v.')
    back = store.decode(arrays, 'v.')
    assert back.dtype == x.dtype and back.shape == x.shape
    np.testing.assert_array_equal(back, x)  # exact, not close
    rows = np.array([3, 2, 2])
    np.testing.assert_array_equal(store.decode(arrays, 'v.', rows), x[rows])
    stored = sum(a.nbytes for k, a in arrays.items() if not k.endswith('meta'))
    if kind in ('counts', 'binarized'):
        assert arrays['v.data'].dtype == np.uint8
    if kind != 'dense':
        assert stored < 0.25 * x.size * 4  # far below dense float32
    else:
        assert arrays['v.data'].dtype == np.float32


def test_group_reads_in_the_asked_order_and_drops_a_torn_shard(tmp_path, caplog):
    x, y = _codes(seed=2), _codes(seed=3)
    keys = store.text_keys([[2, i, i + 1] for i in range(40)])
    g = store.Group.open(str(tmp_path), 'grp', ['a', 'b'], {'kind': 'test'})
    g.write(keys[:25], {'a': x[:25], 'b': y[:25]})
    g.write(keys[25:], {'a': x[25:], 'b': y[25:]})
    order = np.random.default_rng(0).permutation(40)
    again = store.Group.open(str(tmp_path), 'grp', ['a', 'b'], {'kind': 'test'})
    np.testing.assert_array_equal(again.read('b', keys[order]), y[order])
    assert len(again.missing(keys)) == 0
    shard = sorted(p for p in os.listdir(tmp_path / 'grp') if p.startswith('shard-'))[0]
    path = tmp_path / 'grp' / shard
    path.write_bytes(path.read_bytes()[:-100])  # a torn write (e.g. a copy cut short)
    torn = store.Group.open(str(tmp_path), 'grp', ['a', 'b'], {'kind': 'test'})
    assert 'torn' in caplog.text and not path.exists()
    assert len(torn.missing(keys)) in (25, 15)  # that shard's texts: computed again


def test_stored_features_hold_what_fits_the_byte_budget(tmp_path):
    names = ('a', 'b', 'c')
    g = store.Group.open(str(tmp_path), 'g', names, {})
    keys = store.text_keys([[1, 2], [3], [4, 5, 6]])
    vals = {n: np.full((3, 100), i + 1, np.float32) for i, n in enumerate(names)}  # 1200 B
    g.write(keys, vals)
    for budget, held in ((10_000, 3), (2_000, 1)):
        f = store.StoredFeatures({n: (g, n) for n in names}, keys, held_bytes=budget)
        for n in names:
            np.testing.assert_array_equal(f[n], vals[n])
        assert list(f._held) == list(names[-held:])  # the last read always stays
        assert f['c'] is f['c']                       # a held variant is not read again


def test_text_keys_follow_the_token_ids():
    k = store.text_keys([[2, 5, 6], [2, 5, 6], [2, 5], [5, 6]])
    assert (k[0] == k[1]).all() and not (k[0] == k[2]).all() and not (k[0] == k[3]).all()


# ----------------------------------------------------------------------------------------
# Runs through the store (the tiny model; subprocesses)
# ----------------------------------------------------------------------------------------

FAST = ('--verbosity=1', "--config.baselines=('hidden_last','tfidf')", '--config.cv_folds=0',
        "--config.features.pooling=('mosaic','max')")


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return test_pipeline._build(str(tmp_path_factory.mktemp('tiny_store')))


def _summary(workdir, run_id):
    path = os.path.join(workdir, 'tiny', '_runs', run_id, 'summary.csv')
    rows = list(csv.DictReader(open(path)))
    return sorted(tuple((k, v) for k, v in r.items() if k != 'seconds') for r in rows)


def _command(tiny, workdir, *extra):
    return [sys.executable, 'main.py', '--config=configs/tiny.py',
            f'--config.model.path={tiny["model_dir"]}',
            f'--config.sae.source={tiny["folder"]}/sae_layer_{{layer}}',
            f'--config.workdir={workdir}', *FAST, *extra]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu',
                XLA_FLAGS='--xla_force_host_platform_device_count=8')


def _shards(workdir):
    return [f for d, _, fs in os.walk(os.path.join(workdir, '_features')) for f in fs
            if f.startswith('shard-')]


def test_probe_settings_rerun_extracts_nothing_and_matches_no_store(tiny, tmp_path):
    run = lambda *a: test_pipeline._main(tiny, tmp_path, *FAST, *a)  # noqa: E731
    first = run('--config.run_id=a')
    assert first.returncode == 0, first.stderr[-3000:]
    assert 'extracted 200 texts' in first.stderr and _shards(tmp_path)
    again = run('--config.run_id=b', '--config.probe.Cs=(0.3,3.0)', '--config.seeds=(0,1)')
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'all 200 texts read from the store; nothing extracted' in again.stderr
    assert 'extract:' not in again.stderr  # no progress bar: no batch ran
    off = test_pipeline._main(tiny, tmp_path / 'off', *FAST, '--config.run_id=a',
                              '--config.store.enabled=False')
    assert off.returncode == 0, off.stderr[-3000:]
    assert not os.path.exists(tmp_path / 'off' / '_features')
    assert _summary(tmp_path, 'a') == _summary(tmp_path / 'off', 'a')  # stored == in memory


def test_sigkill_mid_extraction_resumes_to_the_same_summary(tiny, tmp_path):
    ref = test_pipeline._main(tiny, tmp_path / 'ref', *FAST, '--config.run_id=r')
    assert ref.returncode == 0, ref.stderr[-3000:]
    n_groups = len(os.listdir(tmp_path / 'ref' / '_features'))
    work = tmp_path / 'killed'
    cmd = _command(tiny, work, '--config.run_id=r', '--config.store.shard_texts=16')
    # A random batch (seeded: the same one every run of the suite) among 13.
    k = int(np.random.default_rng(7).integers(1, 8))
    p = subprocess.Popen(cmd, cwd=test_pipeline.ROOT, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(_shards(work)) < k * n_groups and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, 'the run ended before it could be killed'
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(work / 'tiny' / '_runs' / 'r' / 'summary.csv')
    stored = len(_shards(work))
    r = subprocess.run(cmd, cwd=test_pipeline.ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'feature store: resuming' in r.stderr and stored >= k * n_groups
    assert _summary(work, 'r') == _summary(tmp_path / 'ref', 'r')
    # A torn shard: detected, its texts computed again, the same numbers.
    path = os.path.join(work, '_features', sorted(os.listdir(work / '_features'))[0])
    shard = os.path.join(path, sorted(f for f in os.listdir(path) if f.startswith('shard-'))[0])
    with open(shard, 'r+b') as f:
        f.truncate(os.path.getsize(shard) // 2)
    cmd = _command(tiny, work, '--config.run_id=t', '--config.store.shard_texts=16')
    r = subprocess.run(cmd, cwd=test_pipeline.ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'torn' in r.stderr and 'resuming' in r.stderr
    assert _summary(work, 't') == _summary(tmp_path / 'ref', 'r')


def test_a_new_sae_computes_only_that_sae(tiny, tmp_path):
    one = test_pipeline._main(tiny, tmp_path, *FAST, '--config.run_id=a', '--config.layers=(1,)')
    assert one.returncode == 0, one.stderr[-3000:]
    assert 'computing 2 of 2 feature groups' in one.stderr  # layer 1: its SAE + hidden
    two = test_pipeline._main(tiny, tmp_path, *FAST, '--config.run_id=b')
    assert two.returncode == 0, two.stderr[-3000:]
    assert 'computing 2 of 4 feature groups' in two.stderr  # only layer 2's are new
    assert 'sae_layer_2' in two.stderr.split('feature groups')[1].splitlines()[0]
    off = test_pipeline._main(tiny, tmp_path / 'off', *FAST, '--config.run_id=b',
                              '--config.store.enabled=False')
    assert _summary(tmp_path, 'b') == _summary(tmp_path / 'off', 'b')


def test_store_command_lists_and_prunes(tmp_path, capsys):
    keys = store.text_keys([[1, i] for i in range(30)])
    g = store.Group.open(str(tmp_path), 'grp', ['a'], {'kind': 'sae', 'sae': '/s/layer_3'})
    g.write(keys, {'a': _codes(30)})
    store.main(['list', str(tmp_path)])
    out = capsys.readouterr().out
    assert 'grp' in out and '30 texts' in out and '/s/layer_3' in out and 'dense float32' in out
    store.main(['prune', str(tmp_path)])
    assert not os.path.exists(tmp_path / 'grp')
