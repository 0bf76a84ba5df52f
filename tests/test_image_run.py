"""Image datasets in a run (experiments/image_run.py, inputs.py): the images Extractor on 8
devices equals the one-device reader, the config checks, and the whole CLI offline on a
tiny random PaliGemma saved with save_pretrained over real digit scans."""
import csv
import hashlib
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import paligemma_helpers as ph
import tiny_assets
from mosaic_jax import checks
from mosaic_jax import parallel
from mosaic_jax import steps
from mosaic_jax.data import images
from mosaic_jax.experiments import image_run
from mosaic_jax.experiments import image_study
from mosaic_jax.experiments import inputs
from mosaic_jax.models import loading
from mosaic_jax.sae import loading as sae_loading
from mosaic_jax.variants import HiddenVariant, SAEKey, Variant

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'scripts'))
import digits_to_folder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 64


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp('image_run')
    folder = ph.tiny_paligemma_dir(root)
    tiny_assets.save_tiny_tokenizer(folder, ['caption en', 'what digit is this'], vocab_size=60)
    arrays = tiny_assets.random_sae_arrays(32, WIDTH, seed=1)  # D = 32
    # Threshold 0: a code that flips between two programs' roundings is ~0 either way,
    # so the 8-device and 1-device reads compare at float tolerance.
    arrays['threshold'] = np.zeros(WIDTH, np.float32)
    os.makedirs(root / 'sae')
    np.savez(root / 'sae' / 'params.npz', **arrays)
    digits_to_folder.convert(str(root / 'digits'), per_class=10)
    # Three byte-identical copies of one scan: the split must keep them together.
    src = root / 'digits' / '3' / sorted(os.listdir(root / 'digits' / '3'))[0]
    for k in range(3):
        shutil.copy(src, root / 'digits' / '3' / f'copy{k}.png')
    return dict(root=root, model_dir=folder, sae=str(root / 'sae' / 'params.npz'))


def _config(**data):
    from configs import paligemma2_3b
    c = paligemma2_3b.get_config()
    c.model.path, c.model.dtype, c.layers = 'x', 'float32', (1, 2)
    c.data.update(data)
    return c


def test_images_extractor_on_devices_equals_the_one_device_reader(assets):
    model = loading.load_model(assets['model_dir'])
    tok = loading.load_tokenizer(assets['model_dir'])
    ds = images.load_folder(str(assets['root'] / 'digits')).subset(np.arange(0, 103, 5))
    sae = sae_loading.load_sae(assets['sae'], d_model=32)
    key = SAEKey(1, str(WIDTH))
    spec = steps.FeatureSpec.build(layers=(1, 2), config_layers=(1, 2), saes=[key],
                                   pooling=('mean', 'max'), binarize=(False,), top_n=(0,),
                                   threshold=1.0, hidden=('mean',))
    config = _config()
    config.model.batch_size = 8  # 21 images: the last batch holds 3 filler rows
    for positions in ('image', 'both'):
        config.features.positions = positions
        ctx = types.SimpleNamespace(config=config, model=model, tokenizer=tok, spec=spec,
                                    devices=parallel.Devices('pmap'),
                                    extractor_for=steps.extractors(model, {key: sae},
                                                                   parallel.Devices('pmap')))
        same, ids, n_trunc, groups, got = image_run.features(ctx, 'digits', ds, {})
        assert same is ds  # no captions: the dataset as it came
        assert len(ids) == len(ds) and n_trunc == 0
        # Rows 30 and 40 are byte-identical (a scan and its copy): one copy group.
        assert len(set(groups)) == len(set(ds.digests())) == len(ds) - 1
        want = image_study.extract(model, tok, ds, image_study.ReadSpec(
            layers=(1, 2), positions=positions, poolings=('mean', 'max'), batch_size=16),
            {1: sae})
        # Same float32 math, pmap over 8 devices vs one jit: fusion-order rounding only.
        for pooling in ('mean', 'max'):
            np.testing.assert_allclose(got[Variant(key, pooling)], want['sae', 1, pooling],
                                       rtol=1e-5, atol=1e-5)
        for layer in (1, 2):
            np.testing.assert_allclose(got[HiddenVariant(layer, 'mean')],
                                       want['hidden', layer, 'mean'], rtol=1e-5, atol=1e-5)


