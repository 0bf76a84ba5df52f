"""SAE files -> `jumprelu.SAEParams`, and back: every source `load_sae` (and `peek`) understands.

A Gemma Scope `params.npz` (file or folder), a Gemma Scope 2 folder (`params.safetensors`
[+ `config.json`]), a SAELens folder (`cfg.json` + `sae_weights.safetensors`), our own orbax folder
(`params/` + `metadata.json`), and Hugging Face references:
`google/gemma-scope-2b-pt-res/layer_12/width_16k/canonical` (Gemma Scope) or
`google/gemma-scope-2-270m-pt/resid_post/layer_12_width_16k_l0_medium` (Gemma Scope 2).
Every tensor is checked (names, shapes, dtypes, finite values) before any math sees it.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import zipfile
from typing import Any

import huggingface_hub
import jax.numpy as jnp
import numpy as np
import safetensors
from safetensors.flax import load_file  # handles bfloat16, which older numpy paths cannot
from safetensors.numpy import save_file

from mosaic_jax import checkpoint
from mosaic_jax.sae.jumprelu import FIELDS, TENSOR_KEYS, SAEParams

_FLOAT_TAGS = ('F16', 'BF16', 'F32', 'F64')  # safetensors header dtypes that are floating point


class MissingTensorError(KeyError, ValueError):
    """A required SAE tensor is absent (a KeyError, and a ValueError for one-line reports)."""
    __str__ = BaseException.__str__  # the message itself, not KeyError's repr of it


def _layer_from(text: str | None) -> int | None:
    m = re.search(r'(?:layer_|blocks\.|layers\.)(\d+)', text or '')
    return int(m.group(1)) if m else None


def _check_layout(shapes: dict, dtypes: dict, *, where: str, layer: int | None = None,
                  d_model: int | None = None) -> tuple[dict[str, str], tuple[int, int]]:
    """({canonical: stored name}, (D, F)) after checking names (W_enc, or Gemma Scope 2's
    w_enc), float dtypes (np.dtype or safetensors tag) and shapes, from arrays or headers."""
    names = {k: k if k in shapes else k.lower() if k.lower() in shapes else None for k in TENSOR_KEYS}
    missing = [k for k, n in names.items() if n is None]
    if missing:
        raise MissingTensorError(f'{where}: missing SAE tensor(s) {missing} (has {sorted(shapes)})')
    for n, dt in ((n, dtypes[n]) for n in names.values()):
        if not (dt in _FLOAT_TAGS if isinstance(dt, str) else jnp.issubdtype(dt, jnp.floating)):
            raise ValueError(f'{where} (layer {layer}): tensor {n} has dtype {dt}; SAE tensors '
                             'must be floating point (float32, bfloat16, float16, float64)')
    shape = tuple(shapes[enc := names['W_enc']])
    if len(shape) != 2:
        raise ValueError(f'{where} (layer {layer}): {enc} must be 2-D [D, F], got {shape}')
    d, f = shape
    want = {'W_enc': (d, f), 'b_enc': (f,), 'threshold': (f,), 'W_dec': (f, d), 'b_dec': (d,)}
    for k, expected in want.items():
        if tuple(shapes[names[k]]) != expected:
            raise ValueError(f'{where} (layer {layer}): {names[k]} has shape '
                             f'{tuple(shapes[names[k]])}, expected {expected} for {enc} {shape}')
    if d_model is not None and d != d_model:
        raise ValueError(f'{where} (layer {layer}): SAE d_model is {d} ({enc} {shape}), '
                         f'but the model residual width is {d_model}')
    return names, (int(d), int(f))


def _check_finite(a: np.ndarray, name: str, where: str) -> None:
    """Refuses NaN/inf, which would otherwise silently zero features."""
    bad = a.size - np.count_nonzero(np.isfinite(a))
    if bad:
        raise ValueError(f'{where}: SAE tensor {name} has {bad} non-finite value(s) (NaN/inf): '
                         'the file is corrupt or came from a diverged run')


def from_arrays(arrays: dict[str, Any], *, where: str, layer: int | None = None,
                d_model: int | None = None, dtype=jnp.float32,
                apply_b_dec_to_input: bool = False) -> SAEParams:
    """Validated SAEParams from Gemma Scope-named arrays (W_enc or w_enc, b_enc, threshold, ...).

    A missing name raises MissingTensorError (a KeyError); a non-float dtype, a wrong shape
    (or d_model) or a NaN/inf raises a ValueError; all name `where` (the file or reference) and
    `layer` (parsed from `where` if None).
    """
    layer = _layer_from(where) if layer is None else layer
    np_arrays = {k: np.asarray(v) for k, v in arrays.items()}
    names, _ = _check_layout({k: a.shape for k, a in np_arrays.items()},
                             {k: a.dtype for k, a in np_arrays.items()},
                             where=where, layer=layer, d_model=d_model)
    vals = {}
    for fld, k in zip(FIELDS, TENSOR_KEYS):
        a = np.asarray(np_arrays[names[k]], np.float32)  # stored may be bfloat16
        _check_finite(a, names[k], where)
        vals[fld] = jnp.asarray(a, dtype)
    return SAEParams(**vals, apply_b_dec_to_input=bool(apply_b_dec_to_input))


def to_arrays(params: SAEParams) -> dict[str, np.ndarray]:
    """Gemma Scope-named float32 numpy arrays."""
    return {k: np.asarray(getattr(params, fld), np.float32) for fld, k in zip(FIELDS, TENSOR_KEYS)}


# ----------------------------------------------------------------------------- formats

_SCOPE2_WEIGHTS = 'params.safetensors'        # Gemma Scope 2 (google/gemma-scope-2-*)
_SAELENS_WEIGHTS = 'sae_weights.safetensors'
# Gemma Scope 2 config.json `hf_hook_point_in` of a residual SAE: the output of block L.
_RESID_HOOK = re.compile(r'model\.layers\.(\d+)\.output$')


def _load_npz(path: str, **kw) -> SAEParams:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return from_arrays(arrays, where=path, **kw)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        return {k: np.asarray(v) for k, v in load_file(path).items()}
    except safetensors.SafetensorError as e:
        raise ValueError(f'{path}: not a readable safetensors file ({_one_line(e)})') from e


def _scope2_config(folder: str) -> dict:
    """Gemma Scope 2 `config.json`, checked; {} when absent (SAELens infers it then too)."""
    path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path):
        return {}
    cfg = checkpoint.read_json(path)
    arch = cfg.get('architecture', 'jump_relu')
    if arch != 'jump_relu':
        raise ValueError(f"{path}: architecture {arch!r} is not supported (only 'jump_relu')")
    hook = cfg.get('hf_hook_point_in')
    if hook is not None and not _RESID_HOOK.search(hook):
        raise ValueError(f'{path}: hf_hook_point_in={hook!r} is not a residual-stream SAE '
                         '(model.layers.L.output); only those read what this pipeline feeds')
    return cfg


def _load_scope2(folder: str, *, layer=None, **kw) -> SAEParams:
    cfg = _scope2_config(folder)
    weights = os.path.join(folder, _SCOPE2_WEIGHTS)
    if layer is None:
        m = _RESID_HOOK.search(cfg.get('hf_hook_point_in') or '')
        layer = int(m[1]) if m else _layer_from(folder)
    # Gemma Scope 2 encodes x @ w_enc + b_enc: no b_dec subtraction (SAELens' gemma_3 loader).
    return from_arrays(_read_safetensors(weights), where=weights, layer=layer,
                       apply_b_dec_to_input=False, **kw)


def _saelens_cfg(folder: str) -> dict:
    cfg_path = os.path.join(folder, 'cfg.json')
    cfg = checkpoint.read_json(cfg_path)
    arch = cfg.get('architecture', 'standard')  # SAELens cfgs without the key predate JumpReLU
    if arch != 'jumprelu':
        raise ValueError(f'{cfg_path}: architecture {arch!r} is not supported (only '
                         f"'jumprelu' SAEs can be loaded)")
    norm = cfg.get('normalize_activations')
    if norm not in (None, 'none'):
        raise ValueError(f'{cfg_path}: normalize_activations={norm!r} is not supported')
    if not os.path.exists(os.path.join(folder, _SAELENS_WEIGHTS)):
        raise FileNotFoundError(f'{folder}: cfg.json found but no {_SAELENS_WEIGHTS}')
    return cfg


def _load_saelens(folder: str, *, layer=None, **kw) -> SAEParams:
    cfg = _saelens_cfg(folder)
    weights = os.path.join(folder, _SAELENS_WEIGHTS)
    if layer is None:
        layer = _layer_from(cfg.get('hook_name') or (cfg.get('metadata') or {}).get('hook_name'))
    params = from_arrays(_read_safetensors(weights), where=weights, layer=layer,
                         # SAELens' own default when the key is absent.
                         apply_b_dec_to_input=cfg.get('apply_b_dec_to_input', True), **kw)
    for key, got in (('d_in', params.d_model), ('d_sae', params.width)):
        if key in cfg and int(cfg[key]) != got:
            raise ValueError(f'{folder}/cfg.json (layer {layer}): cfg {key}={cfg[key]} but '
                             f'{weights} has {got}')
    return params


def _load_orbax(folder: str, *, layer=None, d_model=None, dtype=jnp.float32) -> SAEParams:
    meta = checkpoint.read_json(os.path.join(folder, 'metadata.json'))
    tree = checkpoint.restore_pytree(os.path.join(folder, 'params'))
    return from_arrays({k: np.asarray(v) for k, v in tree.items()},
                       where=os.path.join(folder, 'params'), d_model=d_model,
                       layer=meta.get('layer') if layer is None else layer,
                       dtype=dtype, apply_b_dec_to_input=meta.get('apply_b_dec_to_input', False))


def save_sae(path: str, params: SAEParams, metadata: dict | None = None, *,
             dtype: str = 'float32') -> None:
    """Writes `<path>/params/` (orbax) and `<path>/metadata.json`; `dtype` is the storage
    dtype, 'float32' or 'bfloat16' (halves the size; loaded back as float32)."""
    if dtype not in ('float32', 'bfloat16'):
        raise ValueError(f"save_sae dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    store = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
    tree = {k: np.asarray(jnp.asarray(v, store)) for k, v in to_arrays(params).items()}
    meta = dict(metadata or {})
    meta.update(format='mosaic_jax.sae', d_model=params.d_model, width=params.width,
                apply_b_dec_to_input=params.apply_b_dec_to_input, storage_dtype=dtype)
    os.makedirs(path, exist_ok=True)
    checkpoint.save_pytree(os.path.join(path, 'params'), tree)
    checkpoint.atomic_write_json(os.path.join(path, 'metadata.json'), meta)


def export_saelens(params: SAEParams, path: str, metadata: dict | None = None) -> None:
    """Writes a SAELens folder (`cfg.json` + `sae_weights.safetensors`, float32)."""
    meta = dict(metadata or {})
    cfg = dict(architecture='jumprelu', d_in=params.d_model, d_sae=params.width,
               dtype='float32', apply_b_dec_to_input=params.apply_b_dec_to_input,
               normalize_activations='none',
               hook_name=meta.pop('hook_name', None) or (
                   f"blocks.{meta['layer']}.hook_resid_post" if 'layer' in meta else None))
    cfg['metadata'] = dict(meta, hook_name=cfg['hook_name'])
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, '.tmp-sae_weights.safetensors')
    save_file({k: np.ascontiguousarray(v) for k, v in to_arrays(params).items()}, tmp)
    os.replace(tmp, os.path.join(path, _SAELENS_WEIGHTS))
    checkpoint.atomic_write_json(os.path.join(path, 'cfg.json'), cfg)


def _npy_header(z: zipfile.ZipFile, member: str) -> tuple:
    with z.open(member) as m:
        v1 = np.lib.format.read_magic(m) == (1, 0)
        return getattr(np.lib.format, f'read_array_header_{"1" if v1 else "2"}_0')(m)


def _header_layout(fh, where: str) -> tuple[dict, dict]:
    """(shapes, dtypes) of a safetensors or .npz stream from its headers; no tensor is read."""
    try:
        if fh.read(4) == b'PK\x03\x04':   # .npz: a zip of .npy members, each with a header
            fh.seek(0)
            with zipfile.ZipFile(fh) as z:
                heads = {m.removesuffix('.npy'): _npy_header(z, m) for m in z.namelist()}
            return {k: h[0] for k, h in heads.items()}, {k: h[2] for k, h in heads.items()}
        fh.seek(0)
        n = int.from_bytes(fh.read(8), 'little')
        if n > 1 << 27:  # a JSON header beyond 128 MiB: not a safetensors file
            raise ValueError(f'header length {n}')
        header = json.loads(fh.read(n))
        header.pop('__metadata__', None)
        return ({k: tuple(v['shape']) for k, v in header.items()},
                {k: v['dtype'] for k, v in header.items()})
    except (ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise ValueError(f'{where}: not a readable SAE file header ({_one_line(e)})') from e


# ----------------------------------------------------------------------------- hub references

def _by_layer(l0s: str) -> dict[int, int]:
    """'105 102 ...' -> {0: 105, 1: 102, ...}: average L0 per layer, from layer 0."""
    return dict(enumerate(int(v) for v in l0s.split()))


# Canonical Gemma Scope residual SAEs: release -> width -> {layer: average_l0}. Copied from the
# `*-canonical` entries of SAELens' sae_lens/pretrained_saes.yaml (jbloomAus/SAELens); the
# Gemma Scope model cards describe "canonical" as the SAE whose average L0 is closest to 100.
CANONICAL_L0: dict[str, dict[str, dict[int, int]]] = {
    'google/gemma-scope-2b-pt-res': {
        '16k': _by_layer('105 102 141 59 124 68 70 69 71 73 77 80 82 84 84 78 78 77 74 73 71 70 '
                         '72 75 73 116'),
        '65k': _by_layer('73 121 77 89 89 105 107 107 111 118 128 70 72 75 73 127 128 125 116 '
                         '115 114 111 116 123 124 93'),
        '32k': {12: 76}, '262k': {12: 121}, '524k': {12: 115}, '1m': {5: 114, 12: 107, 19: 88},
    },
    'google/gemma-scope-9b-pt-res': {
        '16k': _by_layer('129 69 67 90 91 77 93 92 99 100 113 118 130 132 67 131 75 73 71 132 68 '
                         '129 123 120 114 114 116 118 119 119 120 114 111 114 114 120 120 124 '
                         '128 131 125 113'),
        '131k': _by_layer('41 56 70 103 101 94 120 119 72 75 84 88 96 99 105 103 121 117 113 110 '
                          '114 109 105 101 97 96 97 96 98 97 95 92 88 91 89 94 93 96 101 99 94 '
                          '84'),
        '32k': {20: 57}, '65k': {20: 55}, '524k': {20: 48}, '1m': {9: 122, 20: 101, 31: 77},
    },
    'google/gemma-scope-9b-it-res': {
        '16k': {9: 88, 20: 91, 31: 76}, '131k': {9: 121, 20: 81, 31: 109},
    },
}
# Fallback for (release, layer, width) not in the table: the listed average_l0 closest to this.
CANONICAL_TARGET_L0 = 100

_HUB_REF = re.compile(r'^(?P<repo>[\w.-]+/[\w.-]+)/(?P<sub>layer_(?P<layer>\d+)/width_(?P<width>\w+)'
                      r'/(?P<l0>canonical|average_l0_\d+))(?:/params\.npz)?$')
# Gemma Scope 2: repo id + residual subfolder (SAELens' pretrained_saes.yaml gemma-scope-2-*).
_HUB_REF2 = re.compile(r'^(?P<repo>[\w.-]+/[\w.-]+)/(?P<sub>resid_post(?:_all)?/'
                       r'layer_(?P<layer>\d+)_width_(?P<width>\d+[km]?)_l0_(?P<l0>\w+))'
                       r'(?:/params\.safetensors)?$')
_HUB_EXAMPLES = ("'google/gemma-scope-2b-pt-res/layer_12/width_16k/canonical' or "
                 "'google/gemma-scope-2-270m-pt/resid_post/layer_12_width_16k_l0_medium'")


def parse_hub_ref(ref: str) -> dict | None:
    """A Gemma Scope (1) or Gemma Scope 2 hub reference (see _HUB_EXAMPLES) -> parts, else None."""
    for scope, pattern in ((1, _HUB_REF), (2, _HUB_REF2)):
        if m := pattern.match(ref.strip()):
            return dict(repo=m['repo'], layer=int(m['layer']), width=m['width'], l0=m['l0'],
                        subpath=m['sub'], scope=scope)
    return None


def closest_l0(candidates: list[int], target: int = CANONICAL_TARGET_L0) -> int:
    """The candidate L0 nearest `target` (ties: the smaller L0)."""
    if not candidates:
        raise ValueError('no average_l0_* folders to choose from')
    return min(candidates, key=lambda v: (abs(v - target), v))


def resolve_hub_ref(ref: str, list_files=None) -> tuple[str, str]:
    """(repo id, path of the weights file inside it) for a hub reference; resolves 'canonical'.

    Args:
      list_files: callable repo -> file names, used only for a 'canonical' entry missing from
        CANONICAL_L0 (default: huggingface_hub.HfApi().list_repo_files, needs network).
    """
    parts = parse_hub_ref(ref)
    if parts is None:
        raise ValueError(f'{ref!r} is not a hub SAE reference like {_HUB_EXAMPLES}')
    repo, layer, width = parts['repo'], parts['layer'], parts['width']
    if parts['scope'] == 2:
        return repo, f"{parts['subpath']}/{_SCOPE2_WEIGHTS}"
    folder = f'layer_{layer}/width_{width}'
    if parts['l0'] != 'canonical':
        return repo, f"{parts['subpath']}/params.npz"
    l0 = CANONICAL_L0.get(repo, {}).get(width, {}).get(layer)
    if l0 is None:
        list_files = list_files or huggingface_hub.HfApi().list_repo_files
        pat = re.compile(re.escape(folder) + r'/average_l0_(\d+)/params\.npz$')
        found = sorted({int(m[1]) for f in list_files(repo) if (m := pat.match(f))})
        if not found:
            raise FileNotFoundError(f'{repo} has no {folder}/average_l0_*/params.npz')
        l0 = closest_l0(found)
    return repo, f'{folder}/average_l0_{l0}/params.npz'


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = ' '.join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _fetch_error(repo: str, filename: str, ref: str, e: BaseException) -> FileNotFoundError:
    """The one-line error for a hub file that cannot be had: what to download, what to pass."""
    why = ('HF_HUB_OFFLINE=1 and not in the local cache' if huggingface_hub.constants.HF_HUB_OFFLINE
           else f'{type(e).__name__}: {_one_line(e)}')
    return FileNotFoundError(
        f'cannot fetch {filename} from the Hugging Face repo {repo} ({why}). Download it where '
        f'there is network (hf download {repo} {filename} --local-dir DIR) and pass the local '
        f'path DIR/{posixpath.dirname(filename)} as the SAE source instead of {ref!r}')


def _download(repo: str, filename: str, ref: str) -> str:
    try:
        return huggingface_hub.hf_hub_download(repo, filename)
    except Exception as e:  # offline, gated, missing, network: all end the same way for the user
        raise _fetch_error(repo, filename, ref, e) from e


def _load_hub(ref: str, **kw) -> SAEParams:
    repo, filename = resolve_hub_ref(ref)
    path = _download(repo, filename, ref)
    if kw.get('layer') is None:
        kw['layer'] = parse_hub_ref(ref)['layer']
    if filename.endswith('.npz'):
        return _load_npz(path, **kw)
    return _load_scope2(os.path.dirname(path), **kw)


# ----------------------------------------------------------------------------- entry points

def _locate(source: str) -> tuple[str, str]:
    """(format, path): 'npz' (a file), 'scope2' / 'saelens' / 'orbax' (a folder) or 'hub'."""
    if os.path.isfile(source):
        base = os.path.basename(source)
        fmt = {_SCOPE2_WEIGHTS: 'scope2', _SAELENS_WEIGHTS: 'saelens'}.get(base)
        if source.endswith('.npz') or fmt:
            return (fmt, os.path.dirname(source) or '.') if fmt else ('npz', source)
        raise ValueError(f'{source}: unknown SAE file type (expected a Gemma Scope params.npz, '
                         f'{_SCOPE2_WEIGHTS} or {_SAELENS_WEIGHTS})')
    if os.path.isdir(source):
        for name, fmt in (('params.npz', 'npz'), (_SCOPE2_WEIGHTS, 'scope2'),
                          ('cfg.json', 'saelens'), ('metadata.json', 'orbax')):
            if os.path.isfile(os.path.join(source, name)):
                return fmt, os.path.join(source, name) if fmt == 'npz' else source
        raise FileNotFoundError(f'{source}: folder has none of params.npz, {_SCOPE2_WEIGHTS}, '
                                f'cfg.json + {_SAELENS_WEIGHTS}, metadata.json + params/')
    if parse_hub_ref(source) is not None:
        return 'hub', source
    raise FileNotFoundError(f'SAE source {source!r} is neither an existing path nor a hub '
                            f'reference like {_HUB_EXAMPLES}')


def load_sae(source: str, *, d_model: int | None = None, dtype=jnp.float32,
             layer: int | None = None) -> SAEParams:
    """Loads a JumpReLU SAE from a file, folder or hub reference (see module docstring).

    Args:
      source: params.npz, params.safetensors or sae_weights.safetensors, a folder holding
        Gemma Scope, Gemma Scope 2, SAELens or our orbax files, or a hub reference.
      d_model: expected model residual width; a mismatch raises ValueError.
      dtype: array dtype of the returned params (float32 default).
      layer: model layer, for error messages (parsed from the path when not given).
    Raises:
      FileNotFoundError: nothing at `source`, or a hub file that cannot be fetched (one line).
      ValueError: a bad file, dtype, shape or NaN/inf value, naming the file and the tensor.
    """
    fmt, path = _locate(os.fspath(source))
    loader = {'npz': _load_npz, 'scope2': _load_scope2, 'saelens': _load_saelens,
              'orbax': _load_orbax, 'hub': _load_hub}[fmt]
    return loader(path, d_model=d_model, dtype=dtype, layer=layer)


def peek(source: str, *, d_model: int | None = None) -> tuple[int, int]:
    """(d_model, width) of an SAE source from headers or metadata only: no weights are read.

    Same sources and errors for missing files as `load_sae`; headers are checked like loaded
    arrays (names, float dtypes, shapes; NaN/inf only at load), cfg.json / config.json too. A
    hub file comes from the HF cache, else is downloaded (the run needs it next).
    """
    fmt, path = _locate(os.fspath(source))
    if fmt == 'hub':
        repo, filename = resolve_hub_ref(path)
        cached = huggingface_hub.try_to_load_from_cache(repo, filename)  # no network
        return peek(cached if isinstance(cached, str) else _download(repo, filename, path),
                    d_model=d_model)
    if fmt == 'orbax':  # save_sae records the shape in metadata.json
        meta = checkpoint.read_json(os.path.join(path, 'metadata.json'))
        dims = int(meta.get('d_model', -1)), int(meta.get('width', -1))
        if min(dims) < 1 or d_model not in (None, dims[0]):
            raise ValueError(f'{path}/metadata.json (layer {meta.get("layer")}): SAE d_model, '
                             f'width = {dims} (-1: missing), model residual width {d_model}')
        return dims
    {'saelens': _saelens_cfg, 'scope2': _scope2_config}.get(fmt, str)(path)  # cfg checks
    file = {'npz': path, 'scope2': os.path.join(path, _SCOPE2_WEIGHTS),
            'saelens': os.path.join(path, _SAELENS_WEIGHTS)}[fmt]
    with open(file, 'rb') as fh:
        shapes, dtypes = _header_layout(fh, file)
    return _check_layout(shapes, dtypes, where=file, d_model=d_model)[1]
