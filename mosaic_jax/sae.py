"""JumpReLU sparse autoencoder: params, width-chunked encode/decode, and loaders.

Sources `load_sae` understands: a Gemma Scope `params.npz` (file or folder), a SAELens folder
(`cfg.json` + `sae_weights.safetensors`), our own orbax folder (`params/` + `metadata.json`),
and a Hugging Face reference such as `google/gemma-scope-2b-pt-res/layer_12/width_16k/canonical`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mosaic_jax import checkpoint
from mosaic_jax import features

# The encoder decides which features fire by comparing against `threshold`, so it must be real
# float32 arithmetic (as in the torch references), not the bf16 passes a TPU/GPU may default to.
_PRECISION = jax.lax.Precision.HIGHEST

_KEYS = ('W_enc', 'b_enc', 'threshold', 'W_dec', 'b_dec')   # Gemma Scope / SAELens tensor names
_FIELDS = ('w_enc', 'b_enc', 'threshold', 'w_dec', 'b_dec')  # SAEParams fields, same order


@flax.struct.dataclass
class SAEParams:
    """JumpReLU SAE weights (Gemma Scope layout, float32)."""
    w_enc: jax.Array       # [D, F]
    b_enc: jax.Array       # [F]
    threshold: jax.Array   # [F]
    w_dec: jax.Array       # [F, D]
    b_dec: jax.Array       # [D]
    # SAELens option: subtract b_dec from the input before encoding (Gemma Scope: False).
    apply_b_dec_to_input: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def d_model(self) -> int:
        return int(self.w_enc.shape[0])

    @property
    def width(self) -> int:
        return int(self.w_enc.shape[1])


# ----------------------------------------------------------------------------- encode / decode

def _encode_block(params: SAEParams, x: jax.Array, start, size: int) -> jax.Array:
    """Features [start, start + size) of x: f32[N, D] -> f32[N, size]."""
    w = jax.lax.dynamic_slice_in_dim(params.w_enc, start, size, axis=1).astype(jnp.float32)
    b = jax.lax.dynamic_slice_in_dim(params.b_enc, start, size).astype(jnp.float32)
    th = jax.lax.dynamic_slice_in_dim(params.threshold, start, size).astype(jnp.float32)
    pre = jnp.dot(x, w, precision=_PRECISION) + b                    # [N, size]
    return jnp.where(pre > th, jnp.maximum(pre, 0.0), 0.0)


def _prepare_input(params: SAEParams, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] != params.d_model:
        raise ValueError(f'SAE input has last dim {x.shape[-1]}, SAE d_model is {params.d_model}')
    if params.apply_b_dec_to_input:
        x = x - params.b_dec.astype(jnp.float32)
    return x


def _blocks(width: int, chunk_size: int | None) -> tuple[int, int, int]:
    """(block size, number of full blocks, remainder) for chunking the width."""
    if chunk_size is None or chunk_size <= 0 or chunk_size >= width:
        return width, 1, 0
    return chunk_size, width // chunk_size, width % chunk_size


def encode(params: SAEParams, x: jax.Array, *, chunk_size: int | None = None) -> jax.Array:
    """JumpReLU encoder: relu(pre) * (pre > threshold), pre = (x [- b_dec]) @ W_enc + b_enc.

    Args:
      params: the SAE.
      x: activations f32[..., D] (any float dtype; computed in float32).
      chunk_size: if set, the width is processed in blocks of this many features inside a
        `lax.scan`, so the [N, D] x [D, F] product never has more than [N, chunk_size] live
        pre-activations. The result is identical to the unchunked one.
    Returns:
      f32[..., F], exactly zero where the pre-activation is <= threshold.
    """
    x = _prepare_input(params, x)
    lead, n = x.shape[:-1], int(np.prod(x.shape[:-1], dtype=np.int64))
    x2 = x.reshape(n, params.d_model)                                   # [N, D]
    size, n_full, rem = _blocks(params.width, chunk_size)
    if n_full == 1 and rem == 0:
        return _encode_block(params, x2, 0, size).reshape(*lead, params.width)

    def body(out, i):
        start = i * size
        block = _encode_block(params, x2, start, size)                  # [N, size]
        return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=1), None

    out = jnp.zeros((n, params.width), jnp.float32)
    out, _ = jax.lax.scan(body, out, jnp.arange(n_full))
    if rem:
        start = n_full * size
        out = out.at[:, start:].set(_encode_block(params, x2, start, rem))
    return out.reshape(*lead, params.width)


def encode_pooled(params: SAEParams, x: jax.Array, mask: jax.Array, mode: str, *,
                  top_n: int = 0, chunk_size: int | None = None) -> jax.Array:
    """`features.pool(encode(params, x), mask, mode, top_n=top_n)` without the whole [B, T, F].

    Every pooling except MOSAIC's top-n count is a per-feature reduction over tokens, so each
    width block is encoded and pooled on its own. The top-n count needs each token's top n over
    the whole width, so the blocks keep a running per-token top n (ties: lower index first, the
    same rule as `features.pool`) and count once at the end.

    Args:
      x: f32[B, T, D]; mask: bool[B, T]; mode, top_n: as in `features.pool`.
      chunk_size: width block size (None: one block).
    Returns:
      f32[B, F], equal to the unfused computation.
    """
    features.check_mode(mode, top_n)
    x = _prepare_input(params, x)
    b, t, d = x.shape
    x2 = x.reshape(b * t, d)
    size, n_full, rem = _blocks(params.width, chunk_size)
    counting = mode == 'mosaic' and top_n > 0

    def block_acts(start, n):
        return _encode_block(params, x2, start, n).reshape(b, t, n)      # [B, T, n]

    if counting:
        k = min(top_n, params.width)
        vals = jnp.full((b, t, k), -jnp.inf, jnp.float32)
        idx = jnp.zeros((b, t, k), jnp.int32)

        def merge(carry, start, n):
            vals, idx = carry
            bv, bi = jax.lax.top_k(block_acts(start, n), min(k, n))     # [B, T, k']
            # Earlier blocks (lower feature indices) come first, and top_k keeps the lower
            # position on ties, so the merged order is the global lower-index-first order.
            allv = jnp.concatenate([vals, bv], -1)
            alli = jnp.concatenate([idx, bi.astype(jnp.int32) + start], -1)
            mv, pos = jax.lax.top_k(allv, k)
            return mv, jnp.take_along_axis(alli, pos, -1)

        carry = (vals, idx)
        if n_full > 0:
            carry, _ = jax.lax.scan(lambda c, i: (merge(c, i * size, size), None), carry,
                                    jnp.arange(n_full))
        if rem:
            carry = merge(carry, n_full * size, rem)
        vals, idx = carry
        return features.count_top_n(vals, idx, mask, params.width)

    def pooled(start, n):
        return features.pool(block_acts(start, n), mask, mode, top_n=top_n)  # [B, n]

    if n_full == 1 and rem == 0:
        return pooled(0, size)
    blocks = jax.lax.map(lambda i: pooled(i * size, size), jnp.arange(n_full))  # [nb, B, size]
    out = jnp.moveaxis(blocks, 0, 1).reshape(b, n_full * size)
    if rem:
        out = jnp.concatenate([out, pooled(n_full * size, rem)], axis=1)
    return out


def decode(params: SAEParams, f: jax.Array) -> jax.Array:
    """Reconstruction f32[..., F] -> f32[..., D]: f @ W_dec + b_dec."""
    f = jnp.asarray(f, jnp.float32)
    return jnp.dot(f, params.w_dec.astype(jnp.float32), precision=_PRECISION) + params.b_dec


# ----------------------------------------------------------------------------- building params

def _layer_from(text: str | None) -> int | None:
    m = re.search(r'(?:layer_|blocks\.|layers\.)(\d+)', text or '')
    return int(m.group(1)) if m else None


def from_arrays(arrays: dict[str, Any], *, where: str, layer: int | None = None,
                d_model: int | None = None, dtype=jnp.float32,
                apply_b_dec_to_input: bool = False) -> SAEParams:
    """Validated SAEParams from Gemma Scope-named arrays (W_enc, b_enc, threshold, W_dec, b_dec).

    Args:
      arrays: name -> array-like. Missing names raise a KeyError naming `where`.
      where: file or reference the arrays came from (for error messages).
      layer: model layer the SAE is for (error messages only; parsed from `where` if None).
      d_model: expected model width; a mismatch raises a ValueError.
    """
    layer = _layer_from(where) if layer is None else layer
    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        raise KeyError(f'{where}: missing SAE tensor(s) {missing} (has {sorted(arrays)})')
    np_arrays = {k: np.asarray(arrays[k]) for k in _KEYS}
    w_enc = np_arrays['W_enc']
    if w_enc.ndim != 2:
        raise ValueError(f'{where} (layer {layer}): W_enc must be 2-D [D, F], got {w_enc.shape}')
    d, f = w_enc.shape
    want = {'W_enc': (d, f), 'b_enc': (f,), 'threshold': (f,), 'W_dec': (f, d), 'b_dec': (d,)}
    for k, shape in want.items():
        if np_arrays[k].shape != shape:
            raise ValueError(f'{where} (layer {layer}): {k} has shape {np_arrays[k].shape}, '
                             f'expected {shape} for W_enc {w_enc.shape}')
    if d_model is not None and d != d_model:
        raise ValueError(f'{where} (layer {layer}): SAE d_model is {d} (W_enc {w_enc.shape}), '
                         f'but the model residual width is {d_model}')
    # Stored dtype may be bfloat16; compute dtype is float32 unless asked otherwise.
    vals = {fld: jnp.asarray(np_arrays[k].astype(np.float32), dtype)
            for fld, k in zip(_FIELDS, _KEYS)}
    return SAEParams(**vals, apply_b_dec_to_input=bool(apply_b_dec_to_input))


def to_arrays(params: SAEParams) -> dict[str, np.ndarray]:
    """Gemma Scope-named float32 numpy arrays."""
    return {k: np.asarray(getattr(params, fld), np.float32) for fld, k in zip(_FIELDS, _KEYS)}


# ----------------------------------------------------------------------------- formats

def _load_npz(path: str, **kw) -> SAEParams:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return from_arrays(arrays, where=path, **kw)


def _load_saelens(folder: str, *, layer=None, **kw) -> SAEParams:
    cfg_path = os.path.join(folder, 'cfg.json')
    weights = os.path.join(folder, 'sae_weights.safetensors')
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    arch = cfg.get('architecture', 'standard')  # SAELens cfgs without the key predate JumpReLU
    if arch != 'jumprelu':
        raise ValueError(f'{cfg_path}: architecture {arch!r} is not supported (only '
                         f"'jumprelu' SAEs can be loaded)")
    norm = cfg.get('normalize_activations')
    if norm not in (None, 'none'):
        raise ValueError(f'{cfg_path}: normalize_activations={norm!r} is not supported')
    if not os.path.exists(weights):
        raise FileNotFoundError(f'{folder}: cfg.json found but no sae_weights.safetensors')
    from safetensors.flax import load_file  # handles bfloat16, which numpy cannot
    arrays = {k: np.asarray(v.astype(jnp.float32)) for k, v in load_file(weights).items()}
    hook = cfg.get('hook_name') or (cfg.get('metadata') or {}).get('hook_name')
    if layer is None:
        layer = _layer_from(hook)
    params = from_arrays(arrays, where=weights, layer=layer,
                         # SAELens' own default when the key is absent.
                         apply_b_dec_to_input=cfg.get('apply_b_dec_to_input', True), **kw)
    for key, got in (('d_in', params.d_model), ('d_sae', params.width)):
        if key in cfg and int(cfg[key]) != got:
            raise ValueError(f'{cfg_path} (layer {layer}): cfg {key}={cfg[key]} but '
                             f'{weights} has {got}')
    return params


def _load_orbax(folder: str, *, layer=None, d_model=None, dtype=jnp.float32) -> SAEParams:
    meta = checkpoint.read_json(os.path.join(folder, 'metadata.json'))
    tree = checkpoint.restore_pytree(os.path.join(folder, 'params'))
    if layer is None:
        layer = meta.get('layer')
    return from_arrays({k: np.asarray(v) for k, v in tree.items()},
                       where=os.path.join(folder, 'params'), layer=layer, d_model=d_model,
                       dtype=dtype, apply_b_dec_to_input=meta.get('apply_b_dec_to_input', False))


def save_sae(path: str, params: SAEParams, metadata: dict | None = None, *,
             dtype: str = 'float32') -> None:
    """Writes `<path>/params/` (orbax) and `<path>/metadata.json`.

    Args:
      dtype: storage dtype, 'float32' or 'bfloat16' (halves the size; loaded back as float32).
    """
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
    from safetensors.numpy import save_file
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
    os.replace(tmp, os.path.join(path, 'sae_weights.safetensors'))
    checkpoint.atomic_write_json(os.path.join(path, 'cfg.json'), cfg)


# ----------------------------------------------------------------------------- hub references

# Canonical Gemma Scope residual SAEs: release -> width -> {layer: average_l0}. Copied from the
# `*-canonical` entries of SAELens' sae_lens/pretrained_saes.yaml (jbloomAus/SAELens); the
# Gemma Scope model cards describe "canonical" as the SAE whose average L0 is closest to 100.
CANONICAL_L0: dict[str, dict[str, dict[int, int]]] = {
    'google/gemma-scope-2b-pt-res': {
        '16k': {0: 105, 1: 102, 2: 141, 3: 59, 4: 124, 5: 68, 6: 70, 7: 69, 8: 71, 9: 73,
                10: 77, 11: 80, 12: 82, 13: 84, 14: 84, 15: 78, 16: 78, 17: 77, 18: 74,
                19: 73, 20: 71, 21: 70, 22: 72, 23: 75, 24: 73, 25: 116},
        '65k': {0: 73, 1: 121, 2: 77, 3: 89, 4: 89, 5: 105, 6: 107, 7: 107, 8: 111, 9: 118,
                10: 128, 11: 70, 12: 72, 13: 75, 14: 73, 15: 127, 16: 128, 17: 125, 18: 116,
                19: 115, 20: 114, 21: 111, 22: 116, 23: 123, 24: 124, 25: 93},
        '32k': {12: 76}, '262k': {12: 121}, '524k': {12: 115},
        '1m': {5: 114, 12: 107, 19: 88},
    },
    'google/gemma-scope-9b-pt-res': {
        '16k': {0: 129, 1: 69, 2: 67, 3: 90, 4: 91, 5: 77, 6: 93, 7: 92, 8: 99, 9: 100,
                10: 113, 11: 118, 12: 130, 13: 132, 14: 67, 15: 131, 16: 75, 17: 73, 18: 71,
                19: 132, 20: 68, 21: 129, 22: 123, 23: 120, 24: 114, 25: 114, 26: 116,
                27: 118, 28: 119, 29: 119, 30: 120, 31: 114, 32: 111, 33: 114, 34: 114,
                35: 120, 36: 120, 37: 124, 38: 128, 39: 131, 40: 125, 41: 113},
        '131k': {0: 41, 1: 56, 2: 70, 3: 103, 4: 101, 5: 94, 6: 120, 7: 119, 8: 72, 9: 75,
                 10: 84, 11: 88, 12: 96, 13: 99, 14: 105, 15: 103, 16: 121, 17: 117, 18: 113,
                 19: 110, 20: 114, 21: 109, 22: 105, 23: 101, 24: 97, 25: 96, 26: 97, 27: 96,
                 28: 98, 29: 97, 30: 95, 31: 92, 32: 88, 33: 91, 34: 89, 35: 94, 36: 93,
                 37: 96, 38: 101, 39: 99, 40: 94, 41: 84},
        '32k': {20: 57}, '65k': {20: 55}, '524k': {20: 48},
        '1m': {9: 122, 20: 101, 31: 77},
    },
    'google/gemma-scope-9b-it-res': {
        '16k': {9: 88, 20: 91, 31: 76},
        '131k': {9: 121, 20: 81, 31: 109},
    },
}
# Fallback for (release, layer, width) not in the table: the listed average_l0 closest to this.
CANONICAL_TARGET_L0 = 100

_HUB_REF = re.compile(r'^(?P<repo>[\w.-]+/[\w.-]+)/(?P<sub>layer_(?P<layer>\d+)/width_(?P<width>\w+)'
                      r'/(?P<l0>canonical|average_l0_\d+))(?:/params\.npz)?$')


def parse_hub_ref(ref: str) -> dict | None:
    """'repo_owner/repo/layer_L/width_W/(average_l0_N|canonical)' -> parts, else None."""
    m = _HUB_REF.match(ref.strip())
    if not m:
        return None
    return dict(repo=m['repo'], layer=int(m['layer']), width=m['width'], l0=m['l0'],
                subpath=m['sub'])


def closest_l0(candidates: list[int], target: int = CANONICAL_TARGET_L0) -> int:
    """The candidate L0 nearest `target` (ties: the smaller L0)."""
    if not candidates:
        raise ValueError('no average_l0_* folders to choose from')
    return min(candidates, key=lambda v: (abs(v - target), v))


def resolve_hub_ref(ref: str, list_files=None) -> tuple[str, str]:
    """(repo id, path of params.npz inside it) for a hub reference; resolves 'canonical'.

    Args:
      list_files: callable repo -> file names, used only for a 'canonical' entry missing from
        CANONICAL_L0 (default: huggingface_hub.HfApi().list_repo_files, needs network).
    """
    parts = parse_hub_ref(ref)
    if parts is None:
        raise ValueError(f'{ref!r} is not a hub SAE reference like '
                         "'google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82'")
    repo, layer, width = parts['repo'], parts['layer'], parts['width']
    folder = f'layer_{layer}/width_{width}'
    if parts['l0'] != 'canonical':
        return repo, f"{parts['subpath']}/params.npz"
    l0 = CANONICAL_L0.get(repo, {}).get(width, {}).get(layer)
    if l0 is None:
        if list_files is None:
            from huggingface_hub import HfApi
            list_files = HfApi().list_repo_files
        pat = re.compile(re.escape(folder) + r'/average_l0_(\d+)/params\.npz$')
        found = sorted({int(m[1]) for f in list_files(repo) if (m := pat.match(f))})
        if not found:
            raise FileNotFoundError(f'{repo} has no {folder}/average_l0_*/params.npz')
        l0 = closest_l0(found)
    return repo, f'{folder}/average_l0_{l0}/params.npz'


def _load_hub(ref: str, **kw) -> SAEParams:
    repo, filename = resolve_hub_ref(ref)
    try:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(repo, filename)
    except Exception as e:  # offline, gated, missing: all end the same way for the user
        raise FileNotFoundError(
            f'could not fetch {filename} from the Hugging Face repo {repo} ({type(e).__name__}: '
            f'{e}). Offline? Download params.npz elsewhere and pass its path (or its folder) '
            f'as the SAE source instead of {ref!r}.') from e
    if kw.get('layer') is None:
        kw['layer'] = parse_hub_ref(ref)['layer']
    return _load_npz(path, **kw)


def load_sae(source: str, *, d_model: int | None = None, dtype=jnp.float32,
             layer: int | None = None) -> SAEParams:
    """Loads a JumpReLU SAE from a file, folder or hub reference (see module docstring).

    Args:
      source: path to params.npz, or a folder holding params.npz / SAELens files / our orbax
        layout, or a hub reference 'owner/repo/layer_L/width_W/(average_l0_N|canonical)'.
      d_model: expected model residual width; a mismatch raises ValueError.
      dtype: array dtype of the returned params (float32 default).
      layer: model layer, for error messages (parsed from the path when not given).
    Returns:
      SAEParams.
    """
    kw = dict(d_model=d_model, dtype=dtype, layer=layer)
    source = os.fspath(source)
    if os.path.isfile(source):
        if source.endswith('.npz'):
            return _load_npz(source, **kw)
        raise ValueError(f'{source}: unknown SAE file type (expected a Gemma Scope params.npz)')
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, 'params.npz')):
            return _load_npz(os.path.join(source, 'params.npz'), **kw)
        if os.path.isfile(os.path.join(source, 'cfg.json')):
            return _load_saelens(source, **kw)
        if os.path.isfile(os.path.join(source, 'metadata.json')):
            return _load_orbax(source, **kw)
        raise FileNotFoundError(f'{source}: folder has none of params.npz, cfg.json + '
                                'sae_weights.safetensors, metadata.json + params/')
    if parse_hub_ref(source) is not None:
        return _load_hub(source, **kw)
    raise FileNotFoundError(f'SAE source {source!r} is neither an existing path nor a hub '
                            "reference like 'google/gemma-scope-2b-pt-res/layer_12/width_16k/"
                            "canonical'")
