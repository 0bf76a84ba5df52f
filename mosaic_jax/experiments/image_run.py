"""Image datasets in a run: PaliGemma reads each image + prompt, the feature step pools
the decoder's residual stream at `features.positions`, and the result is keyed by Variant /
HiddenVariant exactly as for texts, so probes, intervals, CV and the report run unchanged.

A dataset with captions (data.caption_field of a table or hub dataset) is a modality
transfer: each caption is read as text by the same model (no pixels), and the run's
cross-group transfer (experiments/transfer.py) trains on the 'text' rows and tests on the
'image' rows and back; a caption and its image share a split (the image's bytes are the
copy key of both).

The feature store keys on token ids, so image features are computed in memory; feature
explanations and saved probes read texts, so image datasets have none.
"""
from __future__ import annotations

import time

from absl import logging
import numpy as np

from mosaic_jax import steps
from mosaic_jax.data import batching
from mosaic_jax.data import images
from mosaic_jax.data import splits as splits_lib
from mosaic_jax.models import paligemma
from mosaic_jax.probing import evaluation


def is_images(ds) -> bool:
    return isinstance(ds, images.LabeledImages)


def _mask_fn(model, positions: str, exclude: tuple[int, ...]):
    """ImageBatch -> bool[B, L]: the image / prompt / both positions, padding never."""
    image_token = model.config.image_token_id
    return lambda b: np.asarray(paligemma.position_mask(b.input_ids, b.attention_mask,
                                                        positions, image_token, exclude))


def features(ctx, name: str, ds: images.LabeledImages, timings: dict) -> tuple:
    """(dataset, ids, n truncated, copy groups, features) of an image dataset, as
    experiment._text_features returns them for texts; timings gain '<name>/load_tokenize'
    (the prompt) and '<name>/extract'.

    ids: the prompt prefix once per row (only its length reaches the metadata); copy
    groups: byte-identical images share one (grouped CV folds). With captions, the
    dataset is `with_captions(ds)` and every row count doubles (captions first).
    """
    config, model, tok = ctx.config, ctx.model, ctx.tokenizer
    t = time.perf_counter()
    cfg = model.config
    prefix = images.prompt_ids(tok, config.data.prompt, cfg.num_image_tokens,
                               cfg.image_token_id)
    groups = splits_lib.text_groups(ds.digests())
    timings[f'{name}/load_tokenize'] = time.perf_counter() - t
    t = time.perf_counter()
    exclude = () if config.features.include_special else (tok.bos_token_id,)
    n, bs = len(ds), int(config.model.batch_size)
    feats = steps.extract(
        ctx.extractor_for(ctx.spec, images=True),
        images.batches(ds, prefix, bs, cfg.vision.image_size, multiple_of=ctx.devices.count),
        n, bos_id=tok.bos_token_id, include_special=config.features.include_special,
        total=-(-n // bs), mask_fn=_mask_fn(model, config.features.positions, exclude))
    timings[f'{name}/extract'] = time.perf_counter() - t
    logging.info('%s: read %d images (%d tokens each, positions=%s) in %.1fs; feature store, '
                 'explanations and saved probes are text-only', name, n, len(prefix),
                 config.features.positions, timings[f'{name}/extract'])
    if ds.texts is None:
        return ds, [prefix] * n, 0, groups, feats
    return _with_caption_features(ctx, name, ds, [prefix] * n, feats, timings)


def with_captions(ds: images.LabeledImages) -> images.LabeledImages:
    """2N rows: the N captions (group 'text') then the N images (group 'image'); both
    halves keep the image's bytes, so a caption and its image are copies in the split."""
    twice = lambda xs: list(xs) + list(xs)  # noqa: E731
    return images.LabeledImages(
        images=twice(ds.images), sources=twice(ds.sources),
        labels=np.concatenate([ds.labels, ds.labels]), label_names=ds.label_names,
        name=ds.name, source=ds.source, texts=twice(ds.texts),
        groups=['text'] * len(ds) + ['image'] * len(ds))


def _with_caption_features(ctx, name, ds, image_ids, image_feats, timings) -> tuple:
    """The captions read as texts (same model, same spec), stacked over the image rows."""
    t = time.perf_counter()
    ids, n_trunc = batching.tokenize(ds.texts, ctx.tokenizer, ctx.config.model.max_length)
    text_feats = ctx.extract(ids)
    timings[f'{name}/extract'] += time.perf_counter() - t
    both = with_captions(ds)
    feats = {k: np.concatenate([np.asarray(text_feats[k]), v]) for k, v in image_feats.items()}
    logging.info('%s: %d captions read as text for text <-> image transfer', name, len(ids))
    return (both, ids + image_ids, n_trunc, splits_lib.text_groups(both.digests()), feats)


def fit_pixels(config, prep, opts: evaluation.ProbeOptions) -> evaluation.ProbeResult:
    """The 'pixels' baseline of one dataset and seed: logistic regression on
    features.pixel_side^2 x 3 thumbnails, C chosen like the probes'."""
    x = images.downsampled_pixels(prep.ds.images, int(config.features.pixel_side))
    return evaluation.fit_pixels(x, prep.ds.labels, prep.splits, opts,
                                 num_classes=prep.num_classes, groups=prep.groups)
