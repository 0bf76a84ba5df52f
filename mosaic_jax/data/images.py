"""Image datasets and PaliGemma's input preprocessing (Pillow decode, resize, [-1, 1]).

An image dataset is a folder of class sub-folders, a CSV / parquet table with an image-path
column and a label column, or a hub `datasets` dataset with an `Image` feature. Every
image is kept as its encoded bytes, so identical files are found by digest and the split
(`split`) keeps them together exactly as `splits.split` keeps repeated texts together.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from typing import Iterator, NamedTuple, Sequence

from absl import logging
import numpy as np

from mosaic_jax.data import loading as data_loading
from mosaic_jax.data import splits

# A dataset spec naming an image dataset: 'images:<folder | table.csv | table.parquet |
# hub:<id>>' (the rest is `load`'s source).
SPEC_PREFIX = 'images:'
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# PaliGemma's preprocessor_config.json: mean = std = 0.5 per channel, rescale 1/255, bicubic.
MEAN, STD, RESCALE = 0.5, 0.5, 1 / 255


@dataclasses.dataclass
class LabeledImages:
    """Encoded images with integer class labels.

    images: N encoded files (PNG, JPEG, ...); sources: N places they came from (a path, or
    'hub:<name>[<row>]'), written to the split files in place of the text; labels:
    int64[N] in 0..C-1; label_names: C names; texts: N captions when the dataset has them
    (for text -> image transfer), else None.
    """
    images: list[bytes]
    sources: list[str]
    labels: np.ndarray
    label_names: list[str]
    name: str
    source: str
    texts: list[str] | None = None
    groups: None = None  # transfer groups: none for images (the text datasets' field)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def digests(self) -> list[str]:
        """sha256 of each file's bytes: the duplicate key of `split`."""
        return [hashlib.sha256(b).hexdigest() for b in self.images]

    def subset(self, idx: Sequence[int] | np.ndarray) -> 'LabeledImages':
        """Rows `idx` (int[M]) with the same label encoding."""
        idx = np.asarray(idx, dtype=np.int64)
        pick = [int(i) for i in idx]
        return dataclasses.replace(
            self, images=[self.images[i] for i in pick], sources=[self.sources[i] for i in pick],
            labels=self.labels[idx],
            texts=None if self.texts is None else [self.texts[i] for i in pick])


    def sample(self, n: int, seed: int) -> 'LabeledImages':
        """At most n rows, stratified and seeded as `data.max_rows` does for texts; classes
        that fall out are dropped and the rest re-numbered densely (logged)."""
        if not 0 < n < len(self):
            return self
        out = self.subset(data_loading._stratified_subset(self.labels, n, seed))
        present = np.unique(out.labels)
        if len(present) < self.num_classes:
            logging.warning('dataset %s: max_rows=%d lost classes %s', self.name, n,
                            sorted(set(self.label_names) - {self.label_names[k] for k in present}))
            out = dataclasses.replace(out, labels=np.searchsorted(present, out.labels),
                                      label_names=[self.label_names[k] for k in present])
        return out


# ------------------------------------------------------------------------ preprocessing
def decode(blob: bytes, where: str):
    """Encoded bytes -> an RGB PIL image, transparency composited onto white (as
    transformers' `convert_to_rgb`).

    Raises:
      ValueError: naming `where` when Pillow cannot read the bytes.
    """
    from PIL import Image, UnidentifiedImageError
    try:
        image = Image.open(io.BytesIO(blob))
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f'image {where}: Pillow cannot decode it ({e}); remove or replace '
                         'the file') from e
    if 'A' in image.getbands() or image.info.get('transparency') is not None:
        rgba = image.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return image.convert('RGB')


