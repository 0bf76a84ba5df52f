"""Config validation: every field combination checked once, before anything loads.

A problem found here is a `UserError`: main.py prints it as one `error:` line, no traceback.
"""
from __future__ import annotations

import re

from mosaic_jax import features
from mosaic_jax import parallel
from mosaic_jax.data import images
from mosaic_jax.data.splits import Duplicates
from mosaic_jax.models import paligemma
from mosaic_jax.probing import baselines
from mosaic_jax.probing import metrics
from mosaic_jax.probing.evaluation import Selection

# Baselines computed from the model's own residuals (not in the baselines registry).
HIDDEN_BASELINES = {'hidden_last': 'last', 'hidden_mean': 'mean'}


class UserError(ValueError):
    """A bad config, file or missing weights: main.py prints it as one line."""


def _choice(problems: list, field: str, value, valid) -> None:
    if value not in valid:
        problems.append(f'{field}={value!r} (valid: {", ".join(map(repr, valid))})')


def _model_problems(config) -> list[str]:
    problems = []
    if config.model.dtype not in ('float32', 'bfloat16'):
        problems.append(f'model.dtype={config.model.dtype!r}: use float32 or bfloat16 '
                        '(float16 overflows on Gemma residual streams)')
    _choice(problems, 'model.matmul_precision', config.model.matmul_precision,
            ('default', 'high', 'highest'))
    _choice(problems, 'model.layer_convention', config.model.layer_convention,
            ('gemma_scope', 'hf_hidden_states'))
    if not config.layers:
        problems.append('layers is empty')
    if config.model.layer_convention == 'hf_hidden_states' and 0 in config.layers:
        problems.append('layers contains 0 with layer_convention=hf_hidden_states: '
                        'hidden_states[0] is the embedding output, not a block residual')
    if config.mode != 'report' and not config.model.path:
        problems.append('model.path is empty: pass --config.model.path=DIR (local weights), '
                        'a hub id, a .gguf file or gemma3_270m')
    return problems


def _feature_problems(config) -> list[str]:
    problems = []
    for p in config.features.pooling:
        if p not in features.POOLINGS:
            problems.append(f'features.pooling has {p!r} (valid: {sorted(features.POOLINGS)})')
    tops = tuple(config.features.top_n)
    if not tops or any(int(n) != n or n < 0 for n in tops):
        problems.append(f'features.top_n={tops} must be a non-empty tuple of integers >= 0, '
                        "e.g. --config.features.top_n='(0,20,50)'")
    if config.mode in ('classify', 'benchmark') and not config.sae.source:
        problems.append('sae.source is empty: pass --config.sae.source=PATH_WITH_{layer}_{width}')
    for ex in config.sae.exclude:
        if not re.fullmatch(r'\d+:\S+', ex):
            problems.append(f"sae.exclude entry {ex!r} is not 'layer:width'")
    _choice(problems, 'features.positions', config.features.positions, paligemma.POSITIONS)
    side = config.features.pixel_side
    if int(side) != side or side < 1:
        problems.append(f'features.pixel_side={side!r} must be an integer >= 1')
    return problems


def _image_problems(config) -> list[str]:
    """Image datasets ('images:...') against what only texts have, and back."""
    if config.mode != 'classify':
        return []
    names = list(config.data.datasets)
    imgs = [n for n in names if n.startswith(images.SPEC_PREFIX)]
    texts = [n for n in names if not n.startswith(images.SPEC_PREFIX)]
    texts += list(config.data.group_parts)
    problems = []
    if 'pixels' in config.baselines and texts:
        problems.append(f"baselines has 'pixels', but dataset {texts[0]!r} is not an image "
                        f"dataset ({images.SPEC_PREFIX}...); drop 'pixels' or that dataset")
    if not imgs:
        return problems
    if 'tfidf' in config.baselines:
        problems.append(f"baselines has 'tfidf', but dataset {imgs[0]!r} holds images, not "
                        "texts; drop 'tfidf' (e.g. --config.baselines='(\"hidden_mean\","
                        "\"pixels\")')")
    for field, value, bad, what in (
            ('probe.train', config.probe.train, config.probe.train == 'fused',
             'use probe.train=cached'),
            ('data.drop_rare_classes', config.data.drop_rare_classes,
             config.data.drop_rare_classes, 'remove the small class folders instead'),
            ('data.group_parts', tuple(config.data.group_parts), bool(config.data.group_parts),
             'run image datasets on their own'),
            ('data.group_field', config.data.group_field, bool(config.data.group_field),
             'leave it empty')):
        if bad:
            problems.append(f'{field}={value!r} is for text datasets, not image dataset '
                            f'{imgs[0]!r}: {what}')
    return problems


