"""read_gguf and load_gguf_tokenizer on tiny GGUF files written here with gguf.GGUFWriter."""
import json
import os
import pathlib
import subprocess
import sys

import gguf
import numpy as np
import pytest

from mosaic_jax.models import gguf as mgguf

# Tiny Gemma 3: D=64 (two Q8_0 blocks of 32 per row), 7 blocks so the 5:1 pattern wraps once.
D, F, N, K, H, V, LAYERS = 64, 128, 2, 1, 32, 48, 7


def _tiny_tensors(rng, arch='gemma3'):
    """llama.cpp name -> (HF-convention float32 array, quant type); norms hold w, not 1 + w."""
    # Multiples of 1/64 in [-1, 1): 1 + w and (1 + w) - 1 are exact in float32.
    vals = lambda *shape: rng.integers(-64, 64, size=shape).astype(np.float32) / 64  # noqa: E731
    out = {'token_embd.weight': vals(V, D), 'output_norm.weight': vals(D)}
    for i in range(LAYERS):
        b = f'blk.{i}.'
        out |= {
            b + 'attn_norm.weight': vals(D), b + 'post_attention_norm.weight': vals(D),
            b + 'ffn_norm.weight': vals(D), b + 'post_ffw_norm.weight': vals(D),
            b + 'attn_q.weight': vals(N * H, D), b + 'attn_k.weight': vals(K * H, D),
            b + 'attn_v.weight': vals(K * H, D), b + 'attn_output.weight': vals(D, N * H),
            b + 'ffn_gate.weight': vals(F, D), b + 'ffn_down.weight': vals(D, F),
        }
        # Q8_0 stores int8 * f16 scale per block of 32, scale = max|x| / 127: integers in
        # [-127, 127] times 2^-7, with 127 in every block, round-trip exactly.
        up = rng.integers(-127, 128, size=(F, D)).astype(np.float32)
        up[:, ::32] = 127
        out[b + 'ffn_up.weight'] = up / 128
        if arch == 'gemma3':
            out |= {b + 'attn_q_norm.weight': vals(H), b + 'attn_k_norm.weight': vals(H)}
    return out


