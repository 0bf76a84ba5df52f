"""A run's datasets: read, rare classes dropped, split per seed (before the model loads).

Text specs go to `data.loading`; 'images:<source>' specs to `data.images` (image_run.py
reads them through PaliGemma). Every problem is one `UserError` naming the dataset.
"""
from __future__ import annotations

import os
import tempfile

from absl import logging

from mosaic_jax.checks import UserError
from mosaic_jax.data import images
from mosaic_jax.data import loading as data_loading
from mosaic_jax.data import splits as splits_lib

Dataset = data_loading.LabeledTexts | images.LabeledImages


def dataset_names(config) -> list[str]:
    """The run's datasets: data.datasets, plus the combined grouped one (data.group_name)
    when data.group_parts lists 'group=spec' parts."""
    names = list(config.data.datasets)
    return names + [config.data.group_name] if config.data.group_parts else names


def read(config, name: str) -> Dataset:
    if name.startswith(images.SPEC_PREFIX):
        return _read_images(config, name[len(images.SPEC_PREFIX):], name)
    kw = dict(text_field=config.data.text_field, label_field=config.data.label_field,
              max_rows=config.data.max_rows, seed=config.seed, encoding=config.data.encoding)
    if config.data.group_parts and name == config.data.group_name:
        parts = [p.split('=', 1) for p in config.data.group_parts]
        return data_loading.combine([(g, data_loading.load(spec, **kw)) for g, spec in parts], name)
    return data_loading.load(name, group_field=config.data.group_field, **kw)


def _read_images(config, source: str, name: str) -> images.LabeledImages:
    """A folder of class sub-folders, a table (data.image_field, data.label_field) or
    'hub:<id>'; data.max_rows keeps a stratified, seeded subset as for texts."""
    hub = source.startswith('hub:')
    kw = {}
    if config.data.caption_field and not hub and os.path.isdir(source):
        raise ValueError(f'data.caption_field={config.data.caption_field!r}, but an image folder '
                         'has no captions; use a CSV / parquet table with a caption column')
    if hub or not os.path.isdir(source):
        kw = dict(label_column=config.data.label_field,
                  image_column=config.data.image_field or (None if hub else 'image'),
                  text_column=config.data.caption_field or None)
    return images.load(source, **kw).sample(int(config.data.max_rows), int(config.seed))


def check_workdir(workdir: str) -> None:
    """The workdir exists or can be made, and a file can be written in it."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix='.mosaic_check_'):
            pass
    except OSError as e:
        raise UserError(f'workdir {workdir!r} is not writable ({e.strerror or e}); pass '
                        '--config.workdir=DIR') from None


def load(config, name: str) -> Dataset:
    """One dataset, rare classes dropped when the config allows it."""
    try:
        ds = read(config, name)
        if config.data.drop_rare_classes:
            ds, dropped = splits_lib.drop_rare_classes(
                ds, splits_lib.min_class_count(tuple(config.data.fractions)),
                duplicates=config.data.duplicates)
            if dropped:
                logging.warning('%s: dropped classes too small to reach every split: %s',
                                name, dropped)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UserError(f'dataset {name!r}: {e}') from e
    return ds


def seeds(config) -> tuple[int, ...]:
    """The seeds whose split + probes a run repeats (config.seeds, else config.seed)."""
    return tuple(int(s) for s in config.seeds) or (int(config.seed),)


def split_keys(ds: Dataset) -> list[str]:
    """What makes two rows copies of each other: the text, or the image's bytes (sha256),
    so one image never lands in two splits."""
    return ds.digests() if isinstance(ds, images.LabeledImages) else ds.texts


def audit_texts(ds: Dataset) -> list[str]:
    """The text column of the split audit: the text, or where the image came from."""
    return ds.sources if isinstance(ds, images.LabeledImages) else ds.texts


def split_or_error(config, ds: Dataset, seed: int) -> splits_lib.Split:
    try:
        return splits_lib.split(ds.labels, seed=seed, fractions=tuple(config.data.fractions),
                                texts=split_keys(ds), duplicates=config.data.duplicates,
                                class_names=ds.label_names)
    except ValueError as e:
        msg = str(e)
        if isinstance(ds, images.LabeledImages):  # drop_rare_classes is for texts only
            msg = msg.replace('Pass data.drop_rare_classes=True to drop such classes (with a '
                              'warning).', 'Add images of those classes or remove their '
                              'folders / rows.')
        raise UserError(f'dataset {ds.name!r}: {msg}') from e