def preprocess(image, size: int) -> np.ndarray:
    """One RGB PIL image -> float32[3, S, S], PaliGemma's pixel_values row.

    Bicubic resize to size x size, then x * (1/255) in float64 cast to float32, then
    (x - 0.5) / 0.5 in float32: the order and precision of transformers' image processor.
    """
    from PIL import Image
    resized = np.asarray(image.resize((size, size), resample=Image.Resampling.BICUBIC))
    scaled = (resized.astype(np.float64) * RESCALE).astype(np.float32)      # [S, S, 3]
    normed = (scaled - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(normed.transpose(2, 0, 1))


def pixel_values(blobs: Sequence[bytes], size: int, sources: Sequence[str] | None = None
                 ) -> np.ndarray:
    """Encoded images -> float32[B, 3, S, S] in [-1, 1]."""
    names = sources if sources is not None else [f'#{i}' for i in range(len(blobs))]
    return np.stack([preprocess(decode(b, w), size) for b, w in zip(blobs, names)])


def prompt_ids(tokenizer, prompt: str, num_image_tokens: int, image_token_id: int
               ) -> list[int]:
    """PaliGemma's prefix: `<image>` x P, BOS, the prompt's tokens, "\\n" (the processor's
    "<image>"*P + bos + prompt + "\\n", tokenised with no added special tokens)."""
    text = tokenizer(prompt + '\n', add_special_tokens=False)['input_ids']
    return [image_token_id] * num_image_tokens + [tokenizer.bos_token_id] + list(text)


def prompt_batch(tokenizer, prompts: Sequence[str], num_image_tokens: int,
                 image_token_id: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prefixes for a batch: int32 ids [B, L], int32 attention mask [B, L]."""
    rows = [prompt_ids(tokenizer, p, num_image_tokens, image_token_id) for p in prompts]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    return ids, mask


class ImageBatch(NamedTuple):
    """One batch of image rows for the feature step (`batching.Batch` plus the pixels).

    input_ids int32[B, L]; attention_mask bool[B, L]; pixel_values f32[B, 3, S, S];
    index int64[B] (row in the dataset, -1 for filler rows); valid bool[B].
    """
    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray
    index: np.ndarray
    valid: np.ndarray


def batches(ds: LabeledImages, prefix: Sequence[int], batch_size: int, image_size: int, *,
            multiple_of: int = 1) -> Iterator[ImageBatch]:
    """Rows in dataset order, `batch_size` per batch, every row the same `prefix` ids
    (`prompt_ids`), so no padding; the last batch is filled up with copies of its first row
    (valid=False, index=-1) so every batch has the compiled shape.

    Raises:
      ValueError: batch_size not a positive multiple of `multiple_of` (the device count).
    """
    if batch_size < 1 or batch_size % multiple_of:
        raise ValueError(f'batch_size={batch_size} must be a positive multiple of '
                         f'multiple_of={multiple_of} (the device count)')
    ids = np.tile(np.asarray(prefix, np.int32), (batch_size, 1))
    mask = np.ones(ids.shape, bool)
    for start in range(0, len(ds), batch_size):
        rows = np.arange(start, min(start + batch_size, len(ds)))
        pixels = pixel_values([ds.images[i] for i in rows], image_size,
                              [ds.sources[i] for i in rows])
        fill = batch_size - len(rows)
        pixels = np.concatenate([pixels, np.repeat(pixels[:1], fill, axis=0)])
        index = np.concatenate([rows, np.full(fill, -1)]).astype(np.int64)
        yield ImageBatch(ids, mask, pixels, index, index >= 0)


def downsampled_pixels(blobs: Sequence[bytes], side: int = 8) -> np.ndarray:
    """The pixel baseline's features: float32[N, side * side * 3] in [0, 1] (box-filtered
    thumbnails, the 'logistic regression on downsampled pixels' of the study)."""
    from PIL import Image
    rows = [np.asarray(decode(b, f'#{i}').resize((side, side), Image.Resampling.BOX))
            for i, b in enumerate(blobs)]
    return (np.stack(rows).reshape(len(rows), -1) / 255.0).astype(np.float32)


# ------------------------------------------------------------------------ loading
def _read(path: str, where: str) -> bytes:
    if not os.path.isfile(path):
        raise ValueError(f'{where}: image file {path!r} does not exist')
    with open(path, 'rb') as f:
        blob = f.read()
    decode(blob, path)  # fail at load time, naming the file, not mid-extraction
    return blob


def load_folder(folder: str, name: str | None = None) -> LabeledImages:
    """folder/<class>/<image files>: one class per sub-folder (its name is the label).

    Raises:
      ValueError: no such folder, no class sub-folders, a class without images, fewer than
        2 classes, or an undecodable file (each naming the path).
    """
    name = name or os.path.basename(os.path.normpath(folder))
    if not os.path.isdir(folder):
        raise ValueError(f'image folder {folder!r} does not exist')
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise ValueError(f'image folder {folder!r} has no class sub-folders; expected '
                         f'{folder}/<class>/<image>{IMAGE_SUFFIXES[0]}')
    paths, values = [], []
    for c in classes:
        files = sorted(f for f in os.listdir(os.path.join(folder, c))
                       if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f'class folder {os.path.join(folder, c)!r} holds no images '
                             f'({", ".join(IMAGE_SUFFIXES)})')
        paths += [os.path.join(folder, c, f) for f in files]
        values += [c] * len(files)
    labels, names = data_loading.encode_labels(values, name=name)
    blobs = [_read(p, f'dataset {name!r}') for p in paths]
    return LabeledImages(images=blobs, sources=paths, labels=labels, label_names=names,
                         name=name, source=folder)


def load_table(path: str, image_column: str = 'image', label_column: str = 'label',
               text_column: str | None = None, name: str | None = None) -> LabeledImages:
    """A CSV / parquet file with an image-path column (relative to the file's folder or
    absolute) and a label column; optionally a caption column.

    Raises:
      ValueError: unknown format, a missing column (listing the present ones), an empty
        path or label, a missing or undecodable image (naming its row).
    """
    import pandas as pd
    name = name or os.path.splitext(os.path.basename(path))[0]
    if not os.path.isfile(path):
        raise ValueError(f'image table {path!r} does not exist')
    if path.endswith('.csv'):
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif path.endswith('.parquet'):
        frame = pd.read_parquet(path)
    else:
        raise ValueError(f'image table {path!r}: use a .csv or .parquet file')
    for col in (image_column, label_column) + ((text_column,) if text_column else ()):
        if col not in frame.columns:
            raise ValueError(f'image table {path!r} has no column {col!r}; its columns are '
                             f'{list(frame.columns)}')
    base = os.path.dirname(os.path.abspath(path))
    paths, values = [], []
    for row, (p, y) in enumerate(zip(frame[image_column], frame[label_column])):
        if not isinstance(p, str) or not p or y is None or y == '':
            raise ValueError(f'image table {path!r}, row {row + 2}: empty {image_column!r} or '
                             f'{label_column!r}; fill or delete the row')
        paths.append(p if os.path.isabs(p) else os.path.join(base, p))
        values.append(y)
    labels, names = data_loading.encode_labels(values, name=name)
    blobs = [_read(p, f'image table {path!r}, row {i + 2}') for i, p in enumerate(paths)]
    texts = None if not text_column else [str(t) for t in frame[text_column]]
    return LabeledImages(images=blobs, sources=paths, labels=labels, label_names=names,
                         name=name, source=path, texts=texts)


def load_hub(location: str, split: str = 'train', image_column: str | None = None,
             label_column: str = 'label', text_column: str | None = None,
             name: str | None = None) -> LabeledImages:
    """A hub (or local `datasets`) dataset with an `Image` feature, cache first.

    image_column None takes the first column whose feature is `datasets.Image`.

    Raises:
      ValueError: unreachable and uncached, no Image column, or a missing label column.
    """
    import datasets
    name = name or location.rstrip('/').split('/')[-1]
    try:
        ds = datasets.load_dataset(location, split=split)
    except (ConnectionError, FileNotFoundError) as e:
        raise ValueError(f'image dataset {location!r} (split={split}) cannot be reached and is '
                         f'not cached ({e}); export it to an image folder and pass its path') from e
    if image_column is None:
        found = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        if not found:
            raise ValueError(f'image dataset {location!r} has no Image column; its features '
                             f'are {dict(ds.features)}')
        image_column = found[0]
    for col in (image_column, label_column) + ((text_column,) if text_column else ()):
        if col not in ds.column_names:
            raise ValueError(f'image dataset {location!r} has no column {col!r}; its columns '
                             f'are {ds.column_names}')
    feature = ds.features[label_column]
    class_names = getattr(feature, 'names', None)
    ds = ds.cast_column(image_column, datasets.Image(decode=False))
    blobs = [_hub_bytes(r, f'hub:{name}[{i}]') for i, r in enumerate(ds[image_column])]
    labels, names = data_loading.encode_labels(list(ds[label_column]), name=name,
                                               class_names=class_names)
    texts = None if not text_column else [str(t) for t in ds[text_column]]
    return LabeledImages(images=blobs, sources=[f'hub:{name}[{i}]' for i in range(len(blobs))],
                         labels=labels, label_names=names, name=name, source=location,
                         texts=texts)


def _hub_bytes(cell: dict, where: str) -> bytes:
    """An undecoded `Image` cell ({'bytes', 'path'}) -> the file's bytes."""
    blob = cell.get('bytes')
    if blob is None:
        return _read(cell['path'], where)
    decode(blob, where)
    return blob


def load(source: str, **kwargs) -> LabeledImages:
    """A folder, a .csv / .parquet table, or 'hub:<dataset id>' (see the three loaders)."""
    if source.startswith('hub:'):
        return load_hub(source[len('hub:'):], **kwargs)
    if os.path.isdir(source):
        return load_folder(source, **kwargs)
    return load_table(source, **kwargs)


# ------------------------------------------------------------------------ split
def split(ds: LabeledImages, seed: int, fractions: Sequence[float] = (0.7, 0.1, 0.2),
          duplicates: str = 'group') -> splits.Split:
    """`splits.split` with byte-identical images as the copies (their sha256 digests stand
    in for the texts), so one image never lands in two splits."""
    return splits.split(ds.labels, seed, fractions, texts=ds.digests(), duplicates=duplicates,
                        class_names=ds.label_names)


def split_rows(split_: splits.Split, ds: LabeledImages) -> list[dict]:
    """The audit rows of `splits.split_rows`, the image's source in the text column."""
    return splits.split_rows(split_, ds.labels, ds.sources, ds.label_names)
