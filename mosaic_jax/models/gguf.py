"""GGUF (llama.cpp) checkpoints -> transformers-named float32 tensors and config dict.

Only the `gguf` package is used (no torch), so `loading.py` maps GGUF files with the same table it
uses for HF safetensors. The reference for every convention here is transformers' own GGUF loading
(`from_pretrained(dir, gguf_file=name)`), checked tensor by tensor in tests/test_real_gemma3.py.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

import gguf
import numpy as np
from absl import logging

# llama.cpp names -> transformers names, per block (gguf-py `MODEL_TENSORS[GEMMA2/GEMMA3]`).
_BLOCK_NAMES = {
    'attn_norm': 'input_layernorm',
    'attn_q': 'self_attn.q_proj',
    'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj',
    'attn_q_norm': 'self_attn.q_norm',  # Gemma 3 only
    'attn_k_norm': 'self_attn.k_norm',  # Gemma 3 only
    'post_attention_norm': 'post_attention_layernorm',
    'ffn_norm': 'pre_feedforward_layernorm',
    'post_ffw_norm': 'post_feedforward_layernorm',
    'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj',
}
_GLOBAL_NAMES = {
    'token_embd': 'model.embed_tokens',
    'output_norm': 'model.norm',
    'output': 'lm_head',  # written by llama.cpp only when not tied to the embedding
}

# Tokenizer arrays (262k entries for Gemma 3) and any other long array are kept as their length:
# decoding them into Python objects is slow and the config only needs the vocabulary size.
_MAX_DECODED_ARRAY = 4096


def _gemma_config(meta: dict[str, Any], tensor_names: list[str], arch: str) -> dict[str, Any]:
    """A transformers Gemma2Config / Gemma3TextConfig dict from GGUF metadata.

    Values the file states are read from it; values it lacks are the ones transformers' GGUF
    loading ends up with (its config class defaults), noted inline.
    """
    key = lambda name: meta[f'{arch}.{name}']  # noqa: E731
    num_layers = int(key('block_count'))
    head_dim = int(key('attention.key_length'))
    if (value_dim := meta.get(f'{arch}.attention.value_length', head_dim)) != head_dim:
        raise ValueError(f'GGUF {arch}: key_length {head_dim} != value_length {value_dim}; '
                         'Gemma uses one head dim for both.')
    if arch == 'gemma3':
        # Not in older GGUFs: Gemma3TextConfig's `sliding_window_pattern` (5 local : 1 global).
        pattern = 6
        local_theta = 10_000.0  # Gemma3TextConfig.default_theta['local']
        final_cap = attn_cap = None  # Gemma 3 replaced soft-capping with q/k norms
        config = {'model_type': 'gemma3_text', 'architectures': ['Gemma3ForCausalLM']}
    else:
        pattern = 2  # Gemma2Config: local and global layers alternate
        local_theta = None
        # llama.cpp's converter writes both caps; Gemma2Config's defaults are the same values.
        final_cap = float(meta.get('gemma2.final_logit_softcapping', 30.0))
        attn_cap = float(meta.get('gemma2.attn_logit_softcapping', 50.0))
        config = {'model_type': 'gemma2', 'architectures': ['Gemma2ForCausalLM']}
    # Newer llama.cpp converters state the pattern and local base; the file then wins.
    stated = meta.get(f'{arch}.attention.sliding_window_pattern')
    if isinstance(stated, list):  # one bool per layer, True = sliding window
        if len(stated) != num_layers:
            raise ValueError(f'GGUF {arch}: sliding_window_pattern has {len(stated)} entries '
                             f'for {num_layers} blocks.')
        is_local = [bool(s) for s in stated]
    else:  # a period n: every n-th block is global (llama.cpp and transformers agree on this)
        pattern = int(stated or pattern)
        is_local = [bool((i + 1) % pattern) for i in range(num_layers)]
    if local_theta is not None:
        local_theta = float(meta.get(f'{arch}.rope.freq_base_swa', local_theta))
    rope_theta = float(key('rope.freq_base'))
    layer_types = ['sliding_attention' if local else 'full_attention' for local in is_local]
    # transformers reads vocab_size from the tokenizer's token list when the file has no key.
    vocab = meta.get(f'{arch}.vocab_size', meta.get('tokenizer.ggml.tokens'))
    if vocab is None:
        raise ValueError(f'GGUF {arch}: no {arch}.vocab_size and no tokenizer.ggml.tokens.')
    config |= {
        'vocab_size': int(vocab),
        'hidden_size': int(key('embedding_length')),
        'intermediate_size': int(key('feed_forward_length')),
        'num_hidden_layers': num_layers,
        'num_attention_heads': int(key('attention.head_count')),
        'num_key_value_heads': int(key('attention.head_count_kv')),
        'head_dim': head_dim,
        'max_position_embeddings': int(key('context_length')),
        # kept as the float32 the file stores (9.99999997e-07), exactly as transformers does
        'rms_norm_eps': float(key('attention.layer_norm_rms_epsilon')),
        'sliding_window': int(key('attention.sliding_window')),
        'layer_types': layer_types,
        # Not in GGUF: the config classes' default, which equals the real value for every
        # released Gemma 2/3 except the 27B sizes (llama.cpp special-cases those by size).
        'query_pre_attn_scalar': 256,
        'final_logit_softcapping': final_cap,
        'attn_logit_softcapping': attn_cap,
        'hidden_activation': 'gelu_pytorch_tanh',
        'rope_theta': rope_theta,
        'tie_word_embeddings': 'output.weight' not in tensor_names,
        'pad_token_id': meta.get('tokenizer.ggml.padding_token_id'),
        'bos_token_id': meta.get('tokenizer.ggml.bos_token_id'),
        'eos_token_id': meta.get('tokenizer.ggml.eos_token_id'),
    }
    # Both spellings: transformers 4.x reads the flat keys, 5.x `rope_parameters`.
    if local_theta is None:
        config['rope_parameters'] = {'rope_type': 'default', 'rope_theta': rope_theta}
    else:
        config['rope_local_base_freq'] = local_theta
        config['rope_parameters'] = {
            'full_attention': {'rope_type': 'default', 'rope_theta': rope_theta},
            'sliding_attention': {'rope_type': 'default', 'rope_theta': local_theta},
        }
    return config


# general.architecture -> the llama.cpp block tensors it has
_ARCHS: dict[str, frozenset[str]] = {
    'gemma2': frozenset(_BLOCK_NAMES) - {'attn_q_norm', 'attn_k_norm'},
    'gemma3': frozenset(_BLOCK_NAMES),
}


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Scalar / string / short-array metadata by key; tokenizer and long arrays become lengths."""
    meta = {}
    for name, field in reader.fields.items():
        is_array = bool(field.types) and field.types[0] == gguf.GGUFValueType.ARRAY
        if is_array and (name.startswith('tokenizer.') or len(field.data) > _MAX_DECODED_ARRAY):
            meta[name] = len(field.data)
        else:
            meta[name] = field.contents()
    return meta


