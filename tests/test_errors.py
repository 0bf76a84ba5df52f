"""Bad input fails early with one clear `error:` line, no traceback, no result files.

Every case here is visible from the input alone, so the run must stop before the model
loads and before any extraction (no `extract` progress bar).
"""
import csv
import os
import shutil

import pytest

from tests import test_pipeline


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return test_pipeline._build(str(tmp_path_factory.mktemp('tiny_err')))


def _csv(path, rows, header=('prompt', 'target')):
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _result_files(workdir):
    return [os.path.join(d, f) for d, _, fs in os.walk(workdir) for f in fs
            if not f.startswith('.')]


def _check(r, workdir, *needles):
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(lines) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    assert 'extract' not in r.stderr  # stopped before extraction
    assert _result_files(workdir) == [], _result_files(workdir)


def test_misspelt_baseline_and_metric(tiny, tmp_path):
    r = test_pipeline._main(tiny, tmp_path, "--config.baselines=('tf_idf',)",
                            "--config.metrics=('macro_f2',)")
    _check(r, tmp_path, "'tf_idf'", "'macro_f2'", 'valid')


def test_bad_second_dataset_fails_before_the_first_runs(tiny, tmp_path):
    r = test_pipeline._main(tiny, tmp_path,
                            "--config.data.datasets=('sae_probes:95_toxic_is','nope_set')")
    _check(r, tmp_path, 'nope_set')


def test_missing_column_names_the_columns(tiny, tmp_path):
    path = _csv(tmp_path / 'd.csv', [('a text', 0), ('b text', 1)] * 10, ('text', 'target'))
    work = tmp_path / 'w'
    r = test_pipeline._main(tiny, work, f"--config.data.datasets=('{path}',)")
    _check(r, work, "'prompt'", 'text')


def test_latin1_csv_names_the_byte_and_the_setting(tiny, tmp_path):
    path = tmp_path / 'latin.csv'
    body = 'prompt,target\n' + ''.join(f'text {i},{i % 2}\n' for i in range(40))
    raw = body.encode() + 'caf\xe9 au lait,1\n'.encode('latin-1')
    path.write_bytes(raw)
    work = tmp_path / 'w'
    r = test_pipeline._main(tiny, work, f"--config.data.datasets=('{path}',)")
    _check(r, work, 'latin.csv', f'byte offset {len(body.encode()) + 3}', 'data.encoding')
    # The hint works: the same file read as Latin-1 gets past loading (to the model).
    from mosaic_jax.data import loading as data_loading
    ds = data_loading.load(str(path), encoding='latin-1')
    assert 'café au lait' in ds.texts


def test_nan_in_model_weights_is_one_error_naming_the_tensor(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file
    model_dir = tmp_path / 'model'
    shutil.copytree(tiny['model_dir'], model_dir)
    weights = model_dir / 'model.safetensors'
    tensors = load_file(str(weights))
    tensors['model.layers.0.mlp.up_proj.weight'][0, 0] = float('nan')
    save_file(tensors, str(weights), metadata={'format': 'pt'})
    work = tmp_path / 'w'
    r = test_pipeline._main(dict(tiny, model_dir=str(model_dir)), work)
    _check(r, work, 'model.layers.0.mlp.up_proj.weight', 'non-finite')


def test_header_only_csv(tiny, tmp_path):
    path = _csv(tmp_path / 'empty.csv', [])
    work = tmp_path / 'w'
    r = test_pipeline._main(tiny, work, f"--config.data.datasets=('{path}',)")
    _check(r, work, 'empty.csv')


def test_rare_class_is_one_error_naming_it(tiny, tmp_path):
    rows = [(f'text number {i}', i % 2) for i in range(40)] + [('lonely', 2)]
    path = _csv(tmp_path / 'rare.csv', rows)
    work = tmp_path / 'w'
    r = test_pipeline._main(tiny, work, f"--config.data.datasets=('{path}',)")
    _check(r, work, 'drop_rare_classes')


def test_unwritable_workdir(tiny, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    r = test_pipeline._main(tiny, blocker / 'sub')
    _check(r, tmp_path / 'none', 'workdir')


def test_missing_sae_fails_before_the_model_loads(tiny, tmp_path):
    r = test_pipeline._main(tiny, tmp_path, f'--config.sae.source={tmp_path}/nope_{{layer}}')
    _check(r, tmp_path, 'nope_1', 'layer 1')
    assert 'load_model' not in r.stderr