def test_filler_rows_repeat_the_first_row_and_are_invalid(assets):
    ds = images.load_folder(str(assets['root'] / 'digits')).subset([0, 1, 2])
    out = list(images.batches(ds, [5, 6, 7], batch_size=2, image_size=ph.IMAGE_SIZE))
    assert [b.index.tolist() for b in out] == [[0, 1], [2, -1]]
    assert out[1].valid.tolist() == [True, False]
    np.testing.assert_array_equal(out[1].pixel_values[1], out[1].pixel_values[0])
    assert out[0].input_ids.tolist() == [[5, 6, 7]] * 2 and out[0].attention_mask.all()
    with pytest.raises(ValueError, match='multiple of multiple_of=8'):
        next(images.batches(ds, [5], batch_size=4, image_size=ph.IMAGE_SIZE, multiple_of=8))


def test_read_table_with_max_rows_and_byte_split(assets):
    c = _config(max_rows=40)
    c.seed = 3
    ds = inputs.load(c, f"images:{assets['root'] / 'digits.csv'}")
    assert len(ds) == 40 and ds.num_classes == 10  # stratified: every class kept
    full = inputs.load(_config(), f"images:{assets['root'] / 'digits'}")
    sp = inputs.split_or_error(c, full, seed=0)
    keys = inputs.split_keys(full)
    where = {}
    for part, rows in zip(('train', 'val', 'test'), sp):
        for r in rows:
            where.setdefault(keys[r], set()).add(part)
    copies = [k for k in where if keys.count(k) >= 4]  # the scan and its 3 copies
    assert copies and all(len(where[k]) == 1 for k in where)
    assert inputs.audit_texts(full)[0].endswith('.png')


def test_a_class_too_small_to_split_names_the_image_fix(assets):
    full = inputs.load(_config(), f"images:{assets['root'] / 'digits'}")
    keep = np.flatnonzero(full.labels != 7).tolist() + [int(np.flatnonzero(full.labels == 7)[0])]
    with pytest.raises(checks.UserError, match=r"too few rows.*'7' with 1 rows.*Add images "
                                               r"of those classes") as e:
        inputs.split_or_error(_config(), full.subset(keep), seed=0)
    assert 'drop_rare_classes' not in str(e.value)  # refused for images: not suggested