def _placeholder_vocab(w):
    w.add_tokenizer_model('llama')
    w.add_token_list([f'tok{i}' for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([1] * V)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)


def _write(path, arch='gemma3', tensors=None, rng=None, skip=(), vocab=None):
    """Writes a tiny GGUF as llama.cpp's converter would; returns the HF-convention arrays.

    `vocab` is a function of the GGUFWriter that writes the tokenizer metadata; by default a
    placeholder V-token list (enough for the config, not a usable tokenizer).
    """
    tensors = _tiny_tensors(rng or np.random.default_rng(0), arch) if tensors is None else tensors
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(F)
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_key_length(H)
    w.add_value_length(H)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(16)
    if arch == 'gemma2':
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    # Like the real file: no vocab_size key, the vocabulary size is the token list's length.
    (vocab or _placeholder_vocab)(w)
    for name, x in tensors.items():
        if name in skip:
            continue
        if name.endswith('norm.weight'):
            w.add_tensor(name, x + np.float32(1))  # llama.cpp stores Gemma norms as 1 + w
        elif name.endswith('ffn_up.weight'):
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_gemma3_names_orientation_norms_and_q8(tmp_path):
    path = tmp_path / 'tiny.gguf'
    src = _write(path)
    _, tensors = mgguf.read_gguf(path)

    assert len(tensors) == 2 + 13 * LAYERS
    assert all(t.dtype == np.float32 for t in tensors.values())
    np.testing.assert_array_equal(tensors['model.embed_tokens.weight'], src['token_embd.weight'])
    # GGUF lists dims fastest-first ([in, out] for a Linear); HF wants [out, in].
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert list(stored['blk.0.attn_q.weight'].shape) == [D, N * H]
    assert tensors['model.layers.0.self_attn.q_proj.weight'].shape == (N * H, D)
    pairs = {'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
             'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
             'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj',
             # norms: stored 1 + w, returned w (exact for these values)
             'attn_norm': 'input_layernorm', 'post_attention_norm': 'post_attention_layernorm',
             'ffn_norm': 'pre_feedforward_layernorm', 'post_ffw_norm': 'post_feedforward_layernorm',
             'attn_q_norm': 'self_attn.q_norm', 'attn_k_norm': 'self_attn.k_norm'}
    for i in (0, LAYERS - 1):
        for ours, hf in pairs.items():
            np.testing.assert_array_equal(tensors[f'model.layers.{i}.{hf}.weight'],
                                          src[f'blk.{i}.{ours}.weight'], err_msg=f'{i} {hf}')
    np.testing.assert_array_equal(tensors['model.norm.weight'], src['output_norm.weight'])
    assert stored['blk.0.ffn_up.weight'].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_gemma3_config(tmp_path):
    path = tmp_path / 'tiny.gguf'
    _write(path)
    cfg, _ = mgguf.read_gguf(path)
    assert cfg['model_type'] == 'gemma3_text'
    assert cfg['architectures'] == ['Gemma3ForCausalLM']
    assert (cfg['hidden_size'], cfg['intermediate_size']) == (D, F)
    assert cfg['num_hidden_layers'] == LAYERS
    assert (cfg['num_attention_heads'], cfg['num_key_value_heads'], cfg['head_dim']) == (N, K, H)
    assert cfg['vocab_size'] == V  # from the token list: the file has no vocab_size key
    assert cfg['max_position_embeddings'] == 128 and cfg['sliding_window'] == 16
    assert cfg['rms_norm_eps'] == pytest.approx(1e-6, rel=1e-7)  # stored as float32
    assert cfg['rope_theta'] == 1e6 and cfg['rope_local_base_freq'] == 1e4
    assert cfg['rope_parameters']['sliding_attention']['rope_theta'] == 1e4
    assert cfg['layer_types'] == ['sliding_attention'] * 5 + ['full_attention', 'sliding_attention']
    assert cfg['query_pre_attn_scalar'] == 256
    assert cfg['final_logit_softcapping'] is None and cfg['attn_logit_softcapping'] is None
    assert cfg['tie_word_embeddings'] is True
    assert (cfg['pad_token_id'], cfg['eos_token_id'], cfg['bos_token_id']) == (0, 1, 2)


def test_gemma2_config_and_tensors(tmp_path):
    path = tmp_path / 'tiny2.gguf'
    src = _write(path, arch='gemma2')
    cfg, tensors = mgguf.read_gguf(path)
    assert cfg['model_type'] == 'gemma2' and cfg['architectures'] == ['Gemma2ForCausalLM']
    assert cfg['layer_types'][:3] == ['sliding_attention', 'full_attention', 'sliding_attention']
    assert (cfg['attn_logit_softcapping'], cfg['final_logit_softcapping']) == (50.0, 30.0)
    assert not any('q_norm' in k for k in tensors)
    np.testing.assert_array_equal(tensors['model.layers.1.pre_feedforward_layernorm.weight'],
                                  src['blk.1.ffn_norm.weight'])


def test_unknown_architecture_is_named(tmp_path):
    path = tmp_path / 'llama.gguf'
    _write(path, arch='llama')
    with pytest.raises(ValueError, match="architecture 'llama'.*supported"):
        mgguf.read_gguf(path)


def test_missing_and_unmapped_tensors_raise(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / 'missing.gguf'
    _write(path, rng=rng, skip=('blk.3.attn_k.weight',))
    with pytest.raises(ValueError, match='lacks 1 tensors.*layers.3.self_attn.k_proj'):
        mgguf.read_gguf(path)

    extra = _tiny_tensors(rng) | {'blk.0.attn_qkv.weight': np.zeros((3, D), np.float32)}
    path = tmp_path / 'extra.gguf'
    _write(path, tensors=extra)
    with pytest.raises(ValueError, match="'blk.0.attn_qkv.weight' has no transformers name"):
        mgguf.read_gguf(path)


def test_shape_mismatch_raises(tmp_path):
    bad = _tiny_tensors(np.random.default_rng(2))
    bad['blk.2.attn_v.weight'] = np.zeros((2 * H, D), np.float32)  # 2 KV heads, metadata says 1
    path = tmp_path / 'bad.gguf'
    _write(path, tensors=bad)
    with pytest.raises(ValueError, match=r'layers.2.self_attn.v_proj.weight: shape \(64, 64\)'):
        mgguf.read_gguf(path)


def test_matches_transformers_gguf_loading(tmp_path):
    """The tiny file loaded by transformers (the reference) gives the same tensors and config."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    path = tmp_path / 'tiny.gguf'
    _write(path)
    cfg, tensors = mgguf.read_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32)
    want = {k: v.numpy() for k, v in ref.state_dict().items() if k != 'lm_head.weight'}  # tied
    assert set(want) == set(tensors)
    for name, w in want.items():
        np.testing.assert_array_equal(tensors[name], w, err_msg=name)  # same float32 ops: exact
    rc = ref.config
    for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                'num_attention_heads', 'num_key_value_heads', 'head_dim', 'layer_types',
                'sliding_window', 'rms_norm_eps', 'query_pre_attn_scalar',
                'max_position_embeddings',
                'final_logit_softcapping', 'attn_logit_softcapping', 'tie_word_embeddings'):
        assert cfg[key] == getattr(rc, key), key
    assert cfg['rope_parameters'] == rc.rope_parameters


@pytest.mark.parametrize('arch', ['gemma2', 'gemma3'])
def test_config_feeds_gemma_config(tmp_path, arch):
    """The dict is what models.config expects from a transformers config.json."""
    config = pytest.importorskip('mosaic_jax.models.config')
    path = tmp_path / f'{arch}.gguf'
    _write(path, arch=arch)
    hf, _ = mgguf.read_gguf(path)
    cfg = config.GemmaConfig.from_hf(hf)
    assert len(cfg.attn_types) == LAYERS
    assert [t.value for t in cfg.attn_types] == hf['layer_types']
    assert (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (D, N, K, H)


# --- load_gguf_tokenizer: a tiny Gemma-style sentencepiece vocabulary ---------------------------

# llama.cpp token types (gguf.TokenType): NORMAL 1, CONTROL 3, USER_DEFINED 4, BYTE 6.
_NORMAL, _CONTROL, _USER, _BYTE = 1, 3, 4, 6
# Words whose prefixes all become tokens, so the merges rebuilt from the vocabulary chain up.
_WORDS = ('hello', 'world', 'the', 'code', 'café', '▁hello', '▁world', '▁▁x')
_TEXTS = [
    'hello world', 'the hello', ' hello', '  hello  world  ', 'hello\nworld\n\n\nthe',
    'café 😀 ünï', '<start_of_turn>hello<end_of_turn>', 'hello<bos>world', '[multimodal]x',
    '', ' ', '\t\t', 'zzz', 'hello' * 5, '   the   code',
]


def _tiny_gemma_tokens():
    """(tokens, types) laid out like Gemma 3's file: specials, user-defined newlines, spaces as
    real spaces, 256 byte tokens, then ordinary pieces (file order = merge priority)."""
    tokens = [('<pad>', _CONTROL), ('<eos>', _CONTROL), ('<bos>', _CONTROL), ('<unk>', _CONTROL),
              ('<mask>', _CONTROL), ('[multimodal]', _USER), ('<start_of_turn>', _CONTROL),
              ('<end_of_turn>', _CONTROL), ('\n', _USER), ('\n\n', _USER),
              ('  ', _NORMAL), ('   ', _NORMAL)]  # Gemma stores space runs as spaces, not '▁▁'
    tokens += [(f'<0x{b:02X}>', _BYTE) for b in range(256)]
    pieces = sorted({c for word in _WORDS for c in word})
    pieces += [w[:n] for w in _WORDS for n in range(2, len(w) + 1)]
    tokens += [(p, _NORMAL) for p in dict.fromkeys(pieces) if p != '▁▁']  # '▁▁' is '  ' above
    return [t for t, _ in tokens], [k for _, k in tokens]


def _vocab(add_bos=None, bos=2, unk=3):
    """A `_write(vocab=...)` writer for the tiny Gemma vocabulary."""
    def write(w):
        toks, types = _tiny_gemma_tokens()
        w.add_tokenizer_model('llama')
        w.add_tokenizer_pre('default')
        w.add_token_list(toks)
        w.add_token_scores([-float(i) for i in range(len(toks))])
        w.add_token_types(types)
        w.add_bos_token_id(bos)
        w.add_eos_token_id(1)
        w.add_unk_token_id(unk)
        w.add_pad_token_id(0)
        w.add_add_space_prefix(False)
        if add_bos is not None:  # absent: llama.cpp's default for sentencepiece (add BOS)
            w.add_add_bos_token(add_bos)
    return write


def _backend_json(tokenizer):
    """The whole backend (vocab, merges, added tokens, normalizer, post-processor) as a dict.

    Less `padding` / `truncation`: transformers sets those on the backend per call (they are the
    last call's `padding=` arguments), not part of the tokenizer.
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    return {k: v for k, v in backend.items() if k not in ('padding', 'truncation')}


def _assert_same_tokenizer(ours, ref, texts):
    assert type(ours) is type(ref)
    assert _backend_json(ours) == _backend_json(ref)
    # Not add_bos_token: save_pretrained drops that flag (transformers 5), so a reloaded copy
    # reports False while its post-processor, compared above, still adds BOS.
    for attr in ('bos_token_id', 'eos_token_id', 'unk_token_id', 'pad_token_id', 'padding_side',
                 'all_special_tokens'):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    for text in texts:
        assert ours(text)['input_ids'] == ref(text)['input_ids'], repr(text)
    for side in ('left', 'right'):
        ours.padding_side = ref.padding_side = side
        got = ours(texts, padding=True, return_tensors='np')
        want = ref(texts, padding=True, return_tensors='np')
        np.testing.assert_array_equal(got['input_ids'], want['input_ids'], err_msg=side)
        np.testing.assert_array_equal(got['attention_mask'], want['attention_mask'], err_msg=side)


# The second case names other tokens BOS / UNK (ids 6, 7): the special tokens must come from the
# file, not from GemmaTokenizer's defaults, which equal Gemma's real ones.
@pytest.mark.parametrize('arch, add_bos, bos, unk',
                         [('gemma3', None, 2, 3), ('gemma2', False, 6, 7)])
def test_tokenizer_matches_transformers_gguf_loading(tmp_path, arch, add_bos, bos, unk):
    """Same tokenizer as AutoTokenizer's GGUF path (the reference, which needs torch)."""
    pytest.importorskip('torch')  # only the reference needs it
    transformers = pytest.importorskip('transformers')
    path = tmp_path / 'tiny.gguf'
    _write(path, arch=arch, vocab=_vocab(add_bos=add_bos, bos=bos, unk=unk))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    # Saved before any call: a call's padding arguments stay on the backend and would be saved.
    ref.save_pretrained(tmp_path / 'ref')
    ours = mgguf.load_gguf_tokenizer(path, cache_dir=tmp_path / 'cache')
    assert ours.add_bos_token is ref.add_bos_token is (add_bos is None)  # flag, else default
    assert ours.add_eos_token is ref.add_eos_token is False
    assert ours.padding_side == 'left'  # GemmaTokenizer's; the tests below flip it
    # Sanity of the tiny vocabulary itself: whole words, a respelled space run, bytes for '😀'.
    want = ['hello', '▁▁', 'world', '▁', '<0xF0>', '<0x9F>', '<0x98>', '<0x80>']
    got = ours.convert_ids_to_tokens(ours('hello  world 😀')['input_ids'])
    assert got == (['<bos>'] + want if add_bos is None else want)
    _assert_same_tokenizer(ours, ref, _TEXTS)

    cached = mgguf.load_gguf_tokenizer(path, cache_dir=tmp_path / 'cache')
    assert (tmp_path / 'cache' / 'tiny' / 'mosaic_source.json').exists()
    # The cached copy against the reference put through the same save / reload: reloading
    # rewrites some backend fields (the BPE model's unk_token becomes the named unk token).
    _assert_same_tokenizer(cached, transformers.AutoTokenizer.from_pretrained(tmp_path / 'ref'),
                           _TEXTS)
    assert [cached(t)['input_ids'] for t in _TEXTS] == [ref(t)['input_ids'] for t in _TEXTS]


def test_tokenizer_builds_without_torch(tmp_path):
    """A fresh machine without torch: build from the file into an empty cache, in a subprocess
    where `import torch` fails, and tokenize like the cached copy does here."""
    pytest.importorskip('transformers')
    import mosaic_jax
    path = tmp_path / 'tiny.gguf'
    _write(path, vocab=_vocab())
    script = (
        "import json, sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "from mosaic_jax.models import gguf\n"
        "tok = gguf.load_gguf_tokenizer(sys.argv[1], cache_dir=sys.argv[2])\n"
        "print(json.dumps([tok(t)['input_ids'] for t in json.loads(sys.argv[3])]))\n")
    root = str(pathlib.Path(mosaic_jax.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get('PYTHONPATH', '')]))
    run = subprocess.run([sys.executable, '-c', script, str(path), str(tmp_path / 'cache'),
                          json.dumps(_TEXTS)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    built_ids = json.loads(run.stdout.strip().splitlines()[-1])
    cached = mgguf.load_gguf_tokenizer(path, cache_dir=tmp_path / 'cache')
    assert built_ids == [cached(t)['input_ids'] for t in _TEXTS]
    assert cached.convert_ids_to_tokens(built_ids[0]) == ['<bos>', 'hello', '▁world']


def test_tokenizer_falls_back_to_autotokenizer(tmp_path, monkeypatch, caplog):
    """A transformers without the torch-free converter module: AutoTokenizer builds it."""
    pytest.importorskip('torch')  # the fallback is transformers' own, torch-importing route
    pytest.importorskip('transformers')
    path = tmp_path / 'tiny.gguf'
    _write(path, vocab=_vocab())
    built = mgguf.load_gguf_tokenizer(path, cache_dir=tmp_path / 'ours')
    monkeypatch.setattr(mgguf, '_converter', lambda: None)
    with caplog.at_level('WARNING'):
        fallback = mgguf.load_gguf_tokenizer(path, cache_dir=tmp_path / 'fallback')
    assert 'building the GGUF tokenizer with AutoTokenizer' in caplog.text
    assert (tmp_path / 'fallback' / 'tiny' / 'mosaic_source.json').exists()
    _assert_same_tokenizer(built, fallback, _TEXTS)


def test_tokenizer_errors_are_named(tmp_path):
    path = tmp_path / 'llama.gguf'
    _write(path, arch='llama', vocab=_vocab())
    with pytest.raises(ValueError, match="architecture 'llama'.*no tokenizer class"):
        mgguf.load_gguf_tokenizer(path, cache_dir=tmp_path)

    path = tmp_path / 'bad_bos.gguf'
    _write(path, vocab=_vocab(bos=10_000))
    size = len(_tiny_gemma_tokens()[0])
    with pytest.raises(ValueError, match=f'bos_token_id = 10000 is outside the {size}-token'):
        mgguf.load_gguf_tokenizer(path, cache_dir=tmp_path)

    path = tmp_path / 'no_vocab.gguf'
    _write(path, vocab=lambda w: w.add_tokenizer_model('llama'))
    with pytest.raises(ValueError, match='no tokenizer.ggml.tokens'):
        mgguf.load_gguf_tokenizer(path, cache_dir=tmp_path)
    assert not list(tmp_path.glob('.tmp-*'))  # nothing half-written is left behind