def _hf_name(gguf_name: str, block_names: frozenset[str]) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    stem, _, suffix = gguf_name.rpartition('.')
    parts = stem.split('.')
    if suffix == 'weight' and len(parts) == 3 and parts[0] == 'blk' and parts[1].isdigit():
        if parts[2] in block_names:
            return f'model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.weight'
    elif suffix == 'weight' and stem in _GLOBAL_NAMES:
        return f'{_GLOBAL_NAMES[stem]}.weight'
    raise ValueError(f'GGUF tensor {gguf_name!r} has no transformers name in the mapping table.')


def _dequantize(tensor: gguf.gguf_reader.ReaderTensor) -> np.ndarray:
    """float32 numpy array in row-major order (GGUF lists dims fastest-first, so reversed)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f'GGUF tensor {tensor.name!r}: cannot dequantise type '
                         f'{tensor.tensor_type.name} ({e}).') from e
    w = np.asarray(w, dtype=np.float32).reshape(shape)
    # Unquantised tensors come back as views of the read-only memory map; own them instead.
    return w.copy() if np.may_share_memory(w, tensor.data) else w


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, with Linear weights as [out, in] (what nn.Linear stores)."""
    d, f, h = cfg['hidden_size'], cfg['intermediate_size'], cfg['head_dim']
    n, k = cfg['num_attention_heads'], cfg['num_key_value_heads']
    per_block = {
        'input_layernorm': (d,), 'post_attention_layernorm': (d,),
        'pre_feedforward_layernorm': (d,), 'post_feedforward_layernorm': (d,),
        'self_attn.q_proj': (n * h, d), 'self_attn.k_proj': (k * h, d),
        'self_attn.v_proj': (k * h, d), 'self_attn.o_proj': (d, n * h),
        'self_attn.q_norm': (h,), 'self_attn.k_norm': (h,),
        'mlp.gate_proj': (f, d), 'mlp.up_proj': (f, d), 'mlp.down_proj': (d, f),
    }
    shapes = {'model.embed_tokens.weight': (cfg['vocab_size'], d), 'model.norm.weight': (d,)}
    if not cfg['tie_word_embeddings']:
        shapes['lm_head.weight'] = (cfg['vocab_size'], d)
    for i in range(cfg['num_hidden_layers']):
        for name, shape in per_block.items():
            if cfg['model_type'] == 'gemma2' and name.endswith(('q_norm', 'k_norm')):
                continue
            shapes[f'model.layers.{i}.{name}.weight'] = shape
    return shapes


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads a Gemma 2/3 GGUF file into transformers names and conventions.

    Args:
      path: a `.gguf` file (any of the tensor types `gguf.quants.dequantize` handles).
    Returns:
      (config, tensors): `config` is a transformers Gemma2Config / Gemma3TextConfig dict;
      `tensors` maps HF names (`model.layers.{i}.self_attn.q_proj.weight`, ...) to float32
      arrays in HF orientation ([out, in] for Linear weights) and HF's norm convention (the
      model computes x * (1 + w), so a zero-initialised norm weight is the identity).
    Raises:
      ValueError: unknown architecture, unmapped or missing tensor, or a shape that does not
        match the metadata.
    """
    start = time.perf_counter()
    reader = gguf.GGUFReader(path)
    meta = _metadata(reader)
    arch = meta.get('general.architecture')
    if arch not in _ARCHS:
        raise ValueError(f'GGUF architecture {arch!r} in {path} is not supported; '
                         f'supported: {sorted(_ARCHS)}.')
    block_names = _ARCHS[arch]
    config = _gemma_config(meta, [t.name for t in reader.tensors], arch)
    read_s = time.perf_counter() - start

    tensors = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, block_names)
        w = _dequantize(tensor)
        if tensor.name.endswith('norm.weight'):
            # llama.cpp's converter stores Gemma norm weights as 1 + w (the multiplier itself);
            # transformers subtracts 1 again on load (its Gemma2TensorProcessor), in float32.
            w -= np.float32(1.0)
        tensors[name] = w

    want = _expected_shapes(config)
    if missing := sorted(set(want) - set(tensors)):
        raise ValueError(f'GGUF {path} lacks {len(missing)} tensors, e.g. {missing[:5]}.')
    for name, w in tensors.items():
        if w.shape != want.get(name, w.shape):
            raise ValueError(f'GGUF tensor {name}: shape {w.shape}, config says {want[name]}.')
    logging.info('read_gguf %s: metadata %.1fs, dequantise %.1fs, %d tensors', path, read_s,
                 time.perf_counter() - start - read_s, len(tensors))
    return config, tensors


_TOKENIZER_CACHE = pathlib.Path('~/.cache/mosaic_jax/tokenizers')

# general.architecture -> the tokenizer class AutoTokenizer picks for its model type
# (`gemma2` / `gemma3_text` in transformers' TOKENIZER_MAPPING_NAMES).
_TOKENIZER_CLASSES = {'gemma2': 'GemmaTokenizer', 'gemma3': 'GemmaTokenizer'}

# Special-token name -> the `tokenizer.ggml.*` key holding its id.
_SPECIAL_TOKEN_IDS = {
    'bos_token': 'bos_token_id',
    'eos_token': 'eos_token_id',
    'unk_token': 'unknown_token_id',
    'pad_token': 'padding_token_id',
}


def _tokenizer_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every `tokenizer.*` field in full: strings decoded as UTF-8, numeric arrays as lists.

    `_metadata` keeps tokenizer arrays as lengths; here the 262k-entry token, score and type lists
    are the point, so they are decoded (~0.3 s each for Gemma 3).
    """
    return {name: field.contents() for name, field in reader.fields.items()
            if name.startswith('tokenizer.')}


