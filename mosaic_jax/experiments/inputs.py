"""A run's inputs, checked before anything loads: workdir, datasets, their splits per seed."""
from __future__ import annotations

import os
import tempfile

from absl import logging

from mosaic_jax.checks import UserError
from mosaic_jax.data import loading as data_loading
from mosaic_jax.data import splits as splits_lib


def dataset_names(config) -> list[str]:
    """The run's datasets: data.datasets, plus the combined grouped one (data.group_name)
    when data.group_parts lists 'group=spec' parts."""
    names = list(config.data.datasets)
    return names + [config.data.group_name] if config.data.group_parts else names


def read(config, name: str) -> data_loading.LabeledTexts:
    """One dataset as configured (data.*), or the combined grouped one."""
    kw = dict(text_field=config.data.text_field, label_field=config.data.label_field,
              max_rows=config.data.max_rows, seed=config.seed, encoding=config.data.encoding)
    if config.data.group_parts and name == config.data.group_name:
        parts = [p.split('=', 1) for p in config.data.group_parts]
        return data_loading.combine([(g, data_loading.load(spec, **kw)) for g, spec in parts], name)
    return data_loading.load(name, group_field=config.data.group_field, **kw)


def check_workdir(workdir: str) -> None:
    """The workdir exists or can be made, and a file can be written in it."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix='.mosaic_check_'):
            pass
    except OSError as e:
        raise UserError(f'workdir {workdir!r} is not writable ({e.strerror or e}); pass '
                        '--config.workdir=DIR') from None


def load(config, name: str) -> data_loading.LabeledTexts:
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


def split_or_error(config, ds: data_loading.LabeledTexts, seed: int) -> splits_lib.Split:
    try:
        return splits_lib.split(ds.labels, seed=seed, fractions=tuple(config.data.fractions),
                                texts=ds.texts, duplicates=config.data.duplicates,
                                class_names=ds.label_names)
    except ValueError as e:
        raise UserError(f'dataset {ds.name!r}: {e}') from e