@pytest.mark.parametrize('override, message', [
    (dict(baselines=('hidden_mean', 'tfidf')), "baselines has 'tfidf', but dataset 'images:d'"),
    (dict(probe=dict(train='fused')), "probe.train='fused' is for text datasets"),
    (dict(data=dict(drop_rare_classes=True)), 'data.drop_rare_classes=True is for text'),
    (dict(data=dict(datasets=('images:d', 'sae_probes:95_toxic_is'))),
     "baselines has 'pixels', but dataset 'sae_probes:95_toxic_is' is not an image"),
    (dict(features=dict(positions='pixels')), "features.positions='pixels'"),
    (dict(features=dict(pixel_side=0)), 'features.pixel_side=0 must be an integer >= 1'),
], ids=['tfidf', 'fused', 'rare', 'pixels_on_text', 'positions', 'side'])
def test_image_config_problems_are_named(override, message):
    c = _config(datasets=('images:d',))
    checks.validate(c)
    c.update(override)
    with pytest.raises(checks.UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
        checks.validate(c)


def test_text_model_with_image_dataset_is_refused(tmp_path):
    import helpers
    from mosaic_jax.experiments import assets as assets_lib
    folder = helpers.tiny_gemma2_dir(tmp_path)
    tiny_assets.save_tiny_tokenizer(folder, ['a b c'], vocab_size=40)
    c = _config(datasets=('images:d',))
    c.model.path = folder
    with pytest.raises(checks.UserError, match="dataset 'images:d' holds images, but .* text "
                                               "model; pass a PaliGemma 2"):
        assets_lib.load_model(c)


def _digest(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def _run_cli(assets, dataset: str, *flags: str) -> None:
    """main.py on the tiny PaliGemma and its SAE, offline on 8 fake devices."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=8')
    cmd = [sys.executable, 'main.py', '--config=configs/paligemma2_3b.py',
           f"--config.model.path={assets['model_dir']}", '--config.model.name=tiny_pg',
           '--config.model.dtype=float32', '--config.model.batch_size=8', '--config.layers=(1,)',
           f"--config.sae.source={assets['sae']}", f"--config.sae.widths=('{WIDTH}',)",
           f"--config.data.datasets=('images:{dataset}',)", '--config.compile_cache=', *flags]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def test_cli_end_to_end_on_digit_images(assets, tmp_path):
    _run_cli(assets, str(assets['root'] / 'digits'),
             '--config.baselines=("hidden_mean","hidden_last","pixels","decision_tree")',
             '--config.probe.Cs=(0.1,1.0)', '--config.run_id=r1',
             f'--config.workdir={tmp_path}', '--config.report=True')
    run = tmp_path / 'tiny_pg' / '_runs' / 'r1'
    rows = list(csv.DictReader(open(run / 'summary.csv')))
    kinds = {r['kind'] for r in rows}
    assert {'sae', 'hidden', 'pixels', 'tree'} <= kinds, kinds
    assert {r['variant'] for r in rows if r['kind'] == 'hidden'} == {'hidden_mean',
                                                                     'hidden_last'}
    for kind in ('sae', 'hidden', 'pixels', 'tree'):
        assert sum(r['selected'] == 'True' for r in rows if r['kind'] == kind) == 1, kind
    for row in rows:
        lo, v, hi = (float(row[k]) for k in ('macro_f1_lo', 'macro_f1', 'macro_f1_hi'))
        assert 0 <= lo <= v <= hi <= 1, row
    # Real scans: logistic regression on 8 x 8 thumbnails is far above chance (0.1).
    assert float(next(r for r in rows if r['kind'] == 'pixels')['macro_f1']) > 0.5
    audit = list(csv.DictReader(open(run / 'splits' / 'digits.csv')))
    assert len(audit) == 103  # 10 classes x 10 scans + 3 copies
    where = {}
    for a in audit:
        where.setdefault(_digest(a['text']), set()).add(a['split'])
    assert len(where) == 100 and all(len(s) == 1 for s in where.values())
    json_files = list((tmp_path / 'tiny_pg' / 'digits' / 'layer_1').rglob('*results.json'))
    assert json_files, 'no MOSAIC-layout result files'
    assert 'pixels (downsampled)' in open(tmp_path / 'report.html').read()


def test_cli_caption_to_image_transfer(assets, tmp_path):
    # A table of the scans with a caption per image: train on captions, test on images.
    rows = list(csv.DictReader(open(assets['root'] / 'digits.csv')))
    table = assets['root'] / 'captioned.csv'
    with open(table, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['image', 'label', 'caption'])
        for r in rows:
            # Unique captions: transfer skips test rows whose caption was trained on.
            w.writerow([r['image'], r['label'], f"what digit is this {r['image']}"])
    _run_cli(assets, str(table), '--config.data.caption_field=caption',
             '--config.baselines=("hidden_mean",)', '--config.probe.Cs=(1.0,)',
             '--config.run_id=t1', f'--config.workdir={tmp_path}')
    run = tmp_path / 'tiny_pg' / '_runs' / 't1'
    transfer = list(csv.DictReader(open(run / 'transfer.csv')))
    pairs = {(t['train_group'], t['test_group']) for t in transfer}
    assert pairs == {('text', 'text'), ('text', 'image'), ('image', 'image'), ('image', 'text')}
    n = len(rows)
    for t in transfer:
        assert 0 < int(t['n_test']) < n, t  # cross-modal tests skip the trained pairs
    # A caption and its image sit in one split: the audit has 2N rows, pairs agree.
    audit = list(csv.DictReader(open(run / 'splits' / 'captioned.csv')))
    assert len(audit) == 2 * n
    assert all(audit[i]['split'] == audit[i + n]['split'] for i in range(n))
    summary = list(csv.DictReader(open(run / 'summary.csv')))
    assert {s['train_group'] for s in summary} == {'text', 'image'}