def _tokenizer_inputs(meta: dict[str, Any], key_table: dict[str, dict[str, str]]
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_dict, init kwargs) as transformers' GGUF tokenizer loading builds them.

    Args:
      meta: metadata by GGUF key, with the `tokenizer.*` arrays in full.
      key_table: transformers' GGUF_TOKENIZER_MAPPING, {group: {key after 'tokenizer.': name}}.
    Returns:
      `tokenizer_dict` (tokens, scores, token_type, special ids, ...) for
      `convert_gguf_tokenizer`, and the init kwargs (add_bos_token, the special tokens as
      strings) for the tokenizer class: what `from_pretrained(dir, gguf_file=name)` passes.
    """
    groups = {group: {ours: meta[f'tokenizer.{theirs}'] for theirs, ours in renames.items()
                      if f'tokenizer.{theirs}' in meta}
              for group, renames in key_table.items()}
    tokenizer_dict, kwargs = groups['tokenizer'], groups['tokenizer_config']
    tokens = tokenizer_dict.get('tokens')
    if not isinstance(tokens, list) or not tokens:
        raise ValueError('GGUF file has no tokenizer.ggml.tokens list; it carries no tokenizer.')
    if tokenizer_dict.get('tokenizer_type') == 'llama':
        # A sentencepiece vocabulary without the flag: llama.cpp (and transformers) add BOS.
        kwargs.setdefault('add_bos_token', True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = meta.get(f'tokenizer.ggml.{key}')
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ValueError(f'GGUF tokenizer.ggml.{key} = {token_id} is outside the '
                             f'{len(tokens)}-token vocabulary.')
        # None too: transformers passes it, overriding the class's default token.
        kwargs[name] = None if token_id is None else tokens[token_id]
    return tokenizer_dict, kwargs


def _converter():
    """(GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer) from transformers, or None where that
    module is missing (it is in 5.23). Neither imports torch; transformers' GGUF reader does."""
    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping
    except ImportError:
        return None
    return mapping.GGUF_TOKENIZER_MAPPING, mapping.convert_gguf_tokenizer