def _probe_problems(config) -> list[str]:
    problems = []
    pc = config.probe
    _choice(problems, 'probe.train', pc.train, ('cached', 'fused'))
    if pc.train == 'fused':
        if pc.fused_variant not in config.features.pooling:
            problems.append(f'probe.fused_variant={pc.fused_variant!r} is not in '
                            f'features.pooling={tuple(config.features.pooling)}')
        if pc.standardize:
            problems.append('probe.standardize=True with probe.train=fused: the streamed '
                            'probe never sees all features to standardise them; use '
                            'probe.train=cached or probe.standardize=False')
    _choice(problems, 'probe.select', pc.select, [m.value for m in Selection])
    if pc.select == Selection.CV.value and pc.select_folds < 2:
        problems.append(f'probe.select_folds={pc.select_folds} must be >= 2 with select=cv')
    _choice(problems, 'probe.sparse_method', pc.sparse_method, ('mean_diff', 'l1'))
    if any(int(k) != k or k < 0 for k in pc.sparse_k):
        problems.append(f'probe.sparse_k={tuple(pc.sparse_k)} must be integers >= 0 (0 = all)')
    if int(pc.threads) != pc.threads or pc.threads < 1:
        problems.append(f'probe.threads={pc.threads} must be an integer >= 1')
    if not pc.Cs or any(c <= 0 for c in pc.Cs):
        problems.append(f'probe.Cs={tuple(pc.Cs)} must be non-empty and positive')
    return problems


def _name_problems(config) -> list[str]:
    problems = []
    valid = sorted(set(baselines.BASELINES) | set(HIDDEN_BASELINES))
    for b in config.baselines:
        if b not in valid:
            problems.append(f'baselines has {b!r} (valid: {", ".join(valid)})')
    if not config.metrics:
        problems.append('metrics is empty (the first metric is the headline)')
    for m in config.metrics:
        if m not in metrics.METRICS:
            problems.append(f'metrics has {m!r} (valid: {", ".join(sorted(metrics.METRICS))})')
    return problems


def validate(config) -> None:
    """Checks field combinations once, before anything is loaded.

    Raises:
      UserError: naming every problem found.
    """
    problems = []
    _choice(problems, 'mode', config.mode, ('classify', 'report', 'label_correctness',
                                            'predict', 'benchmark'))
    if config.mode == 'predict':
        _choice(problems, 'predict.kind', config.predict.kind, ('sae', 'hidden', 'tfidf'))
    if config.mode == 'label_correctness':
        _choice(problems, 'correctness.answer_kind', config.correctness.answer_kind,
                ('exact', 'choice'))
    _choice(problems, 'parallel.mode', config.parallel.mode, [m.value for m in parallel.Mode])
    _choice(problems, 'data.duplicates', config.data.duplicates,
            [d.value for d in Duplicates])
    for part in config.data.group_parts:
        if '=' not in part or not part.split('=', 1)[0]:
            problems.append(f"data.group_parts entry {part!r} is not 'group=dataset spec'")
    if config.data.group_parts and len(config.data.group_parts) < 2:
        problems.append('data.group_parts needs at least 2 parts (one per group)')
    fr = tuple(config.data.fractions)
    if len(fr) != 3 or abs(sum(fr) - 1) > 1e-6 or min(fr) <= 0:
        problems.append(f'data.fractions={fr} must be three positive numbers summing to 1')
    problems += _model_problems(config) + _feature_problems(config) + _probe_problems(config)
    problems += _name_problems(config) + _image_problems(config)
    if problems:
        raise UserError('invalid config: ' + '; '.join(problems))
