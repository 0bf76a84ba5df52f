"""PaliGemma checkpoint folder -> `paligemma.PaliGemma`.

Three key layouts exist for the same tensors: the hub's (`vision_tower.vision_model.*`,
`multi_modal_projector.linear.*`, `language_model.model.*`), what transformers 5 writes
(`vision_tower.*`, the rest as the hub) and its in-memory names (`model.vision_tower.*`,
`model.language_model.*`). `_component` maps all three onto (part, name inside the part);
the decoder then goes through the text loader's own table (`loading.HF_RULES`) and the
tower through `siglip.HF_RULES`. Any unused key, unfilled parameter or shape mismatch fails.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mosaic_jax.models import loading, paligemma, siglip
from mosaic_jax.models.config import resolve_dtype

# (key prefix, part, prefix of the name inside the part); the first match wins.
_PREFIXES = (
    ('model.vision_tower.vision_model.', 'vision', ''),
    ('vision_tower.vision_model.', 'vision', ''),
    ('model.vision_tower.', 'vision', ''),
    ('vision_tower.', 'vision', ''),
    ('model.multi_modal_projector.', 'projector', ''),
    ('multi_modal_projector.', 'projector', ''),
    ('language_model.model.', 'text', 'model.'),
    ('model.language_model.', 'text', 'model.'),
    ('language_model.lm_head.', 'text', 'lm_head.'),
    ('lm_head.', 'text', 'lm_head.'),
)
_PROJECTOR = {'linear.weight': (('linear', 'w'), lambda x: x.T),
              'linear.bias': (('linear', 'b'), lambda x: x)}


def is_paligemma(hf_config: Mapping) -> bool:
    return hf_config.get('model_type') == 'paligemma'


def resolved_hf_config(folder: str) -> dict:
    """config.json with every default filled in as transformers reads it.

    Hub configs are sparse (google/paligemma2-3b-pt-224 omits head_dim, whose Gemma 2
    default 256 is not hidden_size / heads = 288), so transformers' own config class
    supplies the defaults; no weights or torch are involved.
    """
    from transformers import PaliGemmaConfig as HFConfig
    with open(os.path.join(folder, 'config.json')) as f:
        raw = json.load(f)
    return HFConfig.from_dict(raw).to_dict()


def _component(key: str) -> tuple[str, str] | None:
    for prefix, part, inner in _PREFIXES:
        if key.startswith(prefix):
            return part, inner + key[len(prefix):]
    return None


class _Renamed(Mapping):
    """A lazy view of `tensors` under new names (new name -> old name)."""

    def __init__(self, tensors: Mapping, names: dict[str, str]):
        self._tensors, self._names = tensors, names

    def __getitem__(self, key: str) -> np.ndarray:
        return self._tensors[self._names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _compile(rules: dict) -> list:
    return [(re.compile('^' + re.escape(k).replace(r'\{i\}', r'(\d+)') + '$'), v)
            for k, v in rules.items()]


_VISION_PATTERNS = _compile(siglip.HF_RULES)
_PROJECTOR_PATTERNS = _compile(_PROJECTOR)


def _arrays_by_path(part: Mapping, patterns: list, what: str) -> dict[tuple, np.ndarray]:
    """Our path -> array in our orientation, for every tensor of one part."""
    out, unused = {}, []
    for key in part:
        for pattern, (path, transform) in patterns:
            if m := pattern.match(key):
                path = tuple(int(m.group(1)) if p == '{i}' else p for p in path)
                out[path] = (key, transform(np.asarray(part[key])))
                break
        else:
            unused.append(key)
    if unused:
        raise ValueError(f'{len(unused)} {what} tensors are not used: {sorted(unused)[:8]}')
    return out


def _fill(abstract: nnx.Module, arrays: dict[tuple, tuple[str, np.ndarray]], dtype,
          what: str) -> nnx.Module:
    """The module of `abstract`'s structure with every parameter taken from `arrays`."""
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    if missing := sorted({p for p, _ in flat} - arrays.keys(), key=str):
        names = ['/'.join(map(str, p)) for p in missing]
        raise ValueError(f'the checkpoint does not provide {len(names)} {what} parameters: '
                         f'{names[:8]}')
    if extra := sorted(arrays.keys() - {p for p, _ in flat}, key=str):  # e.g. layer >= N
        raise ValueError(f'{len(extra)} {what} tensors have no place in the config: '
                         f'{[arrays[p][0] for p in extra][:8]}')
    filled = []
    for path, var in flat:
        key, value = arrays[path]
        want = var.get_value().shape
        if value.shape != want:
            raise ValueError(f'checkpoint tensor {key!r} has shape {value.shape}, which does not '
                             f'fit {"/".join(map(str, path))} of shape {want}')
        filled.append((path, var.replace(jnp.asarray(value, dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def build(cfg: paligemma.PaliGemmaConfig, tensors: Mapping[str, np.ndarray],
          dtype='float32') -> paligemma.PaliGemma:
    """Fills a `PaliGemma` from tensors named in any of the three layouts.

    Raises:
      ValueError: a key outside the three parts, an unused or missing tensor, or a shape
        mismatch (the message names the key).
    """
    dtype = resolve_dtype(dtype)
    names: dict[str, dict[str, str]] = {'vision': {}, 'projector': {}, 'text': {}}
    stray = []
    for key in tensors:
        found = _component(key)
        if found is None:
            stray.append(key)
        else:
            names[found[0]][found[1]] = key
    if stray:
        raise ValueError(f'{len(stray)} checkpoint tensors belong to no PaliGemma part: '
                         f'{sorted(stray)[:8]}')
    part = {k: _Renamed(tensors, v) for k, v in names.items()}
    tower = _fill(nnx.eval_shape(lambda: siglip.VisionTower(cfg.vision, dtype=dtype,
                                                            rngs=nnx.Rngs(0))),
                  _arrays_by_path(part['vision'], _VISION_PATTERNS, 'vision tower'), dtype,
                  'vision tower')
    proj = _fill(nnx.eval_shape(lambda: paligemma.Projector(cfg, dtype=dtype,
                                                            rngs=nnx.Rngs(0))),
                 _arrays_by_path(part['projector'], _PROJECTOR_PATTERNS, 'projector'), dtype,
                 'projector')
    decoder = loading.build_model(cfg.text, part['text'], dtype)
    return paligemma.PaliGemma(cfg, dtype=dtype, rngs=None, parts=(tower, proj, decoder))


def load(folder: str, dtype='float32') -> paligemma.PaliGemma:
    """A PaliGemma from a transformers checkpoint folder (config.json + safetensors)."""
    cfg = paligemma.PaliGemmaConfig.from_hf(resolved_hf_config(folder))
    return build(cfg, loading.SafetensorsFolder(folder), dtype)