def _build_tokenizer(path: pathlib.Path):
    """A transformers fast tokenizer from the file's `tokenizer.ggml.*` metadata, without torch.

    Same tokenizer as `AutoTokenizer.from_pretrained(dir, gguf_file=name)`: the same
    tokenizer_dict goes through transformers' own `convert_gguf_tokenizer`, and the result is
    wrapped in the class AutoTokenizer picks, with the same special tokens and add_bos_token
    (the class sets padding_side; 'left' for Gemma).
    """
    import transformers
    if (converter := _converter()) is None:  # other transformers versions: their own route
        logging.warning('transformers %s has no integrations.gguf.gguf_tokenizer_mapping; '
                        'building the GGUF tokenizer with AutoTokenizer, which needs torch.',
                        transformers.__version__)
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    key_table, convert = converter

    start = time.perf_counter()
    reader = gguf.GGUFReader(path)
    meta = _metadata(reader) | _tokenizer_metadata(reader)
    arch = meta.get('general.architecture')
    if arch not in _TOKENIZER_CLASSES:
        raise ValueError(f'GGUF architecture {arch!r} in {path}: no tokenizer class known; '
                         f'supported: {sorted(_TOKENIZER_CLASSES)}.')
    tokenizer_dict, kwargs = _tokenizer_inputs(meta, key_table)
    read_s = time.perf_counter() - start
    backend, extra = convert(arch, tokenizer_dict)
    tokenizer = getattr(transformers, _TOKENIZER_CLASSES[arch])(
        tokenizer_object=backend, **kwargs, **extra)
    logging.info('GGUF tokenizer %s: metadata %.1fs, convert %.1fs, %d tokens', path, read_s,
                 time.perf_counter() - start - read_s, len(tokenizer))
    return tokenizer


def load_gguf_tokenizer(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """The tokenizer a GGUF file carries, as a transformers fast tokenizer (no torch needed).

    Building it from the file's `tokenizer.ggml.*` metadata takes ~20 s for Gemma 3's 262k
    vocabulary on 2 cores (~13 s of it `gguf.GGUFReader` walking the token arrays, ~3 s
    rebuilding the merges), so the first call saves a copy under `cache_dir/<file stem>` and
    later calls load that in a few seconds.

    Args:
      path: a Gemma 2/3 `.gguf` file.
      cache_dir: where cached copies live; default ~/.cache/mosaic_jax/tokenizers.
    Returns:
      The tokenizer `AutoTokenizer.from_pretrained(dir, gguf_file=name)` gives (GemmaTokenizer,
      left padding, BOS added), built without transformers' torch-importing GGUF reader.
    Raises:
      ValueError: an architecture without a known tokenizer class, or broken tokenizer metadata.
    """
    from transformers import AutoTokenizer  # only tokenizers need transformers

    path = pathlib.Path(path).expanduser().resolve()
    cache = pathlib.Path(cache_dir or _TOKENIZER_CACHE).expanduser() / path.stem
    # The file size tells a re-downloaded / different file of the same name from the cached one.
    source = {'gguf': str(path), 'size': path.stat().st_size}
    stamp = cache / 'mosaic_source.json'
    if stamp.exists() and json.loads(stamp.read_text()) == source:
        return AutoTokenizer.from_pretrained(cache)

    tokenizer = _build_tokenizer(path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Save into a sibling temp folder and rename, so a killed run never leaves half a cache.
    tmp = pathlib.Path(tempfile.mkdtemp(dir=cache.parent, prefix=f'.tmp-{path.stem}-'))
    try:
        tokenizer.save_pretrained(tmp)
        (tmp / 'mosaic_source.json').write_text(json.dumps(source))
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return tokenizer
