"""Image datasets, PaliGemma preprocessing vs transformers' processor, duplicate-safe splits."""
import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest

from mosaic_jax import results
from mosaic_jax.data import images
from mosaic_jax.data import splits

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'scripts'))
import digits_to_folder  # noqa: E402

SIZE = 28  # the tiny tower's image size
P = 16


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """30 real digit scans (3 per class) as folder + CSV, 16 px so resizing interpolates."""
    root = tmp_path_factory.mktemp('digits')
    digits_to_folder.convert(str(root / 'digits'), per_class=3, size=16)
    return root


def _tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=80, show_progress=False,
                                  special_tokens=['<pad>', '<eos>', '<bos>', '<unk>'])
    tok.train_from_iterator(['caption en', 'what digit is this', 'answer en'], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<bos>', eos_token='<eos>',
                                   pad_token='<pad>', unk_token='<unk>')


def _processor(tmp_path):
    from transformers import PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    # google/paligemma2-3b-pt-224's preprocessor_config.json at the tiny size.
    ip = SiglipImageProcessorPil(size={'height': SIZE, 'width': SIZE}, resample=3,
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                 rescale_factor=1 / 255)
    ip.image_seq_length = P
    return PaliGemmaProcessor(image_processor=ip, tokenizer=_tokenizer(tmp_path))


def _rgba_png(path):
    from PIL import Image
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 33, 4), dtype=np.uint8), 'RGBA').save(path)


def test_preprocessing_matches_paligemma_processor(digits, tmp_path):
    from PIL import Image
    proc = _processor(tmp_path)
    ds = images.load_folder(str(digits / 'digits'))
    _rgba_png(tmp_path / 'odd.png')  # transparency and a non-square shape
    blobs = ds.images[:6] + [open(tmp_path / 'odd.png', 'rb').read()]
    ours = images.pixel_values(blobs, SIZE)
    pil = [Image.open(__import__('io').BytesIO(b)) for b in blobs]
    want = proc(images=pil, text=['<image>caption en'] * len(pil),
                return_tensors='np')['pixel_values']
    assert ours.shape == want.shape == (7, 3, SIZE, SIZE) and ours.dtype == np.float32
    # Same uint8 resize, same float64 rescale and float32 normalise: bit-equal in practice.
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-6)
    assert ours.min() >= -1 and ours.max() <= 1


def test_prompt_ids_match_processor(tmp_path):
    proc = _processor(tmp_path)
    from PIL import Image
    img = Image.new('RGB', (10, 10))
    for prompt in ['caption en', 'what digit is this']:
        want = proc(images=[img], text=[prompt], return_tensors='np')['input_ids'][0]
        got = images.prompt_ids(proc.tokenizer, prompt, P, proc.image_token_id)
        assert got == want.tolist()
    ids, mask = images.prompt_batch(proc.tokenizer, ['caption en', 'what digit is this'], P,
                                    proc.image_token_id)
    assert ids.shape == mask.shape and mask[0, 0] == 0 and mask[:, -1].all()  # left padded
    assert (ids == proc.image_token_id).sum(-1).tolist() == [P, P]


def test_folder_and_table_agree(digits):
    folder = images.load_folder(str(digits / 'digits'))
    table = images.load_table(str(digits / 'digits.csv'))
    assert len(folder) == len(table) == 30 and folder.num_classes == 10
    assert folder.label_names == [str(d) for d in range(10)]
    by_path = dict(zip(table.sources, table.images))
    for src, blob, y in zip(folder.sources, folder.images, folder.labels):
        assert by_path[src] == blob
    assert sorted(folder.labels.tolist()) == sorted(table.labels.tolist())


def test_parquet_and_hub_style_dataset(digits, tmp_path):
    import datasets
    frame = pd.read_csv(digits / 'digits.csv', dtype=str)
    frame['caption'] = ['a handwritten ' + y for y in frame['label']]
    frame.to_parquet(digits / 'digits.parquet')
    table = images.load_table(str(digits / 'digits.parquet'), text_column='caption')
    assert table.texts[0] == 'a handwritten 0'
    # A local `datasets` dataset with an Image feature, read the way the hub one is.
    ds = datasets.Dataset.from_dict({
        'img': [str(digits / p) for p in frame['image']],
        'label': [int(y) for y in frame['label']]}).cast_column('img', datasets.Image())
    os.makedirs(tmp_path / 'hubset')
    ds.to_parquet(str(tmp_path / 'hubset' / 'train.parquet'))
    hub = images.load(f'hub:{tmp_path / "hubset"}')
    assert len(hub) == 30 and hub.sources[0].startswith('hub:hubset[')
    assert images.pixel_values(hub.images[:2], SIZE).shape == (2, 3, SIZE, SIZE)


def test_identical_images_share_a_split(digits, tmp_path):
    root = tmp_path / 'dups'
    shutil.copytree(digits / 'digits', root)
    for d in range(10):  # a byte-identical copy of one image per class
        first = sorted(os.listdir(root / str(d)))[0]
        shutil.copy(root / str(d) / first, root / str(d) / f'copy_{first}')
    ds = images.load_folder(str(root))
    assert len(ds) == 40
    sp = images.split(ds, seed=0, fractions=(0.5, 0.25, 0.25))
    where = sp.assignment(len(ds))
    digests = ds.digests()
    for i in range(len(ds)):
        for j in range(i):
            if digests[i] == digests[j]:
                assert where[i] == where[j]
    assert sp.audit.n_duplicate_rows == 10
    results.write_csv(str(tmp_path / 'split.csv'), images.split_rows(sp, ds),
                      splits.SPLIT_FIELDS)
    written = pd.read_csv(tmp_path / 'split.csv', dtype=str)
    assert written['text'].tolist() == ds.sources


def test_downsampled_pixels(digits):
    ds = images.load_folder(str(digits / 'digits'))
    x = images.downsampled_pixels(ds.images, side=4)
    assert x.shape == (30, 48) and 0 <= x.min() and x.max() <= 1


def test_bad_inputs_name_the_file(digits, tmp_path):
    root = tmp_path / 'bad'
    shutil.copytree(digits / 'digits', root)
    (root / '3' / 'broken.png').write_bytes(b'not a png')
    with pytest.raises(ValueError, match=r'broken\.png: Pillow cannot decode'):
        images.load_folder(str(root))
    os.makedirs(tmp_path / 'empty' / 'cat')
    with pytest.raises(ValueError, match='holds no images'):
        images.load_folder(str(tmp_path / 'empty'))
    with pytest.raises(ValueError, match="no column 'path'.*'image', 'label'"):
        images.load_table(str(digits / 'digits.csv'), image_column='path')
    frame = pd.DataFrame({'image': ['digits/0/missing.png', 'digits/1/x.png'],
                          'label': ['0', '1']})
    frame.to_csv(digits / 'missing.csv', index=False)
    with pytest.raises(ValueError, match=r'row 2: image file .*missing\.png.* does not exist'):
        images.load_table(str(digits / 'missing.csv'))
    with pytest.raises(ValueError, match='does not exist'):
        images.load_folder(str(tmp_path / 'nowhere'))
